//! The KV manager: an engine, a role and a layout, the rooms alive in it, and the control
//! channels to the other side.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::decode_chunk_tag;
use super::driver::{Driver, Endpoint};
use super::endpoint::{DecodeEndpoint, Identity, PrefillEndpoint, Timing};
use super::layout::KvLayout;
use super::pages::RemoteBuffer;
use super::poster::Poster;
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
/// | `connect_timeout` | `KVT_KV_CONNECT_TIMEOUT_MS` | 5 000 ms |
/// | `heartbeat_timeout` | `KVT_HEARTBEAT_TIMEOUT_MS` | 5 000 ms |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvConfig {
    /// Prefill or decode.
    pub role: KvRole,
    /// A room that has not succeeded this long after it was created fails.
    pub room_timeout: Duration,
    /// Longest an abort waits for the room's writes in flight (or the peer's word that none is)
    /// before it cuts the peer off instead.
    pub abort_timeout: Duration,
    /// A control channel to a prefill manager that has not opened (connected and exchanged
    /// hellos) this long after a room asked for it fails its rooms as a timeout. Connecting
    /// happens in the background: no call waits for it.
    pub connect_timeout: Duration,
    /// A peer manager from which nothing (not even a heartbeat) arrived this long is lost:
    /// its rooms fail as peer lost. Heartbeats go out every fifth of it (at most every
    /// second), so a peer stopped for less loses nothing.
    pub heartbeat_timeout: Duration,
    /// Decode: every room asks its sender for a digest (64-bit XXH3) of each chunk's bytes as
    /// posted, hashes the chunk's destination when it lands and succeeds only when every
    /// chunk matched; a mismatch fails the room with [`FailureKind::Integrity`]. Off by
    /// default (`KVT_KV_INTEGRITY=1` turns it on). Both sides' KV memory must be host memory
    /// (a sender with GPU memory rejects such rooms). Prefill: ignored (it hashes when asked).
    ///
    /// [`FailureKind::Integrity`]: super::FailureKind::Integrity
    pub integrity: bool,
}

