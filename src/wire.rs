//! Wire formats: the versioned bootstrap handshake and the TCP data-frame header.
//!
//! Pure encode/decode, no I/O. Every decoder takes bytes from a peer and must reject anything
//! malformed, truncated, oversized or of another version with a [`WireError`], never panic.
//! All integers are little-endian.
//!
//! SKELETON: bodies are filled in by the wire-codec work item.

use crate::memory::{MemoryKind, SegmentId, SegmentInfo};

/// First four bytes of every handshake message: `b"KVT1"` read as little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KVT1");
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the handshake preamble: magic u32, version u16, flags u16, body length u32.
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

/// Transports an endpoint can describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TransportId {
    /// TCP data connections to the bootstrap port.
    Tcp = 1,
    /// RDMA verbs (RC QPs).
    Rdma = 2,
}

/// One transport endpoint offered by an engine: an id plus transport-specific bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Which transport.
    pub transport: TransportId,
    /// Opaque bytes for that transport (at most [`MAX_ENDPOINT_LEN`]).
    pub data: Vec<u8>,
}

/// Key of a segment on one rail (RDMA rkey; unused by TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RailKey {
    /// Rail index at the segment's owner.
    pub rail: u16,
    /// Remote key.
    pub rkey: u32,
}

/// A segment as described in a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentDesc {
    /// Id, base, length and kind.
    pub info: SegmentInfo,
    /// Keys per rail (at most [`MAX_KEYS_PER_SEGMENT`]).
    pub keys: Vec<RailKey>,
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnPurpose {
    /// A TCP data connection (frames follow the handshake).
    TcpData = 1,
    /// A control/bootstrap connection (metadata only).
    Control = 2,
}

/// The handshake each side sends when a connection opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Random id of the sending engine.
    pub engine_id: u64,
    /// Random id of this run of the engine (a restart changes it).
    pub epoch: u64,
    /// What this connection is for.
    pub purpose: ConnPurpose,
    /// Index of this connection among the sender's connections to the peer.
    pub conn_index: u16,
    /// The sender's registered segments.
    pub segments: Vec<SegmentDesc>,
    /// The sender's transport endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// Encodes `hello` as preamble + body.
pub fn encode_hello(hello: &Hello) -> Vec<u8> {
    let _ = hello;
    todo!("wire codec")
}

/// Decodes a preamble; returns the body length that follows.
pub fn decode_preamble(preamble: &[u8; PREAMBLE_LEN]) -> Result<usize, WireError> {
    let _ = preamble;
    todo!("wire codec")
}

/// Decodes a handshake body (the bytes after the preamble), exactly.
pub fn decode_hello_body(body: &[u8]) -> Result<Hello, WireError> {
    let _ = body;
    todo!("wire codec")
}

/// Decodes a whole handshake message (preamble + body), exactly.
pub fn decode_hello(msg: &[u8]) -> Result<Hello, WireError> {
    let _ = msg;
    todo!("wire codec")
}

/// Encodes a segment list (used by handshakes and segment-list responses).
pub fn encode_segments(segments: &[SegmentDesc], out: &mut Vec<u8>) {
    let _ = (segments, out);
    todo!("wire codec")
}

/// Decodes a segment list produced by [`encode_segments`], exactly.
pub fn decode_segments(buf: &[u8]) -> Result<Vec<SegmentDesc>, WireError> {
    let _ = buf;
    todo!("wire codec")
}

/// Kinds of data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameOp {
    /// Initiator → target: write `len` payload bytes at `segment` + `offset`.
    Write = 1,
    /// Initiator → target: send back `len` bytes from `segment` + `offset`.
    ReadRequest = 2,
    /// Target → initiator: the bytes of the oldest outstanding read request (`len` payload).
    ReadResponse = 3,
    /// Target → initiator: every frame of `batch` flagged up to the LAST one was applied
    /// (`status` 0) or refused (`status` = error code).
    Ack = 4,
    /// Initiator → target: send your current segment list.
    SegmentsRequest = 5,
    /// Target → initiator: `len` payload bytes of [`encode_segments`].
    SegmentsResponse = 6,
    /// Either way: in-band notification `tag` for `batch` (used by KV rooms).
    Notify = 7,
}

/// Frame flag: the last frame of this batch on this connection; the target acks after it.
pub const FLAG_LAST: u8 = 1;

/// Fixed 40-byte header that starts every data frame.
///
/// Layout: op u8, flags u8, status u16, segment u32, batch u64, offset u64, len u64, tag u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame kind.
    pub op: FrameOp,
    /// Bit set of `FLAG_*`.
    pub flags: u8,
    /// 0, or an error code (acks and read responses).
    pub status: u16,
    /// Segment id at the target.
    pub segment: u32,
    /// Batch id at the initiator.
    pub batch: u64,
    /// Offset in the segment.
    pub offset: u64,
    /// Payload length (Write, ReadResponse, SegmentsResponse) or requested length (ReadRequest).
    pub len: u64,
    /// Free tag (room id / sequence for notifications).
    pub tag: u64,
}

impl FrameHeader {
    /// Encodes to the fixed 40-byte form.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        todo!("wire codec")
    }

    /// Decodes and validates (known op, known flags, payload length within limits).
    pub fn decode(buf: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, WireError> {
        let _ = buf;
        todo!("wire codec")
    }

    /// Number of payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> u64 {
        match self.op {
            FrameOp::Write | FrameOp::ReadResponse | FrameOp::SegmentsResponse => self.len,
            _ => 0,
        }
    }
}

#[allow(dead_code)]
fn _kinds(_: MemoryKind, _: SegmentId) {}
