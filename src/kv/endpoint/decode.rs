//! The decode side's endpoint: receiving rooms, their slots, and channels to prefill managers.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Instant;

use super::{
    ConnId, Identity, Liveness, Polled, Queues, TimerKey, Timing, Transmit, check_hello,
    kind_from_wire, record_failure, silence,
};
use crate::error::{Error, Result};
use crate::kv::failure::{Failure, FailureKind};
use crate::kv::pages::{check_distinct, check_pages};
use crate::kv::proto::KvMessage;
use crate::kv::session::ReceiverSession;
use crate::kv::{KvPoll, MAX_SLOTS};

/// Work the decode endpoint asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeAction {
    /// Open a KV channel to the prefill manager at `addr` (in the background), then report
    /// `connected` or `closed`.
    Connect {
        /// The channel's name from now on.
        conn: ConnId,
        /// The prefill manager's bootstrap address.
        addr: SocketAddr,
    },
    /// Close the channel; the endpoint has forgotten it already.
    Close {
        /// The channel.
        conn: ConnId,
    },
    /// Refuse any further write into `slot` from engine `peer` (without waiting).
    Fence {
        /// The room's slot.
        slot: u32,
        /// The sending engine `(id, epoch)`.
        peer: (u64, u64),
    },
    /// Stop every write from engine `peer` into this engine: an abort went unanswered or the
    /// peer fell silent with rooms announced to it.
    StopInbound {
        /// The sending engine `(id, epoch)`.
        peer: (u64, u64),
    },
    /// Chunk `seq` of `room` landed and its digest came: hash its destination
    /// ([`KvLayout::digest_ranges`](crate::kv::KvLayout::digest_ranges) of `pages` and `aux`)
    /// and report whether it equals `digest` with [`DecodeEndpoint::verified`].
    Verify {
        /// The room.
        room: u64,
        /// The chunk.
        seq: u32,
        /// Whether it ends the room.
        last: bool,
        /// Its destination pages, in room order.
        pages: Vec<i32>,
        /// The aux slot it carries (last chunk only).
        aux: Option<u32>,
        /// The sender's digest.
        digest: u64,
    },
}

/// A room that checks digests: its destination, and the halves of each chunk's check that
/// have arrived (the notification over the data path, the digest over the channel).
#[derive(Debug, Default)]
struct Check {
    pages: Vec<i32>,
    aux: Option<u32>,
    /// Chunks notified and not yet verified: seq → last.
    notified: HashMap<u32, bool>,
    /// Digests of chunks not yet verified: seq → (first, count, digest).
    digests: HashMap<u32, (u64, u64, u64)>,
}

#[derive(Debug)]
enum Phase {
    /// Asked the driver to connect; fails at `until`.
    Connecting { until: Instant },
    /// Connected to engine `engine`, our hello sent, theirs awaited until `until`.
    Hello { until: Instant, engine: (u64, u64) },
    /// Hellos exchanged; `pairing` says whether the layouts pair.
    Open {
        engine: (u64, u64),
        pairing: std::result::Result<(), String>,
    },
}

#[derive(Debug)]
struct Conn {
    addr: SocketAddr,
    phase: Phase,
    /// The link token handed to the prefill in our hello: its data path presents it, and
    /// completions for rooms of this channel count only from connections that did.
    link: u64,
    rooms: HashSet<u64>,
    live: Liveness,
}

#[derive(Debug)]
struct Room {
    conn: Option<ConnId>,
    session: ReceiverSession,
    failure: Option<Failure>,
    slot: Option<u32>,
    /// Destination pages and aux slot, until announced.
    dest: Option<(Vec<i32>, Option<u32>)>,
    /// The engine the room was announced to (it may write into the slot), and the link
    /// token its data path presents.
    peer: Option<((u64, u64), u64)>,
    /// Digest checks, when this endpoint asks for them (set when the room is announced).
    check: Option<Check>,
    /// We told the sender the room failed.
    told: bool,
    /// No write of the room can land any more (never announced, acknowledged, or cut off).
    quiet: bool,
    /// Waiting for the sender's acknowledgement of our abort until then.
    ack_until: Option<Instant>,
    deadline: Instant,
}

