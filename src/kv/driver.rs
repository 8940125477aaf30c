//! The KV manager's driver: one thread that carries its endpoint's messages over the control
//! channels, fires its timers and runs its actions. Connecting happens on a small pool of
//! connector threads, so nothing a scheduler calls waits for the network.
//!
//! Rooms and the driver share the endpoint behind one mutex, held only for the endpoint's pure
//! work; a room's state is also published in an atomic [`Cell`] that `poll` reads.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::{Condvar, Mutex, MutexGuard};

use super::KvPoll;
use super::connector::Connector;
use super::endpoint::{
    ConnId, DecodeAction, DecodeEndpoint, Polled, PrefillAction, PrefillEndpoint, Transmit,
};
use super::failure::{Failure, FailureKind};
use super::manager::{DecodePeer, Shared, connect_decode};
use super::proto::KvMessage;
use super::wires::Wires;
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::metrics::RoomCounters;

/// The endpoint of one role.
#[derive(Debug)]
pub(crate) enum Endpoint {
    /// A decode manager's.
    Decode(DecodeEndpoint),
    /// A prefill manager's.
    Prefill(PrefillEndpoint),
}

impl Endpoint {
    fn handle(&mut self, conn: ConnId, msg: KvMessage, now: Instant) {
        match self {
            Endpoint::Decode(e) => e.handle(conn, msg, now),
            Endpoint::Prefill(e) => e.handle(conn, msg, now),
        }
    }

    fn closed(&mut self, conn: ConnId, why: &str, now: Instant) {
        match self {
            Endpoint::Decode(e) => e.closed(conn, why, now),
            Endpoint::Prefill(e) => e.closed(conn, why, now),
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Endpoint::Decode(e) => e.handle_timeout(now),
            Endpoint::Prefill(e) => e.handle_timeout(now),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Endpoint::Decode(e) => e.poll_timeout(),
            Endpoint::Prefill(e) => e.poll_timeout(),
        }
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        match self {
            Endpoint::Decode(e) => e.poll_transmit(),
            Endpoint::Prefill(e) => e.poll_transmit(),
        }
    }

    pub(crate) fn has_actions(&self) -> bool {
        match self {
            Endpoint::Decode(e) => e.has_actions(),
            Endpoint::Prefill(e) => e.has_actions(),
        }
    }

    fn shutdown(&mut self, now: Instant) {
        match self {
            Endpoint::Decode(e) => e.shutdown(now),
            Endpoint::Prefill(e) => e.shutdown(now),
        }
    }

    /// The room's state.
    pub(crate) fn state(&self, room: u64) -> Option<KvPoll> {
        match self {
            Endpoint::Decode(e) => e.state(room),
            Endpoint::Prefill(e) => e.state(room),
        }
    }

    /// Why the room failed.
    pub(crate) fn failure(&self, room: u64) -> Option<&Failure> {
        match self {
            Endpoint::Decode(e) => e.failure(room),
            Endpoint::Prefill(e) => e.failure(room),
        }
    }

    /// The decode endpoint (rooms of a decode manager only).
    pub(crate) fn decode(&mut self) -> &mut DecodeEndpoint {
        match self {
            Endpoint::Decode(e) => e,
            Endpoint::Prefill(_) => unreachable!("a receiver lives in a decode manager"),
        }
    }

    /// The prefill endpoint (rooms of a prefill manager only).
    pub(crate) fn prefill(&mut self) -> &mut PrefillEndpoint {
        match self {
            Endpoint::Prefill(e) => e,
            Endpoint::Decode(_) => unreachable!("a sender lives in a prefill manager"),
        }
    }
}

/// What `poll` reads without the lock, and what aborts wait on.
#[derive(Debug)]
pub(crate) struct Cell {
    /// The room's [`KvPoll`] value.
    pub(crate) state: AtomicI32,
    /// Decode: no write of the room can land any more.
    pub(crate) quiet: AtomicBool,
    /// Decode: first chunk notified, and the room complete.
    pub(crate) first: OnceLock<Instant>,
    pub(crate) done: OnceLock<Instant>,
    /// Decode: chunks notified.
    pub(crate) chunks: AtomicU64,
    /// When the room was created.
    created: Instant,
    /// Bytes of the room: prefill, posted so far; decode, expected (set at init).
    pub(crate) bytes: AtomicU64,
    /// Prefill: its first write posted.
    pub(crate) first_post: OnceLock<Instant>,
}

