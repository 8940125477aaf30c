//! Destroying an engine stops it: once `drop(TransferEngine)` returns, no library thread
//! writes the memory it had registered, even while a peer was streaming writes into it. The
//! memory is reused at once, alternately unmapped with fresh memory mapped at the same address
//! and zeroed in place (as allocators reuse it); it must never change afterwards. One 16 MiB
//! write per batch keeps a payload in the middle of being received most of the time: without
//! the served connections' threads joined, the write test fails within a few rounds. (The
//! RDMA twins are in rdma_verbs.rs.)

mod common;

use std::time::Duration;

use common::Reuse;

use kvtransfer::{EngineConfig, TransferEngine, TransportKind};

const LEN: usize = 16 << 20;

fn engine() -> TransferEngine {
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .batch_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    TransferEngine::new(cfg).unwrap()
}

#[test]
fn no_write_lands_after_destroy_returns() {
    let initiator = engine();
    let src = initiator.alloc(LEN).unwrap();
    src.write(0, &vec![0xA5; LEN]);
    for round in 0..100 {
        let reuse = if round % 2 == 0 {
            Reuse::Remap
        } else {
            Reuse::Zero
        };
        let batches =
            common::destroy_while_streaming(&initiator, &src, engine(), LEN, LEN as u64, reuse)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(batches >= 1);
    }
}

#[test]
fn no_read_lands_after_shutdown_returns() {
    let source = engine();
    let src = source.alloc(LEN).unwrap();
    src.write(0, &vec![0x3C; LEN]);
    for round in 0..60 {
        let reuse = if round % 2 == 0 {
            Reuse::Remap
        } else {
            Reuse::Zero
        };
        // The reading engine shuts down while a caller thread may be driving its connection.
        let reader = engine();
        let batches =
            common::shutdown_while_reading(&reader, &source, &src, LEN, LEN as u64, reuse)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(batches >= 1);
    }
}
