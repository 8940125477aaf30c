//! The transfer engine: registered memory, peers, batch submission and completion.
//!
//! `mod.rs` holds the engine's state and its life (start, shutdown); each concern has its
//! own file: `memory` (registration, `HostBuffer`), `peers` (connect, handshake, peer
//! table), `serve` (the accept loop and accepted connections), `submit` (validation,
//! planning onto a peer's lanes, waiting) and `kv_hooks` (what the KV layer builds on).

mod exporter;
mod kv_hooks;
mod memory;
mod peers;
mod serve;
#[cfg(test)]
mod staging_tests;
mod stats;
mod submit;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::batch::Batch;
use crate::config::{EngineConfig, GpuMode, TransportKind};
use crate::cuda::{self, Placement};
use crate::error::{Error, Result};
use crate::memory::raw::RawAlloc;
use crate::memory::{
    MemoryKind, Placed, RegMode, SegmentDetails, SegmentGuard, SegmentId, SegmentInfo, SegmentTable,
};
use crate::metrics::{
    BatchMetrics, Metrics, MetricsSnapshot, PeerCounters, PeerStats, RailMetrics, RoomCounters,
};
use crate::plan::{PlanParams, plan};
use crate::request::{BatchId, BatchStatus, Op, Request};
use crate::transport::fence::RoomFences;
use crate::transport::notify::{self, Notification, Notifier};
use crate::transport::rdma::{self, Offer, RailChoice, RdmaTransport};
use crate::transport::tcp::{self, ServeContext, ServedConn, TcpIo, TcpLink};
use crate::transport::{PeerLink, Work};
use crate::wire::{ConnPurpose, Endpoint, Hello, SegmentDesc, TransportId, decode_segments};

pub use memory::HostBuffer;
use serve::*;

/// Handle of a connected peer within one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// What the engine knows about a connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Handle within this engine.
    pub id: PeerId,
    /// The peer's bootstrap address.
    pub addr: SocketAddr,
    /// The peer engine's random id.
    pub engine_id: u64,
    /// The peer's epoch (changes when it restarts).
    pub epoch: u64,
    /// Transport carrying data to it (`tcp` or `rdma`).
    pub transport: &'static str,
    /// Data connections (lanes) open to it.
    pub lanes: usize,
}

/// One buffer of [`TransferEngine::submit_pages`]: page `p` is the `item_len` bytes at
/// `local + p * item_len` here and at `remote + p * item_len` in the peer's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageBuffer {
    /// Local address of page 0 (registered memory).
    pub local: u64,
    /// The peer's address of page 0 (inside a segment it registered).
    pub remote: u64,
    /// Bytes of one page of this buffer, the same on both sides.
    pub item_len: u64,
}

/// What a liveness probe ([`TransferEngine::probe`]) learns of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeReply {
    /// The engine's random id.
    pub engine_id: u64,
    /// Its epoch: a restarted engine at the same address has a new one.
    pub epoch: u64,
}

/// What one RDMA rail of this engine carried ([`TransferEngine::rail_stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailStats {
    /// The rail's index.
    pub rail: usize,
    /// Its device and port, `mlx5_0:1`.
    pub device: String,
    /// Bytes of work posted on it (what moved onto it included).
    pub posted_bytes: u64,
    /// Bytes of work moved onto it from a rail whose path failed.
    pub moved_in_bytes: u64,
    /// Bytes of work moved off it when its path failed.
    pub moved_out_bytes: u64,
}

struct Peer {
    info: PeerInfo,
    segments: RwLock<HashMap<u32, SegmentDesc>>,
    link: Box<dyn PeerLink>,
    /// The link token its connections present (0: none).
    token: u64,
    /// Its batches' counters.
    counters: PeerCounters,
}

impl Peer {
    fn check_alive(&self) -> Result<()> {
        self.link.check_alive().map_err(|e| match e {
            Error::PeerLost { reason, .. } => Error::PeerLost {
                peer: self.info.addr.to_string(),
                epoch: self.info.epoch,
                reason,
            },
            other => other,
        })
    }
}

