//! Connected peers cost no thread: every connection is read by the engine's poller and
//! written by its send pool. The only test in its binary, so that the test harness starts no
//! thread while it counts.

mod common;

use common::{settle_threads, threads};
use kvtransfer::{EngineConfig, Request, TransferEngine, TransportKind};

fn engine() -> TransferEngine {
    kvtransfer::init_logging("error");
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .build()
        .unwrap();
    TransferEngine::new(cfg).unwrap()
}

#[test]
fn connected_peers_cost_no_threads() {
    let hub = engine();
    let others: Vec<TransferEngine> = (0..12).map(|_| engine()).collect();
    let hub_buf = hub.alloc(64 << 10).unwrap();
    let bufs: Vec<_> = others.iter().map(|o| o.alloc(4096).unwrap()).collect();
    let before = threads();
    // The hub reaches every other engine and every other engine reaches the hub: 24 links,
    // 48 connections the hub initiated or serves.
    for (i, (o, buf)) in others.iter().zip(&bufs).enumerate() {
        let to = hub.connect(o.local_addr()).unwrap();
        let from = o.connect(hub.local_addr()).unwrap();
        buf.write(0, &[i as u8; 4096]);
        o.transfer_sync(
            from,
            &[Request::write(
                buf.addr(),
                4096,
                hub_buf.segment(),
                i as u64 * 4096,
            )],
        )
        .unwrap();
        hub.transfer_sync(
            to,
            &[Request::read(
                hub_buf.addr() + 49152 + i as u64 * 1024,
                1024,
                buf.segment(),
                0,
            )],
        )
        .unwrap();
    }
    let after = settle_threads(before);
    assert!(
        after <= before,
        "threads grew with 24 links: {before} -> {after}"
    );
    for i in 0..12u64 {
        let mut page = vec![0u8; 4096];
        hub_buf.read(i as usize * 4096, &mut page);
        assert!(page.iter().all(|&b| b == i as u8), "write from peer {i}");
        let mut read = vec![0u8; 1024];
        hub_buf.read(49152 + i as usize * 1024, &mut read);
        assert!(read.iter().all(|&b| b == i as u8), "read from peer {i}");
    }
}
