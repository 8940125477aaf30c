//! The verbs suite: runs inside the Soft-RoCE guest that `scripts/rdma-tests.sh` boots
//! (`KVT_VM=1`, devices rxeA0/rxeA1 ↔ rxeB0/rxeB1, GID index 1). Elsewhere every test returns
//! at once after printing why it did not run.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use kvtransfer::kv::{
    KvBuffer, KvConfig, KvLayout, KvManager, KvPoll, KvReceiver, KvRole, KvSender,
};
use kvtransfer::{BatchStatus, EngineConfig, Error, Request, TransferEngine, TransportKind};

fn in_vm() -> bool {
    if std::env::var("KVT_VM").as_deref() == Ok("1") {
        // Engines bootstrap over loopback; the guest may start with `lo` down.
        static LO: std::sync::Once = std::sync::Once::new();
        LO.call_once(|| {
            let _ = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
        });
        return true;
    }
    eprintln!("rdma_verbs: skipped: not inside the Soft-RoCE guest (run scripts/rdma-tests.sh)");
    false
}

fn engine(devices: &[&str]) -> TransferEngine {
    TransferEngine::new(rdma_config(devices))
        .unwrap_or_else(|e| panic!("rdma engine on {devices:?}: {e}"))
}

fn rdma_config(devices: &[&str]) -> EngineConfig {
    kvtransfer::init_logging("warn");
    EngineConfig::builder()
        .transport(TransportKind::Rdma)
        .devices(devices.iter().copied())
        .gid_index(
            std::env::var("KVT_GID_INDEX")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
        )
        .qps_per_rail(2)
        .slice_size(64 << 10)
        .min_stripe_bytes(64 << 10)
        .batch_timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

fn sent_packets(dev: &str) -> u64 {
    let base = format!("/sys/class/infiniband/{dev}/ports/1");
    for f in ["hw_counters/sent_pkts", "counters/port_xmit_packets"] {
        if let Ok(s) = std::fs::read_to_string(format!("{base}/{f}")) {
            return s.trim().parse().unwrap_or(0);
        }
    }
    0
}

/// Writes scattered pages and reads everything back, verifying every byte.
fn write_read(a_devs: &[&str], b_devs: &[&str]) {
    let a = engine(a_devs);
    let b = engine(b_devs);
    assert_eq!(a.transport(), "rdma");
    let len = 2 << 20;
    let dst = b.alloc(len).unwrap();
    let src = a.alloc(len).unwrap();
    let back = a.alloc(len).unwrap();
    let data = pattern(len, 3);
    src.write(0, &data);
    let peer = a.connect(b.local_addr()).unwrap();
    assert_eq!(a.peer_info(peer).unwrap().transport, "rdma");
    let pages = (len / 4096) as u64;
    let reqs: Vec<Request> = (0..pages)
        .map(|i| {
            Request::write(
                src.addr() + i * 4096,
                4096,
                dst.segment(),
                ((i * 37) % pages) * 4096,
            )
        })
        .collect();
    a.transfer_sync(peer, &reqs).unwrap();
    let got = dst.to_vec();
    for i in 0..pages as usize {
        let d = (i * 37) % pages as usize;
        assert!(
            got[d * 4096..(d + 1) * 4096] == data[i * 4096..(i + 1) * 4096],
            "page {i}"
        );
    }
    a.transfer_sync(
        peer,
        &[Request::read(back.addr(), len as u64, dst.segment(), 0)],
    )
    .unwrap();
    assert!(back.to_vec() == got, "read back differs");
}

#[test]
fn write_and_read_on_one_rail() {
    if !in_vm() {
        return;
    }
    write_read(&["rxeA0"], &["rxeB0"]);
}

#[test]
fn write_and_read_on_two_rails_use_both() {
    if !in_vm() {
        return;
    }
    let before = [sent_packets("rxeA0"), sent_packets("rxeA1")];
    write_read(&["rxeA0", "rxeA1"], &["rxeB0", "rxeB1"]);
    let after = [sent_packets("rxeA0"), sent_packets("rxeA1")];
    eprintln!(
        "sent packets: rxeA0 {} -> {}, rxeA1 {} -> {}",
        before[0], after[0], before[1], after[1]
    );
    assert!(after[0] > before[0] + 100, "rail 0 carried data");
    assert!(after[1] > before[1] + 100, "rail 1 carried data");
}

#[test]
fn notification_arrives_only_after_the_data() {
    if !in_vm() {
        return;
    }
    let a = engine(&["rxeA0", "rxeA1"]);
    let b = engine(&["rxeB0", "rxeB1"]);
    let len = 4 << 20;
    let dst = b.alloc(len).unwrap();
    let src = a.alloc(len).unwrap();
    let data = pattern(len, 9);
    src.write(0, &data);
    let peer = a.connect(b.local_addr()).unwrap();
    let id = a
        .submit_with_notify(
            peer,
            &[Request::write(src.addr(), len as u64, dst.segment(), 0)],
            0x42,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let note = loop {
        if let Some(n) = b.notifications().into_iter().find(|n| n.tag == 0x42) {
            break n;
        }
        assert!(Instant::now() < deadline, "no notification");
        std::thread::sleep(Duration::from_micros(200));
    };
    // The moment the target learns of it, every byte is already there.
    assert!(dst.to_vec() == data, "notification before data");
    assert_eq!((note.engine_id, note.epoch), (a.engine_id(), a.epoch()));
    a.wait(id).unwrap();
}

#[test]
fn peer_process_killed_mid_batch_fails_it() {
    if !in_vm() {
        return;
    }
    let gid = std::env::var("KVT_GID_INDEX").unwrap_or_else(|_| "1".into());
    let mut t = common::spawn_target(
        "rdma",
        "64M",
        &[("KVT_DEVICES", "rxeB0".into()), ("KVT_GID_INDEX", gid)],
    );
    let seg = t.segment;
    let a = engine(&["rxeA0"]);
    let peer = a.connect(t.addr.as_str()).unwrap();
    let local = a.alloc(64 << 20).unwrap();
    let reqs: Vec<Request> = (0..64u64)
        .map(|i| Request::write(local.addr() + (i << 20), 1 << 20, seg, i << 20))
        .collect();
    let id = a.submit(peer, &reqs).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let killed = Instant::now();
    t.child.kill().unwrap();
    t.child.wait().unwrap();
    let status = loop {
        match a.poll(id).unwrap() {
            BatchStatus::Pending => std::thread::sleep(Duration::from_millis(2)),
            s => break s,
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "no verdict");
    };
    eprintln!("after kill: {status:?} in {:?}", killed.elapsed());
    assert!(matches!(status, BatchStatus::Failed(_)), "{status:?}");
    assert!(matches!(
        a.submit(peer, &reqs[..1]),
        Err(Error::PeerLost { .. })
    ));
    // Memory of the failed batch is released once the QPs flushed.
    a.release(id);
    let until = Instant::now() + Duration::from_secs(20);
    while let Err(e) = a.unregister_memory(local.segment()) {
        assert!(
            matches!(e, Error::SegmentBusy { .. }) && Instant::now() < until,
            "{e}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn set_link(netdev: &str, up: bool) {
    let state = if up { "up" } else { "down" };
    let ok = Command::new("ip")
        .args(["link", "set", netdev, state])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip link set {netdev} {state}");
}

/// Waits (polling sysfs, at most 20 s) until rxeA1's port is ACTIVE again.
fn wait_active(dev: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(format!("/sys/class/infiniband/{dev}/ports/1/state"))
        .unwrap_or_default()
        .contains("ACTIVE")
    {
        assert!(Instant::now() < deadline, "{dev} never came back ACTIVE");
        std::thread::sleep(Duration::from_millis(20)); // polling a sysfs state, not a sync
    }
}

fn connect_retrying(a: &TransferEngine, b: &TransferEngine) -> kvtransfer::PeerId {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match a.connect(b.local_addr()) {
            Ok(p) => break p,
            Err(e) if Instant::now() < deadline => eprintln!("connect: {e}; again"),
            Err(e) => panic!("no connection: {e}"),
        }
    }
}

/// One of two rails goes down: the work of its lanes moves to the other rail, the batch
/// completes with every byte in place, and the rail counters show the bytes moved. Once the
/// link is back, a new connection carries traffic on that rail again, and so does the first
/// connection once the rail is put back into it.
#[test]
fn a_rail_that_goes_down_moves_its_work_to_the_surviving_rail() {
    if !in_vm() {
        return;
    }
    let a = engine(&["rxeA0", "rxeA1"]);
    let b = engine(&["rxeB0", "rxeB1"]);
    let len = 96 << 20;
    let dst = b.alloc(len).unwrap();
    let src = a.alloc(len).unwrap();
    let data = pattern(len, 0x5a);
    src.write(0, &data);
    let netdev = std::env::var("KVT_NETDEV_A1").unwrap_or_else(|_| "vA1".into());
    let reqs: Vec<Request> = (0..(len >> 16) as u64)
        .map(|i| Request::write(src.addr() + (i << 16), 1 << 16, dst.segment(), i << 16))
        .collect();
    let moved = |e: &TransferEngine| e.rail_stats()[1].moved_out_bytes;

    // 1. Mid-batch: down once rxeA1 has sent about 8 MiB of its 48.
    let peer = a.connect(b.local_addr()).unwrap();
    let sent = sent_packets("rxeA1");
    let id = a.submit(peer, &reqs).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent_packets("rxeA1") < sent + 2048 && a.poll(id).unwrap() == BatchStatus::Pending {
        assert!(Instant::now() < deadline, "rxeA1 sends nothing");
        std::thread::yield_now();
    }
    let pending = a.poll(id).unwrap() == BatchStatus::Pending;
    let down = Instant::now();
    set_link(&netdev, false);
    let result = a.wait(id);
    let took = down.elapsed();
    let stats = a.rail_stats();
    eprintln!("1. down mid-batch (still pending: {pending}): {result:?} after {took:?}; {stats:?}");
    result.unwrap();
    assert!(dst.to_vec() == data, "every byte in place");
    if pending {
        assert!(
            stats[1].moved_out_bytes > 0,
            "rail 1's work moved: {stats:?}"
        );
        assert_eq!(
            stats[0].moved_in_bytes, stats[1].moved_out_bytes,
            "{stats:?}"
        );
    }
    // The peer stays usable: while the link is down its new batches go to the surviving
    // rail only.
    dst.write(0, &vec![0u8; len]);
    let before = a.rail_stats();
    a.transfer_sync(peer, &reqs).unwrap();
    assert!(dst.to_vec() == data);
    let after = a.rail_stats();
    if pending {
        assert_eq!(
            after[1].posted_bytes, before[1].posted_bytes,
            "nothing planned on rail 1"
        );
        assert_eq!(after[0].posted_bytes, before[0].posted_bytes + len as u64);
    }
    set_link(&netdev, true);

    // 2. Down just before a batch, on a connection made once the link was back. Either the
    //    port's event has stopped rail 1's lanes before planning (the batch is planned onto
    //    rail 0 alone) or its rail-1 half is posted and moves: both must end whole.
    wait_active("rxeA1");
    let peer2 = connect_retrying(&a, &b);
    let (was, posted1) = (moved(&a), a.rail_stats()[1].posted_bytes);
    dst.write(0, &vec![0u8; len]);
    set_link(&netdev, false);
    let result = a.transfer_sync(peer2, &reqs);
    set_link(&netdev, true);
    let stats = a.rail_stats();
    eprintln!("2. down at submit: {result:?}; {stats:?}");
    result.unwrap();
    assert!(dst.to_vec() == data, "every byte in place");
    let planned_away = stats[1].posted_bytes == posted1;
    assert!(
        moved(&a) > was || planned_away,
        "rail 1's work moved or was never planned there: {stats:?}"
    );

    // 3. Link up: a new connection sends on rail 1 again.
    wait_active("rxeA1");
    let peer3 = connect_retrying(&a, &b);
    let (sent, before) = (sent_packets("rxeA1"), a.rail_stats()[1].posted_bytes);
    dst.write(0, &vec![0u8; len]);
    a.transfer_sync(peer3, &reqs).unwrap();
    assert!(dst.to_vec() == data);
    let (sent_now, after) = (sent_packets("rxeA1"), a.rail_stats()[1].posted_bytes);
    eprintln!(
        "3. link back: rail 1 posted {} bytes, sent {} packets",
        after - before,
        sent_now - sent
    );
    assert!(
        after > before && sent_now > sent,
        "rail 1 carries traffic again"
    );

    // 4. The first connection's rail 1 is put back: its batches (each verified) probe the
    //    rail, one of them starts the rejoin, and later ones are planned onto rail 1 again.
    if !pending {
        return; // its rail-1 lanes never failed
    }
    let part = &reqs[..256]; // 16 MiB, striped over both rails once both are usable
    let bytes = 256usize << 16;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let mut rounds = 0;
    loop {
        let before = a.rail_stats()[1].posted_bytes;
        dst.write(0, &vec![0u8; bytes]);
        a.transfer_sync(peer, part).unwrap();
        assert!(
            dst.to_vec()[..bytes] == data[..bytes],
            "every byte in place"
        );
        rounds += 1;
        let now = a.rail_stats()[1].posted_bytes;
        if now > before {
            eprintln!(
                "4. rail 1 put back into the first connection: {} bytes on it in round {rounds}, {:?} after the first",
                now - before,
                started.elapsed()
            );
            // The metrics tell the same story: lanes put back, work moved, WRs posted.
            let m = a.metrics();
            eprintln!("   metrics: {:?}", m.rails);
            assert!(m.rails[1].rejoins >= 1, "{:?}", m.rails);
            assert_eq!(m.rails[1].moved_out_bytes, moved(&a));
            assert!(
                m.rails
                    .iter()
                    .all(|r| r.work_requests > 0 && r.completions > 0)
            );
            assert!(m.rails.iter().all(|r| r.outstanding == 0), "{:?}", m.rails);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rail 1 never came back into the first connection"
        );
        std::thread::sleep(Duration::from_millis(50)); // the batches themselves drive the probe
    }
}

/// A KV manager over RDMA on `devices`, with `layers` buffers of `pages` pages of `item` bytes
/// in `mem` (which must outlive it).
fn kv_manager(
    devices: &[&str],
    role: KvRole,
    mem: &mut [u8],
    layers: usize,
    item: usize,
) -> KvManager {
    let per_layer = mem.len() / layers;
    let base = mem.as_mut_ptr() as u64;
    let layout = KvLayout::new(
        (0..layers)
            .map(|l| KvBuffer {
                addr: base + (l * per_layer) as u64,
                len: per_layer as u64,
                item_len: item as u64,
            })
            .collect(),
        vec![],
    )
    .unwrap();
    // The decode side checks every chunk against the sender's digest (integrity digests over
    // RDMA: what landed through the NIC is what the sender posted).
    let kv = KvConfig::new(role)
        .room_timeout(Duration::from_secs(60))
        .abort_timeout(Duration::from_secs(5))
        .integrity(role == KvRole::Decode);
    // SAFETY: the callers keep `mem` alive and in place until the manager is dropped.
    unsafe { KvManager::new(rdma_config(devices), kv, layout) }.unwrap()
}

#[test]
fn kv_room_over_two_rails_lands_whole_and_a_receiver_abort_freezes_memory() {
    if !in_vm() {
        return;
    }
    let (layers, pages, item) = (4, 256, 16 << 10);
    let mut src_mem = pattern(layers * pages * item, 3);
    let mut dst_mem = vec![0u8; layers * pages * item];
    let src_copy = src_mem.clone();
    let prefill = kv_manager(
        &["rxeA0", "rxeA1"],
        KvRole::Prefill,
        &mut src_mem,
        layers,
        item,
    );
    let decode = kv_manager(
        &["rxeB0", "rxeB1"],
        KvRole::Decode,
        &mut dst_mem,
        layers,
        item,
    );
    assert_eq!(prefill.engine().transport(), "rdma");
    let page = |mem: &[u8], l: usize, p: usize| {
        let at = (l * pages + p) * item;
        mem[at..at + item].to_vec()
    };

    // Room 1: scattered pages in two chunks; Success only once every chunk's imm arrived.
    let src: Vec<i32> = vec![0, 1, 2, 9, 10, 30, 31, 32, 33, 50];
    let dst: Vec<i32> = vec![5, 6, 7, 8, 20, 21, 40, 41, 60, 63];
    let r = KvReceiver::new(&decode, prefill.bootstrap_addr(), 1).unwrap();
    r.init(&dst, None).unwrap();
    let s = KvSender::new(&prefill, 1).unwrap();
    s.init(src.len(), None).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while s.poll() == KvPoll::Bootstrapping {
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(1));
    }
    s.send(&src[..4], false).unwrap();
    s.send(&src[4..], true).unwrap();
    loop {
        match r.poll() {
            KvPoll::Success => break,
            KvPoll::Failed => panic!("{:?}", r.failure_reason()),
            _ => assert!(Instant::now() < until, "no Success"),
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    for l in 0..layers {
        for (a, b) in src.iter().zip(&dst) {
            assert!(
                page(&dst_mem, l, *b as usize) == page(&src_copy, l, *a as usize),
                "layer {l}: page {a} -> {b}"
            );
        }
    }
    drop((s, r));

    // Room 2: every page, aborted by the receiver once the first chunk landed.
    let all: Vec<i32> = (0..pages as i32).collect();
    let r = KvReceiver::new(&decode, prefill.bootstrap_addr(), 2).unwrap();
    r.init(&all, None).unwrap();
    let s = KvSender::new(&prefill, 2).unwrap();
    s.init(pages, None).unwrap();
    while s.poll() == KvPoll::Bootstrapping {
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(1));
    }
    for (i, c) in all.chunks(pages / 8).enumerate() {
        s.send(c, i == 7).unwrap();
    }
    while r.poll() == KvPoll::WaitingForInput || r.poll() == KvPoll::Bootstrapping {
        assert!(Instant::now() < until);
    }
    let t = Instant::now();
    r.abort().unwrap();
    eprintln!("receiver abort over rdma returned in {:?}", t.elapsed());
    let frozen = dst_mem.clone();
    std::thread::sleep(Duration::from_millis(500));
    assert!(frozen == dst_mem, "a write landed after the abort returned");
    let until = Instant::now() + Duration::from_secs(30);
    while !s.poll().is_final() {
        assert!(Instant::now() < until, "sender never learned of the abort");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Failed normally; Success only if its last write had completed before the abort arrived.
    eprintln!(
        "sender after the receiver's abort: {:?} {:?}",
        s.poll(),
        s.failure_reason()
    );
}

#[test]
fn a_segment_registered_on_one_rail_is_striped_over_that_rail_only() {
    if !in_vm() {
        return;
    }
    let a = engine(&["rxeA0", "rxeA1"]);
    let b = engine(&["rxeB0", "rxeB1"]);
    assert_eq!(b.rails(), ["rxeB0:1", "rxeB1:1"]);
    let len = 8 << 20;
    let mut dst = vec![0u8; len];
    // SAFETY: `dst` outlives `b` (dropped at the end of the test, after the transfer).
    let seg = unsafe { b.register_memory_on_rails(dst.as_mut_ptr(), len, &[1]) }.unwrap();
    assert!(matches!(
        // SAFETY: as above; the call fails before registering anything.
        unsafe { b.register_memory_on_rails(dst.as_mut_ptr(), 4096, &[2]) },
        Err(Error::InvalidArgument(_))
    ));
    let src = a.alloc(len).unwrap();
    let data = pattern(len, 9);
    src.write(0, &data);
    let peer = a.connect(b.local_addr()).unwrap();
    let (rail0, rail1) = (sent_packets("rxeA0"), sent_packets("rxeA1"));
    let reqs: Vec<Request> = (0..(len >> 16) as u64)
        .map(|i| Request::write(src.addr() + (i << 16), 1 << 16, seg.id, i << 16))
        .collect();
    a.transfer_sync(peer, &reqs).unwrap();
    let (d0, d1) = (sent_packets("rxeA0") - rail0, sent_packets("rxeA1") - rail1);
    eprintln!("packets sent: rail 0 {d0}, rail 1 {d1}");
    assert!(d1 > 1000, "rail 1 carried the data: {d1}");
    assert!(d0 < 16, "rail 0 stayed idle: {d0}");
    assert!(dst == data, "bytes verified");
    drop((a, b));
}

#[test]
fn no_write_lands_after_an_rdma_engine_is_destroyed() {
    if !in_vm() {
        return;
    }
    // The TCP twin (tests/tcp_destroy.rs) runs 100 rounds; emulated RDMA is slower.
    let len = 1 << 20;
    let initiator = engine(&["rxeA0"]);
    let src = initiator.alloc(len).unwrap();
    src.write(0, &vec![0xA5; len]);
    for round in 0..20 {
        let target = engine(&["rxeB0"]);
        // The MR pins the registered pages, so only reuse in place shows a late write.
        let reuse = common::Reuse::Zero;
        let batches =
            common::destroy_while_streaming(&initiator, &src, target, len, 64 << 10, reuse)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(batches >= 1);
    }
}

#[test]
fn no_read_lands_after_an_rdma_engine_shut_down() {
    if !in_vm() {
        return;
    }
    let len = 1 << 20;
    let source = engine(&["rxeB0"]);
    let src = source.alloc(len).unwrap();
    src.write(0, &vec![0x3C; len]);
    for round in 0..20 {
        // Its QPs go to ERROR and their flushes are awaited before shutdown returns.
        let reader = engine(&["rxeA0"]);
        let batches = common::shutdown_while_reading(
            &reader,
            &source,
            &src,
            len,
            64 << 10,
            common::Reuse::Zero,
        )
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(batches >= 1);
    }
}

/// A work request that fails unsignaled (the first of a chain, signalled only at its end)
/// fails its batch with its own status, not with the flush of the requests after it: the
/// target took its segment away, so the first WRITE meets a remote access error.
#[test]
fn an_unsignaled_failure_reports_its_own_status() {
    if !in_vm() {
        return;
    }
    let a = engine(&["rxeA0"]);
    let b = engine(&["rxeB0"]);
    let len = 1 << 20;
    let region = common::map_anon(len, None);
    // SAFETY: a fresh anonymous mapping this test owns and never unmaps.
    let seg = unsafe { b.register_memory(region, len) }.unwrap();
    let src = a.alloc(len).unwrap();
    let peer = a.connect(b.local_addr()).unwrap();
    // A knows B's keys from the handshake; B unregisters without telling it.
    b.unregister_memory(seg.id).unwrap();
    // Scattered 4 KiB pages: no two coalesce, so each lane posts a chain of several WRs.
    let reqs: Vec<Request> = (0..32u64)
        .map(|i| Request::write(src.addr() + i * 4096, 4096, seg.id, (31 - i) * 8192))
        .collect();
    let err = a.transfer_sync(peer, &reqs).unwrap_err().to_string();
    assert!(err.contains("IBV_WC_REM_ACCESS_ERR"), "{err}");
    assert!(
        !err.contains("FLUSH"),
        "the first error, not the flush after it: {err}"
    );
    assert_eq!(common::first_nonzero(region, len), None, "nothing landed");
}

/// The kernel's own count (`rdma resource show`) of user `kind` objects (mr, qp) on `dev`.
fn kernel_resources(kind: &str, dev: &str) -> usize {
    let out = Command::new("rdma")
        .args(["-j", "resource", "show", kind])
        .output()
        .expect("the rdma tool (iproute2)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("rdma -j resource show {kind}: {e}"));
    // The kernel names the thread that created each object and its pid, or no pid once that
    // thread has exited (a connection's handshake thread does at once); its own objects (the
    // GSI QPs) come with a kernel module's name (`comm`) and no pid. The guest runs nothing
    // else on these devices (the tests run one at a time), so every user object is ours.
    v.as_array()
        .expect("a JSON array")
        .iter()
        .filter(|o| o.get("pid").is_some() || o.get("comm").is_none())
        .filter(|o| o["ifname"].as_str() == Some(dev))
        .count()
}

/// Destroy deregisters every memory region and destroys every QP before it returns, also
/// for memory the caller registered and keeps.
#[test]
fn destroy_leaves_no_memory_region_or_queue_pair() {
    if !in_vm() {
        return;
    }
    let len = 1 << 20;
    let region = common::map_anon(len, None);
    let target = engine(&["rxeB0"]);
    // SAFETY: a fresh anonymous mapping this test owns and never unmaps.
    let seg = unsafe { target.register_memory(region, len) }.unwrap();
    let kept = target.alloc(4096).unwrap();
    let initiator = engine(&["rxeA0"]);
    let src = initiator.alloc(len).unwrap();
    let peer = initiator.connect(target.local_addr()).unwrap();
    initiator
        .transfer_sync(peer, &[Request::write(src.addr(), len as u64, seg.id, 0)])
        .unwrap();
    let (mrs, qps) = (
        kernel_resources("mr", "rxeB0"),
        kernel_resources("qp", "rxeB0"),
    );
    eprintln!("target on rxeB0 before destroy: {mrs} MRs, {qps} QPs");
    assert!(mrs >= 2 && qps >= 2, "{mrs} MRs, {qps} QPs while connected");
    drop(target);
    let (mrs, qps) = (
        kernel_resources("mr", "rxeB0"),
        kernel_resources("qp", "rxeB0"),
    );
    assert_eq!(
        (mrs, qps),
        (0, 0),
        "MRs and QPs left on rxeB0 after destroy"
    );
    // The buffer outlived its engine: its bytes are still there to read.
    assert_eq!(kept.to_vec().len(), 4096);
    drop(initiator);
    assert_eq!(kernel_resources("mr", "rxeA0"), 0);
}
