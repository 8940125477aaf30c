//! Two engines in one process moving real bytes over TCP loopback.

use std::time::Duration;

use kvtransfer::{BatchStatus, EngineConfig, Error, Request, TransferEngine, TransportKind};

fn engine() -> TransferEngine {
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .connections_per_peer(2)
        .slice_size(64 << 10)
        .min_stripe_bytes(64 << 10)
        .batch_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    TransferEngine::new(cfg).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

#[test]
fn write_then_read_back_verified() {
    let target = engine();
    let initiator = engine();
    let len = 3 << 20;
    let dst = target.alloc(len).unwrap();
    let src = initiator.alloc(len).unwrap();
    let back = initiator.alloc(len).unwrap();
    let data = pattern(len, 7);
    src.write(0, &data);
    let peer = initiator.connect(target.local_addr()).unwrap();

    // Many 4 KiB writes plus one big one, scattered destination offsets.
    let mut reqs = Vec::new();
    for i in 0..256u64 {
        let d = (i * 7919) % 256;
        reqs.push(Request::write(
            src.addr() + i * 4096,
            4096,
            dst.segment(),
            d * 4096,
        ));
    }
    reqs.push(Request::write(
        src.addr() + (1 << 20),
        2 << 20,
        dst.segment(),
        1 << 20,
    ));
    initiator.transfer_sync(peer, &reqs).unwrap();
    let got = dst.to_vec();
    for i in 0..256usize {
        let d = (i * 7919) % 256;
        assert_eq!(
            &got[d * 4096..(d + 1) * 4096],
            &data[i * 4096..(i + 1) * 4096],
            "page {i}"
        );
    }
    assert_eq!(&got[1 << 20..], &data[1 << 20..]);

    // Read it all back.
    let id = initiator
        .submit(
            peer,
            &[Request::read(back.addr(), len as u64, dst.segment(), 0)],
        )
        .unwrap();
    initiator.wait(id).unwrap();
    assert_eq!(back.to_vec(), got);
}

#[test]
fn poll_reports_pending_then_done() {
    let target = engine();
    let initiator = engine();
    let dst = target.alloc(8 << 20).unwrap();
    let src = initiator.alloc(8 << 20).unwrap();
    src.write(0, &pattern(8 << 20, 3));
    let peer = initiator.connect(target.local_addr()).unwrap();
    let id = initiator
        .submit(
            peer,
            &[Request::write(src.addr(), 8 << 20, dst.segment(), 0)],
        )
        .unwrap();
    let status = loop {
        match initiator.poll(id).unwrap() {
            BatchStatus::Pending => std::thread::yield_now(),
            s => break s,
        }
    };
    assert_eq!(status, BatchStatus::Done);
    assert_eq!(
        initiator.poll(id).unwrap(),
        BatchStatus::Done,
        "final status stays readable"
    );
    initiator.release(id);
    assert!(matches!(
        initiator.poll(id),
        Err(Error::UnknownBatch { .. })
    ));
    assert_eq!(dst.to_vec(), src.to_vec());
}

#[test]
fn reversed_blocks_land_in_their_slots() {
    let target = engine();
    let initiator = engine();
    let (bs, n) = (65536u64, 128u64);
    let dst = target.alloc((bs * n) as usize).unwrap();
    let src = initiator.alloc((bs * n) as usize).unwrap();
    let data = pattern((bs * n) as usize, 11);
    src.write(0, &data);
    let peer = initiator.connect(target.local_addr()).unwrap();
    let reqs: Vec<Request> = (0..n)
        .map(|i| Request::write(src.addr() + i * bs, bs, dst.segment(), (n - 1 - i) * bs))
        .collect();
    initiator.transfer_sync(peer, &reqs).unwrap();
    let got = dst.to_vec();
    for i in 0..n as usize {
        let s = n as usize - 1 - i;
        let b = bs as usize;
        assert!(
            got[s * b..(s + 1) * b] == data[i * b..(i + 1) * b],
            "block {i} -> slot {s}"
        );
    }
}

/// Random sizes from 1 byte to 200 KiB, writes and reads mixed in one batch, so frames cross
/// every boundary of the receiver's buffered and direct paths.
#[test]
fn mixed_sizes_and_ops_in_one_batch() {
    let target = engine();
    let initiator = engine();
    let len = 8 << 20;
    let dst = target.alloc(len).unwrap();
    let src = initiator.alloc(len).unwrap();
    let sink = initiator.alloc(len).unwrap();
    let remote_init = pattern(len, 99);
    dst.write(0, &remote_init);
    let data = pattern(len, 5);
    src.write(0, &data);
    let peer = initiator.connect(target.local_addr()).unwrap();
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Writes fill the first half of the remote segment, reads take the untouched second half.
    let (mut w_off, mut r_off, mut reqs) = (0u64, 0u64, Vec::new());
    let half = (len / 2) as u64;
    while w_off < half - 300_000 && r_off < half - 300_000 {
        let size = match next() % 4 {
            0 => 1 + next() % 64,
            1 => 1 + next() % 8192,
            2 => 16_000 + next() % 20_000,
            _ => 1 + next() % 200_000,
        };
        if next() % 3 == 0 {
            reqs.push(Request::read(
                sink.addr() + r_off,
                size,
                dst.segment(),
                half + r_off,
            ));
            r_off += size;
        } else {
            reqs.push(Request::write(
                src.addr() + w_off,
                size,
                dst.segment(),
                w_off,
            ));
            w_off += size;
        }
        // Gaps keep neighbours from coalescing.
        w_off += next() % 3;
        r_off += next() % 3;
    }
    initiator.transfer_sync(peer, &reqs).unwrap();
    let remote = dst.to_vec();
    let local = sink.to_vec();
    for r in &reqs {
        let (o, l) = (r.remote_offset as usize, r.len as usize);
        match r.op {
            kvtransfer::Op::Write => {
                let s = (r.local_addr - src.addr()) as usize;
                assert!(
                    remote[o..o + l] == data[s..s + l],
                    "write of {l} bytes at {o}"
                );
            }
            kvtransfer::Op::Read => {
                let s = (r.local_addr - sink.addr()) as usize;
                assert!(
                    local[s..s + l] == remote_init[o..o + l],
                    "read of {l} bytes at {o}"
                );
            }
        }
    }
}
