//! Engine metrics: after real rooms and batches over TCP, the Prometheus text served at
//! `metrics_listen` and the snapshot name the bytes that were moved and verified, the rooms by
//! outcome and their latencies.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use kvtransfer::kv::{
    FailureKind, KvBuffer, KvConfig, KvLayout, KvManager, KvPoll, KvReceiver, KvRole, KvSender,
};
use kvtransfer::{EngineConfig, Request, TransferEngine, TransportKind};

const PAGE: usize = 4096;

/// A TCP KV manager over `mem` (4 KiB pages) serving its metrics on a free loopback port.
fn manager(role: KvRole, mem: &mut [u8]) -> KvManager {
    let layout = KvLayout::new(
        vec![KvBuffer {
            addr: mem.as_mut_ptr() as u64,
            len: mem.len() as u64,
            item_len: PAGE as u64,
        }],
        Vec::new(),
    )
    .unwrap();
    let config = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .metrics_listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .build()
        .unwrap();
    // SAFETY: the caller keeps `mem` alive and unmoved until the manager is dropped.
    unsafe { KvManager::new(config, KvConfig::new(role), layout).unwrap() }
}

/// `GET path` over HTTP/1.1: (status line, content type, body).
fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").expect("a header and a body");
    let status = head.lines().next().unwrap().to_string();
    let kind = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_string();
    (status, kind, body.to_string())
}

/// The value of the sample `series` (name and labels exactly as written) in `text`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .unwrap()
}

/// The first sample of `name` whose labels contain every one of `labels`.
fn sample_with(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} with {labels:?} in:\n{text}"))
}

