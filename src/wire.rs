//! Wire formats: the versioned bootstrap handshake and the TCP data-frame header.
//!
//! Pure encode/decode, no I/O. Every decoder takes bytes from a peer and must reject anything
//! malformed, truncated, oversized or of another version with a [`WireError`], never panic.
//! All integers are little-endian.

use std::collections::HashSet;

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
    /// A KV control channel: room messages between two KV managers (`kv::proto`).
    Kv = 3,
    /// A liveness probe: the target answers with its engine id and epoch (no segments, no
    /// endpoints) and closes; nothing else happens on either side.
    Probe = 4,
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
///
/// The caller keeps `hello` within the `MAX_*` limits with distinct, non-empty,
/// non-wrapping segments. This never panics: a count or length too big for its wire field
/// is written saturated, so the bytes are always rejected by [`decode_hello`] rather than
/// misread.
pub fn encode_hello(hello: &Hello) -> Vec<u8> {
    let mut body = Vec::with_capacity(hello_body_size_hint(hello));
    body.extend_from_slice(&hello.engine_id.to_le_bytes());
    body.extend_from_slice(&hello.epoch.to_le_bytes());
    body.push(hello.purpose as u8);
    body.extend_from_slice(&hello.conn_index.to_le_bytes());
    encode_segments(&hello.segments, &mut body);
    body.extend_from_slice(&saturate_u16(hello.endpoints.len()).to_le_bytes());
    for ep in &hello.endpoints {
        body.push(ep.transport as u8);
        body.extend_from_slice(&saturate_u32(ep.data.len()).to_le_bytes());
        body.extend_from_slice(&ep.data);
    }

    let mut msg = Vec::with_capacity(PREAMBLE_LEN + body.len());
    msg.extend_from_slice(&MAGIC.to_le_bytes());
    msg.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    msg.extend_from_slice(&0u16.to_le_bytes());
    msg.extend_from_slice(&saturate_u32(body.len()).to_le_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// Decodes a preamble; returns the body length that follows.
pub fn decode_preamble(preamble: &[u8; PREAMBLE_LEN]) -> Result<usize, WireError> {
    let mut r = Reader::new(preamble);
    let magic = r.u32("preamble magic")?;
    if magic != MAGIC {
        return Err(WireError::BadMagic { got: magic });
    }
    let version = r.u16("preamble version")?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion {
            got: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let flags = r.u16("preamble flags")?;
    if flags != 0 {
        return Err(WireError::Malformed {
            what: "preamble",
            detail: format!("flags {flags:#06x} set (none are defined)"),
        });
    }
    let body_len = r.u32("preamble body length")?;
    check_max("handshake body", u64::from(body_len), MAX_HELLO_BODY as u64)?;
    Ok(body_len as usize)
}

/// Decodes a handshake body (the bytes after the preamble), exactly.
pub fn decode_hello_body(body: &[u8]) -> Result<Hello, WireError> {
    let mut r = Reader::new(body);
    let engine_id = r.u64("hello engine id")?;
    let epoch = r.u64("hello epoch")?;
    let purpose = conn_purpose_from_u8(r.u8("hello purpose")?)?;
    let conn_index = r.u16("hello connection index")?;
    let segments = read_segments(&mut r)?;
    let endpoints = read_endpoints(&mut r)?;
    r.finish("handshake body")?;
    Ok(Hello {
        engine_id,
        epoch,
        purpose,
        conn_index,
        segments,
        endpoints,
    })
}

/// Decodes a whole handshake message (preamble + body), exactly.
pub fn decode_hello(msg: &[u8]) -> Result<Hello, WireError> {
    let Some((preamble, body)) = msg.split_first_chunk::<PREAMBLE_LEN>() else {
        return Err(WireError::Truncated {
            what: "handshake preamble",
            needed: PREAMBLE_LEN,
            got: msg.len(),
        });
    };
    let body_len = decode_preamble(preamble)?;
    if body.len() < body_len {
        return Err(WireError::Truncated {
            what: "handshake body",
            needed: body_len,
            got: body.len(),
        });
    }
    if body.len() > body_len {
        return Err(WireError::TrailingBytes {
            what: "handshake message",
            count: body.len() - body_len,
        });
    }
    decode_hello_body(body)
}

/// Encodes a segment list (used by handshakes and segment-list responses).
///
/// Like [`encode_hello`], counts too big for their wire field are written saturated, so an
/// over-limit list is rejected by [`decode_segments`] rather than misread.
pub fn encode_segments(segments: &[SegmentDesc], out: &mut Vec<u8>) {
    out.reserve(
        4 + segments
            .iter()
            .map(|s| SEGMENT_MIN_LEN + RAIL_KEY_LEN * s.keys.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(&saturate_u32(segments.len()).to_le_bytes());
    for seg in segments {
        out.extend_from_slice(&seg.info.id.0.to_le_bytes());
        out.extend_from_slice(&seg.info.base.to_le_bytes());
        out.extend_from_slice(&seg.info.len.to_le_bytes());
        out.push(seg.info.kind as u8);
        out.extend_from_slice(&saturate_u16(seg.keys.len()).to_le_bytes());
        for key in &seg.keys {
            out.extend_from_slice(&key.rail.to_le_bytes());
            out.extend_from_slice(&key.rkey.to_le_bytes());
        }
    }
}

/// Decodes a segment list produced by [`encode_segments`], exactly.
pub fn decode_segments(buf: &[u8]) -> Result<Vec<SegmentDesc>, WireError> {
    let mut r = Reader::new(buf);
    let segments = read_segments(&mut r)?;
    r.finish("segment list")?;
    Ok(segments)
}

/// Smallest encoding of one segment (id, base, len, kind, key count; no keys).
const SEGMENT_MIN_LEN: usize = 4 + 8 + 8 + 1 + 2;
/// Encoding of one rail key (rail, rkey).
const RAIL_KEY_LEN: usize = 2 + 4;
/// Smallest encoding of one endpoint (transport, data length; no data).
const ENDPOINT_MIN_LEN: usize = 1 + 4;

/// Cursor over bytes from a peer; every read checks the remaining length first.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], WireError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(WireError::Truncated {
                what,
                needed: N,
                got: self.rest.len(),
            }),
        }
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.array(what).map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.array(what).map(u64::from_le_bytes)
    }

    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        match self.rest.split_at_checked(n) {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(head)
            }
            None => Err(WireError::Truncated {
                what,
                needed: n,
                got: self.rest.len(),
            }),
        }
    }

    /// Checks that `count` items of at least `min_len` bytes each can still fit, so a
    /// count announced by a peer never sizes an allocation beyond the input it sent.
    pub(crate) fn require_items(
        &self,
        count: usize,
        min_len: usize,
        what: &'static str,
    ) -> Result<(), WireError> {
        let needed = count.saturating_mul(min_len);
        if needed > self.remaining() {
            return Err(WireError::Truncated {
                what,
                needed,
                got: self.remaining(),
            });
        }
        Ok(())
    }

    pub(crate) fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                what,
                count: self.rest.len(),
            })
        }
    }
}

