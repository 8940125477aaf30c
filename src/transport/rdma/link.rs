//! Initiator side of an RDMA peer: one RC QP per lane, work-request chains posted under
//! send-queue credits with selective signalling, completion back to batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use super::RdmaTransport;
use super::failover::{Cause, Retry};
use super::rejoin::Rejoin;
use super::verbs::{Qp, Wr, WrOp};
use super::worker::{Cmd, SQ_DEPTH};
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::memory::SegmentGuard;
use crate::plan::Slice;
use crate::request::Op;
use crate::transport::PeerLink;
use crate::transport::Work;
use crate::wire::{NO_RAIL, QpInfo, RailInfo, RdmaEndpoint};

/// Completes a work's unit once the last token that carries it is gone, with the first error
/// any of them saw, after releasing the work's memory pins.
pub(crate) struct Finish {
    pub(super) batch: Arc<Batch>,
    pub(super) guards: Option<Arc<[SegmentGuard]>>,
    pub(super) error: Mutex<Option<String>>,
    /// How to post the work again on another rail if its lane's path fails.
    pub(super) retry: Option<Box<Retry>>,
}

impl Finish {
    /// Records `reason` as this unit's failure unless an earlier one was recorded.
    pub(crate) fn set_error(&self, reason: String) {
        self.error.lock().get_or_insert(reason);
    }

    /// Records `reason` and lets go of this handle.
    pub(crate) fn fail(self: Arc<Self>, reason: String) {
        self.set_error(reason);
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let mut error = self.error.get_mut().take();
        // Its lane's path failed (link down, retries exhausted, a fatal event): the whole
        // unit goes again on a surviving rail, unless the batch has failed meanwhile.
        if let Some(e) = &error
            && self
                .retry
                .as_ref()
                .is_some_and(|r| r.lane.cause() == Cause::Path)
            && !self.batch.is_failed()
            && let (Some(r), Some(guards)) = (self.retry.take(), self.guards.take())
        {
            match (*r).repost(&self.batch, guards) {
                Ok(()) => return,
                Err(why) => error = Some(format!("{e}; {why}")),
            }
        }
        drop(self.guards.take());
        self.batch.complete_unit(error.map_or(Ok(()), Err));
    }
}

/// One lane: an RC QP from a local rail to a remote rail, served by that rail's worker.
pub(crate) struct Lane {
    pub(crate) qp: Qp,
    rail: usize,
    /// The peer's rail it is connected to.
    pub(crate) remote_rail: u16,
    /// The lane's slot in its rail worker (set by the worker when it attaches the lane).
    pub(crate) slot: AtomicU32,
    /// Work requests handed to the worker and not yet completed, flushed or abandoned.
    pub(crate) in_use: AtomicUsize,
    dead: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Why it stopped ([`Cause`] as u8; 0 while alive).
    cause: AtomicU8,
}

impl Lane {
    /// Stops the lane for a local reason (closed, shut down): its work is not moved.
    pub(crate) fn fail(&self, reason: String) {
        self.fail_as(Cause::Local, reason)
    }

    /// Why the lane stopped (`Cause::Alive` while it runs).
    pub(crate) fn cause(&self) -> Cause {
        Cause::from_u8(self.cause.load(Ordering::Acquire))
    }

    /// The local rail.
    pub(crate) fn rail(&self) -> usize {
        self.rail
    }

    /// Stops the lane (QP to ERROR) with `reason`, unless it already stopped: the first
    /// reason and cause are kept, and every later failure of its work reports them.
    pub(crate) fn fail_as(&self, cause: Cause, reason: String) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            self.cause.store(cause as u8, Ordering::Release);
            if reason.ends_with("locally") {
                tracing::debug!(qpn = self.qp.qpn, %reason, "rdma lane closed");
            } else {
                tracing::warn!(qpn = self.qp.qpn, %reason, "rdma lane failed");
            }
            *self.reason.lock() = Some(reason);
            self.qp.set_error();
        }
    }

    /// `Err(first reason)` once the lane stopped.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if self.dead.load(Ordering::Acquire) {
            return Err(self
                .reason
                .lock()
                .clone()
                .unwrap_or_else(|| "lane closed".into()));
        }
        Ok(())
    }
}

