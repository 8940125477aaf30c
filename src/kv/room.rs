//! Rooms: [`KvSender`] (prefill) and [`KvReceiver`] (decode), thin handles on the manager's
//! endpoint. No call here waits for the network: creating a receiver only asks the driver to
//! connect, and `poll` reads an atomic. Only `abort` (and dropping an unfinished room) waits,
//! for its guarantee, at most the abort timeout plus a bounded grace.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::driver::Cell;
use super::failure::Failure;
use super::manager::{KvRole, Shared};
use super::pages::{Run, check_pages, expand, expand_aux, runs};
use super::{KvManager, KvPoll, RoomMetrics, chunk_tag};
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::request::{BatchId, BatchStatus, Request};

fn span(from: Option<Instant>, to: Option<Instant>) -> Option<Duration> {
    Some(to?.saturating_duration_since(from?))
}

/// Longest a room's own wait (abort) goes past the abort timeout before it gives up.
const GRACE: Duration = Duration::from_secs(5);

/// A sender's own bookkeeping, shared with the poster thread that posts its chunks.
#[derive(Default)]
pub(crate) struct SendLocal {
    /// Chunk batches not yet accounted in the endpoint.
    open: Vec<(BatchId, Arc<Batch>)>,
    /// The last (source, destination) page pair written.
    last_pair: Option<(i32, i32)>,
    runs: Vec<Run>,
    bytes: u64,
    slices: u64,
    first_send: Option<Instant>,
    first_post: Option<Instant>,
    last_done: Option<Instant>,
    peer: Option<crate::engine::PeerId>,
}

/// The prefill side of one room: sends pages of one request to the decode side's pages.
///
/// Created with the room id the decode side's [`KvReceiver`] uses; pairs with it when the
/// receiver's destination arrives (`Bootstrapping` → `WaitingForInput`). Dropping a sender
/// that has not finished aborts it first.
pub struct KvSender {
    shared: Arc<Shared>,
    room: u64,
    cell: Arc<Cell>,
    local: Arc<Mutex<SendLocal>>,
}

impl std::fmt::Debug for KvSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSender")
            .field("room", &self.room)
            .field("state", &self.cell.state())
            .finish()
    }
}

fn failure_of(shared: &Shared, room: u64) -> Option<Failure> {
    shared.driver.core.lock().ep.failure(room).cloned()
}

impl KvSender {
    /// A sending room `room` in the prefill manager `mgr`; `DuplicateRoom` if one is live.
    /// Never waits: a destination that arrived already pairs at once.
    pub fn new(mgr: &KvManager, room: u64) -> Result<KvSender> {
        let shared = mgr.shared().clone();
        if shared.cfg.role != KvRole::Prefill {
            return Err(Error::InvalidArgument(
                "a KvSender needs a prefill manager".into(),
            ));
        }
        let cell = {
            let mut core = shared.driver.core.lock();
            core.ep.prefill().create(room, Instant::now())?;
            let cell = core.add_cell(room);
            shared.driver.after(core);
            cell
        };
        Ok(KvSender {
            shared,
            room,
            cell,
            local: Arc::new(Mutex::new(SendLocal::default())),
        })
    }

    /// The room id.
    pub fn room(&self) -> u64 {
        self.room
    }

    /// The room will carry `num_pages` pages (the receiver must name as many) and, if
    /// `aux_index` is set, aux slot `aux_index` of every aux buffer.
    pub fn init(&self, num_pages: usize, aux_index: Option<u32>) -> Result<()> {
        let mut core = self.shared.driver.core.lock();
        let r = core
            .ep
            .prefill()
            .init(self.room, num_pages as u64, aux_index, Instant::now());
        self.shared.driver.after(core);
        r
    }