/// The decode side's sans-IO endpoint (see the [module docs](super)).
#[derive(Debug)]
pub struct DecodeEndpoint {
    me: Identity,
    timing: Timing,
    /// Whether aborts wait for the sender's acknowledgement (RDMA: writes land without the
    /// target's CPU, so only the sender can say none is in flight; TCP fences them here).
    needs_ack: bool,
    conns: HashMap<ConnId, Conn>,
    by_addr: HashMap<SocketAddr, ConnId>,
    next_conn: u64,
    rooms: HashMap<u64, Room>,
    slots: HashMap<u32, u64>,
    next_slot: u32,
    /// Rooms ask their sender for a digest of every chunk and succeed only once each matched.
    digests: bool,
    out: Queues<DecodeAction>,
}

impl DecodeEndpoint {
    /// An endpoint for the manager `me`.
    pub fn new(me: Identity, timing: Timing, needs_ack: bool) -> Self {
        DecodeEndpoint {
            me,
            timing,
            needs_ack,
            conns: HashMap::new(),
            by_addr: HashMap::new(),
            next_conn: 1,
            rooms: HashMap::new(),
            slots: HashMap::new(),
            next_slot: 0,
            digests: false,
            out: Queues::default(),
        }
    }

    /// Makes rooms announced from now on ask for digests and verify every chunk against its
    /// digest before it counts (see [`DecodeAction::Verify`]).
    pub fn check_digests(&mut self, on: bool) {
        self.digests = on;
    }

    /// The timing in force.
    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// Creates room `room`, served by the prefill manager at `addr`. Opens a channel there
    /// unless one is open or opening.
    pub fn create(&mut self, room: u64, addr: SocketAddr, now: Instant) -> Result<()> {
        if self.rooms.contains_key(&room) {
            return Err(Error::DuplicateRoom { room });
        }
        let conn = match self.by_addr.get(&addr) {
            Some(&c) => c,
            None => self.open(addr, now),
        };
        let deadline = now + self.timing.room_timeout;
        self.rooms.insert(
            room,
            Room {
                conn: Some(conn),
                session: ReceiverSession::new(),
                failure: None,
                slot: None,
                dest: None,
                peer: None,
                check: None,
                told: false,
                quiet: true,
                ack_until: None,
                deadline,
            },
        );
        self.out.timers.add(deadline, TimerKey::Room(room));
        let c = self.conns.get_mut(&conn).expect("a mapped channel exists");
        c.rooms.insert(room);
        if let Phase::Open {
            pairing: Err(why), ..
        } = &c.phase
        {
            let why = why.clone();
            self.fail(room, FailureKind::LayoutMismatch, why, now);
        }
        Ok(())
    }

