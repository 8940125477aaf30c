//! The control channels' sockets: non-blocking, registered in the driver's epoll set, and
//! shared by the driver thread (which reads them) and callers, which write a room's messages
//! inline when the socket takes them instead of waking the driver for it. Channels this side
//! opens connect and do the engine handshake here too, without blocking anyone.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};

use super::endpoint::{ConnId, Transmit};
use super::proto::KvMessage;
use crate::wire::{self, Hello, Initiator, Step};

/// Most bytes read from one channel per wake-up, so one busy channel cannot starve the rest.
const READ_BUDGET: usize = 1 << 20;
/// Receive buffer a channel keeps between messages.
const RX_KEEP: usize = 256 << 10;

/// One control channel's socket and buffers.
struct Sock {
    stream: TcpStream,
    rx: Vec<u8>,
    tx: Vec<u8>,
    sent: usize,
    writing: bool,
    /// Still connecting or in the engine handshake (a channel this side opened): the first
    /// bytes to arrive are the handshake's, not KV messages.
    handshake: Option<Initiator>,
}

impl Sock {
    /// Reads what is there; complete messages go to `out`. `Err` ends the channel.
    fn read(
        &mut self,
        conn: ConnId,
        out: &mut Vec<(ConnId, KvMessage)>,
    ) -> std::result::Result<Option<Hello>, String> {
        let mut buf = [0u8; 64 << 10];
        let mut budget = READ_BUDGET;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    // A refusal may have come just before the end: say that, not "end".
                    self.engine_hello()?;
                    return Err("end of stream".into());
                }
                Ok(n) => {
                    self.rx.extend_from_slice(&buf[..n]);
                    budget = budget.saturating_sub(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
            if budget == 0 {
                break;
            }
        }
        let hello = self.engine_hello()?;
        if self.handshake.is_none() {
            self.parse(conn, out)?;
        }
        Ok(hello)
    }

