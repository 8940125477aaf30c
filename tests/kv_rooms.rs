//! KV rooms over TCP: real engines, real sockets, every byte verified.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvtransfer::kv::{
    FailureKind, KvBuffer, KvConfig, KvLayout, KvManager, KvPoll, KvReceiver, KvRole, KvSender,
};
use kvtransfer::{EngineConfig, Error, TransportKind};

/// One manager and the memory its layout points into (dropped after the manager).
struct Side {
    mgr: KvManager,
    layers: usize,
    pages: usize,
    item: usize,
    aux_item: usize,
    mem: Vec<u8>,
    aux: Vec<u8>,
}

impl Side {
    fn new(role: KvRole, layers: usize, pages: usize, item: usize, cfg: KvConfig) -> Side {
        let aux_item = 64;
        let aux_slots = 8;
        let mut mem = vec![0u8; layers * pages * item];
        let mut aux = vec![0u8; aux_slots * aux_item];
        let base = mem.as_mut_ptr() as u64;
        let buffers = (0..layers)
            .map(|l| KvBuffer {
                addr: base + (l * pages * item) as u64,
                len: (pages * item) as u64,
                item_len: item as u64,
            })
            .collect();
        let aux_buf = vec![KvBuffer {
            addr: aux.as_mut_ptr() as u64,
            len: aux.len() as u64,
            item_len: aux_item as u64,
        }];
        let layout = KvLayout::new(buffers, aux_buf).unwrap();
        let engine = EngineConfig::builder()
            .transport(TransportKind::Tcp)
            .build()
            .unwrap();
        let cfg = KvConfig { role, ..cfg };
        // SAFETY: `mem` and `aux` live in the same struct and are dropped after `mgr`; their
        // heap buffers never move.
        let mgr = unsafe { KvManager::new(engine, cfg, layout).unwrap() };
        Side {
            mgr,
            layers,
            pages,
            item,
            aux_item,
            mem,
            aux,
        }
    }

    fn page(&self, layer: usize, page: usize) -> &[u8] {
        let at = (layer * self.pages + page) * self.item;
        &self.mem[at..at + self.item]
    }

    /// Fills every page with bytes derived from (layer, page, offset) and aux slots likewise.
    fn fill(&mut self) {
        for l in 0..self.layers {
            for p in 0..self.pages {
                let at = (l * self.pages + p) * self.item;
                let seed = (l * 7919 + p * 104_729) as u64;
                for (i, chunk) in self.mem[at..at + self.item].chunks_mut(8).enumerate() {
                    let v = seed
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .wrapping_add(i as u64);
                    chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
                }
            }
        }
        for (i, b) in self.aux.iter_mut().enumerate() {
            *b = (i * 31 + 5) as u8;
        }
    }

    fn aux_slot(&self, slot: usize) -> &[u8] {
        &self.aux[slot * self.aux_item..(slot + 1) * self.aux_item]
    }

    fn is_untouched(&self) -> bool {
        self.mem.iter().all(|&b| b == 0) && self.aux.iter().all(|&b| b == 0)
    }
}

fn cfg() -> KvConfig {
    KvConfig::new(KvRole::Prefill)
        .room_timeout(Duration::from_secs(30))
        .abort_timeout(Duration::from_secs(5))
}

/// Scattered, partly contiguous page lists: runs of 1..=5 pages at shuffled places.
fn scattered(n: usize, pool: usize, seed: u64) -> Vec<i32> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut used = vec![false; pool];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let run = (next() % 5 + 1) as usize;
        let start = (next() % pool as u64) as usize;
        let end = (start + run).min(pool);
        for (p, taken) in used.iter_mut().enumerate().take(end).skip(start) {
            if out.len() < n && !*taken {
                *taken = true;
                out.push(p as i32);
            }
        }
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

fn wait_state(poll: impl Fn() -> KvPoll, want: KvPoll, limit: Duration) {
    wait_for(&format!("{want:?}"), limit, || poll() == want);
}