    /// Sends `src_pages` (local page indices) to the next `src_pages.len()` destination pages
    /// of the room; `is_last` ends the room (aux goes with it). Nothing is written when the
    /// pages or counts are wrong. Never waits: the chunk's writes are planned here and posted
    /// by the manager's poster thread (which alone waits when a peer's queues are full), so a
    /// failure to post shows in `poll` and `failure`.
    pub fn send(&self, src_pages: &[i32], is_last: bool) -> Result<()> {
        let id = self.room;
        let start = Instant::now();
        check_pages(src_pages, self.shared.layout.pages(), "source")
            .map_err(|reason| Error::InvalidPages { room: id, reason })?;
        let mut local = self.local.lock();
        let (plan, dest) = {
            let mut core = self.shared.driver.core.lock();
            let plan = core.ep.prefill().send(id, src_pages.len() as u64, is_last);
            let plan = match plan {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            };
            let dest = core.data.get(&plan.conn).cloned();
            core.publish();
            (plan, dest)
        };
        local.first_send.get_or_insert(start);
        let reqs = match dest {
            Some(dest) => self.expand(&mut local, &plan, &dest, src_pages),
            None => Err(Error::RoomFailed {
                room: id,
                reason: "the receiver's data path is gone".into(),
            }),
        };
        match reqs {
            Ok((peer, reqs)) => {
                drop(local);
                let job = PostJob {
                    room: id,
                    local: self.local.clone(),
                    peer,
                    reqs,
                    tag: chunk_tag(plan.slot, plan.seq, plan.last),
                    seq: plan.seq,
                    // The receiver asked for digests: the chunk's source (its pages, then the
                    // aux slot with the last chunk), hashed by the poster before it posts.
                    digest: plan.digest.then(|| ChunkSource {
                        ranges: self
                            .shared
                            .layout
                            .digest_ranges(src_pages, plan.aux.map(|(mine, _)| mine)),
                        first: plan.first,
                        count: src_pages.len() as u64,
                    }),
                };
                if let Err(job) = self.shared.poster.submit(job) {
                    // The manager is gone: nothing will post it.
                    post_job(&self.shared, job);
                }
                Ok(())
            }
            Err(e) => {
                let mut core = self.shared.driver.core.lock();
                let text = format!("chunk {} not sent: {e}", plan.seq);
                core.ep.prefill().posted(id, Err(text), Instant::now());
                self.shared.driver.after(core);
                Err(e)
            }
        }
    }

    /// Expands one planned chunk into writes: (the peer, its requests).
    fn expand(
        &self,
        local: &mut SendLocal,
        plan: &super::endpoint::ChunkPlan,
        dest: &super::manager::DecodePeer,
        src_pages: &[i32],
    ) -> Result<(crate::engine::PeerId, Vec<Request>)> {
        // An empty last chunk re-writes the last page (same bytes) so aux and the final
        // notification still follow data on the wire.
        let resend;
        let (src, dst): (&[i32], &[i32]) = match (src_pages.is_empty(), local.last_pair) {
            (true, Some((s, d))) => {
                resend = [[s], [d]];
                (&resend[0][..], &resend[1][..])
            }
            _ => (src_pages, &plan.dst),
        };
        let mut reqs: Vec<Request> = Vec::new();
        local.runs.clear();
        runs(src, dst, &mut local.runs);
        expand(&local.runs, &self.shared.layout, &dest.buffers, &mut reqs);
        if let Some((a, b)) = plan.aux {
            expand_aux(&self.shared.layout.aux, a, &dest.aux, b, &mut reqs);
        }
        if let (Some(&s), Some(&d)) = (src.last(), dst.last()) {
            local.last_pair = Some((s, d));
        }
        if reqs.is_empty() {
            return Err(Error::InvalidArgument("nothing to write".into()));
        }
        local.peer = Some(dest.peer);
        Ok((dest.peer, reqs))
    }

