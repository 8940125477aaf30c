//! Resources bounded by design, not by what peers do: 2,000 connections held open in their
//! handshake (silent, trickling, stalled after a step, or announcing huge messages) cost no
//! thread and little memory, a real peer is served while they are held, and the memory is
//! back once they go; connected peers cost no thread at all (every connection is read by the
//! engine's poller and written by its send pool).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use kvtransfer::wire::{self, ConnPurpose, Hello, MsgKind};
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

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn a_hello(purpose: ConnPurpose) -> Hello {
    common::tcp_hello(7, 9, purpose)
}

/// One hostile connection of kind `i % 5`: silent; a trickled partial preamble; a whole Hi
/// and then nothing; a preamble announcing a 4 MiB Hi; a hello before any Hi.
fn hostile(addr: std::net::SocketAddr, i: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let hi = wire::encode_hi(&wire::Hi {
        auth: false,
        nonce: [i as u8; 32],
        proof: Vec::new(),
    });
    let mut huge = hi[..12].to_vec();
    huge[8..12].copy_from_slice(&(4u32 << 20).to_le_bytes());
    let _ = match i % 5 {
        0 => Ok(()),
        1 => s.write_all(&hi[..5]),
        2 => s.write_all(&hi),
        3 => s.write_all(&huge),
        _ => s.write_all(&wire::encode_hello(&a_hello(ConnPurpose::TcpData))),
    };
    let _ = MsgKind::Hi;
    s
}

#[test]
fn held_half_open_connections_cost_no_thread_and_lock_no_peer_out() {
    let _serial = serial();
    let target = engine();
    let dst = target.alloc(4096).unwrap();
    let (threads_before, rss_before) = (threads(), rss_kib());
    let n = 2000;
    let held: Vec<TcpStream> = (0..n).map(|i| hostile(target.local_addr(), i)).collect();
    // Those that broke the protocol (kinds 3 and 4) are refused and closed at once; wait
    // for their end of stream, an event, before measuring.
    let broken = 2 * n / 5;
    let deadline = Instant::now() + Duration::from_secs(30);
    while target.refused_connections() < broken as u64 {
        assert!(
            Instant::now() < deadline,
            "{} refused",
            target.refused_connections()
        );
        let mut fds: Vec<PollFd<'_>> = held
            .iter()
            .skip(3)
            .step_by(5)
            .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
            .collect();
        poll(&mut fds, PollTimeout::from(100u16)).unwrap();
    }
    let (threads_held, rss_held) = (threads(), rss_kib());
    eprintln!(
        "{n} hostile connections held: {} refused at once, threads {threads_before} -> \
         {threads_held}, RSS {rss_before} -> {rss_held} KiB",
        target.refused_connections()
    );
    // (At most: the other test's thread may still be exiting when `threads_before` is read.)
    assert!(
        threads_held <= threads_before,
        "a handshake costs no thread"
    );
    assert!(
        rss_held < rss_before + 16 * 1024,
        "RSS grew {} KiB for {n} held connections",
        rss_held - rss_before
    );

    // A real peer is served while they are all held.
    let initiator = engine();
    let src = initiator.alloc(4096).unwrap();
    src.write(0, b"still serving");
    let t = Instant::now();
    let peer = initiator.connect(target.local_addr()).unwrap();
    eprintln!("a real peer connected in {:?} beside them", t.elapsed());
    initiator
        .transfer_sync(peer, &[Request::write(src.addr(), 13, dst.segment(), 0)])
        .unwrap();
    let mut out = [0u8; 13];
    dst.read(0, &mut out);
    assert_eq!(&out, b"still serving");

    // Once they go, the engine lets go of them too (their ends of stream are refusals), and
    // its memory comes back.
    // (Each connection is refused once: at once, when evicted to admit a newer one beyond
    // the 1,024 per address, or at its end of stream now.)
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    while target.refused_connections() < n as u64 {
        assert!(
            Instant::now() < deadline,
            "{} refused",
            target.refused_connections()
        );
        std::thread::yield_now();
    }
    let rss_after = rss_kib();
    eprintln!("after they closed: RSS {rss_after} KiB");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    a_handshake_stalled_past_its_deadline_is_closed();
}

/// A connection stalled after its Hi is closed at the handshake deadline.
fn a_handshake_stalled_past_its_deadline_is_closed() {
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let target = TransferEngine::new(cfg).unwrap();
    let s = hostile(target.local_addr(), 2); // a whole Hi, then nothing
    let t = Instant::now();
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    // Its reply (our Hi) is readable at once; the end of stream comes at the deadline.
    let mut rx = Vec::new();
    loop {
        poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
        let mut buf = [0u8; 256];
        match std::io::Read::read(&mut (&s), &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => rx.extend_from_slice(&buf[..n]),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never closed");
    }
    let waited = t.elapsed();
    eprintln!("closed after {waited:?}, having sent {} bytes", rx.len());
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
    let (kind, body, _) = wire::next_message(&rx, &[MsgKind::Hi], 512)
        .unwrap()
        .unwrap();
    assert_eq!(kind, MsgKind::Hi);
    assert!(
        wire::decode_hi(body).unwrap().proof.is_empty(),
        "no secret, no proof"
    );
}

/// A peer that sends read requests and does not read the replies: the engine stops reading
/// its requests once 1,024 replies wait, so the peer's writes soon block, instead of the
/// engine queueing a reply for every request it is sent. Once the peer reads, every request
/// is answered (including those the engine had read but not handled when it stopped).
#[test]
fn a_peer_that_reads_no_replies_is_not_read_without_bound() {
    use kvtransfer::wire::{FrameHeader, FrameOp};
    use std::io::{ErrorKind, Read};

    let _serial = serial();
    let target = engine();
    let buf = target.alloc(1 << 20).unwrap();
    let mut s = TcpStream::connect(target.local_addr()).unwrap();
    common::raw_handshake(&mut s, a_hello(ConnPurpose::TcpData), None).unwrap();

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
