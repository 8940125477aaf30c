//! The serving side: the accept loop, the handshake of each accepted connection, and every
//! connection it accepted, tracked so that shutdown can close them and wait for their
//! threads.

use super::*;

/// The connections this engine accepted: a second handle on each socket in its handshake
/// (to wake its thread on shutdown), the threads running handshakes (and KV channels), and
/// the data connections being served.
#[derive(Default)]
pub(super) struct Served {
    sockets: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
    /// Accepted connections whose handshake has not finished.
    handshaking: AtomicUsize,
    conns: Mutex<Vec<Arc<ServedConn>>>,
}

/// Most accepted connections in their handshake at once. Beyond it new connections are
/// closed at once: half-open connections cost a thread each until their handshake times out
/// (`connect_timeout`), so without a bound they would grow without one.
pub(crate) const MAX_HANDSHAKES: usize = 64;

/// Counts one connection in its handshake until dropped.
struct Handshaking<'a>(&'a AtomicUsize);

impl Drop for Handshaking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Served {
    pub(super) fn add_socket(&self, s: TcpStream) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.sockets.lock().insert(id, s);
        id
    }

    /// Called by a serving thread as it ends (its own socket closes with it).
    pub(super) fn remove_socket(&self, id: u64) {
        self.sockets.lock().remove(&id);
    }

    pub(super) fn add_thread(&self, t: thread::JoinHandle<()>) {
        let mut threads = self.threads.lock();
        threads.retain(|t| !t.is_finished());
        threads.push(t);
    }

    /// Tracks a data connection now served by the poller.
    pub(super) fn add_conn(&self, c: Arc<ServedConn>) {
        let mut conns = self.conns.lock();
        conns.retain(|c| !c.is_dead());
        conns.push(c);
    }

    /// Closes every served connection and shuts every socket in its handshake down (a
    /// blocked read or write returns at once), then waits for the threads of both, except
    /// the calling one.
    pub(super) fn stop_and_join(&self) {
        let conns = std::mem::take(&mut *self.conns.lock());
        conns.iter().for_each(|c| c.close());
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
        conns.iter().for_each(|c| c.join());
        // A handshake that finished meanwhile may have added one.
        let late = std::mem::take(&mut *self.conns.lock());
        late.iter().for_each(|c| c.close());
        late.iter().for_each(|c| c.join());
    }
}

impl Engine {
    pub(super) fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        while !self.shutdown.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((s, from)) => {
                    let in_handshake = self.served.handshaking.fetch_add(1, Ordering::AcqRel);
                    if in_handshake >= MAX_HANDSHAKES {
                        self.served.handshaking.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!(%from, "closing a new connection: {MAX_HANDSHAKES} handshakes already in progress");
                        drop(s);
                        continue;
                    }
                    let wake = match s.try_clone() {
                        Ok(w) => w,
                        Err(err) => {
                            self.served.handshaking.fetch_sub(1, Ordering::AcqRel);
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
                            self.served.handshaking.fetch_sub(1, Ordering::AcqRel);
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

    pub(super) fn serve_conn(self: Arc<Self>, mut s: TcpStream, from: SocketAddr) {
        let peer = from.to_string();
        let mut accepted = None;
        let handshake = Handshaking(&self.served.handshaking);
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
            let answer = match &self.rdma {
                Some(r) if theirs.purpose == ConnPurpose::Control => {
                    rdma::answer(r, &theirs)?.map(|(answer, qps)| {
                        accepted = Some(qps);
                        answer
                    })
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
        drop(handshake);
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
                    // The control connection's end is the end of the peer's QPs here.
                    keep: accepted.take().map(|qps| Box::new(qps) as Box<dyn Send>),
                };
                match ServedConn::start(s, ctx, &self.tcp_io) {
                    // Shutdown joins this thread before it takes the last look at these.
                    Ok(c) => self.served.add_conn(c),
                    Err(e) => tracing::warn!("cannot serve a connection: {e}"),
                }
            }
            Err(e) => tracing::warn!(%peer, "rejecting connection: {e}"),
        }
    }
}
