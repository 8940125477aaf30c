//! Wire formats: the versioned bootstrap handshake and the TCP data-frame header.
//!
//! Pure encode/decode, no I/O. Every decoder takes bytes from a peer and must reject anything
//! malformed, truncated, oversized or of another version with a [`WireError`], never panic.
//! All integers are little-endian.

mod frame;
mod handshake;
mod hello;
mod rdma;
mod reader;
#[cfg(test)]
mod tests;

use std::collections::HashSet;

use crate::memory::{MemoryKind, SegmentId, SegmentInfo};

pub use frame::*;
pub use handshake::*;
pub use hello::*;
pub use rdma::*;
pub(crate) use reader::*;

/// First four bytes of every handshake message: `b"KVT1"` read as little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KVT1");
/// The protocol version this build speaks. 2: KV rejections and aborts carry a failure kind,
/// and KV channels carry heartbeats. 3: the handshake exchanges nonces and proofs of the
/// cluster secret before any hello ([`Initiator`], [`Responder`]).
pub const PROTOCOL_VERSION: u16 = 3;
/// Size of the handshake preamble: magic u32, version u16, kind u16, body length u32.
pub const PREAMBLE_LEN: usize = 12;
/// Largest handshake body accepted.
pub const MAX_HELLO_BODY: usize = 4 << 20;
/// Most segments one handshake may describe.
pub const MAX_SEGMENTS: usize = 65_536;
/// Most rail keys per segment.
pub const MAX_KEYS_PER_SEGMENT: usize = 64;
/// Most transport endpoints per handshake.
pub const MAX_ENDPOINTS: usize = 64;
/// Largest opaque endpoint blob.
pub const MAX_ENDPOINT_LEN: usize = 4096;
/// Size of a data-frame header.
pub const FRAME_HEADER_LEN: usize = 40;
/// Largest payload one frame may announce.
pub const MAX_FRAME_PAYLOAD: u64 = 1 << 30;

/// Why bytes from a peer were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message does not start with [`MAGIC`].
    #[error("bad magic {got:#010x} (not a kvtransfer peer)")]
    BadMagic {
        /// The four bytes found, as little-endian u32.
        got: u32,
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {got} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version the peer sent.
        got: u16,
        /// Version we speak.
        supported: u16,
    },
    /// The input ended before a field could be read.
    #[error("truncated {what}: needed {needed} bytes, had {got}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// A length or count exceeds its limit.
    #[error("{what} too large: {len} > {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The announced size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A field holds a value that is not allowed.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Bytes were left over after a complete message.
    #[error("{count} trailing byte(s) after {what}")]
    TrailingBytes {
        /// What was decoded.
        what: &'static str,
        /// How many bytes were left.
        count: usize,
    },
}
