//! GPU segments in staging mode over TCP, with host memory standing in for the device
//! (`HostEmulatedDevice` copies with memcpy): the frames, bounce buffers, chunking and
//! landing are the ones a real GPU uses; only the copy itself differs.
use super::*;
use crate::cuda::{HostEmulatedDevice, STAGE_CHUNK};
use crate::request::Request;
use std::sync::atomic::Ordering;

fn engine() -> TransferEngine {
    TransferEngine::new(
        EngineConfig::builder()
            .transport(TransportKind::Tcp)
            .slice_size(8 << 20)
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// An RDMA engine on Soft-RoCE device `dev`, inside the guest of scripts/rdma-tests.sh
/// (`KVT_VM=1`); `None` elsewhere.
fn rdma_engine(dev: &str) -> Option<TransferEngine> {
    if std::env::var("KVT_VM").as_deref() != Ok("1") {
        eprintln!("skipped: not inside the Soft-RoCE guest (run scripts/rdma-tests.sh)");
        return None;
    }
    let gid = std::env::var("KVT_GID_INDEX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let config = EngineConfig::builder()
        .transport(TransportKind::Rdma)
        .devices([dev])
        .gid_index(gid)
        .slice_size(8 << 20)
        .batch_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    Some(TransferEngine::new(config).unwrap_or_else(|e| panic!("rdma engine on {dev}: {e}")))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

type Emulated = Arc<HostEmulatedDevice>;

/// Registers `src` on `initiator` and `dst` on `target` as staged GPU memory, each with its
/// own emulated device.
fn emulated_pair(
    initiator: &TransferEngine,
    target: &TransferEngine,
    src: &RawAlloc,
    dst: &RawAlloc,
) -> (Emulated, SegmentInfo, Emulated, SegmentInfo) {
    let (dev_src, dev_dst) = (
        Arc::new(HostEmulatedDevice::default()),
        Arc::new(HostEmulatedDevice::default()),
    );
    let s = initiator
        .inner
        .register_emulated_device(src.addr(), src.len() as u64, dev_src.clone())
        .unwrap();
    let d = target
        .inner
        .register_emulated_device(dst.addr(), dst.len() as u64, dev_dst.clone())
        .unwrap();
    (dev_src, s, dev_dst, d)
}

#[test]
fn gpu_to_gpu_over_tcp_through_staging() {
    round_trip_through_staging(&engine(), &engine());
}

/// Scattered pages from and to staged memory are gathered into bounce buffers: one wait
/// on the device per bounce buffer, not one per page, on either side.
#[test]
fn scattered_staged_pages_share_device_copies() {
    // 4 KiB pages go through the reader's buffer, 36 KiB ones straight into the bounce.
    scattered_staged_pages(4096, 1500);
    scattered_staged_pages(36 << 10, 200);
}

fn scattered_staged_pages(page: usize, pages: usize) {
    let (target, initiator) = (engine(), engine());
    let len = 2 * page * pages;
    let src = RawAlloc::zeroed(len).unwrap();
    let dst = RawAlloc::zeroed(len).unwrap();
    let data = pattern(len, 5);
    src.write_at(0, &data);
    let (dev_src, _, dev_dst, d) = emulated_pair(&initiator, &target, &src, &dst);
    let peer = initiator.connect(target.local_addr()).unwrap();
    // Every other page, to reversed places: nothing coalesces.
    let reqs: Vec<Request> = (0..pages)
        .map(|p| {
            let from = (2 * p * page) as u64;
            let to = (2 * (pages - 1 - p) * page) as u64;
            Request::write(src.addr() + from, page as u64, d.id, to)
        })
        .collect();
    initiator.transfer_sync(peer, &reqs).unwrap();
    let mut got = vec![0u8; len];
    dst.read_at(0, &mut got);
    for p in 0..pages {
        let (from, to) = (2 * p * page, 2 * (pages - 1 - p) * page);
        assert!(got[to..to + page] == data[from..from + page], "page {p}");
    }
    // A few bounce buffers' worth, split over the lanes.
    let lanes = initiator.peer_info(peer).unwrap().lanes as u64;
    let buffers = (page * pages).div_ceil(STAGE_CHUNK) as u64;
    for (side, dev) in [("sender", &dev_src), ("target", &dev_dst)] {
        let copies = dev.copies.load(Ordering::Relaxed);
        eprintln!("{side}: {copies} device copies for {pages} pages of {page} bytes");
        assert!(
            copies <= buffers + 2 * lanes,
            "{side}: {copies} device copies for {pages} pages"
        );
    }
}

/// Gathered staged writes keep their room's gate held until they land: once a fence on
/// the room returns, the staged memory no longer changes.
#[test]
fn a_fenced_room_gets_no_late_gathered_write() {
    let (target, initiator) = (engine(), engine());
    let (page, pages) = (4096usize, 8192usize);
    let len = 2 * page * pages;
    let (src, dst) = (
        RawAlloc::zeroed(len).unwrap(),
        RawAlloc::zeroed(len).unwrap(),
    );
    src.write_at(0, &pattern(len, 11));
    let (_, _, dev_dst, d) = emulated_pair(&initiator, &target, &src, &dst);
    let peer = initiator.connect(target.local_addr()).unwrap();
    let reqs: Vec<Request> = (0..pages)
        .map(|p| {
            let (from, to) = ((2 * p * page) as u64, (2 * (pages - 1 - p) * page) as u64);
            Request::write(src.addr() + from, page as u64, d.id, to)
        })
        .collect();
    let slot = 77u32;
    let t0 = Instant::now();
    let b = initiator
        .submit_with_notify(
            peer,
            &reqs,
            slot << crate::transport::fence::ROOM_SLOT_SHIFT,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while dev_dst.copies.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        thread::yield_now();
    }
    let key = (initiator.engine_id(), initiator.epoch(), slot);
    assert!(
        target.inner.fences.fence(key, Duration::from_secs(10)),
        "fence in time"
    );
    eprintln!("fence returned at {:?}", t0.elapsed());
    let mut before = vec![0u8; len];
    dst.read_at(0, &mut before);
    let landed = before.iter().filter(|&&x| x != 0).count();
    eprintln!(
        "fenced at {:?}: {landed} of {len} bytes landed",
        t0.elapsed()
    );
    let result = initiator.wait(b);
    eprintln!("batch over at {:?}: {result:?}", t0.elapsed());
    thread::sleep(Duration::from_millis(200));
    let mut after = vec![0u8; len];
    dst.read_at(0, &mut after);
    assert!(before == after, "staged memory changed after the fence");
    assert!(landed > 0, "some pages landed before the fence");
    if landed < len / 4 {
        // Less than half of the pages: the batch cannot have completed.
        let e = result.expect_err("writes after the fence are refused");
        assert!(e.to_string().contains("aborted"), "{e}");
    }
}

/// Over RDMA, batches touching a staged segment (on either side) take the control
/// connection; the others keep the QPs.
#[test]
fn gpu_to_gpu_over_rdma_through_staging() {
    let (Some(target), Some(initiator)) = (rdma_engine("rxeA0"), rdma_engine("rxeB0")) else {
        return;
    };
    assert_eq!(
        (target.transport(), initiator.transport()),
        ("rdma", "rdma")
    );
    let peer = round_trip_through_staging(&target, &initiator);
    let staging_lane = initiator
        .inner
        .peer(peer)
        .unwrap()
        .link
        .staging_lane()
        .unwrap();

    // A staged destination is announced without memory keys; a notified batch to it
    // arrives through the control connection, and the notification follows the bytes.
    let len = STAGE_CHUNK + 12_345;
    let dst = RawAlloc::zeroed(len).unwrap();
    let dev = Arc::new(HostEmulatedDevice::default());
    let d = target
        .inner
        .register_emulated_device(dst.addr(), len as u64, dev.clone())
        .unwrap();
    let host = initiator.alloc(len).unwrap();
    let data = pattern(len, 21);
    host.write(0, &data);
    let reqs = [Request::write(host.addr(), len as u64, d.id, 0)];
    let b = initiator.submit_with_notify(peer, &reqs, 0x5a5a).unwrap();
    assert_eq!(
        initiator.inner.batch(b).unwrap().lanes,
        [staging_lane as u16]
    );
    initiator.wait(b).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.is_empty() && Instant::now() < deadline {
        seen = target.notifications();
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(seen.len(), 1, "one notification for the staged batch");
    assert_eq!(seen[0].tag, 0x5a5a);
    let mut got = vec![0u8; len];
    dst.read_at(0, &mut got);
    assert!(got == data, "host → staged device bytes differ");
    assert!(dev.copies.load(Ordering::Relaxed) >= 2, "H2D copies");

    // Host ↔ host on the same link still goes over the QPs.
    let there = target.alloc(4096).unwrap();
    let b = initiator
        .submit(
            peer,
            &[Request::write(host.addr(), 4096, there.segment(), 0)],
        )
        .unwrap();
    let lanes = initiator.inner.batch(b).unwrap().lanes.clone();
    initiator.wait(b).unwrap();
    assert!(
        lanes.iter().all(|&l| (l as usize) < staging_lane),
        "QP lanes: {lanes:?}"
    );
    assert!(
        there.to_vec() == data[..4096],
        "host → host over the QPs differs"
    );
}

/// Moves bytes device → device, device → host, host → device and device → device by read
/// between two engines whose GPU segments are staged; returns initiator's peer id of
/// target.
fn round_trip_through_staging(target: &TransferEngine, initiator: &TransferEngine) -> PeerId {
    // Larger than one bounce buffer and than one slice, so both split.
    let len = 2 * STAGE_CHUNK + STAGE_CHUNK / 2 + 4096 + 17;
    let src = RawAlloc::zeroed(len).unwrap();
    let dst = RawAlloc::zeroed(len).unwrap();
    let back = initiator.alloc(len).unwrap();
    let (dev_src, s, dev_dst, d) = emulated_pair(initiator, target, &src, &dst);
    let details = target.segment_info(d.id).unwrap();
    assert_eq!(details.mode, RegMode::Staging);
    assert!(details.placement.is_device());
    assert_eq!(details.info.kind, MemoryKind::Gpu);
    let data = pattern(len, 3);
    src.write_at(0, &data);
    let peer = initiator.connect(target.local_addr()).unwrap();
    // One big write plus scattered small pages (KV-page shaped), device → device.
    let mut reqs = vec![Request::write(src.addr(), (len - 8192) as u64, d.id, 0)];
    for p in 0..2u64 {
        let off = (len - 8192) as u64 + p * 4096;
        reqs.push(Request::write(src.addr() + off, 4096, d.id, off));
    }
    initiator.transfer_sync(peer, &reqs).unwrap();
    let mut got = vec![0u8; len];
    dst.read_at(0, &mut got);
    assert!(got == data, "device → TCP → device bytes differ");
    assert!(dev_src.copies.load(Ordering::Relaxed) >= 3, "D2H copies");
    assert!(dev_dst.copies.load(Ordering::Relaxed) >= 3, "H2D copies");

    // Read the device segment back into host memory (target D2H through staging).
    initiator
        .transfer_sync(peer, &[Request::read(back.addr(), len as u64, d.id, 0)])
        .unwrap();
    assert!(back.to_vec() == data, "device → host read differs");

    // Host → device at an offset, and a read from the peer's device into a local device.
    let host = target.alloc(8192).unwrap();
    host.write(0, &pattern(8192, 9));
    let peer_back = target.connect(initiator.local_addr()).unwrap();
    target
        .transfer_sync(
            peer_back,
            &[
                Request::write(host.addr(), 8192, s.id, 4096),
                Request::read(dst.addr() + 100, 5000, s.id, 20_000),
            ],
        )
        .unwrap();
    let mut page = vec![0u8; 8192];
    src.read_at(4096, &mut page);
    assert!(page == pattern(8192, 9), "host → device write differs");
    let mut part = vec![0u8; 5000];
    dst.read_at(100, &mut part);
    assert!(
        part == data[20_000..25_000],
        "device read into a device differs"
    );
    peer
}
