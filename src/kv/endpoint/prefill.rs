//! The prefill side's endpoint: sending rooms, destinations that wait for their sender, and
//! the channels decode managers opened to us.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Instant;

use super::{
    ConnId, Identity, Liveness, Polled, Queues, TimerKey, Timing, Transmit, check_hello,
    kind_from_wire, record_failure, silence,
};
use crate::error::{Error, Result};
use crate::kv::KvPoll;
use crate::kv::failure::{Failure, FailureKind};
use crate::kv::layout::KvLayout;
use crate::kv::pages::check_pages;
use crate::kv::proto::KvMessage;
use crate::kv::session::SenderSession;

/// Most destinations one channel may park while they wait for their sender.
pub const MAX_PENDING_ROOMS: usize = 16_384;
/// Most destination pages one channel may park (4 bytes each).
pub const MAX_PENDING_PAGES: u64 = 1 << 22;
/// Most failures of unknown rooms remembered for a sender created later.
pub const MAX_TOMBSTONES: usize = 65_536;
/// Most destination pages parked over every channel together (64 MiB of page numbers).
pub const MAX_PENDING_PAGES_TOTAL: u64 = 1 << 24;
/// Most KV channels open at once.
pub const MAX_CHANNELS: usize = 1024;
/// Most KV channels open at once from one host (IP address).
pub const MAX_CHANNELS_PER_HOST: usize = 64;
/// Longest text a remembered failure keeps (a peer chooses it).
pub const MAX_TOMBSTONE_TEXT: usize = 256;

/// Work the prefill endpoint asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefillAction {
    /// Connect this engine to the decode engine `engine` at `addr` and map the layout the
    /// channel announced (in the background), then report `data_ready`.
    ConnectData {
        /// The channel whose rooms will use it.
        conn: ConnId,
        /// The decode engine's bootstrap address.
        addr: SocketAddr,
        /// The decode engine `(id, epoch)` it must be.
        engine: (u64, u64),
        /// The layout its hello announced.
        layout: KvLayout,
        /// The link token its hello handed us: the data path presents it.
        link: u64,
    },
    /// Drop the data path of `conn` (what its rooms still have in flight fails).
    DisconnectData {
        /// The channel.
        conn: ConnId,
    },
    /// Close the channel; the endpoint has forgotten it already.
    Close {
        /// The channel.
        conn: ConnId,
    },
}

/// One chunk to write, as the endpoint planned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkPlan {
    /// The channel whose data path carries it.
    pub conn: ConnId,
    /// The receiver's slot (goes into the notification tag).
    pub slot: u32,
    /// Its sequence number in the room.
    pub seq: u32,
    /// Whether it ends the room.
    pub last: bool,
    /// Destination pages of its source pages, in order (empty for an empty last chunk).
    pub dst: Vec<i32>,
    /// For the last chunk: (our aux slot, the receiver's aux slot).
    pub aux: Option<(u32, u32)>,
    /// Its first page in room order.
    pub first: u64,
    /// The receiver asked for its digest: hash the source (pages of this chunk, then aux)
    /// and hand the digest to [`PrefillEndpoint::digest`].
    pub digest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Data {
    Pending,
    Ready,
    Failed(FailureKind, String),
}

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    pages: u64,
    aux_slots: u64,
    aux_buffers: usize,
    data: Data,
}

#[derive(Debug)]
struct Conn {
    engine: (u64, u64),
    from: SocketAddr,
    /// `None` until its hello arrived (by `hello_until`).
    peer: Option<Peer>,
    hello_until: Instant,
    live: Liveness,
    rooms: HashSet<u64>,
    pending_rooms: usize,
    pending_pages: u64,
}

#[derive(Debug)]
struct Dest {
    conn: ConnId,
    slot: u32,
    aux: Option<u32>,
    pages: Vec<i32>,
    digests: bool,
}

