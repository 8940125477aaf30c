//! Without a cluster secret anyone can learn a prefill engine's id and epoch (a probe says
//! them) and open a connection to the decode engine claiming them. Its completions must not
//! finish a room: they come over a connection that did not present the link token the decode
//! handed its prefill over their KV channel.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use kvtransfer::kv::{KvPoll, KvReceiver, KvRole, KvSender};
use kvtransfer::wire::{ConnPurpose, FRAME_HEADER_LEN, FrameHeader, FrameOp};

#[test]
fn a_forged_completion_finishes_no_room() {
    let mut src: Vec<u8> = (0..4 * 4096).map(|i| (i % 251) as u8 + 1).collect();
    let mut dst = vec![0u8; 4 * 4096];
    let prefill = common::kv_manager(KvRole::Prefill, None, &mut src);
    let decode = common::kv_manager(KvRole::Decode, None, &mut dst);
    let sender = KvSender::new(&prefill, 11).unwrap();
    let receiver = KvReceiver::new(&decode, prefill.bootstrap_addr(), 11).unwrap();
    receiver.init(&[0, 1, 2, 3], None).unwrap();
    common::wait_until("pairing", || {
        sender.poll() == KvPoll::WaitingForInput && receiver.poll() == KvPoll::WaitingForInput
    });

    // The stranger: the prefill's identity from a probe, then a data connection to the
    // decode engine that claims it.
    let who = decode
        .engine()
        .probe(prefill.bootstrap_addr(), None)
        .unwrap();
    let mut s = TcpStream::connect(decode.bootstrap_addr()).unwrap();
    let hello = common::tcp_hello(who.engine_id, who.epoch, ConnPurpose::TcpData);
    common::raw_handshake(&mut s, hello, None).unwrap();
    // "Last chunk of the room in slot N" for every slot the decode may have used, each
    // announcing itself as the only part.
    let mut frames = Vec::new();
    for slot in 0..64u64 {
        let tag = (slot << 9 | 1 << 8) << 8 | 1;
        frames.extend_from_slice(
            &FrameHeader {
                op: FrameOp::Notify,
                flags: 0,
                status: 0,
                segment: 0,
                batch: 1,
                offset: 0,
                len: 0,
                tag,
            }
            .encode(),
        );
    }
    // Then a request the engine answers: once its answer is back, every frame before it on
    // this connection has been handled.
    frames.extend_from_slice(
        &FrameHeader {
            op: FrameOp::SegmentsRequest,
            flags: 0,
            status: 0,
            segment: 0,
            batch: 2,
            offset: 0,
            len: 0,
            tag: 0,
        }
        .encode(),
    );
    s.write_all(&frames).unwrap();
    let mut header = [0u8; FRAME_HEADER_LEN];
    s.read_exact(&mut header).unwrap();
    let reply = FrameHeader::decode(&header).unwrap();
    assert_eq!(reply.op, FrameOp::SegmentsResponse);
    assert_eq!(
        receiver.poll(),
        KvPoll::WaitingForInput,
        "a forged completion finished the room with no byte landed"
    );

    // The real prefill still completes it, every byte in place.
    sender.init(4, None).unwrap();
    sender.send(&[0, 1, 2, 3], true).unwrap();
    common::wait_until("success", || receiver.poll() == KvPoll::Success);
    assert!(dst == src);
}
