//! Software cost per RDMA work request with no NIC: plan + work-request build + wr_id and
//! signal stamping + post into an in-memory queue pair + retirement, as a batch takes them
//! through this crate (see `src/transport/rdma/cost.rs` for what is left out).
//!
//! Run with `cargo bench --bench wr_cost`. Divan's item throughput is work requests per
//! second; time / items = ns per WR. The goal is at most 50 ns per WR (a 400G NIC at 8 KiB
//! pages takes about 6 M WR/s, i.e. 167 ns per WR for one core).

use divan::Bencher;
use divan::counter::ItemsCount;
use kvtransfer::bench_internals::{FakeQp, wr_pipeline};
use kvtransfer::plan::PlanParams;
use kvtransfer::{Request, SegmentId};

fn main() {
    divan::main();
}

const SEG: SegmentId = SegmentId(1);
const SRC: u64 = 0x7f00_0000_0000;

fn params(lanes: usize) -> PlanParams {
    PlanParams {
        max_slice: 256 * 1024,
        lanes,
        min_stripe_bytes: 64 * 1024,
        first_lane: 0,
    }
}

/// `n` pages of `page` bytes to reversed remote slots: nothing coalesces, one WR per page.
fn scattered(n: u64, page: u64) -> Vec<Request> {
    (0..n)
        .map(|i| Request::write(SRC + i * page, page, SEG, (n - 1 - i) * page))
        .collect()
}

fn run(bencher: Bencher, reqs: &[Request], lanes: usize) {
    let p = params(lanes);
    let mut qp = FakeQp::new(1024);
    let wrs = wr_pipeline(reqs, &p, &mut qp);
    bencher
        .counter(ItemsCount::new(wrs))
        .bench_local(|| wr_pipeline(divan::black_box(reqs), &p, &mut qp));
}

/// SGLang's page size 32 with 8 KiB per page and layer: 4,096 pages, one WR each, 8 lanes.
#[divan::bench]
fn pages_8k_x4096_8_lanes(bencher: Bencher) {
    run(bencher, &scattered(4096, 8192), 8);
}

/// DeepSeek-V3 MLA pages (36 KiB per layer), 256 of them, on 2 lanes.
#[divan::bench]
fn pages_36k_x256_2_lanes(bencher: Bencher) {
    run(bencher, &scattered(256, 36 * 1024), 2);
}

/// The bench CLI's small batch: 128 blocks of 4 KiB, one lane.
#[divan::bench]
fn blocks_4k_x128_1_lane(bencher: Bencher) {
    run(bencher, &scattered(128, 4096), 1);
}
