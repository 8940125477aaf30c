//! The KV control channel: one TCP connection between a decode and a prefill manager that
//! carries [`KvMessage`]s both ways (room set-up, rejections, aborts).

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::layout::KvLayout;
use super::proto::KvMessage;
use crate::error::{Error, Result};

/// Longest a message write may stall before the channel is declared dead.
const WRITE_STALL: Duration = Duration::from_secs(5);

/// One end of a channel.
pub(crate) struct Channel {
    writer: Mutex<TcpStream>,
    /// A handle on the same socket for shutting it down while a write is blocked.
    ctl: TcpStream,
    /// The other manager's engine `(id, epoch)`.
    pub(crate) peer_engine: (u64, u64),
    /// The other manager's engine bootstrap address (resolved against the channel's peer).
    pub(crate) peer_addr: SocketAddr,
    /// The other manager's layout.
    pub(crate) peer_layout: KvLayout,
    dead: AtomicBool,
}

impl Channel {
    /// Sends our hello on `stream` and reads theirs (`we_speak_first` orders the two).
    pub(crate) fn handshake(
        mut stream: TcpStream,
        ours: &KvMessage,
        we_speak_first: bool,
        timeout: Duration,
    ) -> Result<(Channel, TcpStream)> {
        let peer = stream
            .peer_addr()
            .map_err(|e| Error::io("getpeername", e))?;
        stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(timeout)))
            .and_then(|()| stream.set_write_timeout(Some(WRITE_STALL)))
            .map_err(|e| Error::io("setsockopt", e))?;
        if we_speak_first {
            write_message(&mut stream, ours)?;
        }
        let theirs = read_message(&mut stream)?;
        if !we_speak_first {
            write_message(&mut stream, ours)?;
        }
        let KvMessage::Hello {
            engine_id,
            epoch,
            engine_addr,
            layout,
        } = theirs
        else {
            return Err(Error::Handshake {
                peer: peer.to_string(),
                reason: "KV channel did not start with a hello".into(),
            });
        };
        let mut addr: SocketAddr = engine_addr.parse().map_err(|_| Error::Handshake {
            peer: peer.to_string(),
            reason: format!("bad engine address {engine_addr:?}"),
        })?;
        if addr.ip().is_unspecified() {
            addr.set_ip(peer.ip());
        }
        stream
            .set_read_timeout(None)
            .map_err(|e| Error::io("setsockopt", e))?;
        let reader = stream.try_clone().map_err(|e| Error::io("dup", e))?;
        let ctl = stream.try_clone().map_err(|e| Error::io("dup", e))?;
        Ok((
            Channel {
                writer: Mutex::new(stream),
                ctl,
                peer_engine: (engine_id, epoch),
                peer_addr: addr,
                peer_layout: layout,
                dead: AtomicBool::new(false),
            },
            reader,
        ))
    }

    /// Sends one message; a failure closes the channel.
    pub(crate) fn send(&self, msg: &KvMessage) -> Result<()> {
        if self.is_dead() {
            return Err(Error::PeerLost {
                peer: self.peer_addr.to_string(),
                epoch: self.peer_engine.1,
                reason: "KV channel closed".into(),
            });
        }
        let r = write_message(&mut self.writer.lock(), msg);
        if r.is_err() {
            self.close();
        }
        r
    }

    /// Whether the channel was closed (either end) or failed.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Closes both directions; the reader sees the end at once.
    pub(crate) fn close(&self) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            let _ = self.ctl.shutdown(Shutdown::Both);
        }
    }
}

fn write_message(s: &mut TcpStream, msg: &KvMessage) -> Result<()> {
    crate::transport::tcp::send_all(s, &msg.encode()).map_err(|e| Error::io("send (KV channel)", e))
}

/// Reads one message (blocking).
pub(crate) fn read_message(s: &mut TcpStream) -> Result<KvMessage> {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix)
        .map_err(|e| Error::io("recv (KV channel)", e))?;
    let len = KvMessage::decode_len(prefix)?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(|e| Error::io("recv (KV channel)", e))?;
    Ok(KvMessage::decode(&body)?)
}