#[derive(Debug)]
struct Room {
    session: SenderSession,
    failure: Option<Failure>,
    dest: Option<Dest>,
    told: bool,
    /// Chunks planned but not yet posted by the caller.
    posting: u32,
    /// We owe the receiver an abort acknowledgement, at the latest then.
    ack_until: Option<Instant>,
    deadline: Instant,
}

#[derive(Debug)]
struct Pending {
    dest: Dest,
    until: Instant,
}

#[derive(Debug)]
struct Tombstone {
    kind: FailureKind,
    text: String,
    until: Instant,
}

/// The prefill side's sans-IO endpoint (see the [module docs](super)).
#[derive(Debug)]
pub struct PrefillEndpoint {
    me: Identity,
    timing: Timing,
    conns: HashMap<ConnId, Conn>,
    rooms: HashMap<u64, Room>,
    pending: HashMap<u64, Pending>,
    tombstones: HashMap<u64, Tombstone>,
    owing: HashSet<u64>,
    /// Whether this manager can hash its source memory (host memory only).
    can_digest: bool,
    out: Queues<PrefillAction>,
}

impl PrefillEndpoint {
    /// An endpoint for the manager `me`.
    pub fn new(me: Identity, timing: Timing) -> Self {
        PrefillEndpoint {
            me,
            timing,
            conns: HashMap::new(),
            rooms: HashMap::new(),
            pending: HashMap::new(),
            tombstones: HashMap::new(),
            owing: HashSet::new(),
            can_digest: true,
            out: Queues::default(),
        }
    }

    /// Whether rooms that ask for digests can be served: the source must be memory this
    /// process can read (host memory). Rooms that ask otherwise are rejected.
    pub fn set_can_digest(&mut self, on: bool) {
        self.can_digest = on;
    }

    /// The digest of chunk `seq` of `room` (pages `first..first + count`), for its receiver.
    pub fn digest(
        &mut self,
        room: u64,
        seq: u32,
        first: u64,
        count: u64,
        digest: u64,
        now: Instant,
    ) {
        let Some(conn) = self.room_conn(room) else {
            return;
        };
        let msg = KvMessage::ChunkDigest {
            room,
            seq,
            first,
            count,
            digest,
        };
        self.transmit(conn, msg, now);
    }

