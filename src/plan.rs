//! The transfer planner: requests → coalesced slices → per-lane work lists. Pure, no I/O.
//!
//! SKELETON: bodies are filled in by the planner work item.

use crate::memory::SegmentId;
use crate::request::{Op, Request};

/// A contiguous piece of one transfer, at most `max_slice` bytes, carried by one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Write or read.
    pub op: Op,
    /// Local start address.
    pub local_addr: u64,
    /// Length in bytes (> 0, <= max_slice).
    pub len: u64,
    /// Segment at the peer.
    pub remote_segment: SegmentId,
    /// Offset in that segment.
    pub remote_offset: u64,
}

/// Planner knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanParams {
    /// Largest slice, bytes (> 0).
    pub max_slice: u64,
    /// Number of lanes (connections or QPs) to spread over (>= 1).
    pub lanes: usize,
    /// A batch whose total is at most this many bytes goes on one lane (fewer acks).
    pub min_stripe_bytes: u64,
    /// Lane to start from (callers rotate it so small batches spread across lanes).
    pub first_lane: usize,
}

/// The planner's output: one ordered slice list per lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// `lanes[i]` = slices for lane i, in submission order. Empty lanes allowed.
    pub lanes: Vec<Vec<Slice>>,
    /// Total bytes over all slices.
    pub total_bytes: u64,
}

/// Plans `requests` (already validated: len > 0) under `params`.
pub fn plan(requests: &[Request], params: &PlanParams) -> Plan {
    let _ = (requests, params);
    todo!("planner")
}