struct Engine {
    config: EngineConfig,
    engine_id: u64,
    epoch: u64,
    local_addr: SocketAddr,
    transport: TransportKind,
    segments: Arc<SegmentTable>,
    rdma: Option<Arc<RdmaTransport>>,
    notifier: Arc<Notifier>,
    fences: Arc<RoomFences>,
    /// Stops the RDMA rail pollers (set at the end of shutdown, after the flushes).
    rdma_stop: Arc<AtomicBool>,
    kv_acceptor: RwLock<Option<KvAcceptor>>,
    /// Accepted connections: in their handshake, and served.
    served: Served,
    /// The threads that read and write every TCP connection.
    tcp_io: Arc<TcpIo>,
    peers: RwLock<HashMap<u64, Arc<Peer>>>,
    next_peer: AtomicU64,
    batches: Mutex<HashMap<u64, Arc<Batch>>>,
    next_batch: AtomicU64,
    lane_rotation: AtomicUsize,
    shutdown: Arc<AtomicBool>,
    /// The thread putting a failed rail back into a peer, if one ran (one at a time, joined
    /// at shutdown: see `transport::rdma::rejoin`).
    rejoin: Mutex<Option<thread::JoinHandle<()>>>,
    /// This engine, for the threads it starts after `new`.
    me: std::sync::Weak<Engine>,
    /// Counters and histograms (`metrics`).
    metrics: Arc<Metrics>,
    /// The room counters of this engine's KV manager, once it has one.
    rooms: std::sync::OnceLock<Arc<RoomCounters>>,
}

/// One engine per process: owns registered memory, the bootstrap listener, peers and the
/// threads that move data.
///
/// ```
/// use kvtransfer::{EngineConfig, Request, TransferEngine};
/// let target = TransferEngine::new(EngineConfig::default())?;
/// let initiator = TransferEngine::new(EngineConfig::default())?;
/// let dst = target.alloc(4096)?;
/// let src = initiator.alloc(4096)?;
/// src.write(0, b"hello");
/// let peer = initiator.connect(target.local_addr())?;
/// initiator.transfer_sync(peer, &[Request::write(src.addr(), 5, dst.segment(), 0)])?;
/// let mut out = [0u8; 5];
/// dst.read(0, &mut out);
/// assert_eq!(&out, b"hello");
/// # Ok::<(), kvtransfer::Error>(())
/// ```
pub struct TransferEngine {
    inner: Arc<Engine>,
    /// The accept thread, which owns the listener: joined on drop, so the port is free again
    /// when the engine is gone (a restarted server binds the same port).
    accept: Mutex<Option<thread::JoinHandle<()>>>,
    /// A second handle on the listener: shutting it down wakes the accept loop at once.
    listener: Mutex<Option<TcpListener>>,
    /// The HTTP endpoint serving the metrics (`metrics_listen`), if configured.
    exporter: Mutex<Option<exporter::Exporter>>,
}

impl std::fmt::Debug for TransferEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferEngine")
            .field("local_addr", &self.inner.local_addr)
            .field("epoch", &format_args!("{:#x}", self.inner.epoch))
            .finish()
    }
}

