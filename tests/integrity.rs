//! Integrity digests of KV rooms over TCP: a decode manager that asks for them gets rooms that
//! succeed only when every chunk's bytes equal what the sender posted, and a byte corrupted in
//! flight (the TCP target's fault point) fails the room with the integrity kind, while the
//! transport saw nothing wrong. One test: the fault point is process-wide.

mod common;

use kvtransfer::kv::{FailureKind, KvConfig, KvManager, KvPoll, KvReceiver, KvRole, KvSender};
use kvtransfer::{EngineConfig, TransportKind};

const PAGES: u64 = 32;
const ITEMS: [u64; 3] = [4096, 1024, 512]; // three layer buffers of different page sizes
const AUX_ITEM: u64 = 64;

fn manager(role: KvRole, integrity: bool) -> KvManager {
    let engine = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .build()
        .unwrap();
    let buffers: Vec<(u64, u64)> = ITEMS.iter().map(|&item| (PAGES, item)).collect();
    let kv = KvConfig::new(role).integrity(integrity);
    KvManager::with_owned_memory(engine, kv, &buffers, &[(8, AUX_ITEM)]).unwrap()
}

/// Runs room `room`: `src` pages to `dst` pages in the given chunk sizes, aux slot 1 → 6.
/// Returns the receiver's final state and failure.
fn room(
    prefill: &KvManager,
    decode: &KvManager,
    room: u64,
    src: &[i32],
    dst: &[i32],
    chunks: &[usize],
) -> (KvPoll, Option<kvtransfer::kv::Failure>) {
    let receiver = KvReceiver::new(decode, prefill.bootstrap_addr(), room).unwrap();
    receiver.init(dst, Some(6)).unwrap();
    let sender = KvSender::new(prefill, room).unwrap();
    sender.init(src.len(), Some(1)).unwrap();
    common::wait_until("the room to pair", || {
        sender.poll() == KvPoll::WaitingForInput
    });
    let mut at = 0;
    for (i, &n) in chunks.iter().enumerate() {
        sender
            .send(&src[at..at + n], i + 1 == chunks.len())
            .unwrap();
        at += n;
    }
    common::wait_until("the receiver to finish", || receiver.poll().is_final());
    (receiver.poll(), receiver.failure())
}

fn fill(m: &KvManager, salt: u8) {
    for (i, &item) in ITEMS.iter().enumerate() {
        let bytes: Vec<u8> = (0..PAGES * item)
            .map(|j| (j as u8).wrapping_mul(31) ^ salt ^ i as u8)
            .collect();
        m.buffer(i).unwrap().write(0, &bytes);
    }
    let aux: Vec<u8> = (0..8 * AUX_ITEM).map(|j| j as u8 ^ salt).collect();
    m.aux_buffer(0).unwrap().write(0, &aux);
}

/// Whether every destination page holds its source page, in every buffer, and the aux slot
/// its source slot.
fn landed(prefill: &KvManager, decode: &KvManager, src: &[i32], dst: &[i32]) -> bool {
    let pages_equal = ITEMS.iter().enumerate().all(|(i, &item)| {
        let (s, d) = (
            prefill.buffer(i).unwrap().to_vec(),
            decode.buffer(i).unwrap().to_vec(),
        );
        let n = item as usize;
        src.iter().zip(dst).all(|(&sp, &dp)| {
            let (sp, dp) = (sp as usize, dp as usize);
            d[dp * n..(dp + 1) * n] == s[sp * n..(sp + 1) * n]
        })
    });
    let (s, d) = (
        prefill.aux_buffer(0).unwrap().to_vec(),
        decode.aux_buffer(0).unwrap().to_vec(),
    );
    let n = AUX_ITEM as usize;
    pages_equal && d[6 * n..7 * n] == s[n..2 * n]
}

#[test]
fn digests_pass_clean_rooms_and_fail_a_corrupted_one_with_the_integrity_kind() {
    let prefill = manager(KvRole::Prefill, false); // the sender hashes because it is asked
    let decode = manager(KvRole::Decode, true);
    fill(&prefill, 0x5a);
    let src: Vec<i32> = (0..20).collect();
    let dst: Vec<i32> = vec![
        31, 2, 3, 4, 5, 17, 9, 10, 11, 0, 1, 20, 21, 22, 23, 30, 29, 28, 6, 7,
    ];

    // Clean rooms: several chunks, then an empty last chunk carrying only the aux.
    let (state, failure) = room(&prefill, &decode, 1, &src, &dst, &[8, 8, 4]);
    assert_eq!(state, KvPoll::Success, "{failure:?}");
    assert!(landed(&prefill, &decode, &src, &dst));
    let (state, failure) = room(&prefill, &decode, 2, &src[..5], &dst[..5], &[5, 0]);
    assert_eq!(state, KvPoll::Success, "{failure:?}");

    // One write frame of the next room is corrupted after it landed: the transport reports
    // success, the digest does not match, and the room fails as an integrity failure.
    fill(&prefill, 0xa5);
    kvtransfer::testing::corrupt_tcp_writes(1);
    let (state, failure) = room(&prefill, &decode, 3, &src, &dst, &[8, 8, 4]);
    kvtransfer::testing::corrupt_tcp_writes(0);
    assert_eq!(state, KvPoll::Failed);
    let failure = failure.expect("a failed room says why");
    assert_eq!(failure.kind, FailureKind::Integrity, "{failure}");
    assert!(
        failure.text.contains("differs from what the sender posted"),
        "{failure}"
    );

    // The managers keep serving: the next room is clean again.
    let (state, failure) = room(&prefill, &decode, 4, &src, &dst, &[20]);
    assert_eq!(state, KvPoll::Success, "{failure:?}");
    assert!(landed(&prefill, &decode, &src, &dst));

    // Without digests the same corruption goes unseen: what the option is for.
    let plain = manager(KvRole::Decode, false);
    fill(&prefill, 0x3c);
    kvtransfer::testing::corrupt_tcp_writes(1);
    let (state, failure) = room(&prefill, &plain, 5, &src, &dst, &[20]);
    kvtransfer::testing::corrupt_tcp_writes(0);
    assert_eq!(state, KvPoll::Success, "{failure:?}");
    assert!(
        !landed(&prefill, &plain, &src, &dst),
        "the fault point corrupted a byte that the room reported as landed"
    );
}