    /// The room's state; never blocks (an atomic read, plus a look at its batches while it
    /// is transferring).
    pub fn poll(&self) -> KvPoll {
        let s = self.cell.state();
        if s != KvPoll::Transferring {
            return s;
        }
        let Some(mut local) = self.local.try_lock() else {
            return s; // a send is posting: it will look
        };
        let now = Instant::now();
        let mut settled = Vec::new();
        let mut i = 0;
        while i < local.open.len() {
            let b = local.open[i].1.clone();
            let result = match b.status() {
                BatchStatus::Pending => {
                    b.check_deadline(now);
                    i += 1;
                    continue;
                }
                BatchStatus::Done => Ok(()),
                BatchStatus::Failed(reason) => Err(reason),
            };
            let (id, _) = local.open.swap_remove(i);
            self.shared.engine.release(id);
            if result.is_ok() {
                local.last_done = local.last_done.max(b.settled_at());
            }
            settled.push(result);
        }
        if !settled.is_empty() {
            let mut core = self.shared.driver.core.lock();
            for r in settled {
                core.ep.prefill().chunk_settled(self.room, r, now);
            }
            self.shared.driver.after(core);
        }
        self.cell.state()
    }

    /// Why the room failed (its text).
    pub fn failure_reason(&self) -> Option<String> {
        self.failure().map(|f| f.text)
    }

    /// Why the room failed: kind, the state it failed in, and text.
    pub fn failure(&self) -> Option<Failure> {
        failure_of(&self.shared, self.room)
    }

    /// Fails the room (unless it already succeeded) and returns once none of its writes can
    /// land at the receiver any more: every write in flight has completed or been flushed. If
    /// that takes longer than the abort timeout, the connection to the receiver is closed.
    pub fn abort(&self) -> Result<()> {
        {
            let mut core = self.shared.driver.core.lock();
            core.ep.prefill().abort(self.room, Instant::now());
            self.shared.driver.after(core);
        }
        if self.cell.state() == KvPoll::Success {
            return Ok(());
        }
        if !self.settle(self.shared.cfg.abort_timeout) {
            let peer = self.local.lock().peer;
            if let Some(p) = peer {
                tracing::warn!(
                    room = self.room,
                    "abort: writes still in flight; closing the peer"
                );
                let _ = self.shared.engine.disconnect(p);
            }
            if !self.settle(GRACE) {
                return Err(Error::Timeout {
                    what: format!("abort of room {}", self.room),
                    after_ms: (self.shared.cfg.abort_timeout + GRACE).as_millis() as u64,
                });
            }
        }
        Ok(())
    }

    /// Waits up to `limit` until none of the room's chunks waits for the poster and none of
    /// its writes is in flight; true if none is.
    fn settle(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            let settled = {
                let mut core = self.shared.driver.core.lock();
                let in_flight = |b: &Arc<Batch>| b.remaining() > 0;
                let batches = core.batches.get(&self.room);
                let posted_all = batches.is_none_or(|b| !b.iter().any(in_flight));
                posted_all && core.ep.prefill().posting(self.room) == 0
            };
            if settled {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// What the room moved so far.
    pub fn metrics(&self) -> RoomMetrics {
        let l = self.local.lock();
        let done = (self.cell.state() == KvPoll::Success)
            .then_some(l.last_done)
            .flatten();
        RoomMetrics {
            bytes: l.bytes,
            slices: l.slices,
            queued_to_first_write: span(l.first_send, l.first_post),
            transfer_span: span(l.first_post, done),
        }
    }
}

impl Drop for KvSender {
    fn drop(&mut self) {
        if !self.poll().is_final()
            && let Err(e) = self.abort()
        {
            tracing::warn!(room = self.room, "{e}");
        }
        let open: Vec<BatchId> = self.local.lock().open.drain(..).map(|(id, _)| id).collect();
        for id in open {
            self.shared.engine.release(id);
        }
        let mut core = self.shared.driver.core.lock();
        core.ep.prefill().remove(self.room, Instant::now());
        core.forget(self.room);
        self.shared.driver.after(core);
    }
}

/// The decode side of one room: names the destination pages, then watches them fill.
///
/// Dropping a receiver that has not succeeded aborts it first, so its pages can be reused.
pub struct KvReceiver {
    shared: Arc<Shared>,
    room: u64,
    cell: Arc<Cell>,
    /// `init` time and bytes expected.
    init: Mutex<(Option<Instant>, u64)>,
}

impl std::fmt::Debug for KvReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReceiver")
            .field("room", &self.room)
            .field("state", &self.cell.state())
            .finish()
    }
}

