//! The KV manager: an engine, a role and a layout, the rooms alive in it, and the control
//! channels to the other side.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::channel::{Channel, read_message};
use super::layout::KvLayout;
use super::pages::{RemoteBuffer, check_pages};
use super::proto::KvMessage;
use super::room::{RecvRoom, SendRoom};
use super::{MAX_SLOTS, decode_chunk_tag};
use crate::config::{EngineConfig, parse_num};
use crate::engine::{HostBuffer, PeerId, TransferEngine};
use crate::error::{Error, Result};
use crate::memory::SegmentId;
use crate::transport::notify::Notification;
use crate::wire::Hello;

/// Which side of the hand-off a manager is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvRole {
    /// Computes the KV cache and sends it ([`KvSender`](super::KvSender)).
    Prefill,
    /// Receives it ([`KvReceiver`](super::KvReceiver)).
    Decode,
}

/// Settings of a KV manager.
///
/// | field | env | default |
/// |---|---|---|
/// | `room_timeout` | `KVT_ROOM_TIMEOUT_MS` | 60 000 ms |
/// | `abort_timeout` | `KVT_ABORT_TIMEOUT_MS` | 10 000 ms |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvConfig {
    /// Prefill or decode.
    pub role: KvRole,
    /// A room that has not succeeded this long after it was created fails.
    pub room_timeout: Duration,
    /// Longest an abort waits for the room's writes in flight (or the peer's word that none is)
    /// before it cuts the peer off instead.
    pub abort_timeout: Duration,
}

impl KvConfig {
    /// Defaults for `role`, with `KVT_*` environment overrides applied (malformed values are
    /// logged and ignored).
    pub fn new(role: KvRole) -> KvConfig {
        let mut c = KvConfig {
            role,
            room_timeout: Duration::from_secs(60),
            abort_timeout: Duration::from_secs(10),
        };
        for (var, field) in [
            ("KVT_ROOM_TIMEOUT_MS", &mut c.room_timeout),
            ("KVT_ABORT_TIMEOUT_MS", &mut c.abort_timeout),
        ] {
            if let Ok(v) = std::env::var(var) {
                match parse_num(var, &v) {
                    Ok(ms) => *field = Duration::from_millis(ms),
                    Err(e) => tracing::warn!("ignoring {var}: {e}"),
                }
            }
        }
        c
    }

    /// Sets the room timeout.
    pub fn room_timeout(mut self, d: Duration) -> Self {
        self.room_timeout = d;
        self
    }

    /// Sets the abort timeout.
    pub fn abort_timeout(mut self, d: Duration) -> Self {
        self.abort_timeout = d;
        self
    }
}

/// How a prefill manager reaches one decode engine's KV cache.
pub(crate) struct DecodePeer {
    pub(crate) peer: PeerId,
    pub(crate) buffers: Vec<RemoteBuffer>,
    pub(crate) aux: Vec<RemoteBuffer>,
    pub(crate) pages: u64,
    pub(crate) aux_slots: u64,
}

/// A prefill-side channel: the channel and what it takes to write to its decode engine, or
/// why that is impossible.
pub(crate) struct Inbound {
    pub(crate) channel: Arc<Channel>,
    pub(crate) target: std::result::Result<Arc<DecodePeer>, (u16, String)>,
}

/// A room destination that arrived before its sender was created.
struct PendingInit {
    from: Arc<Inbound>,
    slot: u32,
    aux_index: Option<u32>,
    pages: Vec<i32>,
    at: Instant,
}