/// The work requests of one lane's slices (unstamped: the rail worker sets wr_ids and
/// signalling), ending with a zero-length WRITE_WITH_IMM carrying `notify` if given (RC
/// delivers it after the lane's data). `segment_of` names a slice's local segment, `lkey` its
/// local key and `remote` a remote segment's `(base, rkey)`; `Err(local segment)` when a key
/// is missing.
pub(crate) fn work_requests(
    slices: &[Slice],
    segment_of: impl Fn(&Slice) -> u32,
    lkey: impl Fn(u32) -> Option<u32>,
    remote: impl Fn(u32) -> Option<(u64, u32)>,
    notify: Option<u32>,
) -> std::result::Result<Vec<Wr>, u32> {
    let mut wrs = Vec::with_capacity(slices.len() + 1);
    // A lane's slices mostly share one local and one remote segment: look each key up once
    // per change of segment, not once per work request (the lookups take locks).
    let mut local: Option<(u32, Option<u32>)> = None;
    let mut far: Option<(u32, Option<(u64, u32)>)> = None;
    for s in slices {
        let seg = segment_of(s);
        let l = match local {
            Some((at, k)) if at == seg => k,
            _ => local.insert((seg, lkey(seg))).1,
        };
        let r = match far {
            Some((at, k)) if at == s.remote_segment.0 => k,
            _ => {
                far.insert((s.remote_segment.0, remote(s.remote_segment.0)))
                    .1
            }
        };
        let (Some(lkey), Some((base, rkey))) = (l, r) else {
            return Err(seg);
        };
        wrs.push(Wr {
            op: if s.op == Op::Write {
                WrOp::Write
            } else {
                WrOp::Read
            },
            wr_id: 0,
            signaled: false,
            lkey,
            addr: s.local_addr,
            len: s.len as u32,
            rkey,
            remote_addr: base + s.remote_offset,
        });
    }
    if let (Some(imm), Some(&last)) = (notify, wrs.last()) {
        wrs.push(Wr {
            op: WrOp::WriteImm(imm),
            len: 0,
            ..last
        });
    }
    Ok(wrs)
}

/// A link's lanes in lane order. A lane whose rail failed is replaced in place when the rail
/// is put back (`rejoin`), so readers take a snapshot.
pub(crate) type LaneSet = Arc<RwLock<Arc<[Arc<Lane>]>>>;

/// An RDMA peer as the initiator sees it.
pub(crate) struct RdmaLink {
    /// The control connection (a one-lane link of another transport, given by the engine):
    /// segment refreshes, liveness, and the staging lane.
    pub(crate) control: Box<dyn PeerLink>,
    pub(super) lanes: LaneSet,
    pub(super) transport: Arc<RdmaTransport>,
    /// Putting failed rails back: probing, and the extra control connections it opened.
    pub(super) rejoin: Mutex<Rejoin>,
}

/// QPs created before the handshake, waiting for the target's answer.
pub(crate) struct PreparedLanes {
    qps: Vec<Qp>,
}

impl RdmaLink {
    /// Creates `per_rail` QPs on every local rail and the endpoint that offers them.
    pub(crate) fn prepare(
        t: &Arc<RdmaTransport>,
        per_rail: usize,
    ) -> Result<(PreparedLanes, RdmaEndpoint)> {
        let rails: Vec<usize> = (0..per_rail).flat_map(|_| 0..t.rails.len()).collect();
        Self::prepare_on(t, &rails)
    }

    /// Creates one QP on each of `rails` (local rail indices, in lane order) and the endpoint
    /// that offers them.
    pub(crate) fn prepare_on(
        t: &Arc<RdmaTransport>,
        rails: &[usize],
    ) -> Result<(PreparedLanes, RdmaEndpoint)> {
        let qps = rails
            .iter()
            .map(|&r| t.rails[r].create_qp(SQ_DEPTH, 1, 1))
            .collect::<Result<Vec<_>>>()?;
        let offer = RdmaEndpoint {
            rails: t.rail_infos(),
            qps: qps
                .iter()
                .map(|q| QpInfo {
                    rail: q.rail.info.index,
                    qpn: q.qpn,
                    psn: q.psn,
                    peer_rail: NO_RAIL,
                })
                .collect(),
        };
        Ok((PreparedLanes { qps }, offer))
    }