impl TransferEngine {
    /// Starts an engine: binds the bootstrap listener and starts accepting peers.
    pub fn new(config: EngineConfig) -> Result<Self> {
        config.validate()?;
        let shutdown = Arc::new(AtomicBool::new(false));
        // The rail pollers stop only after shutdown has collected the QPs' flushes.
        let rdma_stop = Arc::new(AtomicBool::new(false));
        let notifier = Arc::new(Notifier::default());
        let metrics = Arc::new(Metrics::new());
        let rdma = match config.transport {
            TransportKind::Tcp => None,
            TransportKind::Auto => match open_rdma(&config, &notifier, &rdma_stop, &metrics) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::info!("transport auto: using tcp ({e})");
                    None
                }
            },
            TransportKind::Rdma => Some(open_rdma(&config, &notifier, &rdma_stop, &metrics)?),
        };
        let transport = if rdma.is_some() {
            TransportKind::Rdma
        } else {
            TransportKind::Tcp
        };
        let listener = TcpListener::bind(config.listen).map_err(|e| Error::io("bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("fcntl(O_NONBLOCK)", e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io("getsockname", e))?;
        let tcp_io = TcpIo::start(config.io_threads)?;
        let inner = Arc::new_cyclic(|me| Engine {
            engine_id: rand::random(),
            epoch: rand::random(),
            local_addr,
            transport,
            segments: Arc::new(SegmentTable::default()),
            rdma,
            notifier,
            fences: Arc::new(RoomFences::default()),
            kv_acceptor: RwLock::new(None),
            served: Served::default(),
            tcp_io,
            peers: RwLock::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
            batches: Mutex::new(HashMap::new()),
            next_batch: AtomicU64::new(1),
            lane_rotation: AtomicUsize::new(0),
            shutdown,
            rdma_stop,
            rejoin: Mutex::new(None),
            me: me.clone(),
            metrics,
            rooms: std::sync::OnceLock::new(),
            config,
        });
        let wake = listener.try_clone().map_err(|e| Error::io("dup", e))?;
        let e = inner.clone();
        let accept = match thread::Builder::new()
            .name("kvt-accept".into())
            .spawn(move || e.accept_loop(listener))
        {
            Ok(t) => t,
            Err(err) => {
                inner.tcp_io.stop();
                return Err(Error::io("spawn", err));
            }
        };
        tracing::info!(addr = %local_addr, epoch = format_args!("{:#x}", inner.epoch), transport = transport.as_str(),
            authenticated = inner.config.secret.is_some(), "engine started");
        if inner.config.secret.is_none() && !local_addr.ip().is_loopback() {
            tracing::warn!(addr = %local_addr,
                "UNAUTHENTICATED: this engine listens beyond loopback without a cluster secret; \
                 anyone who can reach the port can read and write its registered memory. Set \
                 KVT_SECRET or KVT_SECRET_FILE on every engine (docs/security.md)");
        }
        let engine = TransferEngine {
            inner,
            accept: Mutex::new(Some(accept)),
            listener: Mutex::new(Some(wake)),
            exporter: Mutex::new(None),
        };
        if let Some(addr) = engine.inner.config.metrics_listen {
            // On failure the engine is dropped, which stops what started.
            let e = exporter::Exporter::start(Arc::downgrade(&engine.inner), addr)?;
            *engine.exporter.lock() = Some(e);
        }
        Ok(engine)
    }

    /// Peer input refused so far, each with a (rate-limited) log line: connections refused or
    /// closed in their handshake (wrong or missing secret, malformed or oversized messages,
    /// the handshake deadline, one of the bounds on connections), data connections closed for
    /// a malformed frame, and reads and writes outside the registered segments (see
    /// `docs/security.md`).
    pub fn refused_connections(&self) -> u64 {
        self.inner.served.refusals.total()
    }

    /// Where the metrics are served over HTTP (`metrics_listen`, with the real port when 0
    /// was configured); `None` when they are not.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.exporter.lock().as_ref().map(|e| e.addr)
    }

    /// The bootstrap address peers connect to (with the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This engine's random id.
    pub fn engine_id(&self) -> u64 {
        self.inner.engine_id
    }

    /// This run's epoch: a random id peers use to tell a restarted engine from the old one.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Name of the transport in use (`tcp` or `rdma`).
    pub fn transport(&self) -> &'static str {
        self.inner.transport.as_str()
    }

    /// Makes the bytes peers wrote by RDMA into this engine's GPU memory (segments registered
    /// by dma-buf or peermem) visible to the GPUs' kernels: a `cuFlushGPUDirectRDMAWrites`
    /// on each GPU that needs one, nothing on a GPU that orders such writes itself, nothing
    /// at all without such segments. Call it after a [notification](Self::notifications)
    /// and before a kernel reads the bytes; a KV room does it before reporting Success.
    /// Returns how many GPUs were flushed.
    pub fn flush_gpu_writes(&self) -> Result<usize> {
        let mut flushed = 0;
        for gpu in self.inner.segments.direct_gpus() {
            if cuda::flush_rdma_writes(gpu)? == cuda::WriteVisibility::Flush {
                flushed += 1;
            }
        }
        Ok(flushed)
    }
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl TransferEngine {
    /// Stops the engine now (dropping it does the same): peers are disconnected and their
    /// batches fail, the listener closes and its port is free, and every connection this
    /// engine accepted is shut down with its thread joined. When this returns, no thread of
    /// the engine reads or writes registered memory over TCP any more, so the caller may
    /// free or reuse it; over RDMA the QPs peers write through are destroyed first, and the
    /// engine's own QPs are moved to ERROR and their work awaited (flushed) for at most 5 s,
    /// so no READ lands afterwards. Later calls on the engine fail
    /// with `Shutdown` or `UnknownPeer`; calling this again does nothing.
    pub fn shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::Release);
        if let Some(e) = self.exporter.lock().take() {
            e.stop();
        }
        let peers: Vec<Arc<Peer>> = self.inner.peers.write().drain().map(|(_, p)| p).collect();
        for p in &peers {
            p.link.close();
        }
        // Shutting the listener down wakes the accept loop, which sees the flag and drops its
        // handle; once it is joined no connection is accepted any more, and with ours gone
        // the port is free.
        if let Some(l) = self.listener.lock().take() {
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        let accept = self.accept.lock().take();
        if let Some(t) = accept {
            let _ = t.join();
        }
        // A rail being put back sees its link closed and lets its connection go.
        let rejoin = self.inner.rejoin.lock().take();
        if let Some(t) = rejoin {
            let _ = t.join();
        }
        // Wake every connection served here and wait for its thread: a write being received
        // into registered memory ends with the socket, so none lands once drop returns.
        self.inner.served.stop_and_join();
        for p in &peers {
            p.link
                .join(self.inner.config.batch_timeout.min(Duration::from_secs(5)));
        }
        // Every connection is closed and idle: the TCP threads go (writing off anything
        // still queued).
        self.inner.tcp_io.stop();
        // Then the rail workers: their lanes are drained (or given up on), so stopping them
        // fails what is left, and once joined no work request is posted or polled.
        self.inner.rdma_stop.store(true, Ordering::Release);
        if let Some(r) = &self.inner.rdma {
            r.stop();
        }
    }
}

