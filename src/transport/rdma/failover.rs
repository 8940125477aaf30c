//! Rail failover. A unit of work (one lane's share of a batch) whose lane died with its path
//! (the port left ACTIVE, retries were exhausted, a fatal QP or port event) is posted again,
//! whole, on a live lane of another rail on which its local memory is registered, with that
//! rail's keys. A unit is never moved for a local reason (closed, shut down), a peer's loss or
//! a remote error (an access the peer refused would be refused on any rail).
//!
//! Requests of the unit that had landed before the failure are written again. That is safe:
//! an RDMA WRITE of the same bytes to the same place is idempotent, and the caller's contract
//! keeps the source unchanged until the batch completes; a READ lands the same bytes again.
//! The unit's completion notification goes again too, after its data on the new lane, so the
//! receiver counts it only once all the unit's data is in. A batch fails only when no rail
//! that has its memory registered is left; GPU segments registered on their nearest
//! `rails_per_gpu` rails can move only among those.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use parking_lot::Mutex;

use super::RdmaTransport;
use super::link::{Finish, Lane, work_requests};
use super::worker::Cmd;
use crate::memory::SegmentGuard;
use crate::plan::Slice;

/// Why a lane stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Cause {
    /// It has not stopped.
    Alive = 0,
    /// Its path failed: link down, retries exhausted, a fatal QP or port event. Its work
    /// moves to another rail.
    Path = 1,
    /// Closed or shut down here.
    Local = 2,
    /// The peer is gone (its control connection closed).
    Peer = 3,
    /// The peer refused a request (access, operation): no other rail would do better.
    Remote = 4,
}

impl Cause {
    pub(crate) fn from_u8(v: u8) -> Cause {
        match v {
            1 => Cause::Path,
            2 => Cause::Local,
            3 => Cause::Peer,
            4 => Cause::Remote,
            _ => Cause::Alive,
        }
    }

    /// The cause an error completion of `status` (an `ibv_wc_status`) names.
    pub(crate) fn of_status(status: u32) -> Cause {
        const RETRY_EXC_ERR: u32 = 12;
        const RNR_RETRY_EXC_ERR: u32 = 13;
        match status {
            RETRY_EXC_ERR | RNR_RETRY_EXC_ERR => Cause::Path,
            _ => Cause::Remote,
        }
    }
}

/// What a unit needs to be posted again elsewhere.
pub(crate) struct Retry {
    lanes: Arc<[Arc<Lane>]>,
    transport: Arc<RdmaTransport>,
    slices: Vec<Slice>,
    /// The peer's `(base, rkey)` of each remote segment the unit writes, per remote rail.
    remote: HashMap<(u32, u16), (u64, u32)>,
    notify: Option<u32>,
    /// Rails this unit was on when their path failed.
    lost: Vec<usize>,
    /// The lane it is posted on now.
    pub(crate) lane: Arc<Lane>,
}

/// The local segment of a slice.
fn segment_of(guards: &[SegmentGuard], s: &Slice) -> u32 {
    guards
        .iter()
        .find(|g| {
            let i = &g.segment().info;
            s.local_addr >= i.base && s.local_addr + s.len <= i.base + i.len
        })
        .expect("every slice's local range was pinned at submit")
        .segment()
        .info
        .id
        .0
}

impl Retry {
    /// Takes a unit's `slices` and `notify` for lane `lane`, with the peer's keys of its
    /// remote segments on every remote rail of `lanes` (looked up once per segment and rail).
    pub(crate) fn new(
        lanes: Arc<[Arc<Lane>]>,
        transport: &Arc<RdmaTransport>,
        slices: Vec<Slice>,
        notify: Option<u32>,
        remote: &dyn Fn(u32, u16) -> Option<(u64, u32)>,
        lane: Arc<Lane>,
    ) -> Retry {
        let mut segments: Vec<u32> = slices.iter().map(|s| s.remote_segment.0).collect();
        segments.sort_unstable();
        segments.dedup();
        let mut rails: Vec<u16> = lanes.iter().map(|l| l.remote_rail).collect();
        rails.sort_unstable();
        rails.dedup();
        let mut keys = HashMap::with_capacity(segments.len() * rails.len());
        for &seg in &segments {
            for &rail in &rails {
                if let Some(k) = remote(seg, rail) {
                    keys.insert((seg, rail), k);
                }
            }
        }
        Retry {
            lanes,
            transport: transport.clone(),
            slices,
            remote: keys,
            notify,
            lost: Vec::new(),
            lane,
        }
    }

