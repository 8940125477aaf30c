//! kvtransfer moves KV cache between the GPUs and hosts of prefill and decode servers.
//!
//! A [`TransferEngine`] per process registers memory (host, or GPU memory by dma-buf,
//! nvidia-peermem or staging) as segments, connects to peer engines through a small
//! authenticated handshake, and moves batches of one-sided WRITE and READ requests to and from
//! the peers' segments. Requests are coalesced and sliced by a pure [planner](plan) and
//! spread over the peer's lanes: RC queue pairs on the RDMA rails that hold the batch's
//! segments (libibverbs and libcuda are loaded at run time, so the library runs on hosts
//! without them), or TCP connections where there is no RDMA. On top, [`kv`] hands a
//! request's paged KV cache from a prefill to a decode server in rooms polled through
//! SGLang's KVPoll states; the same API is exported as a C ABI ([`ffi`]) and used by the
//! Python package.
//!
//! Errors are one [`Error`] enum with a stable numeric code per variant for the C ABI; the
//! engine counts what it does in [`metrics`]. The repository's README and `docs/` are the
//! guides; every Rust sample in them is compiled and run as a doc test.

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
pub use metrics::{BatchMetrics, MetricsSnapshot, PeerStats, RailMetrics, RoomStats, Summary};
pub use request::{BatchId, BatchStatus, Op, Request};
pub use transport::notify::Notification;

/// Internals that benchmarks measure (not a stable API).
#[doc(hidden)]
pub mod bench_internals {
    pub use crate::transport::rdma::cost::{FakeQp, wr_pipeline};
}

/// Fault points for tests (not a stable API).
#[doc(hidden)]
pub mod testing {
    /// Each of the next `n` write frames that land in host memory at a TCP target of this
    /// process gets its first byte flipped after it landed: a corruption in flight that only
    /// an end-to-end check (KV integrity digests) can see. 0 disarms it.
    pub fn corrupt_tcp_writes(n: u32) {
        crate::transport::tcp::io::CORRUPT_WRITES.store(n, std::sync::atomic::Ordering::Relaxed);
    }
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

/// The Rust samples of the README and of every guide in `docs/`, compiled and run as doc
/// tests (a fence without a language would be taken for Rust: each names its language).
#[cfg(doctest)]
mod doc_samples {
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/architecture.md")]
    struct Architecture;
    #[doc = include_str!("../docs/c-abi.md")]
    struct CAbi;
    #[doc = include_str!("../docs/engines.md")]
    struct Engines;
    #[doc = include_str!("../docs/gpu.md")]
    struct Gpu;
    #[doc = include_str!("../docs/kv-protocol.md")]
    struct KvProtocol;
    #[doc = include_str!("../docs/operating.md")]
    struct Operating;
    #[doc = include_str!("../docs/performance.md")]
    struct Performance;
    #[doc = include_str!("../docs/python.md")]
    struct Python;
    #[doc = include_str!("../docs/rdma.md")]
    struct Rdma;
    #[doc = include_str!("../docs/rust.md")]
    struct Rust;
    #[doc = include_str!("../docs/security.md")]
    struct Security;
    #[doc = include_str!("../docs/status.md")]
    struct Status;
    #[doc = include_str!("../docs/testing.md")]
    struct Testing;
}
