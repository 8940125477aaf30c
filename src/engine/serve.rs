//! The serving side: one thread (`kvt-accept`) accepts connections and runs every handshake
//! as a non-blocking state machine ([`Responder`]) on one epoll set, so a connection in its
//! handshake costs a socket and a few hundred bytes, never a thread. A connection that
//! completes it is handed on: data connections to the poller, KV channels to the KV manager,
//! probes are answered and closed.
//!
//! Bounds, whatever peers do: [`MAX_HANDSHAKES`] connections in their handshake (beyond it
//! the oldest is closed to admit the newest, so a flood of half-open connections cannot lock
//! out a real peer, whose handshake takes a round trip), [`MAX_HANDSHAKES_PER_IP`] from one
//! address, the handshake deadline (`connect_timeout`), message sizes (a peer that has not
//! proven the secret can send nothing longer than 512 bytes), [`HELLO_BUDGET`] bytes of
//! hellos read at once, and [`MAX_CONNS_PER_PEER`] served connections per peer engine.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::IpAddr;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::*;
use crate::refusals::Refusals;
use crate::wire::{
    self, HandshakeError, MsgKind, PREAMBLE_LEN, RefuseCode, Responder, Step, refuse,
};

/// Most accepted connections in their handshake at once; a new one beyond it closes the
/// oldest.
pub(crate) const MAX_HANDSHAKES: usize = 4096;
/// Most connections in their handshake from one IP address; a new one beyond it closes that
/// address's oldest.
pub(crate) const MAX_HANDSHAKES_PER_IP: usize = 1024;
/// Most served connections (data and control) from one peer engine.
pub(crate) const MAX_CONNS_PER_PEER: usize = 256;
/// Most bytes of hellos being read at once, over every handshake (a hello may be 4 MiB).
pub(crate) const HELLO_BUDGET: usize = 64 << 20;
/// Hellos up to this size are not counted against the budget.
const SMALL_HELLO: usize = 64 << 10;
/// Epoll token of the listener.
const LISTENER: u64 = u64::MAX;

/// The data connections this engine serves (the poller reads them).
#[derive(Default)]
pub(super) struct Served {
    conns: Mutex<Vec<Arc<ServedConn>>>,
    /// Refused connections and requests, for the log.
    pub(super) refusals: Arc<Refusals>,
}

impl Served {
    /// Tracks a data connection now served by the poller.
    fn add_conn(&self, c: Arc<ServedConn>) {
        let mut conns = self.conns.lock();
        conns.retain(|c| !c.is_dead());
        conns.push(c);
    }

    /// Live connections from the engine `engine_id`.
    fn conns_of(&self, engine_id: u64) -> usize {
        self.conns
            .lock()
            .iter()
            .filter(|c| !c.is_dead() && c.peer_engine() == engine_id)
            .count()
    }

    /// Closes every served connection and waits until no thread touches it any more (the
    /// accept thread is joined before this, so no connection is added meanwhile).
    pub(super) fn stop_and_join(&self) {
        let conns = std::mem::take(&mut *self.conns.lock());
        conns.iter().for_each(|c| c.close());
        conns.iter().for_each(|c| c.join());
    }
}

/// One accepted connection in its handshake.
struct Pending {
    s: TcpStream,
    from: SocketAddr,
    hs: Responder,
    rx: Vec<u8>,
    tx: Vec<u8>,
    sent: usize,
    deadline: Instant,
    /// Hello bytes reserved from the budget.
    reserved: usize,
    /// Set once the handshake is over: what to do when `tx` is out.
    then: Option<Then>,
    /// The epoll events watched.
    interest: EpollFlags,
}

enum Then {
    /// Hand the connection on.
    Serve(Box<Hello>, Option<Box<dyn Send>>),
    /// Close it (a refusal or a probe's answer was the last word).
    Close,
}

/// Every connection in its handshake, by accept order (the key is also the epoll token).
struct Handshakes {
    epoll: Epoll,
    pending: BTreeMap<u64, Pending>,
    per_ip: HashMap<IpAddr, usize>,
    next: u64,
    hello_bytes: usize,
}

impl Handshakes {
    fn remove(&mut self, id: u64) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        let _ = self.epoll.delete(p.s.as_fd());
        if let Some(n) = self.per_ip.get_mut(&p.from.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&p.from.ip());
            }
        }
        self.hello_bytes -= p.reserved;
        Some(p)
    }

    fn deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }
}

