//! Transports: how planned slices reach a peer. The engine above sees only [`Work`] posted to
//! lanes of a peer link; TCP (and later RDMA) live below.

pub(crate) mod fence;
pub(crate) mod notify;
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
    /// Notification part (`notify::imm_encode`) sent after this lane's data, if any.
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

/// Told why a link was lost.
pub(crate) type LostHook = Arc<dyn Fn(&str) + Send + Sync>;

/// How the engine reaches one peer, whatever the transport: lanes that take [`Work`],
/// caller-driven progress, liveness, the peer's segment list, and close/join. TCP
/// ([`tcp::TcpLink`]) and RDMA ([`rdma::RdmaLink`]) implement it; the engine holds a
/// `Box<dyn PeerLink>` and sees nothing else of either.
pub(crate) trait PeerLink: Send + Sync {
    /// Transport name (`tcp`, `rdma`).
    fn name(&self) -> &'static str;

    /// Number of lanes work can be posted to (an RDMA link's staging lane not counted).
    fn lanes(&self) -> usize;

    /// Each lane's (local rail, remote rail) where lanes are tied to rails; `None` where
    /// every lane reaches every segment.
    fn lane_rails(&self) -> Option<Vec<(usize, u16)>> {
        None
    }

    /// Whether lane `lane` still carries work (false once its rail failed: new batches are
    /// planned onto the others).
    fn lane_usable(&self, _lane: usize) -> bool {
        true
    }

    /// The RDMA link behind this one, for putting a failed rail back (`rdma::rejoin`).
    fn rdma(&self) -> Option<&rdma::RdmaLink> {
        None
    }

    /// The lane that carries batches touching GPU memory in staging mode, where that is not
    /// every lane: an RDMA link's TCP control connection, numbered after its QP lanes (staged
    /// memory has no memory region, so no QP can reach it).
    fn staging_lane(&self) -> Option<usize> {
        None
    }

    /// Completion units the slices of `lane` add to a batch.
    fn units_of(&self, lane: usize, slices: &[Slice]) -> u32;

    /// Hands a lane its work. `inline`: the caller may send it on its own thread.
    /// `remote(segment, remote rail)` gives a remote segment's base address and key.
    fn post(
        &self,
        lane: usize,
        work: Work,
        inline: bool,
        remote: &dyn Fn(u32, u16) -> Option<(u64, u32)>,
    );

    /// Caller-driven progress on a lane (a TCP lane reads its socket); nothing by default.
    fn progress(&self, _lane: usize) {}

    /// The caller starts driving `lane` itself (see [`progress`](Self::progress)).
    fn start_driving(&self, _lane: usize) {}

    /// The caller stops driving `lane`; the transport's own reader takes it back, at once
    /// with `hand_back` (the caller is about to sleep), else a little later in case the
    /// caller comes back.
    fn stop_driving(&self, _lane: usize, _hand_back: bool) {}

    /// Load of a lane, for choosing the idlest.
    fn outstanding(&self, lane: usize) -> usize;

    /// `Err(PeerLost)` once the peer is gone.
    fn check_alive(&self) -> crate::error::Result<()>;

    /// Asks the peer for its segment list (encoded).
    fn fetch_segments(&self, timeout: Duration) -> crate::error::Result<Vec<u8>>;

    /// Calls `hook` with the reason once the link is lost (at once if it already is).
    fn on_lost(&self, hook: LostHook);

    /// Closes every connection; outstanding work fails.
    fn close(&self);

    /// After [`close`](Self::close): waits until no thread of the link reads into local
    /// memory any more (for at most `limit` where the transport must wait on hardware).
    fn join(&self, limit: Duration);
}
