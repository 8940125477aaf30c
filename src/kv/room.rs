//! Rooms: [`KvSender`] (prefill) and [`KvReceiver`] (decode), and the shared state the
//! manager's channel threads update.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::channel::Channel;
use super::manager::{DecodePeer, Inbound, KvRole, Shared};
use super::pages::{Run, check_distinct, check_pages, expand, expand_aux, runs};
use super::proto::KvMessage;
use super::session::{ReceiverSession, Refusal, SenderSession};
use super::{KvManager, KvPoll, RoomMetrics, chunk_tag};
use crate::batch::Batch;
use crate::engine::TransferEngine;
use crate::error::{Error, Result};
use crate::request::{BatchId, BatchStatus, Request};

fn refused(room: u64, r: Refusal) -> Error {
    match r {
        Refusal::State(state, op) => Error::RoomState {
            room,
            state: state.as_str(),
            op,
        },
        Refusal::Pages(reason) => Error::InvalidPages { room, reason },
    }
}

fn load(state: &AtomicI32) -> KvPoll {
    KvPoll::from_i32(state.load(Ordering::Acquire)).unwrap_or(KvPoll::Failed)
}

fn span(from: Option<Instant>, to: Option<Instant>) -> Option<Duration> {
    Some(to?.saturating_duration_since(from?))
}

/// The destination of a sending room.
struct Dest {
    from: Arc<Inbound>,
    target: Arc<DecodePeer>,
    slot: u32,
    aux_index: Option<u32>,
    pages: Vec<i32>,
}

#[derive(Default)]
struct SendMetrics {
    bytes: u64,
    slices: u64,
    first_send: Option<Instant>,
    first_post: Option<Instant>,
    last_done: Option<Instant>,
}

struct SendInner {
    session: SenderSession,
    dest: Option<Dest>,
    /// Chunks not yet accounted in the session.
    open: Vec<(BatchId, Arc<Batch>)>,
    /// Every chunk batch, for waiting until nothing is in flight.
    all: Vec<Arc<Batch>>,
    /// The last (source, destination) page pair written.
    last_pair: Option<(i32, i32)>,
    told_peer: bool,
    metrics: SendMetrics,
    runs: Vec<Run>,
}

/// A sending room as the manager and its channel threads see it.
pub(crate) struct SendRoom {
    id: u64,
    state: AtomicI32,
    deadline: Instant,
    timeout: Duration,
    inner: Mutex<SendInner>,
}

impl SendRoom {
    fn publish(&self, g: &SendInner) {
        self.state
            .store(g.session.state() as i32, Ordering::Release);
    }

    /// The channel to tell about a failure, once.
    fn take_notice(&self, g: &mut SendInner) -> Option<(Arc<Channel>, String)> {
        if g.session.state() != KvPoll::Failed || g.told_peer {
            return None;
        }
        let d = g.dest.as_ref()?;
        g.told_peer = true;
        Some((
            d.from.channel.clone(),
            g.session.reason().unwrap_or_default().to_string(),
        ))
    }

    fn notice(&self, n: Option<(Arc<Channel>, String)>) {
        if let Some((channel, reason)) = n {
            let _ = channel.send(&KvMessage::RoomAbort {
                room: self.id,
                kind: 4,
                reason,
            });
        }
    }

    /// Fails the room (no-op once final) and tells the receiver.
    pub(crate) fn fail(&self, reason: String) {
        let n = {
            let mut g = self.inner.lock();
            g.session.fail(reason);
            self.publish(&g);
            self.take_notice(&mut g)
        };
        self.notice(n);
    }

    /// Whether the room's destination came over `from`.
    pub(crate) fn is_from(&self, from: &Arc<Inbound>) -> bool {
        self.inner
            .lock()
            .dest
            .as_ref()
            .is_some_and(|d| Arc::ptr_eq(&d.from, from))
    }