    /// Connects the prepared QPs to the target's answer.
    pub(crate) fn finish(
        t: &Arc<RdmaTransport>,
        prepared: PreparedLanes,
        answer: &RdmaEndpoint,
        control: Box<dyn PeerLink>,
    ) -> Result<RdmaLink> {
        let lanes = Self::connect_lanes(t, prepared, answer)?;
        // The control connection's loss means the peer's: every lane fails at once (the
        // lanes of the moment: a rail put back replaces some).
        let lanes: LaneSet = Arc::new(RwLock::new(lanes.into()));
        let doomed = lanes.clone();
        control.on_lost(Arc::new(move |reason: &str| {
            for l in doomed.read().iter() {
                l.fail_as(Cause::Peer, reason.to_string());
            }
        }));
        Ok(RdmaLink {
            control,
            lanes,
            transport: t.clone(),
            rejoin: Mutex::new(Rejoin::default()),
        })
    }

    /// Connects the prepared QPs to the target's answer, one lane each, attached to their
    /// rail workers.
    pub(super) fn connect_lanes(
        t: &Arc<RdmaTransport>,
        prepared: PreparedLanes,
        answer: &RdmaEndpoint,
    ) -> Result<Vec<Arc<Lane>>> {
        if answer.qps.len() != prepared.qps.len() {
            return Err(Error::Handshake {
                peer: String::new(),
                reason: format!(
                    "peer answered {} QPs for {} offered",
                    answer.qps.len(),
                    prepared.qps.len()
                ),
            });
        }
        let mut lanes = Vec::with_capacity(prepared.qps.len());
        for (qp, theirs) in prepared.qps.into_iter().zip(&answer.qps) {
            let remote: &RailInfo = answer
                .rails
                .iter()
                .find(|r| r.index == theirs.rail)
                .expect("validated by the decoder");
            qp.connect(remote, theirs.qpn, theirs.psn)?;
            lanes.push(Arc::new(Lane {
                rail: qp.rail.info.index as usize,
                remote_rail: theirs.rail,
                qp,
                slot: AtomicU32::new(u32::MAX),
                in_use: AtomicUsize::new(0),
                dead: AtomicBool::new(false),
                reason: Mutex::new(None),
                cause: AtomicU8::new(0),
            }));
        }
        for l in &lanes {
            t.workers[l.rail].control(Cmd::Attach(l.clone()));
        }
        Ok(lanes)
    }

    /// The lanes now, in lane order.
    pub(crate) fn current(&self) -> Arc<[Arc<Lane>]> {
        self.lanes.read().clone()
    }

    /// Everything outstanding fails and the QPs stop (peer lost or closed).
    pub(crate) fn fail_all(lanes: &[Arc<Lane>], reason: &str) {
        for l in lanes {
            l.fail(reason.to_string());
        }
    }

    /// `Err(PeerLost)` once the control connection died, or a lane died for any reason but
    /// its path (a failed rail leaves the peer reachable over the others: see `failover`),
    /// or no lane is left.
    fn alive(&self) -> Result<()> {
        self.control.check_alive()?;
        let lost = |reason| Error::PeerLost {
            peer: "rdma peer".into(),
            epoch: 0,
            reason,
        };
        let mut last = None;
        for l in self.current().iter() {
            if let Err(reason) = l.check() {
                if l.cause() != Cause::Path {
                    return Err(lost(reason));
                }
                last = Some(reason);
            } else {
                return Ok(());
            }
        }
        match last {
            Some(reason) => Err(lost(format!("every rail failed; the last: {reason}"))),
            None => Ok(()),
        }
    }