/// Takes over an accepted KV channel: the stream (handshake done), the peer's hello, its
/// address. Runs on the connection's own thread, for as long as the channel lives.
pub(crate) type KvAcceptor = Arc<dyn Fn(TcpStream, &Hello, SocketAddr) + Send + Sync>;

/// Discovers the RDMA rails this config allows and opens them.
fn open_rdma(
    config: &EngineConfig,
    notifier: &Arc<Notifier>,
    shutdown: &Arc<AtomicBool>,
    metrics: &Metrics,
) -> Result<Arc<RdmaTransport>> {
    let sysfs = std::path::Path::new("/sys");
    let ports = crate::topology::discover(sysfs)?;
    let allow = config.devices.as_deref();
    let mut usable = crate::topology::usable_rails(&ports, allow, config.gid_index)?;
    if allow.is_none() {
        // Without an allow-list, only the KV rails: on a GPU host whose compute NICs share a
        // PCIe switch with the GPUs, the storage and management NICs are left out.
        let pci = crate::topology::discover_pci(sysfs).unwrap_or_default();
        let devices: Vec<&str> = usable.iter().map(|(p, _)| p.device.as_str()).collect();
        let kv = crate::topology::kv_rails(&pci, &devices);
        let mut i = 0;
        usable.retain(|_| {
            i += 1;
            kv.contains(&(i - 1))
        });
    }
    let choice: Vec<RailChoice> = usable
        .into_iter()
        .map(|(port, gid)| RailChoice {
            device: port.device.clone(),
            port: port.port,
            gid_index: gid.index as u8,
        })
        .collect();
    if choice.is_empty() {
        return Err(Error::NoRdmaDevice {
            reason: match allow {
                Some(list) => format!("no active RDMA port among the allowed devices {list:?}"),
                None => "no active RDMA port".into(),
            },
        });
    }
    RdmaTransport::open(
        &choice,
        notifier.clone(),
        shutdown.clone(),
        config.busy_poll,
        metrics,
    )
}
