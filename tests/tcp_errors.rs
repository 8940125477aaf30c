//! Every bad input is answered by its own error, and nothing is written.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use kvtransfer::{EngineConfig, Error, PeerId, Request, SegmentId, TransferEngine, TransportKind};

fn engine() -> TransferEngine {
    kvtransfer::init_logging("warn");
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .connect_timeout(Duration::from_secs(2))
        .batch_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    TransferEngine::new(cfg).unwrap()
}

struct Pair {
    target: TransferEngine,
    initiator: TransferEngine,
    dst: kvtransfer::HostBuffer,
    src: kvtransfer::HostBuffer,
    peer: PeerId,
}

fn pair() -> Pair {
    let target = engine();
    let initiator = engine();
    let dst = target.alloc(1 << 16).unwrap();
    let src = initiator.alloc(1 << 16).unwrap();
    src.write(0, &[0xAB; 1 << 16]);
    let peer = initiator.connect(target.local_addr()).unwrap();
    Pair {
        target,
        initiator,
        dst,
        src,
        peer,
    }
}

fn untouched(p: &Pair) {
    assert!(
        p.dst.to_vec().iter().all(|b| *b == 0),
        "nothing may be written"
    );
}

#[test]
fn unregistered_local_address() {
    let p = pair();
    let stack = [0u8; 64];
    let addr = stack.as_ptr() as u64;
    let e = p
        .initiator
        .submit(p.peer, &[Request::write(addr, 64, p.dst.segment(), 0)])
        .unwrap_err();
    assert!(
        matches!(e, Error::UnregisteredAddress { addr: a, len: 64 } if a == addr),
        "{e}"
    );
    // Straddling the end of a registered buffer is just as unregistered.
    let e = p
        .initiator
        .submit(
            p.peer,
            &[Request::write(
                p.src.addr() + (1 << 16) - 8,
                16,
                p.dst.segment(),
                0,
            )],
        )
        .unwrap_err();
    assert!(matches!(e, Error::UnregisteredAddress { .. }), "{e}");
    untouched(&p);
}

#[test]
fn remote_offset_out_of_range() {
    let p = pair();
    let e = p
        .initiator
        .submit(
            p.peer,
            &[Request::write(
                p.src.addr(),
                4096,
                p.dst.segment(),
                (1 << 16) - 100,
            )],
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::RemoteOutOfRange { offset, len: 4096, segment_len, .. } if offset == (1 << 16) - 100 && segment_len == 1 << 16),
        "{e}"
    );
    let e = p
        .initiator
        .submit(
            p.peer,
            &[Request::write(p.src.addr(), 1, p.dst.segment(), u64::MAX)],
        )
        .unwrap_err();
    assert!(matches!(e, Error::RemoteOutOfRange { .. }), "{e}");
    // A good request before the bad one is not sent either.
    let good = Request::write(p.src.addr(), 64, p.dst.segment(), 0);
    let bad = Request::write(p.src.addr(), 64, p.dst.segment(), 1 << 16);
    assert!(matches!(
        p.initiator.submit(p.peer, &[good, bad]),
        Err(Error::RemoteOutOfRange { .. })
    ));
    untouched(&p);
}

#[test]
fn zero_length() {
    let p = pair();
    let e = p
        .initiator
        .submit(
            p.peer,
            &[Request::write(p.src.addr(), 0, p.dst.segment(), 0)],
        )
        .unwrap_err();
    assert!(matches!(e, Error::ZeroLength { what: "request" }), "{e}");
    assert!(matches!(
        p.initiator.alloc(0),
        Err(Error::ZeroLength { .. })
    ));
    assert!(matches!(
        p.initiator.submit(p.peer, &[]),
        Err(Error::InvalidArgument(_))
    ));
    untouched(&p);
}

#[test]
fn unknown_peer_segment_and_batch() {
    let p = pair();
    let req = Request::write(p.src.addr(), 64, p.dst.segment(), 0);
    assert!(matches!(
        p.initiator.submit(PeerId(999), &[req]),
        Err(Error::UnknownPeer { peer: 999 })
    ));
    let bad_seg = Request::write(p.src.addr(), 64, SegmentId(4242), 0);
    assert!(matches!(
        p.initiator.submit(p.peer, &[bad_seg]),
        Err(Error::UnknownSegment { segment: 4242 })
    ));
    assert!(matches!(
        p.initiator.poll(kvtransfer::BatchId(77)),
        Err(Error::UnknownBatch { batch: 77 })
    ));
    untouched(&p);
}

#[test]
fn segment_registered_after_connect_is_found() {
    let p = pair();
    let late = p.target.alloc(4096).unwrap();
    p.initiator
        .transfer_sync(
            p.peer,
            &[Request::write(p.src.addr(), 4096, late.segment(), 0)],
        )
        .unwrap();
    assert_eq!(late.to_vec(), vec![0xAB; 4096]);
}