    /// Pairs the room with its receiver's destination.
    pub(crate) fn attach(
        &self,
        from: Arc<Inbound>,
        target: Arc<DecodePeer>,
        slot: u32,
        aux_index: Option<u32>,
        pages: Vec<i32>,
    ) -> Result<()> {
        let mut g = self.inner.lock();
        if g.dest.is_some() {
            return Err(Error::DuplicateRoom { room: self.id });
        }
        if g.session.state() == KvPoll::Failed {
            return Err(Error::RoomFailed {
                room: self.id,
                reason: g.session.reason().unwrap_or_default().to_string(),
            });
        }
        let r = g.session.peer_ready(pages.len() as u64);
        g.dest = Some(Dest {
            from,
            target,
            slot,
            aux_index,
            pages,
        });
        self.publish(&g);
        // The receiver learns of a mismatch from the rejection; no separate abort.
        g.told_peer = true;
        r.map_err(|reason| Error::InvalidPages {
            room: self.id,
            reason,
        })?;
        g.told_peer = false;
        Ok(())
    }

    /// Whether every batch of the room has settled (no completion outstanding).
    pub(crate) fn settled(&self) -> bool {
        self.inner.lock().all.iter().all(|b| b.remaining() == 0)
    }

    /// Waits up to `limit` until none of the room's writes is in flight; true if none is.
    pub(crate) fn settle(&self, limit: Duration) -> bool {
        let batches: Vec<Arc<Batch>> = self.inner.lock().all.clone();
        let until = Instant::now() + limit;
        loop {
            if batches.iter().all(|b| b.remaining() == 0) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn poll(&self, engine: &TransferEngine) -> KvPoll {
        let s = load(&self.state);
        if s.is_final() {
            return s;
        }
        let now = Instant::now();
        if now >= self.deadline {
            self.fail(format!(
                "deadline of {} ms exceeded while {}",
                self.timeout.as_millis(),
                s.as_str()
            ));
            return load(&self.state);
        }
        if s != KvPoll::Transferring {
            return s;
        }
        let n = {
            let mut g = self.inner.lock();
            let mut i = 0;
            while i < g.open.len() {
                let b = g.open[i].1.clone();
                let result = match b.status() {
                    BatchStatus::Pending => {
                        b.check_deadline(now);
                        i += 1;
                        continue;
                    }
                    BatchStatus::Done => Ok(()),
                    BatchStatus::Failed(reason) => Err(reason),
                };
                let (id, _) = g.open.swap_remove(i);
                engine.release(id);
                if result.is_ok() {
                    g.metrics.last_done = g.metrics.last_done.max(b.settled_at());
                }
                g.session.chunk_settled(result);
            }
            self.publish(&g);
            self.take_notice(&mut g)
        };
        self.notice(n);
        load(&self.state)
    }
}

/// The prefill side of one room: sends pages of one request to the decode side's pages.
///
/// Created with the room id the decode side's [`KvReceiver`] uses; pairs with it when the
/// receiver's destination arrives (`Bootstrapping` → `WaitingForInput`). Dropping a sender
/// that has not finished aborts it first.
pub struct KvSender {
    shared: Arc<Shared>,
    room: Arc<SendRoom>,
}

impl std::fmt::Debug for KvSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSender")
            .field("room", &self.room.id)
            .field("state", &load(&self.room.state))
            .finish()
    }
}

impl KvSender {
    /// A sending room `room` in the prefill manager `mgr`; `DuplicateRoom` if one is live.
    pub fn new(mgr: &KvManager, room: u64) -> Result<KvSender> {
        let shared = mgr.shared().clone();
        if shared.cfg.role != KvRole::Prefill {
            return Err(Error::InvalidArgument(
                "a KvSender needs a prefill manager".into(),
            ));
        }
        let timeout = shared.cfg.room_timeout;
        let r = Arc::new(SendRoom {
            id: room,
            state: AtomicI32::new(KvPoll::Bootstrapping as i32),
            deadline: Instant::now() + timeout,
            timeout,
            inner: Mutex::new(SendInner {
                session: SenderSession::new(),
                dest: None,
                open: Vec::new(),
                all: Vec::new(),
                last_pair: None,
                told_peer: false,
                metrics: SendMetrics::default(),
                runs: Vec::new(),
            }),
        });
        shared.add_sender(room, &r)?;
        Ok(KvSender { shared, room: r })
    }

    /// The room id.
    pub fn room(&self) -> u64 {
        self.room.id
    }

