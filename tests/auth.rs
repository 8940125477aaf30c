//! The cluster secret: engines and KV managers that share it work as before; a peer without
//! it, or with another one, is refused with `Unauthenticated` (code 35) before it learns any
//! segment, and the refusal is counted and logged on the other side.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use kvtransfer::kv::{FailureKind, KvPoll, KvReceiver, KvRole, KvSender};
use kvtransfer::wire::ConnPurpose;
use kvtransfer::{EngineConfig, Error, Request, TransferEngine, TransportKind};

const SECRET: &str = "the cluster secret, 32 bytes....";
const OTHER: &str = "another secret of 32 bytes......";

fn config(secret: Option<&str>) -> EngineConfig {
    kvtransfer::init_logging("error");
    let mut b = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .connect_timeout(Duration::from_secs(5));
    if let Some(s) = secret {
        b = b.secret(s);
    }
    b.build().unwrap()
}

fn engine(secret: Option<&str>) -> TransferEngine {
    TransferEngine::new(config(secret)).unwrap()
}

#[test]
fn engines_that_share_the_secret_move_bytes() {
    let target = engine(Some(SECRET));
    let initiator = engine(Some(SECRET));
    let dst = target.alloc(1 << 20).unwrap();
    let src = initiator.alloc(1 << 20).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 31 % 251) as u8).collect();
    src.write(0, &data);
    let peer = initiator.connect(target.local_addr()).unwrap();
    initiator
        .transfer_sync(
            peer,
            &[Request::write(src.addr(), 1 << 20, dst.segment(), 0)],
        )
        .unwrap();
    let mut out = vec![0u8; 1 << 20];
    dst.read(0, &mut out);
    assert!(out == data, "every byte arrived");
    assert_eq!(target.refused_connections(), 0);
    assert_eq!(
        initiator.probe(target.local_addr(), None).unwrap().epoch,
        target.epoch()
    );
}

#[test]
fn a_missing_or_different_secret_is_refused_with_code_35_on_both_ends() {
    for (mine, theirs) in [
        (None, Some(SECRET)),
        (Some(SECRET), None),
        (Some(OTHER), Some(SECRET)),
    ] {
        let target = engine(theirs);
        let initiator = engine(mine);
        let e = initiator.connect(target.local_addr()).unwrap_err();
        assert!(
            matches!(e, Error::Unauthenticated { .. }),
            "{mine:?} -> {theirs:?}: {e}"
        );
        assert_eq!(e.code(), 35);
        assert!(initiator.peers().is_empty());
        // The target saw it too (a refusal it sent, or one it was sent).
        common::wait_until("the target's refusal", || target.refused_connections() >= 1);
        let probe = initiator.probe(target.local_addr(), None).unwrap_err();
        assert_eq!(probe.code(), 35, "{probe}");
    }
}

#[test]
fn a_stranger_without_the_secret_learns_no_segment() {
    let target = engine(Some(SECRET));
    let _mem = target.alloc(4096).unwrap();
    let hello = common::tcp_hello(1, 2, ConnPurpose::TcpData);
    let mut s = TcpStream::connect(target.local_addr()).unwrap();
    let why = common::raw_handshake(&mut s, hello.clone(), None).unwrap_err();
    assert!(why.contains("AuthRequired"), "{why}");
    // A wrong secret: the stranger refuses the engine's proof, and never sends its hello.
    let mut s = TcpStream::connect(target.local_addr()).unwrap();
    let why = common::raw_handshake(&mut s, hello.clone(), Some(OTHER.as_bytes())).unwrap_err();
    assert!(why.contains("AuthFailed"), "{why}");
    // With the secret the same stranger code gets the segments: the refusals were the secret's.
    let mut s = TcpStream::connect(target.local_addr()).unwrap();
    let theirs = common::raw_handshake(&mut s, hello, Some(SECRET.as_bytes())).unwrap();
    assert_eq!(theirs.segments.len(), 1);
}

#[test]
fn kv_rooms_need_the_secret_when_the_prefill_holds_one() {
    let mut src = vec![0u8; 4 * 4096];
    for (i, b) in src.iter_mut().enumerate() {
        *b = (i * 7 % 253) as u8;
    }
    let mut dst = vec![0u8; 4 * 4096];
    let mut stranger_mem = vec![0u8; 4 * 4096];
    let prefill = common::kv_manager(KvRole::Prefill, Some(SECRET), &mut src);
    let decode = common::kv_manager(KvRole::Decode, Some(SECRET), &mut dst);
    let stranger = common::kv_manager(KvRole::Decode, None, &mut stranger_mem);

    let sender = KvSender::new(&prefill, 7).unwrap();
    let receiver = KvReceiver::new(&decode, prefill.bootstrap_addr(), 7).unwrap();
    receiver.init(&[3, 2, 1, 0], None).unwrap();
    common::wait_until("the sender to pair", || {
        sender.poll() == KvPoll::WaitingForInput
    });
    sender.init(4, None).unwrap();
    sender.send(&[0, 1, 2, 3], true).unwrap();
    common::wait_until("success", || {
        receiver.poll() == KvPoll::Success && sender.poll() == KvPoll::Success
    });
    for (d, s) in [(3, 0), (2, 1), (1, 2), (0, 3)] {
        assert!(dst[d * 4096..(d + 1) * 4096] == src[s * 4096..(s + 1) * 4096]);
    }

    // A decode manager without the secret cannot even open the channel: its room fails, and
    // says why.
    let r = KvReceiver::new(&stranger, prefill.bootstrap_addr(), 8).unwrap();
    // (The refusal may fail the room before `init`, which then says the room has ended.)
    match r.init(&[0, 1], None) {
        Ok(()) | Err(kvtransfer::Error::RoomState { .. }) => {}
        Err(e) => panic!("{e}"),
    }
    common::wait_until("the stranger's room to fail", || r.poll() == KvPoll::Failed);
    let f = r.failure().unwrap();
    assert!(f.text.contains("AuthRequired"), "{f:?}");
    assert!(
        matches!(f.kind, FailureKind::PeerLost | FailureKind::Rejected),
        "{f:?}"
    );
    assert!(stranger_mem.iter().all(|b| *b == 0));
}
