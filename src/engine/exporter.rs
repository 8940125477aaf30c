//! The optional HTTP endpoint Prometheus scrapes: `GET /metrics` answers the engine's
//! metrics text. One thread, one request at a time (a scrape is small and rare), each
//! connection bounded by a 2 s deadline and an 8 KiB request; off unless `metrics_listen` is
//! set.

use std::io::{Read, Write};
use std::sync::Weak;

use super::*;

/// Longest a client may take to send its request and read the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(2);
/// Most bytes of a request read.
const MAX_REQUEST: usize = 8 << 10;
/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The running endpoint: its address, its thread and a handle that wakes it.
pub(super) struct Exporter {
    pub(super) addr: SocketAddr,
    thread: thread::JoinHandle<()>,
    wake: TcpListener,
    stop: Arc<AtomicBool>,
}

impl Exporter {
    /// Binds `addr` and serves `engine`'s metrics until [`stop`](Self::stop).
    pub(super) fn start(engine: Weak<Engine>, addr: SocketAddr) -> Result<Exporter> {
        let listener = TcpListener::bind(addr).map_err(|e| Error::io("bind (metrics)", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("getsockname", e))?;
        let wake = listener.try_clone().map_err(|e| Error::io("dup", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::Builder::new()
            .name("kvt-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(Ordering::Acquire) {
                        break;
                    }
                    match conn {
                        Ok(s) => {
                            if let Err(e) = answer(s, &engine) {
                                tracing::debug!("metrics request: {e}");
                            }
                        }
                        Err(e) => tracing::debug!("metrics accept: {e}"),
                    }
                }
            })
            .map_err(|e| Error::io("spawn", e))?;
        tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
        Ok(Exporter {
            addr,
            thread,
            wake,
            stop,
        })
    }

    /// Stops accepting and joins the thread (a request being answered finishes first).
    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = nix::sys::socket::shutdown(self.wake.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = self.thread.join();
    }
}

/// Reads one request from `s` and answers it.
fn answer(mut s: TcpStream, engine: &Weak<Engine>) -> std::io::Result<()> {
    s.set_read_timeout(Some(CLIENT_DEADLINE))?;
    s.set_write_timeout(Some(CLIENT_DEADLINE))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < MAX_REQUEST {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (words.next(), words.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => match engine.upgrade() {
            Some(e) => ("200 OK", e.metrics_text()),
            None => ("503 Service Unavailable", "engine stopped\n".into()),
        },
        (Some(b"GET"), _) => ("404 Not Found", "try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "GET /metrics only\n".into()),
    };
    let kind = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}
