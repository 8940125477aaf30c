//! The KV manager's driver: one thread that carries its endpoint's messages over the control
//! channels, fires its timers and runs its actions. Connecting happens on a small pool of
//! connector threads, so nothing a scheduler calls waits for the network.
//!
//! Rooms and the driver share the endpoint behind one mutex, held only for the endpoint's pure
//! work; a room's state is also published in an atomic [`Cell`] that `poll` reads.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::{Condvar, Mutex};

use super::KvPoll;
use super::endpoint::{
    ConnId, DecodeAction, DecodeEndpoint, PrefillAction, PrefillEndpoint, Transmit,
};
use super::failure::{Failure, FailureKind};
use super::manager::{DecodePeer, Shared, connect_decode};
use super::proto::KvMessage;
use crate::batch::Batch;
use crate::error::{Error, Result};

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
}

impl Cell {
    fn new() -> Arc<Cell> {
        Arc::new(Cell {
            state: AtomicI32::new(KvPoll::Bootstrapping as i32),
            quiet: AtomicBool::new(true),
            first: OnceLock::new(),
            done: OnceLock::new(),
            chunks: AtomicU64::new(0),
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
    cells: HashMap<u64, Arc<Cell>>,
    /// Prefill: each channel's data path, once connected.
    pub(crate) data: HashMap<ConnId, Arc<DecodePeer>>,
    /// Prefill: every chunk batch of each room, for abort acknowledgements.
    pub(crate) batches: HashMap<u64, Vec<Arc<Batch>>>,
}

impl Core {
    /// A cell for a room just created.
    pub(crate) fn add_cell(&mut self, room: u64) -> Arc<Cell> {
        let c = Cell::new();
        self.cells.insert(room, c.clone());
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
                cell.state.store(s as i32, Ordering::Release);
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
    Connected {
        conn: ConnId,
        stream: TcpStream,
        engine: (u64, u64),
    },
    ConnectFailed {
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
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

const KICK: u64 = u64::MAX;
/// Most bytes read from one channel per wake-up, so one busy channel cannot starve the rest.
const READ_BUDGET: usize = 1 << 20;

impl Driver {
    /// A driver for `ep`; [`start`](Self::start) runs its thread.
    pub(crate) fn new(ep: Endpoint) -> Result<Driver> {
        Ok(Driver {
            core: Mutex::new(Core {
                ep,
                cells: HashMap::new(),
                data: HashMap::new(),
                batches: HashMap::new(),
            }),
            quiet_lock: Mutex::new(()),
            quiet_cv: Condvar::new(),
            kick: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| Error::io("eventfd", e.into()))?,
            kicked: AtomicBool::new(false),
            inbox: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            connector: Connector::new(),
        })
    }

    /// Starts the driver thread of manager `m`.
    pub(crate) fn start(m: &Arc<Shared>) -> Result<()> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| Error::io("epoll_create1", e.into()))?;
        epoll
            .add(&m.driver.kick, EpollEvent::new(EpollFlags::EPOLLIN, KICK))
            .map_err(|e| Error::io("epoll_ctl", e.into()))?;
        let shared = m.clone();
        let t = thread::Builder::new()
            .name("kvt-kv".into())
            .spawn(move || Loop::new(shared, epoll).run())
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

    /// Publishes changed rooms and wakes the driver (after a room call changed the endpoint).
    pub(crate) fn after(&self, core: &mut Core) {
        if core.publish() {
            self.notify_quiet();
        }
        self.wake();
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

/// One control channel's socket and buffers.
struct Sock {
    stream: TcpStream,
    rx: Vec<u8>,
    tx: Vec<u8>,
    sent: usize,
    writing: bool,
}

impl Sock {
    /// Reads what is there; complete messages go to `out`. `Err` ends the channel.
    fn read(
        &mut self,
        conn: ConnId,
        out: &mut Vec<(ConnId, KvMessage)>,
    ) -> std::result::Result<(), String> {
        let mut buf = [0u8; 64 << 10];
        let mut budget = READ_BUDGET;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Err("end of stream".into()),
                Ok(n) => {
                    self.rx.extend_from_slice(&buf[..n]);
                    budget = budget.saturating_sub(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
            self.parse(conn, out)?;
            if budget == 0 {
                break;
            }
        }
        self.parse(conn, out)
    }

    fn parse(
        &mut self,
        conn: ConnId,
        out: &mut Vec<(ConnId, KvMessage)>,
    ) -> std::result::Result<(), String> {
        let mut at = 0;
        while self.rx.len() - at >= 4 {
            let prefix = [
                self.rx[at],
                self.rx[at + 1],
                self.rx[at + 2],
                self.rx[at + 3],
            ];
            let len = KvMessage::decode_len(prefix).map_err(|e| e.to_string())?;
            if self.rx.len() - at - 4 < len {
                break;
            }
            let msg =
                KvMessage::decode(&self.rx[at + 4..at + 4 + len]).map_err(|e| e.to_string())?;
            out.push((conn, msg));
            at += 4 + len;
        }
        self.rx.drain(..at);
        Ok(())
    }

    /// Writes what the socket takes. `Ok(true)` when everything is out.
    fn flush(&mut self) -> std::result::Result<bool, String> {
        while self.sent < self.tx.len() {
            match self.stream.write(&self.tx[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        self.tx.clear();
        self.sent = 0;
        Ok(true)
    }
}

/// The driver thread's own state.
struct Loop {
    m: Arc<Shared>,
    epoll: Epoll,
    socks: HashMap<ConnId, Sock>,
    next_conn: u64,
    /// Channels that failed outside the endpoint's sight (a write error), to tell it next.
    lost: Vec<(ConnId, String)>,
}

impl Loop {
    fn new(m: Arc<Shared>, epoll: Epoll) -> Loop {
        Loop {
            m,
            epoll,
            socks: HashMap::new(),
            next_conn: 1 << 32,
            lost: Vec::new(),
        }
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); 64];
        let mut inputs: Vec<(ConnId, KvMessage)> = Vec::new();
        loop {
            let timeout = self.timeout();
            let n = self.epoll.wait(&mut events, timeout).unwrap_or(0);
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
                let Some(s) = self.socks.get_mut(&conn) else {
                    continue;
                };
                let flags = ev.events();
                if flags.intersects(EpollFlags::EPOLLOUT) {
                    match s.flush() {
                        Ok(true) => self.interest(conn, false),
                        Ok(false) => {}
                        Err(why) => self.lost.push((conn, why)),
                    }
                }
                let s = self.socks.get_mut(&conn).expect("present");
                if flags.intersects(
                    EpollFlags::EPOLLIN
                        | EpollFlags::EPOLLHUP
                        | EpollFlags::EPOLLERR
                        | EpollFlags::EPOLLRDHUP,
                ) && let Err(why) = s.read(conn, &mut inputs)
                {
                    self.lost.push((conn, why));
                }
            }
            self.turn(&mut inputs);
        }
        for (_, s) in self.socks.drain() {
            let _ = s.stream.shutdown(Shutdown::Both);
        }
    }

    fn timeout(&self) -> EpollTimeout {
        if !self.lost.is_empty() {
            return EpollTimeout::ZERO;
        }
        let core = self.m.driver.core.lock();
        let mut next = core.ep.poll_timeout();
        if let Endpoint::Prefill(p) = &core.ep
            && !p.settle_watch().is_empty()
        {
            let soon = Instant::now() + Duration::from_millis(1);
            next = Some(next.map_or(soon, |t| t.min(soon)));
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

    /// One turn: feed the endpoint, fire its timers, then carry out what it asks for.
    fn turn(&mut self, inputs: &mut Vec<(ConnId, KvMessage)>) {
        let now = Instant::now();
        let inbox = std::mem::take(&mut *self.m.driver.inbox.lock());
        let mut actions = Vec::new();
        let mut transmits = Vec::new();
        {
            let m = self.m.clone();
            let mut core = m.driver.core.lock();
            for msg in inbox {
                self.take(&mut core, msg, now);
            }
            for (conn, msg) in inputs.drain(..) {
                core.ep.handle(conn, msg, now);
            }
            for (conn, why) in std::mem::take(&mut self.lost) {
                self.drop_sock(conn);
                core.ep.closed(conn, &why, now);
            }
            core.ep.handle_timeout(now);
            settle(&mut core, now);
            match &mut core.ep {
                Endpoint::Decode(e) => {
                    while let Some(a) = e.poll_action() {
                        actions.push(Action::Decode(a));
                    }
                }
                Endpoint::Prefill(e) => {
                    while let Some(a) = e.poll_action() {
                        actions.push(Action::Prefill(a));
                    }
                }
            }
            while let Some(t) = core.ep.poll_transmit() {
                transmits.push(t);
            }
            if core.publish() {
                m.driver.notify_quiet();
            }
        }
        for a in actions {
            self.act(a);
        }
        let mut touched = Vec::new();
        for t in transmits {
            if let Some(s) = self.socks.get_mut(&t.conn) {
                if !touched.contains(&t.conn) {
                    touched.push(t.conn);
                }
                s.tx.extend_from_slice(&t.msg.encode());
            }
        }
        for conn in touched {
            self.flush(conn);
        }
    }

    fn take(&mut self, core: &mut Core, msg: Inbound, now: Instant) {
        match msg {
            Inbound::Accepted {
                stream,
                engine,
                from,
            } => {
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                if self.register(conn, stream) {
                    core.ep.prefill().accepted(conn, engine, from, now);
                }
            }
            Inbound::Connected {
                conn,
                stream,
                engine,
            } => {
                if self.register(conn, stream) {
                    core.ep.decode().connected(conn, engine, now);
                } else {
                    core.ep.closed(conn, "cannot watch the socket", now);
                }
            }
            Inbound::ConnectFailed { conn, why } => core.ep.closed(conn, &why, now),
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

    fn register(&mut self, conn: ConnId, stream: TcpStream) -> bool {
        let ok = stream.set_nonblocking(true).is_ok()
            && stream.set_nodelay(true).is_ok()
            && self
                .epoll
                .add(
                    stream.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, conn.0),
                )
                .is_ok();
        if ok {
            self.socks.insert(
                conn,
                Sock {
                    stream,
                    rx: Vec::new(),
                    tx: Vec::new(),
                    sent: 0,
                    writing: false,
                },
            );
        }
        ok
    }

    fn interest(&mut self, conn: ConnId, write: bool) {
        let Some(s) = self.socks.get_mut(&conn) else {
            return;
        };
        if s.writing == write {
            return;
        }
        s.writing = write;
        let mut flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        if write {
            flags |= EpollFlags::EPOLLOUT;
        }
        let mut ev = EpollEvent::new(flags, conn.0);
        let _ = self.epoll.modify(s.stream.as_fd(), &mut ev);
    }

    fn drop_sock(&mut self, conn: ConnId) {
        if let Some(s) = self.socks.remove(&conn) {
            let _ = self.epoll.delete(s.stream.as_fd());
            let _ = s.stream.shutdown(Shutdown::Both);
        }
    }

    /// Writes what a channel has queued; the rest waits for EPOLLOUT.
    fn flush(&mut self, conn: ConnId) {
        let Some(s) = self.socks.get_mut(&conn) else {
            return;
        };
        if s.writing {
            return; // EPOLLOUT will come
        }
        match s.flush() {
            Ok(true) => {}
            Ok(false) => self.interest(conn, true),
            Err(why) => self.lost.push((conn, why)),
        }
    }

    fn act(&mut self, a: Action) {
        let m = &self.m;
        match a {
            Action::Decode(DecodeAction::Connect { conn, addr }) => {
                let weak = Arc::downgrade(m);
                m.driver
                    .connector
                    .submit(Box::new(move || connect_channel(weak, conn, addr)));
            }
            Action::Decode(DecodeAction::Close { conn })
            | Action::Prefill(PrefillAction::Close { conn }) => self.drop_sock(conn),
            Action::Decode(DecodeAction::Fence { slot, peer }) => {
                m.engine
                    .fences()
                    .fence((peer.0, peer.1, slot), Duration::ZERO);
            }
            Action::Decode(DecodeAction::StopInbound { peer }) => {
                m.engine.stop_inbound(peer.0, peer.1);
            }
            Action::Prefill(PrefillAction::ConnectData {
                conn,
                addr,
                engine,
                layout,
            }) => {
                let weak = Arc::downgrade(m);
                m.driver.connector.submit(Box::new(move || {
                    let Some(m) = weak.upgrade() else { return };
                    let result = connect_decode(&m, addr, engine, &layout).map_err(|e| {
                        let kind = match e {
                            Error::LayoutMismatch { .. } => FailureKind::LayoutMismatch,
                            _ => FailureKind::Transport,
                        };
                        (
                            kind,
                            format!("cannot connect to the decode engine at {addr}: {e}"),
                        )
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

/// Decode: opens the KV channel `conn` to the prefill manager at `addr` (a connector job).
fn connect_channel(weak: Weak<Shared>, conn: ConnId, addr: SocketAddr) {
    let Some(m) = weak.upgrade() else { return };
    let msg = match m.engine.open_kv_channel(addr, m.cfg.connect_timeout) {
        Ok((hello, stream)) => Inbound::Connected {
            conn,
            stream,
            engine: (hello.engine_id, hello.epoch),
        },
        Err(e) => Inbound::ConnectFailed {
            conn,
            why: e.to_string(),
        },
    };
    m.driver.post(msg);
}

type Job = Box<dyn FnOnce() + Send>;

/// Up to [`MAX_CONNECTORS`] threads that run blocking connects; idle ones leave after a second.
struct Connector {
    tx: Sender<Job>,
    rx: Receiver<Job>,
    state: Arc<Mutex<(usize, usize)>>,
}

/// Most connects in progress at once.
const MAX_CONNECTORS: usize = 8;

impl Connector {
    fn new() -> Connector {
        let (tx, rx) = crossbeam_channel::unbounded();
        Connector {
            tx,
            rx,
            state: Arc::new(Mutex::new((0, 0))),
        }
    }

    fn submit(&self, job: Job) {
        let mut st = self.state.lock();
        let _ = self.tx.send(job);
        let (workers, idle) = *st;
        if idle > 0 || workers >= MAX_CONNECTORS {
            return;
        }
        st.0 += 1;
        let (rx, state) = (self.rx.clone(), self.state.clone());
        let spawned = thread::Builder::new()
            .name("kvt-kv-connect".into())
            .spawn(move || connector(rx, state));
        if spawned.is_err() {
            st.0 -= 1;
        }
    }
}

fn connector(rx: Receiver<Job>, state: Arc<Mutex<(usize, usize)>>) {
    loop {
        state.lock().1 += 1;
        let r = rx.recv_timeout(Duration::from_secs(1));
        {
            let mut st = state.lock();
            st.1 -= 1;
            if matches!(
                r,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected)
            ) && rx.is_empty()
            {
                st.0 -= 1;
                return;
            }
        }
        if let Ok(job) = r {
            job();
        }
    }
}
