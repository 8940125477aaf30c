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

/// This process's threads. Only two tests live here, so the harness starts both threads
/// at once (a third would start when one ends and be counted as the engine's).
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

/// A peer that sends read requests and does not read the replies: the engine stops reading
/// its requests once 1,024 replies wait, so the peer's writes soon block, instead of the
/// engine queueing a reply for every request it is sent. Once the peer reads, every request
/// is answered (including those the engine had read but not handled when it stopped).
#[test]
fn a_peer_that_reads_no_replies_is_not_read_without_bound() {
    use kvtransfer::wire::{
        self, ConnPurpose, Endpoint, FrameHeader, FrameOp, Hello, PREAMBLE_LEN, TransportId,
    };
    use std::io::{ErrorKind, Read, Write};

    let _serial = serial();
    let target = engine();
    let buf = target.alloc(1 << 20).unwrap();
    let mut s = TcpStream::connect(target.local_addr()).unwrap();
    let hello = Hello {
        engine_id: 7,
        epoch: 9,
        purpose: ConnPurpose::TcpData,
        conn_index: 0,
        segments: Vec::new(),
        endpoints: vec![Endpoint {
            transport: TransportId::Tcp,
            data: Vec::new(),
        }],
    };
    s.write_all(&wire::encode_hello(&hello)).unwrap();
    let mut pre = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut pre).unwrap();
    let mut body = vec![0u8; wire::decode_preamble(&pre).unwrap()];
    s.read_exact(&mut body).unwrap();

    let request = FrameHeader {
        op: FrameOp::ReadRequest,
        flags: 0,
        status: 0,
        segment: buf.segment().0,
        batch: 1,
        offset: 0,
        len: 64,
        tag: 0,
    }
    .encode();
    let chunk = request.repeat(1024);
    s.set_nonblocking(true).unwrap();
    // Without a bound the engine reads requests as fast as they come, whatever is queued.
    let limit: usize = 256 << 20;
    let mut sent = 0usize;
    while sent < limit {
        // Whole frames only: a short write goes on where it stopped.
        let at = sent % chunk.len();
        match s.write(&chunk[at..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Blocked: done once the socket stays full for a while.
                let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLOUT)];
                if poll(&mut fds, PollTimeout::from(500u16)).unwrap() == 0 {
                    break;
                }
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    eprintln!(
        "{} MiB of read requests sent before the engine stopped reading",
        sent >> 20
    );
    assert!(
        sent < limit,
        "the engine read {} MiB of requests whose replies nobody reads",
        sent >> 20
    );
    // Finish the frame being written (on another thread: the socket is full until the
    // replies are read), and read every reply.
    s.set_nonblocking(false).unwrap();
    let at = sent % chunk.len();
    let rest = (request.len() - at % request.len()) % request.len();
    let tail = chunk[at..at + rest].to_vec();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&tail));
    let requests = (sent + rest) / request.len();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reply = vec![0u8; 40 + 64];
    for i in 0..requests {
        s.read_exact(&mut reply)
            .unwrap_or_else(|e| panic!("reply {i} of {requests}: {e}"));
        let hdr = FrameHeader::decode(reply[..40].try_into().unwrap()).unwrap();
        assert_eq!(
            (hdr.op, hdr.status, hdr.len),
            (FrameOp::ReadResponse, 0, 64)
        );
    }
    writer.join().unwrap().unwrap();
}