    /// The room will carry `num_pages` pages (the receiver must name as many) and, if
    /// `aux_index` is set, aux slot `aux_index` of every aux buffer.
    pub fn init(&self, num_pages: usize, aux_index: Option<u32>) -> Result<()> {
        let id = self.room.id;
        if let Some(a) = aux_index {
            let slots = self.shared.layout.aux_slots();
            if (a as u64) >= slots {
                return Err(Error::InvalidPages {
                    room: id,
                    reason: format!("aux index {a} outside 0..{slots}"),
                });
            }
        }
        let (r, n) = {
            let mut g = self.room.inner.lock();
            let r = g.session.init(num_pages as u64, aux_index);
            self.room.publish(&g);
            (r, self.room.take_notice(&mut g))
        };
        self.room.notice(n);
        r.map_err(|r| refused(id, r))
    }

    /// Sends `src_pages` (local page indices) to the next `src_pages.len()` destination pages
    /// of the room; `is_last` ends the room (aux goes with it). Nothing is written when the
    /// pages or counts are wrong.
    pub fn send(&self, src_pages: &[i32], is_last: bool) -> Result<()> {
        let id = self.room.id;
        let start = Instant::now();
        check_pages(src_pages, self.shared.layout.pages(), "source")
            .map_err(|reason| Error::InvalidPages { room: id, reason })?;
        let mut g = self.room.inner.lock();
        let chunk = g
            .session
            .begin_chunk(src_pages.len() as u64, is_last)
            .map_err(|r| refused(id, r))?;
        let Some(chunk) = chunk else { return Ok(()) };
        g.metrics.first_send.get_or_insert(start);
        let inner = &mut *g;
        let dest = inner
            .dest
            .as_ref()
            .expect("a room past Bootstrapping has a destination");
        let mut reqs: Vec<Request> = Vec::new();
        let (src, dst): (&[i32], &[i32]) = if chunk.pages == 0 {
            // An empty last chunk re-writes the last page (same bytes) so aux and the final
            // notification still follow data on the wire.
            (&[], &[])
        } else {
            let at = chunk.offset as usize;
            (src_pages, &dest.pages[at..at + src_pages.len()])
        };
        let resend;
        let (src, dst) = match (src.is_empty(), inner.last_pair) {
            (true, Some((s, d))) => {
                resend = [[s], [d]];
                (&resend[0][..], &resend[1][..])
            }
            _ => (src, dst),
        };
        inner.runs.clear();
        runs(src, dst, &mut inner.runs);
        expand(
            &inner.runs,
            &self.shared.layout,
            &dest.target.buffers,
            &mut reqs,
        );
        if let (true, Some(a), Some(b)) = (chunk.last, inner.session.aux_index(), dest.aux_index) {
            expand_aux(&self.shared.layout.aux, a, &dest.target.aux, b, &mut reqs);
        }
        if let (Some(&s), Some(&d)) = (src.last(), dst.last()) {
            inner.last_pair = Some((s, d));
        }
        let tag = chunk_tag(dest.slot, chunk.seq, chunk.last);
        let timeout = self.room.deadline.saturating_duration_since(Instant::now());
        let peer = dest.target.peer;
        let submitted = if reqs.is_empty() {
            Err(Error::InvalidArgument("nothing to write".into()))
        } else {
            self.shared.engine.submit_notify(peer, &reqs, timeout, tag)
        };
        match submitted {
            Ok(batch) => {
                let b = self.shared.engine.batch_handle(batch)?;
                inner.metrics.first_post.get_or_insert_with(Instant::now);
                inner.metrics.bytes += reqs.iter().map(|r| r.len).sum::<u64>();
                inner.metrics.slices += reqs.len() as u64;
                inner.open.push((batch, b.clone()));
                inner.all.push(b);
                self.room.publish(inner);
                Ok(())
            }
            Err(e) => {
                inner
                    .session
                    .fail(format!("chunk {} not sent: {e}", chunk.seq));
                self.room.publish(inner);
                let n = self.room.take_notice(inner);
                drop(g);
                self.room.notice(n);
                Err(e)
            }
        }
    }