    /// The timing in force.
    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    fn transmit(&mut self, conn: ConnId, msg: KvMessage, now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.live.said(now);
            self.out.transmits.push_back(Transmit { conn, msg });
        }
    }

    fn reject(&mut self, conn: ConnId, room: u64, e: &Error, kind: FailureKind, now: Instant) {
        if let Some(c) = self.conns.get(&conn) {
            let text = format!("room {room} from the decode manager at {}: {e}", c.from);
            self.out.refuse(text);
        }
        let msg = KvMessage::RoomRejected {
            room,
            code: e.code() as u16,
            kind: kind.code() as u8,
            reason: e.to_string(),
        };
        self.transmit(conn, msg, now);
    }

    /// A decode manager's channel `conn` arrived from `from`; its engine handshake named
    /// engine `engine`. Its hello is due within the connect timeout.
    /// Beyond [`MAX_CHANNELS`], or [`MAX_CHANNELS_PER_HOST`] from its host, it is closed.
    pub fn accepted(&mut self, conn: ConnId, engine: (u64, u64), from: SocketAddr, now: Instant) {
        let same_host = self
            .conns
            .values()
            .filter(|c| c.from.ip() == from.ip())
            .count();
        if self.conns.len() >= MAX_CHANNELS || same_host >= MAX_CHANNELS_PER_HOST {
            self.out.refuse(format!(
                "a KV channel from {from}: {} channels open ({same_host} from its host; at most \
                 {MAX_CHANNELS}, {MAX_CHANNELS_PER_HOST} per host)",
                self.conns.len()
            ));
            self.out.actions.push_back(PrefillAction::Close { conn });
            return;
        }
        let hello_until = now + self.timing.connect_timeout;
        self.conns.insert(
            conn,
            Conn {
                engine,
                from,
                peer: None,
                hello_until,
                live: Liveness::new(now),
                rooms: HashSet::new(),
                pending_rooms: 0,
                pending_pages: 0,
            },
        );
        self.out.timers.add(hello_until, TimerKey::Conn(conn));
    }

    /// Creates the sending room `room`. Its destination may be waiting already.
    pub fn create(&mut self, room: u64, now: Instant) -> Result<()> {
        if self.rooms.contains_key(&room) {
            return Err(Error::DuplicateRoom { room });
        }
        let deadline = now + self.timing.room_timeout;
        self.rooms.insert(
            room,
            Room {
                session: SenderSession::new(),
                failure: None,
                dest: None,
                told: false,
                posting: 0,
                ack_until: None,
                deadline,
            },
        );
        self.out.timers.add(deadline, TimerKey::Room(room));
        if let Some(t) = self.tombstones.remove(&room) {
            self.fail(room, t.kind, t.text, now);
        } else if let Some(p) = self.pending.remove(&room) {
            self.unpark(&p.dest);
            self.attach(room, p.dest, now);
        }
        Ok(())
    }

    fn unpark(&mut self, d: &Dest) {
        if let Some(c) = self.conns.get_mut(&d.conn) {
            c.pending_rooms -= 1;
            c.pending_pages -= d.pages.len() as u64;
        }
    }

    /// The room will carry `pages` pages and, with `aux`, that aux slot.
    pub fn init(&mut self, room: u64, pages: u64, aux: Option<u32>, now: Instant) -> Result<()> {
        if let Some(a) = aux {
            let slots = self.me.layout.aux_slots();
            if (a as u64) >= slots {
                return Err(Error::InvalidPages {
                    room,
                    reason: format!("aux index {a} outside 0..{slots}"),
                });
            }
        }
        let r = self
            .rooms
            .get_mut(&room)
            .ok_or(Error::UnknownRoom { room })?;
        let before = r.session.state();
        match r.session.init(pages, aux) {
            Ok(()) => Ok(()),
            Err(e) => {
                if r.session.state() == KvPoll::Failed && before != KvPoll::Failed {
                    let text = r.session.reason().unwrap_or_default().to_string();
                    r.failure = Some(Failure {
                        kind: FailureKind::InvalidPages,
                        state: before,
                        text: text.clone(),
                    });
                    self.out.changed.push(room);
                    self.tell(room, FailureKind::InvalidPages, text, now);
                }
                Err(e.into_error(room))
            }
        }
    }

    /// Plans the next chunk of `pages` pages (`last` ends the room). `None` for an empty
    /// chunk that is not the last. The caller posts it and reports [`posted`](Self::posted).
    pub fn send(&mut self, room: u64, pages: u64, last: bool) -> Result<Option<ChunkPlan>> {
        let r = self
            .rooms
            .get_mut(&room)
            .ok_or(Error::UnknownRoom { room })?;
        let Some(chunk) = r
            .session
            .begin_chunk(pages, last)
            .map_err(|e| e.into_error(room))?
        else {
            return Ok(None);
        };
        let d = r
            .dest
            .as_ref()
            .expect("a room past Bootstrapping has a destination");
        let at = chunk.offset as usize;
        let dst = d.pages[at..at + chunk.pages as usize].to_vec();
        let aux = match (chunk.last, r.session.aux_index(), d.aux) {
            (true, Some(a), Some(b)) => Some((a, b)),
            _ => None,
        };
        r.posting += 1;
        self.out.changed.push(room);
        Ok(Some(ChunkPlan {
            conn: d.conn,
            slot: d.slot,
            seq: chunk.seq,
            last: chunk.last,
            dst,
            aux,
            first: chunk.offset,
            digest: d.digests,
        }))
    }

    /// A planned chunk was posted (`Ok`), or could not be.
    pub fn posted(&mut self, room: u64, result: std::result::Result<(), String>, now: Instant) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        r.posting = r.posting.saturating_sub(1);
        if let Err(text) = result {
            // A chunk that was never posted has settled, as a failure.
            self.chunk_settled(room, Err(text), now);
        }
    }

    /// A posted chunk's writes all completed (`Ok`) or failed.
    pub fn chunk_settled(
        &mut self,
        room: u64,
        result: std::result::Result<(), String>,
        now: Instant,
    ) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let before = r.session.state();
        r.session.chunk_settled(result);
        let after = r.session.state();
        if after != before {
            self.out.changed.push(room);
        }
        if after == KvPoll::Failed && before != KvPoll::Failed {
            let text = r.session.reason().unwrap_or_default().to_string();
            r.failure = Some(Failure {
                kind: FailureKind::Transport,
                state: before,
                text: text.clone(),
            });
            self.tell(room, FailureKind::Transport, text, now);
        }
    }

    /// Aborts the room (unless it succeeded) and tells the receiver.
    pub fn abort(&mut self, room: u64, now: Instant) {
        self.fail(
            room,
            FailureKind::Aborted,
            "aborted by the sender".into(),
            now,
        );
    }

    /// Fails the room (no-op once final) and tells the receiver, once.
    fn fail(&mut self, room: u64, kind: FailureKind, text: String, now: Instant) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let before = r.session.state();
        let failed = r.session.fail(text.clone());
        if record_failure(before, failed, &mut r.failure, kind, text.clone()) {
            self.out.changed.push(room);
            self.tell(room, kind, text, now);
        }
    }

    fn tell(&mut self, room: u64, kind: FailureKind, reason: String, now: Instant) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(conn) = r.dest.as_ref().map(|d| d.conn) else {
            return;
        };
        if r.told {
            return;
        }
        r.told = true;
        let msg = KvMessage::RoomAbort {
            room,
            kind: kind.code() as u8,
            reason,
        };
        self.transmit(conn, msg, now);
    }

    /// Rooms that owe the receiver an abort acknowledgement and have no chunk being posted:
    /// the driver checks their writes and calls [`settled`](Self::settled) once none is in
    /// flight.
    pub fn settle_watch(&self) -> Vec<u64> {
        self.owing
            .iter()
            .copied()
            .filter(|r| self.rooms.get(r).is_some_and(|r| r.posting == 0))
            .collect()
    }

    /// Whether some receiver waits for an abort acknowledgement (the driver then checks
    /// [`settle_watch`](Self::settle_watch) often).
    pub fn owes_acks(&self) -> bool {
        !self.owing.is_empty()
    }

    /// None of the room's writes is in flight: acknowledge the receiver's abort.
    pub fn settled(&mut self, room: u64, now: Instant) {
        if !self.owing.remove(&room) {
            return;
        }
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        r.ack_until = None;
        if let Some(conn) = r.dest.as_ref().map(|d| d.conn) {
            self.transmit(conn, KvMessage::RoomAbortAck { room }, now);
        }
    }

    /// Forgets the room (its handle is gone).
    pub fn remove(&mut self, room: u64, now: Instant) {
        if self.owing.contains(&room) {
            self.settled(room, now);
        }
        if let Some(r) = self.rooms.remove(&room)
            && let Some(d) = r.dest
            && let Some(c) = self.conns.get_mut(&d.conn)
        {
            c.rooms.remove(&room);
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

    /// Chunks of the room planned but not yet posted.
    pub fn posting(&self, room: u64) -> u32 {
        self.rooms.get(&room).map_or(0, |r| r.posting)
    }

    /// The channel whose data path the room writes over, once paired.
    pub fn room_conn(&self, room: u64) -> Option<ConnId> {
        Some(self.rooms.get(&room)?.dest.as_ref()?.conn)
    }

    /// A message arrived on `conn`.
    pub fn handle(&mut self, conn: ConnId, msg: KvMessage, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.live.heard(now);
        if c.peer.is_none() {
            return self.on_hello(conn, msg, now);
        }
        match msg {
            KvMessage::RoomInit {
                room,
                slot,
                aux_index,
                pages,
                digests,
            } => self.on_room_init(
                room,
                Dest {
                    conn,
                    slot,
                    aux: aux_index,
                    pages,
                    digests,
                },
                now,
            ),
            KvMessage::RoomAbort { room, kind, reason } => {
                self.on_room_abort(conn, room, kind_from_wire(kind), reason, now)
            }
            _ => {}
        }
    }

    fn on_hello(&mut self, conn: ConnId, msg: KvMessage, now: Instant) {
        let c = &self.conns[&conn];
        let hello = match check_hello(msg, c.engine, c.from) {
            Ok(h) => h,
            Err(why) => {
                let text = format!("a KV channel from {}: {why}", c.from);
                self.out.refuse(text);
                self.conns.remove(&conn);
                self.out.actions.push_back(PrefillAction::Close { conn });
                return;
            }
        };
        // An older channel from the same decode address with another epoch: it restarted.
        let stale: Vec<(ConnId, u64)> = self
            .conns
            .iter()
            .filter(|(id, o)| {
                **id != conn
                    && o.peer.as_ref().is_some_and(|p| p.addr == hello.addr)
                    && o.engine != hello.engine
            })
            .map(|(id, o)| (*id, o.engine.1))
            .collect();
        for (old, epoch) in stale {
            let text = format!(
                "the decode manager at {} restarted (epoch {epoch:#x} → {:#x})",
                hello.addr, hello.engine.1
            );
            self.out
                .actions
                .push_back(PrefillAction::Close { conn: old });
            self.drop_conn(old, FailureKind::PeerRestarted, text, now);
        }
        let data = match self.me.layout.check_pairs_with(&hello.layout) {
            Ok(()) => {
                self.out.actions.push_back(PrefillAction::ConnectData {
                    conn,
                    addr: hello.addr,
                    engine: hello.engine,
                    layout: hello.layout.clone(),
                    link: hello.link,
                });
                Data::Pending
            }
            Err(e) => Data::Failed(FailureKind::LayoutMismatch, e.to_string()),
        };
        let c = self.conns.get_mut(&conn).expect("still there");
        c.peer = Some(Peer {
            addr: hello.addr,
            pages: hello.layout.pages(),
            aux_slots: hello.layout.aux_slots(),
            aux_buffers: hello.layout.aux.len(),
            data,
        });
        c.live = Liveness::new(now);
        let hello = self.me.hello(0);
        self.transmit(conn, hello, now);
        self.out.timers.add(now, TimerKey::Conn(conn));
    }

    /// The data path of `conn` is ready, or cannot be had.
    pub fn data_ready(
        &mut self,
        conn: ConnId,
        result: std::result::Result<(), (FailureKind, String)>,
        now: Instant,
    ) {
        let Some(p) = self.conns.get_mut(&conn).and_then(|c| c.peer.as_mut()) else {
            return;
        };
        if p.data != Data::Pending {
            return;
        }
        p.data = match result {
            Ok(()) => Data::Ready,
            Err((kind, text)) => Data::Failed(kind, text),
        };
        let rooms: Vec<u64> = self.conns[&conn].rooms.iter().copied().collect();
        for room in rooms {
            self.pair(room, now);
        }
        if let Some(Data::Failed(kind, text)) =
            self.conns[&conn].peer.as_ref().map(|p| p.data.clone())
        {
            let parked: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| p.dest.conn == conn)
                .map(|(r, _)| *r)
                .collect();
            for room in parked {
                let p = self.pending.remove(&room).expect("listed");
                self.unpark(&p.dest);
                let e = Error::RoomFailed {
                    room,
                    reason: text.clone(),
                };
                self.reject(conn, room, &e, kind, now);
                self.tombstone(room, kind, text.clone(), now);
            }
        }
    }

    fn on_room_init(&mut self, room: u64, dest: Dest, now: Instant) {
        let conn = dest.conn;
        let p = self.conns[&conn].peer.as_ref().expect("hello seen");
        if let Data::Failed(kind, text) = &p.data {
            let (kind, text) = (*kind, text.clone());
            let e = Error::RoomFailed {
                room,
                reason: text.clone(),
            };
            self.reject(conn, room, &e, kind, now);
            return self.fail_or_tombstone(room, kind, text, now);
        }
        let checked =
            check_pages(&dest.pages, p.pages, "destination").and_then(|()| match dest.aux {
                Some(a) if (a as u64) >= p.aux_slots && p.aux_buffers > 0 => {
                    Err(format!("aux index {a} outside 0..{}", p.aux_slots))
                }
                _ => Ok(()),
            });
        if let Err(reason) = checked {
            let e = Error::InvalidPages { room, reason };
            self.reject(conn, room, &e, FailureKind::InvalidPages, now);
            return self.fail_or_tombstone(room, FailureKind::InvalidPages, e.to_string(), now);
        }
        if dest.digests && !self.can_digest {
            let e = Error::InvalidArgument(
                "the receiver asks for chunk digests, but this sender's KV cache is not in \
                 host memory it can hash"
                    .into(),
            );
            self.reject(conn, room, &e, FailureKind::Integrity, now);
            return self.fail_or_tombstone(room, FailureKind::Integrity, e.to_string(), now);
        }
        if let Some(r) = self.rooms.get(&room) {
            if r.dest.is_some() {
                let e = Error::DuplicateRoom { room };
                return self.reject(conn, room, &e, FailureKind::Rejected, now);
            }
            if let Some(f) = &r.failure {
                let e = Error::RoomFailed {
                    room,
                    reason: f.text.clone(),
                };
                let kind = f.kind.as_seen_by_peer();
                return self.reject(conn, room, &e, kind, now);
            }
            return self.attach(room, dest, now);
        }
        if let Some(t) = self.tombstones.get(&room) {
            let e = Error::RoomFailed {
                room,
                reason: t.text.clone(),
            };
            let kind = t.kind.as_seen_by_peer();
            return self.reject(conn, room, &e, kind, now);
        }
        if self.pending.contains_key(&room) {
            let e = Error::DuplicateRoom { room };
            return self.reject(conn, room, &e, FailureKind::Rejected, now);
        }
        let c = self.conns.get_mut(&conn).expect("checked");
        let pages = dest.pages.len() as u64;
        if c.pending_rooms >= MAX_PENDING_ROOMS || c.pending_pages + pages > MAX_PENDING_PAGES {
            let e = Error::InvalidArgument(format!(
                "too many destinations wait for their sender here ({} rooms, {} pages; at most \
                 {MAX_PENDING_ROOMS} rooms and {MAX_PENDING_PAGES} pages per peer)",
                c.pending_rooms, c.pending_pages
            ));
            return self.reject(conn, room, &e, FailureKind::Rejected, now);
        }
        let parked: u64 = self.conns.values().map(|c| c.pending_pages).sum();
        if parked + pages > MAX_PENDING_PAGES_TOTAL {
            let e = Error::InvalidArgument(format!(
                "too many destinations wait for their sender here ({parked} pages from every \
                 peer; at most {MAX_PENDING_PAGES_TOTAL})"
            ));
            return self.reject(conn, room, &e, FailureKind::Rejected, now);
        }
        let c = self.conns.get_mut(&conn).expect("checked");
        c.pending_rooms += 1;
        c.pending_pages += pages;
        let until = now + self.timing.room_timeout;
        self.pending.insert(room, Pending { dest, until });
        self.out.timers.add(until, TimerKey::Pending(room));
    }

    fn fail_or_tombstone(&mut self, room: u64, kind: FailureKind, text: String, now: Instant) {
        if self.rooms.contains_key(&room) {
            if let Some(r) = self.rooms.get_mut(&room) {
                r.told = true; // the receiver was rejected already
            }
            self.fail(room, kind, text, now);
        } else {
            self.tombstone(room, kind, text, now);
        }
    }

    fn tombstone(&mut self, room: u64, kind: FailureKind, mut text: String, now: Instant) {
        if self.tombstones.len() >= MAX_TOMBSTONES {
            return;
        }
        if text.len() > MAX_TOMBSTONE_TEXT {
            let mut end = MAX_TOMBSTONE_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        let until = now + self.timing.room_timeout;
        self.tombstones
            .insert(room, Tombstone { kind, text, until });
        self.out.timers.add(until, TimerKey::Pending(room));
    }

    /// Pairs the room with its destination: accepted once the data path is ready.
    fn attach(&mut self, room: u64, dest: Dest, now: Instant) {
        let conn = dest.conn;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.rooms.insert(room);
        let r = self.rooms.get_mut(&room).expect("caller checked");
        r.dest = Some(dest);
        self.pair(room, now);
    }

    fn pair(&mut self, room: u64, now: Instant) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if r.session.state() != KvPoll::Bootstrapping {
            return;
        }
        let Some(d) = r.dest.as_ref() else { return };
        let conn = d.conn;
        let data = self
            .conns
            .get(&conn)
            .and_then(|c| c.peer.as_ref())
            .map(|p| p.data.clone());
        match data {
            Some(Data::Ready) => {
                let n = d.pages.len() as u64;
                match r.session.peer_ready(n) {
                    Ok(()) => {
                        self.out.changed.push(room);
                        self.transmit(conn, KvMessage::RoomAccepted { room }, now);
                    }
                    Err(why) => {
                        // The receiver learns of the mismatch from the rejection.
                        r.told = true;
                        r.failure = Some(Failure {
                            kind: FailureKind::InvalidPages,
                            state: KvPoll::Bootstrapping,
                            text: why.clone(),
                        });
                        self.out.changed.push(room);
                        let e = Error::InvalidPages { room, reason: why };
                        self.reject(conn, room, &e, FailureKind::InvalidPages, now);
                    }
                }
            }
            Some(Data::Failed(kind, text)) => {
                r.told = true;
                let e = Error::RoomFailed {
                    room,
                    reason: text.clone(),
                };
                self.reject(conn, room, &e, kind, now);
                self.fail(
                    room,
                    kind,
                    format!("cannot reach the receiver: {text}"),
                    now,
                );
            }
            Some(Data::Pending) | None => {}
        }
    }

    fn on_room_abort(
        &mut self,
        conn: ConnId,
        room: u64,
        kind: FailureKind,
        reason: String,
        now: Instant,
    ) {
        let kind = kind.as_seen_by_peer();
        let text = if reason.starts_with("aborted by the") {
            reason
        } else {
            format!("the receiver failed: {reason}")
        };
        match self.rooms.get_mut(&room) {
            Some(r) if r.dest.as_ref().is_some_and(|d| d.conn == conn) => {
                r.told = true;
                self.fail(room, kind, text, now);
                let r = self.rooms.get_mut(&room).expect("present");
                if r.ack_until.is_none() {
                    let until = now + self.timing.abort_timeout;
                    r.ack_until = Some(until);
                    self.owing.insert(room);
                    self.out.timers.add(until, TimerKey::Room(room));
                }
            }
            Some(r) => {
                if r.dest.is_none() {
                    self.fail(room, kind, text, now);
                }
                self.transmit(conn, KvMessage::RoomAbortAck { room }, now);
            }
            None => {
                if self.pending.get(&room).is_some_and(|p| p.dest.conn == conn) {
                    let p = self.pending.remove(&room).expect("present");
                    self.unpark(&p.dest);
                }
                self.tombstone(room, kind, text, now);
                self.transmit(conn, KvMessage::RoomAbortAck { room }, now);
            }
        }
    }

    /// The channel closed: its rooms fail as peer lost.
    pub fn closed(&mut self, conn: ConnId, why: &str, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let text = format!("peer lost: KV channel from {} closed ({why})", c.from);
        self.drop_conn(conn, FailureKind::PeerLost, text, now);
    }

    fn drop_conn(&mut self, conn: ConnId, kind: FailureKind, text: String, now: Instant) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        for room in c.rooms {
            if let Some(r) = self.rooms.get_mut(&room) {
                r.told = true;
                r.ack_until = None;
            }
            self.owing.remove(&room);
            self.fail(room, kind, text.clone(), now);
        }
        self.pending.retain(|_, p| p.dest.conn != conn);
        if c.peer
            .is_some_and(|p| matches!(p.data, Data::Pending | Data::Ready))
        {
            self.out
                .actions
                .push_back(PrefillAction::DisconnectData { conn });
        }
    }

    /// Fires the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        for key in self.out.timers.due(now) {
            match key {
                TimerKey::Room(room) => self.room_timer(room, now),
                TimerKey::Conn(conn) => self.conn_timer(conn, now),
                TimerKey::Pending(room) => self.pending_timer(room, now),
            }
        }
    }

    fn room_timer(&mut self, room: u64, now: Instant) {
        let Some(r) = self.rooms.get(&room) else {
            return;
        };
        if r.ack_until.is_some_and(|u| now >= u) {
            // Out of patience: the receiver cuts our writes off itself if it must.
            self.settled(room, now);
        }
        let r = &self.rooms[&room];
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
        if c.peer.is_none() {
            if now >= c.hello_until {
                self.conns.remove(&conn);
                self.out.actions.push_back(PrefillAction::Close { conn });
            }
            return;
        }
        if let Some(silent) = self.out.beat(conn, &mut c.live, &self.timing, now) {
            let text = silence(c.from, silent);
            self.out.actions.push_back(PrefillAction::Close { conn });
            self.drop_conn(conn, FailureKind::PeerLost, text, now);
        }
    }

    fn pending_timer(&mut self, room: u64, now: Instant) {
        if self.pending.get(&room).is_some_and(|p| now >= p.until) {
            let p = self.pending.remove(&room).expect("present");
            self.unpark(&p.dest);
            let e = Error::UnknownRoom { room };
            self.reject(p.dest.conn, room, &e, FailureKind::Timeout, now);
        }
        if self.tombstones.get(&room).is_some_and(|t| now >= t.until) {
            self.tombstones.remove(&room);
        }
    }

    /// Fails every room and forgets every channel (the manager is going away).
    pub fn shutdown(&mut self, now: Instant) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.out.actions.push_back(PrefillAction::Close { conn });
            self.drop_conn(
                conn,
                FailureKind::Shutdown,
                "the KV manager shut down".into(),
                now,
            );
        }
        let rooms: Vec<u64> = self.rooms.keys().copied().collect();
        for room in rooms {
            self.fail(
                room,
                FailureKind::Shutdown,
                "the KV manager shut down".into(),
                now,
            );
        }
    }

    /// Channels, rooms, parked destinations and tombstones held.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.conns.len(),
            self.rooms.len(),
            self.pending.len(),
            self.tombstones.len(),
        )
    }
}

impl Polled for PrefillEndpoint {
    type Action = PrefillAction;

    fn queues(&self) -> &Queues<PrefillAction> {
        &self.out
    }

    fn queues_mut(&mut self) -> &mut Queues<PrefillAction> {
        &mut self.out
    }
}
