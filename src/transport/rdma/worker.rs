//! One worker thread per rail. It alone posts work requests to the rail's QPs and polls the
//! rail's completion queues; it owns each lane's in-flight window ([`Outstanding`], indexed
//! by wr_id, no lock per completion) and the queue of work not yet posted. Callers hand it
//! work through a bounded channel and never wait for send-queue space: work waits in the
//! worker until its QP and the rail's CQ have room.
//!
//! It is also where errors are seen: every work request carries a wr_id, so an error
//! completion, signalled or not, fails the batch it belongs to with its own status; the
//! device's asynchronous events (QP fatal, CQ overrun, port down) fail the lanes they name;
//! and a port that leaves ACTIVE fails the rail's busy lanes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;

use super::RdmaTransport;
use super::failover::Cause;
use super::link::{Finish, Lane};
use super::outstanding::{Outstanding, signal_points, split_wr_id, wr_id};
use super::verbs::{AsyncEvent, Completion, EventScope, Rail, WC_WR_FLUSH_ERR, Wr, wc_status_name};
use crate::error::{Error, Result};
use crate::metrics::RailCounters;

/// Send-queue depth of each initiator QP.
pub(crate) const SQ_DEPTH: u32 = 1024;
/// Signal one work request in this many (and the last of every chain).
const SIGNAL_EVERY: usize = 64;
/// Longest chain posted with one doorbell.
const MAX_CHAIN: usize = 256;
/// Work handed to a rail worker and not yet taken by it (backpressure beyond this).
const QUEUE_BOUND: usize = 4096;
/// CQ entries kept free of the send-queue budget.
const CQ_SLACK: u64 = 64;
/// How often the worker reads its device's asynchronous events and, with work in flight,
/// its port's state.
const CHECK_EVERY: Duration = Duration::from_millis(25);

/// Stamps a chain about to be posted on lane slot `slot`: wr_ids from `out`'s next sequence
/// numbers, every [`SIGNAL_EVERY`]-th request and the last signalled, each signal point
/// recorded in `out` as finishing `owner`. Returns the chain's first sequence number.
pub(crate) fn stamp_chain<T: Clone>(
    out: &mut Outstanding<T>,
    slot: u32,
    chain: &mut [Wr],
    owner: &T,
) -> u64 {
    let first = out.reserve(chain.len() as u32);
    for (k, w) in chain.iter_mut().enumerate() {
        w.wr_id = wr_id(slot, first + k as u64);
        w.signaled = false;
    }
    for (k, _) in signal_points(chain.len(), SIGNAL_EVERY) {
        chain[k].signaled = true;
        out.mark(first + k as u64, owner.clone());
    }
    first
}

/// What callers ask of a rail worker.
pub(crate) enum Cmd {
    /// A new lane on this rail: give it a slot.
    Attach(Arc<Lane>),
    /// Post `wrs` on `lane`; `finish` completes the batch unit when all are done.
    Post {
        lane: Arc<Lane>,
        wrs: Vec<Wr>,
        finish: Arc<Finish>,
    },
    /// The lane's link is gone: stop it and free its slot once its requests are flushed.
    Detach(Arc<Lane>),
}

