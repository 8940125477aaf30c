//! The transfer planner: requests → coalesced slices → per-lane work lists. Pure, no I/O.

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
///
/// 1. Consecutive requests with the same op and remote segment whose local and remote
///    ranges both continue the current run are coalesced (callers' order is kept; O(n)).
/// 2. Each run is split into slices of at most `params.max_slice` bytes.
/// 3. If the batch is small (`total_bytes <= min_stripe_bytes`) or there is one lane, every
///    slice goes to lane `first_lane % lanes`; otherwise each slice goes to the lane with the
///    fewest bytes so far (ties: the first such lane counting from `first_lane`), so lanes
///    end up within `max_slice` bytes of each other.
///
/// `max_slice == 0` is treated as unlimited and `lanes == 0` as one lane (both are caller
/// bugs; debug builds assert). The result always has exactly `max(lanes, 1)` lanes.
pub fn plan(requests: &[Request], params: &PlanParams) -> Plan {
    debug_assert!(params.max_slice > 0, "PlanParams::max_slice must be > 0");
    debug_assert!(params.lanes > 0, "PlanParams::lanes must be >= 1");
    let max_slice = if params.max_slice == 0 {
        u64::MAX
    } else {
        params.max_slice
    };
    let lanes = params.lanes.max(1);
    let first_lane = params.first_lane % lanes;

    let (runs, total_bytes, n_slices) = coalesce(requests, max_slice);

    let mut out: Vec<Vec<Slice>> = Vec::with_capacity(lanes);
    if lanes == 1 || total_bytes <= params.min_stripe_bytes {
        let slices = if n_slices == runs.len() {
            // No run needs splitting: the run list is the slice list. It was sized for one
            // run per request; give back the excess if coalescing removed most of them.
            let mut runs = runs;
            if runs.capacity() / 2 > runs.len() {
                runs.shrink_to_fit();
            }
            runs
        } else {
            let mut slices = Vec::with_capacity(n_slices);
            for run in &runs {
                split(run, max_slice, |s| slices.push(s));
            }
            slices
        };
        out.resize_with(lanes, Vec::new);
        out[first_lane] = slices;
    } else {
        // Byte balancing keeps slice counts close when slices are similar in size; leave
        // some headroom for mixed sizes so lanes rarely reallocate.
        let per_lane = n_slices.div_ceil(lanes);
        let cap = per_lane.saturating_add(per_lane / 4).saturating_add(2);
        out.resize_with(lanes, || Vec::with_capacity(cap));
        match lanes {
            2 => stripe_fixed::<2>(&runs, max_slice, &mut out),
            3 => stripe_fixed::<3>(&runs, max_slice, &mut out),
            4 => stripe_fixed::<4>(&runs, max_slice, &mut out),
            5 => stripe_fixed::<5>(&runs, max_slice, &mut out),
            6 => stripe_fixed::<6>(&runs, max_slice, &mut out),
            7 => stripe_fixed::<7>(&runs, max_slice, &mut out),
            8 => stripe_fixed::<8>(&runs, max_slice, &mut out),
            _ => stripe_heap(&runs, max_slice, lanes, &mut out),
        }
        // Position k was filled for lane (first_lane + k) % lanes.
        out.rotate_right(first_lane);
    }
    Plan {
        lanes: out,
        total_bytes,
    }
}

/// Coalesces consecutive contiguous requests into runs (a run's `len` may exceed
/// `max_slice`). Returns the runs, the total byte count and how many slices the runs split
/// into.
fn coalesce(requests: &[Request], max_slice: u64) -> (Vec<Slice>, u64, usize) {
    let mut runs: Vec<Slice> = Vec::with_capacity(requests.len());
    let mut total: u64 = 0;
    let mut n_slices: usize = 0;
    let Some((first, rest)) = requests.split_first() else {
        return (runs, 0, 0);
    };
    let mut cur = to_slice(first);
    total = total.saturating_add(first.len);
    for r in rest {
        total = total.saturating_add(r.len);
        let merged = if r.op == cur.op
            && r.remote_segment == cur.remote_segment
            && cur.local_addr.checked_add(cur.len) == Some(r.local_addr)
            && cur.remote_offset.checked_add(cur.len) == Some(r.remote_offset)
        {
            cur.len.checked_add(r.len)
        } else {
            None
        };
        if let Some(len) = merged {
            cur.len = len;
        } else {
            n_slices = n_slices.saturating_add(slice_count(cur.len, max_slice));
            runs.push(cur);
            cur = to_slice(r);
        }
    }
    n_slices = n_slices.saturating_add(slice_count(cur.len, max_slice));
    runs.push(cur);
    (runs, total, n_slices)
}

