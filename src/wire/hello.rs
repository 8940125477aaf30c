//! The handshake: preamble, hello body, segment lists and transport endpoints.

use super::*;

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
    /// A link token the connecting side presents (0: none): a KV prefill's data path carries
    /// the one its decode peer handed it over their KV channel, and the decode side accepts
    /// that room's completions only from connections that present it.
    pub token: u64,
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
    body.extend_from_slice(&hello.token.to_le_bytes());
    encode_segments(&hello.segments, &mut body);
    body.extend_from_slice(&saturate_u16(hello.endpoints.len()).to_le_bytes());
    for ep in &hello.endpoints {
        body.push(ep.transport as u8);
        body.extend_from_slice(&saturate_u32(ep.data.len()).to_le_bytes());
        body.extend_from_slice(&ep.data);
    }

    let mut msg = Vec::with_capacity(PREAMBLE_LEN + body.len());
    msg.extend_from_slice(&preamble(MsgKind::Hello, body.len()));
    msg.extend_from_slice(&body);
    msg
}

/// Decodes a preamble; returns the message kind and the body length that follows (checked
/// against the kind's cap, [`max_body`]).
pub fn decode_preamble(preamble: &[u8; PREAMBLE_LEN]) -> Result<(MsgKind, usize), WireError> {
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
    let kind = MsgKind::from_u16(r.u16("preamble kind")?)?;
    let body_len = r.u32("preamble body length")?;
    let what = if kind == MsgKind::Hello {
        "handshake body"
    } else {
        "handshake message"
    };
    check_max(what, u64::from(body_len), max_body(kind) as u64)?;
    Ok((kind, body_len as usize))
}

/// Decodes a handshake body (the bytes after the preamble), exactly.
pub fn decode_hello_body(body: &[u8]) -> Result<Hello, WireError> {
    let mut r = Reader::new(body);
    let engine_id = r.u64("hello engine id")?;
    let epoch = r.u64("hello epoch")?;
    let purpose = conn_purpose_from_u8(r.u8("hello purpose")?)?;
    let conn_index = r.u16("hello connection index")?;
    let token = r.u64("hello token")?;
    let segments = read_segments(&mut r)?;
    let endpoints = read_endpoints(&mut r)?;
    r.finish("handshake body")?;
    Ok(Hello {
        engine_id,
        epoch,
        purpose,
        conn_index,
        token,
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
    let (kind, body_len) = decode_preamble(preamble)?;
    if kind != MsgKind::Hello {
        return Err(WireError::Malformed {
            what: "handshake",
            detail: format!("a {kind:?} message where a hello was expected"),
        });
    }
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
pub(super) const SEGMENT_MIN_LEN: usize = 4 + 8 + 8 + 1 + 2;
/// Encoding of one rail key (rail, rkey).
pub(super) const RAIL_KEY_LEN: usize = 2 + 4;
/// Smallest encoding of one endpoint (transport, data length; no data).
pub(super) const ENDPOINT_MIN_LEN: usize = 1 + 4;

pub(super) fn hello_body_size_hint(hello: &Hello) -> usize {
    8 + 8
        + 1
        + 2
        + 8
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

pub(super) fn conn_purpose_from_u8(v: u8) -> Result<ConnPurpose, WireError> {
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

pub(super) fn transport_from_u8(v: u8) -> Result<TransportId, WireError> {
    match v {
        1 => Ok(TransportId::Tcp),
        2 => Ok(TransportId::Rdma),
        _ => Err(WireError::Malformed {
            what: "endpoint",
            detail: format!("unknown transport {v}"),
        }),
    }
}

pub(super) fn memory_kind_from_u8(v: u8) -> Result<MemoryKind, WireError> {
    match v {
        0 => Ok(MemoryKind::Host),
        1 => Ok(MemoryKind::Gpu),
        _ => Err(WireError::Malformed {
            what: "segment",
            detail: format!("unknown memory kind {v}"),
        }),
    }
}

/// Reads a segment list (count u32, then the segments) from `r`.
pub(super) fn read_segments(r: &mut Reader<'_>) -> Result<Vec<SegmentDesc>, WireError> {
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
pub(super) fn read_endpoints(r: &mut Reader<'_>) -> Result<Vec<Endpoint>, WireError> {
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
