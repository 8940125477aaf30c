//! The KV room protocol as two sans-IO endpoints, one per role, in the style of quinn-proto.
//!
//! An endpoint holds every room, destination and control channel of one manager and decides
//! everything the protocol decides: which message goes where, when a room fails and with
//! which [`FailureKind`], when a channel is dead. It does no I/O, reads no
//! clock and starts no thread: the caller feeds it events with the current time
//! (`handle`, `connected`, `closed`, `handle_timeout`, the room calls) and drains what it asks
//! for (`poll_transmit`, `poll_action`, `poll_changed`), waking it again at `poll_timeout`.
//! The manager's driver (`kv::driver`) moves the bytes and the time; the tests in
//! `endpoint::tests` drive two endpoints against each other on a virtual clock.

pub mod decode;
pub mod prefill;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::KvPoll;
use super::failure::{Failure, FailureKind};
use super::layout::KvLayout;
use super::proto::KvMessage;

pub use decode::{DecodeAction, DecodeEndpoint};
pub use prefill::{ChunkPlan, PrefillAction, PrefillEndpoint};

/// A control channel, named by the driver that carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// The times an endpoint enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A room that has not succeeded this long after it was created fails.
    pub room_timeout: Duration,
    /// A channel that has not exchanged hellos this long after it was asked for fails its rooms.
    pub connect_timeout: Duration,
    /// Longest a channel stays silent before a heartbeat goes out.
    pub heartbeat_interval: Duration,
    /// A channel from which nothing arrived this long is dead: its rooms fail as peer lost.
    pub heartbeat_timeout: Duration,
    /// Longest an abort waits for the peer's word that no write of the room is in flight.
    pub abort_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            room_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_millis(1000),
            heartbeat_timeout: Duration::from_secs(5),
            abort_timeout: Duration::from_secs(10),
        }
    }
}

impl Timing {
    /// Why a room stuck in `state` failed at its deadline.
    pub(crate) fn overdue(&self, state: KvPoll) -> String {
        format!(
            "deadline of {} ms exceeded while {}",
            self.room_timeout.as_millis(),
            state.as_str()
        )
    }
}

/// Who an endpoint is: what its hello says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its engine's id.
    pub engine_id: u64,
    /// Its engine's epoch.
    pub epoch: u64,
    /// Its engine's bootstrap address.
    pub engine_addr: SocketAddr,
    /// Its KV layout.
    pub layout: KvLayout,
}

impl Identity {
    fn hello(&self, link: u64) -> KvMessage {
        KvMessage::Hello {
            engine_id: self.engine_id,
            epoch: self.epoch,
            engine_addr: self.engine_addr.to_string(),
            layout: self.layout.clone(),
            link,
        }
    }
}

/// A message for the driver to send on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The channel.
    pub conn: ConnId,
    /// The message.
    pub msg: KvMessage,
}

/// A peer's hello, checked: its engine, its bootstrap address and its layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerHello {
    pub(crate) engine: (u64, u64),
    pub(crate) link: u64,
    pub(crate) addr: SocketAddr,
    pub(crate) layout: KvLayout,
}

/// Checks a hello against the engine the channel's handshake named. Its address may name a
/// port only: its ip must be unspecified or the one the channel comes from (`from`), so a
/// hello can never make this engine dial another host (the data path connects there).
pub(crate) fn check_hello(
    msg: KvMessage,
    engine: (u64, u64),
    from: SocketAddr,
) -> Result<PeerHello, String> {
    let KvMessage::Hello {
        engine_id,
        epoch,
        engine_addr,
        layout,
        link,
    } = msg
    else {
        return Err("the KV channel did not start with a hello".into());
    };
    if (engine_id, epoch) != engine {
        return Err("the KV hello names another engine than the connection's".into());
    }
    let mut addr: SocketAddr = engine_addr
        .parse()
        .map_err(|_| format!("bad engine address {engine_addr:?} in the KV hello"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(from.ip());
    }
    if addr.ip().to_canonical() != from.ip().to_canonical() {
        return Err(format!(
            "the KV hello names engine address {addr}, but the channel comes from {}: a hello \
             may only name a port of its own host",
            from.ip()
        ));
    }
    if addr.port() == 0 {
        return Err("the KV hello names port 0".into());
    }
    Ok(PeerHello {
        engine: (engine_id, epoch),
        link,
        addr,
        layout,
    })
}

/// Whether a channel is alive, by what it last heard and said.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Liveness {
    last_rx: Instant,
    last_tx: Instant,
}

/// What a channel's heartbeat timer decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Beat {
    /// Nothing arrived for longer than the heartbeat timeout.
    Dead(Duration),
    /// Send a heartbeat now (and check again at the instant).
    Send(Instant),
    /// Check again at the instant.
    Wait(Instant),
}

impl Liveness {
    pub(crate) fn new(now: Instant) -> Self {
        Liveness {
            last_rx: now,
            last_tx: now,
        }
    }

    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_rx = self.last_rx.max(now);
    }

    pub(crate) fn said(&mut self, now: Instant) {
        self.last_tx = self.last_tx.max(now);
    }

    /// Decides at `now`; the instant returned is when to ask again.
    pub(crate) fn check(&mut self, now: Instant, t: &Timing) -> Beat {
        let silent = now.saturating_duration_since(self.last_rx);
        if silent >= t.heartbeat_timeout {
            return Beat::Dead(silent);
        }
        let dead_at = self.last_rx + t.heartbeat_timeout;
        if now >= self.last_tx + t.heartbeat_interval {
            self.last_tx = now;
            return Beat::Send((now + t.heartbeat_interval).min(dead_at));
        }
        Beat::Wait((self.last_tx + t.heartbeat_interval).min(dead_at))
    }
}

