//! A hostile decode manager on a real KV channel: what it can make a prefill hold is bounded.
//! It parks 48 destinations of 4Mi pages each (the attack, which once held 820 MB):
//! one fits its channel's page cap, the rest are rejected, the prefill's memory stays small,
//! and a legitimate decode manager is served beside it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kvtransfer::kv::proto::KvMessage;
use kvtransfer::kv::{KvBuffer, KvLayout, KvPoll, KvReceiver, KvRole, KvSender};
use kvtransfer::wire::ConnPurpose;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Reads KV messages from `s` until `n` rejections arrived; returns how many were read.
fn read_rejections(s: &mut TcpStream, n: usize) -> usize {
    let mut rx = Vec::new();
    let mut rejected = 0;
    let mut buf = [0u8; 64 << 10];
    while rejected < n {
        let got = s.read(&mut buf).unwrap();
        assert!(got > 0, "the prefill closed the channel");
        rx.extend_from_slice(&buf[..got]);
        while let Some(prefix) = rx.first_chunk::<4>() {
            let len = KvMessage::decode_len(*prefix).unwrap();
            if rx.len() < 4 + len {
                break;
            }
            let msg = KvMessage::decode(&rx[4..4 + len]).unwrap();
            rejected += matches!(msg, KvMessage::RoomRejected { .. }) as usize;
            rx.drain(..4 + len);
        }
    }
    rejected
}

#[test]
fn a_decode_that_parks_huge_destinations_is_capped_and_others_are_served() {
    let mut src: Vec<u8> = (0..4 * 4096).map(|i| (i % 249) as u8 + 1).collect();
    let mut dst = vec![0u8; 4 * 4096];
    let prefill = common::kv_manager(KvRole::Prefill, None, &mut src);
    let decode = common::kv_manager(KvRole::Decode, None, &mut dst);
    let before = rss_kib();

    // The hostile decode: a KV channel by hand, with a layout of 4Mi pages.
    let mut s = TcpStream::connect(prefill.bootstrap_addr()).unwrap();
    let me = common::tcp_hello(0xbad, 1, ConnPurpose::Kv);
    common::raw_handshake(&mut s, me, None).unwrap();
    let pages = 4usize << 20;
    let layout = KvLayout::new(
        vec![KvBuffer {
            addr: 1 << 40,
            len: (pages * 4096) as u64,
            item_len: 4096,
        }],
        Vec::new(),
    )
    .unwrap();
    let port = s.local_addr().unwrap().port();
    let hello = KvMessage::Hello {
        engine_id: 0xbad,
        epoch: 1,
        engine_addr: format!("0.0.0.0:{port}"),
        layout,
        link: 1,
    };
    s.write_all(&hello.encode()).unwrap();
    let all: Vec<i32> = (0..pages as i32).collect();
    let rooms = 48;
    for room in 0..rooms {
        let init = KvMessage::RoomInit {
            room: 1_000_000 + room,
            slot: room as u32,
            aux_index: None,
            pages: all.clone(),
            digests: false,
        };
        s.write_all(&init.encode()).unwrap();
    }
    drop(all);
    // Every one but the first is rejected (its channel holds at most 4Mi parked pages).
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(
        read_rejections(&mut s, rooms as usize - 1),
        rooms as usize - 1
    );
    let held = rss_kib();
    eprintln!(
        "{rooms} destinations of {pages} pages parked by a hostile decode: RSS {before} -> \
         {held} KiB"
    );
    // One parked destination is 16 MiB of page numbers; the 47 others cost nothing kept.
    assert!(held < before + 96 * 1024, "RSS {before} -> {held} KiB");

    // A legitimate room is served beside it.
    let sender = KvSender::new(&prefill, 5).unwrap();
    let receiver = KvReceiver::new(&decode, prefill.bootstrap_addr(), 5).unwrap();
    receiver.init(&[1, 0, 3, 2], None).unwrap();
    common::wait_until("pairing", || sender.poll() == KvPoll::WaitingForInput);
    sender.init(4, None).unwrap();
    sender.send(&[0, 1, 2, 3], true).unwrap();
    common::wait_until("success", || receiver.poll() == KvPoll::Success);
    for (d, from) in [(1, 0), (0, 1), (3, 2), (2, 3)] {
        assert!(dst[d * 4096..(d + 1) * 4096] == src[from * 4096..(from + 1) * 4096]);
    }
}
