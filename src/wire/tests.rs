//! Codec tests: round trips, rejections, and arbitrary bytes that must never panic.

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
        token: 0x5eed,
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
    let (kind, body_len) = decode_preamble(msg[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
    assert_eq!(kind, MsgKind::Hello);
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
        token: 0,
        segments: vec![],
        endpoints: vec![],
    };
    let msg = encode_hello(&hello);
    assert_eq!(msg.len(), PREAMBLE_LEN + 8 + 8 + 1 + 2 + 8 + 4 + 2);
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
    for other in [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        let p = preamble(MAGIC, other, 0, 10);
        assert_eq!(
            decode_preamble(&p),
            Err(WireError::UnsupportedVersion {
                got: other,
                supported: PROTOCOL_VERSION
            })
        );
    }
    let mut msg = encode_hello(&sample_hello());
    msg[4..6].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(
        decode_hello(&msg),
        Err(WireError::UnsupportedVersion {
            got: 0,
            supported: PROTOCOL_VERSION
        })
    );
}

#[test]
fn preamble_unknown_kind_rejected() {
    for kind in [0, 5, 0xffff] {
        let p = preamble(MAGIC, PROTOCOL_VERSION, kind, 10);
        assert!(matches!(
            decode_preamble(&p),
            Err(WireError::Malformed { .. })
        ));
    }
}

#[test]
fn small_messages_are_capped_before_their_body() {
    for kind in [MsgKind::Hi, MsgKind::Proof, MsgKind::Refuse] {
        let ok = preamble(MAGIC, PROTOCOL_VERSION, kind as u16, MAX_SMALL_BODY as u32);
        assert_eq!(decode_preamble(&ok), Ok((kind, MAX_SMALL_BODY)));
        let big = preamble(
            MAGIC,
            PROTOCOL_VERSION,
            kind as u16,
            MAX_SMALL_BODY as u32 + 1,
        );
        assert!(matches!(
            decode_preamble(&big),
            Err(WireError::TooLarge { .. })
        ));
    }
}

#[test]
fn oversized_body() {
    let max = MAX_HELLO_BODY as u32;
    assert_eq!(
        decode_preamble(&preamble(MAGIC, PROTOCOL_VERSION, 3, max)),
        Ok((MsgKind::Hello, MAX_HELLO_BODY))
    );
    assert_eq!(
        decode_preamble(&preamble(MAGIC, PROTOCOL_VERSION, 3, max + 1)),
        Err(WireError::TooLarge {
            what: "handshake body",
            len: u64::from(max) + 1,
            max: MAX_HELLO_BODY as u64
        })
    );
    let msg = preamble(MAGIC, PROTOCOL_VERSION, 3, u32::MAX);
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
    let at = 8 + 8 + 1 + 2 + 8 + 4 + 2;
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
    body.extend_from_slice(&0u64.to_le_bytes());
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
                token: engine_id ^ epoch,
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

/// Runs a handshake between an initiator and a responder in memory, message by message, as
/// two sockets would; returns what each side ended with.
fn shake(
    i_secret: Option<&[u8]>,
    r_secret: Option<&[u8]>,
) -> (Result<Hello, HandshakeError>, Result<Hello, HandshakeError>) {
    let secret = |s: Option<&[u8]>| s.map(|b| Secret::new(b).unwrap());
    let mine = sample_hello();
    let mut theirs = sample_hello();
    theirs.engine_id = 77;
    let (mut ini, mut to_r) = Initiator::start(secret(i_secret), [1; NONCE_LEN], mine.clone());
    let mut res = Responder::new(secret(r_secret), [2; NONCE_LEN]);
    let mut r_result = None;
    loop {
        // Responder side: every whole message in `to_r`.
        let mut to_i = Vec::new();
        while let Some((kind, body, used)) =
            next_message(&to_r, res.expects(), MAX_HELLO_BODY).unwrap()
        {
            let step = res.on_message(kind, body);
            to_r.drain(..used);
            match step {
                Ok(Step::Send(b)) => to_i.extend_from_slice(&b),
                Ok(Step::Answer(h)) => {
                    to_i.extend_from_slice(&res.answer(&theirs));
                    r_result = Some(Ok(h));
                }
                Ok(Step::Refuse(b, e)) => {
                    to_i.extend_from_slice(&b);
                    r_result = Some(Err(e));
                }
                Ok(Step::Done(_)) => unreachable!(),
                Err(e) => r_result = Some(Err(e)),
            }
            if r_result.is_some() {
                break;
            }
        }
        // Initiator side.
        let Some((kind, body, _)) = next_message(&to_i, ini.expects(), MAX_HELLO_BODY).unwrap()
        else {
            let r = r_result.expect("the responder ended");
            return (
                Err(HandshakeError::Wire(WireError::Truncated {
                    what: "eof",
                    needed: 1,
                    got: 0,
                })),
                r,
            );
        };
        match ini.on_message(kind, body) {
            Ok(Step::Send(b)) => to_r = b,
            Ok(Step::Done(h)) => return (Ok(h), r_result.expect("answered")),
            Ok(Step::Refuse(b, e)) => {
                // The responder reads the refusal.
                let (kind, body, _) = next_message(&b, res.expects(), MAX_HELLO_BODY)
                    .unwrap()
                    .unwrap();
                let r = res.on_message(kind, body).map(|_| sample_hello());
                return (Err(e), r);
            }
            Ok(Step::Answer(_)) => unreachable!(),
            Err(e) => return (Err(e), r_result.unwrap_or_else(|| Ok(sample_hello()))),
        }
    }
}

fn refusal_code<T>(r: &Result<T, HandshakeError>) -> Option<RefuseCode> {
    r.as_ref().err().and_then(|e| e.refusal()).map(|r| r.code)
}

#[test]
#[cfg_attr(
    miri,
    ignore = "HMAC-SHA256 is slow under Miri and no code of ours is unsafe here"
)]
fn handshake_with_and_without_a_shared_secret() {
    for secret in [None, Some(&b"0123456789abcdef-cluster"[..])] {
        let (i, r) = shake(secret, secret);
        assert_eq!(
            i.unwrap().engine_id,
            77,
            "the initiator has the responder's hello"
        );
        assert_eq!(
            r.unwrap(),
            sample_hello(),
            "the responder has the initiator's hello"
        );
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "HMAC-SHA256 is slow under Miri and no code of ours is unsafe here"
)]
fn handshake_refuses_a_missing_or_different_secret_before_any_hello() {
    let a = &b"0123456789abcdef-cluster-a"[..];
    let b = &b"0123456789abcdef-cluster-b"[..];
    // The responder requires a secret the initiator lacks.
    let (i, r) = shake(None, Some(a));
    assert_eq!(refusal_code(&i), Some(RefuseCode::AuthRequired));
    assert_eq!(refusal_code(&r), Some(RefuseCode::AuthRequired));
    // The initiator holds a secret the responder lacks: it sends no hello.
    let (i, r) = shake(Some(a), None);
    assert_eq!(refusal_code(&i), Some(RefuseCode::PeerUnauthenticated));
    assert_eq!(refusal_code(&r), Some(RefuseCode::PeerUnauthenticated));
    // Different secrets: the initiator sees the responder's proof fail first.
    let (i, r) = shake(Some(a), Some(b));
    assert_eq!(refusal_code(&i), Some(RefuseCode::AuthFailed));
    assert_eq!(refusal_code(&r), Some(RefuseCode::AuthFailed));
}