#[test]
fn stale_remote_segment_is_refused_by_the_target() {
    let p = pair();
    let victim = p.target.alloc(4096).unwrap();
    let seg = victim.segment();
    p.initiator.refresh_segments(p.peer).unwrap();
    drop(victim); // unregistered at the target; the initiator's table is now stale
    let e = p
        .initiator
        .transfer_sync(p.peer, &[Request::write(p.src.addr(), 4096, seg, 0)])
        .unwrap_err();
    match e {
        Error::BatchFailed { reason, .. } => {
            assert!(reason.contains("unknown segment"), "{reason}")
        }
        other => panic!("expected BatchFailed, got {other}"),
    }
    untouched(&p);
}

#[test]
fn busy_segment_cannot_be_unregistered() {
    let p = pair();
    let id = p
        .initiator
        .submit(
            p.peer,
            &[Request::write(p.src.addr(), 1 << 16, p.dst.segment(), 0)],
        )
        .unwrap();
    // Either the batch is still in flight (refused) or already done (then unregistering works).
    match p.initiator.unregister_memory(p.src.segment()) {
        Err(Error::SegmentBusy { .. }) => {
            p.initiator.wait(id).unwrap();
            p.initiator.unregister_memory(p.src.segment()).unwrap();
        }
        Ok(()) => p.initiator.wait(id).unwrap(),
        Err(e) => panic!("{e}"),
    }
    assert!(matches!(
        p.initiator.unregister_memory(p.src.segment()),
        Err(Error::UnknownSegment { .. })
    ));
}

#[test]
fn registration_rules() {
    let e = engine();
    let mut mem = vec![0u8; 8192];
    let base = mem.as_mut_ptr();
    // SAFETY: `mem` outlives the registrations, which are removed before it is dropped.
    let a = unsafe { e.register_memory(base, 4096) }.unwrap();
    // SAFETY: as above.
    let overlap = unsafe { e.register_memory(base.wrapping_add(100), 4096) };
    assert!(
        matches!(overlap, Err(Error::OverlappingRegistration { existing, .. }) if existing == a.id.0)
    );
    // SAFETY: as above.
    let zero = unsafe { e.register_memory(base, 0) };
    assert!(matches!(zero, Err(Error::ZeroLength { .. })));
    // SAFETY: as above; adjacent, not overlapping.
    let b = unsafe { e.register_memory(base.wrapping_add(4096), 4096) }.unwrap();
    e.unregister_memory(a.id).unwrap();
    e.unregister_memory(b.id).unwrap();
}

/// Reads a whole refusal and the end of stream after it; returns its text.
fn refusal(s: &mut TcpStream) -> String {
    use kvtransfer::wire::{MsgKind, decode_refusal, next_message};
    let mut rx = Vec::new();
    s.read_to_end(&mut rx).unwrap();
    let (kind, body, used) = next_message(&rx, &[MsgKind::Refuse], 512).unwrap().unwrap();
    assert_eq!(
        (kind, used),
        (MsgKind::Refuse, rx.len()),
        "a refusal, then the end"
    );
    decode_refusal(body).unwrap().text
}

#[test]
fn malformed_handshake_from_a_client_is_rejected_and_the_engine_keeps_serving() {
    let p = pair();
    let mut s = TcpStream::connect(p.target.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // The engine answers with a refusal that says why, then closes.
    let why = refusal(&mut s);
    assert!(why.contains("bad magic"), "{why}");
    // A correct handshake but another protocol version is refused too.
    let mut s = TcpStream::connect(p.target.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut pre = Vec::new();
    pre.extend_from_slice(&kvtransfer::wire::MAGIC.to_le_bytes());
    pre.extend_from_slice(&(kvtransfer::wire::PROTOCOL_VERSION + 1).to_le_bytes());
    pre.extend_from_slice(&1u16.to_le_bytes());
    pre.extend_from_slice(&0u32.to_le_bytes());
    s.write_all(&pre).unwrap();
    let why = refusal(&mut s);
    assert!(why.contains("unsupported protocol version"), "{why}");
    // Existing peers still work.
    p.initiator
        .transfer_sync(
            p.peer,
            &[Request::write(p.src.addr(), 64, p.dst.segment(), 0)],
        )
        .unwrap();
    assert_eq!(p.dst.to_vec()[..64], [0xAB; 64]);
}

#[test]
fn malformed_handshake_from_a_server_is_a_protocol_error() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
    });
    let e = engine().connect(addr).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Protocol(kvtransfer::wire::WireError::BadMagic { .. })
        ),
        "{e}"
    );
    fake.join().unwrap();
}

#[test]
fn connecting_to_nothing_fails_cleanly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    assert!(matches!(
        engine().connect(addr),
        Err(Error::Io {
            call: "connect",
            ..
        })
    ));
}

#[test]
fn rails_apply_to_rdma_engines_only() {
    let e = TransferEngine::new(
        EngineConfig::builder()
            .transport(kvtransfer::TransportKind::Tcp)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(e.rails().is_empty());
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` outlives the engine; the call fails before registering anything.
    let r = unsafe { e.register_memory_on_rails(buf.as_mut_ptr(), buf.len(), &[0]) };
    assert!(
        matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains("RDMA")),
        "{r:?}"
    );
}
