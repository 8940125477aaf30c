//! TCP loopback throughput: one 128-block WRITE batch between two engines in this process.
//!
//! `cargo bench --bench tcp_loopback`; divan reports time per batch and bytes/s.

use kvtransfer::{EngineConfig, HostBuffer, PeerId, Request, TransferEngine, TransportKind};

fn main() {
    divan::main();
}

struct Setup {
    initiator: TransferEngine,
    _target: TransferEngine,
    _dst: HostBuffer,
    _src: HostBuffer,
    peer: PeerId,
    requests: Vec<Request>,
}

fn setup(block: u64, blocks: u64) -> Setup {
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .build()
        .expect("valid config");
    let target = TransferEngine::new(cfg.clone()).expect("target engine");
    let initiator = TransferEngine::new(cfg).expect("initiator engine");
    let dst = target.alloc((block * blocks) as usize).expect("alloc");
    let src = initiator.alloc((block * blocks) as usize).expect("alloc");
    src.write(0, &vec![0x5A; (block * blocks) as usize]);
    let peer = initiator.connect(target.local_addr()).expect("connect");
    let requests = (0..blocks)
        .map(|i| Request::write(src.addr() + i * block, block, dst.segment(), i * block))
        .collect();
    Setup {
        initiator,
        _target: target,
        _dst: dst,
        _src: src,
        peer,
        requests,
    }
}

#[divan::bench(args = [4096, 65536, 1 << 20], sample_count = 20, sample_size = 5)]
fn write_batch_128(bencher: divan::Bencher, block: u64) {
    let s = setup(block, 128);
    bencher
        .counter(divan::counter::BytesCount::new(block * 128))
        .bench_local(|| {
            s.initiator
                .transfer_sync(s.peer, divan::black_box(&s.requests))
                .expect("transfer")
        });
}

#[divan::bench(sample_count = 200, sample_size = 50)]
fn single_write_4k(bencher: divan::Bencher) {
    let s = setup(4096, 1);
    bencher.bench_local(|| {
        s.initiator
            .transfer_sync(s.peer, divan::black_box(&s.requests))
            .expect("transfer")
    });
}