/// The caller's handle on one rail's worker.
pub(crate) struct RailWorker {
    posts: Sender<Cmd>,
    control: Sender<Cmd>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl RailWorker {
    /// Starts the worker of rail `index`. It waits for a message on `ready` before its first
    /// look at `transport` (which is being built while the workers start: until then it
    /// cannot be upgraded, which would read as "the engine is gone"), and exits if `ready`
    /// closes first.
    pub(crate) fn start(
        transport: Weak<RdmaTransport>,
        rail: Arc<Rail>,
        index: usize,
        stats: Arc<RailCounters>,
        stop: Arc<AtomicBool>,
        busy_poll: Duration,
        ready: Receiver<()>,
    ) -> Result<RailWorker> {
        let (posts, post_rx) = crossbeam_channel::bounded(QUEUE_BOUND);
        let (control, control_rx) = crossbeam_channel::unbounded();
        let budget = u64::from(rail.cq_depth).saturating_sub(CQ_SLACK).max(1);
        let state = Worker {
            transport,
            rail,
            index,
            stats,
            post_rx,
            control_rx,
            stop,
            busy_poll,
            slots: Vec::new(),
            free: Vec::new(),
            waiting: VecDeque::new(),
            rail_in_flight: 0,
            budget,
        };
        let thread = thread::Builder::new()
            .name(format!("kvt-rail{index}"))
            .spawn(move || {
                if ready.recv().is_ok() {
                    state.run();
                }
            })
            .map_err(|e| Error::io("spawn", e))?;
        Ok(RailWorker {
            posts,
            control,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands `cmd` (a post) to the worker, waiting for queue space until `deadline` at most.
    /// On failure the command comes back with the reason.
    pub(crate) fn post(
        &self,
        cmd: Cmd,
        deadline: Instant,
    ) -> std::result::Result<(), (Cmd, String)> {
        match self.posts.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(c)) => Err((c, "the rail worker has stopped".into())),
            Err(TrySendError::Full(c)) => {
                let wait = deadline.saturating_duration_since(Instant::now());
                self.posts.send_timeout(c, wait).map_err(|e| {
                    let stopped = e.is_disconnected();
                    let reason = if stopped {
                        "the rail worker has stopped".to_string()
                    } else {
                        format!("the rail worker's queue stayed full ({QUEUE_BOUND} posts) until the batch deadline")
                    };
                    (e.into_inner(), reason)
                })
            }
        }
    }

    /// Hands a control command (attach, detach) to the worker; never blocks.
    pub(crate) fn control(&self, cmd: Cmd) {
        // Only fails once the worker has exited; its lanes are then failed already.
        let _ = self.control.send(cmd);
    }

    /// Waits for the worker to exit (after its stop flag was set). Not from the worker itself.
    pub(crate) fn join(&self) {
        let Some(t) = self.thread.lock().take() else {
            return;
        };
        if t.thread().id() == thread::current().id() {
            return;
        }
        let _ = t.join();
    }
}

/// Work waiting for queue space, from `at` on.
struct Pending {
    wrs: Vec<Wr>,
    at: usize,
    finish: Arc<Finish>,
}

/// A lane as its worker keeps it.
struct Slot {
    lane: Arc<Lane>,
    out: Outstanding<Arc<Finish>>,
    pending: VecDeque<Pending>,
    detached: bool,
}

impl Slot {
    /// Fails every work still waiting to be posted with `reason`.
    fn abandon_pending(&mut self, reason: &str) {
        for p in self.pending.drain(..) {
            self.lane
                .in_use
                .fetch_sub(p.wrs.len() - p.at, Ordering::AcqRel);
            p.finish.fail(reason.to_string());
        }
    }
}

struct Worker {
    transport: Weak<RdmaTransport>,
    rail: Arc<Rail>,
    index: usize,
    /// The rail's counters (work requests, completions, errors).
    stats: Arc<RailCounters>,
    post_rx: Receiver<Cmd>,
    control_rx: Receiver<Cmd>,
    stop: Arc<AtomicBool>,
    busy_poll: Duration,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Slots with pending work, in arrival order.
    waiting: VecDeque<u32>,
    /// Requests posted on this rail's QPs and not yet complete.
    rail_in_flight: u64,
    /// Most requests in flight on the rail: what its send CQ holds if all were flushed.
    budget: u64,
}

impl Worker {
    fn run(mut self) {
        let mut sends = Vec::with_capacity(64);
        let mut recvs = Vec::with_capacity(64);
        let mut events = Vec::new();
        let mut idle_since = Instant::now();
        let mut sleep = Duration::from_micros(20);
        let mut checked = Instant::now();
        let mut arrived = None;
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let Some(t) = self.transport.upgrade() else {
                break;
            };
            self.take_control();
            let mut cmds = 0;
            while let Some(cmd) = arrived.take().or_else(|| self.post_rx.try_recv().ok()) {
                self.handle(cmd);
                cmds += 1;
                if cmds == 256 {
                    break;
                }
            }
            self.pump();
            if let Err(e) = super::verbs::poll_cq(&self.rail.send_cq, &mut sends) {
                tracing::error!(rail = self.index, "{e}");
            }
            if sends.iter().any(|c| c.status != 0) {
                // The first error may have been announced as an event: see it first.
                self.read_events(&mut events);
            }
            let n_sends = sends.len();
            for c in sends.drain(..) {
                self.on_send(&c);
            }
            if let Err(e) = super::verbs::poll_cq(&self.rail.recv_cq, &mut recvs) {
                tracing::error!(rail = self.index, "{e}");
            }
            let n_recvs = recvs.len();
            t.on_recvs(&recvs);
            recvs.clear();
            drop(t);
            if checked.elapsed() >= CHECK_EVERY {
                checked = Instant::now();
                self.read_events(&mut events);
                if self.rail_in_flight > 0 {
                    self.check_port();
                }
            }
            if n_sends + n_recvs + cmds > 0 {
                idle_since = Instant::now();
                sleep = Duration::from_micros(20);
            } else if idle_since.elapsed() < self.busy_poll {
                thread::yield_now();
            } else {
                // Idle: wait for work (a post wakes us at once), 1 ms at most, so that
                // completions of work already posted are polled soon.
                match self.post_rx.recv_timeout(sleep) {
                    Ok(cmd) => arrived = Some(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => thread::sleep(sleep),
                }
                sleep = (sleep * 2).min(Duration::from_millis(1));
            }
        }
        if let Some(cmd) = arrived {
            self.handle(cmd);
        }
        self.shut_down();
    }

    /// Attaches and detaches lanes (before posts, so a lane's attach precedes its work).
    fn take_control(&mut self) {
        while let Ok(cmd) = self.control_rx.try_recv() {
            self.handle(cmd);
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Attach(lane) => {
                let slot = Slot {
                    lane: lane.clone(),
                    out: Outstanding::default(),
                    pending: VecDeque::new(),
                    detached: false,
                };
                let i = match self.free.pop() {
                    Some(i) => {
                        self.slots[i as usize] = Some(slot);
                        i
                    }
                    None => {
                        self.slots.push(Some(slot));
                        (self.slots.len() - 1) as u32
                    }
                };
                lane.slot.store(i, Ordering::Release);
            }
            Cmd::Post { lane, wrs, finish } => {
                let mut i = lane.slot.load(Ordering::Acquire);
                if self.slots.get(i as usize).is_none_or(Option::is_none) {
                    // The lane's attach was sent before this post, but may have arrived on
                    // the control channel after this round took from it.
                    self.take_control();
                    i = lane.slot.load(Ordering::Acquire);
                }
                let Some(s) = self.slots.get_mut(i as usize).and_then(Option::as_mut) else {
                    let n = wrs.len();
                    finish.fail("rdma lane is not attached to its rail worker".into());
                    lane.in_use.fetch_sub(n, Ordering::AcqRel);
                    return;
                };
                if s.pending.is_empty() {
                    self.waiting.push_back(i);
                }
                s.pending.push_back(Pending { wrs, at: 0, finish });
            }
            Cmd::Detach(lane) => {
                lane.fail("connection closed locally".into());
                let i = lane.slot.load(Ordering::Acquire);
                if let Some(s) = self.slots.get_mut(i as usize).and_then(Option::as_mut) {
                    s.detached = true;
                }
                self.release_if_done(i);
            }
        }
    }

    /// Frees a detached lane's slot once nothing of it is in flight or waiting.
    fn release_if_done(&mut self, i: u32) {
        let done = self
            .slots
            .get(i as usize)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.detached && s.out.in_flight() == 0 && s.pending.is_empty());
        if done {
            self.slots[i as usize] = None;
            self.free.push(i);
        }
    }

    /// Posts waiting work where the QP's send queue and the rail's CQ have room.
    fn pump(&mut self) {
        let mut rounds = self.waiting.len();
        while rounds > 0 {
            rounds -= 1;
            let Some(i) = self.waiting.pop_front() else {
                break;
            };
            let Some(s) = self.slots.get_mut(i as usize).and_then(Option::as_mut) else {
                continue;
            };
            if let Err(reason) = s.lane.check() {
                s.abandon_pending(&reason);
                self.release_if_done(i);
                continue;
            }
            while let Some(p) = s.pending.front_mut() {
                let room_qp = u64::from(SQ_DEPTH) - s.out.in_flight();
                let room_rail = self.budget.saturating_sub(self.rail_in_flight);
                let n = (p.wrs.len() - p.at)
                    .min(MAX_CHAIN)
                    .min(room_qp as usize)
                    .min(room_rail as usize);
                if n == 0 {
                    break;
                }
                let chain = &mut p.wrs[p.at..p.at + n];
                let first = stamp_chain(&mut s.out, i, chain, &p.finish);
                if let Err(e) = s.lane.qp.post_chain(chain) {
                    // Nothing of the chain was queued: take it back, stop the lane.
                    s.out.unreserve(first, n as u32);
                    s.lane.fail(format!("{e} on rail {}", self.index));
                    // (A local failure: the work is not moved.)
                    break;
                }
                self.rail_in_flight += n as u64;
                self.stats.work_requests.inc_by(n as u64);
                p.at += n;
                if p.at == p.wrs.len() {
                    s.pending.pop_front();
                }
            }
            if !s.pending.is_empty() {
                // Out of room (or the lane just failed: the next round abandons its work).
                self.waiting.push_back(i);
            }
        }
    }

    /// One send completion: frees the requests it covers and finishes their batches; an
    /// error fails the lane and the batch of the failed request with its own status.
    fn on_send(&mut self, c: &Completion) {
        let Some((i, low)) = split_wr_id(c.wr_id) else {
            tracing::warn!(
                rail = self.index,
                wr_id = c.wr_id,
                status = wc_status_name(c.status),
                "completion without a work request id of ours"
            );
            return;
        };
        let Some(s) = self.slots.get_mut(i as usize).and_then(Option::as_mut) else {
            return;
        };
        let Some(seq) = s.out.resolve(low) else {
            return;
        };
        let mut freed = 0;
        if c.status != 0 {
            self.stats.error(wc_status_name(c.status));
            // Everything before the failed request completed (RC completes in order).
            if seq > 0 {
                let (n, owners) = s.out.complete_through(seq - 1);
                freed += n;
                drop(owners);
            }
            let own = format!(
                "{} (vendor error {:#x}) on rail {} ({}:{}) QP {}",
                wc_status_name(c.status),
                c.vendor_err,
                self.rail.info.index,
                self.rail.device,
                self.rail.info.port,
                s.lane.qp.qpn
            );
            let reason = if c.status == WC_WR_FLUSH_ERR {
                // Flushed: the QP was already in error; the batch fails with that first
                // reason, which names the real status (or why we stopped the QP).
                s.lane.fail_as(
                    Cause::Path,
                    format!("{own}: the QP entered the error state with no error reported before"),
                );
                s.lane.check().err().unwrap_or(own)
            } else {
                s.lane.fail_as(Cause::of_status(c.status), own.clone());
                own
            };
            if let Some(f) = s.out.owner_of(seq) {
                f.set_error(reason);
            }
        }
        let (n, owners) = s.out.complete_through(seq);
        freed += n;
        drop(owners);
        s.lane.in_use.fetch_sub(freed as usize, Ordering::AcqRel);
        self.rail_in_flight -= freed;
        self.stats.completions.inc_by(freed);
        self.release_if_done(i);
    }

    /// Reads the device's asynchronous events and fails what they name.
    fn read_events(&mut self, events: &mut Vec<AsyncEvent>) {
        self.rail.async_events(events);
        for ev in events.drain(..) {
            let where_ = format!(
                "rail {} ({}:{})",
                self.rail.info.index, self.rail.device, self.rail.info.port
            );
            match ev.scope() {
                EventScope::None => {
                    tracing::debug!(event = ev.name(), qpn = ?ev.qpn, "{where_}: asynchronous event");
                }
                EventScope::Qp => {
                    let qpn = ev.qpn.unwrap_or(0);
                    let reason = format!("{} on {where_} QP {qpn}", ev.name());
                    tracing::warn!("{reason}");
                    for s in self.slots.iter().flatten() {
                        if s.lane.qp.qpn == qpn {
                            s.lane.fail_as(Cause::Path, reason.clone());
                        }
                    }
                }
                EventScope::Rail => {
                    let reason = format!("{} on {where_}", ev.name());
                    tracing::warn!("{reason}");
                    for s in self.slots.iter().flatten() {
                        s.lane.fail_as(Cause::Path, reason.clone());
                    }
                }
            }
        }
    }

    /// Fails every busy lane when the port left ACTIVE. A link that goes down does not always
    /// end the posted work requests (Soft-RoCE, for one, may keep them until the batch
    /// deadline); moving the QPs to ERROR flushes them now, so batches fail fast and release
    /// their memory.
    fn check_port(&self) {
        let Some(state) = super::port_down(&self.rail) else {
            return;
        };
        let reason = format!(
            "rail {} ({}:{}) port is {state} (link down)",
            self.rail.info.index, self.rail.device, self.rail.info.port
        );
        for s in self.slots.iter().flatten() {
            if s.out.in_flight() > 0 || !s.pending.is_empty() {
                s.lane.fail_as(Cause::Path, reason.clone());
            }
        }
    }

    /// The engine is closing: every lane stops, waiting work fails, and batches whose
    /// requests never completed fail (their QPs are in ERROR, so the NIC touches nothing).
    fn shut_down(&mut self) {
        self.take_control();
        while let Ok(cmd) = self.post_rx.try_recv() {
            self.handle(cmd);
        }
        for s in self.slots.iter_mut().flatten() {
            s.lane.fail("engine closed".into());
            let reason = s.lane.check().err().unwrap_or_default();
            s.abandon_pending(&reason);
            let (n, owners) = s.out.clear();
            for f in owners {
                f.set_error(reason.clone());
            }
            s.lane.in_use.fetch_sub(n as usize, Ordering::AcqRel);
        }
        self.slots.clear();
    }
}
