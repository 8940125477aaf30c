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
mod io;
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
use crate::wire::{self, Hello, PREAMBLE_LEN};

/// Reads one handshake message from a blocking socket (whose read timeout bounds the wait).
pub(crate) fn read_hello(s: &mut TcpStream, peer: &str) -> Result<Hello> {
    let mut pre = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut pre)
        .map_err(|e| handshake_io(peer, "reading the handshake preamble", e))?;
    let body_len = wire::decode_preamble(&pre)?;
    let mut body = vec![0u8; body_len];
    s.read_exact(&mut body)
        .map_err(|e| handshake_io(peer, "reading the handshake body", e))?;
    Ok(wire::decode_hello_body(&body)?)
}

/// Writes one handshake message.
pub(crate) fn write_hello(s: &mut TcpStream, hello: &Hello, peer: &str) -> Result<()> {
    io::send_all(s, &wire::encode_hello(hello))
        .map_err(|e| handshake_io(peer, "sending the handshake", e))
}

fn handshake_io(peer: &str, doing: &str, e: std::io::Error) -> Error {
    Error::Handshake {
        peer: peer.to_string(),
        reason: format!("{doing}: {e}"),
    }
}

/// Opens one connection to `addr` and exchanges handshakes; returns the peer's hello and the
/// socket (blocking, with `timeout` as its read/write timeout).
pub(crate) fn connect_one(
    addr: SocketAddr,
    timeout: Duration,
    hello: &Hello,
) -> Result<(Hello, TcpStream)> {
    let peer = addr.to_string();
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::io("connect", e))?;
    s.set_nodelay(true)
        .map_err(|e| Error::io("setsockopt(TCP_NODELAY)", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| Error::io("setsockopt", e))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| Error::io("setsockopt", e))?;
    write_hello(&mut s, hello, &peer)?;
    let theirs = read_hello(&mut s, &peer)?;
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