impl KvReceiver {
    /// A receiving room `room` in the decode manager `mgr`, served by the prefill manager at
    /// `bootstrap_addr` (an `ip:port`; a host name is resolved here). `DuplicateRoom` if one
    /// is live here. Returns at once: the control channel opens in the background, and a
    /// prefill side that cannot be reached fails the room (see `poll` and `failure`).
    pub fn new(
        mgr: &KvManager,
        bootstrap_addr: impl ToSocketAddrs,
        room: u64,
    ) -> Result<KvReceiver> {
        let shared = mgr.shared().clone();
        if shared.cfg.role != KvRole::Decode {
            return Err(Error::InvalidArgument(
                "a KvReceiver needs a decode manager".into(),
            ));
        }
        let addr: SocketAddr = bootstrap_addr
            .to_socket_addrs()
            .map_err(|e| Error::io("resolve bootstrap address", e))?
            .next()
            .ok_or_else(|| {
                Error::InvalidArgument("bootstrap address resolves to nothing".into())
            })?;
        let cell = {
            let mut core = shared.driver.core.lock();
            core.ep.decode().create(room, addr, Instant::now())?;
            let cell = core.add_cell(room);
            shared.driver.after(core);
            cell
        };
        Ok(KvReceiver {
            shared,
            room,
            cell,
            init: Mutex::new((None, 0)),
        })
    }

    /// The room id.
    pub fn room(&self) -> u64 {
        self.room
    }

    /// Names the destination: the room's pages land in `dst_pages` (local page indices, in
    /// room order), and aux in slot `aux_index` of every aux buffer. Nothing is sent when the
    /// pages are wrong. Never waits: the destination goes out once the channel is open.
    pub fn init(&self, dst_pages: &[i32], aux_index: Option<u32>) -> Result<()> {
        let layout = &self.shared.layout;
        let mut core = self.shared.driver.core.lock();
        let slot =
            core.ep
                .decode()
                .init(self.room, dst_pages.to_vec(), aux_index, Instant::now())?;
        self.shared.engine.fences().clear_slot(slot);
        self.shared.engine.forget_notify_slot(slot);
        let bytes = dst_pages.len() as u64 * layout.page_bytes()
            + aux_index.map_or(0, |_| layout.aux_bytes());
        self.cell.bytes.store(bytes, Ordering::Relaxed);
        *self.init.lock() = (Some(Instant::now()), bytes);
        self.shared.driver.after(core);
        Ok(())
    }

    /// The room's state; never blocks (an atomic read).
    pub fn poll(&self) -> KvPoll {
        self.cell.state()
    }

    /// Why the room failed (its text).
    pub fn failure_reason(&self) -> Option<String> {
        self.failure().map(|f| f.text)
    }

    /// Why the room failed: kind, the state it failed in, and text.
    pub fn failure(&self) -> Option<Failure> {
        failure_of(&self.shared, self.room)
    }

    /// Fails the room (unless it already succeeded) and returns once no write of the room can
    /// land in this engine's memory any more. TCP writes are fenced here; over RDMA the sender
    /// confirms that its writes have completed, and a sender that does not answer within the
    /// abort timeout has its QPs into this engine stopped. Waits at most the abort timeout
    /// plus a few seconds' grace.
    pub fn abort(&self) -> Result<()> {
        let fence = {
            let mut core = self.shared.driver.core.lock();
            let f = core.ep.decode().abort(self.room, Instant::now());
            self.shared.driver.after(core);
            f
        };
        let limit = self.shared.cfg.abort_timeout;
        if let Some((slot, peer)) = fence
            && !self
                .shared
                .engine
                .fences()
                .fence((peer.0, peer.1, slot), limit)
        {
            tracing::warn!(
                room = self.room,
                "abort: a TCP write did not finish in time"
            );
        }
        let until = Instant::now() + limit + GRACE;
        if !self.shared.driver.wait_quiet(&self.cell, until) {
            return Err(Error::Timeout {
                what: format!("abort of room {}", self.room),
                after_ms: (limit + GRACE).as_millis() as u64,
            });
        }
        Ok(())
    }