pub(crate) fn check_max(what: &'static str, len: u64, max: u64) -> Result<(), WireError> {
    if len > max {
        Err(WireError::TooLarge { what, len, max })
    } else {
        Ok(())
    }
}

fn saturate_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn saturate_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn hello_body_size_hint(hello: &Hello) -> usize {
    8 + 8
        + 1
        + 2
        + 4
        + hello
            .segments
            .iter()
            .map(|s| SEGMENT_MIN_LEN + RAIL_KEY_LEN * s.keys.len())
            .sum::<usize>()
        + 2
        + hello
            .endpoints
            .iter()
            .map(|e| ENDPOINT_MIN_LEN + e.data.len())
            .sum::<usize>()
}

fn conn_purpose_from_u8(v: u8) -> Result<ConnPurpose, WireError> {
    match v {
        1 => Ok(ConnPurpose::TcpData),
        2 => Ok(ConnPurpose::Control),
        3 => Ok(ConnPurpose::Kv),
        4 => Ok(ConnPurpose::Probe),
        _ => Err(WireError::Malformed {
            what: "hello purpose",
            detail: format!("unknown connection purpose {v}"),
        }),
    }
}

fn transport_from_u8(v: u8) -> Result<TransportId, WireError> {
    match v {
        1 => Ok(TransportId::Tcp),
        2 => Ok(TransportId::Rdma),
        _ => Err(WireError::Malformed {
            what: "endpoint",
            detail: format!("unknown transport {v}"),
        }),
    }
}

fn memory_kind_from_u8(v: u8) -> Result<MemoryKind, WireError> {
    match v {
        0 => Ok(MemoryKind::Host),
        1 => Ok(MemoryKind::Gpu),
        _ => Err(WireError::Malformed {
            what: "segment",
            detail: format!("unknown memory kind {v}"),
        }),
    }
}

fn frame_op_from_u8(v: u8) -> Result<FrameOp, WireError> {
    match v {
        1 => Ok(FrameOp::Write),
        2 => Ok(FrameOp::ReadRequest),
        3 => Ok(FrameOp::ReadResponse),
        4 => Ok(FrameOp::Ack),
        5 => Ok(FrameOp::SegmentsRequest),
        6 => Ok(FrameOp::SegmentsResponse),
        7 => Ok(FrameOp::Notify),
        _ => Err(WireError::Malformed {
            what: "frame header",
            detail: format!("unknown op {v}"),
        }),
    }
}