/// State shared by a manager and its rooms.
pub(crate) struct Shared {
    pub(crate) engine: TransferEngine,
    pub(crate) cfg: KvConfig,
    pub(crate) layout: KvLayout,
    /// Buffers the manager allocated itself (`with_owned_memory`): page buffers, then aux.
    pub(crate) owned: Vec<HostBuffer>,
    pub(crate) senders: Mutex<HashMap<u64, Arc<SendRoom>>>,
    pub(crate) receivers: Mutex<HashMap<u64, Arc<RecvRoom>>>,
    slots: Mutex<HashMap<u32, Arc<RecvRoom>>>,
    next_slot: AtomicU32,
    pending: Mutex<HashMap<u64, PendingInit>>,
    /// Decode side: channels to prefill managers by their bootstrap address.
    outbound: Mutex<HashMap<SocketAddr, Arc<Channel>>>,
    /// Prefill side: channels decode managers opened to us.
    inbound: Mutex<Vec<Weak<Inbound>>>,
    /// Prefill side: rooms a receiver aborted, for the sweep thread to acknowledge once their
    /// transfers have settled (one thread for all of them, not one per abort).
    aborts: crossbeam_channel::Sender<AbortWait>,
}

/// A receiver's abort to acknowledge once the room's transfers have settled (or `until`).
struct AbortWait {
    sender: Arc<SendRoom>,
    channel: Arc<Channel>,
    room: u64,
    until: Instant,
}

/// One per process and role: owns an engine with the KV layout registered, and the rooms.
pub struct KvManager {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KvManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvManager")
            .field("role", &self.shared.cfg.role)
            .field("bootstrap_addr", &self.shared.engine.local_addr())
            .finish()
    }
}

impl KvManager {
    /// Starts an engine with `engine`'s settings, registers every buffer of `layout` with it
    /// (buffers inside one registration are fine: each range is registered once) and starts
    /// serving rooms in `kv.role`.
    ///
    /// # Safety
    /// Every buffer of `layout` must stay valid, and must not be freed, for as long as the
    /// manager or any of its rooms lives: peers write into (decode) or read from (prefill)
    /// that memory.
    pub unsafe fn new(engine: EngineConfig, kv: KvConfig, layout: KvLayout) -> Result<KvManager> {
        let engine = TransferEngine::new(engine)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { Self::start(engine, kv, layout, Vec::new()) }
    }

    /// Like [`new`](Self::new), but the manager allocates the memory itself (zeroed, page
    /// aligned, registered): one buffer of `pages * item_len` bytes per `(pages, item_len)` of
    /// `buffers`, and one of `slots * item_len` per entry of `aux`. Reach it through
    /// [`buffer`](Self::buffer) and [`aux_buffer`](Self::aux_buffer).
    pub fn with_owned_memory(
        engine: EngineConfig,
        kv: KvConfig,
        buffers: &[(u64, u64)],
        aux: &[(u64, u64)],
    ) -> Result<KvManager> {
        let engine = TransferEngine::new(engine)?;
        let mut owned = Vec::with_capacity(buffers.len() + aux.len());
        let mut describe = |list: &[(u64, u64)]| -> Result<Vec<super::KvBuffer>> {
            list.iter()
                .map(|&(items, item_len)| {
                    let len = items.checked_mul(item_len).ok_or_else(|| {
                        Error::InvalidArgument(format!("{items} x {item_len} bytes overflows"))
                    })?;
                    let b = engine.alloc(len as usize)?;
                    let d = super::KvBuffer {
                        addr: b.addr(),
                        len,
                        item_len,
                    };
                    owned.push(b);
                    Ok(d)
                })
                .collect()
        };
        let layout = KvLayout::new(describe(buffers)?, describe(aux)?)?;
        // SAFETY: every layout buffer is a `HostBuffer` the manager keeps (in `owned`) for as
        // long as it lives; they are already registered, so `start` registers nothing more.
        unsafe { Self::start(engine, kv, layout, owned) }
    }

    /// Page buffer `i` when the manager owns its memory.
    pub fn buffer(&self, i: usize) -> Option<&HostBuffer> {
        (i < self.shared.layout.buffers.len())
            .then(|| self.shared.owned.get(i))
            .flatten()
    }

    /// Aux buffer `i` when the manager owns its memory.
    pub fn aux_buffer(&self, i: usize) -> Option<&HostBuffer> {
        self.shared.owned.get(self.shared.layout.buffers.len() + i)
    }

