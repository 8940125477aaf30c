//! Engine metrics: counters and histograms kept by the engine as it works, read as a
//! [`MetricsSnapshot`] or as Prometheus (OpenMetrics) text.
//!
//! The hot path touches only atomics it holds a handle to: a rail worker adds to its rail's
//! counters when it posts a chain and polls completions, a batch records itself once when it
//! becomes final (a few counters and one histogram observation), a KV manager records a room
//! when it leaves Bootstrapping and when it ends. Gauges (work in flight per peer and rail,
//! refused input) are read from the live state when a snapshot or the text is asked for.
//! [`prometheus_client`] keeps the counters and histograms and writes the text format.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::kv::{FailureKind, KvRole};

/// Label set of every series.
type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Latency buckets: 10 µs doubling to about 84 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-5, 2.0, 24))
}

/// A registered latency histogram with its count and sum kept beside it for snapshots
/// (`prometheus_client` shows them only in the text).
#[derive(Debug, Clone)]
struct Latency {
    histogram: Histogram,
    count: Arc<AtomicU64>,
    nanos: Arc<AtomicU64>,
}

impl Latency {
    fn new(histogram: Histogram) -> Latency {
        Latency {
            histogram,
            count: Arc::default(),
            nanos: Arc::default(),
        }
    }

