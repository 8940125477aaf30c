//! Initiator side of an RDMA peer: one RC QP per lane, work-request chains posted under
//! send-queue credits with selective signalling, completion back to batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::credits::{Credits, signal_points};
use super::verbs::{Completion, Qp, Rail, Wr, WrOp, wc_status_name};
use super::{RdmaTransport, Token};
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::memory::SegmentGuard;
use crate::request::Op;
use crate::transport::Work;
use crate::transport::tcp::TcpConn;
use crate::wire::{NO_RAIL, QpInfo, RailInfo, RdmaEndpoint};

/// Send-queue depth of each initiator QP.
const SQ_DEPTH: u32 = 1024;
/// Signal one work request in this many (and the last of every chain).
const SIGNAL_EVERY: usize = 64;
/// Longest chain posted with one doorbell.
const MAX_CHAIN: usize = 256;

/// Completes a work's unit once the last token that carries it is gone, with the first error
/// any of them saw, after releasing the work's memory pins.
pub(crate) struct Finish {
    batch: Arc<Batch>,
    guards: Option<Arc<[SegmentGuard]>>,
    error: Mutex<Option<String>>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        drop(self.guards.take());
        let result = match self.error.lock().take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.batch.complete_unit(result);
    }
}

/// One lane: an RC QP from a local rail to a remote rail.
pub(crate) struct Lane {
    qp: Qp,
    rail: usize,
    remote_rail: u16,
    credits: Credits,
    dead: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Lane {
    fn fail(&self, reason: String) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            if reason.ends_with("locally") {
                tracing::debug!(qpn = self.qp.qpn, %reason, "rdma lane closed");
            } else {
                tracing::warn!(qpn = self.qp.qpn, %reason, "rdma lane failed");
            }
            *self.reason.lock() = Some(reason);
            self.qp.set_error();
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.dead.load(Ordering::Acquire) {
            return Err(self
                .reason
                .lock()
                .clone()
                .unwrap_or_else(|| "lane closed".into()));
        }
        Ok(())
    }
}

/// Handles one polled send completion.
pub(crate) fn complete(token: Token, c: &Completion, rail: &Rail) {
    token.lane.credits.give(token.covers);
    let mut error = None;
    if c.status != 0 {
        let first = token.lane.reason.lock().clone();
        let reason = first.unwrap_or_else(|| {
            format!(
                "{} on rail {} ({}:{}) QP {}",
                wc_status_name(c.status),
                rail.info.index,
                rail.device,
                rail.info.port,
                token.lane.qp.qpn
            )
        });
        token.lane.fail(reason.clone());
        error = Some(reason);
    }
    if let Some(f) = token.finish {
        if let Some(e) = error {
            f.error.lock().get_or_insert(e);
        }
        drop(f);
    }
}

/// An RDMA peer as the initiator sees it.
pub(crate) struct RdmaLink {
    pub(crate) control: Arc<TcpConn>,
    pub(crate) lanes: Vec<Arc<Lane>>,
    transport: Arc<RdmaTransport>,
}

/// QPs created before the handshake, waiting for the target's answer.
pub(crate) struct PreparedLanes {
    qps: Vec<Qp>,
}

impl RdmaLink {
    /// Creates `per_rail` QPs on every local rail and the endpoint that offers them.
    pub(crate) fn prepare(
        t: &Arc<RdmaTransport>,
        per_rail: usize,
    ) -> Result<(PreparedLanes, RdmaEndpoint)> {
        let mut qps = Vec::new();
        for _ in 0..per_rail {
            for r in &t.rails {
                qps.push(r.create_qp(SQ_DEPTH, 1, 1)?);
            }
        }
        let offer = RdmaEndpoint {
            rails: t.rail_infos(),
            qps: qps
                .iter()
                .map(|q| QpInfo {
                    rail: q.rail.info.index,
                    qpn: q.qpn,
                    psn: q.psn,
                    peer_rail: NO_RAIL,
                })
                .collect(),
        };
        Ok((PreparedLanes { qps }, offer))
    }

    /// Connects the prepared QPs to the target's answer.
    pub(crate) fn finish(
        t: &Arc<RdmaTransport>,
        prepared: PreparedLanes,
        answer: &RdmaEndpoint,
        control: Arc<TcpConn>,
    ) -> Result<RdmaLink> {
        if answer.qps.len() != prepared.qps.len() {
            return Err(Error::Handshake {
                peer: String::new(),
                reason: format!(
                    "peer answered {} QPs for {} offered",
                    answer.qps.len(),
                    prepared.qps.len()
                ),
            });
        }
        let mut lanes = Vec::with_capacity(prepared.qps.len());
        for (qp, theirs) in prepared.qps.into_iter().zip(&answer.qps) {
            let remote: &RailInfo = answer
                .rails
                .iter()
                .find(|r| r.index == theirs.rail)
                .expect("validated by the decoder");
            qp.connect(remote, theirs.qpn, theirs.psn)?;
            lanes.push(Arc::new(Lane {
                rail: qp.rail.info.index as usize,
                remote_rail: theirs.rail,
                qp,
                credits: Credits::new(SQ_DEPTH),
                dead: AtomicBool::new(false),
                reason: Mutex::new(None),
            }));
        }
        let link = RdmaLink {
            control,
            lanes,
            transport: t.clone(),
        };
        Ok(link)
    }

    /// Everything outstanding fails and the QPs stop (peer lost or closed).
    pub(crate) fn fail_all(lanes: &[Arc<Lane>], reason: &str) {
        for l in lanes {
            l.fail(reason.to_string());
        }
    }

