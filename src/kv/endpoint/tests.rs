//! Two endpoints, one per role, driven against each other on a virtual clock: no sockets, no
//! threads, no sleeps. `Net` plays the drivers and the network between them, and can refuse
//! or hang connects, partition the link, stop the prefill process (SIGSTOP) and restart the
//! decode one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::error::Error;
use crate::kv::layout::{KvBuffer, KvLayout};

const D_ENGINE: (u64, u64) = (1, 10);
const P_ENGINE: (u64, u64) = (2, 20);

fn layout(item_len: u64) -> KvLayout {
    KvLayout::new(
        vec![KvBuffer {
            addr: 0x10000,
            len: 4096 * item_len,
            item_len,
        }],
        vec![KvBuffer {
            addr: 0x9000_0000,
            len: 64 * 16,
            item_len: 64,
        }],
    )
    .unwrap()
}

fn d_addr() -> SocketAddr {
    "10.0.0.2:7000".parse().unwrap()
}
fn p_addr() -> SocketAddr {
    "10.0.0.1:7000".parse().unwrap()
}

/// A prefill endpoint on its own, fed by hand.
fn lone_prefill() -> PrefillEndpoint {
    PrefillEndpoint::new(
        Identity {
            engine_id: P_ENGINE.0,
            epoch: P_ENGINE.1,
            engine_addr: p_addr(),
            layout: layout(4096),
        },
        Timing::default(),
    )
}

/// What the prefill's listener does with a connect.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Listen {
    Answer,
    Refuse,
    Hang,
}

struct Net {
    now: Instant,
    timing: Timing,
    d: DecodeEndpoint,
    d_epoch: u64,
    p: PrefillEndpoint,
    /// decode channel → prefill channel.
    links: HashMap<ConnId, ConnId>,
    next_p: u64,
    listen: Listen,
    data_fails: bool,
    partitioned: bool,
    /// The prefill process is stopped: what reaches it waits here, its timers do not run.
    stopped: bool,
    held: Vec<(ConnId, KvMessage)>,
    /// Chunks posted and not landed yet.
    flying: Vec<(u64, ChunkPlan)>,
    /// The link token the prefill's data path presents (what its ConnectData said).
    data_link: u64,
    /// Chunks the decode asked to verify against their digests.
    verify: Vec<DecodeAction>,
    log: Vec<String>,
}

impl Net {
    fn new() -> Net {
        Net::with(Timing::default(), 4096)
    }

    fn with(timing: Timing, p_item: u64) -> Net {
        let now = Instant::now();
        let d = DecodeEndpoint::new(
            Identity {
                engine_id: D_ENGINE.0,
                epoch: D_ENGINE.1,
                engine_addr: d_addr(),
                layout: layout(4096),
            },
            timing,
            true,
        );
        let p = PrefillEndpoint::new(
            Identity {
                engine_id: P_ENGINE.0,
                epoch: P_ENGINE.1,
                engine_addr: p_addr(),
                layout: layout(p_item),
            },
            timing,
        );
        Net {
            now,
            timing,
            d,
            d_epoch: D_ENGINE.1,
            p,
            links: HashMap::new(),
            next_p: 100,
            listen: Listen::Answer,
            data_fails: false,
            partitioned: false,
            stopped: false,
            held: Vec::new(),
            flying: Vec::new(),
            data_link: 0,
            verify: Vec::new(),
            log: Vec::new(),
        }
    }

    fn p_conn_of(&self, d: ConnId) -> Option<ConnId> {
        self.links.get(&d).copied()
    }

    fn d_conn_of(&self, p: ConnId) -> Option<ConnId> {
        self.links.iter().find(|(_, v)| **v == p).map(|(k, _)| *k)
    }

    /// Runs both drivers until neither has anything to do.
    fn step(&mut self) {
        loop {
            let mut busy = false;
            while let Some(a) = self.d.poll_action() {
                busy = true;
                self.decode_action(a);
            }
            while let Some(t) = self.d.poll_transmit() {
                busy = true;
                if let (false, Some(pc)) = (self.partitioned, self.p_conn_of(t.conn)) {
                    self.held.push((pc, t.msg));
                }
            }
            if !self.stopped {
                for (pc, msg) in std::mem::take(&mut self.held) {
                    busy = true;
                    self.p.handle(pc, msg, self.now);
                }
                while let Some(a) = self.p.poll_action() {
                    busy = true;
                    self.prefill_action(a);
                }
                while let Some(t) = self.p.poll_transmit() {
                    busy = true;
                    if let (false, Some(dc)) = (self.partitioned, self.d_conn_of(t.conn)) {
                        self.d.handle(dc, t.msg, self.now);
                    }
                }
            }
            if !busy {
                break;
            }
        }
    }

