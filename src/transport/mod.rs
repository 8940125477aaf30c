//! Transports: how planned slices reach a peer. The engine above sees only [`Work`] posted to
//! lanes of a peer link; TCP (and later RDMA) live below.

pub(crate) mod tcp;

use std::sync::Arc;

use crate::batch::Batch;
use crate::memory::SegmentGuard;
use crate::plan::Slice;
use crate::request::Op;
use crate::wire::FrameHeader;

/// Slices of one batch for one lane, with the pins of the local memory they touch.
pub(crate) struct Work {
    pub(crate) batch: Arc<Batch>,
    pub(crate) slices: Vec<Slice>,
    pub(crate) guards: Arc<[SegmentGuard]>,
}

impl Work {
    /// Completion units this work adds to its batch (see [`units_of`]).
    pub(crate) fn units(&self) -> u32 {
        units_of(&self.slices)
    }

    /// Writes the work off: its pins are dropped first, then its units fail with `reason`.
    pub(crate) fn abandon(self, reason: &str) {
        let (batch, n) = (self.batch.clone(), self.units());
        drop(self);
        batch.abandon_units(n, reason);
    }

    /// The pin covering `[addr, addr + len)`.
    pub(crate) fn guard_for(&self, addr: u64, len: u64) -> &SegmentGuard {
        self.guards
            .iter()
            .find(|g| {
                let s = &g.segment().info;
                addr >= s.base && addr + len <= s.base + s.len
            })
            .expect("every slice's local range was pinned at submit")
    }
}

/// Completion units of a lane's slices: one for the sender having finished with the local
/// memory, one ack if any writes, plus one per read slice; none for an empty lane. Counting the sender's own unit means
/// a batch never completes while a thread may still read its memory.
pub(crate) fn units_of(slices: &[Slice]) -> u32 {
    if slices.is_empty() {
        return 0;
    }
    let reads = slices.iter().filter(|s| s.op == Op::Read).count() as u32;
    1 + reads + u32::from(reads as usize != slices.len())
}

/// Turns a peer's refusal code into a batch failure reason.
pub(crate) fn describe_remote_code(code: u16, hdr: &FrameHeader) -> String {
    let what = match code {
        5 => "address not registered",
        6 => "unknown segment",
        7 => "range outside the segment",
        3 => "zero length",
        _ => "refused",
    };
    format!(
        "peer refused {:?} of batch {} (segment {}, offset {}): {what} (peer error code {code})",
        hdr.op, hdr.batch, hdr.segment, hdr.offset
    )
}
