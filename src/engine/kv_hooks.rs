//! Crate-internal hooks the KV layer builds on.

use super::*;

/// Crate-internal hooks the KV layer builds on.
impl TransferEngine {
    /// Installs the consumer of incoming KV channels (one KV manager per engine).
    pub(crate) fn set_kv_acceptor(&self, acceptor: Option<KvAcceptor>) {
        *self.inner.kv_acceptor.write() = acceptor;
    }

    /// Connects to the engine at `addr` presenting the link token `link` on every connection
    /// (the decode side then accepts a KV room's completions only over them).
    pub(crate) fn connect_linked(&self, addr: SocketAddr, link: u64) -> Result<PeerId> {
        self.inner.connect(addr, link)
    }

    /// Installs the consumer that sees complete notifications before `notifications()`.
    pub(crate) fn set_notify_hook(&self, hook: Option<crate::transport::notify::NotifyHook>) {
        self.inner.notifier.set_hook(hook);
    }

    /// The handshake that opens a KV channel to another engine, and its first bytes (it ends
    /// with that engine's hello; KV messages follow).
    pub(crate) fn kv_hello(&self) -> (crate::wire::Initiator, Vec<u8>) {
        crate::wire::Initiator::start(
            self.inner.config.secret.clone(),
            rand::random(),
            self.inner.hello(ConnPurpose::Kv, 0, None),
        )
    }

    /// Forgets partial notifications of room slot `slot` (a new room takes it).
    pub(crate) fn forget_notify_slot(&self, slot: u32) {
        self.inner.notifier.forget_slot(slot);
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