#[test]
fn deepseek_room_moves_in_four_chunks_and_succeeds_only_when_complete() {
    let (layers, pool, item, n) = (61, 300, 36 << 10, 256);
    let mut prefill = Side::new(KvRole::Prefill, layers, pool, item, cfg());
    let decode = Side::new(KvRole::Decode, layers, pool, item, cfg());
    prefill.fill();
    let src = scattered(n, pool, 11);
    let dst = scattered(n, pool, 23);
    assert!(
        src.windows(2).any(|w| w[1] == w[0] + 1) && src.windows(2).any(|w| w[1] != w[0] + 1),
        "pages are partly contiguous, partly scattered"
    );

    let receiver = KvReceiver::new(&decode.mgr, prefill.mgr.bootstrap_addr(), 7).unwrap();
    assert_eq!(receiver.poll(), KvPoll::Bootstrapping);
    receiver.init(&dst, Some(3)).unwrap();
    let sender = KvSender::new(&prefill.mgr, 7).unwrap();
    wait_state(
        || sender.poll(),
        KvPoll::WaitingForInput,
        Duration::from_secs(10),
    );
    sender.init(n, Some(5)).unwrap();
    wait_state(
        || receiver.poll(),
        KvPoll::WaitingForInput,
        Duration::from_secs(10),
    );

    let started = Instant::now();
    for (i, chunk) in src.chunks(n / 4).enumerate() {
        sender.send(chunk, i == 3).unwrap();
    }
    // The first time the receiver reports Success, every byte and aux must be in place.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match receiver.poll() {
            KvPoll::Success => break,
            KvPoll::Failed => panic!("receiver failed: {:?}", receiver.failure_reason()),
            _ => assert!(Instant::now() < until, "no Success"),
        }
        sender.poll();
    }
    let took = started.elapsed();
    for l in 0..layers {
        for (s, d) in src.iter().zip(&dst) {
            assert!(
                decode.page(l, *d as usize) == prefill.page(l, *s as usize),
                "layer {l}: page {s} -> {d} differs"
            );
        }
    }
    assert_eq!(decode.aux_slot(3), prefill.aux_slot(5), "aux landed");
    // Nothing outside the destination pages was written.
    let mut untouched = vec![true; pool];
    for d in &dst {
        untouched[*d as usize] = false;
    }
    for l in [0, layers / 2, layers - 1] {
        for p in (0..pool).filter(|p| untouched[*p]) {
            assert!(
                decode.page(l, p).iter().all(|&b| b == 0),
                "page {p} of layer {l} written"
            );
        }
    }
    wait_state(|| sender.poll(), KvPoll::Success, Duration::from_secs(10));
    let bytes = (layers * n * item) as u64;
    let m = sender.metrics();
    assert_eq!(m.bytes, bytes + 64);
    assert!(
        m.slices >= layers as u64 * 4 && m.slices < (layers * n) as u64,
        "{m:?}"
    );
    assert!(
        m.queued_to_first_write.is_some() && m.transfer_span.is_some(),
        "{m:?}"
    );
    let r = receiver.metrics();
    assert_eq!(r.bytes, bytes + 64);
    assert_eq!(r.slices, 4, "four chunks notified");
    assert!(r.transfer_span.is_some());
    eprintln!(
        "61x256x36KiB room: {:.2} GB/s ({} writes after expansion, {took:?})",
        bytes as f64 / took.as_secs_f64() / 1e9,
        m.slices
    );
}