    /// # Safety
    /// As [`new`](Self::new); buffers inside `owned` are registered already.
    unsafe fn start(
        engine: TransferEngine,
        kv: KvConfig,
        layout: KvLayout,
        owned: Vec<HostBuffer>,
    ) -> Result<KvManager> {
        if owned.is_empty() {
            // SAFETY: forwarded from the caller's contract.
            unsafe { register_layout(&engine, &layout)? };
        }
        let (aborts, abort_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            aborts,
            engine,
            cfg: kv,
            layout,
            owned,
            senders: Mutex::new(HashMap::new()),
            receivers: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            next_slot: AtomicU32::new(0),
            pending: Mutex::new(HashMap::new()),
            outbound: Mutex::new(HashMap::new()),
            inbound: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&shared);
        match shared.cfg.role {
            KvRole::Prefill => {
                shared.engine.set_kv_acceptor(Some(Arc::new(
                    move |s: TcpStream, h: &Hello, from| {
                        if let Some(m) = weak.upgrade() {
                            let (id, epoch) = (h.engine_id, h.epoch);
                            serve_inbound(m, s, (id, epoch), from);
                        }
                    },
                )));
                let weak = Arc::downgrade(&shared);
                thread::Builder::new()
                    .name("kvt-kv-sweep".into())
                    .spawn(move || sweep_pending(weak, abort_rx))
                    .map_err(|e| Error::io("spawn", e))?;
            }
            KvRole::Decode => {
                shared
                    .engine
                    .set_notify_hook(Some(Arc::new(move |n: &Notification| {
                        weak.upgrade().is_some_and(|m| m.on_notification(n))
                    })));
            }
        }
        tracing::info!(role = ?shared.cfg.role, addr = %shared.engine.local_addr(),
            pages = shared.layout.pages(), buffers = shared.layout.buffers.len(), "KV manager started");
        Ok(KvManager { shared })
    }

    /// The engine (for plain batches next to rooms, or for inspection).
    pub fn engine(&self) -> &TransferEngine {
        &self.shared.engine
    }

    /// The address peers use to reach this manager (its engine's bootstrap address).
    pub fn bootstrap_addr(&self) -> SocketAddr {
        self.shared.engine.local_addr()
    }

    /// Prefill or decode.
    pub fn role(&self) -> KvRole {
        self.shared.cfg.role
    }

    /// The layout.
    pub fn layout(&self) -> &KvLayout {
        &self.shared.layout
    }

    /// Settings.
    pub fn config(&self) -> &KvConfig {
        &self.shared.cfg
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Registers the memory of every layout buffer, each overlapping or touching range once.
///
/// # Safety
/// The buffers stay valid for as long as the engine may use them.
unsafe fn register_layout(engine: &TransferEngine, layout: &KvLayout) -> Result<()> {
    let mut ranges: Vec<(u64, u64)> = layout
        .buffers
        .iter()
        .chain(&layout.aux)
        .map(|b| (b.addr, b.addr + b.len))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    for (start, end) in merged {
        // SAFETY: the caller guarantees every layout buffer stays valid for the manager's
        // lifetime; merged ranges cover exactly those buffers.
        unsafe { engine.register_memory(start as *mut u8, (end - start) as usize)? };
    }
    Ok(())
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.close_channels();
    }
}

impl Drop for KvManager {
    /// Stops the manager even while rooms or its own threads still hold it: the KV channels
    /// close, then the engine shuts down (see [`TransferEngine::shutdown`]), so once this
    /// returns no write of any room lands in the layout's memory over TCP any more.
    fn drop(&mut self) {
        self.shared.close_channels();
        self.shared.engine.shutdown();
    }
}

impl Shared {
    /// Stops taking KV channels and notifications and closes the open ones (idempotent).
    fn close_channels(&self) {
        self.engine.set_kv_acceptor(None);
        self.engine.set_notify_hook(None);
        for c in self.outbound.lock().values() {
            c.close();
        }
        for i in self.inbound.lock().iter().filter_map(Weak::upgrade) {
            i.channel.close();
        }
    }

    fn hello(&self) -> KvMessage {
        KvMessage::Hello {
            engine_id: self.engine.engine_id(),
            epoch: self.engine.epoch(),
            engine_addr: self.engine.local_addr().to_string(),
            layout: self.layout.clone(),
        }
    }