    fn open(&mut self, addr: SocketAddr, now: Instant) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let until = now + self.timing.connect_timeout;
        self.conns.insert(
            conn,
            Conn {
                addr,
                phase: Phase::Connecting { until },
                link: 0,
                rooms: HashSet::new(),
                live: Liveness::new(now),
            },
        );
        self.by_addr.insert(addr, conn);
        self.out.timers.add(until, TimerKey::Conn(conn));
        self.out
            .actions
            .push_back(DecodeAction::Connect { conn, addr });
        conn
    }

    /// Names room `room`'s destination: `pages` (local page indices, in room order) and aux
    /// slot `aux`. Returns the slot the room's notifications carry. Nothing changes when the
    /// pages are refused.
    pub fn init(
        &mut self,
        room: u64,
        pages: Vec<i32>,
        aux: Option<u32>,
        now: Instant,
    ) -> Result<u32> {
        let layout = &self.me.layout;
        check_pages(&pages, layout.pages(), "destination")
            .and_then(|()| check_distinct(&pages))
            .map_err(|reason| Error::InvalidPages { room, reason })?;
        if let Some(a) = aux
            && (a as u64) >= layout.aux_slots()
        {
            return Err(Error::InvalidPages {
                room,
                reason: format!("aux index {a} outside 0..{}", layout.aux_slots()),
            });
        }
        if self.slots.len() as u32 >= MAX_SLOTS {
            return Err(Error::InvalidArgument(format!(
                "more than {MAX_SLOTS} receiving rooms at once"
            )));
        }
        let r = self
            .rooms
            .get_mut(&room)
            .ok_or(Error::UnknownRoom { room })?;
        r.session
            .init(pages.len() as u64)
            .map_err(|e| e.into_error(room))?;
        let slot = loop {
            let s = self.next_slot % MAX_SLOTS;
            self.next_slot = self.next_slot.wrapping_add(1);
            if !self.slots.contains_key(&s) {
                break s;
            }
        };
        self.slots.insert(slot, room);
        r.slot = Some(slot);
        r.dest = Some((pages, aux));
        self.announce(room, now);
        Ok(slot)
    }

    /// Sends the room's destination if its channel is open and paired.
    fn announce(&mut self, room: u64, now: Instant) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(conn) = r.conn else { return };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Phase::Open {
            engine,
            pairing: Ok(()),
        } = c.phase
        else {
            return;
        };
        if r.session.state() != KvPoll::Bootstrapping {
            return;
        }
        let (Some(slot), Some((pages, aux_index))) = (r.slot, r.dest.take()) else {
            return;
        };
        r.peer = Some((engine, c.link));
        r.quiet = false;
        if self.digests {
            r.check = Some(Check {
                pages: pages.clone(),
                aux: aux_index,
                ..Check::default()
            });
        }
        c.live.said(now);
        self.out.transmits.push_back(Transmit {
            conn,
            msg: KvMessage::RoomInit {
                room,
                slot,
                aux_index,
                pages,
                digests: self.digests,
            },
        });
    }

    /// Fails the room (no-op once final): fences its slot and tells the sender, over a
    /// channel that is open, once.
    fn fail(&mut self, room: u64, kind: FailureKind, text: String, now: Instant) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let before = r.session.state();
        let failed = r.session.fail(text.clone());
        if !record_failure(before, failed, &mut r.failure, kind, text.clone()) {
            return;
        }
        self.out.changed.push(room);
        if let (Some(slot), Some(peer)) = (r.slot, r.peer.map(|(e, _)| e)) {
            self.out
                .actions
                .push_back(DecodeAction::Fence { slot, peer });
        }
        let open = r
            .conn
            .and_then(|c| self.conns.get_mut(&c).map(|x| (c, x)))
            .filter(|(_, c)| matches!(c.phase, Phase::Open { .. }));
        let mut told_now = false;
        if let Some((conn, c)) = open
            && !r.told
        {
            r.told = true;
            told_now = true;
            c.live.said(now);
            self.out.transmits.push_back(Transmit {
                conn,
                msg: KvMessage::RoomAbort {
                    room,
                    kind: kind.code() as u8,
                    reason: text,
                },
            });
        }
        if !r.quiet {
            if self.needs_ack && told_now {
                // Over RDMA only the sender can say that none of the room's writes is in
                // flight any more.
                let until = now + self.timing.abort_timeout;
                r.ack_until = Some(until);
                self.out.timers.add(until, TimerKey::Room(room));
            } else if !self.needs_ack || r.conn.is_none() {
                // TCP: the fence refuses late writes here.
                r.quiet = true;
            }
        }
    }

    /// Aborts the room (unless it succeeded). Returns the slot and engine to fence when
    /// writes of the room may still be in progress; [`quiet`](Self::quiet) says when none
    /// can land any more.
    pub fn abort(&mut self, room: u64, now: Instant) -> Option<(u32, (u64, u64))> {
        let r = self.rooms.get(&room)?;
        if r.session.state() == KvPoll::Success {
            return None;
        }
        self.fail(
            room,
            FailureKind::Aborted,
            "aborted by the receiver".into(),
            now,
        );
        let r = self.rooms.get(&room)?;
        Some((r.slot?, r.peer?.0))
    }

    /// Whether no write of the room can land any more (or it succeeded); true for an
    /// unknown room.
    pub fn quiet(&self, room: u64) -> bool {
        self.rooms
            .get(&room)
            .is_none_or(|r| r.quiet || r.session.state() == KvPoll::Success)
    }

    /// Forgets the room (its handle is gone) and frees its slot.
    pub fn remove(&mut self, room: u64) {
        if let Some(r) = self.rooms.remove(&room) {
            if let Some(s) = r.slot {
                self.slots.remove(&s);
            }
            if let Some(c) = r.conn.and_then(|c| self.conns.get_mut(&c)) {
                c.rooms.remove(&room);
            }
        }
    }

    /// The room's state.
    pub fn state(&self, room: u64) -> Option<KvPoll> {
        self.rooms.get(&room).map(|r| r.session.state())
    }

    /// Why the room failed.
    pub fn failure(&self, room: u64) -> Option<&Failure> {
        self.rooms.get(&room)?.failure.as_ref()
    }

    /// Chunk `seq` (the last one if `last`) of the room in `slot` was notified by engine
    /// `engine`. Returns the room when it belonged to a live one.
    pub fn on_chunk(
        &mut self,
        slot: u32,
        seq: u32,
        last: bool,
        engine: (u64, u64),
        link: u64,
    ) -> Option<u64> {
        let &room = self.slots.get(&slot)?;
        let r = self.rooms.get_mut(&room)?;
        if r.peer != Some((engine, link)) {
            if r.peer.is_some_and(|(e, l)| e == engine && l != link) {
                self.out.refuse(format!(
                    "a completion for room {room} from engine {:#x} over a connection without \
                     the room's link token",
                    engine.0
                ));
            }
            return None;
        }
        match &mut r.check {
            Some(check) => {
                if !r.session.state().is_final() {
                    check.notified.insert(seq, last);
                    self.try_verify(room, seq);
                }
            }
            None => self.count_chunk(room, seq, last),
        }
        Some(room)
    }

    /// Chunk `seq` of the room counts as arrived.
    fn count_chunk(&mut self, room: u64, seq: u32, last: bool) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let before = r.session.state();
        r.session.notified(seq, last);
        let after = r.session.state();
        if after == KvPoll::Failed && before != KvPoll::Failed {
            r.failure = Some(Failure {
                kind: FailureKind::Transport,
                state: before,
                text: r.session.reason().unwrap_or_default().to_string(),
            });
        }
        if after != before {
            self.out.changed.push(room);
        }
    }

    /// Asks the driver to verify chunk `seq` once both its notification and its digest came.
    fn try_verify(&mut self, room: u64, seq: u32) {
        let Some(check) = self.rooms.get_mut(&room).and_then(|r| r.check.as_mut()) else {
            return;
        };
        let (Some(&last), Some(&(first, count, digest))) =
            (check.notified.get(&seq), check.digests.get(&seq))
        else {
            return;
        };
        check.notified.remove(&seq);
        check.digests.remove(&seq);
        // In range: checked when the digest came.
        let pages = check.pages[first as usize..(first + count) as usize].to_vec();
        let aux = if last { check.aux } else { None };
        self.out.actions.push_back(DecodeAction::Verify {
            room,
            seq,
            last,
            pages,
            aux,
            digest,
        });
    }

    /// The driver hashed chunk `seq` of `room` (see [`DecodeAction::Verify`]): `Ok` when it
    /// matched the digest, and the chunk counts; `Err` fails the room with kind Integrity.
    pub fn verified(
        &mut self,
        room: u64,
        seq: u32,
        last: bool,
        result: std::result::Result<(), String>,
        now: Instant,
    ) {
        let Some(r) = self.rooms.get(&room) else {
            return;
        };
        if r.session.state().is_final() {
            return;
        }
        match result {
            Ok(()) => self.count_chunk(room, seq, last),
            Err(text) => self.fail(room, FailureKind::Integrity, text, now),
        }
    }

    /// Every byte of `room` landed but could not be made visible to its GPU (the driver's
    /// flush failed, before it published the Success): the room fails with kind Transport
    /// instead. Nothing of it can land any more.
    pub fn not_visible(&mut self, room: u64, text: String) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if r.session.revoke_success(text.clone()) {
            r.failure = Some(Failure {
                kind: FailureKind::Transport,
                state: KvPoll::Transferring,
                text,
            });
            r.quiet = true;
            self.out.changed.push(room);
        }
    }

    /// The driver connected `conn` to engine `engine`: our hello goes out, handing the
    /// prefill `link`, an unguessable token its data path must present (the driver draws it).
    pub fn connected(&mut self, conn: ConnId, engine: (u64, u64), link: u64, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            self.out.actions.push_back(DecodeAction::Close { conn });
            return;
        };
        if let Phase::Connecting { until } = c.phase {
            c.phase = Phase::Hello { until, engine };
            c.live = Liveness::new(now);
            c.link = link;
            self.out.transmits.push_back(Transmit {
                conn,
                msg: self.me.hello(link),
            });
        }
    }

    /// The channel closed (or could not be opened): its rooms fail as peer lost.
    pub fn closed(&mut self, conn: ConnId, why: &str, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let text = match c.phase {
            Phase::Connecting { .. } => format!("cannot reach the sender at {}: {why}", c.addr),
            _ => format!("peer lost: KV channel to {} closed ({why})", c.addr),
        };
        self.drop_conn(conn, FailureKind::PeerLost, text, false, now);
    }

    /// Forgets a channel and fails its rooms; `stop` also cuts off writes of rooms announced
    /// over it (the peer may be alive behind a partition).
    fn drop_conn(
        &mut self,
        conn: ConnId,
        kind: FailureKind,
        text: String,
        stop: bool,
        now: Instant,
    ) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if self.by_addr.get(&c.addr) == Some(&conn) {
            self.by_addr.remove(&c.addr);
        }
        let mut announced_to = None;
        for &room in &c.rooms {
            self.fail(room, kind, text.clone(), now);
            if let Some(r) = self.rooms.get_mut(&room) {
                r.conn = None;
                if !r.quiet {
                    announced_to = r.peer.map(|(e, _)| e);
                }
                r.quiet = true;
                r.ack_until = None;
            }
        }
        if let (true, Some(peer)) = (stop, announced_to) {
            self.out
                .actions
                .push_back(DecodeAction::StopInbound { peer });
        }
    }

    /// A message arrived on `conn`.
    pub fn handle(&mut self, conn: ConnId, msg: KvMessage, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.live.heard(now);
        match c.phase {
            Phase::Connecting { .. } => {}
            Phase::Hello { engine, .. } => self.on_hello(conn, engine, msg, now),
            Phase::Open { .. } => self.on_message(conn, msg, now),
        }
    }

    fn on_hello(&mut self, conn: ConnId, engine: (u64, u64), msg: KvMessage, now: Instant) {
        let c = self.conns.get_mut(&conn).expect("caller checked");
        let hello = match check_hello(msg, engine, c.addr) {
            Ok(h) => h,
            Err(why) => {
                let text = format!("KV handshake with {} failed: {why}", c.addr);
                self.out.refuse(text.clone());
                self.out.actions.push_back(DecodeAction::Close { conn });
                return self.drop_conn(conn, FailureKind::PeerLost, text, false, now);
            }
        };
        let pairing = self
            .me
            .layout
            .check_pairs_with(&hello.layout)
            .map_err(|e| e.to_string());
        c.phase = Phase::Open {
            engine,
            pairing: pairing.clone(),
        };
        c.live = Liveness::new(now);
        self.out.timers.add(now, TimerKey::Conn(conn));
        let rooms: Vec<u64> = c.rooms.iter().copied().collect();
        for room in rooms {
            match &pairing {
                Ok(()) => self.announce(room, now),
                Err(why) => self.fail(room, FailureKind::LayoutMismatch, why.clone(), now),
            }
        }
    }

    fn on_message(&mut self, conn: ConnId, msg: KvMessage, now: Instant) {
        let room = match &msg {
            KvMessage::RoomAccepted { room }
            | KvMessage::RoomRejected { room, .. }
            | KvMessage::RoomAbort { room, .. }
            | KvMessage::RoomAbortAck { room }
            | KvMessage::ChunkDigest { room, .. } => *room,
            _ => return,
        };
        let Some(r) = self.rooms.get_mut(&room).filter(|r| r.conn == Some(conn)) else {
            return;
        };
        if let KvMessage::ChunkDigest {
            seq,
            first,
            count,
            digest,
            ..
        } = msg
        {
            let Some(check) = r.check.as_mut() else {
                self.out
                    .refuse(format!("a digest for room {room}, which asked for none"));
                return;
            };
            if seq >= crate::kv::MAX_CHUNKS || check.digests.contains_key(&seq) {
                self.out.refuse(format!(
                    "room {room}: a digest for chunk {seq} out of range or repeated"
                ));
                return;
            }
            if r.session.state().is_final() {
                return;
            }
            let total = check.pages.len() as u64;
            if first.checked_add(count).is_none_or(|end| end > total) {
                let text = format!(
                    "the digest of chunk {seq} names pages {first}..{} of a room of {total}",
                    first.saturating_add(count)
                );
                self.out.refuse(format!("room {room}: {text}"));
                self.fail(room, FailureKind::Integrity, text, now);
                return;
            }
            check.digests.insert(seq, (first, count, digest));
            self.try_verify(room, seq);
            return;
        }
        match msg {
            KvMessage::RoomAccepted { .. } => {
                let before = r.session.state();
                r.session.accepted();
                if r.session.state() != before {
                    self.out.changed.push(room);
                }
            }
            KvMessage::RoomRejected { kind, reason, .. } => {
                // A rejected room was never paired: the sender writes nothing for it.
                r.quiet = true;
                r.told = true;
                let text = format!("rejected by the sender: {reason}");
                self.fail(room, kind_from_wire(kind), text, now);
            }
            KvMessage::RoomAbort { kind, reason, .. } => {
                let kind = kind_from_wire(kind).as_seen_by_peer();
                let text = if reason.starts_with("aborted by the") {
                    reason
                } else {
                    format!("the sender failed: {reason}")
                };
                self.fail(room, kind, text, now);
            }
            KvMessage::RoomAbortAck { .. } => {
                r.quiet = true;
                r.ack_until = None;
                self.out.changed.push(room);
            }
            _ => {}
        }
    }

    /// Fires the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        for key in self.out.timers.due(now) {
            match key {
                TimerKey::Room(room) => self.room_timer(room, now),
                TimerKey::Conn(conn) => self.conn_timer(conn, now),
                TimerKey::Pending(_) => {}
            }
        }
    }

    fn room_timer(&mut self, room: u64, now: Instant) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if let Some(until) = r.ack_until
            && now >= until
        {
            r.ack_until = None;
            r.quiet = true;
            if let Some((peer, _)) = r.peer {
                self.out
                    .actions
                    .push_back(DecodeAction::StopInbound { peer });
            }
            self.out.changed.push(room);
        }
        let state = r.session.state();
        if !state.is_final() && now >= r.deadline {
            let text = self.timing.overdue(state);
            self.fail(room, FailureKind::Timeout, text, now);
        }
    }

    fn conn_timer(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        match c.phase {
            Phase::Connecting { until } | Phase::Hello { until, .. } if now >= until => {
                let text = format!(
                    "the KV channel to {} did not open within {} ms",
                    c.addr,
                    self.timing.connect_timeout.as_millis()
                );
                self.out.actions.push_back(DecodeAction::Close { conn });
                self.drop_conn(conn, FailureKind::Timeout, text, false, now);
            }
            Phase::Connecting { .. } | Phase::Hello { .. } => {}
            Phase::Open { .. } => {
                if let Some(silent) = self.out.beat(conn, &mut c.live, &self.timing, now) {
                    let text = silence(c.addr, silent);
                    self.out.actions.push_back(DecodeAction::Close { conn });
                    self.drop_conn(conn, FailureKind::PeerLost, text, true, now);
                }
            }
        }
    }

    /// Fails every room and forgets every channel (the manager is going away).
    pub fn shutdown(&mut self, now: Instant) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.out.actions.push_back(DecodeAction::Close { conn });
            self.drop_conn(
                conn,
                FailureKind::Shutdown,
                "the KV manager shut down".into(),
                false,
                now,
            );
        }
    }

    /// Channels open or opening, and rooms held.
    pub fn counts(&self) -> (usize, usize) {
        (self.conns.len(), self.rooms.len())
    }
}

impl Polled for DecodeEndpoint {
    type Action = DecodeAction;

    fn queues(&self) -> &Queues<DecodeAction> {
        &self.out
    }

    fn queues_mut(&mut self) -> &mut Queues<DecodeAction> {
        &mut self.out
    }
}