    fn decode_action(&mut self, a: DecodeAction) {
        self.log.push(format!("{a:?}"));
        match a {
            DecodeAction::Connect { conn, addr } => {
                assert_eq!(addr, p_addr());
                match self.listen {
                    Listen::Answer => {
                        let pc = ConnId(self.next_p);
                        self.next_p += 1;
                        self.links.insert(conn, pc);
                        self.p
                            .accepted(pc, (D_ENGINE.0, self.d_epoch), d_addr(), self.now);
                        // A fresh token per channel, as the driver draws one.
                        self.d
                            .connected(conn, P_ENGINE, 0x1111 * conn.0 + 7, self.now);
                    }
                    Listen::Refuse => self.d.closed(conn, "connection refused", self.now),
                    Listen::Hang => {}
                }
            }
            DecodeAction::Close { conn } => {
                if let Some(pc) = self.links.remove(&conn)
                    && !self.partitioned
                {
                    self.p.closed(pc, "end of stream", self.now);
                }
            }
            DecodeAction::Fence { .. } | DecodeAction::StopInbound { .. } => {}
            v @ DecodeAction::Verify { .. } => self.verify.push(v),
        }
    }

    fn prefill_action(&mut self, a: PrefillAction) {
        self.log.push(format!("{a:?}"));
        match a {
            PrefillAction::ConnectData {
                conn,
                addr,
                engine,
                link,
                ..
            } => {
                assert_eq!((addr, engine), (d_addr(), (D_ENGINE.0, self.d_epoch)));
                assert_ne!(link, 0, "the decode handed a link token");
                self.data_link = link;
                let r = if self.data_fails {
                    Err((FailureKind::PeerLost, "no route".to_string()))
                } else {
                    Ok(())
                };
                self.p.data_ready(conn, r, self.now);
            }
            PrefillAction::Close { conn } => {
                if let Some(dc) = self.d_conn_of(conn) {
                    self.links.remove(&dc);
                    if !self.partitioned {
                        self.d.closed(dc, "end of stream", self.now);
                    }
                }
            }
            PrefillAction::DisconnectData { .. } => {}
        }
    }

    /// Moves the clock `by`, firing every timer on the way.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        loop {
            self.step();
            let mut next = self.d.poll_timeout();
            if !self.stopped {
                next = match (next, self.p.poll_timeout()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            match next {
                Some(t) if t <= until => {
                    self.now = self.now.max(t);
                    self.d.handle_timeout(self.now);
                    if !self.stopped {
                        self.p.handle_timeout(self.now);
                    }
                }
                _ => break,
            }
        }
        self.now = until;
        self.step();
    }

    /// Both sides of room `room` with `n` pages, receiver first.
    fn pair(&mut self, room: u64, n: i32) {
        self.d.create(room, p_addr(), self.now).unwrap();
        self.d
            .init(room, (0..n).collect(), Some(1), self.now)
            .unwrap();
        self.p.create(room, self.now).unwrap();
        self.p.init(room, n as u64, Some(2), self.now).unwrap();
        self.step();
    }

    /// Posts the next chunk of the room.
    fn send(&mut self, room: u64, pages: u64, last: bool) {
        let plan = self.p.send(room, pages, last).unwrap().unwrap();
        self.p.posted(room, Ok(()), self.now);
        self.flying.push((room, plan));
        self.step();
    }

    /// Every chunk in flight lands and completes.
    fn land(&mut self) {
        for (room, plan) in std::mem::take(&mut self.flying) {
            self.d
                .on_chunk(plan.slot, plan.seq, plan.last, P_ENGINE, self.data_link);
            self.p.chunk_settled(room, Ok(()), self.now);
        }
        self.step();
    }

    /// Acknowledges aborts whose writes settled (nothing flies in these tests unless posted).
    fn settle(&mut self) {
        for room in self.p.settle_watch() {
            if !self.flying.iter().any(|(r, _)| *r == room) {
                self.p.settled(room, self.now);
            }
        }
        self.step();
    }

    fn states(&self, room: u64) -> (Option<KvPoll>, Option<KvPoll>) {
        (self.d.state(room), self.p.state(room))
    }

    fn kinds(&self, room: u64) -> (Option<FailureKind>, Option<FailureKind>) {
        (
            self.d.failure(room).map(|f| f.kind),
            self.p.failure(room).map(|f| f.kind),
        )
    }
}

use KvPoll::*;

#[test]
fn a_room_walks_both_sides_to_success() {
    let mut n = Net::new();
    n.pair(1, 4);
    assert_eq!(n.states(1), (Some(WaitingForInput), Some(WaitingForInput)));
    n.send(1, 2, false);
    assert_eq!(n.states(1), (Some(WaitingForInput), Some(Transferring)));
    n.send(1, 2, true);
    let (_, plan) = &n.flying[1];
    assert_eq!((plan.dst.clone(), plan.aux), (vec![2, 3], Some((2, 1))));
    n.land();
    assert_eq!(n.states(1), (Some(Success), Some(Success)));
    assert_eq!(n.kinds(1), (None, None));
}

