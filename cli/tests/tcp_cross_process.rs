//! An engine in this process against `kvtransfer bench --role target` in another.

// The integration tests' shared helpers live with the library's tests.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::Target;

use kvtransfer::{BatchStatus, EngineConfig, Error, Request, TransferEngine, TransportKind};

fn spawn_target(buffer: &str) -> Target {
    common::spawn_target("tcp", buffer, &[])
}

/// The bytes `kvtransfer bench --role target` fills its buffer with.
fn target_pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn engine(timeout: Duration) -> TransferEngine {
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .batch_timeout(timeout)
        .build()
        .unwrap();
    TransferEngine::new(cfg).unwrap()
}

#[test]
fn read_and_write_against_a_target_process() {
    let t = spawn_target("8M");
    assert_eq!(t.len, 8 << 20);
    let e = engine(Duration::from_secs(20));
    let peer = e.connect(t.addr.as_str()).unwrap();
    assert_eq!(e.remote_segments(peer).unwrap()[0].len, 8 << 20);

    // READ: the target's known pattern arrives intact.
    let local = e.alloc(8 << 20).unwrap();
    let reqs: Vec<Request> = (0..64u64)
        .map(|i| Request::read(local.addr() + i * 131072, 131072, t.segment, i * 131072))
        .collect();
    e.transfer_sync(peer, &reqs).unwrap();
    let got = local.to_vec();
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, b)| *b == target_pattern(i as u64)),
        "read data differs"
    );

    // WRITE scattered 4 KiB pages, then read them back to check.
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 + 7) as u8).collect();
    let src = e.alloc(1 << 20).unwrap();
    src.write(0, &data);
    let writes: Vec<Request> = (0..256u64)
        .map(|i| {
            Request::write(
                src.addr() + i * 4096,
                4096,
                t.segment,
                ((i * 37) % 2048) * 4096,
            )
        })
        .collect();
    e.transfer_sync(peer, &writes).unwrap();
    let back = e.alloc(8 << 20).unwrap();
    e.transfer_sync(peer, &[Request::read(back.addr(), 8 << 20, t.segment, 0)])
        .unwrap();
    let all = back.to_vec();
    for i in 0..256usize {
        let d = ((i * 37) % 2048) * 4096;
        assert_eq!(
            &all[d..d + 4096],
            &data[i * 4096..(i + 1) * 4096],
            "page {i}"
        );
    }
}

#[test]
fn cli_initiator_against_cli_target() {
    let t = spawn_target("64M");
    // Read first: its check expects the pattern a fresh target holds.
    for op in ["read", "write"] {
        let out = Command::new(common::cli_bin())
            .args([
                "bench",
                "--role",
                "initiator",
                "--target",
                &t.addr,
                "--transport",
                "tcp",
                "--op",
                op,
            ])
            .args([
                "--block-size",
                "64K",
                "--batch-size",
                "32",
                "--duration",
                "0.5",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["op"], op);
        assert_eq!(v["transport"], "tcp");
        assert!(
            v["bytes"].as_u64().unwrap() > 0 && v["gbps"].as_f64().unwrap() > 0.0,
            "{v}"
        );
    }
}

fn killed_mid_batch(op: kvtransfer::Op) {
    let deadline = Duration::from_secs(15);
    let mut t = spawn_target("512M");
    let e = engine(deadline);
    let peer = e.connect(t.addr.as_str()).unwrap();
    let local = e.alloc(512 << 20).unwrap();
    let reqs: Vec<Request> = (0..512u64)
        .map(|i| Request {
            op,
            local_addr: local.addr() + (i << 20),
            len: 1 << 20,
            remote_segment: t.segment,
            remote_offset: i << 20,
        })
        .collect();
    let id = e.submit(peer, &reqs).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let killed = Instant::now();
    t.child.kill().unwrap();
    t.child.wait().unwrap();
    let status = loop {
        match e.poll(id).unwrap() {
            BatchStatus::Pending => std::thread::sleep(Duration::from_millis(1)),
            s => break s,
        }
        assert!(
            killed.elapsed() < deadline,
            "no verdict within the deadline"
        );
    };
    match status {
        BatchStatus::Failed(reason) => assert!(reason.contains("lost"), "{reason}"),
        // The whole batch may have landed before the kill on a fast machine; then it is Done.
        BatchStatus::Done => eprintln!("batch finished before the kill; nothing to check"),
        BatchStatus::Pending => unreachable!(),
    }
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "failure took {:?}",
        killed.elapsed()
    );
    // The peer is gone for good; the engine still serves others.
    assert!(matches!(
        e.submit(peer, &reqs[..1]),
        Err(Error::PeerLost { .. })
    ));
    e.release(id);
    let other = spawn_target("1M");
    let p2 = e.connect(other.addr.as_str()).unwrap();
    e.transfer_sync(p2, &[Request::write(local.addr(), 4096, other.segment, 0)])
        .unwrap();
    // Nothing of the dead batch pins local memory any more.
    drop(local);
}

#[test]
fn peer_killed_mid_write_batch_fails_it() {
    killed_mid_batch(kvtransfer::Op::Write);
}

#[test]
fn peer_killed_mid_read_batch_fails_it() {
    killed_mid_batch(kvtransfer::Op::Read);
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[test]
fn stalled_peer_fails_the_batch_at_its_deadline() {
    let t = spawn_target("64M");
    let e = engine(Duration::from_secs(30));
    let peer = e.connect(t.addr.as_str()).unwrap();
    let local = e.alloc(64 << 20).unwrap();
    // A stopped process keeps its sockets open: only the deadline can end the batch.
    signal(&t.child, "-STOP");
    let reqs: Vec<Request> = (0..64u64)
        .map(|i| Request::write(local.addr() + (i << 20), 1 << 20, t.segment, i << 20))
        .collect();
    let started = Instant::now();
    let id = e
        .submit_with_timeout(peer, &reqs, Duration::from_millis(300))
        .unwrap();
    let err = e.wait(id).unwrap_err();
    let took = started.elapsed();
    signal(&t.child, "-CONT");
    match err {
        Error::BatchFailed { reason, .. } => {
            assert!(reason.contains("deadline of 300 ms"), "{reason}")
        }
        other => panic!("expected a deadline failure, got {other}"),
    }
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "failed after {took:?}"
    );
    // The local memory stays pinned until the transport is done with it, then is released.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match e.unregister_memory(local.segment()) {
            Ok(()) => break,
            Err(Error::SegmentBusy { .. }) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(other) => panic!("{other}"),
        }
    }
}