impl Cell {
    fn new() -> Arc<Cell> {
        Arc::new(Cell {
            state: AtomicI32::new(KvPoll::Bootstrapping as i32),
            quiet: AtomicBool::new(true),
            first: OnceLock::new(),
            done: OnceLock::new(),
            chunks: AtomicU64::new(0),
            created: Instant::now(),
            bytes: AtomicU64::new(0),
            first_post: OnceLock::new(),
        })
    }

    /// The published state.
    pub(crate) fn state(&self) -> KvPoll {
        KvPoll::from_i32(self.state.load(Ordering::Acquire)).unwrap_or(KvPoll::Failed)
    }
}

/// The endpoint and what the manager keeps next to it, under one lock.
#[derive(Debug)]
pub(crate) struct Core {
    /// The protocol.
    pub(crate) ep: Endpoint,
    /// The engine's room metrics.
    counters: Arc<RoomCounters>,
    cells: HashMap<u64, Arc<Cell>>,
    /// Prefill: each channel's data path, once connected.
    pub(crate) data: HashMap<ConnId, Arc<DecodePeer>>,
    /// Prefill: every chunk batch of each room, for abort acknowledgements and aborts.
    pub(crate) batches: HashMap<u64, Vec<Arc<Batch>>>,
}

impl Core {
    /// A cell for a room just created.
    pub(crate) fn add_cell(&mut self, room: u64) -> Arc<Cell> {
        let c = Cell::new();
        self.cells.insert(room, c.clone());
        self.counters.started();
        c
    }

    /// A room's cell.
    pub(crate) fn cell(&self, room: u64) -> Option<&Arc<Cell>> {
        self.cells.get(&room)
    }

    /// Forgets a room's cell and batches.
    pub(crate) fn forget(&mut self, room: u64) {
        self.cells.remove(&room);
        self.batches.remove(&room);
    }

    /// Counts a room's move from `was` to `now` in the engine's metrics.
    fn count(&self, cell: &Cell, was: KvPoll, now: KvPoll, kind: Option<FailureKind>) {
        let c = &self.counters;
        let at = Instant::now();
        if was == KvPoll::Bootstrapping
            && matches!(
                now,
                KvPoll::WaitingForInput | KvPoll::Transferring | KvPoll::Success
            )
        {
            c.bootstrapped(at - cell.created);
        }
        if was.is_final() || !now.is_final() {
            return;
        }
        if now == KvPoll::Success {
            // Decode: from the first chunk notified; prefill: from the first write posted.
            let first = cell.first.get().or(cell.first_post.get()).copied();
            c.succeeded(cell.bytes.load(Ordering::Relaxed), first.map(|t| at - t));
        } else {
            c.failed(kind.unwrap_or(FailureKind::Transport));
        }
    }

    /// Copies changed rooms' states into their cells. Returns whether a room turned quiet.
    pub(crate) fn publish(&mut self) -> bool {
        let (changed, decode) = match &mut self.ep {
            Endpoint::Decode(e) => (e.poll_changed(), true),
            Endpoint::Prefill(e) => (e.poll_changed(), false),
        };
        let mut quieted = false;
        for room in changed {
            let Some(cell) = self.cells.get(&room) else {
                continue;
            };
            if let Some(s) = self.ep.state(room) {
                let was = KvPoll::from_i32(cell.state.swap(s as i32, Ordering::AcqRel))
                    .unwrap_or(KvPoll::Failed);
                self.count(cell, was, s, self.ep.failure(room).map(|f| f.kind));
            }
            if let (true, Endpoint::Decode(e)) = (decode, &self.ep) {
                let q = e.quiet(room);
                if q && !cell.quiet.swap(q, Ordering::AcqRel) {
                    quieted = true;
                }
                cell.quiet.store(q, Ordering::Release);
            }
        }
        quieted
    }
}

/// Messages from connector threads and the engine's acceptor to the driver thread.
enum Inbound {
    Accepted {
        stream: TcpStream,
        engine: (u64, u64),
        from: SocketAddr,
    },
    ConnectFailed {
        conn: ConnId,
        why: String,
    },
    /// A caller's inline write failed.
    Lost {
        conn: ConnId,
        why: String,
    },
    DataReady {
        conn: ConnId,
        result: std::result::Result<Arc<DecodePeer>, (FailureKind, String)>,
    },
}