#[test]
fn sender_created_first_and_empty_last_chunk() {
    let mut prefill = Side::new(KvRole::Prefill, 2, 16, 4096, cfg());
    let decode = Side::new(KvRole::Decode, 2, 16, 4096, cfg());
    prefill.fill();
    let sender = KvSender::new(&prefill.mgr, 1).unwrap();
    sender.init(3, Some(0)).unwrap();
    assert_eq!(sender.poll(), KvPoll::Bootstrapping);
    assert!(matches!(
        sender.send(&[1], false),
        Err(Error::RoomState {
            state: "Bootstrapping",
            ..
        })
    ));
    let receiver = KvReceiver::new(&decode.mgr, prefill.mgr.bootstrap_addr(), 1).unwrap();
    receiver.init(&[9, 10, 2], Some(1)).unwrap();
    wait_state(
        || sender.poll(),
        KvPoll::WaitingForInput,
        Duration::from_secs(10),
    );
    sender.send(&[4, 5, 6], false).unwrap();
    sender.send(&[], true).unwrap();
    wait_state(|| receiver.poll(), KvPoll::Success, Duration::from_secs(10));
    for l in 0..2 {
        for (s, d) in [(4, 9), (5, 10), (6, 2)] {
            assert_eq!(decode.page(l, d), prefill.page(l, s));
        }
    }
    assert_eq!(decode.aux_slot(1), prefill.aux_slot(0));

    // The prefill engine's peer belongs to the KV channel: it goes when the decode side does.
    assert_eq!(prefill.mgr.engine().peers().len(), 1);
    drop(receiver);
    drop(decode);
    wait_for(
        "the prefill engine to let go of the decode peer",
        Duration::from_secs(10),
        || prefill.mgr.engine().peers().is_empty(),
    );
}