    fn observe(&self, d: Duration) {
        self.histogram.observe(d.as_secs_f64());
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn summary(&self) -> Summary {
        Summary {
            count: self.count.load(Ordering::Relaxed),
            sum_secs: self.nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done = 0,
    Failed = 1,
    TimedOut = 2,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
        }
    }
}

/// Every metric family of one engine, registered once.
pub(crate) struct Metrics {
    registry: Registry,
    /// The series a batch adds to, resolved once: batches by outcome (in `Outcome` order),
    /// bytes written and read.
    ended: [Counter; 3],
    written: Counter,
    read: Counter,
    batches: Family<Labels, Counter>,
    batch_seconds: Latency,
    bytes: Family<Labels, Counter>,
    peer_bytes: Family<Labels, Counter>,
    peer_batches: Family<Labels, Counter>,
    peer_outstanding: Family<Labels, Gauge>,
    rail_bytes: Family<Labels, Counter>,
    rail_wrs: Family<Labels, Counter>,
    rail_completions: Family<Labels, Counter>,
    rail_errors: Family<Labels, Counter>,
    rail_moved_in: Family<Labels, Counter>,
    rail_moved_out: Family<Labels, Counter>,
    rail_rejoins: Family<Labels, Counter>,
    rail_outstanding: Family<Labels, Gauge>,
    refused: Counter,
    rooms_started: Family<Labels, Counter>,
    rooms_succeeded: Family<Labels, Counter>,
    rooms_failed: Family<Labels, Counter>,
    room_bytes: Family<Labels, Counter>,
    room_bootstrap: Histograms,
    room_transfer: Histograms,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The families, registered under the `kvt_` prefix.
    pub(crate) fn new() -> Metrics {
        let mut r = Registry::with_prefix("kvt");
        let m = Metrics {
            ended: Default::default(),
            written: Counter::default(),
            read: Counter::default(),
            batches: Family::default(),
            batch_seconds: Latency::new(latency_histogram()),
            bytes: Family::default(),
            peer_bytes: Family::default(),
            peer_batches: Family::default(),
            peer_outstanding: Family::default(),
            rail_bytes: Family::default(),
            rail_wrs: Family::default(),
            rail_completions: Family::default(),
            rail_errors: Family::default(),
            rail_moved_in: Family::default(),
            rail_moved_out: Family::default(),
            rail_rejoins: Family::default(),
            rail_outstanding: Family::default(),
            refused: Counter::default(),
            rooms_started: Family::default(),
            rooms_succeeded: Family::default(),
            rooms_failed: Family::default(),
            room_bytes: Family::default(),
            room_bootstrap: Family::new_with_constructor(latency_histogram),
            room_transfer: Family::new_with_constructor(latency_histogram),
            registry: Registry::default(),
        };
        r.register(
            "batches",
            "Batches that ended, by outcome (done, failed, timed_out)",
            m.batches.clone(),
        );
        r.register(
            "batch_seconds",
            "Submit to completion of batches that were done",
            m.batch_seconds.histogram.clone(),
        );
        r.register(
            "bytes",
            "Bytes of done batches by op (write, read), every peer together",
            m.bytes.clone(),
        );
        r.register(
            "peer_bytes",
            "Bytes of done batches per peer and op (write, read)",
            m.peer_bytes.clone(),
        );
        r.register(
            "peer_batches",
            "Batches that ended per peer, by outcome",
            m.peer_batches.clone(),
        );
        r.register(
            "peer_outstanding_units",
            "Completion units in flight per peer (its lanes' queue depth)",
            m.peer_outstanding.clone(),
        );
        r.register(
            "rail_posted_bytes",
            "Bytes of work posted on each RDMA rail (moved work included)",
            m.rail_bytes.clone(),
        );
        r.register(
            "rail_work_requests",
            "Work requests posted on each RDMA rail",
            m.rail_wrs.clone(),
        );
        r.register(
            "rail_completions",
            "Work requests completed (or flushed) on each RDMA rail",
            m.rail_completions.clone(),
        );
        r.register(
            "rail_errors",
            "Error completions on each RDMA rail, by work completion status",
            m.rail_errors.clone(),
        );
        r.register(
            "rail_moved_in_bytes",
            "Bytes of work moved onto each rail from a rail whose path failed",
            m.rail_moved_in.clone(),
        );
        r.register(
            "rail_moved_out_bytes",
            "Bytes of work moved off each rail when its path failed",
            m.rail_moved_out.clone(),
        );
        r.register(
            "rail_rejoins",
            "Lanes of a failed rail put back into a live peer",
            m.rail_rejoins.clone(),
        );
        r.register(
            "rail_outstanding_work_requests",
            "Work requests in flight on each RDMA rail (its queue depth)",
            m.rail_outstanding.clone(),
        );
        r.register(
            "refused",
            "Peer input refused: handshakes, malformed frames, out-of-segment accesses",
            m.refused.clone(),
        );
        r.register(
            "rooms_started",
            "KV rooms created, by role",
            m.rooms_started.clone(),
        );
        r.register(
            "rooms_succeeded",
            "KV rooms that reached Success, by role",
            m.rooms_succeeded.clone(),
        );
        r.register(
            "rooms_failed",
            "KV rooms that failed, by role and failure kind",
            m.rooms_failed.clone(),
        );
        r.register(
            "room_bytes",
            "Bytes of KV rooms that reached Success, by role",
            m.room_bytes.clone(),
        );
        r.register(
            "room_bootstrap_seconds",
            "Room created to its bootstrap done (WaitingForInput or later), by role",
            m.room_bootstrap.clone(),
        );
        r.register(
            "room_transfer_seconds",
            "First write posted (decode: first chunk notified) to Success, by role",
            m.room_transfer.clone(),
        );
        let ended = [Outcome::Done, Outcome::Failed, Outcome::TimedOut].map(|o| {
            m.batches
                .get_or_create_owned(&vec![("outcome", o.label().to_string())])
        });
        let op = |o: &str| m.bytes.get_or_create_owned(&vec![("op", o.to_string())]);
        Metrics {
            registry: r,
            ended,
            written: op("write"),
            read: op("read"),
            ..m
        }
    }

    /// The metrics in the Prometheus/OpenMetrics text format (`# EOF` at the end).
    pub(crate) fn text(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The counters of peer `id` at `addr` (its series exist from now on, at 0).
    pub(crate) fn peer(self: &Arc<Self>, addr: SocketAddr, id: u64) -> PeerCounters {
        let base: Labels = vec![("peer", addr.to_string()), ("id", id.to_string())];
        let with = |k: &'static str, v: &str| {
            let mut l = base.clone();
            l.push((k, v.to_string()));
            l
        };
        let of = |f: &Family<Labels, Counter>, k: &'static str, v: &str| {
            f.get_or_create_owned(&with(k, v))
        };
        PeerCounters {
            written: of(&self.peer_bytes, "op", "write"),
            read: of(&self.peer_bytes, "op", "read"),
            done: of(&self.peer_batches, "outcome", "done"),
            failed: of(&self.peer_batches, "outcome", "failed"),
            timed_out: of(&self.peer_batches, "outcome", "timed_out"),
            outstanding: self.peer_outstanding.get_or_create_owned(&base),
            metrics: self.clone(),
            base,
        }
    }