#[inline]
fn to_slice(r: &Request) -> Slice {
    Slice {
        op: r.op,
        local_addr: r.local_addr,
        len: r.len,
        remote_segment: r.remote_segment,
        remote_offset: r.remote_offset,
    }
}

/// Number of slices of at most `max_slice` bytes that `len` bytes split into.
#[inline]
fn slice_count(len: u64, max_slice: u64) -> usize {
    if len <= max_slice {
        1
    } else {
        usize::try_from(len.div_ceil(max_slice)).unwrap_or(usize::MAX)
    }
}

/// Calls `emit` with the pieces of `run`, in order, each at most `max_slice` bytes.
#[inline]
fn split(run: &Slice, max_slice: u64, mut emit: impl FnMut(Slice)) {
    if run.len <= max_slice {
        emit(*run);
        return;
    }
    let mut off = 0u64;
    while off < run.len {
        let len = (run.len - off).min(max_slice);
        emit(Slice {
            // Wrapping: a validated request never wraps; an invalid one must not panic here.
            local_addr: run.local_addr.wrapping_add(off),
            remote_offset: run.remote_offset.wrapping_add(off),
            len,
            ..*run
        });
        off += len;
    }
}

/// Least-loaded assignment for a lane count known at compile time (`2..=8`), so the
/// per-lane byte counts stay in registers and the argmin is branch-free.
///
/// `out[k]` is filled for rotated position `k`; the caller rotates `out` so that position
/// `k` becomes lane `(first_lane + k) % lanes`. Ties go to the lowest position, i.e. towards
/// `first_lane`.
fn stripe_fixed<const N: usize>(runs: &[Slice], max_slice: u64, out: &mut [Vec<Slice>]) {
    let Ok(out) = <&mut [Vec<Slice>; N]>::try_from(out) else {
        unreachable!("caller passes exactly N lanes");
    };
    let mut load = [0u64; N];
    for run in runs {
        split(run, max_slice, |s| {
            let mut best = 0;
            let mut best_load = load[0];
            for (k, &l) in load.iter().enumerate().skip(1) {
                let less = l < best_load;
                best = if less { k } else { best };
                best_load = if less { l } else { best_load };
            }
            for (k, l) in load.iter_mut().enumerate() {
                *l = l.saturating_add(if k == best { s.len } else { 0 });
            }
            out[best].push(s);
        });
    }
}