#[test]
fn bad_pages_and_counts_are_refused_and_nothing_is_written() {
    let mut prefill = Side::new(KvRole::Prefill, 2, 16, 4096, cfg());
    let decode = Side::new(KvRole::Decode, 2, 16, 4096, cfg());
    prefill.fill();
    let addr = prefill.mgr.bootstrap_addr();

    let r = KvReceiver::new(&decode.mgr, addr, 1).unwrap();
    let code = |e: Error| e.code();
    assert_eq!(
        code(r.init(&[0, -1], None).unwrap_err()),
        28,
        "negative page"
    );
    assert_eq!(code(r.init(&[16], None).unwrap_err()), 28, "out of range");
    assert_eq!(
        code(r.init(&[3, 3], None).unwrap_err()),
        28,
        "duplicate destination"
    );
    assert_eq!(
        code(r.init(&[3], Some(8)).unwrap_err()),
        28,
        "aux out of range"
    );
    assert!(
        matches!(
            KvReceiver::new(&decode.mgr, addr, 1),
            Err(Error::DuplicateRoom { room: 1 })
        ),
        "duplicate room in one manager"
    );
    r.init(&[1, 2, 3], None).unwrap();
    assert!(
        matches!(r.init(&[4], None), Err(Error::RoomState { .. })),
        "init twice"
    );

    let s = KvSender::new(&prefill.mgr, 1).unwrap();
    assert!(matches!(
        KvSender::new(&prefill.mgr, 1),
        Err(Error::DuplicateRoom { room: 1 })
    ));
    wait_state(
        || s.poll(),
        KvPoll::WaitingForInput,
        Duration::from_secs(10),
    );
    assert!(
        matches!(s.send(&[1], false), Err(Error::RoomState { .. })),
        "send before init"
    );
    // Mismatched page counts: the receiver named 3.
    let e = s.init(4, None).unwrap_err();
    assert!(matches!(e, Error::InvalidPages { .. }), "{e}");
    assert_eq!(s.poll(), KvPoll::Failed);
    assert!(s.failure_reason().unwrap().contains("page count mismatch"));
    wait_state(|| r.poll(), KvPoll::Failed, Duration::from_secs(10));

    // Bad source pages on a good room.
    let r2 = KvReceiver::new(&decode.mgr, addr, 2).unwrap();
    r2.init(&[5, 6], None).unwrap();
    let s2 = KvSender::new(&prefill.mgr, 2).unwrap();
    s2.init(2, None).unwrap();
    wait_state(
        || s2.poll(),
        KvPoll::WaitingForInput,
        Duration::from_secs(10),
    );
    assert_eq!(code(s2.send(&[-3], false).unwrap_err()), 28);
    assert_eq!(code(s2.send(&[1, 99], false).unwrap_err()), 28);
    assert_eq!(
        code(s2.send(&[1, 2, 3], false).unwrap_err()),
        28,
        "more than the room"
    );
    assert_eq!(
        code(s2.send(&[1], true).unwrap_err()),
        28,
        "last chunk too short"
    );
    assert_eq!(
        s2.poll(),
        KvPoll::WaitingForInput,
        "refusals leave the room as it was"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(decode.is_untouched(), "nothing was written");

    // A second decode manager asking for the same room at the same prefill is rejected.
    let other = Side::new(KvRole::Decode, 2, 16, 4096, cfg());
    let r3 = KvReceiver::new(&decode.mgr, addr, 3).unwrap();
    r3.init(&[1], None).unwrap();
    let dup = KvReceiver::new(&other.mgr, addr, 3).unwrap();
    dup.init(&[1], None).unwrap();
    wait_state(|| dup.poll(), KvPoll::Failed, Duration::from_secs(10));
    assert!(
        dup.failure_reason().unwrap().contains("already exists"),
        "{:?}",
        dup.failure_reason()
    );
    assert!(other.is_untouched() && decode.is_untouched());
}

#[test]
fn layouts_that_do_not_pair_are_refused() {
    let prefill = Side::new(KvRole::Prefill, 2, 16, 4096, cfg());
    let decode = Side::new(KvRole::Decode, 2, 16, 8192, cfg());
    let s = KvSender::new(&prefill.mgr, 1).unwrap();
    let r = KvReceiver::new(&decode.mgr, prefill.mgr.bootstrap_addr(), 1).unwrap();
    // Creating the receiver does not wait for the channel; the mismatch shows once it opens,
    // on both sides, long before any room timeout.
    wait_state(|| r.poll(), KvPoll::Failed, Duration::from_secs(10));
    let f = r.failure().unwrap();
    assert_eq!(f.kind, FailureKind::LayoutMismatch, "{f}");
    assert!(f.text.contains("KV layout mismatch"), "{f}");
    wait_state(|| s.poll(), KvPoll::Failed, Duration::from_secs(10));
    assert_eq!(s.failure().unwrap().kind, FailureKind::LayoutMismatch);
    assert!(matches!(
        r.init(&[1], None),
        Err(Error::RoomState {
            state: "Failed",
            ..
        })
    ));
}

#[test]
fn deadlines_fail_rooms_with_a_reason() {
    let short = cfg().room_timeout(Duration::from_millis(300));
    let prefill = Side::new(KvRole::Prefill, 1, 8, 4096, short.clone());
    let decode = Side::new(KvRole::Decode, 1, 8, 4096, short);
    // No sender ever comes: the prefill side rejects the unknown room, or the deadline hits.
    let r = KvReceiver::new(&decode.mgr, prefill.mgr.bootstrap_addr(), 5).unwrap();
    r.init(&[1], None).unwrap();
    // No receiver ever comes.
    let s = KvSender::new(&prefill.mgr, 6).unwrap();
    let start = Instant::now();
    wait_state(|| r.poll(), KvPoll::Failed, Duration::from_secs(5));
    wait_state(|| s.poll(), KvPoll::Failed, Duration::from_secs(5));
    assert!(start.elapsed() >= Duration::from_millis(250));
    let why = r.failure_reason().unwrap();
    assert!(
        why.contains("unknown room 5") || why.contains("deadline"),
        "{why}"
    );
    assert!(
        s.failure_reason()
            .unwrap()
            .contains("deadline of 300 ms exceeded while Bootstrapping")
    );
    assert_eq!(r.poll(), KvPoll::Failed, "Failed is sticky");
}

/// A room big enough to still be moving when it is aborted.
fn big_room(prefill: &Side, decode: &Side, room: u64) -> (KvSender, KvReceiver) {
    let n = prefill.pages;
    let r = KvReceiver::new(&decode.mgr, prefill.mgr.bootstrap_addr(), room).unwrap();
    r.init(&(0..n as i32).rev().collect::<Vec<_>>(), None)
        .unwrap();
    let s = KvSender::new(&prefill.mgr, room).unwrap();
    s.init(n, None).unwrap();
    wait_state(
        || s.poll(),
        KvPoll::WaitingForInput,
        Duration::from_secs(10),
    );
    let pages: Vec<i32> = (0..n as i32).collect();
    for (i, c) in pages.chunks(n / 8).enumerate() {
        s.send(c, i == 7).unwrap();
    }
    (s, r)
}

/// After an abort returned, the receiver's memory must not change any more.
fn assert_frozen(decode: &Side) {
    let before = decode.mem.clone();
    let pages = before
        .chunks(decode.item)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count();
    eprintln!(
        "at abort: {pages} of {} pages written",
        before.len() / decode.item
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        before == decode.mem,
        "a write landed after the abort returned"
    );
}

#[test]
fn sender_abort_stops_every_write_before_it_returns() {
    let mut prefill = Side::new(KvRole::Prefill, 8, 512, 32 << 10, cfg());
    let decode = Side::new(KvRole::Decode, 8, 512, 32 << 10, cfg());
    prefill.fill();
    let (s, r) = big_room(&prefill, &decode, 1);
    // Abort mid-room: once the first chunk has landed.
    wait_state(|| r.poll(), KvPoll::Transferring, Duration::from_secs(10));
    s.abort().unwrap();
    assert_frozen(&decode);
    assert_eq!(s.poll(), KvPoll::Failed);
    assert!(
        s.failure_reason()
            .unwrap()
            .contains("aborted by the sender")
    );
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match r.poll() {
            KvPoll::Failed => break,
            KvPoll::Success => break, // the room had already landed completely
            _ => assert!(
                Instant::now() < until,
                "receiver never learned of the abort"
            ),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if r.poll() == KvPoll::Failed {
        assert!(
            r.failure_reason()
                .unwrap()
                .contains("aborted by the sender")
        );
    }
}

#[test]
fn receiver_abort_stops_every_write_before_it_returns() {
    let mut prefill = Side::new(KvRole::Prefill, 8, 512, 32 << 10, cfg());
    let decode = Side::new(KvRole::Decode, 8, 512, 32 << 10, cfg());
    prefill.fill();
    let (s, r) = big_room(&prefill, &decode, 1);
    wait_state(|| r.poll(), KvPoll::Transferring, Duration::from_secs(10));
    r.abort().unwrap();
    assert_eq!(r.poll(), KvPoll::Failed);
    assert!(
        r.failure_reason()
            .unwrap()
            .contains("aborted by the receiver")
    );
    assert_frozen(&decode);
    wait_state(|| s.poll(), KvPoll::Failed, Duration::from_secs(10));
    let why = s.failure_reason().unwrap();
    assert!(
        why.contains("aborted by the receiver") || why.contains("aborted"),
        "{why}"
    );
    // The managers keep serving new rooms.
    let (s2, r2) = big_room(&prefill, &decode, 2);
    wait_state(|| r2.poll(), KvPoll::Success, Duration::from_secs(30));
    wait_state(|| s2.poll(), KvPoll::Success, Duration::from_secs(30));
}

// ---- peers that die ----------------------------------------------------------------------

const CHILD_ENV: &str = "KVT_KV_TEST_CHILD";

/// Runs the other side of a room in a child process (this test binary, `child_side` test).
fn spawn_child(role: &str, peer: Option<std::net::SocketAddr>) -> (Child, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_side",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, role)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(p) = peer {
        cmd.env("KVT_KV_TEST_PEER", p.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = loop {
        let l = lines.next().expect("child said nothing").unwrap();
        // libtest prints "test child_side ... " before the child's own output on that line.
        if let Some(at) = l.find("KVT-CHILD ") {
            break l[at + "KVT-CHILD ".len()..].trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, line)
}

/// The child side: `decode` creates room 9 against the parent's prefill and waits; `prefill`
/// serves room 9 and sends half of it, then waits to be killed.
#[test]
#[ignore = "entry point of the child process of the peer-death tests"]
fn child_side() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let layers = 4;
    match role.as_str() {
        "decode" => {
            let d = Side::new(KvRole::Decode, layers, 256, 32 << 10, cfg());
            let peer = std::env::var("KVT_KV_TEST_PEER").unwrap();
            let r = KvReceiver::new(&d.mgr, peer.as_str(), 9).unwrap();
            r.init(&(0..256).collect::<Vec<_>>(), None).unwrap();
            println!("KVT-CHILD ready");
            std::thread::sleep(Duration::from_secs(120));
        }
        "prefill" => {
            let mut p = Side::new(KvRole::Prefill, layers, 256, 32 << 10, cfg());
            p.fill();
            println!("KVT-CHILD {}", p.mgr.bootstrap_addr());
            let s = KvSender::new(&p.mgr, 9).unwrap();
            s.init(256, None).unwrap();
            wait_state(
                || s.poll(),
                KvPoll::WaitingForInput,
                Duration::from_secs(30),
            );
            s.send(&(0..128).collect::<Vec<_>>(), false).unwrap();
            std::thread::sleep(Duration::from_secs(120));
        }
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn receiver_process_killed_mid_room_fails_the_sender() {
    let mut prefill = Side::new(KvRole::Prefill, 4, 256, 32 << 10, cfg());
    prefill.fill();
    let s = KvSender::new(&prefill.mgr, 9).unwrap();
    s.init(256, None).unwrap();
    let (mut child, _) = spawn_child("decode", Some(prefill.mgr.bootstrap_addr()));
    wait_state(
        || s.poll(),
        KvPoll::WaitingForInput,
        Duration::from_secs(30),
    );
    s.send(&(0..128).collect::<Vec<_>>(), false).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    wait_state(|| s.poll(), KvPoll::Failed, Duration::from_secs(20));
    let why = s.failure_reason().unwrap();
    // Whichever side of the connection noticed first: the reader (closed, reset) or a write
    // in progress (`peer <addr> (epoch …) lost: send failed: Broken pipe`).
    assert!(
        why.contains("peer lost")
            || why.contains(") lost: ")
            || why.contains("closed")
            || why.contains("reset"),
        "{why}"
    );
    eprintln!("sender failed {:?} after the kill: {why}", killed.elapsed());
    // Later sends are refused, and the manager still serves other peers.
    assert!(s.send(&(128..256).collect::<Vec<_>>(), true).is_err());
}

#[test]
fn sender_process_killed_mid_room_fails_the_receiver() {
    let decode = Side::new(KvRole::Decode, 4, 256, 32 << 10, cfg());
    let (mut child, addr) = spawn_child("prefill", None);
    let r = KvReceiver::new(&decode.mgr, addr.as_str(), 9).unwrap();
    r.init(&(0..256).collect::<Vec<_>>(), None).unwrap();
    wait_for("first chunk", Duration::from_secs(30), || {
        r.poll() == KvPoll::Transferring
    });
    child.kill().unwrap();
    child.wait().unwrap();
    wait_state(|| r.poll(), KvPoll::Failed, Duration::from_secs(20));
    let why = r.failure_reason().unwrap();
    assert!(why.contains("peer lost"), "{why}");
}

/// A destination arriving while its sender is being created must pair with it (a lost
/// hand-off left both sides in Bootstrapping until their deadline).
#[test]
fn rooms_pair_however_receiver_and_sender_creation_interleave() {
    let mut prefill = Side::new(KvRole::Prefill, 1, 8, 4096, cfg());
    let decode = Side::new(KvRole::Decode, 1, 8, 4096, cfg());
    prefill.fill();
    let addr = prefill.mgr.bootstrap_addr();
    for room in 0..300u64 {
        let r = KvReceiver::new(&decode.mgr, addr, room).unwrap();
        r.init(&[(room % 8) as i32], None).unwrap();
        if room % 3 == 1 {
            std::thread::sleep(Duration::from_micros(room % 50));
        }
        let s = KvSender::new(&prefill.mgr, room).unwrap();
        s.init(1, None).unwrap();
        wait_state(
            || s.poll(),
            KvPoll::WaitingForInput,
            Duration::from_secs(10),
        );
        s.send(&[(room % 8) as i32], true).unwrap();
        wait_state(|| r.poll(), KvPoll::Success, Duration::from_secs(10));
    }
}
