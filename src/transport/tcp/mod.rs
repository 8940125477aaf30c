//! TCP transport: one-sided WRITE/READ emulated over real sockets.
//!
//! Each peer gets several data connections to its bootstrap port. A connection opens with the
//! handshake of [`wire`](crate::wire) in both directions, then carries frames: a fixed 40-byte
//! header plus payload. The target checks each frame against its registered segments before
//! touching memory and reads payloads straight into place; it acknowledges each batch once
//! per connection, after the batch's last frame on it.
//!
//! Threads do not grow with connections: an engine's [`TcpIo`] holds a [`poller`] (a few I/O
//! threads on one epoll set, reading every connection) and a [`sender`] pool (a few threads
//! writing for every connection).

mod conn;
pub(crate) mod io;
pub(crate) mod poller;
pub(crate) mod sender;
mod target;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

pub(crate) use conn::TcpConn;
pub(crate) use target::{ServeContext, ServedConn};

use crate::error::{Error, Result};
use crate::plan::Slice;
use crate::transport::{Work, units_of};
use crate::wire::{self, HandshakeError, Hello, Initiator, MsgKind, PREAMBLE_LEN, Secret, Step};

/// Reads one handshake message of a kind in `expect` from a blocking socket (whose read
/// timeout bounds the wait). The body buffer grows as bytes arrive, never by the length field.
fn read_message(s: &mut TcpStream, expect: &[MsgKind], peer: &str) -> Result<(MsgKind, Vec<u8>)> {
    let mut pre = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut pre)
        .map_err(|e| handshake_io(peer, "reading the handshake preamble", e))?;
    // Checks the preamble (magic, version, kind, size) before reading any of the body.
    wire::next_message(&pre, expect, wire::MAX_HELLO_BODY)?;
    let (kind, len) = wire::decode_preamble(&pre)?;
    let mut body = Vec::new();
    s.take(len as u64)
        .read_to_end(&mut body)
        .map_err(|e| handshake_io(peer, "reading a handshake message", e))?;
    if body.len() < len {
        return Err(handshake_io(
            peer,
            "reading a handshake message",
            std::io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    Ok((kind, body))
}

/// Runs the connecting side of the handshake on a blocking socket: proves the cluster secret
/// (when there is one) and checks the peer's proof before `hello` is sent; returns the peer's
/// hello.
pub(crate) fn handshake(
    s: &mut TcpStream,
    secret: Option<Secret>,
    hello: Hello,
    peer: &str,
) -> Result<Hello> {
    let (mut hs, first) = Initiator::start(secret, rand::random(), hello);
    io::send_all(s, &first).map_err(|e| handshake_io(peer, "sending the handshake", e))?;
    loop {
        let (kind, body) = read_message(s, hs.expects(), peer)?;
        match hs.on_message(kind, &body) {
            Ok(Step::Send(bytes)) => io::send_all(s, &bytes)
                .map_err(|e| handshake_io(peer, "sending the handshake", e))?,
            Ok(Step::Done(theirs)) => return Ok(theirs),
            Ok(Step::Refuse(bytes, e)) => {
                // Best effort: the peer learns why before the connection closes.
                let _ = io::send_all(s, &bytes);
                return Err(handshake_error(peer, e));
            }
            Ok(Step::Answer(_)) => unreachable!("an initiator never answers"),
            Err(e) => return Err(handshake_error(peer, e)),
        }
    }
}

/// The crate error for a failed handshake: authentication refusals get their own code.
pub(crate) fn handshake_error(peer: &str, e: HandshakeError) -> Error {
    match &e {
        HandshakeError::Wire(w) => Error::Protocol(w.clone()),
        _ if e.refusal().is_some_and(|r| r.code.is_auth()) => Error::Unauthenticated {
            peer: peer.to_string(),
            reason: e.to_string(),
        },
        _ => Error::Handshake {
            peer: peer.to_string(),
            reason: e.to_string(),
        },
    }
}

fn handshake_io(peer: &str, doing: &str, e: std::io::Error) -> Error {
    Error::Handshake {
        peer: peer.to_string(),
        reason: format!("{doing}: {e}"),
    }
}

/// Opens one connection to `addr` and runs the handshake; returns the peer's hello and the
/// socket (blocking, with `timeout` as its read/write timeout).
pub(crate) fn connect_one(
    addr: SocketAddr,
    timeout: Duration,
    hello: &Hello,
    secret: Option<&Secret>,
) -> Result<(Hello, TcpStream)> {
    let peer = addr.to_string();
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::io("connect", e))?;
    s.set_nodelay(true)
        .map_err(|e| Error::io("setsockopt(TCP_NODELAY)", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| Error::io("setsockopt", e))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| Error::io("setsockopt", e))?;
    let theirs = handshake(&mut s, secret.cloned(), hello.clone(), &peer)?;
    Ok((theirs, s))
}

/// The threads that move an engine's TCP bytes: the poller's I/O threads and the send pool.
pub(crate) struct TcpIo {
    pub(crate) poller: Arc<poller::Poller>,
    pub(crate) pool: Arc<sender::SendPool>,
}

impl TcpIo {
    /// Starts `threads` I/O threads and as many send pool threads.
    pub(crate) fn start(threads: usize) -> Result<Arc<Self>> {
        let poller = poller::Poller::start(threads)?;
        let pool = match sender::SendPool::start(threads) {
            Ok(p) => p,
            Err(e) => {
                poller.stop();
                return Err(e);
            }
        };
        Ok(Arc::new(TcpIo { poller, pool }))
    }

    /// Stops and joins both kinds of thread. Call once every connection is closed: what is
    /// still queued is then written off on the calling thread.
    pub(crate) fn stop(&self) {
        self.poller.stop();
        self.pool.stop();
    }
}

/// A peer reached over TCP: its data connections, one per lane.
pub(crate) struct TcpLink {
    pub(crate) conns: Vec<Arc<TcpConn>>,
}

impl TcpLink {
    /// Hands the connections to the engine's poller and send pool.
    pub(crate) fn start(
        streams: Vec<TcpStream>,
        peer: &str,
        epoch: u64,
        io: &Arc<TcpIo>,
        stall: Duration,
    ) -> Result<Self> {
        let mut conns = Vec::with_capacity(streams.len());
        for s in streams {
            match TcpConn::start(s, peer.to_string(), epoch, io, stall) {
                Ok(c) => conns.push(c),
                Err(e) => {
                    conns.iter().for_each(|c| c.close());
                    return Err(e);
                }
            }
        }
        Ok(TcpLink { conns })
    }
}

impl crate::transport::PeerLink for TcpLink {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn lanes(&self) -> usize {
        self.conns.len()
    }

    fn units_of(&self, _lane: usize, slices: &[Slice]) -> u32 {
        units_of(slices)
    }

    fn post(
        &self,
        lane: usize,
        work: Work,
        inline: bool,
        _remote: &dyn Fn(u32, u16) -> Option<(u64, u32)>,
    ) {
        self.conns[lane].post(work, inline);
    }

    fn progress(&self, lane: usize) {
        self.conns[lane].progress();
    }

    fn start_driving(&self, lane: usize) {
        self.conns[lane].start_driving();
    }

    fn stop_driving(&self, lane: usize, hand_back: bool) {
        self.conns[lane].stop_driving(hand_back);
    }

    fn outstanding(&self, lane: usize) -> usize {
        self.conns[lane].outstanding()
    }

    fn check_alive(&self) -> Result<()> {
        self.conns.iter().try_for_each(|c| c.check_alive())
    }

    fn fetch_segments(&self, timeout: Duration) -> Result<Vec<u8>> {
        self.conns[0].fetch_segments(timeout)
    }

    fn on_lost(&self, hook: crate::transport::LostHook) {
        for c in &self.conns {
            let h = hook.clone();
            c.on_death(move |reason| h(reason));
        }
    }

    fn close(&self) {
        self.conns.iter().for_each(|c| c.close());
    }

    fn join(&self, _limit: Duration) {
        self.conns.iter().for_each(|c| c.join());
    }
}