    /// Decode side: the channel to the prefill manager at `addr`, opened if needed.
    pub(crate) fn channel_to(self: &Arc<Self>, addr: SocketAddr) -> Result<Arc<Channel>> {
        if let Some(c) = self.outbound.lock().get(&addr)
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        let (hello, stream) = self.engine.open_kv_channel(addr)?;
        let (channel, reader) = Channel::handshake(
            stream,
            &self.hello(),
            true,
            self.engine.config().connect_timeout,
        )?;
        if channel.peer_engine != (hello.engine_id, hello.epoch) {
            return Err(Error::Handshake {
                peer: addr.to_string(),
                reason: "KV hello names another engine than the connection's".into(),
            });
        }
        self.layout.check_pairs_with(&channel.peer_layout)?;
        let channel = Arc::new(channel);
        let mut map = self.outbound.lock();
        if let Some(c) = map.get(&addr)
            && !c.is_dead()
        {
            // Another room opened one meanwhile; use it.
            channel.close();
            return Ok(c.clone());
        }
        map.insert(addr, channel.clone());
        drop(map);
        let weak = Arc::downgrade(self);
        let c = channel.clone();
        thread::Builder::new()
            .name("kvt-kv-chan".into())
            .spawn(move || serve_outbound(weak, c, reader))
            .map_err(|e| Error::io("spawn", e))?;
        Ok(channel)
    }

    /// Decode side: a free slot for `room` (the notification tags name it).
    pub(crate) fn take_slot(&self, room: &Arc<RecvRoom>) -> Result<u32> {
        let mut slots = self.slots.lock();
        if slots.len() as u32 >= MAX_SLOTS {
            return Err(Error::InvalidArgument(format!(
                "more than {MAX_SLOTS} receiving rooms at once"
            )));
        }
        loop {
            let s = self.next_slot.fetch_add(1, Ordering::Relaxed) % MAX_SLOTS;
            if let std::collections::hash_map::Entry::Vacant(v) = slots.entry(s) {
                v.insert(room.clone());
                self.engine.fences().clear_slot(s);
                return Ok(s);
            }
        }
    }

    /// Decode side: gives the slot back.
    pub(crate) fn free_slot(&self, slot: u32) {
        self.slots.lock().remove(&slot);
    }

    fn on_notification(&self, n: &Notification) -> bool {
        let (slot, seq, last) = decode_chunk_tag(n.tag);
        let room = self.slots.lock().get(&slot).cloned();
        match room {
            Some(r) if r.sent_by((n.engine_id, n.epoch)) => {
                r.on_chunk(seq, last);
                true
            }
            _ => {
                tracing::debug!(slot, seq, "notification for no live room");
                false
            }
        }
    }

    /// Prefill side: pairs a room's destination with its sender, or rejects it.
    fn attach(&self, room: u64, sender: &Arc<SendRoom>, init: PendingInit) {
        let target = match &init.from.target {
            Ok(t) => t.clone(),
            Err((code, reason)) => {
                reject(&init.from.channel, room, *code, reason.clone());
                sender.fail(format!("cannot reach the receiver: {reason}"));
                return;
            }
        };
        match sender.attach(
            init.from.clone(),
            target,
            init.slot,
            init.aux_index,
            init.pages,
        ) {
            Ok(()) => {
                let _ = init.from.channel.send(&KvMessage::RoomAccepted { room });
            }
            Err(e) => reject(&init.from.channel, room, e.code() as u16, e.to_string()),
        }
    }

    /// Prefill side: a sender was created; its destination may be waiting already.
    ///
    /// Registers the sender and takes a waiting destination under the `pending` lock, the
    /// lock `on_room_init` holds while it looks for the sender: a destination arriving at the
    /// same moment is either seen here or sees the sender, never neither.
    pub(crate) fn add_sender(&self, room: u64, sender: &Arc<SendRoom>) -> Result<()> {
        let waiting = {
            let mut pending = self.pending.lock();
            let mut senders = self.senders.lock();
            if senders.contains_key(&room) {
                return Err(Error::DuplicateRoom { room });
            }
            senders.insert(room, sender.clone());
            pending.remove(&room)
        };
        if let Some(p) = waiting {
            self.attach(room, sender, p);
        }
        Ok(())
    }

