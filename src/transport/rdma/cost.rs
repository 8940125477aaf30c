//! The software cost of a work request with no NIC: what `benches/wr_cost.rs` measures. It
//! runs the path a batch takes through this crate up to the doorbell — plan the requests,
//! build each lane's work requests, stamp their wr_ids and signal points into the lane's
//! in-flight window, write them into a queue pair's ring — then retires them as the rail
//! worker does on completion. Only `ibv_post_send` (the provider's WQE encoding and
//! doorbell) and the hand-off to the worker thread are left out.

use super::link::work_requests;
use super::outstanding::Outstanding;
use super::verbs::{Wr, WrOp};
use super::worker::stamp_chain;
use crate::plan::{PlanParams, plan};
use crate::request::Request;

/// A send queue in memory: each work request becomes a 64-byte entry, as a NIC's WQE.
#[derive(Debug)]
pub struct FakeQp {
    ring: Vec<[u64; 8]>,
    at: usize,
}

impl FakeQp {
    /// A ring of `depth` entries (> 0).
    pub fn new(depth: usize) -> Self {
        FakeQp {
            ring: vec![[0; 8]; depth.max(1)],
            at: 0,
        }
    }

    fn post(&mut self, chain: &[Wr]) {
        for w in chain {
            let op = match w.op {
                WrOp::Write => 0,
                WrOp::Read => 1,
                WrOp::WriteImm(imm) => 2 | u64::from(imm) << 8,
            };
            let slot = &mut self.ring[self.at];
            *slot = [
                w.wr_id,
                op | u64::from(w.signaled) << 1,
                u64::from(w.lkey),
                w.addr,
                u64::from(w.len),
                u64::from(w.rkey),
                w.remote_addr,
                0,
            ];
            self.at = (self.at + 1) % self.ring.len();
        }
    }
}

/// Runs one batch of `requests` (remote segment 1 at base 0) through planning, work-request
/// building, stamping and posting into `qp`, then retires every request; returns how many
/// work requests it made.
pub fn wr_pipeline(requests: &[Request], params: &PlanParams, qp: &mut FakeQp) -> usize {
    let p = plan(requests, params);
    let mut made = 0;
    for (lane, slices) in p.lanes.iter().enumerate() {
        if slices.is_empty() {
            continue;
        }
        let Ok(mut wrs) = work_requests(
            slices,
            |_| 1,
            |_| Some(0x1000 + lane as u32),
            |_| Some((0, 0x2000)),
            None,
        ) else {
            unreachable!("every key is given");
        };
        let mut out = Outstanding::<u32>::default();
        for chain in wrs.chunks_mut(256) {
            let first = stamp_chain(&mut out, lane as u32, chain, &(lane as u32));
            qp.post(chain);
            // Completion: the chain's last (signalled) request retires all of it.
            let (n, owners) = out.complete_through(first + chain.len() as u64 - 1);
            debug_assert_eq!(n as usize, chain.len());
            std::hint::black_box(owners);
        }
        made += wrs.len();
    }
    made
}