/// The driver's shared half: the core, the inbox and the wake-up.
pub(crate) struct Driver {
    /// The endpoint and cells.
    pub(crate) core: Mutex<Core>,
    quiet_lock: Mutex<()>,
    quiet_cv: Condvar,
    kick: EventFd,
    /// A wake-up is pending: callers need not write the eventfd again.
    kicked: AtomicBool,
    inbox: Mutex<Vec<Inbound>>,
    stop: AtomicBool,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
    connector: Connector,
    wires: Wires,
    /// When the driver thread wakes next by itself (`None`: only when kicked).
    sleep_until: Mutex<Option<Instant>>,
    /// Refused peer input, for the log.
    pub(crate) refusals: crate::refusals::Refusals,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

const KICK: u64 = u64::MAX;

impl Driver {
    /// A driver for `ep`; [`start`](Self::start) runs its thread.
    pub(crate) fn new(ep: Endpoint, counters: Arc<RoomCounters>) -> Result<Driver> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| Error::io("epoll_create1", e.into()))?;
        let kick = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::io("eventfd", e.into()))?;
        epoll
            .add(&kick, EpollEvent::new(EpollFlags::EPOLLIN, KICK))
            .map_err(|e| Error::io("epoll_ctl", e.into()))?;
        Ok(Driver {
            core: Mutex::new(Core {
                ep,
                counters,
                cells: HashMap::new(),
                data: HashMap::new(),
                batches: HashMap::new(),
            }),
            quiet_lock: Mutex::new(()),
            quiet_cv: Condvar::new(),
            kick,
            kicked: AtomicBool::new(false),
            inbox: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            connector: Connector::new(),
            wires: Wires::new(epoll),
            sleep_until: Mutex::new(None),
            refusals: Default::default(),
        })
    }

    /// Starts the driver thread of manager `m`.
    pub(crate) fn start(m: &Arc<Shared>) -> Result<()> {
        let lp = Loop {
            m: m.clone(),
            next_conn: 1 << 32,
        };
        let t = thread::Builder::new()
            .name("kvt-kv".into())
            .spawn(move || lp.run())
            .map_err(|e| Error::io("spawn", e))?;
        *m.driver.thread.lock() = Some(t);
        Ok(())
    }

    /// Wakes the driver thread: the endpoint may have messages or actions for it.
    pub(crate) fn wake(&self) {
        if !self.kicked.swap(true, Ordering::AcqRel) {
            let _ = self.kick.write(1);
        }
    }

    /// After a room call changed the endpoint: publishes changed rooms, queues the messages
    /// it produced and, with the lock released, writes them inline (what the sockets take
    /// now). Wakes the driver only when it has something to do: actions, a write to finish,
    /// or a timer earlier than it sleeps.
    pub(crate) fn after(&self, mut core: MutexGuard<'_, Core>) {
        let quieted = core.publish();
        let touched = self
            .wires
            .queue(std::iter::from_fn(|| core.ep.poll_transmit()));
        let earlier = match (core.ep.poll_timeout(), *self.sleep_until.lock()) {
            (Some(t), Some(sleep)) => t < sleep,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let actions = core.ep.has_actions();
        drop(core);
        if quieted {
            self.notify_quiet();
        }
        let failed = self.wires.flush(touched);
        let lost = !failed.is_empty();
        if lost {
            let mut inbox = self.inbox.lock();
            inbox.extend(
                failed
                    .into_iter()
                    .map(|(conn, why)| Inbound::Lost { conn, why }),
            );
        }
        if earlier || actions || lost {
            self.wake();
        }
    }

    fn notify_quiet(&self) {
        let _g = self.quiet_lock.lock();
        self.quiet_cv.notify_all();
    }

    /// Waits until `cell` is quiet, at most until `until`; true if it is.
    pub(crate) fn wait_quiet(&self, cell: &Cell, until: Instant) -> bool {
        let mut g = self.quiet_lock.lock();
        while !cell.quiet.load(Ordering::Acquire) {
            if self.quiet_cv.wait_until(&mut g, until).timed_out() {
                return cell.quiet.load(Ordering::Acquire);
            }
        }
        true
    }

    fn post(&self, msg: Inbound) {
        self.inbox.lock().push(msg);
        self.wake();
    }

    /// A decode manager's channel arrived at this (prefill) manager's engine.
    pub(crate) fn accepted(&self, stream: TcpStream, engine: (u64, u64), from: SocketAddr) {
        self.post(Inbound::Accepted {
            stream,
            engine,
            from,
        });
    }

    /// Fails every room, closes every channel and joins the thread (idempotent).
    pub(crate) fn stop(&self) {
        {
            let mut core = self.core.lock();
            core.ep.shutdown(Instant::now());
            if core.publish() {
                self.notify_quiet();
            }
            // The shutdown's own messages are not sent: the channels close below.
            while core.ep.poll_transmit().is_some() {}
        }
        self.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.thread.lock().take()
            && t.thread().id() != thread::current().id()
        {
            let _ = t.join();
        }
        self.notify_quiet();
    }
}