/// Reads a segment list (count u32, then the segments) from `r`.
fn read_segments(r: &mut Reader<'_>) -> Result<Vec<SegmentDesc>, WireError> {
    let count = r.u32("segment count")?;
    check_max("segment count", u64::from(count), MAX_SEGMENTS as u64)?;
    let count = count as usize;
    r.require_items(count, SEGMENT_MIN_LEN, "segment list")?;
    let mut segments = Vec::with_capacity(count);
    let mut seen = HashSet::with_capacity(count);
    for _ in 0..count {
        let id = r.u32("segment id")?;
        let base = r.u64("segment base")?;
        let len = r.u64("segment length")?;
        let kind = memory_kind_from_u8(r.u8("segment kind")?)?;
        if len == 0 {
            return Err(WireError::Malformed {
                what: "segment",
                detail: format!("segment {id} has zero length"),
            });
        }
        if base.checked_add(len).is_none() {
            return Err(WireError::Malformed {
                what: "segment",
                detail: format!("segment {id} [{base:#x}, +{len}) wraps around"),
            });
        }
        if !seen.insert(id) {
            return Err(WireError::Malformed {
                what: "segment list",
                detail: format!("duplicate segment id {id}"),
            });
        }
        let key_count = r.u16("segment key count")?;
        check_max(
            "segment key count",
            u64::from(key_count),
            MAX_KEYS_PER_SEGMENT as u64,
        )?;
        let key_count = usize::from(key_count);
        r.require_items(key_count, RAIL_KEY_LEN, "segment keys")?;
        let mut keys = Vec::with_capacity(key_count);
        for _ in 0..key_count {
            let rail = r.u16("rail key rail")?;
            let rkey = r.u32("rail key rkey")?;
            keys.push(RailKey { rail, rkey });
        }
        segments.push(SegmentDesc {
            info: SegmentInfo {
                id: SegmentId(id),
                base,
                len,
                kind,
            },
            keys,
        });
    }
    Ok(segments)
}