    /// The room's state; never blocks (a lock held for a few atomic reads at most).
    pub fn poll(&self) -> KvPoll {
        self.room.poll(&self.shared.engine)
    }

    /// Why the room failed.
    pub fn failure_reason(&self) -> Option<String> {
        self.room.inner.lock().session.reason().map(str::to_string)
    }

    /// Fails the room (unless it already succeeded) and returns once none of its writes can
    /// land at the receiver any more: every write in flight has completed or been flushed. If
    /// that takes longer than the abort timeout, the connection to the receiver is closed.
    pub fn abort(&self) -> Result<()> {
        self.room.fail("aborted by the sender".into());
        if load(&self.room.state) == KvPoll::Success {
            return Ok(());
        }
        if !self.room.settle(self.shared.cfg.abort_timeout) {
            let peer = self.room.inner.lock().dest.as_ref().map(|d| d.target.peer);
            if let Some(p) = peer {
                tracing::warn!(
                    room = self.room.id,
                    "abort: writes still in flight; closing the peer"
                );
                let _ = self.shared.engine.disconnect(p);
            }
            if !self.room.settle(Duration::from_secs(5)) {
                return Err(Error::Timeout {
                    what: format!("abort of room {}", self.room.id),
                    after_ms: self.shared.cfg.abort_timeout.as_millis() as u64 + 5000,
                });
            }
        }
        Ok(())
    }

    /// What the room moved so far.
    pub fn metrics(&self) -> RoomMetrics {
        let g = self.room.inner.lock();
        let m = &g.metrics;
        let done = if g.session.state() == KvPoll::Success {
            m.last_done
        } else {
            None
        };
        RoomMetrics {
            bytes: m.bytes,
            slices: m.slices,
            queued_to_first_write: span(m.first_send, m.first_post),
            transfer_span: span(m.first_post, done),
        }
    }
}

impl Drop for KvSender {
    fn drop(&mut self) {
        if !self.poll().is_final()
            && let Err(e) = self.abort()
        {
            tracing::warn!(room = self.room.id, "{e}");
        }
        self.room.settle(Duration::ZERO);
        let open: Vec<BatchId> = self
            .room
            .inner
            .lock()
            .open
            .drain(..)
            .map(|(id, _)| id)
            .collect();
        for id in open {
            self.shared.engine.release(id);
        }
        let mut senders = self.shared.senders.lock();
        if senders
            .get(&self.room.id)
            .is_some_and(|r| Arc::ptr_eq(r, &self.room))
        {
            senders.remove(&self.room.id);
        }
    }
}

#[derive(Default)]
struct RecvMetrics {
    bytes: u64,
    chunks: u64,
    init: Option<Instant>,
    first: Option<Instant>,
    done: Option<Instant>,
}

struct RecvInner {
    session: ReceiverSession,
    metrics: RecvMetrics,
}

/// A receiving room as the manager and its channel threads see it.
pub(crate) struct RecvRoom {
    id: u64,
    state: AtomicI32,
    deadline: Instant,
    timeout: Duration,
    channel: OnceLock<Arc<Channel>>,
    slot: OnceLock<u32>,
    inner: Mutex<RecvInner>,
    told_peer: AtomicBool,
    acked: Mutex<bool>,
    ack: Condvar,
    fences: Arc<crate::transport::fence::RoomFences>,
}

impl RecvRoom {
    fn publish(&self, g: &RecvInner) {
        self.state
            .store(g.session.state() as i32, Ordering::Release);
    }

    /// Whether notifications from engine `(id, epoch)` belong to this room.
    pub(crate) fn sent_by(&self, engine: (u64, u64)) -> bool {
        self.channel.get().is_some_and(|c| c.peer_engine == engine)
    }

    /// Whether the room runs over `channel`.
    pub(crate) fn is_on(&self, channel: &Arc<Channel>) -> bool {
        self.channel.get().is_some_and(|c| Arc::ptr_eq(c, channel))
    }

    /// Chunk `seq` has landed.
    pub(crate) fn on_chunk(&self, seq: u32, last: bool) {
        let mut g = self.inner.lock();
        let now = Instant::now();
        if g.session.notified(seq, last) {
            g.metrics.done = Some(now);
        }
        g.metrics.first.get_or_insert(now);
        g.metrics.chunks += 1;
        self.publish(&g);
    }

