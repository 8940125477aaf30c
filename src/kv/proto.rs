//! Messages of the KV control channel between two managers (pure codec, fuzzed).
//!
//! Each message is a little-endian u32 body length, then the body: a kind byte and its fields.
//! The decoder rejects anything malformed, truncated, oversized or trailing with a
//! [`WireError`], never panics, and never allocates more than the input could hold.

use super::layout::{KvBuffer, KvLayout};
use crate::wire::{Reader, WireError, check_max};

/// Largest message body accepted.
pub const MAX_MESSAGE: usize = 32 << 20;
/// Most page indices one room may name.
pub const MAX_ROOM_PAGES: usize = 4 << 20;
/// Most buffers (page or aux) of a layout.
pub const MAX_LAYOUT_BUFFERS: usize = 4096;
/// Longest text field (reasons, addresses).
pub const MAX_TEXT: usize = 4096;

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvMessage {
    /// First message each way: who the manager is and where its KV cache lives.
    Hello {
        /// The manager's engine id.
        engine_id: u64,
        /// The manager's engine epoch.
        epoch: u64,
        /// Bootstrap address of the manager's engine (`ip:port`; an unspecified ip means
        /// "the address this channel comes from").
        engine_addr: String,
        /// Its layout.
        layout: KvLayout,
        /// Decode → prefill: the link token the prefill's data path must present to the
        /// decode engine; completions that come over connections without it finish no room
        /// (0 from a prefill).
        link: u64,
    },
    /// Receiver → sender: the room's destination.
    RoomInit {
        /// Room id.
        room: u64,
        /// The receiver's slot for the room (goes into every notification tag).
        slot: u32,
        /// Aux slot at the receiver.
        aux_index: Option<u32>,
        /// Destination pages, in room order.
        pages: Vec<i32>,
        /// The receiver asks for a [`ChunkDigest`](KvMessage::ChunkDigest) of every chunk.
        digests: bool,
    },
    /// Sender → receiver, when the room asked for digests: a digest of the bytes of chunk
    /// `seq` as the sender posted them: for every page buffer in layout order, the item of
    /// each of the chunk's pages (`first..first + count` in room order); then, for the last
    /// chunk, its aux slot of every aux buffer ([`KvLayout::digest_ranges`]).
    ChunkDigest {
        /// Room id.
        room: u64,
        /// The chunk's sequence number.
        seq: u32,
        /// Its first page in room order.
        first: u64,
        /// Its page count.
        count: u64,
        /// 64-bit XXH3 of its bytes.
        digest: u64,
    },
    /// Sender → receiver: the room is paired; data will follow.
    RoomAccepted {
        /// Room id.
        room: u64,
    },
    /// Sender → receiver: the room cannot be served.
    RoomRejected {
        /// Room id.
        room: u64,
        /// `Error` code explaining why.
        code: u16,
        /// The [`FailureKind`](super::FailureKind) code the receiver's room takes.
        kind: u8,
        /// Text for the failure reason.
        reason: String,
    },
    /// Either way: the room is aborted (or failed) on the sending side.
    RoomAbort {
        /// Room id.
        room: u64,
        /// The [`FailureKind`](super::FailureKind) code of the failure on the sending side.
        kind: u8,
        /// Why.
        reason: String,
    },
    /// Sender → receiver: after a `RoomAbort`, no write of the room is in flight any more.
    RoomAbortAck {
        /// Room id.
        room: u64,
    },
    /// Either way, every heartbeat interval: the manager is alive and reading.
    Heartbeat,
}

const HELLO: u8 = 1;
const ROOM_INIT: u8 = 2;
const ROOM_ACCEPTED: u8 = 3;
const ROOM_REJECTED: u8 = 4;
const ROOM_ABORT: u8 = 5;
const ROOM_ABORT_ACK: u8 = 6;
const HEARTBEAT: u8 = 7;
const CHUNK_DIGEST: u8 = 8;
const NO_AUX: u32 = u32::MAX;