impl Engine {
    pub(super) fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let epoll = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("cannot accept connections: epoll_create: {e}");
                return;
            }
        };
        if let Err(e) = epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER)) {
            tracing::error!("cannot accept connections: epoll_ctl: {e}");
            return;
        }
        let mut hs = Handshakes {
            epoll,
            pending: BTreeMap::new(),
            per_ip: HashMap::new(),
            next: 0,
            hello_bytes: 0,
        };
        let mut events = vec![EpollEvent::empty(); 256];
        while !self.shutdown.load(Ordering::Acquire) {
            let now = Instant::now();
            let wait = hs
                .deadline()
                .map_or(Duration::from_millis(100), |d| {
                    d.saturating_duration_since(now) + Duration::from_millis(1)
                })
                .min(Duration::from_millis(100));
            let timeout =
                EpollTimeout::try_from(wait.as_millis() as i32).unwrap_or(EpollTimeout::NONE);
            let n = match hs.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    tracing::error!("accept loop: epoll_wait: {e}");
                    thread::sleep(Duration::from_millis(10));
                    0
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    LISTENER => self.accept_all(&listener, &mut hs),
                    id => self.handshake_ready(&mut hs, id, ev.events()),
                }
            }
            self.expire(&mut hs, Instant::now());
        }
        // Shutdown: the connections still in their handshake close with `hs`.
    }

    fn accept_all(&self, listener: &TcpListener, hs: &mut Handshakes) {
        loop {
            let (s, from) = match listener.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) if self.shutdown.load(Ordering::Acquire) => return,
                Err(e) => {
                    // Out of fds, most likely: leave the rest in the backlog a while.
                    self.served
                        .refusals
                        .refuse("a connection", &format_args!("accept: {e}"));
                    return;
                }
            };
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            self.admit(hs, s, from);
        }
    }

    fn admit(&self, hs: &mut Handshakes, s: TcpStream, from: SocketAddr) {
        // Room for the newcomer: evict the oldest handshake of its address, or of anyone.
        if hs.per_ip.get(&from.ip()).copied().unwrap_or(0) >= MAX_HANDSHAKES_PER_IP {
            let oldest = hs
                .pending
                .iter()
                .find(|(_, p)| p.from.ip() == from.ip())
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                self.evict(
                    hs,
                    id,
                    "its address has too many connections in their handshake",
                );
            }
        }
        if hs.pending.len() >= MAX_HANDSHAKES
            && let Some(&id) = hs.pending.keys().next()
        {
            self.evict(hs, id, "too many connections are in their handshake");
        }
        let setup = s.set_nonblocking(true).and_then(|()| s.set_nodelay(true));
        if let Err(e) = setup {
            self.served.refusals.refuse(
                "a connection",
                &format_args!("from {from}: setsockopt: {e}"),
            );
            return;
        }
        let id = hs.next;
        hs.next += 1;
        if let Err(e) = hs.epoll.add(
            &s,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, id),
        ) {
            self.served
                .refusals
                .refuse("a connection", &format_args!("from {from}: epoll_ctl: {e}"));
            return;
        }
        *hs.per_ip.entry(from.ip()).or_default() += 1;
        hs.pending.insert(
            id,
            Pending {
                s,
                from,
                hs: Responder::new(self.config.secret.clone(), rand::random()),
                rx: Vec::new(),
                tx: Vec::new(),
                sent: 0,
                deadline: Instant::now() + self.config.connect_timeout,
                reserved: 0,
                then: None,
                interest: EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
            },
        );
    }

    fn evict(&self, hs: &mut Handshakes, id: u64, why: &str) {
        if let Some(p) = hs.remove(id) {
            self.served.refusals.refuse(
                "a connection",
                &format_args!("from {}: closed: {why}", p.from),
            );
        }
    }

    fn expire(&self, hs: &mut Handshakes, now: Instant) {
        let late: Vec<u64> = hs
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let ms = self.config.connect_timeout.as_millis();
            self.evict(hs, id, &format!("no complete handshake within {ms} ms"));
        }
    }

    /// Reads, runs and writes the handshake of connection `id` as far as its socket allows.
    fn handshake_ready(&self, hs: &mut Handshakes, id: u64, events: EpollFlags) {
        let outcome = match hs.pending.get_mut(&id) {
            Some(p) => self.step(p, events, &mut hs.hello_bytes),
            None => return,
        };
        match outcome {
            Ok(false) => {
                let Some(p) = hs.pending.get_mut(&id) else {
                    return;
                };
                // Once the handshake is over only our last words are written; nothing more is
                // read (so a peer that keeps sending cannot keep this thread busy).
                let want = match (&p.then, p.tx.is_empty()) {
                    (Some(_), _) => EpollFlags::EPOLLOUT,
                    (None, true) => EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
                    (None, false) => {
                        EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLOUT
                    }
                };
                if want != p.interest {
                    p.interest = want;
                    let _ = hs.epoll.modify(&p.s, &mut EpollEvent::new(want, id));
                }
            }
            Ok(true) => {
                let p = hs.remove(id).expect("present");
                if let Some(Then::Serve(hello, keep)) = p.then {
                    self.serve(p.s, p.from, *hello, keep);
                }
            }
            Err(why) => {
                let p = hs.remove(id).expect("present");
                self.served
                    .refusals
                    .refuse("a connection", &format_args!("from {}: {why}", p.from));
            }
        }
    }

    /// `Ok(true)`: finished (serve or close, as `then` says); `Ok(false)`: wait for the
    /// socket; `Err`: close now, for that reason.
    fn step(
        &self,
        p: &mut Pending,
        events: EpollFlags,
        hello_bytes: &mut usize,
    ) -> std::result::Result<bool, String> {
        if p.then.is_none() {
            self.read(p, hello_bytes)?;
        }
        // Write what is queued.
        while p.sent < p.tx.len() {
            match p.s.write(&p.tx[p.sent..]) {
                Ok(n) => p.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        p.tx.clear();
        p.sent = 0;
        if p.then.is_some() {
            return Ok(true);
        }
        if events.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            return Err("the peer closed the connection in its handshake".into());
        }
        Ok(false)
    }

    /// Runs every whole message buffered, and reads what the handshake may take now, until
    /// the socket is drained or the handshake is over.
    fn read(&self, p: &mut Pending, hello_bytes: &mut usize) -> std::result::Result<(), String> {
        let mut buf = [0u8; 16 << 10];
        loop {
            self.run(p, hello_bytes)?;
            if p.then.is_some() {
                return Ok(());
            }
            // Until the peer has proven itself only small messages are read (its Proof and the
            // start of the hello behind it); then up to one whole hello.
            let limit = if p.hs.trusted() {
                PREAMBLE_LEN + wire::MAX_HELLO_BODY
            } else {
                2 * (PREAMBLE_LEN + wire::MAX_SMALL_BODY)
            };
            let room = limit.saturating_sub(p.rx.len()).min(buf.len());
            if room == 0 {
                return Err("a handshake message larger than allowed here".into());
            }
            match p.s.read(&mut buf[..room]) {
                Ok(0) => return Err("the peer closed the connection in its handshake".into()),
                Ok(n) => p.rx.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Runs every whole message in `rx` through the responder.
    fn run(&self, p: &mut Pending, hello_bytes: &mut usize) -> std::result::Result<(), String> {
        loop {
            let max = if p.hs.trusted() {
                wire::MAX_HELLO_BODY
            } else {
                wire::MAX_SMALL_BODY
            };
            let next = match wire::next_message(&p.rx, p.hs.expects(), max) {
                Ok(n) => n,
                Err(e) => {
                    let msg = e.to_string();
                    self.finish_refused(p, refuse(RefuseCode::Malformed, &msg));
                    return Ok(());
                }
            };
            let Some((kind, body, used)) = next else {
                // A large hello is on its way: reserve its bytes from the budget first.
                if kind_is_hello(&p.rx) && p.reserved == 0 {
                    let len = wire::decode_preamble(p.rx[..PREAMBLE_LEN].try_into().expect("12"))
                        .map(|(_, l)| l)
                        .unwrap_or(0);
                    if len > SMALL_HELLO {
                        if *hello_bytes + len > HELLO_BUDGET {
                            self.finish_refused(
                                p,
                                refuse(RefuseCode::Busy, "too many large hellos are being read"),
                            );
                            return Ok(());
                        }
                        *hello_bytes += len;
                        p.reserved = len;
                    }
                }
                return Ok(());
            };
            let body = body.to_vec();
            p.rx.drain(..used);
            match p.hs.on_message(kind, &body) {
                Ok(Step::Send(bytes)) => p.tx.extend_from_slice(&bytes),
                Ok(Step::Refuse(bytes, e)) => {
                    p.tx.extend_from_slice(&bytes);
                    self.note_refusal(p.from, &e);
                    p.then = Some(Then::Close);
                    return Ok(());
                }
                Ok(Step::Answer(theirs)) => {
                    if !p.rx.is_empty() {
                        self.finish_refused(
                            p,
                            refuse(RefuseCode::Malformed, "bytes after the hello"),
                        );
                        return Ok(());
                    }
                    return self.answer(p, theirs);
                }
                Ok(Step::Done(_)) => unreachable!("a responder answers, it is never done"),
                Err(HandshakeError::Refused(r)) => {
                    return Err(format!("the peer refused this engine: {r}"));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn finish_refused(&self, p: &mut Pending, step: Step) {
        if let Step::Refuse(bytes, e) = step {
            p.tx.extend_from_slice(&bytes);
            self.note_refusal(p.from, &e);
        }
        p.then = Some(Then::Close);
    }

    fn note_refusal(&self, from: SocketAddr, e: &HandshakeError) {
        self.served
            .refusals
            .refuse("a connection", &format_args!("from {from}: {e}"));
    }

    /// The peer's hello is in: queues ours (with an RDMA answer to its offer) and says what
    /// follows.
    fn answer(&self, p: &mut Pending, theirs: Hello) -> std::result::Result<(), String> {
        let peer = p.from.to_string();
        let data = matches!(theirs.purpose, ConnPurpose::TcpData | ConnPurpose::Control);
        if data && self.served.conns_of(theirs.engine_id) >= MAX_CONNS_PER_PEER {
            let text = format!(
                "engine {:#x} already has {MAX_CONNS_PER_PEER} connections here",
                theirs.engine_id
            );
            self.finish_refused(p, refuse(RefuseCode::Busy, &text));
            return Ok(());
        }
        let mut keep: Option<Box<dyn Send>> = None;
        let answer = match &self.rdma {
            Some(r) if theirs.purpose == ConnPurpose::Control => match rdma::answer(r, &theirs) {
                Ok(a) => a.map(|(answer, qps)| {
                    keep = Some(Box::new(qps));
                    answer
                }),
                Err(e) => return Err(format!("{peer}: cannot answer its RDMA offer: {e}")),
            },
            _ => None,
        };
        let ours = self.hello(theirs.purpose, theirs.conn_index, answer.as_ref());
        p.tx.extend_from_slice(&p.hs.answer(&ours));
        p.then = Some(if theirs.purpose == ConnPurpose::Probe {
            Then::Close
        } else {
            Then::Serve(Box::new(theirs), keep)
        });
        Ok(())
    }

    /// Hands a connection whose handshake is complete on.
    fn serve(&self, s: TcpStream, from: SocketAddr, h: Hello, keep: Option<Box<dyn Send>>) {
        let peer = from.to_string();
        if h.purpose == ConnPurpose::Kv {
            let acceptor = self.kv_acceptor.read().clone();
            match acceptor {
                Some(a) => a(s, &h, from),
                None => self.served.refusals.refuse(
                    "a KV channel",
                    &format_args!("from {peer}: no KV manager here"),
                ),
            }
            return;
        }
        tracing::debug!(%peer, epoch = format_args!("{:#x}", h.epoch), conn = h.conn_index,
            rdma = keep.is_some(), "connection accepted");
        let rdma = self.rdma.clone();
        let segments = self.segments.clone();
        let ctx = ServeContext {
            segments: self.segments.clone(),
            describe: Arc::new(move || Engine::describe_segments(&segments, rdma.as_deref())),
            notifier: self.notifier.clone(),
            fences: self.fences.clone(),
            shutdown: self.shutdown.clone(),
            busy_poll: self.config.busy_poll,
            stall: self.config.batch_timeout,
            peer,
            peer_engine: h.engine_id,
            peer_epoch: h.epoch,
            peer_token: h.token,
            // The control connection's end is the end of the peer's QPs here.
            keep,
            refusals: self.served.refusals.clone(),
        };
        match ServedConn::start(s, ctx, &self.tcp_io) {
            Ok(c) => self.served.add_conn(c),
            Err(e) => tracing::warn!("cannot serve a connection: {e}"),
        }
    }
}

/// Whether the buffered bytes start with a hello's preamble.
fn kind_is_hello(rx: &[u8]) -> bool {
    rx.first_chunk::<PREAMBLE_LEN>()
        .and_then(|pre| wire::decode_preamble(pre).ok())
        .is_some_and(|(k, _)| k == MsgKind::Hello)
}