    fn on_room_init(
        &self,
        from: &Arc<Inbound>,
        room: u64,
        slot: u32,
        aux_index: Option<u32>,
        pages: Vec<i32>,
    ) {
        if let Ok(t) = &from.target {
            if let Err(reason) = check_pages(&pages, t.pages, "destination") {
                let e = Error::InvalidPages { room, reason };
                return reject(&from.channel, room, e.code() as u16, e.to_string());
            }
            if let Some(a) = aux_index
                && (a as u64) >= t.aux_slots
                && !t.aux.is_empty()
            {
                let e = Error::InvalidPages {
                    room,
                    reason: format!("aux index {a} outside 0..{}", t.aux_slots),
                };
                return reject(&from.channel, room, e.code() as u16, e.to_string());
            }
        }
        let init = PendingInit {
            from: from.clone(),
            slot,
            aux_index,
            pages,
            at: Instant::now(),
        };
        // Same lock order as `add_sender` (pending, then senders), held across the look-up
        // and the insert so a sender created meanwhile cannot miss this destination.
        let mut pending = self.pending.lock();
        let sender = self.senders.lock().get(&room).cloned();
        #[cfg(test)]
        tests::hold_after_lookup(sender.is_none());
        match sender {
            Some(s) => {
                drop(pending);
                self.attach(room, &s, init)
            }
            None => {
                let duplicate = match pending.entry(room) {
                    std::collections::hash_map::Entry::Occupied(_) => true,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(init);
                        false
                    }
                };
                drop(pending);
                if duplicate {
                    let e = Error::DuplicateRoom { room };
                    reject(&from.channel, room, e.code() as u16, e.to_string());
                }
            }
        }
    }
}

/// The failure reason a room takes from its peer's `RoomAbort`: the peer's own reason when it
/// already names the side ("aborted by the sender"), else prefixed with it.
fn peer_reason(side: &str, reason: String) -> String {
    if reason.starts_with("aborted by the") {
        reason
    } else {
        format!("the {side} failed: {reason}")
    }
}

fn reject(channel: &Channel, room: u64, code: u16, reason: String) {
    tracing::info!(room, %reason, "rejecting a room");
    let _ = channel.send(&KvMessage::RoomRejected {
        room,
        code,
        kind: 8,
        reason,
    });
}

/// Prefill side: serves one channel a decode manager opened, on the engine's connection
/// thread, until it closes.
fn serve_inbound(m: Arc<Shared>, stream: TcpStream, engine: (u64, u64), from: SocketAddr) {
    let (channel, mut reader) =
        match Channel::handshake(stream, &m.hello(), false, m.engine.config().connect_timeout) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%from, "KV channel handshake failed: {e}");
                return;
            }
        };
    let channel = Arc::new(channel);
    let target = if channel.peer_engine != engine {
        Err((
            16,
            "KV hello names another engine than the connection's".into(),
        ))
    } else {
        connect_decode(&m, &channel).map_err(|e| (e.code() as u16, e.to_string()))
    };
    if let Err((_, reason)) = &target {
        tracing::warn!(%from, %reason, "KV peer unusable; its rooms will be rejected");
    }
    let inbound = Arc::new(Inbound {
        channel: channel.clone(),
        target,
    });
    {
        let mut list = m.inbound.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&inbound));
    }
    let weak = Arc::downgrade(&m);
    drop(m);
    let why = loop {
        let (msg, m) = match next_message(&mut reader, &weak) {
            Ok(next) => next,
            Err(why) => break why,
        };
        match msg {
            KvMessage::RoomInit {
                room,
                slot,
                aux_index,
                pages,
            } => m.on_room_init(&inbound, room, slot, aux_index, pages),
            KvMessage::RoomAbort { room, reason, .. } => {
                let sender = m.senders.lock().get(&room).cloned();
                match sender {
                    Some(s) if s.is_from(&inbound) => {
                        s.fail(peer_reason("receiver", reason));
                        let _ = m.aborts.send(AbortWait {
                            sender: s,
                            channel: channel.clone(),
                            room,
                            until: Instant::now() + m.cfg.abort_timeout,
                        });
                    }
                    _ => {
                        m.pending.lock().remove(&room);
                        let _ = channel.send(&KvMessage::RoomAbortAck { room });
                    }
                }
            }
            other => tracing::debug!(?other, "unexpected KV message from a receiver"),
        }
    };
    channel.close();
    if let Some(m) = weak.upgrade() {
        tracing::info!(%from, %why, "KV channel from a decode manager closed");
        let rooms: Vec<Arc<SendRoom>> = m.senders.lock().values().cloned().collect();
        for r in rooms.iter().filter(|r| r.is_from(&inbound)) {
            r.fail(format!("peer lost: KV channel from {from} closed ({why})"));
        }
        m.pending
            .lock()
            .retain(|_, p| !Arc::ptr_eq(&p.from, &inbound));
        // The engine peer was this channel's alone: closing it stops what its failed rooms
        // still had in flight and leaves no dead peer behind.
        if let Ok(target) = &inbound.target {
            let _ = m.engine.disconnect(target.peer);
        }
    }
}

