//! Resources bounded by design, not by what peers do: connections that never send a
//! handshake cost at most `MAX_HANDSHAKES` (64) threads, however many there are, and the
//! engine serves real peers again once they are gone; connected peers cost no thread at all
//! (every connection is read by the engine's poller and written by its send pool).

use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use kvtransfer::{EngineConfig, Request, TransferEngine, TransportKind};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

fn engine() -> TransferEngine {
    kvtransfer::init_logging("error");
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .connect_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    TransferEngine::new(cfg).unwrap()
}

/// The tests count this process's threads: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn half_open_connections_cost_at_most_64_threads() {
    let _serial = serial();
    let target = engine();
    let before = threads();
    let n = 200;
    let held: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(target.local_addr()).unwrap())
        .collect();
    // The engine closes every connection beyond the bound at once: wait until that many
    // sockets see the end of their stream (readable with nothing to read).
    let deadline = Instant::now() + Duration::from_secs(15);
    let closed = loop {
        let mut fds: Vec<PollFd<'_>> = held
            .iter()
            .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
            .collect();
        poll(&mut fds, PollTimeout::from(100u16)).unwrap();
        let closed = fds
            .iter()
            .filter(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .count();
        if closed >= n - 64 || Instant::now() > deadline {
            break closed;
        }
    };
    let grown = threads().saturating_sub(before);
    eprintln!("{n} half-open connections: {closed} closed by the engine, {grown} threads more");
    assert_eq!(closed, n - 64, "all but 64 closed");
    assert!(grown <= 64, "{grown} threads for {n} half-open connections");

    // Once they go, a real peer is served again.
    drop(held);
    let initiator = engine();
    let dst = target.alloc(4096).unwrap();
    let src = initiator.alloc(4096).unwrap();
    src.write(0, b"still serving");
    let deadline = Instant::now() + Duration::from_secs(15);
    let peer = loop {
        match initiator.connect(target.local_addr()) {
            Ok(p) => break p,
            // Handshake slots free up as the engine's threads see the sockets close.
            Err(e) if Instant::now() < deadline => eprintln!("connect: {e}; again"),
            Err(e) => panic!("no connection after the half-open ones closed: {e}"),
        }
    };
    initiator
        .transfer_sync(peer, &[Request::write(src.addr(), 13, dst.segment(), 0)])
        .unwrap();
    let mut out = [0u8; 13];
    dst.read(0, &mut out);
    assert_eq!(&out, b"still serving");
}

/// Threads settle at `want` (handshake threads exit once their connection is handed to the
/// poller); returns what was last seen.
fn settle(want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = threads();
        if now == want || Instant::now() > deadline {
            return now;
        }
        std::thread::yield_now();
    }
}

#[test]
fn connected_peers_cost_no_threads() {
    let _serial = serial();
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
    let after = settle(before);
    assert_eq!(
        after, before,
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