#[test]
fn a_room_whose_bytes_cannot_be_made_visible_fails_instead_of_succeeding() {
    let mut n = Net::new();
    n.pair(1, 2);
    n.send(1, 2, true);
    n.land();
    assert_eq!(n.d.state(1), Some(Success));
    // The driver's GPU flush failed before it published the Success.
    n.d.not_visible(1, "cuFlushGPUDirectRDMAWrites failed".into());
    assert_eq!(n.d.state(1), Some(Failed));
    let f = n.d.failure(1).unwrap().clone();
    assert_eq!((f.kind, f.state), (FailureKind::Transport, Transferring));
    assert!(f.text.contains("cuFlushGPUDirectRDMAWrites"), "{}", f.text);
    assert!(n.d.quiet(1), "nothing of it can land any more");
    assert!(n.d.poll_changed().contains(&1));
    // Only a Success is revoked: a failed room keeps its first failure.
    n.d.not_visible(1, "again".into());
    assert_eq!(n.d.failure(1).unwrap().text, f.text);
}

#[test]
fn a_destination_before_its_sender_waits_and_pairs() {
    let mut n = Net::new();
    n.d.create(7, p_addr(), n.now).unwrap();
    n.d.init(7, vec![3], None, n.now).unwrap();
    n.advance(Duration::from_secs(20));
    assert_eq!(n.p.counts().2, 1, "parked");
    n.p.create(7, n.now).unwrap();
    n.p.init(7, 1, None, n.now).unwrap();
    n.step();
    assert_eq!(n.states(7), (Some(WaitingForInput), Some(WaitingForInput)));
    assert_eq!(n.p.counts().2, 0);
}

#[test]
fn a_sender_before_its_destination_waits_and_pairs() {
    let mut n = Net::new();
    n.p.create(7, n.now).unwrap();
    n.p.init(7, 2, None, n.now).unwrap();
    n.advance(Duration::from_secs(10));
    n.d.create(7, p_addr(), n.now).unwrap();
    n.advance(Duration::from_secs(1));
    assert_eq!(n.states(7), (Some(Bootstrapping), Some(Bootstrapping)));
    n.d.init(7, vec![0, 1], None, n.now).unwrap();
    n.step();
    assert_eq!(n.states(7), (Some(WaitingForInput), Some(WaitingForInput)));
}

