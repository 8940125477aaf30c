//! Paged-KV hand-off between a prefill and a decode server, in rooms.
//!
//! A [`KvManager`] per process owns an engine, a role (prefill or decode) and the KV layout
//! ([`KvLayout`]: per-layer buffers of fixed-size pages, plus aux slots). Each request's
//! hand-off is a *room* (SGLang's `bootstrap_room`): the decode side creates a [`KvReceiver`]
//! against the prefill server's bootstrap address and names its destination pages; the prefill
//! side creates a [`KvSender`] for the same room id and sends source pages in one or more
//! chunks. Both poll the room through [`KvPoll`], SGLang's state machine.
//!
//! The library expands pages itself: (source page, destination page) pairs become runs that
//! are contiguous on both sides, one write per run and layer buffer, batched over the peer's
//! lanes. The receiver learns completion in-band: every chunk's batch ends with a notification
//! that follows its data on every lane (write-with-immediate on RDMA, a frame after the data on
//! TCP), and the room succeeds once every chunk, the last one carrying aux, has been notified.
//!
//! ```
//! use kvtransfer::kv::{KvBuffer, KvConfig, KvLayout, KvManager, KvPoll, KvReceiver, KvRole, KvSender};
//! use kvtransfer::EngineConfig;
//! # fn main() -> kvtransfer::Result<()> {
//! let item = 4096u64;
//! let (mut prefill_mem, mut decode_mem) = (vec![7u8; 8 * 4096], vec![0u8; 8 * 4096]);
//! let layout = |m: &mut Vec<u8>| KvLayout::new(
//!     vec![KvBuffer { addr: m.as_mut_ptr() as u64, len: m.len() as u64, item_len: item }],
//!     vec![],
//! );
//! // SAFETY: both vectors outlive the managers and are not touched while rooms run.
//! let prefill = unsafe {
//!     KvManager::new(EngineConfig::default(), KvConfig::new(KvRole::Prefill), layout(&mut prefill_mem)?)?
//! };
//! let decode = unsafe {
//!     KvManager::new(EngineConfig::default(), KvConfig::new(KvRole::Decode), layout(&mut decode_mem)?)?
//! };
//! let receiver = KvReceiver::new(&decode, prefill.bootstrap_addr(), 42)?;
//! receiver.init(&[5, 6], None)?;
//! let sender = KvSender::new(&prefill, 42)?;
//! sender.init(2, None)?;
//! while sender.poll() == KvPoll::Bootstrapping { std::thread::yield_now(); }
//! sender.send(&[0, 1], true)?;
//! while receiver.poll() != KvPoll::Success {
//!     assert_ne!(receiver.poll(), KvPoll::Failed, "{:?}", receiver.failure_reason());
//!     std::thread::yield_now();
//! }
//! drop((sender, receiver, prefill, decode));
//! assert!(decode_mem[5 * 4096..7 * 4096].iter().all(|&b| b == 7));
//! # Ok(()) }
//! ```

mod connector;
mod driver;
pub mod endpoint;
pub mod failure;
pub mod layout;
mod manager;
pub mod pages;
mod poster;
pub mod proto;
mod room;
pub mod session;
mod wires;

pub use failure::{Failure, FailureKind};
pub use layout::{KvBuffer, KvLayout};
pub use manager::{KvConfig, KvManager, KvRole};
pub use room::{KvReceiver, KvSender};

use std::time::Duration;

use crate::transport::fence::ROOM_SLOT_SHIFT;

/// A room's state, with SGLang's `KVPoll` values.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KvPoll {
    /// Failed (sticky): see `failure_reason()`.
    Failed = 0,
    /// The two sides are still exchanging the room's destination.
    Bootstrapping = 1,
    /// Both sides know the room; the sender may send.
    WaitingForInput = 2,
    /// Data is moving.
    Transferring = 3,
    /// Every byte (and aux) of the room has landed at the receiver.
    Success = 4,
}

impl KvPoll {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            KvPoll::Failed => "Failed",
            KvPoll::Bootstrapping => "Bootstrapping",
            KvPoll::WaitingForInput => "WaitingForInput",
            KvPoll::Transferring => "Transferring",
            KvPoll::Success => "Success",
        }
    }

    /// The state for its numeric value.
    pub fn from_i32(v: i32) -> Option<KvPoll> {
        Some(match v {
            0 => KvPoll::Failed,
            1 => KvPoll::Bootstrapping,
            2 => KvPoll::WaitingForInput,
            3 => KvPoll::Transferring,
            4 => KvPoll::Success,
            _ => return None,
        })
    }

    /// Success or Failed: the room will not change any more.
    pub fn is_final(self) -> bool {
        matches!(self, KvPoll::Success | KvPoll::Failed)
    }
}

/// What one room moved and how long it took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomMetrics {
    /// Bytes written (pages and aux) by the sender, or expected by the receiver.
    pub bytes: u64,
    /// Writes after page expansion (one per contiguous run per buffer, plus aux).
    pub slices: u64,
    /// Sender: first `send()` to its first write posted. Receiver: `init()` to the first chunk
    /// notification.
    pub queued_to_first_write: Option<Duration>,
    /// First write posted (receiver: first chunk notified) to the last completion.
    pub transfer_span: Option<Duration>,
}

/// Most chunks (`send` calls that move pages) per room.
pub const MAX_CHUNKS: u32 = 256;
/// Most concurrent receiving rooms per decode manager.
pub const MAX_SLOTS: u32 = 1 << (24 - ROOM_SLOT_SHIFT);
const LAST_CHUNK: u32 = 1 << 8;

/// The 24-bit notification tag of chunk `seq` of the room in `slot`.
pub(crate) fn chunk_tag(slot: u32, seq: u32, last: bool) -> u32 {
    debug_assert!(slot < MAX_SLOTS && seq < MAX_CHUNKS);
    slot << ROOM_SLOT_SHIFT | if last { LAST_CHUNK } else { 0 } | seq
}

/// Decodes [`chunk_tag`]: (slot, seq, last).
pub(crate) fn decode_chunk_tag(tag: u32) -> (u32, u32, bool) {
    (
        tag >> ROOM_SLOT_SHIFT,
        tag & (MAX_CHUNKS - 1),
        tag & LAST_CHUNK != 0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_tags_round_trip_and_fit_24_bits() {
        for (slot, seq, last) in [
            (0, 0, false),
            (MAX_SLOTS - 1, MAX_CHUNKS - 1, true),
            (7, 3, true),
        ] {
            let t = chunk_tag(slot, seq, last);
            assert!(t < 1 << 24);
            assert_eq!(decode_chunk_tag(t), (slot, seq, last));
        }
    }

    #[test]
    fn poll_values_are_sglangs() {
        assert_eq!(KvPoll::Failed as i32, 0);
        assert_eq!(KvPoll::Bootstrapping as i32, 1);
        assert_eq!(KvPoll::WaitingForInput as i32, 2);
        assert_eq!(KvPoll::Transferring as i32, 3);
        assert_eq!(KvPoll::Success as i32, 4);
        for v in 0..5 {
            assert_eq!(KvPoll::from_i32(v).unwrap() as i32, v);
        }
        assert_eq!(KvPoll::from_i32(5), None);
    }
}
