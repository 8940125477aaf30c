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
    /// Completion units this work adds to its batch: one ack if it has writes, one per read.
    pub(crate) fn units(&self) -> u32 {
        units_of(&self.slices)
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

/// Completion units of a lane's slices: one ack if any writes, plus one per read slice.
pub(crate) fn units_of(slices: &[Slice]) -> u32 {
    let reads = slices.iter().filter(|s| s.op == Op::Read).count() as u32;
    reads + u32::from(reads as usize != slices.len())
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