#[test]
fn duplicate_rooms_are_refused_on_both_sides() {
    let mut n = Net::new();
    n.pair(5, 1);
    assert!(matches!(
        n.d.create(5, p_addr(), n.now),
        Err(Error::DuplicateRoom { room: 5 })
    ));
    assert!(matches!(
        n.p.create(5, n.now),
        Err(Error::DuplicateRoom { room: 5 })
    ));
    // A second destination for a paired room (a rogue or confused peer) is rejected and the
    // paired room is untouched.
    let pc = *n.links.values().next().unwrap();
    let msg = KvMessage::RoomInit {
        room: 5,
        slot: 9,
        aux_index: None,
        pages: vec![0],
        digests: false,
    };
    n.p.handle(pc, msg, n.now);
    let out = n.p.poll_transmit().unwrap().msg;
    assert!(
        matches!(
            out,
            KvMessage::RoomRejected {
                room: 5,
                kind: 8,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(n.states(5), (Some(WaitingForInput), Some(WaitingForInput)));
}

#[test]
fn page_count_mismatch_fails_both_sides_as_invalid_pages_either_order() {
    for sender_first in [false, true] {
        let mut n = Net::new();
        if sender_first {
            n.p.create(3, n.now).unwrap();
            n.p.init(3, 5, None, n.now).unwrap();
        }
        n.d.create(3, p_addr(), n.now).unwrap();
        n.d.init(3, vec![0, 1, 2, 3], None, n.now).unwrap();
        n.step();
        if !sender_first {
            n.p.create(3, n.now).unwrap();
            assert!(n.p.init(3, 5, None, n.now).is_err());
            n.step();
        }
        let want = Some(FailureKind::InvalidPages);
        assert_eq!(n.kinds(3), (want, want), "sender first: {sender_first}");
    }
}

#[test]
fn layout_mismatch_fails_both_sides_at_once_whoever_came_first() {
    for sender_first in [false, true] {
        let mut n = Net::with(Timing::default(), 2048);
        if sender_first {
            n.p.create(4, n.now).unwrap();
        }
        n.d.create(4, p_addr(), n.now).unwrap();
        n.step();
        assert_eq!(n.d.failure(4).unwrap().kind, FailureKind::LayoutMismatch);
        if !sender_first {
            n.p.create(4, n.now).unwrap();
        }
        let f = n.p.failure(4).expect("the prefill side is told at once");
        assert_eq!(f.kind, FailureKind::LayoutMismatch, "{f}");
        assert_eq!(f.state, Bootstrapping);
        // And no room timeout was needed.
        assert!(n.now.elapsed() < Duration::from_secs(1));
    }
}

/// Which point of a room's life an abort comes at.
#[derive(Clone, Copy, Debug)]
enum At {
    Created,
    Announced,
    Paired,
    Transferring,
}

fn reach(n: &mut Net, room: u64, at: At) {
    n.d.create(room, p_addr(), n.now).unwrap();
    n.p.create(room, n.now).unwrap();
    n.step();
    if matches!(at, At::Created) {
        return;
    }
    n.d.init(room, vec![0, 1], None, n.now).unwrap();
    n.step();
    if matches!(at, At::Announced) {
        return;
    }
    n.p.init(room, 2, None, n.now).unwrap();
    n.step();
    if matches!(at, At::Transferring) {
        n.send(room, 1, false);
    }
}

#[test]
fn an_abort_on_either_side_in_every_state_reaches_the_other_side() {
    for at in [At::Created, At::Announced, At::Paired, At::Transferring] {
        // The receiver aborts.
        let mut n = Net::new();
        reach(&mut n, 1, at);
        let before = n.d.state(1).unwrap();
        let fence = n.d.abort(1, n.now);
        n.step();
        let f = n.d.failure(1).unwrap();
        assert_eq!((f.kind, f.state), (FailureKind::Aborted, before), "{at:?}");
        assert_eq!(
            n.p.failure(1).map(|f| f.kind),
            Some(FailureKind::AbortedByPeer),
            "{at:?}"
        );
        let announced = !matches!(at, At::Created);
        assert_eq!(fence.is_some(), announced, "{at:?}");
        if announced {
            assert!(!n.d.quiet(1), "{at:?}: waits for the sender's word");
            n.land(); // what was in flight completes
            n.settle();
        }
        assert!(n.d.quiet(1), "{at:?}: acknowledged");

        // The sender aborts.
        let mut n = Net::new();
        reach(&mut n, 2, at);
        let before = n.p.state(2).unwrap();
        n.p.abort(2, n.now);
        n.step();
        let f = n.p.failure(2).unwrap();
        assert_eq!((f.kind, f.state), (FailureKind::Aborted, before), "{at:?}");
        if announced {
            assert_eq!(
                n.d.failure(2).map(|f| f.kind),
                Some(FailureKind::AbortedByPeer),
                "{at:?}"
            );
            // The receiver tells back and waits for the acknowledgement before its pages are
            // free.
            n.land();
            n.settle();
            assert!(n.d.quiet(2), "{at:?}");
        } else {
            // The receiver never announced the room: it learns when it does.
            n.d.init(2, vec![0, 1], None, n.now).unwrap();
            n.step();
            assert_eq!(
                n.d.failure(2).map(|f| f.kind),
                Some(FailureKind::AbortedByPeer),
                "{at:?}"
            );
        }
    }
}

#[test]
fn an_unanswered_abort_stops_the_senders_writes_at_the_abort_timeout() {
    let timing = Timing {
        abort_timeout: Duration::from_secs(2),
        ..Timing::default()
    };
    let mut n = Net::with(timing, 4096);
    reach(&mut n, 1, At::Transferring);
    n.d.abort(1, n.now);
    n.step();
    n.stopped = true; // the prefill never answers
    n.advance(n.timing.abort_timeout - Duration::from_millis(1));
    assert!(!n.d.quiet(1));
    n.advance(Duration::from_millis(1));
    assert!(n.d.quiet(1));
    assert!(
        n.log.iter().any(|l| l.contains("StopInbound")),
        "{:?}",
        n.log
    );
}

#[test]
fn deadlines_fail_rooms_as_timeouts_with_the_state_they_were_stuck_in() {
    for at in [At::Created, At::Announced, At::Paired, At::Transferring] {
        let mut n = Net::new();
        reach(&mut n, 1, at);
        let (d_state, p_state) = n.states(1);
        n.advance(n.timing.room_timeout - Duration::from_millis(1));
        assert_eq!(n.kinds(1), (None, None), "{at:?}");
        n.advance(Duration::from_millis(1));
        let (d, p) = (n.d.failure(1).unwrap(), n.p.failure(1).unwrap());
        assert_eq!(
            (d.kind, d.state),
            (FailureKind::Timeout, d_state.unwrap()),
            "{at:?}"
        );
        assert_eq!(
            (p.kind, p.state),
            (FailureKind::Timeout, p_state.unwrap()),
            "{at:?}"
        );
        assert!(d.text.contains("deadline of 60000 ms"), "{}", d.text);
    }
}

#[test]
fn a_destination_whose_sender_never_comes_is_rejected_as_a_timeout() {
    let mut n = Net::new();
    n.d.create(1, p_addr(), n.now).unwrap();
    n.d.init(1, vec![0], None, n.now).unwrap();
    n.step();
    // The receiver's own deadline and the parked destination's are the same length; the
    // receiver fails as a timeout either way, and the prefill holds nothing afterwards.
    n.advance(n.timing.room_timeout);
    assert_eq!(n.d.failure(1).unwrap().kind, FailureKind::Timeout);
    assert_eq!(n.p.counts().2, 0);
}

#[test]
fn a_listener_that_never_answers_fails_the_room_as_a_timeout_while_bootstrapping() {
    let mut n = Net::new();
    n.listen = Listen::Hang;
    n.d.create(1, p_addr(), n.now).unwrap();
    n.d.init(1, vec![0], None, n.now).unwrap();
    n.advance(n.timing.connect_timeout);
    let f = n.d.failure(1).unwrap();
    assert_eq!((f.kind, f.state), (FailureKind::Timeout, Bootstrapping));
    assert!(f.text.contains("did not open within 5000 ms"), "{}", f.text);
    // The next room tries again, and works once the peer answers.
    n.listen = Listen::Answer;
    n.pair(2, 1);
    assert_eq!(n.states(2), (Some(WaitingForInput), Some(WaitingForInput)));
}

#[test]
fn a_refused_connect_fails_the_room_as_peer_lost() {
    let mut n = Net::new();
    n.listen = Listen::Refuse;
    n.d.create(1, p_addr(), n.now).unwrap();
    n.step();
    let f = n.d.failure(1).unwrap();
    assert_eq!(f.kind, FailureKind::PeerLost);
    assert!(f.text.contains("cannot reach the sender"), "{}", f.text);
}

#[test]
fn a_closed_channel_fails_both_sides_as_peer_lost() {
    let mut n = Net::new();
    n.pair(1, 2);
    n.send(1, 1, false);
    // The connection resets under both.
    let (dc, pc) = n.links.drain().next().unwrap();
    n.d.closed(dc, "connection reset", n.now);
    n.p.closed(pc, "connection reset", n.now);
    n.step();
    assert_eq!(
        n.kinds(1),
        (Some(FailureKind::PeerLost), Some(FailureKind::PeerLost))
    );
    assert!(n.log.iter().any(|l| l.contains("DisconnectData")));
}

#[test]
fn a_stopped_prefill_is_lost_at_the_heartbeat_timeout() {
    let mut n = Net::new();
    n.pair(1, 2);
    n.stopped = true;
    n.advance(n.timing.heartbeat_timeout - Duration::from_millis(1));
    assert_eq!(n.d.state(1), Some(WaitingForInput));
    n.advance(Duration::from_millis(1));
    let f = n.d.failure(1).unwrap();
    assert_eq!((f.kind, f.state), (FailureKind::PeerLost, WaitingForInput));
    assert!(f.text.contains("heartbeat timeout"), "{}", f.text);
    assert!(n.log.iter().any(|l| l.contains("StopInbound")));
}

#[test]
fn a_prefill_that_resumes_within_the_heartbeat_timeout_loses_nothing() {
    let mut n = Net::new();
    n.pair(1, 2);
    n.stopped = true;
    n.advance(n.timing.heartbeat_timeout - Duration::from_millis(100));
    n.stopped = false;
    n.advance(Duration::from_secs(30));
    assert_eq!(n.states(1), (Some(WaitingForInput), Some(WaitingForInput)));
    n.send(1, 2, true);
    n.land();
    assert_eq!(n.states(1), (Some(Success), Some(Success)));
}

#[test]
fn after_a_partition_heals_the_next_room_works_at_once() {
    let mut n = Net::new();
    n.pair(1, 1);
    n.partitioned = true;
    n.advance(n.timing.heartbeat_timeout);
    assert_eq!(
        n.kinds(1),
        (Some(FailureKind::PeerLost), Some(FailureKind::PeerLost))
    );
    n.partitioned = false;
    let connects = n.log.iter().filter(|l| l.starts_with("Connect {")).count();
    n.pair(2, 1);
    assert_eq!(n.states(2), (Some(WaitingForInput), Some(WaitingForInput)));
    let now = n.log.iter().filter(|l| l.starts_with("Connect {")).count();
    assert_eq!(now, connects + 1, "a new channel replaced the dead one");
}

#[test]
fn a_restarted_decode_fails_the_rooms_of_its_previous_life_as_peer_restarted() {
    let mut n = Net::new();
    n.pair(1, 1);
    // The decode process dies without a word (power loss) and comes back with a new epoch.
    n.d_epoch += 1;
    n.d = DecodeEndpoint::new(
        Identity {
            engine_id: D_ENGINE.0,
            epoch: n.d_epoch,
            engine_addr: d_addr(),
            layout: layout(4096),
        },
        n.timing,
        true,
    );
    n.links.clear();
    n.pair(2, 1);
    let f = n.p.failure(1).unwrap();
    assert_eq!(
        (f.kind, f.state),
        (FailureKind::PeerRestarted, WaitingForInput)
    );
    assert_eq!(n.states(2), (Some(WaitingForInput), Some(WaitingForInput)));
}

#[test]
fn a_data_path_that_cannot_be_had_fails_both_sides() {
    let mut n = Net::new();
    n.data_fails = true;
    n.pair(1, 1);
    assert_eq!(
        n.kinds(1),
        (Some(FailureKind::PeerLost), Some(FailureKind::PeerLost))
    );
}

#[test]
fn a_chunk_that_cannot_be_posted_fails_both_sides_as_transport() {
    let mut n = Net::new();
    n.pair(1, 2);
    let plan = n.p.send(1, 2, true).unwrap().unwrap();
    assert_eq!(n.p.posting(1), 1);
    n.p.poll_changed();
    n.p.posted(
        1,
        Err(format!("chunk {} not sent: peer lost", plan.seq)),
        n.now,
    );
    assert_eq!(n.p.posting(1), 0);
    assert_eq!(
        n.p.poll_changed(),
        vec![1],
        "the driver publishes the failure"
    );
    n.step();
    let f = n.p.failure(1).unwrap();
    assert_eq!((f.kind, f.state), (FailureKind::Transport, Transferring));
    assert_eq!(n.d.failure(1).map(|f| f.kind), Some(FailureKind::Transport));
}

#[test]
fn a_notification_from_another_engine_slot_or_connection_changes_nothing() {
    let mut n = Net::new();
    n.pair(1, 1);
    let plan = n.p.send(1, 1, true).unwrap().unwrap();
    let link = n.data_link;
    assert!(n.d.on_chunk(plan.slot, 0, true, (9, 9), link).is_none());
    assert!(
        n.d.on_chunk(plan.slot + 1, 0, true, P_ENGINE, link)
            .is_none()
    );
    // The right engine id and epoch (anyone can learn them) over a connection that did not
    // present the channel's link token: a forged completion, refused and logged.
    assert!(n.d.on_chunk(plan.slot, 0, true, P_ENGINE, 0).is_none());
    assert!(
        n.d.on_chunk(plan.slot, 0, true, P_ENGINE, link ^ 1)
            .is_none()
    );
    assert_eq!(
        n.d.poll_refusal().map(|t| t.contains("link token")),
        Some(true)
    );
    assert_eq!(n.d.state(1), Some(WaitingForInput));
    assert_eq!(n.d.on_chunk(plan.slot, 0, true, P_ENGINE, link), Some(1));
    assert_eq!(n.d.state(1), Some(Success));
}

#[test]
fn a_hello_can_name_only_a_port_of_its_own_host() {
    let from: SocketAddr = "10.0.0.2:40000".parse().unwrap();
    let hello = |addr: &str| KvMessage::Hello {
        engine_id: D_ENGINE.0,
        epoch: D_ENGINE.1,
        engine_addr: addr.into(),
        layout: layout(4096),
        link: 5,
    };
    let ok = |addr: &str| check_hello(hello(addr), D_ENGINE, from).map(|h| h.addr);
    assert_eq!(ok("0.0.0.0:7000"), Ok("10.0.0.2:7000".parse().unwrap()));
    assert_eq!(ok("10.0.0.2:7001"), Ok("10.0.0.2:7001".parse().unwrap()));
    assert!(
        ok("[::ffff:10.0.0.2]:7001").is_ok(),
        "the same host, IPv4-mapped"
    );
    for bad in ["10.0.0.9:7000", "127.0.0.1:22", "[::1]:7000", "10.0.0.2:0"] {
        assert!(ok(bad).is_err(), "{bad}");
    }
    // At the prefill: the channel is closed, nothing is dialled, and the refusal is logged.
    let mut p = lone_prefill();
    let now = Instant::now();
    p.accepted(ConnId(1), D_ENGINE, from, now);
    p.handle(ConnId(1), hello("10.0.0.9:7000"), now);
    let actions: Vec<PrefillAction> = std::iter::from_fn(|| p.poll_action()).collect();
    assert!(
        matches!(actions[..], [PrefillAction::Close { conn: ConnId(1) }]),
        "{actions:?}"
    );
    assert!(
        p.poll_refusal()
            .unwrap()
            .contains("only name a port of its own host")
    );
}

#[test]
fn what_a_peer_can_park_is_bounded() {
    let mut n = Net::new();
    n.d.create(1, p_addr(), n.now).unwrap();
    n.step();
    let pc = *n.links.values().next().unwrap();
    let big: Vec<i32> = (0..4096).collect();
    let fits = prefill::MAX_PENDING_PAGES / 4096;
    for room in 0..fits + 1 {
        let msg = KvMessage::RoomInit {
            room: 1000 + room,
            slot: room as u32,
            aux_index: None,
            pages: big.clone(),
            digests: false,
        };
        n.p.handle(pc, msg, n.now);
    }
    assert_eq!(n.p.counts().2 as u64, fits);
    let mut rejected = 0;
    while let Some(t) = n.p.poll_transmit() {
        rejected += matches!(t.msg, KvMessage::RoomRejected { .. }) as u32;
    }
    assert_eq!(rejected, 1);
}

#[test]
fn what_unknown_rooms_leave_behind_is_bounded() {
    let mut n = Net::new();
    n.d.create(1, p_addr(), n.now).unwrap();
    n.step();
    let pc = *n.links.values().next().unwrap();
    for room in 0..prefill::MAX_TOMBSTONES as u64 + 10 {
        let msg = KvMessage::RoomAbort {
            room: 1000 + room,
            kind: 4,
            reason: "é".repeat(2000),
        };
        n.p.handle(pc, msg, n.now);
    }
    assert_eq!(n.p.counts().3, prefill::MAX_TOMBSTONES);
    n.p.create(1000, n.now).unwrap();
    let f = n.p.failure(1000).unwrap();
    assert_eq!(f.kind, FailureKind::AbortedByPeer);
    assert!(
        f.text.len() <= prefill::MAX_TOMBSTONE_TEXT,
        "{}",
        f.text.len()
    );
    // They expire with the room timeout (room 1 goes first, or its own timeout would leave
    // a fresh one).
    n.d.remove(1);
    n.advance(n.timing.room_timeout);
    assert_eq!(n.p.counts().3, 0);
}

/// A tiny deterministic generator for the interleaving test.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn many_rooms_interleaved_all_end_as_their_callers_meant() {
    for seed in 1..=4 {
        let mut n = Net::new();
        let mut rng = Lcg(seed);
        let rooms = 600u64;
        // Each room: receiver steps (create, init), sender steps (create, init, send), in a
        // random interleaving; a tenth of the rooms are aborted by a random side midway.
        let mut d_step = vec![0u8; rooms as usize];
        let mut p_step = vec![0u8; rooms as usize];
        let mut aborted = vec![false; rooms as usize];
        let mut live: Vec<u64> = (0..rooms).collect();
        while !live.is_empty() {
            let i = rng.next(live.len() as u64) as usize;
            let room = live[i];
            let r = room as usize;
            let pages: Vec<i32> = (0..2).map(|k| (room as i32 * 2 + k) % 4096).collect();
            if room % 10 == 3 && !aborted[r] && d_step[r] == 2 && rng.next(3) == 0 {
                aborted[r] = true;
                if rng.next(2) == 0 || p_step[r] == 0 {
                    n.d.abort(room, n.now);
                } else {
                    n.p.abort(room, n.now);
                }
            } else if rng.next(2) == 0 && d_step[r] < 2 {
                match d_step[r] {
                    0 => n.d.create(room, p_addr(), n.now).unwrap(),
                    _ => drop(
                        n.d.init(room, pages, None, n.now)
                            .unwrap_or_else(|e| panic!("{e}: {:?}", n.d.failure(room))),
                    ),
                }
                d_step[r] += 1;
            } else if p_step[r] < 3 {
                match p_step[r] {
                    0 => n.p.create(room, n.now).unwrap(),
                    1 => {
                        let res = n.p.init(room, 2, None, n.now);
                        assert!(res.is_ok() || aborted[r], "room {room}: {res:?}");
                    }
                    _ => {
                        if n.p.state(room) == Some(WaitingForInput) {
                            n.send(room, 2, true);
                        } else if n.p.state(room) != Some(Failed) {
                            p_step[r] -= 1; // not paired yet: try again later
                        }
                    }
                }
                p_step[r] += 1;
            }
            if d_step[r] == 2 && p_step[r] == 3 {
                live.swap_remove(i);
            }
            if rng.next(8) == 0 {
                n.step();
            }
            if rng.next(50) == 0 {
                n.land();
            }
            n.advance(Duration::from_micros(rng.next(500)));
        }
        n.land();
        n.settle();
        for room in 0..rooms {
            let r = room as usize;
            if aborted[r] {
                let (d, p) = n.kinds(room);
                assert!(
                    matches!(
                        (d, p),
                        (Some(FailureKind::Aborted), Some(FailureKind::AbortedByPeer))
                            | (Some(FailureKind::AbortedByPeer), Some(FailureKind::Aborted))
                    ),
                    "seed {seed} room {room}: {d:?} {p:?}"
                );
                assert!(n.d.quiet(room), "seed {seed} room {room}");
            } else {
                assert_eq!(
                    n.states(room),
                    (Some(Success), Some(Success)),
                    "seed {seed} room {room}: {:?}",
                    n.kinds(room)
                );
            }
        }
        for room in 0..rooms {
            n.d.remove(room);
            n.p.remove(room, n.now);
        }
        assert_eq!(n.d.counts().1, 0);
        assert_eq!(n.p.counts().1, 0);
    }
}

#[test]
fn a_room_stays_with_the_decode_engine_that_claimed_it() {
    let mut n = Net::new();
    n.pair(1, 2); // decode A claims room 1
    assert_eq!(n.states(1), (Some(WaitingForInput), Some(WaitingForInput)));
    // Decode B (another engine, another host) opens its own channel to the prefill.
    let b = ConnId(999);
    let b_engine = (7, 77);
    let b_from: SocketAddr = "10.0.0.3:40000".parse().unwrap();
    n.p.accepted(b, b_engine, b_from, n.now);
    n.p.handle(
        b,
        KvMessage::Hello {
            engine_id: b_engine.0,
            epoch: b_engine.1,
            engine_addr: "10.0.0.3:7000".into(),
            layout: layout(4096),
            link: 42,
        },
        n.now,
    );
    while let Some(a) = n.p.poll_action() {
        assert!(
            matches!(a, PrefillAction::ConnectData { conn, .. } if conn == b),
            "{a:?}"
        );
    }
    n.p.data_ready(b, Ok(()), n.now);
    // B claims the same room, then aborts it: refused and acknowledged, nothing else.
    n.p.handle(
        b,
        KvMessage::RoomInit {
            room: 1,
            slot: 5,
            aux_index: None,
            pages: vec![0, 1],
            digests: false,
        },
        n.now,
    );
    n.p.handle(
        b,
        KvMessage::RoomAbort {
            room: 1,
            kind: FailureKind::Aborted.code() as u8,
            reason: "mine now".into(),
        },
        n.now,
    );
    let to_b: Vec<KvMessage> = std::iter::from_fn(|| n.p.poll_transmit())
        .filter(|t| t.conn == b)
        .map(|t| t.msg)
        .collect();
    assert!(
        matches!(
            &to_b[..],
            [
                KvMessage::Hello { .. },
                KvMessage::RoomRejected { room: 1, .. },
                KvMessage::RoomAbortAck { room: 1 }
            ]
        ),
        "{to_b:?}"
    );
    assert!(n.p.poll_refusal().is_some_and(|t| t.contains("room 1")));
    assert!(n.p.room_conn(1).is_some_and(|c| c != b), "still A's");
    // A's room goes on to success, over A's data path.
    n.send(1, 2, true);
    n.land();
    assert_eq!(n.states(1), (Some(Success), Some(Success)));
}

#[test]
fn channels_per_host_and_in_all_are_bounded() {
    let mut p = lone_prefill();
    let now = Instant::now();
    let host =
        |h: u32, port: u16| SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + h), port));
    let mut id = 0;
    let mut closed = 0;
    // One host opens one channel more than its share.
    for i in 0..=prefill::MAX_CHANNELS_PER_HOST {
        id += 1;
        p.accepted(ConnId(id), (id, 1), host(1, 1000 + i as u16), now);
    }
    while let Some(a) = p.poll_action() {
        closed += matches!(a, PrefillAction::Close { .. }) as usize;
    }
    assert_eq!(closed, 1);
    assert!(p.poll_refusal().unwrap().contains("per host"));
    // Many hosts: the total is bounded too.
    for h in 2..200 {
        for i in 0..prefill::MAX_CHANNELS_PER_HOST / 4 {
            id += 1;
            p.accepted(ConnId(id), (id, 1), host(h, i as u16), now);
        }
    }
    let open = id as usize - std::iter::from_fn(|| p.poll_action()).count() - closed;
    assert_eq!(open, prefill::MAX_CHANNELS);
}