#[test]
fn the_prometheus_text_after_a_room_counts_the_bytes_that_were_verified() {
    let pages = 16;
    let mut src = vec![0u8; pages * PAGE];
    for (i, b) in src.iter_mut().enumerate() {
        *b = (i * 13 % 251) as u8;
    }
    let mut dst = vec![0u8; pages * PAGE];
    let prefill = manager(KvRole::Prefill, &mut src);
    let decode = manager(KvRole::Decode, &mut dst);

    // One room of 12 scattered pages, in two chunks.
    let dst_pages = [15, 3, 4, 5, 9, 0, 1, 2, 12, 13, 7, 8];
    let src_pages: Vec<i32> = (0..12).collect();
    let sender = KvSender::new(&prefill, 41).unwrap();
    let receiver = KvReceiver::new(&decode, prefill.bootstrap_addr(), 41).unwrap();
    receiver.init(&dst_pages, None).unwrap();
    common::wait_until("the sender to pair", || {
        sender.poll() == KvPoll::WaitingForInput
    });
    sender.init(12, None).unwrap();
    sender.send(&src_pages[..5], false).unwrap();
    sender.send(&src_pages[5..], true).unwrap();
    common::wait_until("success", || {
        receiver.poll() == KvPoll::Success && sender.poll() == KvPoll::Success
    });
    let mut verified = 0u64;
    for (&d, &s) in dst_pages.iter().zip(&src_pages) {
        let (d, s) = (d as usize * PAGE, s as usize * PAGE);
        assert!(
            dst[d..d + PAGE] == src[s..s + PAGE],
            "page {d} landed whole"
        );
        verified += PAGE as u64;
    }

    // A second room the receiver aborts once both sides paired: counted as failed, by kind,
    // on both sides.
    let aborted = KvReceiver::new(&decode, prefill.bootstrap_addr(), 42).unwrap();
    let told = KvSender::new(&prefill, 42).unwrap();
    aborted.init(&[6], None).unwrap();
    common::wait_until("the second room to pair", || {
        told.poll() == KvPoll::WaitingForInput && aborted.poll() == KvPoll::WaitingForInput
    });
    aborted.abort().unwrap();
    common::wait_until("the sender to hear of the abort", || {
        told.poll() == KvPoll::Failed
    });

    let (status, kind, text) = get(decode.engine().metrics_addr().unwrap(), "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(
        sample(&text, "kvt_room_bytes_total{role=\"decode\"}"),
        verified as f64
    );
    assert_eq!(
        sample(&text, "kvt_rooms_started_total{role=\"decode\"}"),
        2.0
    );
    assert_eq!(
        sample(&text, "kvt_rooms_succeeded_total{role=\"decode\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "kvt_rooms_failed_total{role=\"decode\",kind=\"aborted\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "kvt_room_transfer_seconds_count{role=\"decode\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "kvt_room_bootstrap_seconds_count{role=\"decode\"}"),
        2.0
    );

    // The prefill wrote exactly those bytes, in done batches, to its one peer.
    let (_, _, text) = get(prefill.engine().metrics_addr().unwrap(), "/metrics");
    assert_eq!(
        sample(&text, "kvt_bytes_total{op=\"write\"}"),
        verified as f64
    );
    assert_eq!(sample(&text, "kvt_bytes_total{op=\"read\"}"), 0.0);
    assert_eq!(
        sample_with(&text, "kvt_peer_bytes_total", &["op=\"write\""]),
        verified as f64
    );
    assert_eq!(sample(&text, "kvt_batches_total{outcome=\"done\"}"), 2.0);
    assert_eq!(sample(&text, "kvt_batch_seconds_count"), 2.0);
    assert!(sample(&text, "kvt_batch_seconds_sum") > 0.0);
    assert_eq!(
        sample(&text, "kvt_room_bytes_total{role=\"prefill\"}"),
        verified as f64
    );
    assert_eq!(
        sample(&text, "kvt_rooms_succeeded_total{role=\"prefill\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "kvt_rooms_failed_total{role=\"prefill\",kind=\"aborted_by_peer\"}"
        ),
        1.0
    );

    // The snapshot says the same.
    let m = prefill.engine().metrics();
    assert_eq!((m.bytes_written, m.batches_done), (verified, 2));
    assert_eq!(m.peers.len(), 1);
    assert_eq!(m.peers[0].bytes_written, verified);
    let rooms = m.rooms.unwrap();
    assert_eq!((rooms.succeeded, rooms.bytes), (1, verified));
    assert!(rooms.transfer.mean().is_some());
    let rooms = decode.engine().metrics().rooms.unwrap();
    assert_eq!((rooms.started, rooms.succeeded, rooms.failed), (2, 1, 1));
    assert_eq!(rooms.failed_by_kind, vec![(FailureKind::Aborted, 1)]);

    // Anything but GET /metrics is refused.
    let addr = prefill.engine().metrics_addr().unwrap();
    assert_eq!(get(addr, "/").0, "HTTP/1.1 404 Not Found");
}

#[test]
fn batch_metrics_count_writes_and_reads_per_peer() {
    let target = TransferEngine::new(
        EngineConfig::builder()
            .transport(TransportKind::Tcp)
            .build()
            .unwrap(),
    )
    .unwrap();
    let initiator = TransferEngine::new(
        EngineConfig::builder()
            .transport(TransportKind::Tcp)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(initiator.metrics_addr(), None, "no endpoint unless asked");
    let dst = target.alloc(1 << 20).unwrap();
    let src = initiator.alloc(1 << 20).unwrap();
    src.write(0, &vec![9u8; 1 << 20]);
    let peer = initiator.connect(target.local_addr()).unwrap();
    initiator
        .transfer_sync(
            peer,
            &[Request::write(src.addr(), 300_000, dst.segment(), 0)],
        )
        .unwrap();
    initiator
        .transfer_sync(
            peer,
            &[Request::read(src.addr(), 70_000, dst.segment(), 4096)],
        )
        .unwrap();
    let m = initiator.metrics();
    assert_eq!((m.bytes_written, m.bytes_read), (300_000, 70_000));
    assert_eq!(
        (m.batches_done, m.batches_failed, m.batches_timed_out),
        (2, 0, 0)
    );
    assert_eq!(m.batch_latency.count, 2);
    assert_eq!(m.peers.len(), 1);
    let p = &m.peers[0];
    assert_eq!((p.addr, p.transport), (target.local_addr(), "tcp"));
    assert_eq!(
        (p.bytes_written, p.bytes_read, p.batches_done),
        (300_000, 70_000, 2)
    );
    assert_eq!(p.outstanding, 0);
    assert!(m.rails.is_empty() && m.rooms.is_none());
    // The text has the same, and the peer's series go with it.
    let text = initiator.metrics_text();
    assert_eq!(
        sample_with(&text, "kvt_peer_bytes_total", &["op=\"read\""]),
        70_000.0
    );
    initiator.disconnect(peer).unwrap();
    let text = initiator.metrics_text();
    assert!(!text.contains("kvt_peer_bytes_total{"), "{text}");
    assert_eq!(sample(&text, "kvt_bytes_total{op=\"write\"}"), 300_000.0);
    assert!(initiator.metrics().peers.is_empty());
}

#[test]
fn one_batch_reports_its_own_bytes_and_latency() {
    let tcp = || {
        TransferEngine::new(
            EngineConfig::builder()
                .transport(TransportKind::Tcp)
                .build()
                .unwrap(),
        )
        .unwrap()
    };
    let (target, initiator) = (tcp(), tcp());
    let dst = target.alloc(1 << 20).unwrap();
    let src = initiator.alloc(1 << 20).unwrap();
    let peer = initiator.connect(target.local_addr()).unwrap();
    let mixed = initiator
        .submit(
            peer,
            &[
                Request::write(src.addr(), 200_000, dst.segment(), 0),
                Request::read(src.addr() + 300_000, 50_000, dst.segment(), 500_000),
            ],
        )
        .unwrap();
    // Known at submit; the latency only once it is final.
    let early = initiator.batch_metrics(mixed).unwrap();
    assert_eq!((early.bytes_written, early.bytes_read), (200_000, 50_000));
    let done = initiator.wait_metrics(mixed).unwrap();
    assert_eq!((done.bytes_written, done.bytes_read), (200_000, 50_000));
    let latency = done.latency.expect("a done batch has a latency");
    assert!(latency > std::time::Duration::ZERO);
    // It is one of the observations the engine's histogram summed.
    let m = initiator.metrics();
    assert_eq!(m.batch_latency.count, 1);
    assert!((m.batch_latency.sum_secs - latency.as_secs_f64()).abs() < 1e-3);
    assert!(
        initiator.batch_metrics(mixed).is_err(),
        "wait_metrics released it"
    );
    // Polled to the end, it stays readable until released.
    let polled = initiator
        .submit(peer, &[Request::write(src.addr(), 4096, dst.segment(), 0)])
        .unwrap();
    while initiator.poll(polled).unwrap() == kvtransfer::BatchStatus::Pending {
        std::thread::yield_now();
    }
    let m = initiator.batch_metrics(polled).unwrap();
    assert_eq!(m.bytes_written, 4096);
    assert!(m.latency.is_some());
    initiator.release(polled);
    assert!(initiator.batch_metrics(polled).is_err());
}
