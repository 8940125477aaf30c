//! KV rooms to many peers cost no thread per peer: a decode manager's control channels live
//! on its one driver thread, and a prefill manager's connector threads (its data-path
//! connects) leave once idle. The only test in its binary, so that the test harness starts
//! no thread while it counts.

mod common;

use std::time::{Duration, Instant};

use common::{settle_threads, threads};

use kvtransfer::kv::{KvConfig, KvManager, KvPoll, KvReceiver, KvRole, KvSender};
use kvtransfer::{EngineConfig, TransportKind};

fn manager(role: KvRole) -> KvManager {
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .build()
        .unwrap();
    KvManager::with_owned_memory(cfg, KvConfig::new(role), &[(16, 4096)], &[]).unwrap()
}

fn until_final(poll: impl Fn() -> KvPoll) -> KvPoll {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = poll();
        if s.is_final() || Instant::now() > deadline {
            return s;
        }
        std::thread::yield_now();
    }
}

#[test]
fn rooms_to_many_peers_add_no_threads() {
    kvtransfer::init_logging("error");
    let decode = manager(KvRole::Decode);
    let prefills: Vec<KvManager> = (0..8).map(|_| manager(KvRole::Prefill)).collect();
    let before = threads();
    // Two rounds: the first opens 8 channels and 8 data paths, the second reuses them.
    for round in 0..2u64 {
        let rooms: Vec<(KvReceiver, KvSender)> = prefills
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let id = round * 100 + i as u64;
                let r = KvReceiver::new(&decode, p.bootstrap_addr(), id).unwrap();
                r.init(&[i as i32], None).unwrap();
                let s = KvSender::new(p, id).unwrap();
                s.init(1, None).unwrap();
                (r, s)
            })
            .collect();
        for (i, (r, s)) in rooms.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while s.poll() == KvPoll::Bootstrapping && Instant::now() < deadline {
                std::thread::yield_now();
            }
            s.send(&[i as i32], true).unwrap();
            assert_eq!(
                until_final(|| r.poll()),
                KvPoll::Success,
                "{:?}",
                r.failure()
            );
            assert_eq!(
                until_final(|| s.poll()),
                KvPoll::Success,
                "{:?}",
                s.failure()
            );
        }
    }
    let after = settle_threads(before);
    assert_eq!(
        after, before,
        "9 managers, 8 channels and 8 data paths: {before} threads before, {after} after"
    );
}
