//! kvtransfer moves KV cache between the GPUs and hosts of prefill and decode servers.
//!
//! An [`TransferEngine`] per process registers memory as segments, connects to peer engines
//! through a small bootstrap handshake, and moves batches of one-sided WRITE and READ
//! requests to and from the peers' segments. Requests are coalesced and sliced by a pure
//! [planner](plan) and spread over several connections per peer. The transport is TCP today
//! (real sockets, the target checks every frame against its registered segments); RDMA verbs
//! come next behind the same interface.
//!
//! Errors are one [`Error`] enum with a stable numeric code per variant for the C ABI.

pub(crate) mod batch;
pub mod config;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod kv;
pub mod memory;
pub mod metrics;
pub mod plan;
pub mod probe;
pub(crate) mod refusals;
pub mod request;
pub mod topology;
pub(crate) mod transport;
pub mod wire;

pub use config::{EngineConfig, EngineConfigBuilder, GpuMode, TransportKind};
pub use cuda::Placement;
pub use engine::{HostBuffer, PageBuffer, PeerId, PeerInfo, ProbeReply, RailStats, TransferEngine};
pub use error::{Error, Result};
pub use kv::{
    KvBuffer, KvConfig, KvLayout, KvManager, KvPoll, KvReceiver, KvRole, KvSender, RoomMetrics,
};
pub use memory::{MemoryKind, RegMode, SegmentDetails, SegmentId, SegmentInfo};
pub use metrics::{MetricsSnapshot, PeerStats, RailMetrics, RoomStats, Summary};
pub use request::{BatchId, BatchStatus, Op, Request};
pub use transport::notify::Notification;

/// Internals that benchmarks measure (not a stable API).
#[doc(hidden)]
pub mod bench_internals {
    pub use crate::transport::rdma::cost::{FakeQp, wr_pipeline};
}

/// Installs a `tracing` subscriber that logs to stderr with `filter` (e.g. `info`,
/// `kvtransfer=debug`); `RUST_LOG` wins when set. Does nothing if one is already installed.
pub fn init_logging(filter: &str) {
    let f = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}