    /// While in the engine handshake: runs the messages that are here; the peer engine's
    /// hello once the handshake is done.
    fn engine_hello(&mut self) -> std::result::Result<Option<Hello>, String> {
        while let Some(hs) = self.handshake.as_mut() {
            let Some((kind, body, used)) =
                wire::next_message(&self.rx, hs.expects(), wire::MAX_HELLO_BODY)
                    .map_err(|e| format!("engine handshake: {e}"))?
            else {
                return Ok(None);
            };
            let step = hs.on_message(kind, body);
            self.rx.drain(..used);
            match step {
                Ok(Step::Send(bytes)) => self.tx.extend_from_slice(&bytes),
                Ok(Step::Done(hello)) => {
                    self.handshake = None;
                    return Ok(Some(hello));
                }
                Ok(Step::Refuse(bytes, e)) => {
                    // Best effort: the peer learns why before the channel closes.
                    self.tx.extend_from_slice(&bytes);
                    let _ = self.flush();
                    return Err(format!("engine handshake: {e}"));
                }
                Ok(Step::Answer(_)) => unreachable!("an initiator never answers"),
                Err(e) => return Err(format!("engine handshake: {e}")),
            }
        }
        Ok(None)
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
        // A large message is gone: give its buffer back rather than hold it for the
        // channel's life.
        if self.rx.capacity() > RX_KEEP && self.rx.len() <= RX_KEEP / 2 {
            self.rx.shrink_to(RX_KEEP);
        }
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

/// Every channel's socket, and the epoll set that watches them.
pub(crate) struct Wires {
    /// The driver's epoll set.
    pub(crate) epoll: Epoll,
    socks: Mutex<HashMap<ConnId, Sock>>,
}

impl Wires {
    /// An empty set over `epoll`.
    pub(crate) fn new(epoll: Epoll) -> Wires {
        Wires {
            epoll,
            socks: Mutex::new(HashMap::new()),
        }
    }

    /// Watches `stream`, a channel the peer opened, as channel `conn`; false if it cannot be.
    pub(crate) fn register(&self, conn: ConnId, stream: TcpStream) -> bool {
        stream.set_nonblocking(true).is_ok() && self.add(conn, stream, Vec::new(), None)
    }

    /// Starts opening channel `conn` to the engine at `addr` without waiting: a non-blocking
    /// connect, then the engine handshake `hs` (whose first bytes are `first`) as the socket
    /// allows. [`ready`](Self::ready) returns the peer engine's hello once the handshake is
    /// done. `Err` when even the connect cannot start.
    pub(crate) fn connect(
        &self,
        conn: ConnId,
        addr: SocketAddr,
        (hs, first): (Initiator, Vec<u8>),
    ) -> Result<(), String> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|e| format!("socket: {e}"))?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e.to_string()),
        }
        let stream: TcpStream = socket.into();
        if !self.add(conn, stream, first, Some(hs)) {
            return Err("cannot watch the socket".into());
        }
        Ok(())
    }

    fn add(
        &self,
        conn: ConnId,
        stream: TcpStream,
        hello: Vec<u8>,
        handshake: Option<Initiator>,
    ) -> bool {
        let writing = !hello.is_empty();
        let flags = if writing {
            READ | EpollFlags::EPOLLOUT
        } else {
            READ
        };
        let ok = stream.set_nodelay(true).is_ok()
            && self
                .epoll
                .add(stream.as_fd(), EpollEvent::new(flags, conn.0))
                .is_ok();
        if ok {
            let sock = Sock {
                stream,
                rx: Vec::new(),
                tx: hello,
                sent: 0,
                writing,
                handshake,
            };
            self.socks.lock().insert(conn, sock);
        }
        ok
    }

    /// Closes and forgets a channel's socket.
    pub(crate) fn close(&self, conn: ConnId) {
        if let Some(s) = self.socks.lock().remove(&conn) {
            let _ = self.epoll.delete(s.stream.as_fd());
            let _ = s.stream.shutdown(Shutdown::Both);
        }
    }

    /// Closes every socket.
    pub(crate) fn close_all(&self) {
        for (_, s) in self.socks.lock().drain() {
            let _ = self.epoll.delete(s.stream.as_fd());
            let _ = s.stream.shutdown(Shutdown::Both);
        }
    }

    /// Reads what `conn` has (complete messages go to `out`) and, if `writable`, writes what
    /// it has queued. Returns the peer engine's hello when this completes the engine
    /// handshake of a channel we opened. `Err` ends the channel.
    pub(crate) fn ready(
        &self,
        conn: ConnId,
        readable: bool,
        writable: bool,
        out: &mut Vec<(ConnId, KvMessage)>,
    ) -> Result<Option<Hello>, String> {
        let mut socks = self.socks.lock();
        let Some(s) = socks.get_mut(&conn) else {
            return Ok(None);
        };
        if writable {
            if let Ok(Some(e)) | Err(e) = s.stream.take_error() {
                return Err(format!("connect: {e}"));
            }
            if s.flush()? {
                self.want_write(conn, s, false);
            }
        }
        if readable {
            let hello = s.read(conn, out)?;
            // The handshake may have queued its next message.
            if !s.tx.is_empty() && !s.writing && !s.flush()? {
                self.want_write(conn, s, true);
            }
            return Ok(hello);
        }
        Ok(None)
    }

    /// Queues messages, in order, behind what their channels already hold; returns the
    /// channels that got some. Call under the endpoint's lock (that is what orders them) and
    /// [`flush`](Self::flush) after releasing it.
    pub(crate) fn queue(&self, transmits: impl Iterator<Item = Transmit>) -> Vec<ConnId> {
        let mut socks = self.socks.lock();
        let mut touched: Vec<ConnId> = Vec::new();
        for t in transmits {
            if let Some(s) = socks.get_mut(&t.conn) {
                if !touched.contains(&t.conn) {
                    touched.push(t.conn);
                }
                s.tx.extend_from_slice(&t.msg.encode());
            }
        }
        touched
    }

    /// Writes what `conns` have queued as far as their sockets take it now; the rest goes out
    /// when they are writable. Returns the channels whose write failed.
    pub(crate) fn flush(&self, conns: Vec<ConnId>) -> Vec<(ConnId, String)> {
        let mut lost = Vec::new();
        if conns.is_empty() {
            return lost;
        }
        let mut socks = self.socks.lock();
        for conn in conns {
            let Some(s) = socks.get_mut(&conn) else {
                continue;
            };
            if s.writing {
                continue; // EPOLLOUT will come
            }
            match s.flush() {
                Ok(true) => {}
                Ok(false) => self.want_write(conn, s, true),
                Err(why) => lost.push((conn, why)),
            }
        }
        lost
    }

    fn want_write(&self, conn: ConnId, s: &mut Sock, write: bool) {
        if s.writing == write {
            return;
        }
        s.writing = write;
        let flags = if write {
            READ | EpollFlags::EPOLLOUT
        } else {
            READ
        };
        let _ = self
            .epoll
            .modify(s.stream.as_fd(), &mut EpollEvent::new(flags, conn.0));
    }
}

const READ: EpollFlags = EpollFlags::EPOLLIN.union(EpollFlags::EPOLLRDHUP);
