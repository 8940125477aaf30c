//! What the engine reports about itself: per-rail counters, the metrics snapshot and the
//! Prometheus text (see `crate::metrics`).

use super::*;

impl TransferEngine {
    /// What each RDMA rail carried as initiator, in rail order (empty over TCP): bytes
    /// posted, and bytes moved between rails when one failed (docs/rdma.md, "Rail failover").
    /// [`metrics`](Self::metrics) has these and more.
    pub fn rail_stats(&self) -> Vec<RailStats> {
        self.inner
            .rail_metrics()
            .into_iter()
            .map(|m| RailStats {
                rail: m.rail,
                device: m.device,
                posted_bytes: m.posted_bytes,
                moved_in_bytes: m.moved_in_bytes,
                moved_out_bytes: m.moved_out_bytes,
            })
            .collect()
    }

    /// A snapshot of the engine's metrics: batches by outcome with their latency, bytes
    /// moved by done batches in total and per connected peer, work in flight per peer and
    /// rail, each RDMA rail's work requests, completions, errors, failovers and rejoins,
    /// refused input, and the rooms of its KV manager. Cheap: counters are read, not
    /// computed.
    pub fn metrics(&self) -> MetricsSnapshot {
        let e = &self.inner;
        e.refresh_gauges();
        let mut m = e.metrics.snapshot();
        let mut peers: Vec<(u64, Arc<Peer>)> = e
            .peers
            .read()
            .iter()
            .map(|(id, p)| (*id, p.clone()))
            .collect();
        peers.sort_by_key(|(id, _)| *id);
        m.peers = peers
            .iter()
            .map(|(_, p)| {
                let (written, read, done, failed, timed_out) = p.counters.snapshot();
                PeerStats {
                    addr: p.info.addr,
                    transport: p.info.transport,
                    bytes_written: written,
                    bytes_read: read,
                    batches_done: done,
                    batches_failed: failed,
                    batches_timed_out: timed_out,
                    outstanding: p.counters.outstanding.get().max(0) as u64,
                }
            })
            .collect();
        m.rails = e.rail_metrics();
        m.rooms = e.rooms.get().map(|r| r.snapshot());
        m
    }

    /// The engine's metrics in the Prometheus text format (OpenMetrics 1.0: counters end in
    /// `_total`, histograms have `_bucket`/`_sum`/`_count`, a `# EOF` line ends it), every
    /// series named `kvt_*`. Serve it with the content type
    /// `application/openmetrics-text; version=1.0.0; charset=utf-8`, as the engine's own
    /// endpoint does (`metrics_listen`).
    pub fn metrics_text(&self) -> String {
        self.inner.metrics_text()
    }

    /// The room counters of this engine's KV manager (one per engine).
    pub(crate) fn room_counters(&self, role: crate::kv::KvRole) -> Arc<RoomCounters> {
        self.inner
            .rooms
            .get_or_init(|| Arc::new(self.inner.metrics.rooms(role)))
            .clone()
    }
}

impl Engine {
    /// The metrics text, gauges read first.
    pub(super) fn metrics_text(&self) -> String {
        self.refresh_gauges();
        self.metrics.text()
    }

    /// Sets the gauges from the live state: work in flight per peer and per rail, refused
    /// input.
    fn refresh_gauges(&self) {
        self.metrics.set_refused(self.served.refusals.total());
        let peers: Vec<Arc<Peer>> = self.peers.read().values().cloned().collect();
        let mut per_rail = vec![0u64; self.rdma.as_ref().map_or(0, |r| r.rails.len())];
        for p in &peers {
            let lanes = p.link.lanes() + usize::from(p.link.staging_lane().is_some());
            let units: usize = (0..lanes).map(|l| p.link.outstanding(l)).sum();
            p.counters.outstanding.set(units as i64);
            if let Some(link) = p.link.rdma() {
                for l in link.current().iter() {
                    if let Some(n) = per_rail.get_mut(l.rail()) {
                        *n += l.in_use.load(Ordering::Relaxed) as u64;
                    }
                }
            }
        }
        if let Some(r) = &self.rdma {
            for (s, n) in r.stats.iter().zip(per_rail) {
                s.outstanding.set(n as i64);
            }
        }
    }

    /// Each rail's counters, in rail order (empty over TCP).
    fn rail_metrics(&self) -> Vec<RailMetrics> {
        let Some(r) = &self.rdma else {
            return Vec::new();
        };
        r.rails
            .iter()
            .zip(&r.stats)
            .enumerate()
            .map(|(i, (rail, s))| RailMetrics {
                rail: i,
                device: format!("{}:{}", rail.device, rail.info.port),
                posted_bytes: s.posted.get(),
                work_requests: s.work_requests.get(),
                completions: s.completions.get(),
                errors: s.errors(),
                moved_in_bytes: s.moved_in.get(),
                moved_out_bytes: s.moved_out.get(),
                rejoins: s.rejoins.get(),
                outstanding: s.outstanding.get().max(0) as u64,
            })
            .collect()
    }
}