fn put_text(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(MAX_TEXT)];
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_buffers(out: &mut Vec<u8>, list: &[KvBuffer]) {
    out.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for b in list {
        for v in [b.addr, b.len, b.item_len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

impl KvMessage {
    /// Encodes with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; 4];
        match self {
            KvMessage::Hello {
                engine_id,
                epoch,
                engine_addr,
                layout,
                link,
            } => {
                out.push(HELLO);
                out.extend_from_slice(&engine_id.to_le_bytes());
                out.extend_from_slice(&epoch.to_le_bytes());
                put_text(&mut out, engine_addr);
                put_buffers(&mut out, &layout.buffers);
                put_buffers(&mut out, &layout.aux);
                out.extend_from_slice(&link.to_le_bytes());
            }
            KvMessage::RoomInit {
                room,
                slot,
                aux_index,
                pages,
                digests,
            } => {
                out.push(ROOM_INIT);
                out.extend_from_slice(&room.to_le_bytes());
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&aux_index.unwrap_or(NO_AUX).to_le_bytes());
                out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
                out.reserve(pages.len() * 4);
                for p in pages {
                    out.extend_from_slice(&p.to_le_bytes());
                }
                out.push(u8::from(*digests));
            }
            KvMessage::ChunkDigest {
                room,
                seq,
                first,
                count,
                digest,
            } => {
                out.push(CHUNK_DIGEST);
                out.extend_from_slice(&room.to_le_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(&digest.to_le_bytes());
            }
            KvMessage::RoomAccepted { room } => {
                out.push(ROOM_ACCEPTED);
                out.extend_from_slice(&room.to_le_bytes());
            }
            KvMessage::RoomRejected {
                room,
                code,
                kind,
                reason,
            } => {
                out.push(ROOM_REJECTED);
                out.extend_from_slice(&room.to_le_bytes());
                out.extend_from_slice(&code.to_le_bytes());
                out.push(*kind);
                put_text(&mut out, reason);
            }
            KvMessage::RoomAbort { room, kind, reason } => {
                out.push(ROOM_ABORT);
                out.extend_from_slice(&room.to_le_bytes());
                out.push(*kind);
                put_text(&mut out, reason);
            }
            KvMessage::RoomAbortAck { room } => {
                out.push(ROOM_ABORT_ACK);
                out.extend_from_slice(&room.to_le_bytes());
            }
            KvMessage::Heartbeat => out.push(HEARTBEAT),
        }
        let body = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&body.to_le_bytes());
        out
    }

    /// Decodes a length prefix: the body length that follows.
    pub fn decode_len(prefix: [u8; 4]) -> Result<usize, WireError> {
        let len = u32::from_le_bytes(prefix) as usize;
        check_max("KV message", len as u64, MAX_MESSAGE as u64)?;
        if len == 0 {
            return Err(WireError::Truncated {
                what: "KV message kind",
                needed: 1,
                got: 0,
            });
        }
        Ok(len)
    }

    /// Decodes one message body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<KvMessage, WireError> {
        check_max("KV message", body.len() as u64, MAX_MESSAGE as u64)?;
        let mut r = Reader::new(body);
        let msg = match r.u8("KV message kind")? {
            HELLO => KvMessage::Hello {
                engine_id: r.u64("engine id")?,
                epoch: r.u64("epoch")?,
                engine_addr: text(&mut r, "engine address")?,
                layout: {
                    let buffers = buffers(&mut r, "KV buffers")?;
                    let aux = buffers_or_none(&mut r)?;
                    KvLayout::new(buffers, aux).map_err(|e| WireError::Malformed {
                        what: "KV layout",
                        detail: e.to_string(),
                    })?
                },
                link: r.u64("link")?,
            },
            ROOM_INIT => {
                let room = r.u64("room")?;
                let slot = r.u32("slot")?;
                let aux = r.u32("aux index")?;
                let n = r.u32("page count")? as usize;
                check_max("room pages", n as u64, MAX_ROOM_PAGES as u64)?;
                r.require_items(n, 4, "room pages")?;
                let raw = r.bytes(n * 4, "room pages")?;
                let pages = raw
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let digests = match r.u8("digest flag")? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(WireError::Malformed {
                            what: "digest flag",
                            detail: format!("{other}, not 0 or 1"),
                        });
                    }
                };
                KvMessage::RoomInit {
                    room,
                    slot,
                    aux_index: (aux != NO_AUX).then_some(aux),
                    pages,
                    digests,
                }
            }
            CHUNK_DIGEST => KvMessage::ChunkDigest {
                room: r.u64("room")?,
                seq: r.u32("chunk")?,
                first: r.u64("first page")?,
                count: r.u64("page count")?,
                digest: r.u64("digest")?,
            },
            ROOM_ACCEPTED => KvMessage::RoomAccepted {
                room: r.u64("room")?,
            },
            ROOM_REJECTED => KvMessage::RoomRejected {
                room: r.u64("room")?,
                code: r.u16("error code")?,
                kind: r.u8("failure kind")?,
                reason: text(&mut r, "reason")?,
            },
            ROOM_ABORT => KvMessage::RoomAbort {
                room: r.u64("room")?,
                kind: r.u8("failure kind")?,
                reason: text(&mut r, "reason")?,
            },
            ROOM_ABORT_ACK => KvMessage::RoomAbortAck {
                room: r.u64("room")?,
            },
            HEARTBEAT => KvMessage::Heartbeat,
            other => {
                return Err(WireError::Malformed {
                    what: "KV message kind",
                    detail: format!("unknown kind {other}"),
                });
            }
        };
        r.finish("KV message")?;
        Ok(msg)
    }
}

fn text(r: &mut Reader<'_>, what: &'static str) -> Result<String, WireError> {
    let n = r.u16(what)? as usize;
    check_max(what, n as u64, MAX_TEXT as u64)?;
    let bytes = r.bytes(n, what)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Malformed {
        what,
        detail: "not UTF-8".into(),
    })
}