    /// The sender accepted the room.
    pub(crate) fn accepted(&self) {
        let mut g = self.inner.lock();
        g.session.accepted();
        self.publish(&g);
    }

    /// Fails the room and refuses its further TCP writes (without waiting for writes in
    /// progress).
    pub(crate) fn fail_and_fence(&self, reason: String) {
        let mut g = self.inner.lock();
        g.session.fail(reason);
        self.publish(&g);
        drop(g);
        self.fence(Duration::ZERO);
    }

    /// Fences the room's slot; waits up to `limit` for TCP writes in progress.
    fn fence(&self, limit: Duration) -> bool {
        match (self.slot.get(), self.channel.get()) {
            (Some(&slot), Some(c)) => self
                .fences
                .fence((c.peer_engine.0, c.peer_engine.1, slot), limit),
            _ => true,
        }
    }

    /// The sender confirmed that no write of the room is in flight (or it is gone).
    pub(crate) fn abort_acked(&self) {
        *self.acked.lock() = true;
        self.ack.notify_all();
    }

    /// Tells the sender the room failed, once.
    fn tell_sender(&self) {
        if self.slot.get().is_none() || self.told_peer.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(c) = self.channel.get() {
            let reason = self
                .inner
                .lock()
                .session
                .reason()
                .unwrap_or_default()
                .to_string();
            if c.send(&KvMessage::RoomAbort {
                room: self.id,
                kind: 4,
                reason,
            })
            .is_err()
            {
                self.abort_acked();
            }
        }
    }

    fn poll(&self) -> KvPoll {
        let s = load(&self.state);
        if s.is_final() || Instant::now() < self.deadline {
            return s;
        }
        self.fail_and_fence(format!(
            "deadline of {} ms exceeded while {}",
            self.timeout.as_millis(),
            s.as_str()
        ));
        self.tell_sender();
        load(&self.state)
    }
}

/// The decode side of one room: names the destination pages, then watches them fill.
///
/// Dropping a receiver that has not succeeded aborts it first, so its pages can be reused.
pub struct KvReceiver {
    shared: Arc<Shared>,
    room: Arc<RecvRoom>,
}

impl std::fmt::Debug for KvReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReceiver")
            .field("room", &self.room.id)
            .field("state", &load(&self.room.state))
            .finish()
    }
}