    /// What the room received so far (`slices` counts notified chunks here).
    pub fn metrics(&self) -> RoomMetrics {
        let (init, bytes) = *self.init.lock();
        RoomMetrics {
            bytes,
            slices: self.cell.chunks.load(Ordering::Relaxed),
            queued_to_first_write: span(init, self.cell.first.get().copied()),
            transfer_span: span(
                self.cell.first.get().copied(),
                self.cell.done.get().copied(),
            ),
        }
    }
}

impl Drop for KvReceiver {
    fn drop(&mut self) {
        if self.poll() != KvPoll::Success
            && let Err(e) = self.abort()
        {
            tracing::warn!(room = self.room, "{e}");
        }
        let mut core = self.shared.driver.core.lock();
        core.ep.decode().remove(self.room);
        core.forget(self.room);
    }
}

/// A planned chunk for the poster thread.
pub(crate) struct PostJob {
    room: u64,
    local: Arc<Mutex<SendLocal>>,
    peer: crate::engine::PeerId,
    reqs: Vec<Request>,
    tag: u32,
    seq: u32,
    digest: Option<ChunkSource>,
}

/// What a chunk digest covers: the source memory in hashing order, and the chunk's pages in
/// room order.
pub(crate) struct ChunkSource {
    ranges: Vec<(u64, u64)>,
    first: u64,
    count: u64,
}

/// Posts one chunk (on the poster thread) and tells the endpoint; a room that failed or went
/// away meanwhile posts nothing.
pub(crate) fn post_job(m: &Shared, job: PostJob) {
    let live = {
        let core = m.driver.core.lock();
        core.ep.state(job.room).is_some_and(|s| !s.is_final())
    };
    let engine = &m.engine;
    // The digest of the bytes as they are posted (the source must not change until the room
    // ends, as for any write).
    let digest = match (&job.digest, live) {
        (Some(src), true) => engine.digest_local(&src.ranges).map(|d| Some((src, d))),
        _ => Ok(None),
    };
    let posted = if let Err(e) = &digest {
        Err(Error::InvalidArgument(format!(
            "the chunk cannot be hashed: {e}"
        )))
    } else if live {
        engine
            .submit_notify(job.peer, &job.reqs, m.cfg.room_timeout, job.tag)
            .and_then(|id| Ok((id, engine.batch_handle(id)?)))
    } else {
        Err(Error::RoomFailed {
            room: job.room,
            reason: "the room ended before its chunk was posted".into(),
        })
    };
    let mut local = job.local.lock();
    let mut core = m.driver.core.lock();
    let now = Instant::now();
    match posted {
        Ok((id, b)) => {
            local.first_post.get_or_insert(now);
            let bytes = job.reqs.iter().map(|r| r.len).sum::<u64>();
            local.bytes += bytes;
            if let Some(c) = core.cell(job.room) {
                c.first_post.get_or_init(|| now);
                c.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            local.slices += job.reqs.len() as u64;
            local.open.push((id, b.clone()));
            core.batches.entry(job.room).or_default().push(b);
            if let Ok(Some((src, d))) = digest {
                let p = core.ep.prefill();
                p.digest(job.room, job.seq, src.first, src.count, d, now);
            }
            core.ep.prefill().posted(job.room, Ok(()), now);
        }
        Err(e) => {
            let text = format!("chunk {} not sent: {e}", job.seq);
            core.ep.prefill().posted(job.room, Err(text), now);
        }
    }
    drop(local);
    m.driver.after(core);
}