#[test]
fn with_digests_a_chunk_counts_once_it_landed_and_matched_and_a_mismatch_fails_as_integrity() {
    let mut n = Net::new();
    n.d.check_digests(true);
    n.pair(1, 4);
    // Chunk 0 lands before its digest comes.
    n.send(1, 2, false);
    let plan = n.flying[0].1.clone();
    assert!(
        plan.digest && plan.first == 0,
        "the room asked for digests: {plan:?}"
    );
    n.land();
    assert!(n.verify.is_empty(), "nothing to check without the digest");
    n.p.digest(1, plan.seq, 0, 2, 0xab, n.now);
    n.step();
    let want = DecodeAction::Verify {
        room: 1,
        seq: 0,
        last: false,
        pages: vec![0, 1],
        aux: None,
        digest: 0xab,
    };
    assert_eq!(n.verify, vec![want]);
    n.verify.clear();
    n.d.verified(1, 0, false, Ok(()), n.now);
    // The last chunk's digest comes before it lands; the aux slot goes with it.
    n.send(1, 2, true);
    let plan = n.flying[0].1.clone();
    assert_eq!(plan.first, 2);
    n.p.digest(1, plan.seq, 2, 2, 0xcd, n.now);
    n.step();
    assert!(n.verify.is_empty(), "nothing to check before it lands");
    n.land();
    assert_eq!(
        n.states(1).0,
        Some(Transferring),
        "not Success before it is checked"
    );
    let want = DecodeAction::Verify {
        room: 1,
        seq: 1,
        last: true,
        pages: vec![2, 3],
        aux: Some(1),
        digest: 0xcd,
    };
    assert_eq!(n.verify, vec![want]);
    n.verify.clear();
    n.d.verified(1, 1, true, Ok(()), n.now);
    n.step();
    assert_eq!(n.states(1), (Some(Success), Some(Success)));

    // A chunk whose bytes differ fails the room as an integrity failure, and the sender hears.
    n.pair(2, 2);
    n.send(2, 2, true);
    n.land();
    n.p.digest(2, 0, 0, 2, 1, n.now);
    n.step();
    assert_eq!(n.verify.len(), 1);
    n.verify.clear();
    n.d.verified(2, 0, true, Err("differs".into()), n.now);
    n.step();
    assert_eq!(n.states(2).0, Some(Failed));
    assert_eq!(n.kinds(2).0, Some(FailureKind::Integrity));
    assert_eq!(n.d.failure(2).unwrap().text, "differs");

    // A digest naming pages outside its room fails it too (and is logged as refused).
    n.pair(3, 2);
    n.send(3, 2, true);
    n.p.digest(3, 0, 1, 5, 0, n.now);
    n.step();
    assert_eq!(n.kinds(3).0, Some(FailureKind::Integrity));
    assert!(n.d.poll_refusal().is_some_and(|t| t.contains("pages 1..6")));
    n.land();
    assert!(n.verify.is_empty(), "a failed room checks nothing more");
}

#[test]
fn a_digest_for_a_room_that_asked_for_none_is_refused_and_changes_nothing() {
    let mut n = Net::new();
    n.pair(1, 2);
    n.send(1, 2, true);
    assert!(!n.flying[0].1.digest);
    n.p.digest(1, 0, 0, 2, 7, n.now);
    n.step();
    assert!(
        n.d.poll_refusal()
            .is_some_and(|t| t.contains("asked for none"))
    );
    n.land();
    assert_eq!(n.states(1), (Some(Success), Some(Success)));
    assert!(n.verify.is_empty());
}