impl KvConfig {
    /// Defaults for `role`, with `KVT_*` environment overrides applied (malformed values are
    /// logged and ignored).
    pub fn new(role: KvRole) -> KvConfig {
        let mut c = KvConfig {
            role,
            room_timeout: Duration::from_secs(60),
            abort_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(5),
            integrity: false,
        };
        if let Ok(v) = std::env::var("KVT_KV_INTEGRITY") {
            match v.trim() {
                "1" | "true" | "on" => c.integrity = true,
                "0" | "false" | "off" | "" => c.integrity = false,
                other => tracing::warn!("ignoring KVT_KV_INTEGRITY: {other:?} is not 0 or 1"),
            }
        }
        for (var, field) in [
            ("KVT_ROOM_TIMEOUT_MS", &mut c.room_timeout),
            ("KVT_ABORT_TIMEOUT_MS", &mut c.abort_timeout),
            ("KVT_KV_CONNECT_TIMEOUT_MS", &mut c.connect_timeout),
            ("KVT_HEARTBEAT_TIMEOUT_MS", &mut c.heartbeat_timeout),
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

    /// Turns per-chunk integrity digests on or off (see [`integrity`](Self::integrity)).
    pub fn integrity(mut self, on: bool) -> Self {
        self.integrity = on;
        self
    }

    /// Sets the abort timeout.
    pub fn abort_timeout(mut self, d: Duration) -> Self {
        self.abort_timeout = d;
        self
    }

    /// Sets the connect timeout of control channels.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Sets the heartbeat timeout.
    pub fn heartbeat_timeout(mut self, d: Duration) -> Self {
        self.heartbeat_timeout = d;
        self
    }

    /// The times the room protocol enforces (zero durations count as 1 ms).
    pub(crate) fn timing(&self) -> Timing {
        let at_least = |d: Duration| d.max(Duration::from_millis(1));
        let heartbeat_timeout = at_least(self.heartbeat_timeout);
        Timing {
            room_timeout: at_least(self.room_timeout),
            connect_timeout: at_least(self.connect_timeout),
            heartbeat_interval: (heartbeat_timeout / 5).min(Duration::from_secs(1)),
            heartbeat_timeout,
            abort_timeout: at_least(self.abort_timeout),
        }
    }
}

/// How a prefill manager reaches one decode engine's KV cache.
#[derive(Debug)]
pub(crate) struct DecodePeer {
    pub(crate) peer: PeerId,
    pub(crate) buffers: Vec<RemoteBuffer>,
    pub(crate) aux: Vec<RemoteBuffer>,
}

/// State shared by a manager, its rooms and its driver thread.
pub(crate) struct Shared {
    pub(crate) engine: TransferEngine,
    pub(crate) cfg: KvConfig,
    pub(crate) layout: KvLayout,
    /// Buffers the manager allocated itself (`with_owned_memory`): page buffers, then aux.
    pub(crate) owned: Vec<HostBuffer>,
    /// The room protocol and the thread that moves it.
    pub(crate) driver: Driver,
    /// Prefill: the thread that posts chunks.
    pub(crate) poster: Poster,
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
        let me = Identity {
            engine_id: engine.engine_id(),
            epoch: engine.epoch(),
            engine_addr: engine.local_addr(),
            layout: layout.clone(),
        };
        let timing = kv.timing();
        let host = layout
            .buffers
            .iter()
            .chain(&layout.aux)
            .all(|b| engine.is_host_memory(b.addr, b.len));
        let ep = match kv.role {
            KvRole::Prefill => {
                let mut p = PrefillEndpoint::new(me, timing);
                p.set_can_digest(host);
                Endpoint::Prefill(p)
            }
            KvRole::Decode => {
                if kv.integrity && !host {
                    return Err(Error::InvalidArgument(
                        "integrity digests need the KV layout in host memory: the CPU hashes \
                         what lands, and this layout has GPU memory"
                            .into(),
                    ));
                }
                let needs_ack = engine.transport() == "rdma";
                let mut d = DecodeEndpoint::new(me, timing, needs_ack);
                d.check_digests(kv.integrity);
                Endpoint::Decode(d)
            }
        };
        let shared = Arc::new(Shared {
            driver: Driver::new(ep, engine.room_counters(kv.role))?,
            engine,
            cfg: kv,
            layout,
            owned,
            poster: Poster::new(),
        });
        Driver::start(&shared)?;
        if shared.cfg.role == KvRole::Prefill {
            shared.poster.start(Arc::downgrade(&shared))?;
        }
        let weak = Arc::downgrade(&shared);
        match shared.cfg.role {
            KvRole::Prefill => {
                shared.engine.set_kv_acceptor(Some(Arc::new(
                    move |s: TcpStream, h: &Hello, from| {
                        if let Some(m) = weak.upgrade() {
                            m.driver.accepted(s, (h.engine_id, h.epoch), from);
                        }
                    },
                )));
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

impl Drop for KvManager {
    /// Stops the manager even while rooms still hold it: its rooms fail (as shut down), its
    /// channels close and its driver thread is joined, then the engine shuts down (see
    /// [`TransferEngine::shutdown`]), so once this returns no write of any room lands in the
    /// layout's memory over TCP any more.
    fn drop(&mut self) {
        self.shared.engine.set_kv_acceptor(None);
        self.shared.engine.set_notify_hook(None);
        self.shared.driver.stop();
        self.shared.engine.shutdown();
        // After the engine: a post waiting on a full queue ends when the engine does.
        self.shared.poster.stop();
    }
}

impl Shared {
    /// Decode side: a chunk notification from the engine.
    fn on_notification(&self, n: &Notification) -> bool {
        let (slot, seq, last) = decode_chunk_tag(n.tag);
        let now = std::time::Instant::now();
        let mut core = self.driver.core.lock();
        let room = core
            .ep
            .decode()
            .on_chunk(slot, seq, last, (n.engine_id, n.epoch), n.link);
        let Some(room) = room else {
            tracing::debug!(slot, seq, "notification for no live room");
            return false;
        };
        if let Some(c) = core.cell(room) {
            c.chunks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            c.first.get_or_init(|| now);
        }
        let quieted = self.chunk_counted(&mut core, room, now);
        // A chunk to verify (integrity digests) is the driver's work.
        let verify = core.ep.has_actions();
        drop(core);
        if quieted || verify {
            self.driver.wake();
        }
        true
    }

    /// Decode side, after a chunk of `room` counted (notified, or verified against its
    /// digest): when that made every byte of the room land (Success not yet published: a
    /// repeated notification of a finished room flushes nothing), the bytes are made visible
    /// to the GPU first; then the room's state is published. Returns whether a room became
    /// quiet.
    pub(crate) fn chunk_counted(
        &self,
        core: &mut super::driver::Core,
        room: u64,
        now: std::time::Instant,
    ) -> bool {
        let newly_done = core.ep.state(room) == Some(super::KvPoll::Success)
            && core
                .cell(room)
                .is_some_and(|c| c.state() != super::KvPoll::Success);
        if newly_done && let Err(e) = self.engine.flush_gpu_writes() {
            core.ep.decode().not_visible(
                room,
                format!("the bytes landed but could not be made visible to the GPU: {e}"),
            );
        }
        let quieted = core.publish();
        if let Some(c) = core.cell(room)
            && c.state() == super::KvPoll::Success
        {
            c.done.get_or_init(|| now);
        }
        quieted
    }
}

/// Prefill side: connects the engine to the decode engine `engine` at `addr`, presenting the
/// `link` token its KV channel handed us, and maps the buffers of its `layout` (on a
/// connector thread).
pub(crate) fn connect_decode(
    m: &Shared,
    addr: SocketAddr,
    engine: (u64, u64),
    layout: &KvLayout,
    link: u64,
) -> Result<Arc<DecodePeer>> {
    m.layout.check_pairs_with(layout)?;
    let peer = m.engine.connect_linked(addr, link)?;
    let info = m.engine.peer_info(peer)?;
    if (info.engine_id, info.epoch) != engine {
        let _ = m.engine.disconnect(peer);
        return Err(Error::Handshake {
            peer: addr.to_string(),
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
    let mapped = map(&layout.buffers).and_then(|buffers| Ok((buffers, map(&layout.aux)?)));
    match mapped {
        Ok((buffers, aux)) => Ok(Arc::new(DecodePeer { peer, buffers, aux })),
        Err(e) => {
            let _ = m.engine.disconnect(peer);
            Err(e)
        }
    }
}