    /// A rail's counters.
    pub(crate) fn rail(&self, rail: usize, device: &str) -> RailCounters {
        let labels: Labels = vec![("rail", rail.to_string()), ("device", device.to_string())];
        RailCounters {
            posted: self.rail_bytes.get_or_create_owned(&labels),
            work_requests: self.rail_wrs.get_or_create_owned(&labels),
            completions: self.rail_completions.get_or_create_owned(&labels),
            moved_in: self.rail_moved_in.get_or_create_owned(&labels),
            moved_out: self.rail_moved_out.get_or_create_owned(&labels),
            rejoins: self.rail_rejoins.get_or_create_owned(&labels),
            outstanding: self.rail_outstanding.get_or_create_owned(&labels),
            errors: self.rail_errors.clone(),
            errors_total: Counter::default(),
            labels,
        }
    }

    /// The room counters of a KV manager of `role` (its series exist from now on, at 0).
    pub(crate) fn rooms(self: &Arc<Self>, role: KvRole) -> RoomCounters {
        let role_labels: Labels = vec![("role", role_name(role).into())];
        RoomCounters {
            started: self.rooms_started.get_or_create_owned(&role_labels),
            succeeded: self.rooms_succeeded.get_or_create_owned(&role_labels),
            bytes: self.room_bytes.get_or_create_owned(&role_labels),
            bootstrap: Latency::new(self.room_bootstrap.get_or_create_owned(&role_labels)),
            transfer: Latency::new(self.room_transfer.get_or_create_owned(&role_labels)),
            failed: FailureKind::ALL
                .iter()
                .map(|&k| {
                    let labels = vec![
                        ("role", role_name(role).to_string()),
                        ("kind", k.name().to_string()),
                    ];
                    (k, self.rooms_failed.get_or_create_owned(&labels))
                })
                .collect(),
            role,
        }
    }

    fn batches_of(&self, outcome: Outcome) -> u64 {
        self.ended[outcome as usize].get()
    }

    /// The engine-wide part of a snapshot (peers, rails and rooms are the engine's to add).
    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            batches_done: self.batches_of(Outcome::Done),
            batches_failed: self.batches_of(Outcome::Failed),
            batches_timed_out: self.batches_of(Outcome::TimedOut),
            batch_latency: self.batch_seconds.summary(),
            bytes_written: self.written.get(),
            bytes_read: self.read.get(),
            refused: self.refused.get(),
            peers: Vec::new(),
            rails: Vec::new(),
            rooms: None,
        }
    }

    /// Brings the refused-input counter up to `total`.
    pub(crate) fn set_refused(&self, total: u64) {
        let now = self.refused.get();
        if total > now {
            self.refused.inc_by(total - now);
        }
    }
}

fn role_name(role: KvRole) -> &'static str {
    match role {
        KvRole::Prefill => "prefill",
        KvRole::Decode => "decode",
    }
}

/// One peer's counters; its series go when the peer is disconnected.
#[derive(Debug, Clone)]
pub(crate) struct PeerCounters {
    written: Counter,
    read: Counter,
    done: Counter,
    failed: Counter,
    timed_out: Counter,
    pub(crate) outstanding: Gauge,
    metrics: Arc<Metrics>,
    /// `peer` (address) and `id` labels.
    base: Labels,
}