/// The driver thread's own state.
struct Loop {
    m: Arc<Shared>,
    next_conn: u64,
}

impl Loop {
    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); 64];
        let mut inputs: Vec<(ConnId, KvMessage)> = Vec::new();
        let mut lost: Vec<(ConnId, String)> = Vec::new();
        let mut shaken: Vec<(ConnId, (u64, u64))> = Vec::new();
        loop {
            let timeout = self.timeout(!lost.is_empty());
            let n = self
                .m
                .driver
                .wires
                .epoll
                .wait(&mut events, timeout)
                .unwrap_or(0);
            if self.m.driver.stop.load(Ordering::Acquire) {
                break;
            }
            for ev in &events[..n] {
                let token = ev.data();
                if token == KICK {
                    // Drained, then cleared, both before the turn reads the endpoint: a
                    // caller that changes it after the clear kicks again, and one between
                    // the two is seen by this turn. (Clearing first would let the read eat
                    // a later kick while the flag stays set: a lost wake-up.)
                    let _ = self.m.driver.kick.read();
                    self.m.driver.kicked.store(false, Ordering::Release);
                    continue;
                }
                let conn = ConnId(token);
                let flags = ev.events();
                let readable = flags.intersects(
                    EpollFlags::EPOLLIN
                        | EpollFlags::EPOLLHUP
                        | EpollFlags::EPOLLERR
                        | EpollFlags::EPOLLRDHUP,
                );
                let writable = flags.intersects(EpollFlags::EPOLLOUT);
                let wires = &self.m.driver.wires;
                match wires.ready(conn, readable, writable, &mut inputs) {
                    Ok(Some(hello)) => shaken.push((conn, (hello.engine_id, hello.epoch))),
                    Ok(None) => {}
                    Err(why) => lost.push((conn, why)),
                }
            }
            lost = self.turn(&mut inputs, &mut shaken, std::mem::take(&mut lost));
        }
        self.m.driver.wires.close_all();
    }

    /// How long to wait for sockets: until the endpoint's next timer (or 1 ms while aborts
    /// wait for writes to settle, or not at all when there is work left).
    fn timeout(&self, busy: bool) -> EpollTimeout {
        let d = &self.m.driver;
        let core = d.core.lock();
        let mut next = core.ep.poll_timeout();
        if let Endpoint::Prefill(p) = &core.ep
            && p.owes_acks()
        {
            let soon = Instant::now() + Duration::from_millis(1);
            next = Some(next.map_or(soon, |t| t.min(soon)));
        }
        *d.sleep_until.lock() = next;
        if busy {
            return EpollTimeout::ZERO;
        }
        match next {
            None => EpollTimeout::NONE,
            Some(t) => {
                let ms = t
                    .saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000);
                EpollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(EpollTimeout::NONE)
            }
        }
    }

    /// One turn: feed the endpoint, fire its timers, send what it says and carry out its
    /// actions. Returns channels whose write failed, for the next turn.
    fn turn(
        &mut self,
        inputs: &mut Vec<(ConnId, KvMessage)>,
        shaken: &mut Vec<(ConnId, (u64, u64))>,
        lost: Vec<(ConnId, String)>,
    ) -> Vec<(ConnId, String)> {
        let now = Instant::now();
        let m = self.m.clone();
        let d = &m.driver;
        let inbox = std::mem::take(&mut *d.inbox.lock());
        let mut actions = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        let failed = {
            let mut core = d.core.lock();
            for msg in inbox {
                self.take(&mut core, msg, now);
            }
            for (conn, engine) in shaken.drain(..) {
                // Unguessable and never 0 (0 is "no token").
                let link = rand::random::<u64>() | 1;
                core.ep.decode().connected(conn, engine, link, now);
            }
            for (conn, msg) in inputs.drain(..) {
                core.ep.handle(conn, msg, now);
            }
            for (conn, why) in lost {
                d.wires.close(conn);
                core.ep.closed(conn, &why, now);
            }
            core.ep.handle_timeout(now);
            settle(&mut core, now);
            match &mut core.ep {
                Endpoint::Decode(e) => {
                    while let Some(a) = e.poll_action() {
                        actions.push(Action::Decode(a));
                    }
                    refused.extend(std::iter::from_fn(|| e.poll_refusal()));
                }
                Endpoint::Prefill(e) => {
                    while let Some(a) = e.poll_action() {
                        actions.push(Action::Prefill(a));
                    }
                    refused.extend(std::iter::from_fn(|| e.poll_refusal()));
                }
            }
            // Queued under the lock, so messages leave in the endpoint's order even when a
            // caller sends some inline; written after it.
            let touched = d
                .wires
                .queue(std::iter::from_fn(|| core.ep.poll_transmit()));
            if core.publish() {
                d.notify_quiet();
            }
            touched
        };
        let failed = d.wires.flush(failed);
        for why in refused {
            d.refusals.refuse("KV input", &why);
        }
        for a in actions {
            self.act(a);
        }
        failed
    }

    fn take(&mut self, core: &mut Core, msg: Inbound, now: Instant) {
        let wires = &self.m.driver.wires;
        match msg {
            Inbound::Accepted {
                stream,
                engine,
                from,
            } => {
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                if wires.register(conn, stream) {
                    core.ep.prefill().accepted(conn, engine, from, now);
                }
            }
            Inbound::ConnectFailed { conn, why } | Inbound::Lost { conn, why } => {
                wires.close(conn);
                core.ep.closed(conn, &why, now);
            }
            Inbound::DataReady { conn, result } => {
                let r = match result {
                    Ok(peer) => {
                        core.data.insert(conn, peer);
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                core.ep.prefill().data_ready(conn, r, now);
            }
        }
    }

    fn act(&mut self, a: Action) {
        let m = &self.m;
        match a {
            Action::Decode(DecodeAction::Connect { conn, addr }) => {
                let hello = m.engine.kv_hello();
                if let Err(why) = m.driver.wires.connect(conn, addr, hello) {
                    m.driver.post(Inbound::ConnectFailed { conn, why });
                }
            }
            Action::Decode(DecodeAction::Close { conn })
            | Action::Prefill(PrefillAction::Close { conn }) => m.driver.wires.close(conn),
            Action::Decode(DecodeAction::Fence { slot, peer }) => {
                m.engine
                    .fences()
                    .fence((peer.0, peer.1, slot), Duration::ZERO);
            }
            Action::Decode(DecodeAction::StopInbound { peer }) => {
                m.engine.stop_inbound(peer.0, peer.1);
            }
            Action::Decode(DecodeAction::Verify {
                room,
                seq,
                last,
                pages,
                aux,
                digest,
            }) => {
                // Hashed without the lock: room calls and notifications go on meanwhile.
                let ranges = m.layout.digest_ranges(&pages, aux);
                let result = match m.engine.digest_local(&ranges) {
                    Ok(d) if d == digest => Ok(()),
                    Ok(d) => Err(format!(
                        "chunk {seq} ({} pages) differs from what the sender posted: digest \
                         {d:#018x} here, {digest:#018x} sent",
                        pages.len()
                    )),
                    Err(e) => Err(format!("chunk {seq} could not be checked: {e}")),
                };
                if let Err(why) = &result {
                    tracing::warn!(room, "integrity: {why}");
                }
                let now = Instant::now();
                let mut core = m.driver.core.lock();
                core.ep.decode().verified(room, seq, last, result, now);
                m.chunk_counted(&mut core, room, now);
                m.driver.after(core);
            }
            Action::Prefill(PrefillAction::ConnectData {
                conn,
                addr,
                engine,
                layout,
                link,
            }) => {
                let weak = Arc::downgrade(m);
                m.driver.connector.submit(Box::new(move || {
                    let Some(m) = weak.upgrade() else { return };
                    let result = connect_decode(&m, addr, engine, &layout, link).map_err(|e| {
                        let kind = match e {
                            Error::LayoutMismatch { .. } => FailureKind::LayoutMismatch,
                            _ => FailureKind::Transport,
                        };
                        let text = format!("cannot connect to the decode engine at {addr}: {e}");
                        (kind, text)
                    });
                    m.driver.post(Inbound::DataReady { conn, result });
                }));
            }
            Action::Prefill(PrefillAction::DisconnectData { conn }) => {
                let peer = m.driver.core.lock().data.remove(&conn);
                if let Some(p) = peer {
                    let _ = m.engine.disconnect(p.peer);
                }
            }
        }
    }
}

enum Action {
    Decode(DecodeAction),
    Prefill(PrefillAction),
}

/// Prefill: acknowledges receivers' aborts of rooms whose writes have all settled.
fn settle(core: &mut Core, now: Instant) {
    let Endpoint::Prefill(p) = &core.ep else {
        return;
    };
    let done: Vec<u64> = p
        .settle_watch()
        .into_iter()
        .filter(|r| {
            core.batches
                .get(r)
                .is_none_or(|b| b.iter().all(|b| b.remaining() == 0))
        })
        .collect();
    for room in done {
        core.ep.prefill().settled(room, now);
    }
}