#[test]
#[cfg_attr(
    miri,
    ignore = "HMAC-SHA256 is slow under Miri and no code of ours is unsafe here"
)]
fn proofs_bind_both_nonces_and_the_role() {
    let s = Secret::new(b"0123456789abcdef").unwrap();
    let (n1, n2) = ([1; NONCE_LEN], [2; NONCE_LEN]);
    let p = s.prove(Role::Responder, &n1, &n2);
    assert!(s.check(Role::Responder, &n1, &n2, &p));
    // Reflected (the other role), replayed on other nonces, truncated or from another secret.
    assert!(!s.check(Role::Initiator, &n1, &n2, &p));
    assert!(!s.check(Role::Responder, &n2, &n1, &p));
    assert!(!s.check(Role::Responder, &n1, &[3; NONCE_LEN], &p));
    assert!(!s.check(Role::Responder, &n1, &n2, &p[..31]));
    assert!(!s.check(Role::Responder, &n1, &n2, &[]));
    let other = Secret::new(b"0123456789abcdeF").unwrap();
    assert!(!other.check(Role::Responder, &n1, &n2, &p));
    assert!(Secret::new(b"short").is_err());
    assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    assert_eq!(
        Secret::from_file_contents(b"0123456789abcdef\n").unwrap(),
        s,
        "a trailing newline is not part of a secret file"
    );
}

#[test]
fn a_responder_takes_only_small_messages_before_the_proof() {
    let mut r = Responder::new(None, [2; NONCE_LEN]);
    // A hello straight away: refused without being read.
    let hello = encode_hello(&sample_hello());
    assert!(next_message(&hello, r.expects(), MAX_SMALL_BODY).is_err());
    // A Hi announcing a body over the small cap: refused on its preamble alone.
    let mut big = preamble(MAGIC, PROTOCOL_VERSION, MsgKind::Hi as u16, 4 << 20).to_vec();
    big.extend_from_slice(&[0; 16]);
    assert!(matches!(
        next_message(&big, r.expects(), MAX_HELLO_BODY),
        Err(WireError::TooLarge { .. })
    ));
    // An initiator's Hi that carries a proof is malformed.
    let hi = encode_hi(&Hi {
        auth: false,
        nonce: [1; NONCE_LEN],
        proof: vec![0; PROOF_LEN],
    });
    let (kind, body, _) = next_message(&hi, r.expects(), MAX_SMALL_BODY)
        .unwrap()
        .unwrap();
    assert!(matches!(r.on_message(kind, body), Ok(Step::Refuse(..))));
}

#[test]
fn small_messages_round_trip() {
    let hi = Hi {
        auth: true,
        nonce: [9; NONCE_LEN],
        proof: vec![5; PROOF_LEN],
    };
    let bytes = encode_hi(&hi);
    assert_eq!(decode_hi(&bytes[PREAMBLE_LEN..]).unwrap(), hi);
    let r = Refusal {
        code: RefuseCode::Busy,
        text: "é".repeat(300),
    };
    let bytes = encode_refusal(&r);
    let back = decode_refusal(&bytes[PREAMBLE_LEN..]).unwrap();
    assert_eq!(back.code, RefuseCode::Busy);
    assert!(back.text.len() <= 256 && r.text.starts_with(&back.text));
    assert_eq!(
        decode_proof(&encode_proof(&[7; PROOF_LEN])[PREAMBLE_LEN..]).unwrap(),
        vec![7; PROOF_LEN]
    );
    assert!(
        decode_proof(&[3, 1, 2, 3]).is_err(),
        "a proof is 0 or 32 bytes"
    );
}