    /// Posts `work` on QP lane `lane`. `remote(segment, rail)` gives the peer's base address
    /// and rkey. If the lane's rail has failed, the work goes to a surviving one (see
    /// `failover`).
    fn post_qp(&self, lane: usize, work: Work, remote: &dyn Fn(u32, u16) -> Option<(u64, u32)>) {
        let lanes = self.current();
        let l = &lanes[lane];
        if work.batch.is_failed() {
            return work.abandon("batch failed before it was sent");
        }
        if let Err(reason) = l.check()
            && l.cause() != Cause::Path
        {
            return work.abandon(&reason);
        }
        let Work {
            batch,
            slices,
            guards,
            notify,
        } = work;
        let retry = Retry::new(
            lanes.clone(),
            &self.transport,
            slices,
            notify,
            remote,
            l.clone(),
        );
        let finish = Finish {
            batch,
            guards: Some(guards),
            error: Mutex::new(None),
            retry: None,
        };
        retry.post(finish);
    }

    /// After `close`: waits until every work request posted on the lanes has completed or
    /// been flushed (the QPs are in ERROR, so the rail workers collect the flushes quickly),
    /// so no READ lands in local memory afterwards. Gives up after `limit` with a warning
    /// naming the lanes still busy.
    fn drain(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        let lanes = self.current();
        while lanes.iter().any(|l| l.in_use.load(Ordering::Acquire) > 0) {
            if std::time::Instant::now() >= deadline {
                let busy: Vec<u32> = lanes
                    .iter()
                    .filter(|l| l.in_use.load(Ordering::Acquire) > 0)
                    .map(|l| l.qp.qpn)
                    .collect();
                tracing::warn!(?busy, "rdma lanes still have work outstanding after close");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl PeerLink for RdmaLink {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn lanes(&self) -> usize {
        self.lanes.read().len()
    }

    fn lane_rails(&self) -> Option<Vec<(usize, u16)>> {
        Some(
            self.current()
                .iter()
                .map(|l| (l.rail, l.remote_rail))
                .collect(),
        )
    }

    fn lane_usable(&self, lane: usize) -> bool {
        self.lanes
            .read()
            .get(lane)
            .is_none_or(|l| l.check().is_ok())
    }

    fn staging_lane(&self) -> Option<usize> {
        Some(self.lanes())
    }

    fn units_of(&self, lane: usize, slices: &[Slice]) -> u32 {
        if lane == self.lanes() {
            return self.control.units_of(0, slices);
        }
        // The last request of the lane's work, signalled, completes it all.
        u32::from(!slices.is_empty())
    }

    fn post(
        &self,
        lane: usize,
        work: Work,
        inline: bool,
        remote: &dyn Fn(u32, u16) -> Option<(u64, u32)>,
    ) {
        if lane == self.lanes() {
            self.control.post(0, work, inline, remote);
        } else {
            self.post_qp(lane, work, remote);
        }
    }

    fn progress(&self, lane: usize) {
        if lane == self.lanes() {
            self.control.progress(0);
        }
    }

    fn start_driving(&self, lane: usize) {
        if lane == self.lanes() {
            self.control.start_driving(0);
        }
    }

    fn stop_driving(&self, lane: usize, hand_back: bool) {
        if lane == self.lanes() {
            self.control.stop_driving(0, hand_back);
        }
    }

    fn outstanding(&self, lane: usize) -> usize {
        match self.lanes.read().get(lane) {
            Some(l) => l.in_use.load(Ordering::Acquire),
            None => self.control.outstanding(0),
        }
    }

    fn check_alive(&self) -> Result<()> {
        self.alive()
    }

    fn fetch_segments(&self, timeout: Duration) -> Result<Vec<u8>> {
        self.control.fetch_segments(timeout)
    }

    fn on_lost(&self, hook: crate::transport::LostHook) {
        self.control.on_lost(hook);
    }

    /// The QPs stop (flushed work completes with an error), then the control connections.
    fn close(&self) {
        self.close_rejoined();
        Self::fail_all(&self.current(), "connection closed locally");
        self.control.close();
    }

    /// The control connections' threads, then the QPs' flushes.
    fn join(&self, limit: Duration) {
        self.control.join(limit);
        self.join_rejoined(limit);
        self.drain(limit);
    }

    fn rdma(&self) -> Option<&RdmaLink> {
        Some(self)
    }
}

impl Drop for RdmaLink {
    fn drop(&mut self) {
        // The workers stop the lanes and free their slots once their requests are flushed.
        for l in self.current().iter() {
            self.transport.workers[l.rail].control(Cmd::Detach(l.clone()));
        }
    }
}
