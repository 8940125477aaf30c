//! The transfer engine: registered memory, peers, batch submission and completion.

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
use crate::plan::{PlanParams, plan};
use crate::request::{BatchId, BatchStatus, Op, Request};
use crate::transport::fence::RoomFences;
use crate::transport::notify::{self, Notification, Notifier};
use crate::transport::rdma::{RailChoice, RdmaEndpoint, RdmaLink, RdmaTransport};
use crate::transport::tcp::{self, ServeContext, TcpLink};
use crate::transport::{PeerLink, Work};
use crate::wire::{ConnPurpose, Endpoint, Hello, SegmentDesc, TransportId, decode_segments};

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

/// The connections this engine accepted: a second handle on each socket (to wake its thread
/// on shutdown) and the threads serving them.
#[derive(Default)]
struct Served {
    sockets: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
}

impl Served {
    fn add_socket(&self, s: TcpStream) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.sockets.lock().insert(id, s);
        id
    }

    /// Called by a serving thread as it ends (its own socket closes with it).
    fn remove_socket(&self, id: u64) {
        self.sockets.lock().remove(&id);
    }

    fn add_thread(&self, t: thread::JoinHandle<()>) {
        let mut threads = self.threads.lock();
        threads.retain(|t| !t.is_finished());
        threads.push(t);
    }

    /// Shuts every served socket down (a blocked read or write returns at once) and joins
    /// the serving threads, except the calling one.
    fn stop_and_join(&self) {
        for s in self.sockets.lock().values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        let me = thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        self.sockets.lock().clear();
    }
}

