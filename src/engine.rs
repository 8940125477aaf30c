//! The transfer engine: registered memory, peers, batch submission and completion.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::batch::Batch;
use crate::config::{EngineConfig, TransportKind};
use crate::error::{Error, Result};
use crate::memory::raw::RawAlloc;
use crate::memory::{MemoryKind, SegmentGuard, SegmentId, SegmentInfo, SegmentTable};
use crate::plan::{PlanParams, plan};
use crate::request::{BatchId, BatchStatus, Request};
use crate::transport::tcp::{self, TcpLink};
use crate::transport::{Work, units_of};
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

struct Peer {
    info: PeerInfo,
    segments: RwLock<HashMap<u32, SegmentInfo>>,
    link: TcpLink,
}

impl Peer {
    fn check_alive(&self) -> Result<()> {
        self.link.conns.iter().try_for_each(|c| c.check_alive())
    }
}

struct Engine {
    config: EngineConfig,
    engine_id: u64,
    epoch: u64,
    local_addr: SocketAddr,
    transport: TransportKind,
    segments: Arc<SegmentTable>,
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
        let transport = match config.transport {
            TransportKind::Tcp => TransportKind::Tcp,
            TransportKind::Auto => {
                tracing::info!("transport auto: no RDMA transport in this build, using tcp");
                TransportKind::Tcp
            }
            TransportKind::Rdma => {
                return Err(Error::TransportUnavailable {
                    transport: "rdma",
                    reason: "this build has no RDMA transport yet; use tcp or auto".into(),
                });
            }
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
            peers: RwLock::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
            batches: Mutex::new(HashMap::new()),
            next_batch: AtomicU64::new(1),
            lane_rotation: AtomicUsize::new(0),
            shutdown: Arc::new(AtomicBool::new(false)),
            config,
        });
        let e = inner.clone();
        thread::Builder::new()
            .name("kvt-accept".into())
            .spawn(move || e.accept_loop(listener))
            .map_err(|e| Error::io("spawn", e))?;
        tracing::info!(addr = %local_addr, epoch = format_args!("{:#x}", inner.epoch), transport = transport.as_str(), "engine started");
        Ok(TransferEngine { inner })
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
    /// # Safety
    /// The range must be valid, mapped memory for as long as it stays registered, and the
    /// caller must not read or write a part of it while a transfer that writes that part is in
    /// flight (as with RDMA, the engine writes it from other threads).
    pub unsafe fn register_memory(&self, addr: *mut u8, len: usize) -> Result<SegmentInfo> {
        let info =
            self.inner
                .segments
                .register(addr as usize as u64, len as u64, MemoryKind::Host)?;
        tracing::debug!(
            segment = info.id.0,
            addr = format_args!("{:#x}", info.base),
            len,
            "registered"
        );
        Ok(info)
    }

    /// Unregisters a segment. Refused with [`Error::SegmentBusy`] while transfers use it.
    pub fn unregister_memory(&self, segment: SegmentId) -> Result<()> {
        self.inner.segments.unregister(segment)
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
            .segments
            .register(mem.addr(), len as u64, MemoryKind::Host)?;
        Ok(HostBuffer {
            mem: Some(mem),
            info,
            segments: self.inner.segments.clone(),
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

    /// The peer's segments as last learned (handshake or refresh).
    pub fn remote_segments(&self, peer: PeerId) -> Result<Vec<SegmentInfo>> {
        let p = self.inner.peer(peer)?;
        let mut v: Vec<_> = p.segments.read().values().cloned().collect();
        v.sort_by_key(|s| s.id);
        Ok(v)
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
        p.link.conns.iter().for_each(|c| c.close());
        Ok(())
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
        self.inner.submit(peer, requests, timeout)
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
        self.inner.shutdown.store(true, Ordering::Release);
        for p in self.inner.peers.write().drain().map(|(_, p)| p) {
            p.link.conns.iter().for_each(|c| c.close());
        }
    }
}

impl Engine {
    fn hello(&self, purpose: ConnPurpose, conn_index: u16) -> Hello {
        Hello {
            engine_id: self.engine_id,
            epoch: self.epoch,
            purpose,
            conn_index,
            segments: self
                .segments
                .list()
                .into_iter()
                .map(|info| SegmentDesc {
                    info,
                    keys: Vec::new(),
                })
                .collect(),
            endpoints: vec![Endpoint {
                transport: TransportId::Tcp,
                data: Vec::new(),
            }],
        }
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        while !self.shutdown.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((s, from)) => {
                    let e = self.clone();
                    let spawned = thread::Builder::new()
                        .name("kvt-serve".into())
                        .spawn(move || e.serve_conn(s, from));
                    if let Err(err) = spawned {
                        tracing::error!("cannot start a thread for {from}: {err}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut fds = [nix::poll::PollFd::new(
                        listener.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn serve_conn(self: Arc<Self>, mut s: TcpStream, from: SocketAddr) {
        let peer = from.to_string();
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
            tcp::write_hello(
                &mut s,
                &self.hello(ConnPurpose::TcpData, theirs.conn_index),
                &peer,
            )?;
            Ok(theirs)
        })();
        match setup {
            Ok(h) if h.purpose == ConnPurpose::TcpData => {
                tracing::debug!(%peer, epoch = format_args!("{:#x}", h.epoch), conn = h.conn_index, "data connection accepted");
                tcp::serve(
                    s,
                    self.segments.clone(),
                    self.shutdown.clone(),
                    self.config.busy_poll,
                    self.config.batch_timeout,
                    peer,
                );
            }
            Ok(h) => tracing::warn!(%peer, "rejecting connection with purpose {:?}", h.purpose),
            Err(e) => tracing::warn!(%peer, "rejecting connection: {e}"),
        }
    }

    fn connect(&self, addr: SocketAddr) -> Result<PeerId> {
        let n = self.config.connections_per_peer;
        let (theirs, streams) = tcp::connect(addr, n, self.config.connect_timeout, |i| {
            self.hello(ConnPurpose::TcpData, i)
        })?;
        let link = TcpLink::start(
            streams,
            &addr.to_string(),
            theirs.epoch,
            self.config.batch_timeout,
        )?;
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let info = PeerInfo {
            id: PeerId(id),
            addr,
            engine_id: theirs.engine_id,
            epoch: theirs.epoch,
            transport: "tcp",
            lanes: link.conns.len(),
        };
        let segments = theirs
            .segments
            .into_iter()
            .map(|d| (d.info.id.0, d.info))
            .collect();
        tracing::info!(peer = %addr, epoch = format_args!("{:#x}", info.epoch), lanes = n, "connected");
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
        let conn = p
            .link
            .conns
            .first()
            .ok_or(Error::UnknownPeer { peer: p.info.id.0 })?;
        let bytes = conn.fetch_segments(self.config.connect_timeout)?;
        let list = decode_segments(&bytes)?;
        *p.segments.write() = list.into_iter().map(|d| (d.info.id.0, d.info)).collect();
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
                let mut found = remote.get(&r.remote_segment.0).cloned();
                if found.is_none() && !refreshed {
                    // The peer may have registered it after the handshake.
                    drop(remote);
                    self.refresh(p)?;
                    refreshed = true;
                    remote = p.segments.read();
                    found = remote.get(&r.remote_segment.0).cloned();
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

    fn submit(&self, peer: PeerId, requests: &[Request], timeout: Duration) -> Result<BatchId> {
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
        let lanes = p.link.conns.len();
        let total: u64 = requests.iter().map(|r| r.len).sum();
        let first_lane = if total <= self.config.min_stripe_bytes {
            // A small batch goes to the idlest lane (ties: the lowest), so one stream of small
            // transfers stays on one hot connection while concurrent submitters spread out.
            (0..lanes)
                .min_by_key(|&i| p.link.conns[i].outstanding())
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
        let units: u32 = planned.lanes.iter().map(|l| units_of(l)).sum();
        let used: Vec<u16> = (0..lanes)
            .filter(|i| !planned.lanes[*i].is_empty())
            .map(|i| i as u16)
            .collect();
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
        for (lane, slices) in planned.lanes.into_iter().enumerate() {
            if !slices.is_empty() {
                p.link.conns[lane].post(
                    Work {
                        batch: batch.clone(),
                        slices,
                        guards: guards.clone(),
                    },
                    inline,
                );
            }
        }
        Ok(BatchId(id))
    }

    fn lanes_of<'a>(&self, b: &'a Batch) -> Option<(Arc<Peer>, &'a [u16])> {
        let p = self.peers.read().get(&b.peer).cloned()?;
        Some((p, &b.lanes))
    }

    fn progress(&self, b: &Batch) {
        if let Some((p, lanes)) = self.lanes_of(b) {
            for &l in lanes {
                p.link.conns[l as usize].progress();
            }
        }
    }

    fn wait(&self, b: &Batch) {
        let spin_until = Instant::now() + self.config.busy_poll.max(Duration::from_micros(20));
        if let Some((p, lanes)) = self.lanes_of(b) {
            // Spin first, reading the connections ourselves: waking a sleeping thread costs
            // more than a small transfer takes.
            lanes
                .iter()
                .for_each(|&l| p.link.conns[l as usize].start_driving());
            while !b.is_final() && Instant::now() < spin_until {
                for &l in lanes {
                    p.link.conns[l as usize].progress();
                }
                if b.is_final() || b.check_deadline(Instant::now()) {
                    break;
                }
                thread::yield_now();
            }
            let sleeping = !b.is_final();
            lanes
                .iter()
                .for_each(|&l| p.link.conns[l as usize].stop_driving(sleeping));
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

/// Page-aligned host memory allocated and registered by an engine; unregistered on drop.
///
/// Its bytes are reached through [`read`](Self::read) and [`write`](Self::write) copies,
/// since the engine may write them from other threads while a transfer is in flight.
#[derive(Debug)]
pub struct HostBuffer {
    mem: Option<RawAlloc>,
    info: SegmentInfo,
    segments: Arc<SegmentTable>,
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
    /// Copies bytes out, starting at `offset`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        self.mem.as_ref().expect("allocated").read_at(offset, dst)
    }
    /// Copies bytes in, starting at `offset`.
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
        if let Err(e) = self.segments.unregister(self.info.id) {
            if !matches!(e, Error::UnknownSegment { .. }) {
                // A transfer may still touch it: leaking is the only safe choice.
                tracing::error!("leaking buffer of segment {}: {e}", self.info.id);
                std::mem::forget(self.mem.take());
            }
        }
    }
}