    /// Posts the unit on its lane with `finish` (which takes the retry along). A dead lane,
    /// or a worker that takes no more, fails `finish`, whose drop then moves or fails it.
    pub(crate) fn post(self, mut finish: Finish) {
        let l = self.lane.clone();
        let guards = finish.guards.clone().expect("pinned");
        let wrs = work_requests(
            &self.slices,
            |s| segment_of(&guards, s),
            |seg| self.transport.lkey(seg, l.rail()),
            |seg| self.remote.get(&(seg, l.remote_rail)).copied(),
            self.notify,
        );
        let bytes: u64 = self.slices.iter().map(|s| s.len).sum();
        let moved = !self.lost.is_empty();
        let transport = self.transport.clone();
        finish.retry = Some(Box::new(self));
        let wrs = match wrs {
            Ok(w) => w,
            Err(seg) => {
                finish.error.lock().get_or_insert(format!(
                    "no memory key for local segment {seg} on rail {} or remote segment on peer \
                     rail {}",
                    l.rail(),
                    l.remote_rail
                ));
                return;
            }
        };
        if let Err(reason) = l.check() {
            finish.error.lock().get_or_insert(reason);
            return;
        }
        let deadline = finish.batch.deadline;
        let n = wrs.len();
        l.in_use.fetch_add(n, Ordering::AcqRel);
        let stats = &transport.stats[l.rail()];
        stats.posted.inc_by(bytes);
        if moved {
            stats.moved_in.inc_by(bytes);
        }
        let cmd = Cmd::Post {
            lane: l.clone(),
            wrs,
            finish: Arc::new(finish),
        };
        // A unit moved off a failed rail is posted from a rail worker's thread: it must not
        // wait for another worker's queue (two workers could wait on each other).
        let deadline = if moved { Instant::now() } else { deadline };
        if let Err((cmd, reason)) = transport.workers[l.rail()].post(cmd, deadline) {
            l.in_use.fetch_sub(n, Ordering::AcqRel);
            if let Cmd::Post { finish, .. } = cmd {
                finish.fail(reason);
            }
        }
    }

    /// The unit's lane lost its path: posts it on a live lane of another rail where its
    /// memory is registered (the least busy). `Err` says why none would take it.
    pub(crate) fn repost(
        mut self,
        batch: &Arc<crate::batch::Batch>,
        guards: Arc<[SegmentGuard]>,
    ) -> std::result::Result<(), String> {
        let from = self.lane.rail();
        if self.transport.shutdown.load(Ordering::Acquire) {
            return Err("the engine is shutting down".into());
        }
        if !self.lost.contains(&from) {
            self.lost.push(from);
        }
        let registered = |l: &Lane| {
            self.slices.iter().all(|s| {
                self.transport
                    .lkey(segment_of(&guards, s), l.rail())
                    .is_some()
            }) && self.slices.iter().all(|s| {
                self.remote
                    .contains_key(&(s.remote_segment.0, l.remote_rail))
            })
        };
        let next = self
            .lanes
            .iter()
            .filter(|l| {
                !self.lost.contains(&l.rail())
                    && l.check().is_ok()
                    && super::port_down(&self.transport.rails[l.rail()]).is_none()
                    && registered(l)
            })
            .min_by_key(|l| l.in_use.load(Ordering::Acquire))
            .cloned();
        let Some(next) = next else {
            return Err(format!(
                "no surviving rail to move its work to (lost rails {:?}; the unit's memory must \
                 be registered on another live rail)",
                self.lost
            ));
        };
        tracing::warn!(
            from,
            to = next.rail(),
            slices = self.slices.len(),
            "rail failed: moving its work to another rail"
        );
        self.transport.stats[from]
            .moved_out
            .inc_by(self.slices.iter().map(|s| s.len).sum());
        self.lane = next;
        let finish = Finish {
            batch: batch.clone(),
            guards: Some(guards),
            error: Mutex::new(None),
            retry: None,
        };
        self.post(finish);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_path_failures_move_work() {
        assert_eq!(Cause::of_status(12), Cause::Path, "IBV_WC_RETRY_EXC_ERR");
        assert_eq!(
            Cause::of_status(13),
            Cause::Path,
            "IBV_WC_RNR_RETRY_EXC_ERR"
        );
        for remote in [4, 9, 10, 11] {
            assert_eq!(Cause::of_status(remote), Cause::Remote, "status {remote}");
        }
        for c in [
            Cause::Alive,
            Cause::Path,
            Cause::Local,
            Cause::Peer,
            Cause::Remote,
        ] {
            assert_eq!(Cause::from_u8(c as u8), c);
        }
    }
}