struct Peer {
    info: PeerInfo,
    segments: RwLock<HashMap<u32, SegmentDesc>>,
    link: Box<dyn PeerLink>,
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
    /// The threads serving accepted connections, and their sockets.
    served: Served,
    peers: RwLock<HashMap<u64, Arc<Peer>>>,
    next_peer: AtomicU64,
    batches: Mutex<HashMap<u64, Arc<Batch>>>,
    next_batch: AtomicU64,
    lane_rotation: AtomicUsize,
    shutdown: Arc<AtomicBool>,
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
        let rdma = match config.transport {
            TransportKind::Tcp => None,
            TransportKind::Auto => match open_rdma(&config, &notifier, &rdma_stop) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::info!("transport auto: using tcp ({e})");
                    None
                }
            },
            TransportKind::Rdma => Some(open_rdma(&config, &notifier, &rdma_stop)?),
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
        let inner = Arc::new(Engine {
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
            peers: RwLock::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
            batches: Mutex::new(HashMap::new()),
            next_batch: AtomicU64::new(1),
            lane_rotation: AtomicUsize::new(0),
            shutdown,
            rdma_stop,
            config,
        });
        let wake = listener.try_clone().map_err(|e| Error::io("dup", e))?;
        let e = inner.clone();
        let accept = thread::Builder::new()
            .name("kvt-accept".into())
            .spawn(move || e.accept_loop(listener))
            .map_err(|e| Error::io("spawn", e))?;
        tracing::info!(addr = %local_addr, epoch = format_args!("{:#x}", inner.epoch), transport = transport.as_str(), "engine started");
        Ok(TransferEngine {
            inner,
            accept: Mutex::new(Some(accept)),
            listener: Mutex::new(Some(wake)),
        })
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

    /// Registers caller-owned memory `[addr, addr + len)` so transfers may use it.
    ///
    /// The address is classified first ([`cuda::classify`]): host memory is registered as
    /// is (over RDMA on every rail, striped over its NUMA node's); GPU memory is registered in
    /// the mode [`EngineConfig::gpu_mode`] asks for — over RDMA dmabuf, then peermem, then
    /// staging (the first that works, each failure logged with its reason), or the forced one,
    /// whose failure is this call's error; over TCP always through host staging. Over RDMA,
    /// batches touching staged memory go through the peer's TCP control connection.
    /// [`segment_info`](Self::segment_info) reports the mode chosen. Where CUDA is absent every
    /// address is host memory, so a device pointer cannot be told apart (see
    /// [`register_device_memory`](Self::register_device_memory) for a call that insists).
    ///
    /// # Safety
    /// The range must be valid, mapped memory for as long as it stays registered, and the
    /// caller must not read or write a part of it while a transfer that writes that part is in
    /// flight (as with RDMA, the engine writes it from other threads).
    pub unsafe fn register_memory(&self, addr: *mut u8, len: usize) -> Result<SegmentInfo> {
        let info = self.inner.register(addr as usize as u64, len as u64)?;
        tracing::debug!(
            segment = info.id.0,
            addr = format_args!("{:#x}", info.base),
            len,
            mode = self
                .inner
                .segments
                .details(info.id)
                .map(|d| d.mode.as_str())
                .unwrap_or("?"),
            "registered"
        );
        Ok(info)
    }

    /// Registers GPU device memory, as [`register_memory`](Self::register_memory) does, but
    /// fails with [`Error::CudaUnavailable`] where CUDA is absent and with
    /// [`Error::InvalidArgument`] when the range is not device memory, instead of treating it
    /// as host memory.
    ///
    /// # Safety
    /// As for [`register_memory`](Self::register_memory): the device range stays allocated
    /// while registered and is not touched while a transfer that writes it is in flight.
    pub unsafe fn register_device_memory(&self, addr: u64, len: usize) -> Result<SegmentInfo> {
        cuda::available()?;
        let placement = cuda::classify(addr, len as u64)?;
        if !placement.is_device() {
            return Err(Error::InvalidArgument(format!(
                "[{addr:#x}, +{len}) is {placement} memory, not GPU memory"
            )));
        }
        self.inner.register_device(addr, len as u64, placement)
    }

    /// Placement, registration mode and rails of local segment `id`.
    pub fn segment_info(&self, id: SegmentId) -> Result<SegmentDetails> {
        let mut d = self.inner.segments.details(id)?;
        if let Some(r) = &self.inner.rdma {
            d.rails = r.keys(id.0).iter().map(|k| k.rail).collect();
        }
        Ok(d)
    }

    /// Registers host memory like [`register_memory`](Self::register_memory), but on the
    /// given rails only (indices into [`rails`](Self::rails)); batches touching it are striped
    /// over the lanes of those rails. `InvalidArgument` on an engine without RDMA, for an
    /// empty list or a rail that does not exist.
    ///
    /// # Safety
    /// As for [`register_memory`](Self::register_memory).
    pub unsafe fn register_memory_on_rails(
        &self,
        addr: *mut u8,
        len: usize,
        rails: &[usize],
    ) -> Result<SegmentInfo> {
        self.inner.register_host_on(addr as u64, len as u64, rails)
    }

    /// This engine's RDMA rails as `device:port`, in rail order (empty over TCP).
    pub fn rails(&self) -> Vec<String> {
        self.inner
            .rdma
            .as_ref()
            .map(|r| {
                r.rails
                    .iter()
                    .map(|x| format!("{}:{}", x.device, x.info.port))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Unregisters a segment. Refused with [`Error::SegmentBusy`] while transfers use it.
    pub fn unregister_memory(&self, segment: SegmentId) -> Result<()> {
        self.inner.unregister(segment)
    }

    /// Allocates and registers `len` zeroed, page-aligned bytes owned by the returned buffer.
    pub fn alloc(&self, len: usize) -> Result<HostBuffer> {
        if len == 0 {
            return Err(Error::ZeroLength {
                what: "registration",
            });
        }
        let mem = RawAlloc::zeroed(len).map_err(|e| Error::io("alloc", e))?;
        let info = self
            .inner
            .register_host(mem.addr(), len as u64, Placement::Host)?;
        Ok(HostBuffer {
            mem: Some(mem),
            info,
            engine: self.inner.clone(),
        })
    }

    /// Every local segment, in id order.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.inner.segments.list()
    }

    /// Connects to the engine listening at `addr`: opens the data connections, exchanges
    /// handshakes, and learns the peer's segments. Each call makes a new peer handle.
    pub fn connect(&self, addr: impl ToSocketAddrs) -> Result<PeerId> {
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| Error::InvalidArgument(format!("peer address: {e}")))?
            .next()
            .ok_or_else(|| Error::InvalidArgument("peer address resolves to nothing".into()))?;
        self.inner.connect(addr)
    }

    /// What is known about `peer`.
    pub fn peer_info(&self, peer: PeerId) -> Result<PeerInfo> {
        Ok(self.inner.peer(peer)?.info.clone())
    }

    /// Every peer this engine has connected to and not disconnected, by id.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .inner
            .peers
            .read()
            .values()
            .map(|p| p.info.clone())
            .collect();
        v.sort_by_key(|p| p.id.0);
        v
    }

    /// The peer's segments as last learned (handshake or refresh).
    pub fn remote_segments(&self, peer: PeerId) -> Result<Vec<SegmentInfo>> {
        let p = self.inner.peer(peer)?;
        let mut v: Vec<_> = p.segments.read().values().map(|d| d.info.clone()).collect();
        v.sort_by_key(|s| s.id);
        Ok(v)
    }

    /// Maps `len` bytes at the peer's address `addr` to (segment, offset), refreshing the peer's
    /// segment list once when no known segment covers them; `RemoteUnregistered` when none
    /// does.
    pub fn resolve_remote(&self, peer: PeerId, addr: u64, len: u64) -> Result<(SegmentId, u64)> {
        let p = self.inner.peer(peer)?;
        let find = |p: &Peer| {
            p.segments
                .read()
                .values()
                .find(|d| {
                    addr >= d.info.base
                        && addr
                            .checked_add(len)
                            .is_some_and(|end| end <= d.info.base + d.info.len)
                })
                .map(|d| (d.info.id, addr - d.info.base))
        };
        if let Some(found) = find(&p) {
            return Ok(found);
        }
        self.inner.refresh(&p)?;
        find(&p).ok_or(Error::RemoteUnregistered { addr, len })
    }

    /// Asks the peer for its current segment list.
    pub fn refresh_segments(&self, peer: PeerId) -> Result<Vec<SegmentInfo>> {
        let p = self.inner.peer(peer)?;
        self.inner.refresh(&p)?;
        self.remote_segments(peer)
    }

    /// Closes the connections to `peer`; its batches in flight fail.
    pub fn disconnect(&self, peer: PeerId) -> Result<()> {
        let p = self
            .inner
            .peers
            .write()
            .remove(&peer.0)
            .ok_or(Error::UnknownPeer { peer: peer.0 })?;
        p.link.close();
        Ok(())
    }

    /// Checks that an engine answers at `addr` (`"ip:port"`), within `timeout` (None: the
    /// configured connect timeout): one connection, one handshake that reveals no segments
    /// and opens no peer on either side, then it closes. Returns the engine's id and epoch
    /// (a restarted engine has a new epoch).
    pub fn probe(&self, addr: impl ToSocketAddrs, timeout: Option<Duration>) -> Result<ProbeReply> {
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| Error::InvalidArgument(format!("peer address: {e}")))?
            .next()
            .ok_or_else(|| Error::InvalidArgument("peer address resolves to nothing".into()))?;
        let timeout = timeout.unwrap_or(self.inner.config.connect_timeout);
        let hello = self.inner.hello(ConnPurpose::Probe, 0, None);
        let (theirs, _stream) = tcp::connect_one(addr, timeout, &hello)?;
        if theirs.purpose != ConnPurpose::Probe {
            return Err(Error::Handshake {
                peer: addr.to_string(),
                reason: format!("a probe was answered as {:?}", theirs.purpose),
            });
        }
        Ok(ProbeReply {
            engine_id: theirs.engine_id,
            epoch: theirs.epoch,
        })
    }

    /// Submits one batch that moves pages of several buffers between this engine and `peer`
    /// (a paged KV cache moved outside the room protocol, as an engine's own backend does):
    /// page `local_pages[i]` of every buffer here and page `remote_pages[i]` of the same
    /// buffer at the peer, for every `i`, in direction `op`. Pages are grouped into runs
    /// contiguous on both sides, one request per run per buffer, and the batch is planned,
    /// coalesced and spread over the lanes like any other. Each buffer's peer address is
    /// resolved once. `timeout`: the batch deadline (None: the default).
    ///
    /// Errors: `InvalidArgument` for lists of different lengths, a negative page, no
    /// buffer, a zero `item_len` or an offset that overflows; then whatever `submit` refuses
    /// (a page outside the registered memory on either side), with nothing sent.
    pub fn submit_pages(
        &self,
        peer: PeerId,
        op: Op,
        buffers: &[PageBuffer],
        local_pages: &[i32],
        remote_pages: &[i32],
        timeout: Option<Duration>,
    ) -> Result<BatchId> {
        if local_pages.len() != remote_pages.len() {
            return Err(Error::InvalidArgument(format!(
                "{} local pages but {} remote pages",
                local_pages.len(),
                remote_pages.len()
            )));
        }
        if buffers.is_empty() || buffers.iter().any(|b| b.item_len == 0) {
            return Err(Error::InvalidArgument(
                "a paged transfer needs buffers with a non-zero item_len".into(),
            ));
        }
        for (pages, what) in [(local_pages, "local"), (remote_pages, "remote")] {
            crate::kv::pages::check_pages(pages, i32::MAX as u64, what)
                .map_err(Error::InvalidArgument)?;
        }
        let paged = buffers
            .iter()
            .map(|b| {
                let (segment, offset) = self.resolve_remote(peer, b.remote, b.item_len)?;
                Ok(crate::kv::pages::PagedBuffer {
                    local: b.local,
                    remote: crate::kv::pages::RemoteBuffer {
                        segment,
                        offset,
                        item_len: b.item_len,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut runs = Vec::new();
        crate::kv::pages::runs(local_pages, remote_pages, &mut runs);
        let mut requests = Vec::new();
        crate::kv::pages::expand_paged(&runs, &paged, op, &mut requests).ok_or_else(|| {
            Error::InvalidArgument("a page's byte offset overflows 64 bits".into())
        })?;
        let timeout = timeout.unwrap_or(self.inner.config.batch_timeout);
        self.inner.submit(peer, &requests, timeout, None)
    }

    /// Submits a batch with the default deadline; returns at once.
    ///
    /// Every request is checked first (local range registered, remote segment known and range
    /// inside it, non-zero length); if one fails nothing is sent and its error is returned.
    pub fn submit(&self, peer: PeerId, requests: &[Request]) -> Result<BatchId> {
        self.submit_with_timeout(peer, requests, self.inner.config.batch_timeout)
    }

    /// Submits a batch that fails if not complete within `timeout`.
    pub fn submit_with_timeout(
        &self,
        peer: PeerId,
        requests: &[Request],
        timeout: Duration,
    ) -> Result<BatchId> {
        self.inner.submit(peer, requests, timeout, None)
    }

    /// Submits a batch that also tells the peer engine, in band, when its data has landed:
    /// each lane's data is followed by a notification part (RDMA WRITE_WITH_IMM, or a frame
    /// on TCP), and the peer's [`notifications`](Self::notifications) reports `tag` once every
    /// part arrived, hence after all the batch's bytes. `tag` keeps its low 24 bits.
    pub fn submit_with_notify(
        &self,
        peer: PeerId,
        requests: &[Request],
        tag: u32,
    ) -> Result<BatchId> {
        self.inner
            .submit(peer, requests, self.inner.config.batch_timeout, Some(tag))
    }

    /// Takes the notifications that completed since the last call (never blocks).
    pub fn notifications(&self) -> Vec<Notification> {
        self.inner.notifier.take()
    }

    /// Status of a batch; never blocks. Drives progress on the batch's connections when no
    /// other thread is doing so. Final statuses stay readable until [`release`](Self::release).
    pub fn poll(&self, batch: BatchId) -> Result<BatchStatus> {
        let b = self.inner.batch(batch)?;
        if !b.is_final() {
            self.inner.progress(&b);
            b.check_deadline(Instant::now());
        }
        Ok(b.status())
    }

    /// Blocks until the batch is done (Ok) or failed (`Error::BatchFailed`), then releases it.
    pub fn wait(&self, batch: BatchId) -> Result<()> {
        let b = self.inner.batch(batch)?;
        self.inner.wait(&b);
        self.release(batch);
        match b.status() {
            BatchStatus::Done => Ok(()),
            BatchStatus::Failed(reason) => Err(Error::BatchFailed {
                batch: batch.0,
                reason,
            }),
            BatchStatus::Pending => unreachable!("wait returns only final batches"),
        }
    }

    /// Forgets a batch id (its status can no longer be polled).
    pub fn release(&self, batch: BatchId) {
        self.inner.batches.lock().remove(&batch.0);
    }

    /// Submits and waits.
    pub fn transfer_sync(&self, peer: PeerId, requests: &[Request]) -> Result<()> {
        let id = self.submit(peer, requests)?;
        self.wait(id)
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
        // Wake every connection served here and wait for its thread: a write being received
        // into registered memory ends with the socket, so none lands once drop returns.
        self.inner.served.stop_and_join();
        for p in &peers {
            p.link
                .join(self.inner.config.batch_timeout.min(Duration::from_secs(5)));
        }
        // Then the rail workers: their lanes are drained (or given up on), so stopping them
        // fails what is left, and once joined no work request is posted or polled.
        self.inner.rdma_stop.store(true, Ordering::Release);
        if let Some(r) = &self.inner.rdma {
            r.stop();
        }
    }
}

impl Engine {
    /// Classifies `[addr, addr + len)` and registers it as host or device memory.
    fn register(&self, addr: u64, len: u64) -> Result<SegmentInfo> {
        if len == 0 {
            return Err(Error::ZeroLength {
                what: "registration",
            });
        }
        let placement = cuda::classify(addr, len)?;
        if placement.is_device() {
            self.register_device(addr, len, placement)
        } else {
            self.register_host(addr, len, placement)
        }
    }

    /// Registers host memory on `rails` only (RDMA engines).
    fn register_host_on(&self, addr: u64, len: u64, rails: &[usize]) -> Result<SegmentInfo> {
        let Some(r) = &self.rdma else {
            return Err(Error::InvalidArgument(
                "rails apply to RDMA engines; this one runs over TCP".into(),
            ));
        };
        if len == 0 {
            return Err(Error::ZeroLength {
                what: "registration",
            });
        }
        r.check_rails(rails)?;
        let info = self
            .segments
            .register_placed(addr, len, MemoryKind::Host, Placed::host())?;
        if let Err(e) = r.register_from(&info, None, Some(rails)) {
            let _ = self.segments.unregister(info.id);
            return Err(e);
        }
        Ok(info)
    }

    /// Registers host memory in the table and, with RDMA, on every rail.
    fn register_host(&self, addr: u64, len: u64, placement: Placement) -> Result<SegmentInfo> {
        let placed = Placed {
            placement,
            ..Placed::host()
        };
        let info = self
            .segments
            .register_placed(addr, len, MemoryKind::Host, placed)?;
        if let Some(r) = &self.rdma {
            if let Err(e) = r.register(&info) {
                let _ = self.segments.unregister(info.id);
                return Err(e);
            }
            // Registered on every rail, so any peer rail can be reached; batches prefer the
            // rails of the memory's NUMA node (its pages are resident now: registration
            // pinned them).
            let node = crate::topology::numa::node_of(addr, len);
            if let (Some(node), Some(topo)) = (node, r.pci()) {
                let names = r.rail_names();
                let at = crate::topology::Placement::Host {
                    numa_node: Some(node),
                };
                let near = crate::topology::rails_for(topo, &names, &at, 1);
                if near.len() < names.len() {
                    tracing::info!(segment = info.id.0, numa_node = node,
                        rails = ?near.iter().map(|&i| names[i]).collect::<Vec<_>>(),
                        "host memory striped over its NUMA node's rails");
                    r.set_near(info.id.0, near);
                }
            }
        }
        Ok(info)
    }

    /// Registers GPU memory: over TCP through staging; over RDMA in the configured mode, or
    /// dmabuf → peermem → staging for `auto`, logging each failure before falling back.
    fn register_device(&self, addr: u64, len: u64, placement: Placement) -> Result<SegmentInfo> {
        let Placement::Device { ordinal, .. } = placement else {
            return self.register_host(addr, len, placement);
        };
        let Some(r) = &self.rdma else {
            if !matches!(self.config.gpu_mode, GpuMode::Auto | GpuMode::Staging) {
                tracing::info!(
                    gpu_mode = self.config.gpu_mode.as_str(),
                    "TCP moves GPU memory through host staging; gpu_mode applies to RDMA only"
                );
            }
            let placed = Placed {
                placement: placement.clone(),
                mode: RegMode::Staging,
                staging: Some(cuda::staging(ordinal)?),
            };
            let info = self
                .segments
                .register_placed(addr, len, MemoryKind::Gpu, placed)?;
            tracing::info!(segment = info.id.0, %placement, mode = "staging", "GPU memory registered");
            return Ok(info);
        };
        let order: &[RegMode] = match self.config.gpu_mode {
            GpuMode::Auto => &[RegMode::Dmabuf, RegMode::Peermem, RegMode::Staging],
            GpuMode::Dmabuf => &[RegMode::Dmabuf],
            GpuMode::Peermem => &[RegMode::Peermem],
            GpuMode::Staging => &[RegMode::Staging],
        };
        let placed = Placed {
            placement: placement.clone(),
            mode: order[0],
            staging: None,
        };
        let info = self
            .segments
            .register_placed(addr, len, MemoryKind::Gpu, placed)?;
        let rails = gpu_rails(r, &placement, self.config.rails_per_gpu);
        let mut last = None;
        for (i, &mode) in order.iter().enumerate() {
            let attempt = match mode {
                RegMode::Dmabuf => cuda::export_dmabuf(ordinal, addr, len).and_then(|x| {
                    use std::os::fd::AsFd;
                    // The MRs keep the dma-buf referenced; the fd closes when `x` drops.
                    r.register_from(&info, Some((x.fd.as_fd(), x.offset)), rails.as_deref())
                        .map(|_| info.clone())
                }),
                RegMode::Peermem => r
                    .register_from(&info, None, rails.as_deref())
                    .map(|_| info.clone()),
                // No memory region: batches that touch this segment go over the peer's TCP
                // control connection, through pinned bounce buffers. The placeholder entry
                // gives way to one that carries the device copies.
                RegMode::Staging | RegMode::Host => cuda::staging(ordinal).and_then(|copier| {
                    self.segments.unregister(info.id)?;
                    let placed = Placed {
                        placement: placement.clone(),
                        mode: RegMode::Staging,
                        staging: Some(copier),
                    };
                    self.segments
                        .register_placed(addr, len, MemoryKind::Gpu, placed)
                }),
            };
            match attempt {
                Ok(done) => {
                    if done.id == info.id {
                        self.segments.set_mode(info.id, mode);
                    }
                    tracing::info!(segment = done.id.0, %placement, %mode, "GPU memory registered");
                    return Ok(done);
                }
                Err(e) => {
                    if let Some(next) = order.get(i + 1) {
                        tracing::warn!(segment = info.id.0, %placement,
                            "GPU registration mode {mode} failed, falling back to {next}: {e}");
                    } else {
                        tracing::warn!(segment = info.id.0, %placement,
                            "GPU registration mode {mode} failed: {e}");
                    }
                    last = Some(e);
                }
            }
        }
        let _ = self.segments.unregister(info.id);
        Err(last.expect("at least one mode was tried"))
    }

    /// Registers host memory as if it were GPU memory reached through staging, with `copier`
    /// standing in for the device copies: drives the staging paths on hosts without a GPU.
    #[cfg(test)]
    pub(crate) fn register_emulated_device(
        &self,
        addr: u64,
        len: u64,
        copier: Arc<dyn crate::cuda::DeviceCopy>,
    ) -> Result<SegmentInfo> {
        let placed = Placed {
            placement: Placement::Device {
                ordinal: 0,
                pci_bus_id: "emulated".into(),
            },
            mode: RegMode::Staging,
            staging: Some(copier),
        };
        self.segments
            .register_placed(addr, len, MemoryKind::Gpu, placed)
    }

    fn unregister(&self, id: SegmentId) -> Result<()> {
        self.segments.unregister(id)?;
        if let Some(r) = &self.rdma {
            r.unregister(id.0);
        }
        Ok(())
    }

    /// Every segment with its per-rail keys, as peers see them.
    fn describe_segments(
        segments: &SegmentTable,
        rdma: Option<&RdmaTransport>,
    ) -> Vec<SegmentDesc> {
        segments
            .list()
            .into_iter()
            .map(|info| SegmentDesc {
                keys: rdma.map(|r| r.keys(info.id.0)).unwrap_or_default(),
                info,
            })
            .collect()
    }

    fn hello(&self, purpose: ConnPurpose, conn_index: u16, rdma: Option<&RdmaEndpoint>) -> Hello {
        let mut endpoints = vec![Endpoint {
            transport: TransportId::Tcp,
            data: Vec::new(),
        }];
        if let Some(e) = rdma {
            endpoints.push(Endpoint {
                transport: TransportId::Rdma,
                data: e.encode(),
            });
        }
        // A probe learns only that this engine is alive and which run it is.
        let segments = if purpose == ConnPurpose::Probe {
            endpoints.clear();
            Vec::new()
        } else {
            Self::describe_segments(&self.segments, self.rdma.as_deref())
        };
        Hello {
            engine_id: self.engine_id,
            epoch: self.epoch,
            purpose,
            conn_index,
            segments,
            endpoints,
        }
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        while !self.shutdown.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((s, from)) => {
                    let wake = match s.try_clone() {
                        Ok(w) => w,
                        Err(err) => {
                            tracing::error!("cannot serve {from}: dup: {err}");
                            continue;
                        }
                    };
                    let id = self.served.add_socket(wake);
                    let e = self.clone();
                    let spawned =
                        thread::Builder::new()
                            .name("kvt-serve".into())
                            .spawn(move || {
                                e.clone().serve_conn(s, from);
                                e.served.remove_socket(id);
                            });
                    match spawned {
                        Ok(t) => self.served.add_thread(t),
                        Err(err) => {
                            self.served.remove_socket(id);
                            tracing::error!("cannot start a thread for {from}: {err}");
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut fds = [nix::poll::PollFd::new(
                        listener.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8));
                }
                Err(_) if self.shutdown.load(Ordering::Acquire) => break,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn serve_conn(self: Arc<Self>, mut s: TcpStream, from: SocketAddr) {
        let peer = from.to_string();
        let mut accepted = None;
        let setup = (|| -> Result<Hello> {
            s.set_nonblocking(false)
                .map_err(|e| Error::io("fcntl", e))?;
            s.set_nodelay(true)
                .map_err(|e| Error::io("setsockopt(TCP_NODELAY)", e))?;
            s.set_read_timeout(Some(self.config.connect_timeout))
                .map_err(|e| Error::io("setsockopt", e))?;
            s.set_write_timeout(Some(self.config.connect_timeout))
                .map_err(|e| Error::io("setsockopt", e))?;
            let theirs = tcp::read_hello(&mut s, &peer)?;
            let offer = rdma_endpoint(&theirs)?;
            let answer = match (&self.rdma, offer) {
                (Some(r), Some(offer)) if theirs.purpose == ConnPurpose::Control => {
                    let (answer, qps) = r.accept(&offer, theirs.engine_id, theirs.epoch)?;
                    accepted = Some(qps);
                    Some(answer)
                }
                _ => None,
            };
            tcp::write_hello(
                &mut s,
                &self.hello(theirs.purpose, theirs.conn_index, answer.as_ref()),
                &peer,
            )?;
            Ok(theirs)
        })();
        match setup {
            Ok(h) if h.purpose == ConnPurpose::Probe => {
                tracing::debug!(%peer, "answered a liveness probe");
            }
            Ok(h) if h.purpose == ConnPurpose::Kv => {
                let acceptor = self.kv_acceptor.read().clone();
                match acceptor {
                    Some(a) => a(s, &h, from),
                    None => tracing::warn!(%peer, "closing a KV channel: no KV manager here"),
                }
            }
            Ok(h) => {
                tracing::debug!(%peer, epoch = format_args!("{:#x}", h.epoch), conn = h.conn_index,
                    rdma = accepted.is_some(), "connection accepted");
                let rdma = self.rdma.clone();
                let segments = self.segments.clone();
                let ctx = ServeContext {
                    segments: self.segments.clone(),
                    describe: Arc::new(move || {
                        Engine::describe_segments(&segments, rdma.as_deref())
                    }),
                    notifier: self.notifier.clone(),
                    fences: self.fences.clone(),
                    shutdown: self.shutdown.clone(),
                    busy_poll: self.config.busy_poll,
                    stall: self.config.batch_timeout,
                    peer,
                    peer_engine: h.engine_id,
                    peer_epoch: h.epoch,
                };
                tcp::serve(s, ctx);
                // The control connection is gone: the peer's QPs stop here (AcceptedQps drop).
                drop(accepted);
            }
            Err(e) => tracing::warn!(%peer, "rejecting connection: {e}"),
        }
    }

    fn connect(&self, addr: SocketAddr) -> Result<PeerId> {
        let peer = addr.to_string();
        let timeout = self.config.connect_timeout;
        let stall = self.config.batch_timeout;
        let prepared = match &self.rdma {
            Some(r) => Some(RdmaLink::prepare(r, self.config.qps_per_rail)?),
            None => None,
        };
        let offer = prepared.as_ref().map(|(_, o)| o.clone());
        let purpose = if offer.is_some() {
            ConnPurpose::Control
        } else {
            ConnPurpose::TcpData
        };
        let (theirs, first) =
            tcp::connect_one(addr, timeout, &self.hello(purpose, 0, offer.as_ref()))?;
        let answer = rdma_endpoint(&theirs)?;
        let link: Box<dyn PeerLink> = match (prepared, answer) {
            (Some((lanes, _)), Some(answer)) => {
                let r = self.rdma.as_ref().expect("prepared with rdma");
                let control = TcpLink::start(vec![first], &peer, theirs.epoch, stall)?;
                Box::new(RdmaLink::finish(r, lanes, &answer, Box::new(control))?)
            }
            (prepared, _) => {
                if prepared.is_some() && self.config.transport == TransportKind::Rdma {
                    return Err(Error::TransportUnavailable {
                        transport: "rdma",
                        reason: format!("peer {peer} offers no RDMA endpoint"),
                    });
                }
                let mut streams = vec![first];
                for i in 1..self.config.connections_per_peer {
                    let (h, s) = tcp::connect_one(
                        addr,
                        timeout,
                        &self.hello(ConnPurpose::TcpData, i as u16, None),
                    )?;
                    if (h.engine_id, h.epoch) != (theirs.engine_id, theirs.epoch) {
                        return Err(Error::Handshake {
                            peer,
                            reason: "peer restarted while connections were being opened".into(),
                        });
                    }
                    streams.push(s);
                }
                Box::new(TcpLink::start(streams, &peer, theirs.epoch, stall)?)
            }
        };
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let info = PeerInfo {
            id: PeerId(id),
            addr,
            engine_id: theirs.engine_id,
            epoch: theirs.epoch,
            transport: link.name(),
            lanes: link.lanes(),
        };
        let segments = theirs
            .segments
            .into_iter()
            .map(|d| (d.info.id.0, d))
            .collect();
        tracing::info!(peer = %addr, epoch = format_args!("{:#x}", info.epoch), lanes = info.lanes,
            transport = info.transport, "connected");
        self.peers.write().insert(
            id,
            Arc::new(Peer {
                info,
                segments: RwLock::new(segments),
                link,
            }),
        );
        Ok(PeerId(id))
    }

    fn peer(&self, id: PeerId) -> Result<Arc<Peer>> {
        self.peers
            .read()
            .get(&id.0)
            .cloned()
            .ok_or(Error::UnknownPeer { peer: id.0 })
    }

    fn batch(&self, id: BatchId) -> Result<Arc<Batch>> {
        self.batches
            .lock()
            .get(&id.0)
            .cloned()
            .ok_or(Error::UnknownBatch { batch: id.0 })
    }

    fn refresh(&self, p: &Peer) -> Result<()> {
        let bytes = p.link.fetch_segments(self.config.connect_timeout)?;
        let list = decode_segments(&bytes)?;
        *p.segments.write() = list.into_iter().map(|d| (d.info.id.0, d)).collect();
        Ok(())
    }

    /// Checks every request and pins the local segments they use (deduplicated).
    fn validate(&self, p: &Peer, requests: &[Request]) -> Result<Vec<SegmentGuard>> {
        let mut guards: Vec<SegmentGuard> = Vec::new();
        let mut refreshed = false;
        let mut remote = p.segments.read();
        let mut last_remote: Option<SegmentInfo> = None;
        for r in requests {
            if r.len == 0 {
                return Err(Error::ZeroLength { what: "request" });
            }
            let covered = guards.iter().any(|g| {
                let s = &g.segment().info;
                r.local_addr >= s.base
                    && r.local_addr
                        .checked_add(r.len)
                        .is_some_and(|e| e <= s.base + s.len)
            });
            if !covered {
                guards.push(self.segments.pin_local(r.local_addr, r.len)?);
            }
            if last_remote
                .as_ref()
                .is_none_or(|s| s.id != r.remote_segment)
            {
                let mut found = remote.get(&r.remote_segment.0).map(|d| d.info.clone());
                if found.is_none() && !refreshed {
                    // The peer may have registered it after the handshake.
                    drop(remote);
                    self.refresh(p)?;
                    refreshed = true;
                    remote = p.segments.read();
                    found = remote.get(&r.remote_segment.0).map(|d| d.info.clone());
                }
                last_remote = Some(found.ok_or(Error::UnknownSegment {
                    segment: r.remote_segment.0,
                })?);
            }
            last_remote
                .as_ref()
                .expect("set above")
                .check_range(r.remote_offset, r.len)?;
        }
        Ok(guards)
    }

    fn submit(
        &self,
        peer: PeerId,
        requests: &[Request],
        timeout: Duration,
        notify: Option<u32>,
    ) -> Result<BatchId> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        let p = self.peer(peer)?;
        p.check_alive()?;
        if requests.is_empty() {
            return Err(Error::InvalidArgument(
                "a batch needs at least one request".into(),
            ));
        }
        let guards: Arc<[SegmentGuard]> = self.validate(&p, requests)?.into();
        // The lanes whose rails carry every segment of the batch (all lanes unless a segment
        // was registered on some rails only), or on RDMA the staging lane alone when a
        // segment of either side is staged; the planner numbers them 0..lanes.
        let allowed = self.allowed_lanes(&p, &guards, requests)?;
        let lanes = allowed.len();
        let total: u64 = requests.iter().map(|r| r.len).sum();
        let first_lane = if total <= self.config.min_stripe_bytes {
            // A small batch goes to the idlest lane (ties: the lowest), so one stream of small
            // transfers stays on one hot connection while concurrent submitters spread out.
            (0..lanes)
                .min_by_key(|&i| p.link.outstanding(allowed[i]))
                .unwrap_or(0)
        } else {
            self.lane_rotation.fetch_add(1, Ordering::Relaxed) % lanes
        };
        let params = PlanParams {
            max_slice: self.config.slice_size,
            lanes,
            min_stripe_bytes: self.config.min_stripe_bytes,
            first_lane,
        };
        let planned = plan(requests, &params);
        let units: u32 = planned
            .lanes
            .iter()
            .enumerate()
            .map(|(i, l)| p.link.units_of(allowed[i], l))
            .sum();
        let used: Vec<u16> = (0..lanes)
            .filter(|i| !planned.lanes[*i].is_empty())
            .map(|i| allowed[i] as u16)
            .collect();
        let notify = notify.map(|tag| notify::imm_encode(tag, used.len() as u32));
        let id = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let batch = Arc::new(Batch::new(
            id,
            peer.0,
            timeout,
            units,
            used,
            guards.to_vec(),
        ));
        self.batches.lock().insert(id, batch.clone());
        let inline = planned.total_bytes <= self.config.inline_bytes;
        let remote_segments = p.segments.read();
        let remote = |seg: u32, rail: u16| {
            remote_segments.get(&seg).and_then(|d| {
                d.keys
                    .iter()
                    .find(|k| k.rail == rail)
                    .map(|k| (d.info.base, k.rkey))
            })
        };
        for (lane, slices) in planned.lanes.into_iter().enumerate() {
            if !slices.is_empty() {
                let work = Work {
                    batch: batch.clone(),
                    slices,
                    guards: guards.clone(),
                    notify,
                };
                p.link.post(allowed[lane], work, inline, &remote);
            }
        }
        Ok(BatchId(id))
    }

    /// Lanes of `p` whose local rail carries every local segment of the batch and whose
    /// remote rail carries every remote one; on RDMA the staging lane alone when the batch
    /// touches GPU memory reached through staging (a local segment with device copies, or a
    /// remote one no rail of the peer can reach: no memory key).
    fn allowed_lanes(
        &self,
        p: &Peer,
        guards: &[SegmentGuard],
        requests: &[Request],
    ) -> Result<Vec<usize>> {
        let (Some(rails), Some(r)) = (p.link.lane_rails(), &self.rdma) else {
            return Ok((0..p.link.lanes()).collect());
        };
        let locals: Vec<u32> = guards.iter().map(|g| g.segment().info.id.0).collect();
        let mut remotes: Vec<u32> = requests.iter().map(|q| q.remote_segment.0).collect();
        remotes.sort_unstable();
        remotes.dedup();
        let segments = p.segments.read();
        let staged = guards.iter().any(|g| g.segment().staging().is_some())
            || remotes
                .iter()
                .any(|s| segments.get(s).is_some_and(|d| d.keys.is_empty()));
        if let (true, Some(lane)) = (staged, p.link.staging_lane()) {
            return Ok(vec![lane]);
        }
        let ok: Vec<usize> = rails
            .iter()
            .enumerate()
            .filter(|(_, (local, remote))| {
                locals.iter().all(|&s| r.lkey(s, *local).is_some())
                    && remotes.iter().all(|s| {
                        segments
                            .get(s)
                            .is_some_and(|d| d.keys.iter().any(|k| k.rail == *remote))
                    })
            })
            .map(|(i, _)| i)
            .collect();
        let near: Vec<Vec<usize>> = locals.iter().filter_map(|&s| r.near(s)).collect();
        let ok = prefer_near(ok, &rails, &near);
        if ok.is_empty() {
            return Err(Error::TransportUnavailable {
                transport: "rdma",
                reason: format!(
                    "no lane to {} joins a rail of local segment(s) {locals:?} to a rail of \
                     remote segment(s) {remotes:?}",
                    p.info.addr
                ),
            });
        }
        Ok(ok)
    }

    fn lanes_of<'a>(&self, b: &'a Batch) -> Option<(Arc<Peer>, &'a [u16])> {
        let p = self.peers.read().get(&b.peer).cloned()?;
        Some((p, &b.lanes))
    }

    fn progress(&self, b: &Batch) {
        if let Some((p, lanes)) = self.lanes_of(b) {
            for &l in lanes {
                p.link.progress(l as usize);
            }
        }
    }

    fn wait(&self, b: &Batch) {
        let spin_until = Instant::now() + self.config.busy_poll.max(Duration::from_micros(20));
        if let Some((p, lanes)) = self.lanes_of(b) {
            // Spin first, reading the connections ourselves: waking a sleeping thread costs
            // more than a small transfer takes.
            lanes.iter().for_each(|&l| p.link.start_driving(l as usize));
            while !b.is_final() && Instant::now() < spin_until {
                for &l in lanes {
                    p.link.progress(l as usize);
                }
                if b.is_final() || b.check_deadline(Instant::now()) {
                    break;
                }
                thread::yield_now();
            }
            let sleeping = !b.is_final();
            lanes
                .iter()
                .for_each(|&l| p.link.stop_driving(l as usize, sleeping));
        }
        while !b.is_final() {
            let now = Instant::now();
            if b.check_deadline(now) {
                break;
            }
            b.sleep_until((now + Duration::from_millis(5)).min(b.deadline.max(now)));
        }
    }
}

/// Takes over an accepted KV channel: the stream (handshake done), the peer's hello, its
/// address. Runs on the connection's own thread, for as long as the channel lives.
pub(crate) type KvAcceptor = Arc<dyn Fn(TcpStream, &Hello, SocketAddr) + Send + Sync>;

/// Crate-internal hooks the KV layer builds on.
impl TransferEngine {
    /// Installs the consumer of incoming KV channels (one KV manager per engine).
    pub(crate) fn set_kv_acceptor(&self, acceptor: Option<KvAcceptor>) {
        *self.inner.kv_acceptor.write() = acceptor;
    }

    /// Installs the consumer that sees complete notifications before `notifications()`.
    pub(crate) fn set_notify_hook(&self, hook: Option<crate::transport::notify::NotifyHook>) {
        self.inner.notifier.set_hook(hook);
    }

    /// Opens a KV channel to the engine at `addr`: returns its hello and the stream (blocking,
    /// no timeouts set).
    pub(crate) fn open_kv_channel(&self, addr: SocketAddr) -> Result<(Hello, TcpStream)> {
        let e = &self.inner;
        tcp::connect_one(
            addr,
            e.config.connect_timeout,
            &e.hello(ConnPurpose::Kv, 0, None),
        )
    }

    /// The fences of rooms this engine receives.
    pub(crate) fn fences(&self) -> &Arc<RoomFences> {
        &self.inner.fences
    }

    /// Stops every RDMA write from peer `(engine_id, epoch)` into this engine (its QPs go to
    /// ERROR). Returns false when the engine has no RDMA transport.
    pub(crate) fn stop_inbound(&self, engine_id: u64, epoch: u64) -> bool {
        match &self.inner.rdma {
            Some(r) => {
                let n = r.stop_inbound(engine_id, epoch);
                tracing::info!(
                    n,
                    engine = format_args!("{engine_id:#x}"),
                    "stopped inbound QPs"
                );
                true
            }
            None => false,
        }
    }

    /// `submit_with_notify` with its own deadline.
    pub(crate) fn submit_notify(
        &self,
        peer: PeerId,
        requests: &[Request],
        timeout: Duration,
        tag: u32,
    ) -> Result<BatchId> {
        self.inner.submit(peer, requests, timeout, Some(tag))
    }

    /// The batch behind `id`.
    pub(crate) fn batch_handle(&self, id: BatchId) -> Result<Arc<Batch>> {
        self.inner.batch(id)
    }
}

/// The RDMA endpoint a handshake carries, if any.
fn rdma_endpoint(h: &Hello) -> Result<Option<RdmaEndpoint>> {
    match h
        .endpoints
        .iter()
        .find(|e| e.transport == TransportId::Rdma)
    {
        Some(e) => Ok(Some(RdmaEndpoint::decode(&e.data)?)),
        None => Ok(None),
    }
}

/// Of the lanes `ok` (indices into `rails`, each lane's (local rail, remote rail)), those
/// whose local rail is near every segment in `near` (each a list of preferred rails), when
/// there is one; else `ok` unchanged: reaching the peer beats staying near.
fn prefer_near(ok: Vec<usize>, rails: &[(usize, u16)], near: &[Vec<usize>]) -> Vec<usize> {
    if near.is_empty() {
        return ok;
    }
    let preferred: Vec<usize> = ok
        .iter()
        .copied()
        .filter(|&l| near.iter().all(|n| n.contains(&rails[l].0)))
        .collect();
    if preferred.is_empty() { ok } else { preferred }
}

/// The rails GPU memory at `placement` is registered on and striped over: the
/// `rails_per_gpu` nearest to the GPU by PCIe distance (`topology::rails_for`); `None` (every
/// rail) when the PCI topology cannot be read.
fn gpu_rails(r: &RdmaTransport, placement: &Placement, rails_per_gpu: usize) -> Option<Vec<usize>> {
    let Placement::Device { pci_bus_id, .. } = placement else {
        return None;
    };
    let topo = r.pci()?;
    let names = r.rail_names();
    let at = crate::topology::Placement::Gpu {
        pci: pci_bus_id.clone(),
    };
    let rails = crate::topology::rails_for(topo, &names, &at, rails_per_gpu);
    tracing::info!(gpu = %pci_bus_id, rails = ?rails.iter().map(|&i| names[i]).collect::<Vec<_>>(),
        "GPU memory registered on its nearest rails");
    Some(rails)
}

/// Discovers the RDMA rails this config allows and opens them.
fn open_rdma(
    config: &EngineConfig,
    notifier: &Arc<Notifier>,
    shutdown: &Arc<AtomicBool>,
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
    )
}

/// Page-aligned host memory allocated and registered by an engine; unregistered on drop.
///
/// Its bytes are reached only through [`read`](Self::read) and [`write`](Self::write),
/// which copy through raw pointers: the buffer never lends a `&[u8]` into memory that a
/// peer, a NIC or the engine's threads may write at any moment.
///
/// The contract is the one a NIC imposes on registered memory: do not `read` a range while a
/// transfer that writes it is in flight (you would see some mix of old and new bytes), and
/// do not `write` a range while a transfer reads or writes it. Once the batch has completed
/// (or failed, or the engine has been dropped) the range is yours again.
pub struct HostBuffer {
    mem: Option<RawAlloc>,
    info: SegmentInfo,
    engine: Arc<Engine>,
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("segment", &self.info.id)
            .field("addr", &self.info.base)
            .field("len", &self.info.len)
            .finish()
    }
}

impl HostBuffer {
    /// Start address (for [`Request::local_addr`]).
    pub fn addr(&self) -> u64 {
        self.info.base
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.info.len as usize
    }
    /// Always false: buffers have at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The segment id peers address it by.
    pub fn segment(&self) -> SegmentId {
        self.info.id
    }
    /// Copies bytes out, starting at `offset` (see the type's contract). Panics when the
    /// range exceeds the buffer.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        self.mem.as_ref().expect("allocated").read_at(offset, dst)
    }
    /// Copies bytes in, starting at `offset` (see the type's contract). Panics when the
    /// range exceeds the buffer.
    pub fn write(&self, offset: usize, src: &[u8]) {
        self.mem.as_ref().expect("allocated").write_at(offset, src)
    }
    /// A copy of the whole buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        self.read(0, &mut v);
        v
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if let Err(e) = self.engine.unregister(self.info.id) {
            if !matches!(e, Error::UnknownSegment { .. }) {
                // A transfer may still touch it: leaking is the only safe choice.
                tracing::error!("leaking buffer of segment {}: {e}", self.info.id);
                std::mem::forget(self.mem.take());
            }
        }
    }
}

#[cfg(test)]
mod lane_tests {
    use super::prefer_near;

    /// Four lanes: local rails 0, 1, 2, 3 to the peer's same rails.
    const RAILS: [(usize, u16); 4] = [(0, 0), (1, 1), (2, 2), (3, 3)];

    #[test]
    fn near_rails_narrow_the_lanes() {
        assert_eq!(prefer_near(vec![0, 1, 2, 3], &RAILS, &[vec![2, 3]]), [2, 3]);
        // Two local segments: only lanes near both.
        assert_eq!(
            prefer_near(vec![0, 1, 2, 3], &RAILS, &[vec![1, 2, 3], vec![0, 1, 2]]),
            [1, 2]
        );
    }

    #[test]
    fn reaching_the_peer_beats_staying_near() {
        // The peer's segment sits on rails 0 and 1 only, the local one is near 2 and 3.
        assert_eq!(prefer_near(vec![0, 1], &RAILS, &[vec![2, 3]]), [0, 1]);
        assert_eq!(prefer_near(vec![0, 1, 2, 3], &RAILS, &[]), [0, 1, 2, 3]);
        assert_eq!(prefer_near(vec![], &RAILS, &[vec![0]]), Vec::<usize>::new());
    }
}

#[cfg(test)]
mod staging_tests {
    //! GPU segments in staging mode over TCP, with host memory standing in for the device
    //! (`HostEmulatedDevice` copies with memcpy): the frames, bounce buffers, chunking and
    //! landing are the ones a real GPU uses; only the copy itself differs.
    use super::*;
    use crate::cuda::{HostEmulatedDevice, STAGE_CHUNK};
    use crate::request::Request;
    use std::sync::atomic::Ordering;

    fn engine() -> TransferEngine {
        TransferEngine::new(
            EngineConfig::builder()
                .transport(TransportKind::Tcp)
                .slice_size(8 << 20)
                .build()
                .unwrap(),
        )
        .unwrap()
    }

    /// An RDMA engine on Soft-RoCE device `dev`, inside the guest of scripts/rdma-tests.sh
    /// (`KVT_VM=1`); `None` elsewhere.
    fn rdma_engine(dev: &str) -> Option<TransferEngine> {
        if std::env::var("KVT_VM").as_deref() != Ok("1") {
            eprintln!("skipped: not inside the Soft-RoCE guest (run scripts/rdma-tests.sh)");
            return None;
        }
        let gid = std::env::var("KVT_GID_INDEX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let config = EngineConfig::builder()
            .transport(TransportKind::Rdma)
            .devices([dev])
            .gid_index(gid)
            .slice_size(8 << 20)
            .batch_timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Some(TransferEngine::new(config).unwrap_or_else(|e| panic!("rdma engine on {dev}: {e}")))
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    }

    type Emulated = Arc<HostEmulatedDevice>;

    /// Registers `src` on `initiator` and `dst` on `target` as staged GPU memory, each with its
    /// own emulated device.
    fn emulated_pair(
        initiator: &TransferEngine,
        target: &TransferEngine,
        src: &RawAlloc,
        dst: &RawAlloc,
    ) -> (Emulated, SegmentInfo, Emulated, SegmentInfo) {
        let (dev_src, dev_dst) = (
            Arc::new(HostEmulatedDevice::default()),
            Arc::new(HostEmulatedDevice::default()),
        );
        let s = initiator
            .inner
            .register_emulated_device(src.addr(), src.len() as u64, dev_src.clone())
            .unwrap();
        let d = target
            .inner
            .register_emulated_device(dst.addr(), dst.len() as u64, dev_dst.clone())
            .unwrap();
        (dev_src, s, dev_dst, d)
    }

    #[test]
    fn gpu_to_gpu_over_tcp_through_staging() {
        round_trip_through_staging(&engine(), &engine());
    }

    /// Scattered pages from and to staged memory are gathered into bounce buffers: one wait
    /// on the device per bounce buffer, not one per page, on either side.
    #[test]
    fn scattered_staged_pages_share_device_copies() {
        // 4 KiB pages go through the reader's buffer, 36 KiB ones straight into the bounce.
        scattered_staged_pages(4096, 1500);
        scattered_staged_pages(36 << 10, 200);
    }

    fn scattered_staged_pages(page: usize, pages: usize) {
        let (target, initiator) = (engine(), engine());
        let len = 2 * page * pages;
        let src = RawAlloc::zeroed(len).unwrap();
        let dst = RawAlloc::zeroed(len).unwrap();
        let data = pattern(len, 5);
        src.write_at(0, &data);
        let (dev_src, _, dev_dst, d) = emulated_pair(&initiator, &target, &src, &dst);
        let peer = initiator.connect(target.local_addr()).unwrap();
        // Every other page, to reversed places: nothing coalesces.
        let reqs: Vec<Request> = (0..pages)
            .map(|p| {
                let from = (2 * p * page) as u64;
                let to = (2 * (pages - 1 - p) * page) as u64;
                Request::write(src.addr() + from, page as u64, d.id, to)
            })
            .collect();
        initiator.transfer_sync(peer, &reqs).unwrap();
        let mut got = vec![0u8; len];
        dst.read_at(0, &mut got);
        for p in 0..pages {
            let (from, to) = (2 * p * page, 2 * (pages - 1 - p) * page);
            assert!(got[to..to + page] == data[from..from + page], "page {p}");
        }
        // A few bounce buffers' worth, split over the lanes.
        let lanes = initiator.peer_info(peer).unwrap().lanes as u64;
        let buffers = (page * pages).div_ceil(STAGE_CHUNK) as u64;
        for (side, dev) in [("sender", &dev_src), ("target", &dev_dst)] {
            let copies = dev.copies.load(Ordering::Relaxed);
            eprintln!("{side}: {copies} device copies for {pages} pages of {page} bytes");
            assert!(
                copies <= buffers + 2 * lanes,
                "{side}: {copies} device copies for {pages} pages"
            );
        }
    }

    /// Gathered staged writes keep their room's gate held until they land: once a fence on
    /// the room returns, the staged memory no longer changes.
    #[test]
    fn a_fenced_room_gets_no_late_gathered_write() {
        let (target, initiator) = (engine(), engine());
        let (page, pages) = (4096usize, 8192usize);
        let len = 2 * page * pages;
        let (src, dst) = (
            RawAlloc::zeroed(len).unwrap(),
            RawAlloc::zeroed(len).unwrap(),
        );
        src.write_at(0, &pattern(len, 11));
        let (_, _, dev_dst, d) = emulated_pair(&initiator, &target, &src, &dst);
        let peer = initiator.connect(target.local_addr()).unwrap();
        let reqs: Vec<Request> = (0..pages)
            .map(|p| {
                let (from, to) = ((2 * p * page) as u64, (2 * (pages - 1 - p) * page) as u64);
                Request::write(src.addr() + from, page as u64, d.id, to)
            })
            .collect();
        let slot = 77u32;
        let t0 = Instant::now();
        let b = initiator
            .submit_with_notify(
                peer,
                &reqs,
                slot << crate::transport::fence::ROOM_SLOT_SHIFT,
            )
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while dev_dst.copies.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            thread::yield_now();
        }
        let key = (initiator.engine_id(), initiator.epoch(), slot);
        assert!(
            target.inner.fences.fence(key, Duration::from_secs(10)),
            "fence in time"
        );
        eprintln!("fence returned at {:?}", t0.elapsed());
        let mut before = vec![0u8; len];
        dst.read_at(0, &mut before);
        let landed = before.iter().filter(|&&x| x != 0).count();
        eprintln!(
            "fenced at {:?}: {landed} of {len} bytes landed",
            t0.elapsed()
        );
        let result = initiator.wait(b);
        eprintln!("batch over at {:?}: {result:?}", t0.elapsed());
        thread::sleep(Duration::from_millis(200));
        let mut after = vec![0u8; len];
        dst.read_at(0, &mut after);
        assert!(before == after, "staged memory changed after the fence");
        assert!(landed > 0, "some pages landed before the fence");
        if landed < len / 4 {
            // Less than half of the pages: the batch cannot have completed.
            let e = result.expect_err("writes after the fence are refused");
            assert!(e.to_string().contains("aborted"), "{e}");
        }
    }

    /// Over RDMA, batches touching a staged segment (on either side) take the control
    /// connection; the others keep the QPs.
    #[test]
    fn gpu_to_gpu_over_rdma_through_staging() {
        let (Some(target), Some(initiator)) = (rdma_engine("rxeA0"), rdma_engine("rxeB0")) else {
            return;
        };
        assert_eq!(
            (target.transport(), initiator.transport()),
            ("rdma", "rdma")
        );
        let peer = round_trip_through_staging(&target, &initiator);
        let staging_lane = initiator
            .inner
            .peer(peer)
            .unwrap()
            .link
            .staging_lane()
            .unwrap();

        // A staged destination is announced without memory keys; a notified batch to it
        // arrives through the control connection, and the notification follows the bytes.
        let len = STAGE_CHUNK + 12_345;
        let dst = RawAlloc::zeroed(len).unwrap();
        let dev = Arc::new(HostEmulatedDevice::default());
        let d = target
            .inner
            .register_emulated_device(dst.addr(), len as u64, dev.clone())
            .unwrap();
        let host = initiator.alloc(len).unwrap();
        let data = pattern(len, 21);
        host.write(0, &data);
        let reqs = [Request::write(host.addr(), len as u64, d.id, 0)];
        let b = initiator.submit_with_notify(peer, &reqs, 0x5a5a).unwrap();
        assert_eq!(
            initiator.inner.batch(b).unwrap().lanes,
            [staging_lane as u16]
        );
        initiator.wait(b).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while seen.is_empty() && Instant::now() < deadline {
            seen = target.notifications();
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(seen.len(), 1, "one notification for the staged batch");
        assert_eq!(seen[0].tag, 0x5a5a);
        let mut got = vec![0u8; len];
        dst.read_at(0, &mut got);
        assert!(got == data, "host → staged device bytes differ");
        assert!(dev.copies.load(Ordering::Relaxed) >= 2, "H2D copies");

        // Host ↔ host on the same link still goes over the QPs.
        let there = target.alloc(4096).unwrap();
        let b = initiator
            .submit(
                peer,
                &[Request::write(host.addr(), 4096, there.segment(), 0)],
            )
            .unwrap();
        let lanes = initiator.inner.batch(b).unwrap().lanes.clone();
        initiator.wait(b).unwrap();
        assert!(
            lanes.iter().all(|&l| (l as usize) < staging_lane),
            "QP lanes: {lanes:?}"
        );
        assert!(
            there.to_vec() == data[..4096],
            "host → host over the QPs differs"
        );
    }

    /// Moves bytes device → device, device → host, host → device and device → device by read
    /// between two engines whose GPU segments are staged; returns initiator's peer id of
    /// target.
    fn round_trip_through_staging(target: &TransferEngine, initiator: &TransferEngine) -> PeerId {
        // Larger than one bounce buffer and than one slice, so both split.
        let len = 2 * STAGE_CHUNK + STAGE_CHUNK / 2 + 4096 + 17;
        let src = RawAlloc::zeroed(len).unwrap();
        let dst = RawAlloc::zeroed(len).unwrap();
        let back = initiator.alloc(len).unwrap();
        let (dev_src, s, dev_dst, d) = emulated_pair(initiator, target, &src, &dst);
        let details = target.segment_info(d.id).unwrap();
        assert_eq!(details.mode, RegMode::Staging);
        assert!(details.placement.is_device());
        assert_eq!(details.info.kind, MemoryKind::Gpu);
        let data = pattern(len, 3);
        src.write_at(0, &data);
        let peer = initiator.connect(target.local_addr()).unwrap();
        // One big write plus scattered small pages (KV-page shaped), device → device.
        let mut reqs = vec![Request::write(src.addr(), (len - 8192) as u64, d.id, 0)];
        for p in 0..2u64 {
            let off = (len - 8192) as u64 + p * 4096;
            reqs.push(Request::write(src.addr() + off, 4096, d.id, off));
        }
        initiator.transfer_sync(peer, &reqs).unwrap();
        let mut got = vec![0u8; len];
        dst.read_at(0, &mut got);
        assert!(got == data, "device → TCP → device bytes differ");
        assert!(dev_src.copies.load(Ordering::Relaxed) >= 3, "D2H copies");
        assert!(dev_dst.copies.load(Ordering::Relaxed) >= 3, "H2D copies");

        // Read the device segment back into host memory (target D2H through staging).
        initiator
            .transfer_sync(peer, &[Request::read(back.addr(), len as u64, d.id, 0)])
            .unwrap();
        assert!(back.to_vec() == data, "device → host read differs");

        // Host → device at an offset, and a read from the peer's device into a local device.
        let host = target.alloc(8192).unwrap();
        host.write(0, &pattern(8192, 9));
        let peer_back = target.connect(initiator.local_addr()).unwrap();
        target
            .transfer_sync(
                peer_back,
                &[
                    Request::write(host.addr(), 8192, s.id, 4096),
                    Request::read(dst.addr() + 100, 5000, s.id, 20_000),
                ],
            )
            .unwrap();
        let mut page = vec![0u8; 8192];
        src.read_at(4096, &mut page);
        assert!(page == pattern(8192, 9), "host → device write differs");
        let mut part = vec![0u8; 5000];
        dst.read_at(100, &mut part);
        assert!(
            part == data[20_000..25_000],
            "device read into a device differs"
        );
        peer
    }
}
