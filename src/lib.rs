//! kvtransfer moves KV cache between the GPUs and hosts of prefill and decode servers.
//!
//! (crate docs filled in with the engine)

pub mod error;
pub mod memory;
pub mod plan;
pub mod request;
pub mod wire;

pub use error::{Error, Result};
pub use memory::{MemoryKind, SegmentId, SegmentInfo};
pub use request::{BatchId, BatchStatus, Op, Request};

/// Placeholder until the engine lands.
pub struct TransferEngine;
impl TransferEngine {
    /// Placeholder.
    pub fn register_memory(&self) {}
}