impl PeerCounters {
    /// Records a batch of `written` and `read` bytes submitted at `started` that ended now.
    pub(crate) fn batch_ended(&self, outcome: Outcome, started: Instant, written: u64, read: u64) {
        let m = &self.metrics;
        m.ended[outcome as usize].inc();
        match outcome {
            Outcome::Done => {
                self.done.inc();
                self.written.inc_by(written);
                self.read.inc_by(read);
                m.written.inc_by(written);
                m.read.inc_by(read);
                m.batch_seconds.observe(started.elapsed());
            }
            Outcome::Failed => {
                self.failed.inc();
            }
            Outcome::TimedOut => {
                self.timed_out.inc();
            }
        }
    }

    /// Removes the peer's series (it was disconnected).
    pub(crate) fn remove(&self) {
        let m = &self.metrics;
        let with = |k: &'static str, v: &str| {
            let mut l = self.base.clone();
            l.push((k, v.to_string()));
            l
        };
        for op in ["write", "read"] {
            m.peer_bytes.remove(&with("op", op));
        }
        for o in [Outcome::Done, Outcome::Failed, Outcome::TimedOut] {
            m.peer_batches.remove(&with("outcome", o.label()));
        }
        m.peer_outstanding.remove(&self.base);
    }

    /// What this peer's batches moved and how they ended.
    pub(crate) fn snapshot(&self) -> (u64, u64, u64, u64, u64) {
        (
            self.written.get(),
            self.read.get(),
            self.done.get(),
            self.failed.get(),
            self.timed_out.get(),
        )
    }
}

/// One RDMA rail's counters, updated by its worker and the failover.
#[derive(Debug)]
pub(crate) struct RailCounters {
    /// Bytes of every unit posted on the rail (moved ones included).
    pub(crate) posted: Counter,
    /// Work requests posted.
    pub(crate) work_requests: Counter,
    /// Work requests completed or flushed.
    pub(crate) completions: Counter,
    /// Bytes of units moved onto this rail from a failed one.
    pub(crate) moved_in: Counter,
    /// Bytes of units moved off this rail when its path failed.
    pub(crate) moved_out: Counter,
    /// Lanes put back on this rail after it failed.
    pub(crate) rejoins: Counter,
    /// Work requests in flight (set when read).
    pub(crate) outstanding: Gauge,
    errors: Family<Labels, Counter>,
    /// Error completions, every status together.
    errors_total: Counter,
    labels: Labels,
}

impl RailCounters {
    /// Counts an error completion of `status` (its `ibv_wc_status` name).
    pub(crate) fn error(&self, status: &str) {
        let mut l = self.labels.clone();
        l.push(("status", status.to_string()));
        self.errors.get_or_create(&l).inc();
        self.errors_total.inc();
    }

    /// Error completions so far, every status together.
    pub(crate) fn errors(&self) -> u64 {
        self.errors_total.get()
    }
}

/// A KV manager's room counters.
#[derive(Debug)]
pub(crate) struct RoomCounters {
    started: Counter,
    succeeded: Counter,
    bytes: Counter,
    bootstrap: Latency,
    transfer: Latency,
    failed: Vec<(FailureKind, Counter)>,
    role: KvRole,
}

impl RoomCounters {
    /// A room was created.
    pub(crate) fn started(&self) {
        self.started.inc();
    }

    /// A room finished its bootstrap `took` after it was created.
    pub(crate) fn bootstrapped(&self, took: Duration) {
        self.bootstrap.observe(took);
    }

    /// A room reached Success with `bytes`, its transfer having taken `transfer` (when known).
    pub(crate) fn succeeded(&self, bytes: u64, transfer: Option<Duration>) {
        self.succeeded.inc();
        self.bytes.inc_by(bytes);
        if let Some(t) = transfer {
            self.transfer.observe(t);
        }
    }

    /// A room failed with `kind`.
    pub(crate) fn failed(&self, kind: FailureKind) {
        if let Some((_, c)) = self.failed.iter().find(|(k, _)| *k == kind) {
            c.inc();
        }
    }

    /// The public view.
    pub(crate) fn snapshot(&self) -> RoomStats {
        RoomStats {
            role: self.role,
            started: self.started.get(),
            succeeded: self.succeeded.get(),
            failed: self.failed.iter().map(|(_, c)| c.get()).sum(),
            failed_by_kind: self
                .failed
                .iter()
                .map(|(k, c)| (*k, c.get()))
                .filter(|(_, n)| *n > 0)
                .collect(),
            bytes: self.bytes.get(),
            bootstrap: self.bootstrap.summary(),
            transfer: self.transfer.summary(),
        }
    }
}