impl KvReceiver {
    /// A receiving room `room` in the decode manager `mgr`, served by the prefill manager at
    /// `bootstrap_addr`. `DuplicateRoom` if one is live here; a prefill side that cannot be
    /// reached fails the room (see `poll` and `failure_reason`).
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
        let timeout = shared.cfg.room_timeout;
        let r = Arc::new(RecvRoom {
            id: room,
            state: AtomicI32::new(KvPoll::Bootstrapping as i32),
            deadline: Instant::now() + timeout,
            timeout,
            channel: OnceLock::new(),
            slot: OnceLock::new(),
            inner: Mutex::new(RecvInner {
                session: ReceiverSession::new(),
                metrics: RecvMetrics::default(),
            }),
            told_peer: AtomicBool::new(false),
            acked: Mutex::new(false),
            ack: Condvar::new(),
            fences: shared.engine.fences().clone(),
        });
        {
            let mut receivers = shared.receivers.lock();
            if receivers.contains_key(&room) {
                return Err(Error::DuplicateRoom { room });
            }
            receivers.insert(room, r.clone());
        }
        match shared.channel_to(addr) {
            Ok(c) => {
                let _ = r.channel.set(c);
            }
            Err(e) => {
                r.fail_and_fence(format!("cannot reach the sender at {addr}: {e}"));
                r.abort_acked();
            }
        }
        Ok(KvReceiver { shared, room: r })
    }

    /// The room id.
    pub fn room(&self) -> u64 {
        self.room.id
    }

    /// Names the destination: the room's pages land in `dst_pages` (local page indices, in
    /// room order), and aux in slot `aux_index` of every aux buffer. Nothing is sent when the
    /// pages are wrong.
    pub fn init(&self, dst_pages: &[i32], aux_index: Option<u32>) -> Result<()> {
        let id = self.room.id;
        let layout = &self.shared.layout;
        check_pages(dst_pages, layout.pages(), "destination")
            .and_then(|()| check_distinct(dst_pages))
            .map_err(|reason| Error::InvalidPages { room: id, reason })?;
        if let Some(a) = aux_index
            && (a as u64) >= layout.aux_slots()
        {
            return Err(Error::InvalidPages {
                room: id,
                reason: format!("aux index {a} outside 0..{}", layout.aux_slots()),
            });
        }
        {
            let mut g = self.room.inner.lock();
            g.session
                .init(dst_pages.len() as u64)
                .map_err(|r| refused(id, r))?;
            g.metrics.init = Some(Instant::now());
            g.metrics.bytes = dst_pages.len() as u64 * layout.page_bytes()
                + aux_index.map_or(0, |_| layout.aux_bytes());
        }
        let slot = self.shared.take_slot(&self.room)?;
        let _ = self.room.slot.set(slot);
        let channel = self.room.channel.get().expect("a live room has a channel");
        let sent = channel.send(&KvMessage::RoomInit {
            room: id,
            slot,
            aux_index,
            pages: dst_pages.to_vec(),
        });
        if let Err(e) = sent {
            self.room
                .fail_and_fence(format!("cannot send the room to the sender: {e}"));
            self.room.abort_acked();
            return Err(e);
        }
        Ok(())
    }

    /// The room's state; never blocks.
    pub fn poll(&self) -> KvPoll {
        self.room.poll()
    }

    /// Why the room failed.
    pub fn failure_reason(&self) -> Option<String> {
        self.room.inner.lock().session.reason().map(str::to_string)
    }

    /// Fails the room (unless it already succeeded) and returns once no write of the room can
    /// land in this engine's memory any more. TCP writes are fenced here; over RDMA the sender
    /// confirms that its writes have completed, and a sender that does not answer within the
    /// abort timeout has its QPs into this engine stopped.
    pub fn abort(&self) -> Result<()> {
        {
            let mut g = self.room.inner.lock();
            g.session.fail("aborted by the receiver".into());
            self.room.publish(&g);
            if g.session.state() == KvPoll::Success {
                return Ok(());
            }
        }
        let limit = self.shared.cfg.abort_timeout;
        if !self.room.fence(limit) {
            tracing::warn!(
                room = self.room.id,
                "abort: a TCP write did not finish in time"
            );
        }
        self.room.tell_sender();
        if self.shared.engine.transport() == "rdma" && self.room.slot.get().is_some() {
            let mut acked = self.room.acked.lock();
            let until = Instant::now() + limit;
            while !*acked {
                if self.room.ack.wait_until(&mut acked, until).timed_out() {
                    break;
                }
            }
            if !*acked {
                drop(acked);
                if let Some(c) = self.room.channel.get() {
                    tracing::warn!(
                        room = self.room.id,
                        "abort: no word from the sender; stopping its QPs"
                    );
                    self.shared
                        .engine
                        .stop_inbound(c.peer_engine.0, c.peer_engine.1);
                    self.room.abort_acked();
                }
            }
        }
        Ok(())
    }

    /// What the room received so far (`slices` counts notified chunks here).
    pub fn metrics(&self) -> RoomMetrics {
        let g = self.room.inner.lock();
        let m = &g.metrics;
        RoomMetrics {
            bytes: m.bytes,
            slices: m.chunks,
            queued_to_first_write: span(m.init, m.first),
            transfer_span: span(m.first, m.done),
        }
    }
}

impl Drop for KvReceiver {
    fn drop(&mut self) {
        if self.poll() != KvPoll::Success
            && let Err(e) = self.abort()
        {
            tracing::warn!(room = self.room.id, "{e}");
        }
        let mut receivers = self.shared.receivers.lock();
        if receivers
            .get(&self.room.id)
            .is_some_and(|r| Arc::ptr_eq(r, &self.room))
        {
            receivers.remove(&self.room.id);
        }
        drop(receivers);
        if let Some(&slot) = self.room.slot.get() {
            self.shared.free_slot(slot);
        }
    }
}
