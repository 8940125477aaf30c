//! Crate-internal hooks the KV layer builds on.

use super::*;

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
    /// up to `timeout` for the connect and for the handshake).
    pub(crate) fn open_kv_channel(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<(Hello, TcpStream)> {
        let e = &self.inner;
        tcp::connect_one(addr, timeout, &e.hello(ConnPurpose::Kv, 0, None))
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