/// Prefill side: connects the engine to the decode manager's engine and maps its buffers.
fn connect_decode(m: &Shared, channel: &Channel) -> Result<Arc<DecodePeer>> {
    m.layout.check_pairs_with(&channel.peer_layout)?;
    let peer = m.engine.connect(channel.peer_addr)?;
    let info = m.engine.peer_info(peer)?;
    if (info.engine_id, info.epoch) != channel.peer_engine {
        return Err(Error::Handshake {
            peer: channel.peer_addr.to_string(),
            reason: "the decode engine at that address is not the one on the KV channel".into(),
        });
    }
    let map = |list: &[super::KvBuffer]| -> Result<Vec<RemoteBuffer>> {
        list.iter()
            .map(|b| {
                let (segment, offset): (SegmentId, u64) =
                    m.engine.resolve_remote(peer, b.addr, b.len)?;
                Ok(RemoteBuffer {
                    segment,
                    offset,
                    item_len: b.item_len,
                })
            })
            .collect()
    };
    Ok(Arc::new(DecodePeer {
        peer,
        buffers: map(&channel.peer_layout.buffers)?,
        aux: map(&channel.peer_layout.aux)?,
        pages: channel.peer_layout.pages(),
        aux_slots: channel.peer_layout.aux_slots(),
    }))
}

/// The next message of a channel and the manager to handle it; `Err(why)` ends the channel.
fn next_message(
    reader: &mut TcpStream,
    weak: &Weak<Shared>,
) -> std::result::Result<(KvMessage, Arc<Shared>), String> {
    let msg = read_message(reader).map_err(|e| e.to_string())?;
    let m = weak.upgrade().ok_or("KV manager shut down")?;
    Ok((msg, m))
}

/// Decode side: reads one channel to a prefill manager until it closes.
fn serve_outbound(weak: Weak<Shared>, channel: Arc<Channel>, mut reader: TcpStream) {
    let why = loop {
        let (msg, m) = match next_message(&mut reader, &weak) {
            Ok(next) => next,
            Err(why) => break why,
        };
        let room_id = match &msg {
            KvMessage::RoomAccepted { room }
            | KvMessage::RoomRejected { room, .. }
            | KvMessage::RoomAbort { room, .. }
            | KvMessage::RoomAbortAck { room } => *room,
            other => {
                tracing::debug!(?other, "unexpected KV message from a sender");
                continue;
            }
        };
        let room = m.receivers.lock().get(&room_id).cloned();
        let Some(room) = room.filter(|r| r.is_on(&channel)) else {
            continue;
        };
        match msg {
            KvMessage::RoomAccepted { .. } => room.accepted(),
            KvMessage::RoomRejected { reason, .. } => {
                room.fail_and_fence(format!("rejected by the sender: {reason}"))
            }
            KvMessage::RoomAbort { reason, .. } => {
                room.fail_and_fence(peer_reason("sender", reason))
            }
            KvMessage::RoomAbortAck { .. } => room.abort_acked(),
            _ => {}
        }
    };
    channel.close();
    if let Some(m) = weak.upgrade() {
        tracing::info!(peer = %channel.peer_addr, %why, "KV channel to a prefill manager closed");
        let rooms: Vec<Arc<RecvRoom>> = m.receivers.lock().values().cloned().collect();
        for r in rooms.iter().filter(|r| r.is_on(&channel)) {
            r.fail_and_fence(format!(
                "peer lost: KV channel to {} closed ({why})",
                channel.peer_addr
            ));
            r.abort_acked();
        }
    }
}