    /// Each lane's (local rail index, remote rail index).
    pub(crate) fn lane_rails(&self) -> Vec<(usize, u16)> {
        self.lanes.iter().map(|l| (l.rail, l.remote_rail)).collect()
    }

    /// `Err(PeerLost)` once the control connection or any lane died.
    pub(crate) fn check_alive(&self) -> Result<()> {
        self.control.check_alive()?;
        for l in &self.lanes {
            if let Err(reason) = l.check() {
                return Err(Error::PeerLost {
                    peer: "rdma peer".into(),
                    epoch: 0,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Work requests not yet completed on `lane` (a load measure).
    pub(crate) fn outstanding(&self, lane: usize) -> usize {
        self.lanes[lane].credits.in_use()
    }

    /// Posts `work` on `lane`. `remote(segment, rail)` gives the peer's base address and rkey.
    pub(crate) fn post(
        &self,
        lane: usize,
        work: Work,
        remote: &dyn Fn(u32, u16) -> Option<(u64, u32)>,
    ) {
        let l = &self.lanes[lane];
        if let Err(reason) = l.check() {
            return work.abandon(&reason);
        }
        if work.batch.is_failed() {
            return work.abandon("batch failed before it was sent");
        }
        let mut wrs = Vec::with_capacity(work.slices.len() + 1);
        let mut missing = None;
        for s in &work.slices {
            let seg = work.guard_for(s.local_addr, s.len).segment().info.id.0;
            let (Some(lkey), Some((base, rkey))) = (
                self.transport.lkey(seg, l.rail),
                remote(s.remote_segment.0, l.remote_rail),
            ) else {
                missing = Some(format!(
                    "no memory key for local segment {seg} on rail {} or remote segment {} on peer rail {}",
                    l.rail, s.remote_segment, l.remote_rail
                ));
                break;
            };
            wrs.push(Wr {
                op: if s.op == Op::Write {
                    WrOp::Write
                } else {
                    WrOp::Read
                },
                wr_id: 0,
                signaled: false,
                lkey,
                addr: s.local_addr,
                len: s.len as u32,
                rkey,
                remote_addr: base + s.remote_offset,
            });
        }
        if let Some(reason) = missing {
            return work.abandon(&reason);
        }
        if let Some(imm) = work.notify {
            // A zero-length write carrying the immediate: RC delivers it after this lane's data.
            let last = *wrs.last().expect("a lane's work has slices");
            wrs.push(Wr {
                op: WrOp::WriteImm(imm),
                len: 0,
                ..last
            });
        }
        let finish = Arc::new(Finish {
            batch: work.batch.clone(),
            guards: Some(work.guards.clone()),
            error: Mutex::new(None),
        });
        drop(work);
        self.post_chains(l, &mut wrs, &finish);
    }

    fn post_chains(&self, l: &Arc<Lane>, wrs: &mut [Wr], finish: &Arc<Finish>) {
        let rail = l.rail;
        let mut start = 0;
        while start < wrs.len() {
            // Take send-queue credits; the rail's poller returns them as completions arrive.
            let want = (wrs.len() - start).min(MAX_CHAIN);
            let got = loop {
                if let Err(reason) = l.check() {
                    finish.error.lock().get_or_insert(reason);
                    return;
                }
                match l.credits.take(want) {
                    0 => std::thread::yield_now(),
                    n => break n,
                }
            };
            let chain = &mut wrs[start..start + got];
            let mut tokens = Vec::new();
            for (i, covers) in signal_points(chain.len(), SIGNAL_EVERY) {
                let id = self.transport.next_token.fetch_add(1, Ordering::Relaxed);
                chain[i].signaled = true;
                chain[i].wr_id = id;
                tokens.push((
                    id,
                    Token {
                        covers,
                        lane: l.clone(),
                        finish: Some(finish.clone()),
                    },
                ));
            }
            let ids: Vec<u64> = tokens.iter().map(|(id, _)| *id).collect();
            self.transport.tokens[rail].lock().extend(tokens);
            if let Err(e) = l.qp.post_chain(chain) {
                // Nothing of this chain was queued: take its tokens back, stop the lane.
                let mut map = self.transport.tokens[rail].lock();
                for id in ids {
                    map.remove(&id);
                }
                drop(map);
                l.credits.give(got as u32);
                finish.error.lock().get_or_insert(e.to_string());
                l.fail(e.to_string());
                return;
            }
            start += got;
        }
    }

    /// Closes the link: the QPs stop; flushed work completes with an error.
    pub(crate) fn close(&self) {
        Self::fail_all(&self.lanes, "connection closed locally");
        self.control.close();
    }

    /// After [`close`](Self::close): waits for the control connection's threads and until
    /// every work request posted on the lanes has completed or been flushed (the QPs are in
    /// ERROR, so the rail pollers collect the flushes quickly), so no READ lands in local
    /// memory afterwards. Gives up after `limit` with a warning naming the lanes still busy.
    pub(crate) fn join(&self, limit: Duration) {
        self.control.join();
        let deadline = std::time::Instant::now() + limit;
        while self.lanes.iter().any(|l| l.credits.in_use() > 0) {
            if std::time::Instant::now() >= deadline {
                let busy: Vec<u32> = self
                    .lanes
                    .iter()
                    .filter(|l| l.credits.in_use() > 0)
                    .map(|l| l.qp.qpn)
                    .collect();
                tracing::warn!(?busy, "rdma lanes still have work outstanding after close");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