/// Reads the endpoint list (count u16, then the endpoints) from `r`.
fn read_endpoints(r: &mut Reader<'_>) -> Result<Vec<Endpoint>, WireError> {
    let count = r.u16("endpoint count")?;
    check_max("endpoint count", u64::from(count), MAX_ENDPOINTS as u64)?;
    let count = usize::from(count);
    r.require_items(count, ENDPOINT_MIN_LEN, "endpoint list")?;
    let mut endpoints = Vec::with_capacity(count);
    for _ in 0..count {
        let transport = transport_from_u8(r.u8("endpoint transport")?)?;
        let data_len = r.u32("endpoint data length")?;
        check_max(
            "endpoint data",
            u64::from(data_len),
            MAX_ENDPOINT_LEN as u64,
        )?;
        let data = r.bytes(data_len as usize, "endpoint data")?.to_vec();
        endpoints.push(Endpoint { transport, data });
    }
    Ok(endpoints)
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
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0] = self.op as u8;
        out[1] = self.flags;
        out[2..4].copy_from_slice(&self.status.to_le_bytes());
        out[4..8].copy_from_slice(&self.segment.to_le_bytes());
        out[8..16].copy_from_slice(&self.batch.to_le_bytes());
        out[16..24].copy_from_slice(&self.offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.len.to_le_bytes());
        out[32..40].copy_from_slice(&self.tag.to_le_bytes());
        out
    }

    /// Decodes and validates (known op, known flags, payload length within limits).
    pub fn decode(buf: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, WireError> {
        let mut r = Reader::new(buf);
        let op = frame_op_from_u8(r.u8("frame op")?)?;
        let flags = r.u8("frame flags")?;
        if flags & !FLAG_LAST != 0 {
            return Err(WireError::Malformed {
                what: "frame header",
                detail: format!("unknown flags {flags:#04x}"),
            });
        }
        let header = FrameHeader {
            op,
            flags,
            status: r.u16("frame status")?,
            segment: r.u32("frame segment")?,
            batch: r.u64("frame batch")?,
            offset: r.u64("frame offset")?,
            len: r.u64("frame length")?,
            tag: r.u64("frame tag")?,
        };
        r.finish("frame header")?;
        check_max("frame payload", header.payload_len(), MAX_FRAME_PAYLOAD)?;
        if op == FrameOp::ReadRequest {
            check_max("read request", header.len, MAX_FRAME_PAYLOAD)?;
        }
        Ok(header)
    }

    /// Number of payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> u64 {
        match self.op {
            FrameOp::Write | FrameOp::ReadResponse | FrameOp::SegmentsResponse => self.len,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg(id: u32, base: u64, len: u64, kind: MemoryKind, keys: &[(u16, u32)]) -> SegmentDesc {
        SegmentDesc {
            info: SegmentInfo {
                id: SegmentId(id),
                base,
                len,
                kind,
            },
            keys: keys
                .iter()
                .map(|&(rail, rkey)| RailKey { rail, rkey })
                .collect(),
        }
    }

    fn sample_hello() -> Hello {
        Hello {
            engine_id: 0x1234_5678_9abc_def0,
            epoch: 42,
            purpose: ConnPurpose::TcpData,
            conn_index: 3,
            segments: vec![
                seg(
                    0,
                    0x7f00_0000_0000,
                    1 << 30,
                    MemoryKind::Host,
                    &[(0, 0x1111), (1, 0x2222)],
                ),
                seg(
                    7,
                    0x7000_0000_0000,
                    4096,
                    MemoryKind::Gpu,
                    &[(0, 0xdead), (1, 0xbeef), (2, 7), (3, u32::MAX)],
                ),
                seg(9, u64::MAX - 10, 10, MemoryKind::Host, &[]),
            ],
            endpoints: vec![
                Endpoint {
                    transport: TransportId::Tcp,
                    data: b"10.0.0.1:7777".to_vec(),
                },
                Endpoint {
                    transport: TransportId::Rdma,
                    data: (0..=255u8).cycle().take(300).collect(),
                },
            ],
        }
    }

    fn body_of(hello: &Hello) -> Vec<u8> {
        encode_hello(hello)[PREAMBLE_LEN..].to_vec()
    }

    fn preamble(magic: u32, version: u16, flags: u16, body_len: u32) -> [u8; PREAMBLE_LEN] {
        let mut p = [0u8; PREAMBLE_LEN];
        p[0..4].copy_from_slice(&magic.to_le_bytes());
        p[4..6].copy_from_slice(&version.to_le_bytes());
        p[6..8].copy_from_slice(&flags.to_le_bytes());
        p[8..12].copy_from_slice(&body_len.to_le_bytes());
        p
    }

    /// Segment list with one segment; the caller patches fields.
    fn one_segment_list(id: u32, base: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode_segments(&[seg(id, base, len, MemoryKind::Host, &[])], &mut out);
        out
    }

    fn frame(op: FrameOp, flags: u8, len: u64) -> FrameHeader {
        FrameHeader {
            op,
            flags,
            status: 5,
            segment: 17,
            batch: 99,
            offset: 4096,
            len,
            tag: 0xabcdef,
        }
    }

    #[test]
    fn hello_round_trip() {
        let hello = sample_hello();
        let msg = encode_hello(&hello);
        assert_eq!(&msg[0..4], b"KVT1");
        let body_len = decode_preamble(msg[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
        assert_eq!(body_len, msg.len() - PREAMBLE_LEN);
        assert_eq!(decode_hello(&msg).unwrap(), hello);
        assert_eq!(decode_hello_body(&msg[PREAMBLE_LEN..]).unwrap(), hello);
    }

    #[test]
    fn empty_hello_round_trip() {
        let hello = Hello {
            engine_id: 0,
            epoch: 0,
            purpose: ConnPurpose::Control,
            conn_index: 0,
            segments: vec![],
            endpoints: vec![],
        };
        let msg = encode_hello(&hello);
        assert_eq!(msg.len(), PREAMBLE_LEN + 8 + 8 + 1 + 2 + 4 + 2);
        assert_eq!(decode_hello(&msg).unwrap(), hello);
    }

    #[test]
    fn segments_round_trip() {
        let segs = sample_hello().segments;
        let mut out = vec![0xaa]; // encode_segments appends
        encode_segments(&segs, &mut out);
        assert_eq!(out[0], 0xaa);
        assert_eq!(decode_segments(&out[1..]).unwrap(), segs);
        let mut empty = Vec::new();
        encode_segments(&[], &mut empty);
        assert_eq!(empty, 0u32.to_le_bytes());
        assert_eq!(decode_segments(&empty).unwrap(), vec![]);
    }

    #[test]
    fn bad_magic() {
        let mut msg = encode_hello(&sample_hello());
        msg[0] = b'X';
        let got = u32::from_le_bytes(*b"XVT1");
        assert_eq!(decode_hello(&msg), Err(WireError::BadMagic { got }));
        let p = preamble(0xdead_beef, PROTOCOL_VERSION, 0, 0);
        assert_eq!(
            decode_preamble(&p),
            Err(WireError::BadMagic { got: 0xdead_beef })
        );
    }

    #[test]
    fn wrong_version() {
        let p = preamble(MAGIC, 2, 0, 10);
        assert_eq!(
            decode_preamble(&p),
            Err(WireError::UnsupportedVersion {
                got: 2,
                supported: PROTOCOL_VERSION
            })
        );
        let mut msg = encode_hello(&sample_hello());
        msg[4..6].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(
            decode_hello(&msg),
            Err(WireError::UnsupportedVersion {
                got: 0,
                supported: 1
            })
        );
    }

    #[test]
    fn preamble_flags_rejected() {
        let p = preamble(MAGIC, PROTOCOL_VERSION, 1, 10);
        assert!(matches!(
            decode_preamble(&p),
            Err(WireError::Malformed { .. })
        ));
    }

    #[test]
    fn oversized_body() {
        let max = MAX_HELLO_BODY as u32;
        assert_eq!(
            decode_preamble(&preamble(MAGIC, PROTOCOL_VERSION, 0, max)),
            Ok(MAX_HELLO_BODY)
        );
        assert_eq!(
            decode_preamble(&preamble(MAGIC, PROTOCOL_VERSION, 0, max + 1)),
            Err(WireError::TooLarge {
                what: "handshake body",
                len: u64::from(max) + 1,
                max: MAX_HELLO_BODY as u64
            })
        );
        let msg = preamble(MAGIC, PROTOCOL_VERSION, 0, u32::MAX);
        assert!(matches!(
            decode_hello(&msg),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_at_every_length() {
        let msg = encode_hello(&sample_hello());
        for n in 0..msg.len() {
            let res = decode_hello(&msg[..n]);
            assert!(
                matches!(res, Err(WireError::Truncated { .. })),
                "prefix {n}: {res:?}"
            );
        }
        let body = body_of(&sample_hello());
        for n in 0..body.len() {
            let res = decode_hello_body(&body[..n]);
            assert!(
                matches!(res, Err(WireError::Truncated { .. })),
                "body prefix {n}: {res:?}"
            );
        }
        let mut segs = Vec::new();
        encode_segments(&sample_hello().segments, &mut segs);
        for n in 0..segs.len() {
            let res = decode_segments(&segs[..n]);
            assert!(
                matches!(res, Err(WireError::Truncated { .. })),
                "segments prefix {n}: {res:?}"
            );
        }
    }

    #[test]
    fn truncated_reports_field() {
        assert_eq!(
            decode_hello(&[0; 5]),
            Err(WireError::Truncated {
                what: "handshake preamble",
                needed: PREAMBLE_LEN,
                got: 5
            })
        );
        assert_eq!(
            decode_hello_body(&[0; 10]),
            Err(WireError::Truncated {
                what: "hello epoch",
                needed: 8,
                got: 2
            })
        );
    }

    #[test]
    fn trailing_bytes() {
        let mut msg = encode_hello(&sample_hello());
        msg.push(0);
        assert_eq!(
            decode_hello(&msg),
            Err(WireError::TrailingBytes {
                what: "handshake message",
                count: 1
            })
        );
        // Body length announced to include the extra bytes: the body decoder sees them.
        let mut msg = encode_hello(&sample_hello());
        msg.extend_from_slice(&[1, 2, 3]);
        let body_len = (msg.len() - PREAMBLE_LEN) as u32;
        msg[8..12].copy_from_slice(&body_len.to_le_bytes());
        assert_eq!(
            decode_hello(&msg),
            Err(WireError::TrailingBytes {
                what: "handshake body",
                count: 3
            })
        );
        let mut segs = one_segment_list(1, 0, 1);
        segs.push(9);
        assert_eq!(
            decode_segments(&segs),
            Err(WireError::TrailingBytes {
                what: "segment list",
                count: 1
            })
        );
    }

    #[test]
    fn unknown_enum_values() {
        // purpose is at body offset 16
        let mut body = body_of(&sample_hello());
        body[16] = 9;
        assert!(matches!(
            decode_hello_body(&body),
            Err(WireError::Malformed {
                what: "hello purpose",
                ..
            })
        ));
        // memory kind is at offset 4 + 4 + 8 + 8 in a segment list
        let mut segs = one_segment_list(1, 0, 1);
        segs[24] = 2;
        assert!(matches!(
            decode_segments(&segs),
            Err(WireError::Malformed {
                what: "segment",
                ..
            })
        ));
        // transport of the only endpoint
        let hello = Hello {
            segments: vec![],
            endpoints: vec![Endpoint {
                transport: TransportId::Tcp,
                data: vec![1],
            }],
            ..sample_hello()
        };
        let mut body = body_of(&hello);
        let at = 8 + 8 + 1 + 2 + 4 + 2;
        assert_eq!(body[at], TransportId::Tcp as u8);
        body[at] = 0;
        assert!(matches!(
            decode_hello_body(&body),
            Err(WireError::Malformed {
                what: "endpoint",
                ..
            })
        ));
    }

    #[test]
    fn zero_length_segment() {
        let segs = one_segment_list(1, 0x1000, 0);
        assert!(matches!(
            decode_segments(&segs),
            Err(WireError::Malformed {
                what: "segment",
                ..
            })
        ));
    }

    #[test]
    fn wrapping_segment() {
        assert!(decode_segments(&one_segment_list(1, u64::MAX - 1, 1)).is_ok());
        assert!(matches!(
            decode_segments(&one_segment_list(1, u64::MAX - 1, 2)),
            Err(WireError::Malformed {
                what: "segment",
                ..
            })
        ));
        assert!(matches!(
            decode_segments(&one_segment_list(1, u64::MAX, u64::MAX)),
            Err(WireError::Malformed {
                what: "segment",
                ..
            })
        ));
    }

    #[test]
    fn duplicate_segment_ids() {
        let segs = [
            seg(5, 0, 10, MemoryKind::Host, &[]),
            seg(6, 100, 10, MemoryKind::Host, &[]),
            seg(5, 200, 10, MemoryKind::Gpu, &[]),
        ];
        let mut out = Vec::new();
        encode_segments(&segs, &mut out);
        assert!(matches!(
            decode_segments(&out),
            Err(WireError::Malformed {
                what: "segment list",
                ..
            })
        ));
        let hello = Hello {
            segments: segs.to_vec(),
            ..sample_hello()
        };
        assert!(matches!(
            decode_hello(&encode_hello(&hello)),
            Err(WireError::Malformed {
                what: "segment list",
                ..
            })
        ));
    }

    #[test]
    fn huge_counts_in_tiny_input() {
        // 65536 segments announced in a 20-byte segment list.
        let mut buf = (MAX_SEGMENTS as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        assert_eq!(
            decode_segments(&buf),
            Err(WireError::Truncated {
                what: "segment list",
                needed: MAX_SEGMENTS * SEGMENT_MIN_LEN,
                got: 16
            })
        );
        // Same inside a 20-byte hello body: header + count leaves 1 byte.
        let mut body = vec![0u8; 16];
        body.push(ConnPurpose::Control as u8);
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes());
        body.push(0);
        assert!(matches!(
            decode_hello_body(&body),
            Err(WireError::Truncated {
                what: "segment list",
                ..
            })
        ));
        // One over the limit is TooLarge, whatever follows.
        let buf = (MAX_SEGMENTS as u32 + 1).to_le_bytes();
        assert_eq!(
            decode_segments(&buf),
            Err(WireError::TooLarge {
                what: "segment count",
                len: MAX_SEGMENTS as u64 + 1,
                max: MAX_SEGMENTS as u64
            })
        );
        assert!(matches!(
            decode_segments(&u32::MAX.to_le_bytes()),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn too_many_keys_and_endpoints() {
        let keys: Vec<(u16, u32)> = (0..=MAX_KEYS_PER_SEGMENT as u16).map(|r| (r, 1)).collect();
        let mut out = Vec::new();
        encode_segments(&[seg(1, 0, 1, MemoryKind::Host, &keys)], &mut out);
        assert_eq!(
            decode_segments(&out),
            Err(WireError::TooLarge {
                what: "segment key count",
                len: MAX_KEYS_PER_SEGMENT as u64 + 1,
                max: MAX_KEYS_PER_SEGMENT as u64
            })
        );
        let mut hello = sample_hello();
        hello.endpoints = vec![
            Endpoint {
                transport: TransportId::Tcp,
                data: vec![],
            };
            MAX_ENDPOINTS + 1
        ];
        assert!(matches!(
            decode_hello(&encode_hello(&hello)),
            Err(WireError::TooLarge {
                what: "endpoint count",
                ..
            })
        ));
        hello.endpoints = vec![Endpoint {
            transport: TransportId::Rdma,
            data: vec![0; MAX_ENDPOINT_LEN + 1],
        }];
        assert!(matches!(
            decode_hello(&encode_hello(&hello)),
            Err(WireError::TooLarge {
                what: "endpoint data",
                ..
            })
        ));
        hello.endpoints[0].data.truncate(MAX_ENDPOINT_LEN);
        assert_eq!(decode_hello(&encode_hello(&hello)).unwrap(), hello);
    }

    #[test]
    fn frame_round_trip() {
        for op in ALL_OPS {
            for flags in [0, FLAG_LAST] {
                let h = frame(op, flags, 12345);
                let bytes = h.encode();
                assert_eq!(bytes[0], op as u8);
                assert_eq!(FrameHeader::decode(&bytes), Ok(h));
            }
        }
        let h = frame(FrameOp::Write, FLAG_LAST, MAX_FRAME_PAYLOAD);
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn frame_unknown_op() {
        for op in [0u8, 8, 255] {
            let mut bytes = frame(FrameOp::Write, 0, 1).encode();
            bytes[0] = op;
            assert!(matches!(
                FrameHeader::decode(&bytes),
                Err(WireError::Malformed {
                    what: "frame header",
                    ..
                })
            ));
        }
    }

    #[test]
    fn frame_unknown_flag() {
        for flags in [2u8, 3, 0x80, 0xff] {
            let bytes = frame(FrameOp::Ack, flags, 0).encode();
            assert!(matches!(
                FrameHeader::decode(&bytes),
                Err(WireError::Malformed {
                    what: "frame header",
                    ..
                })
            ));
        }
    }

    #[test]
    fn frame_oversized_payload() {
        for op in [
            FrameOp::Write,
            FrameOp::ReadResponse,
            FrameOp::SegmentsResponse,
        ] {
            let bytes = frame(op, 0, MAX_FRAME_PAYLOAD + 1).encode();
            assert_eq!(
                FrameHeader::decode(&bytes),
                Err(WireError::TooLarge {
                    what: "frame payload",
                    len: MAX_FRAME_PAYLOAD + 1,
                    max: MAX_FRAME_PAYLOAD
                })
            );
        }
        let bytes = frame(FrameOp::ReadRequest, 0, u64::MAX).encode();
        assert_eq!(
            FrameHeader::decode(&bytes),
            Err(WireError::TooLarge {
                what: "read request",
                len: u64::MAX,
                max: MAX_FRAME_PAYLOAD
            })
        );
        // Ops without payload carry `len` verbatim.
        for op in [FrameOp::Ack, FrameOp::SegmentsRequest, FrameOp::Notify] {
            let h = frame(op, 0, u64::MAX);
            assert_eq!(h.payload_len(), 0);
            assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }
    }

    const ALL_OPS: [FrameOp; 7] = [
        FrameOp::Write,
        FrameOp::ReadRequest,
        FrameOp::ReadResponse,
        FrameOp::Ack,
        FrameOp::SegmentsRequest,
        FrameOp::SegmentsResponse,
        FrameOp::Notify,
    ];

    fn arb_segments() -> impl Strategy<Value = Vec<SegmentDesc>> {
        let one = (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            prop::collection::vec((any::<u16>(), any::<u32>()), 0..=4),
        )
            .prop_map(|(id, base, raw_len, gpu, keys)| {
                // Valid by construction: len >= 1 and base + len <= u64::MAX.
                let base = base.min(u64::MAX - 1);
                let len = 1 + raw_len % (u64::MAX - base);
                let kind = if gpu {
                    MemoryKind::Gpu
                } else {
                    MemoryKind::Host
                };
                seg(id, base, len, kind, &keys)
            });
        prop::collection::vec(one, 0..=8).prop_map(|mut segs| {
            let mut seen = HashSet::new();
            segs.retain(|s| seen.insert(s.info.id));
            segs
        })
    }

    fn arb_hello() -> impl Strategy<Value = Hello> {
        let endpoint =
            (any::<bool>(), prop::collection::vec(any::<u8>(), 0..=64)).prop_map(|(rdma, data)| {
                Endpoint {
                    transport: if rdma {
                        TransportId::Rdma
                    } else {
                        TransportId::Tcp
                    },
                    data,
                }
            });
        (
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u16>(),
            arb_segments(),
            prop::collection::vec(endpoint, 0..=3),
        )
            .prop_map(
                |(engine_id, epoch, control, conn_index, segments, endpoints)| Hello {
                    engine_id,
                    epoch,
                    purpose: if control {
                        ConnPurpose::Control
                    } else {
                        ConnPurpose::TcpData
                    },
                    conn_index,
                    segments,
                    endpoints,
                },
            )
    }

    fn arb_frame() -> impl Strategy<Value = FrameHeader> {
        (
            prop::sample::select(ALL_OPS.to_vec()),
            0..=FLAG_LAST,
            any::<u16>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(op, flags, status, segment, batch, offset, len, tag)| {
                let bounded = matches!(
                    op,
                    FrameOp::Write
                        | FrameOp::ReadRequest
                        | FrameOp::ReadResponse
                        | FrameOp::SegmentsResponse
                );
                let len = if bounded {
                    len % (MAX_FRAME_PAYLOAD + 1)
                } else {
                    len
                };
                FrameHeader {
                    op,
                    flags,
                    status,
                    segment,
                    batch,
                    offset,
                    len,
                    tag,
                }
            })
    }

    proptest! {
        #[test]
        fn prop_hello_round_trip(hello in arb_hello()) {
            let msg = encode_hello(&hello);
            prop_assert_eq!(decode_hello(&msg)?, hello.clone());
            prop_assert_eq!(decode_hello_body(&msg[PREAMBLE_LEN..])?, hello.clone());
            let mut segs = Vec::new();
            encode_segments(&hello.segments, &mut segs);
            prop_assert_eq!(decode_segments(&segs)?, hello.segments);
        }

        #[test]
        fn prop_frame_round_trip(h in arb_frame()) {
            prop_assert_eq!(FrameHeader::decode(&h.encode())?, h);
        }

        #[test]
        fn prop_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..=512)) {
            if let Ok(hello) = decode_hello(&bytes) {
                // The encoding is canonical: whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(encode_hello(&hello), bytes.clone());
            }
            let _ = decode_hello_body(&bytes);
            if let Ok(segs) = decode_segments(&bytes) {
                let mut out = Vec::new();
                encode_segments(&segs, &mut out);
                prop_assert_eq!(out, bytes.clone());
            }
        }

        #[test]
        fn prop_frame_decode_never_panics(bytes in any::<[u8; FRAME_HEADER_LEN]>()) {
            if let Ok(h) = FrameHeader::decode(&bytes) {
                prop_assert_eq!(h.encode(), bytes);
            }
        }

        #[test]
        fn prop_mutated_hello(
            hello in arb_hello(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut msg = encode_hello(&hello);
            let i = at.index(msg.len());
            msg[i] = byte;
            if let Ok(decoded) = decode_hello(&msg) {
                prop_assert_eq!(encode_hello(&decoded), msg.clone());
            }
            let _ = decode_hello_body(&msg[PREAMBLE_LEN..]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// RDMA endpoint: the data of an `Rdma` endpoint in a handshake.
//
// rails: u16 count, then per rail: index u16, port u8, mtu u16 (bytes), lid u16, gid [16]
// qps:   u16 count, then per QP:   rail u16, qpn u32, psn u32, peer_rail u16
// An initiator lists one QP per lane with `peer_rail = NO_RAIL`; the target answers with the QP
// it connected to each, in the same order, naming the initiator's rail in `peer_rail`.

/// Marks "no rail chosen yet" in [`QpInfo::peer_rail`].
pub const NO_RAIL: u16 = u16::MAX;
/// Most rails one RDMA endpoint may list.
pub const MAX_RAILS: usize = 64;
/// Most queue pairs one RDMA endpoint may list.
pub const MAX_QPS: usize = 4096;

/// One rail (HCA port) as a peer must know it to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RailInfo {
    /// Rail index at its owner.
    pub index: u16,
    /// HCA port number.
    pub port: u8,
    /// Active MTU in bytes (256..4096).
    pub mtu: u16,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID the rail uses.
    pub gid: [u8; 16],
}

/// One RC queue pair offered or answered in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// Rail of the sender's QP.
    pub rail: u16,
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// The other side's rail it pairs with ([`NO_RAIL`] in an offer).
    pub peer_rail: u16,
}

/// The whole RDMA endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaEndpoint {
    /// The sender's rails.
    pub rails: Vec<RailInfo>,
    /// Its queue pairs, one per lane.
    pub qps: Vec<QpInfo>,
}

impl RdmaEndpoint {
    /// Encodes the endpoint (the opaque data of an `Rdma` [`Endpoint`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.rails.len() * 23 + self.qps.len() * 12);
        out.extend_from_slice(&(self.rails.len() as u16).to_le_bytes());
        for r in &self.rails {
            out.extend_from_slice(&r.index.to_le_bytes());
            out.push(r.port);
            out.extend_from_slice(&r.mtu.to_le_bytes());
            out.extend_from_slice(&r.lid.to_le_bytes());
            out.extend_from_slice(&r.gid);
        }
        out.extend_from_slice(&(self.qps.len() as u16).to_le_bytes());
        for q in &self.qps {
            out.extend_from_slice(&q.rail.to_le_bytes());
            out.extend_from_slice(&q.qpn.to_le_bytes());
            out.extend_from_slice(&q.psn.to_le_bytes());
            out.extend_from_slice(&q.peer_rail.to_le_bytes());
        }
        out
    }

    /// Decodes and validates an endpoint from peer input, exactly.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let n = r.u16("rdma endpoint")? as usize;
        if n > MAX_RAILS {
            return Err(WireError::TooLarge {
                what: "rdma rails",
                len: n as u64,
                max: MAX_RAILS as u64,
            });
        }
        let mut rails = Vec::with_capacity(n.min(r.remaining() / 23));
        for _ in 0..n {
            let index = r.u16("rdma endpoint")?;
            let port = r.u8("rdma endpoint")?;
            let mtu = r.u16("rdma endpoint")?;
            let lid = r.u16("rdma endpoint")?;
            let gid: [u8; 16] = r.array("rdma endpoint")?;
            if !matches!(mtu, 256 | 512 | 1024 | 2048 | 4096) {
                return Err(WireError::Malformed {
                    what: "rdma rail",
                    detail: format!("mtu {mtu}"),
                });
            }
            if rails.iter().any(|x: &RailInfo| x.index == index) {
                return Err(WireError::Malformed {
                    what: "rdma rail",
                    detail: format!("duplicate rail {index}"),
                });
            }
            rails.push(RailInfo {
                index,
                port,
                mtu,
                lid,
                gid,
            });
        }
        let m = r.u16("rdma endpoint")? as usize;
        if m > MAX_QPS {
            return Err(WireError::TooLarge {
                what: "rdma qps",
                len: m as u64,
                max: MAX_QPS as u64,
            });
        }
        let mut qps = Vec::with_capacity(m.min(r.remaining() / 12));
        for _ in 0..m {
            let q = QpInfo {
                rail: r.u16("rdma endpoint")?,
                qpn: r.u32("rdma endpoint")?,
                psn: r.u32("rdma endpoint")? & 0x00ff_ffff,
                peer_rail: r.u16("rdma endpoint")?,
            };
            if !rails.iter().any(|x| x.index == q.rail) {
                return Err(WireError::Malformed {
                    what: "rdma qp",
                    detail: format!("unknown rail {}", q.rail),
                });
            }
            qps.push(q);
        }
        r.finish("rdma endpoint")?;
        Ok(RdmaEndpoint { rails, qps })
    }
}

#[cfg(test)]
mod rdma_endpoint_tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> RdmaEndpoint {
        let gid = |n: u8| {
            let mut g = [0u8; 16];
            g[10] = 0xff;
            g[11] = 0xff;
            g[12..].copy_from_slice(&[198, 18, 0, n]);
            g
        };
        RdmaEndpoint {
            rails: vec![
                RailInfo {
                    index: 0,
                    port: 1,
                    mtu: 4096,
                    lid: 0,
                    gid: gid(1),
                },
                RailInfo {
                    index: 1,
                    port: 1,
                    mtu: 1024,
                    lid: 7,
                    gid: gid(2),
                },
            ],
            qps: vec![
                QpInfo {
                    rail: 0,
                    qpn: 17,
                    psn: 0x12345,
                    peer_rail: NO_RAIL,
                },
                QpInfo {
                    rail: 1,
                    qpn: 18,
                    psn: 0xabcdef,
                    peer_rail: 0,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let e = sample();
        assert_eq!(RdmaEndpoint::decode(&e.encode()).unwrap(), e);
        assert_eq!(
            RdmaEndpoint::decode(&RdmaEndpoint::default().encode()).unwrap(),
            RdmaEndpoint::default()
        );
    }

    #[test]
    fn rejects_bad_input() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(RdmaEndpoint::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(matches!(
            RdmaEndpoint::decode(&extra),
            Err(WireError::TrailingBytes { .. })
        ));
        let mut bad_mtu = sample();
        bad_mtu.rails[0].mtu = 1500;
        assert!(matches!(
            RdmaEndpoint::decode(&bad_mtu.encode()),
            Err(WireError::Malformed { .. })
        ));
        let mut bad_rail = sample();
        bad_rail.qps[0].rail = 9;
        assert!(matches!(
            RdmaEndpoint::decode(&bad_rail.encode()),
            Err(WireError::Malformed { .. })
        ));
        let mut dup = sample();
        dup.rails[1].index = 0;
        dup.qps[1].rail = 0;
        assert!(matches!(
            RdmaEndpoint::decode(&dup.encode()),
            Err(WireError::Malformed { .. })
        ));
        assert!(matches!(
            RdmaEndpoint::decode(&[0xff, 0xff]),
            Err(WireError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = RdmaEndpoint::decode(&bytes);
        }
    }
}