/// What a timer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TimerKey {
    /// A room's deadline or abort wait.
    Room(u64),
    /// A channel's connect deadline or heartbeat.
    Conn(ConnId),
    /// A destination (or a tombstone) waiting for its sender.
    Pending(u64),
}

/// Pending timers, earliest first. A timer may fire early or late: its owner checks its own
/// deadlines when it fires and sets the next one.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    set: BTreeSet<(Instant, TimerKey)>,
}

impl Timers {
    pub(crate) fn add(&mut self, at: Instant, key: TimerKey) {
        self.set.insert((at, key));
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.set.first().map(|(at, _)| *at)
    }

    /// Removes and returns the keys due at `now`, earliest first, without duplicates.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<TimerKey> {
        let mut out = Vec::new();
        while let Some(&(at, key)) = self.set.first() {
            if at > now {
                break;
            }
            self.set.pop_first();
            if !out.contains(&key) {
                out.push(key);
            }
        }
        out
    }
}

/// Marks a room failed: the session falls to Failed and, if it was not final, the failure is
/// recorded with the state it left. Returns whether it changed anything.
pub(crate) fn record_failure(
    state: KvPoll,
    failed: bool,
    slot: &mut Option<Failure>,
    kind: FailureKind,
    text: String,
) -> bool {
    if !failed {
        return false;
    }
    *slot = Some(Failure { kind, state, text });
    true
}

/// The kind a peer's message names, defaulting to "rejected" for a code this build does not know.
pub(crate) fn kind_from_wire(code: u8) -> FailureKind {
    FailureKind::from_code(code as i32).unwrap_or(FailureKind::Rejected)
}

/// What an endpoint hands its driver: messages, actions, rooms whose state changed, and its
/// timers.
#[derive(Debug)]
pub struct Queues<A> {
    pub(crate) timers: Timers,
    pub(crate) transmits: VecDeque<Transmit>,
    pub(crate) actions: VecDeque<A>,
    pub(crate) changed: Vec<u64>,
    /// Peer input refused, with its reason, for the driver's (rate-limited) log; at most
    /// [`MAX_REFUSALS`] wait, the rest are counted.
    pub(crate) refusals: VecDeque<String>,
    pub(crate) refusals_dropped: u64,
}

/// Most refusal texts an endpoint keeps for its driver.
pub(crate) const MAX_REFUSALS: usize = 64;

impl<A> Default for Queues<A> {
    fn default() -> Self {
        Queues {
            timers: Timers::default(),
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
            changed: Vec::new(),
            refusals: VecDeque::new(),
            refusals_dropped: 0,
        }
    }
}

impl<A> Queues<A> {
    /// Records refused peer input and why, for the log.
    pub(crate) fn refuse(&mut self, text: String) {
        if self.refusals.len() >= MAX_REFUSALS {
            self.refusals_dropped += 1;
        } else {
            self.refusals.push_back(text);
        }
    }

    /// Runs channel `conn`'s heartbeat timer: a heartbeat goes out when due and the next check
    /// is set. Returns how long the channel has been silent once that is past the timeout.
    pub(crate) fn beat(
        &mut self,
        conn: ConnId,
        live: &mut Liveness,
        t: &Timing,
        now: Instant,
    ) -> Option<Duration> {
        let next = match live.check(now, t) {
            Beat::Dead(silent) => return Some(silent),
            Beat::Send(next) => {
                let msg = KvMessage::Heartbeat;
                self.transmits.push_back(Transmit { conn, msg });
                next
            }
            Beat::Wait(next) => next,
        };
        self.timers.add(next, TimerKey::Conn(conn));
        None
    }
}

/// The text of a peer lost to silence.
pub(crate) fn silence(peer: SocketAddr, silent: Duration) -> String {
    format!(
        "peer lost: nothing from {peer} for {} ms (heartbeat timeout)",
        silent.as_millis()
    )
}

/// What a driver drains from an endpoint of either role.
pub trait Polled {
    /// The role's actions.
    type Action;

    /// The endpoint's queues.
    fn queues(&self) -> &Queues<Self::Action>;

    /// The endpoint's queues, to drain.
    fn queues_mut(&mut self) -> &mut Queues<Self::Action>;

    /// When `handle_timeout` wants to run next.
    fn poll_timeout(&self) -> Option<Instant> {
        self.queues().timers.next()
    }

    /// The next message to send.
    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.queues_mut().transmits.pop_front()
    }

    /// Whether actions wait for the driver.
    fn has_actions(&self) -> bool {
        !self.queues().actions.is_empty()
    }

    /// The next action for the driver.
    fn poll_action(&mut self) -> Option<Self::Action> {
        self.queues_mut().actions.pop_front()
    }

    /// Rooms whose state (decode: or quietness) changed since the last call.
    fn poll_changed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.queues_mut().changed)
    }

    /// The next refused peer input, with its reason (for a rate-limited log).
    fn poll_refusal(&mut self) -> Option<String> {
        self.queues_mut().refusals.pop_front()
    }
}
