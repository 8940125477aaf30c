//! Transports: how planned slices reach a peer. The engine above sees only [`Work`] posted to
//! lanes of a peer link; TCP (and later RDMA) live below.

pub(crate) mod fence;
pub(crate) mod rdma;
pub(crate) mod tcp;

use std::sync::Arc;
use std::time::Duration;

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
    /// Notification part (`rdma::imm_encode`) sent after this lane's data, if any.
    pub(crate) notify: Option<u32>,
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
        30 => "the receiving room was aborted",
        33 => "staging the bytes into GPU memory failed",
        _ => "refused",
    };
    format!(
        "peer refused {:?} of batch {} (segment {}, offset {}): {what} (peer error code {code})",
        hdr.op, hdr.batch, hdr.segment, hdr.offset
    )
}

/// How a peer is reached: the engine above sees lanes and works, not the transport.
pub(crate) enum Link {
    /// TCP data connections, one per lane.
    Tcp(tcp::TcpLink),
    /// RC QPs, one per lane, plus a TCP control connection.
    Rdma(rdma::RdmaLink),
}

impl Link {
    /// Transport name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Link::Tcp(_) => "tcp",
            Link::Rdma(_) => "rdma",
        }
    }

    /// Number of lanes.
    pub(crate) fn lanes(&self) -> usize {
        match self {
            Link::Tcp(l) => l.conns.len(),
            Link::Rdma(l) => l.lanes.len(),
        }
    }

    /// Each lane's (local rail, remote rail) on RDMA; `None` on TCP (every lane reaches every
    /// segment).
    pub(crate) fn lane_rails(&self) -> Option<Vec<(usize, u16)>> {
        match self {
            Link::Tcp(_) => None,
            Link::Rdma(l) => Some(l.lane_rails()),
        }
    }

    /// The lane that carries batches touching GPU memory in staging mode (on either side) on
    /// an RDMA link: the TCP control connection, numbered after the QP lanes. Staged memory
    /// has no memory region, so no QP can reach it; the TCP path copies it through pinned
    /// bounce buffers. `None` on TCP links, where every lane stages.
    pub(crate) fn staging_lane(&self) -> Option<usize> {
        match self {
            Link::Tcp(_) => None,
            Link::Rdma(l) => Some(l.lanes.len()),
        }
    }

    /// The TCP connection behind `lane`, if it is one (every TCP lane, an RDMA link's
    /// staging lane).
    fn conn(&self, lane: usize) -> Option<&tcp::TcpConn> {
        match self {
            Link::Tcp(l) => Some(&l.conns[lane]),
            Link::Rdma(l) => (lane == l.lanes.len()).then_some(&*l.control),
        }
    }

    /// Completion units the slices of `lane` add to a batch.
    pub(crate) fn units_of(&self, lane: usize, slices: &[Slice]) -> u32 {
        match self.conn(lane) {
            Some(_) => units_of(slices),
            // One signalled completion at the end of the lane's chain covers it all.
            None => u32::from(!slices.is_empty()),
        }
    }

    /// Hands a lane its work.
    pub(crate) fn post(
        &self,
        lane: usize,
        work: Work,
        inline: bool,
        remote: &dyn Fn(u32, u16) -> Option<(u64, u32)>,
    ) {
        match (self.conn(lane), self) {
            (Some(c), _) => c.post(work, inline),
            (None, Link::Rdma(l)) => l.post(lane, work, remote),
            (None, Link::Tcp(_)) => unreachable!("every TCP lane is a connection"),
        }
    }

    /// Caller-driven progress on a lane (TCP reads its socket; RDMA has pollers).
    pub(crate) fn progress(&self, lane: usize) {
        if let Some(c) = self.conn(lane) {
            c.progress();
        }
    }

    /// See [`tcp::TcpConn::start_driving`].
    pub(crate) fn start_driving(&self, lane: usize) {
        if let Some(c) = self.conn(lane) {
            c.start_driving();
        }
    }

    /// See [`tcp::TcpConn::stop_driving`].
    pub(crate) fn stop_driving(&self, lane: usize, hand_back: bool) {
        if let Some(c) = self.conn(lane) {
            c.stop_driving(hand_back);
        }
    }

    /// Load of a lane, for choosing the idlest.
    pub(crate) fn outstanding(&self, lane: usize) -> usize {
        match (self.conn(lane), self) {
            (Some(c), _) => c.outstanding(),
            (None, Link::Rdma(l)) => l.outstanding(lane),
            (None, Link::Tcp(_)) => 0,
        }
    }

    /// `Err(PeerLost)` once the peer is gone.
    pub(crate) fn check_alive(&self) -> crate::error::Result<()> {
        match self {
            Link::Tcp(l) => l.conns.iter().try_for_each(|c| c.check_alive()),
            Link::Rdma(l) => l.check_alive(),
        }
    }

    /// Asks the peer for its segment list (encoded).
    pub(crate) fn fetch_segments(&self, timeout: Duration) -> crate::error::Result<Vec<u8>> {
        match self {
            Link::Tcp(l) => l.conns[0].fetch_segments(timeout),
            Link::Rdma(l) => l.control.fetch_segments(timeout),
        }
    }

    /// Closes every connection; outstanding work fails.
    pub(crate) fn close(&self) {
        match self {
            Link::Tcp(l) => l.conns.iter().for_each(|c| c.close()),
            Link::Rdma(l) => l.close(),
        }
    }

    /// After [`close`](Self::close): waits until no thread of the link reads into local
    /// memory any more: the TCP threads (data connections, or RDMA's control connection)
    /// have exited, and an RDMA link's work requests have completed or been flushed (for at
    /// most `limit`).
    pub(crate) fn join(&self, limit: std::time::Duration) {
        match self {
            Link::Tcp(l) => l.conns.iter().for_each(|c| c.join()),
            Link::Rdma(l) => l.join(limit),
        }
    }
}
