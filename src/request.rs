//! What callers ask the engine to move: requests, batch ids and batch status.

use crate::memory::SegmentId;

/// Direction of a transfer, seen from the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Copy local memory into the peer's segment.
    Write = 1,
    /// Copy the peer's segment into local memory.
    Read = 2,
}

/// One transfer: `len` bytes between local memory at `local_addr` and the peer's segment
/// `remote_segment` at `remote_offset`.
///
/// The local range must lie inside one segment registered with the local engine; the remote
/// range inside one segment the peer registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Write or read.
    pub op: Op,
    /// Local virtual address (inside a registered segment).
    pub local_addr: u64,
    /// Number of bytes.
    pub len: u64,
    /// Segment id at the peer.
    pub remote_segment: SegmentId,
    /// Offset inside the peer's segment.
    pub remote_offset: u64,
}

impl Request {
    /// A write of `len` bytes from `local_addr` to `remote_segment` + `remote_offset`.
    pub fn write(local_addr: u64, len: u64, remote_segment: SegmentId, remote_offset: u64) -> Self {
        Request {
            op: Op::Write,
            local_addr,
            len,
            remote_segment,
            remote_offset,
        }
    }

    /// A read of `len` bytes from `remote_segment` + `remote_offset` into `local_addr`.
    pub fn read(local_addr: u64, len: u64, remote_segment: SegmentId, remote_offset: u64) -> Self {
        Request {
            op: Op::Read,
            local_addr,
            len,
            remote_segment,
            remote_offset,
        }
    }
}

/// Identifies a submitted batch within its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub u64);

/// What [`poll`](crate::TransferEngine::poll) says about a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchStatus {
    /// Some slices are still moving.
    Pending,
    /// Every byte of every request has landed (writes acknowledged by the peer, reads in
    /// local memory).
    Done,
    /// The batch failed; the string says why. Failed is final.
    Failed(String),
}
