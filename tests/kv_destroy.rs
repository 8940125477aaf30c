//! Dropping a decode `KvManager` mid-room stops it: once the drop returns, no write of the
//! room lands in its KV memory, even with chunks still streaming and the receiver not yet
//! dropped. The memory is then unmapped and fresh memory mapped at the same address; it must
//! never change.

mod common;

use std::time::{Duration, Instant};

use kvtransfer::kv::{
    KvBuffer, KvConfig, KvLayout, KvManager, KvPoll, KvReceiver, KvRole, KvSender,
};
use kvtransfer::{EngineConfig, TransportKind};

const LAYERS: usize = 4;
const PAGES: usize = 256;
const ITEM: usize = 16 << 10;
const LEN: usize = LAYERS * PAGES * ITEM;
const CHUNKS: usize = 16;

fn layout(base: u64) -> KvLayout {
    let buffers = (0..LAYERS)
        .map(|l| KvBuffer {
            addr: base + (l * PAGES * ITEM) as u64,
            len: (PAGES * ITEM) as u64,
            item_len: ITEM as u64,
        })
        .collect();
    KvLayout::new(buffers, Vec::new()).unwrap()
}

fn manager(role: KvRole, base: u64) -> KvManager {
    let engine = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .build()
        .unwrap();
    let cfg = KvConfig::new(role);
    // SAFETY: the callers keep the memory at `base` mapped until the manager is dropped.
    unsafe { KvManager::new(engine, cfg, layout(base)).unwrap() }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn no_room_write_lands_after_the_decode_manager_is_dropped() {
    let mut src = vec![0x5Au8; LEN];
    let prefill = manager(KvRole::Prefill, src.as_mut_ptr() as u64);
    let pages: Vec<i32> = (0..PAGES as i32).collect();
    for round in 0..30u64 {
        let mem = common::map_anon(LEN, None);
        let decode = manager(KvRole::Decode, mem as u64);
        let room = 1000 + round;
        let rx = KvReceiver::new(&decode, prefill.bootstrap_addr(), room).unwrap();
        rx.init(&pages, None).unwrap();
        let tx = KvSender::new(&prefill, room).unwrap();
        tx.init(PAGES, None).unwrap();
        wait_for("the sender to pair", Duration::from_secs(10), || {
            tx.poll() == KvPoll::WaitingForInput
        });
        let per = PAGES / CHUNKS;
        for c in 0..CHUNKS {
            tx.send(&pages[c * per..(c + 1) * per], c + 1 == CHUNKS)
                .unwrap();
        }
        // Some chunk has landed; more are on their way.
        wait_for("a first chunk", Duration::from_secs(10), || {
            rx.poll() != KvPoll::WaitingForInput
        });
        drop(decode);
        let fresh = common::map_anon(LEN, Some(mem));
        assert_eq!(fresh, mem);
        // The sender sees the end of the room (or it had finished just before the drop).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(tx.poll(), KvPoll::Failed | KvPoll::Success) {
            assert!(
                Instant::now() < deadline,
                "round {round}: the sender is still {:?} ({:?}), the receiver {:?}",
                tx.poll(),
                tx.metrics(),
                rx.poll()
            );
            std::thread::yield_now();
        }
        drop(tx);
        drop(rx);
        if let Some(at) = common::first_nonzero(fresh, LEN) {
            panic!("round {round}: byte {at} written after the decode manager was dropped");
        }
        // SAFETY: the test's mapping, registered nowhere any more.
        unsafe { libc::munmap(fresh.cast(), LEN) };
    }
    // Keep `src` alive until the prefill manager is gone.
    drop(prefill);
    drop(src);
}