fn buffers(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<KvBuffer>, WireError> {
    let n = r.u32(what)? as usize;
    check_max(what, n as u64, MAX_LAYOUT_BUFFERS as u64)?;
    r.require_items(n, 24, what)?;
    (0..n)
        .map(|_| {
            Ok(KvBuffer {
                addr: r.u64("buffer address")?,
                len: r.u64("buffer length")?,
                item_len: r.u64("item length")?,
            })
        })
        .collect()
}

fn buffers_or_none(r: &mut Reader<'_>) -> Result<Vec<KvBuffer>, WireError> {
    buffers(r, "aux buffers")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout() -> KvLayout {
        KvLayout::new(
            vec![KvBuffer {
                addr: 0x7f00_0000_0000,
                len: 36 << 20,
                item_len: 36 << 10,
            }],
            vec![KvBuffer {
                addr: 0x1000,
                len: 4096,
                item_len: 64,
            }],
        )
        .unwrap()
    }

    fn round_trip(m: &KvMessage) {
        let bytes = m.encode();
        let len = KvMessage::decode_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(&KvMessage::decode(&bytes[4..]).unwrap(), m);
    }

    #[test]
    fn every_message_round_trips() {
        for m in [
            KvMessage::Hello {
                engine_id: 1,
                epoch: 2,
                engine_addr: "10.0.0.1:4000".into(),
                layout: layout(),
                link: 0xfeed_beef,
            },
            KvMessage::RoomInit {
                room: 9,
                slot: 3,
                aux_index: Some(5),
                pages: vec![0, 7, -1, i32::MAX],
                digests: false,
            },
            KvMessage::RoomInit {
                room: 9,
                slot: 3,
                aux_index: None,
                pages: vec![],
                digests: true,
            },
            KvMessage::ChunkDigest {
                room: 9,
                seq: 255,
                first: 40,
                count: 8,
                digest: u64::MAX - 1,
            },
            KvMessage::RoomAccepted { room: u64::MAX },
            KvMessage::RoomRejected {
                room: 1,
                code: 27,
                kind: 8,
                reason: "room 1 already exists".into(),
            },
            KvMessage::RoomAbort {
                room: 2,
                kind: 4,
                reason: "aborted".into(),
            },
            KvMessage::RoomAbortAck { room: 2 },
            KvMessage::Heartbeat,
        ] {
            round_trip(&m);
        }
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        assert!(matches!(
            KvMessage::decode_len((MAX_MESSAGE as u32 + 1).to_le_bytes()),
            Err(WireError::TooLarge { .. })
        ));
        assert!(KvMessage::decode_len(0u32.to_le_bytes()).is_err());
        assert!(matches!(
            KvMessage::decode(&[99]),
            Err(WireError::Malformed { .. })
        ));
        let mut init = KvMessage::RoomInit {
            room: 1,
            slot: 1,
            aux_index: None,
            pages: vec![1, 2],
            digests: false,
        }
        .encode();
        let flag_at = init.len() - 1;
        init[flag_at] = 2;
        assert!(matches!(
            KvMessage::decode(&init[4..]),
            Err(WireError::Malformed {
                what: "digest flag",
                ..
            })
        ));
        init[flag_at] = 0;
        assert!(matches!(
            KvMessage::decode(&init[4..init.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
        init.push(0);
        assert!(matches!(
            KvMessage::decode(&init[4..]),
            Err(WireError::TrailingBytes { .. })
        ));
        // A page count far beyond the bytes sent is refused before allocating.
        let mut huge = vec![ROOM_INIT];
        huge.extend_from_slice(&[0; 16]);
        huge.extend_from_slice(&(1u32 << 20).to_le_bytes());
        assert!(matches!(
            KvMessage::decode(&huge),
            Err(WireError::Truncated { .. })
        ));
        // A layout with a zero item length is malformed.
        let mut bad = KvMessage::Hello {
            engine_id: 1,
            epoch: 1,
            engine_addr: "x".into(),
            layout: layout(),
            link: 0,
        }
        .encode();
        let item_len_at = 4 + 1 + 16 + 2 + 1 + 4 + 16;
        bad[item_len_at..item_len_at + 8].copy_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            KvMessage::decode(&bad[4..]),
            Err(WireError::Malformed { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = KvMessage::decode(&bytes);
        }

        #[test]
        fn room_init_round_trips(room: u64, slot: u32, aux in prop::option::of(0u32..1000),
                                 pages in prop::collection::vec(any::<i32>(), 0..300),
                                 digests: bool) {
            round_trip(&KvMessage::RoomInit { room, slot, aux_index: aux, pages, digests });
        }

        #[test]
        fn chunk_digest_round_trips(room: u64, seq: u32, first: u64, count: u64, digest: u64) {
            round_trip(&KvMessage::ChunkDigest { room, seq, first, count, digest });
        }
    }
}
