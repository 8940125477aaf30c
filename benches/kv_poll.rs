//! Cost of `poll()` on KV rooms: SGLang polls every room on every scheduler tick, so it must
//! stay well under a microsecond.
//!
//! Run with `cargo bench --bench kv_poll`.

use std::time::Duration;

use divan::Bencher;
use kvtransfer::kv::{
    KvBuffer, KvConfig, KvLayout, KvManager, KvPoll, KvReceiver, KvRole, KvSender,
};
use kvtransfer::{EngineConfig, TransportKind};

fn main() {
    divan::main();
}

const ITEM: usize = 4096;
const PAGES: usize = 16;

/// A prefill and a decode manager over TCP loopback, with the memory they point into.
struct Pair {
    prefill: KvManager,
    decode: KvManager,
    _mem: Vec<Vec<u8>>,
}

fn manager(role: KvRole, mem: &mut [u8]) -> KvManager {
    let layout = KvLayout::new(
        vec![KvBuffer {
            addr: mem.as_mut_ptr() as u64,
            len: mem.len() as u64,
            item_len: ITEM as u64,
        }],
        vec![],
    )
    .unwrap();
    let engine = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .build()
        .unwrap();
    let kv = KvConfig::new(role).room_timeout(Duration::from_secs(3600));
    // SAFETY: the memory lives in the `Pair` next to the manager and is dropped after it.
    unsafe { KvManager::new(engine, kv, layout) }.unwrap()
}

fn pair() -> Pair {
    let mut a = vec![1u8; PAGES * ITEM];
    let mut b = vec![0u8; PAGES * ITEM];
    Pair {
        prefill: manager(KvRole::Prefill, &mut a),
        decode: manager(KvRole::Decode, &mut b),
        _mem: vec![a, b],
    }
}

fn spin_until(f: impl Fn() -> bool) {
    while !f() {
        std::thread::yield_now();
    }
}

/// A room waiting for input: the poll reads the state and checks the deadline.
#[divan::bench]
fn receiver_waiting(bencher: Bencher) {
    let p = pair();
    let r = KvReceiver::new(&p.decode, p.prefill.bootstrap_addr(), 1).unwrap();
    r.init(&[0, 1], None).unwrap();
    let s = KvSender::new(&p.prefill, 1).unwrap();
    spin_until(|| r.poll() == KvPoll::WaitingForInput);
    bencher.bench_local(|| divan::black_box(r.poll()));
    drop((s, r));
}

/// A sender waiting for input.
#[divan::bench]
fn sender_waiting(bencher: Bencher) {
    let p = pair();
    let r = KvReceiver::new(&p.decode, p.prefill.bootstrap_addr(), 1).unwrap();
    r.init(&[0, 1], None).unwrap();
    let s = KvSender::new(&p.prefill, 1).unwrap();
    spin_until(|| s.poll() == KvPoll::WaitingForInput);
    bencher.bench_local(|| divan::black_box(s.poll()));
    drop((s, r));
}

/// Rooms that finished: one atomic load.
#[divan::bench]
fn finished_rooms(bencher: Bencher) {
    let p = pair();
    let r = KvReceiver::new(&p.decode, p.prefill.bootstrap_addr(), 1).unwrap();
    r.init(&[0, 1], None).unwrap();
    let s = KvSender::new(&p.prefill, 1).unwrap();
    s.init(2, None).unwrap();
    spin_until(|| s.poll() == KvPoll::WaitingForInput);
    s.send(&[2, 3], true).unwrap();
    spin_until(|| r.poll() == KvPoll::Success && s.poll() == KvPoll::Success);
    bencher.bench_local(|| divan::black_box((s.poll(), r.poll())));
}
