//! Initiator side of an RDMA peer: one RC QP per lane, work-request chains posted under
//! send-queue credits with selective signalling, completion back to batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::RdmaTransport;
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
    batch: Arc<Batch>,
    guards: Option<Arc<[SegmentGuard]>>,
    error: Mutex<Option<String>>,
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
        drop(self.guards.take());
        let result = match self.error.lock().take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.batch.complete_unit(result);
    }
}

/// One lane: an RC QP from a local rail to a remote rail, served by that rail's worker.
pub(crate) struct Lane {
    pub(crate) qp: Qp,
    rail: usize,
    remote_rail: u16,
    /// The lane's slot in its rail worker (set by the worker when it attaches the lane).
    pub(crate) slot: AtomicU32,
    /// Work requests handed to the worker and not yet completed, flushed or abandoned.
    pub(crate) in_use: AtomicUsize,
    dead: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Lane {
    /// Stops the lane (QP to ERROR) with `reason`, unless it already stopped: the first
    /// reason is kept, and every later failure of its work reports it.
    pub(crate) fn fail(&self, reason: String) {
        if !self.dead.swap(true, Ordering::AcqRel) {
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

/// An RDMA peer as the initiator sees it.
pub(crate) struct RdmaLink {
    /// The control connection (a one-lane link of another transport, given by the engine):
    /// segment refreshes, liveness, and the staging lane.
    pub(crate) control: Box<dyn PeerLink>,
    pub(crate) lanes: Vec<Arc<Lane>>,
    transport: Arc<RdmaTransport>,
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
        let mut qps = Vec::new();
        for _ in 0..per_rail {
            for r in &t.rails {
                qps.push(r.create_qp(SQ_DEPTH, 1, 1)?);
            }
        }
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
            }));
        }
        for l in &lanes {
            t.workers[l.rail].control(Cmd::Attach(l.clone()));
        }
        // The control connection's loss means the peer's: every lane fails at once.
        let doomed = lanes.clone();
        control.on_lost(Arc::new(move |reason: &str| {
            RdmaLink::fail_all(&doomed, reason)
        }));
        Ok(RdmaLink {
            control,
            lanes,
            transport: t.clone(),
        })
    }

    /// Everything outstanding fails and the QPs stop (peer lost or closed).
    pub(crate) fn fail_all(lanes: &[Arc<Lane>], reason: &str) {
        for l in lanes {
            l.fail(reason.to_string());
        }
    }

    /// `Err(PeerLost)` once the control connection or any lane died.
    fn alive(&self) -> Result<()> {
        self.control.check_alive()?;
        for l in &self.lanes {
            if let Err(reason) = l.check() {
                return Err(Error::PeerLost {
                    peer: "rdma peer".into(),
                    epoch: 0,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Posts `work` on QP lane `lane`. `remote(segment, rail)` gives the peer's base address
    /// and rkey.
    fn post_qp(&self, lane: usize, work: Work, remote: &dyn Fn(u32, u16) -> Option<(u64, u32)>) {
        let l = &self.lanes[lane];
        if let Err(reason) = l.check() {
            return work.abandon(&reason);
        }
        if work.batch.is_failed() {
            return work.abandon("batch failed before it was sent");
        }
        let keys = |seg: u32| self.transport.lkey(seg, l.rail);
        let wrs = work_requests(
            &work.slices,
            |s| work.guard_for(s.local_addr, s.len).segment().info.id.0,
            keys,
            |seg| remote(seg, l.remote_rail),
            work.notify,
        );
        let wrs = match wrs {
            Ok(w) => w,
            Err(seg) => {
                return work.abandon(&format!(
                    "no memory key for local segment {seg} on rail {} or remote segment on peer rail {}",
                    l.rail, l.remote_rail
                ));
            }
        };
        let finish = Arc::new(Finish {
            batch: work.batch.clone(),
            guards: Some(work.guards.clone()),
            error: Mutex::new(None),
        });
        let deadline = work.batch.deadline;
        drop(work);
        let n = wrs.len();
        l.in_use.fetch_add(n, Ordering::AcqRel);
        let cmd = Cmd::Post {
            lane: l.clone(),
            wrs,
            finish,
        };
        if let Err((cmd, reason)) = self.transport.workers[l.rail].post(cmd, deadline) {
            l.in_use.fetch_sub(n, Ordering::AcqRel);
            if let Cmd::Post { finish, .. } = cmd {
                finish.fail(reason);
            }
        }
    }

    /// After `close`: waits until every work request posted on the lanes has completed or
    /// been flushed (the QPs are in ERROR, so the rail workers collect the flushes quickly),
    /// so no READ lands in local memory afterwards. Gives up after `limit` with a warning
    /// naming the lanes still busy.
    fn drain(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self
            .lanes
            .iter()
            .any(|l| l.in_use.load(Ordering::Acquire) > 0)
        {
            if std::time::Instant::now() >= deadline {
                let busy: Vec<u32> = self
                    .lanes
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
        self.lanes.len()
    }

    fn lane_rails(&self) -> Option<Vec<(usize, u16)>> {
        Some(self.lanes.iter().map(|l| (l.rail, l.remote_rail)).collect())
    }

    fn staging_lane(&self) -> Option<usize> {
        Some(self.lanes.len())
    }

    fn units_of(&self, lane: usize, slices: &[Slice]) -> u32 {
        if lane == self.lanes.len() {
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
        if lane == self.lanes.len() {
            self.control.post(0, work, inline, remote);
        } else {
            self.post_qp(lane, work, remote);
        }
    }

    fn progress(&self, lane: usize) {
        if lane == self.lanes.len() {
            self.control.progress(0);
        }
    }

    fn start_driving(&self, lane: usize) {
        if lane == self.lanes.len() {
            self.control.start_driving(0);
        }
    }

    fn stop_driving(&self, lane: usize, hand_back: bool) {
        if lane == self.lanes.len() {
            self.control.stop_driving(0, hand_back);
        }
    }

    fn outstanding(&self, lane: usize) -> usize {
        match self.lanes.get(lane) {
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

    /// The QPs stop (flushed work completes with an error), then the control connection.
    fn close(&self) {
        Self::fail_all(&self.lanes, "connection closed locally");
        self.control.close();
    }

    /// The control connection's threads, then the QPs' flushes.
    fn join(&self, limit: Duration) {
        self.control.join(limit);
        self.drain(limit);
    }
}

impl Drop for RdmaLink {
    fn drop(&mut self) {
        // The workers stop the lanes and free their slots once their requests are flushed.
        for l in &self.lanes {
            self.transport.workers[l.rail].control(Cmd::Detach(l.clone()));
        }
    }
}