/// Count and sum of a histogram's observations (its buckets are in the text format).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum_secs: f64,
}

impl Summary {
    /// The mean observation, if any.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_secs_f64(self.sum_secs / self.count as f64))
    }
}

/// What a connected peer's batches moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer's bootstrap address.
    pub addr: SocketAddr,
    /// Transport name (`tcp`, `rdma`).
    pub transport: &'static str,
    /// Bytes written by batches that were done.
    pub bytes_written: u64,
    /// Bytes read by batches that were done.
    pub bytes_read: u64,
    /// Batches done.
    pub batches_done: u64,
    /// Batches failed (deadline aside).
    pub batches_failed: u64,
    /// Batches that missed their deadline.
    pub batches_timed_out: u64,
    /// Completion units in flight now (the peer's queue depth).
    pub outstanding: u64,
}

/// What one RDMA rail carried as initiator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailMetrics {
    /// Rail index.
    pub rail: usize,
    /// `device:port`.
    pub device: String,
    /// Bytes of work posted on it (moved work included).
    pub posted_bytes: u64,
    /// Work requests posted.
    pub work_requests: u64,
    /// Work requests completed or flushed.
    pub completions: u64,
    /// Error completions.
    pub errors: u64,
    /// Bytes of work moved onto it from a failed rail.
    pub moved_in_bytes: u64,
    /// Bytes of work moved off it when its path failed.
    pub moved_out_bytes: u64,
    /// Lanes put back on it after it failed.
    pub rejoins: u64,
    /// Work requests in flight now (its queue depth).
    pub outstanding: u64,
}

/// The rooms of a KV manager's role.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomStats {
    /// Prefill or decode.
    pub role: KvRole,
    /// Rooms created.
    pub started: u64,
    /// Rooms that reached Success.
    pub succeeded: u64,
    /// Rooms that failed.
    pub failed: u64,
    /// Failed rooms by failure kind (kinds with none left out).
    pub failed_by_kind: Vec<(FailureKind, u64)>,
    /// Bytes of rooms that reached Success.
    pub bytes: u64,
    /// Room created to its bootstrap done.
    pub bootstrap: Summary,
    /// First write (decode: first chunk) to Success.
    pub transfer: Summary,
}

/// What one batch moved and how long it took
/// ([`TransferEngine::batch_metrics`](crate::TransferEngine::batch_metrics)): the numbers the
/// engine adds to its counters when the batch ends, for a caller that accounts per request
/// (SGLang's `get_transfer_metric()` per room).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchMetrics {
    /// Bytes its write requests move to the peer.
    pub bytes_written: u64,
    /// Bytes its read requests move from the peer.
    pub bytes_read: u64,
    /// From submit until the batch became final (done, failed or timed out); `None` while it
    /// is pending.
    pub latency: Option<Duration>,
}

/// A snapshot of an engine's metrics ([`TransferEngine::metrics`](crate::TransferEngine::metrics)).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Batches done.
    pub batches_done: u64,
    /// Batches failed (deadline aside).
    pub batches_failed: u64,
    /// Batches that missed their deadline.
    pub batches_timed_out: u64,
    /// Submit to completion of batches that were done.
    pub batch_latency: Summary,
    /// Bytes written by done batches, over every peer (disconnected ones included).
    pub bytes_written: u64,
    /// Bytes read by done batches, over every peer (disconnected ones included).
    pub bytes_read: u64,
    /// Peer input refused (see [`TransferEngine::refused_connections`](crate::TransferEngine::refused_connections)).
    pub refused: u64,
    /// Connected peers.
    pub peers: Vec<PeerStats>,
    /// RDMA rails, in rail order (empty over TCP).
    pub rails: Vec<RailMetrics>,
    /// The rooms of the engine's KV manager, if it has one.
    pub rooms: Option<RoomStats>,
}