/// Prefill side: rejects destinations whose sender never came within the room timeout.
/// Prefill side's one housekeeping thread: acknowledges receivers' aborts once the room's
/// transfers have settled (checked every millisecond while any wait), and every 100 ms
/// rejects rooms whose init never met a sender.
fn sweep_pending(weak: Weak<Shared>, aborts: crossbeam_channel::Receiver<AbortWait>) {
    let mut waiting: Vec<AbortWait> = Vec::new();
    let mut swept = Instant::now();
    loop {
        let tick = if waiting.is_empty() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(1)
        };
        match aborts.recv_timeout(tick) {
            Ok(a) => waiting.push(a),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        while let Ok(a) = aborts.try_recv() {
            waiting.push(a);
        }
        let now = Instant::now();
        waiting.retain(|a| {
            if a.sender.settled() || now >= a.until {
                let _ = a.channel.send(&KvMessage::RoomAbortAck { room: a.room });
                false
            } else {
                true
            }
        });
        if swept.elapsed() < Duration::from_millis(100) {
            continue;
        }
        swept = Instant::now();
        let Some(m) = weak.upgrade() else { return };
        let limit = m.cfg.room_timeout;
        let expired: Vec<(u64, PendingInit)> = {
            let mut pending = m.pending.lock();
            let old: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| p.at.elapsed() > limit)
                .map(|(r, _)| *r)
                .collect();
            old.into_iter()
                .filter_map(|r| pending.remove(&r).map(|p| (r, p)))
                .collect()
        };
        for (room, p) in expired {
            let e = Error::UnknownRoom { room };
            reject(&p.from.channel, room, e.code() as u16, e.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::TransportKind;
    use crate::kv::{KvPoll, KvReceiver, KvSender};

    /// Milliseconds `on_room_init` waits between finding no sender and parking the destination.
    static HOLD_MS: AtomicU64 = AtomicU64::new(0);

    pub(super) fn hold_after_lookup(no_sender: bool) {
        let ms = HOLD_MS.load(Ordering::Relaxed);
        if no_sender && ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    fn manager(role: KvRole) -> KvManager {
        let engine = EngineConfig::builder()
            .transport(TransportKind::Tcp)
            .build()
            .unwrap();
        KvManager::with_owned_memory(engine, KvConfig::new(role), &[(4, 4096)], &[]).unwrap()
    }

    /// A sender created while its destination is between "no sender yet" and "parked" must
    /// still get it (before the fix both sides stayed in Bootstrapping until the deadline).
    #[test]
    fn a_sender_created_mid_hand_off_still_pairs() {
        let prefill = manager(KvRole::Prefill);
        let decode = manager(KvRole::Decode);
        HOLD_MS.store(300, Ordering::Relaxed);
        let r = KvReceiver::new(&decode, prefill.bootstrap_addr(), 5).unwrap();
        r.init(&[1], None).unwrap();
        std::thread::sleep(Duration::from_millis(100)); // the channel thread is in the hold
        let s = KvSender::new(&prefill, 5).unwrap();
        HOLD_MS.store(0, Ordering::Relaxed);
        let until = Instant::now() + Duration::from_secs(5);
        while s.poll() != KvPoll::WaitingForInput {
            assert!(Instant::now() < until, "destination lost: {:?}", s.poll());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
