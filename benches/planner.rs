//! Planner benchmarks: `plan()` on the KV-cache shapes the engine sees.
//!
//! Run with `cargo bench --bench planner`. Divan's item throughput is requests per second;
//! time / requests = cost per request.

use divan::Bencher;
use divan::counter::ItemsCount;
use kvtransfer::plan::{PlanParams, plan};
use kvtransfer::{Request, SegmentId};

fn main() {
    divan::main();
}

const LAYERS: u64 = 61;
const PAGES: u64 = 256;
/// Bytes per page per layer.
const PAGE_LAYER: u64 = 36 * 1024;
const SRC_BASE: u64 = 0x7f00_0000_0000;
const SEG: SegmentId = SegmentId(1);

const PARAMS: PlanParams = PlanParams {
    max_slice: 256 * 1024,
    lanes: 4,
    min_stripe_bytes: 64 * 1024,
    first_lane: 1,
};

/// Tiny deterministic xorshift64 (no rand crate in benches).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Destination page for each source page: runs of random length 1..=8 over the pages,
/// placed in shuffled order (scattered but partly contiguous).
fn scattered_dst_pages(seed: u64) -> Vec<u64> {
    let mut rng = XorShift(seed);
    // Cut 0..PAGES into runs of length 1..=8.
    let mut runs = Vec::new();
    let mut start = 0;
    while start < PAGES {
        let len = (1 + rng.below(8)).min(PAGES - start);
        runs.push((start, len));
        start += len;
    }
    // Fisher-Yates shuffle of the runs.
    for i in (1..runs.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        runs.swap(i, j);
    }
    runs.iter().flat_map(|&(s, l)| s..s + l).collect()
}

/// One write per (layer, page): source pages 0..PAGES contiguous, destination pages `dst`.
fn kv_requests(dst: &[u64]) -> Vec<Request> {
    let src_layer_stride = PAGES * PAGE_LAYER;
    // The destination pool is larger than what one request moves.
    let dst_layer_stride = 4 * PAGES * PAGE_LAYER;
    let mut reqs = Vec::with_capacity((LAYERS * PAGES) as usize);
    for l in 0..LAYERS {
        for (src_page, &dst_page) in dst.iter().enumerate() {
            reqs.push(Request::write(
                SRC_BASE + l * src_layer_stride + src_page as u64 * PAGE_LAYER,
                PAGE_LAYER,
                SEG,
                l * dst_layer_stride + dst_page * PAGE_LAYER,
            ));
        }
    }
    reqs
}

fn bench_plan(bencher: Bencher, reqs: &[Request], params: PlanParams) {
    bencher
        .counter(ItemsCount::new(reqs.len()))
        .bench(|| plan(divan::black_box(reqs), divan::black_box(&params)));
}

/// 61 layers x 256 pages x 36 KiB, destination pages scattered in runs of 1..=8.
#[divan::bench]
fn kv_scattered(bencher: Bencher) {
    let reqs = kv_requests(&scattered_dst_pages(0x9e37_79b9_7f4a_7c15));
    bench_plan(bencher, &reqs, PARAMS);
}

/// Same shape, destination pages contiguous (best case: one run per layer).
#[divan::bench]
fn kv_contiguous(bencher: Bencher) {
    let dst: Vec<u64> = (0..PAGES).collect();
    let reqs = kv_requests(&dst);
    bench_plan(bencher, &reqs, PARAMS);
}

/// The bench CLI's small-batch shape: 128 scattered 4 KiB blocks.
#[divan::bench]
fn small_4k_x128(bencher: Bencher) {
    let reqs: Vec<Request> = (0..128u64)
        .map(|i| Request::write(SRC_BASE + i * 8192, 4096, SEG, (127 - i) * 8192))
        .collect();
    bench_plan(bencher, &reqs, PARAMS);
}