/// Least-loaded assignment with a min-heap, for more than eight lanes. Same position
/// convention and tie-breaking as [`stripe_fixed`].
fn stripe_heap(runs: &[Slice], max_slice: u64, lanes: usize, out: &mut [Vec<Slice>]) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // (load, rotated position): the smallest load wins, then the smallest position.
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = (0..lanes).map(|k| Reverse((0, k))).collect();
    for run in runs {
        split(run, max_slice, |s| {
            if let Some(mut top) = heap.peek_mut() {
                let (load, k) = top.0;
                top.0 = (load.saturating_add(s.len), k);
                out[k].push(s);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEG: SegmentId = SegmentId(7);
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn params(
        max_slice: u64,
        lanes: usize,
        min_stripe_bytes: u64,
        first_lane: usize,
    ) -> PlanParams {
        PlanParams {
            max_slice,
            lanes,
            min_stripe_bytes,
            first_lane,
        }
    }

    fn all_slices(p: &Plan) -> Vec<Slice> {
        p.lanes.iter().flatten().copied().collect()
    }

    fn lane_bytes(p: &Plan) -> Vec<u64> {
        p.lanes
            .iter()
            .map(|l| l.iter().map(|s| s.len).sum())
            .collect()
    }

    #[test]
    fn adjacent_requests_coalesce() {
        let reqs = [
            Request::write(0x1000, 100, SEG, 500),
            Request::write(0x1000 + 100, 50, SEG, 600),
            Request::write(0x1000 + 150, 10, SEG, 650),
        ];
        let p = plan(&reqs, &params(MIB, 1, 0, 0));
        assert_eq!(
            all_slices(&p),
            vec![Slice {
                op: Op::Write,
                local_addr: 0x1000,
                len: 160,
                remote_segment: SEG,
                remote_offset: 500,
            }]
        );
        assert_eq!(p.total_bytes, 160);
    }

    #[test]
    fn non_contiguous_remote_or_local_breaks_run() {
        // Local contiguous, remote not.
        let reqs = [
            Request::write(0, 100, SEG, 0),
            Request::write(100, 100, SEG, 300),
        ];
        assert_eq!(all_slices(&plan(&reqs, &params(MIB, 1, 0, 0))).len(), 2);
        // Remote contiguous, local not.
        let reqs = [
            Request::write(0, 100, SEG, 0),
            Request::write(200, 100, SEG, 100),
        ];
        assert_eq!(all_slices(&plan(&reqs, &params(MIB, 1, 0, 0))).len(), 2);
        // Backwards (the earlier range continues the later one) is not coalesced either.
        let reqs = [
            Request::write(100, 100, SEG, 100),
            Request::write(0, 100, SEG, 0),
        ];
        assert_eq!(all_slices(&plan(&reqs, &params(MIB, 1, 0, 0))).len(), 2);
    }

    #[test]
    fn different_op_or_segment_breaks_run() {
        let reqs = [
            Request::write(0, 100, SEG, 0),
            Request::read(100, 100, SEG, 100),
        ];
        assert_eq!(all_slices(&plan(&reqs, &params(MIB, 1, 0, 0))).len(), 2);
        let reqs = [
            Request::write(0, 100, SEG, 0),
            Request::write(100, 100, SegmentId(8), 100),
        ];
        assert_eq!(all_slices(&plan(&reqs, &params(MIB, 1, 0, 0))).len(), 2);
    }

    #[test]
    fn never_merges_across_overflow() {
        let reqs = [
            Request::write(u64::MAX - 9, 10, SEG, 0),
            Request::write(0, 10, SEG, 10),
        ];
        assert_eq!(all_slices(&plan(&reqs, &params(MIB, 1, 0, 0))).len(), 2);
        let reqs = [
            Request::write(0, 10, SEG, u64::MAX - 9),
            Request::write(10, 10, SEG, 0),
        ];
        assert_eq!(all_slices(&plan(&reqs, &params(MIB, 1, 0, 0))).len(), 2);
    }

    #[test]
    fn ten_mib_splits_into_ten_slices() {
        let reqs = [Request::write(0x10_0000, 10 * MIB, SEG, 4096)];
        let p = plan(&reqs, &params(MIB, 1, 0, 0));
        let s = all_slices(&p);
        assert_eq!(s.len(), 10);
        for (i, sl) in s.iter().enumerate() {
            let off = i as u64 * MIB;
            assert_eq!(sl.len, MIB);
            assert_eq!(sl.local_addr, 0x10_0000 + off);
            assert_eq!(sl.remote_offset, 4096 + off);
        }
        assert_eq!(p.total_bytes, 10 * MIB);
    }

    #[test]
    fn last_piece_may_be_shorter() {
        let reqs = [Request::read(0, 2 * MIB + 5, SEG, 0)];
        let s = all_slices(&plan(&reqs, &params(MIB, 1, 0, 0)));
        assert_eq!(s.iter().map(|s| s.len).collect::<Vec<_>>(), [MIB, MIB, 5]);
    }

    #[test]
    fn small_batch_lands_on_first_lane_only() {
        let reqs: Vec<Request> = (0..8)
            .map(|i| Request::write(i * 8 * KIB, 4 * KIB, SEG, i * 4 * KIB))
            .collect();
        for first_lane in 0..9 {
            let p = plan(&reqs, &params(KIB, 4, 64 * KIB, first_lane));
            assert_eq!(p.lanes.len(), 4);
            for (i, lane) in p.lanes.iter().enumerate() {
                if i == first_lane % 4 {
                    assert_eq!(lane.len(), 32);
                } else {
                    assert!(lane.is_empty());
                }
            }
            assert_eq!(p.total_bytes, 32 * KIB);
        }
    }

    #[test]
    fn single_lane_gets_everything() {
        let reqs = [Request::write(0, 10 * MIB, SEG, 0)];
        let p = plan(&reqs, &params(MIB, 1, 0, 5));
        assert_eq!(p.lanes.len(), 1);
        assert_eq!(p.lanes[0].len(), 10);
    }

    #[test]
    fn large_batch_balanced_across_four_lanes() {
        // Scattered requests of mixed sizes.
        let mut reqs = Vec::new();
        let mut local = 0u64;
        for i in 0..1000u64 {
            let len = 1 + (i * 7919) % (300 * KIB);
            reqs.push(Request::write(local, len, SEG, local * 2));
            local += len + 1;
        }
        let max_slice = 256 * KIB;
        let p = plan(&reqs, &params(max_slice, 4, 64 * KIB, 2));
        assert_eq!(p.lanes.len(), 4);
        let bytes = lane_bytes(&p);
        let max = *bytes.iter().max().unwrap();
        let min = *bytes.iter().min().unwrap();
        assert!(max - min <= max_slice, "lane bytes {bytes:?}");
        assert_eq!(bytes.iter().sum::<u64>(), p.total_bytes);
        assert_eq!(p.total_bytes, reqs.iter().map(|r| r.len).sum::<u64>());
        // Order kept within each lane (local addresses increase with submission order here).
        for lane in &p.lanes {
            assert!(lane.windows(2).all(|w| w[0].local_addr < w[1].local_addr));
        }
    }

    #[test]
    fn striping_starts_at_first_lane() {
        let reqs = [Request::write(0, 4 * MIB, SEG, 0)];
        let p = plan(&reqs, &params(MIB, 4, 0, 6));
        // Equal slices, all ties: lanes 2, 3, 0, 1 in that order.
        assert_eq!(p.lanes[2][0].local_addr, 0);
        assert_eq!(p.lanes[3][0].local_addr, MIB);
        assert_eq!(p.lanes[0][0].local_addr, 2 * MIB);
        assert_eq!(p.lanes[1][0].local_addr, 3 * MIB);
    }

    #[test]
    fn many_lanes_use_heap_and_balance() {
        let reqs: Vec<Request> = (0..200u64)
            .map(|i| Request::write(i * 1000, 1 + (i * 37) % 900, SEG, i * 1000))
            .collect();
        let p = plan(&reqs, &params(512, 12, 0, 5));
        assert_eq!(p.lanes.len(), 12);
        let bytes = lane_bytes(&p);
        let max = *bytes.iter().max().unwrap();
        let min = *bytes.iter().min().unwrap();
        assert!(max - min <= 512, "lane bytes {bytes:?}");
        // First slice goes to first_lane on ties.
        assert_eq!(p.lanes[5][0].local_addr, 0);
    }

    #[test]
    fn lanes_count_preserved() {
        let reqs = [Request::write(0, 100, SEG, 0)];
        for lanes in 1..20 {
            for min_stripe in [0, 1000] {
                let p = plan(&reqs, &params(10, lanes, min_stripe, 3));
                assert_eq!(p.lanes.len(), lanes);
                assert_eq!(all_slices(&p).len(), 10);
            }
        }
    }

    #[test]
    fn empty_input() {
        for lanes in [1, 4, 16] {
            let p = plan(&[], &params(MIB, lanes, 0, 0));
            assert_eq!(p.lanes.len(), lanes);
            assert!(p.lanes.iter().all(Vec::is_empty));
            assert_eq!(p.total_bytes, 0);
        }
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn degenerate_params_are_tolerated() {
        let reqs = [Request::write(0, 10 * MIB, SEG, 0)];
        let p = plan(&reqs, &params(0, 0, 0, 3));
        assert_eq!(p.lanes.len(), 1);
        assert_eq!(all_slices(&p).len(), 1);
    }

    // ---- property tests ----

    /// One generated request: length, whether local / remote jump away from the cursor,
    /// where the remote cursor jumps to, segment, op.
    type Step = (u64, u64, bool, u64, u32, bool);

    fn step() -> impl Strategy<Value = Step> {
        (
            1u64..300,
            // Local gap: mostly 0 (contiguous), sometimes forward by 1..500.
            prop_oneof![3 => Just(0u64), 1 => 1u64..500],
            // Remote: mostly contiguous, sometimes jump anywhere (also backwards).
            prop::bool::weighted(0.25),
            0u64..20_000,
            // Segment: mostly 0.
            prop_oneof![4 => Just(0u32), 1 => 0u32..3],
            prop::bool::weighted(0.85),
        )
    }

    /// Builds requests from steps. Local addresses only move forward, so each local byte
    /// belongs to exactly one request (which lets the test map a slice back to its request).
    fn build(steps: &[Step]) -> Vec<Request> {
        let mut local = 4096u64;
        let mut remote = 0u64;
        steps
            .iter()
            .map(|&(len, gap, jump, to, seg, write)| {
                local += gap;
                if jump {
                    remote = to;
                }
                let r = Request {
                    op: if write { Op::Write } else { Op::Read },
                    local_addr: local,
                    len,
                    remote_segment: SegmentId(seg),
                    remote_offset: remote,
                };
                local += len;
                remote += len;
                r
            })
            .collect()
    }

    type Byte = (u8, u64, u32, u64);

    fn bytes_of(op: Op, local: u64, len: u64, seg: SegmentId, remote: u64, out: &mut Vec<Byte>) {
        out.extend((0..len).map(|i| (op as u8, local + i, seg.0, remote + i)));
    }

    fn check_properties(reqs: &[Request], prm: &PlanParams) -> Result<(), TestCaseError> {
        let p = plan(reqs, prm);
        prop_assert_eq!(p.lanes.len(), prm.lanes.max(1));

        // (a) Same bytes land in the same places.
        let mut want = Vec::new();
        for r in reqs {
            bytes_of(
                r.op,
                r.local_addr,
                r.len,
                r.remote_segment,
                r.remote_offset,
                &mut want,
            );
        }
        let mut got = Vec::new();
        for s in p.lanes.iter().flatten() {
            bytes_of(
                s.op,
                s.local_addr,
                s.len,
                s.remote_segment,
                s.remote_offset,
                &mut got,
            );
        }
        want.sort_unstable();
        got.sort_unstable();
        prop_assert!(want == got, "byte mapping changed");

        // (b) Slice lengths in 1..=max_slice.
        for s in p.lanes.iter().flatten() {
            prop_assert!(s.len >= 1 && s.len <= prm.max_slice, "slice len {}", s.len);
        }

        // (c) total_bytes = sum of request lengths = sum of slice lengths.
        let req_total: u64 = reqs.iter().map(|r| r.len).sum();
        prop_assert_eq!(p.total_bytes, req_total);
        prop_assert_eq!(lane_bytes(&p).iter().sum::<u64>(), req_total);

        // (d) Per lane, origin request indices are non-decreasing.
        let origin = |s: &Slice| {
            reqs.iter()
                .position(|r| r.local_addr <= s.local_addr && s.local_addr < r.local_addr + r.len)
                .expect("slice starts inside some request")
        };
        for lane in &p.lanes {
            let idx: Vec<usize> = lane.iter().map(origin).collect();
            prop_assert!(
                idx.windows(2).all(|w| w[0] <= w[1]),
                "order broken: {:?}",
                idx
            );
        }

        // (e) Never more slices than splitting the uncoalesced requests.
        let uncoalesced: u64 = reqs.iter().map(|r| r.len.div_ceil(prm.max_slice)).sum();
        prop_assert!(p.lanes.iter().flatten().count() as u64 <= uncoalesced);

        // Small batches / one lane: everything on first_lane % lanes. Otherwise balanced.
        let lanes = prm.lanes.max(1);
        if lanes == 1 || req_total <= prm.min_stripe_bytes {
            for (i, lane) in p.lanes.iter().enumerate() {
                prop_assert!(i == prm.first_lane % lanes || lane.is_empty());
            }
        } else {
            let b = lane_bytes(&p);
            let spread = b.iter().max().unwrap() - b.iter().min().unwrap();
            prop_assert!(spread <= prm.max_slice, "lane bytes {:?}", b);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_plan_keeps_bytes_order_and_limits(
            steps in prop::collection::vec(step(), 0..=64),
            max_slice in 1u64..200,
            lanes in 1usize..5,
            min_stripe_bytes in prop_oneof![Just(0u64), 0u64..4000],
            first_lane in 0usize..8,
        ) {
            let reqs = build(&steps);
            check_properties(&reqs, &params(max_slice, lanes, min_stripe_bytes, first_lane))?;
        }

        #[test]
        fn prop_plan_many_lanes(
            steps in prop::collection::vec(step(), 0..=64),
            max_slice in 1u64..200,
            lanes in 9usize..17,
            first_lane in 0usize..20,
        ) {
            let reqs = build(&steps);
            check_properties(&reqs, &params(max_slice, lanes, 0, first_lane))?;
        }
    }
}
