//! Cost of turning one KV room into planned slices: page pairs → runs (`pages::runs`) →
//! one write per run and layer buffer (`pages::expand`) → per-lane slices (`plan::plan`),
//! which is what `KvSender::send` does before it posts anything.
//!
//! Run with `cargo bench --bench kv_plan`. The room is DeepSeek-V3's: 61 layer buffers x 256
//! pages of 36 KiB, source and destination pages each scattered over a pool of 512 in runs of
//! 1..=8 (so pairs are contiguous on both sides only in short stretches). Divan's item
//! throughput counts page-layers (61 x 256 = 15 616 per room): ns per page-layer =
//! 1e9 / items-per-second, or the median time / 15 616.
//!
//! Variants split the pipeline: `runs_only`, `expand_only` (given the runs), `plan_only`
//! (given the writes), and the whole room sent as one chunk or as four.
//!
//! Measured on the 2-core dev VM (other builds running; medians, so +-20%), one room
//! = 256 pairs -> 92 runs -> 5 612 writes -> 5 612 slices on 2 lanes:
//!
//! | variant | per room | per page-layer |
//! |---|---|---|
//! | `room_four_chunks` (4 sends of 64 pages) | 44-59 µs | 2.8-3.8 ns |
//! | `room_one_chunk` (1 send of 256 pages) | 170-250 µs | 11-16 ns |
//! | `runs_only` | 0.2-0.3 µs | 0.02 ns |
//! | `expand_only` | 9-12 µs | 0.6-0.8 ns |
//! | `plan_only` | 105-150 µs | 6.8-9.8 ns |
//!
//! Both room variants meet the 20 ns per page-layer goal. Most of a whole-room send is page
//! faults, not computing: its vectors (224 KiB of writes, 224 KiB of coalesced runs, 2 x
//! ~140 KiB of lane slices) exceed glibc's trim threshold together, so every call hands the
//! memory back to the kernel and faults it in again (`shape` prints ~60-100 minor faults per
//! whole-room send, none per quarter-room send). With trimming off
//! (`GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=1073741824`)
//! `room_one_chunk` drops to ~66 µs (4.2 ns per page-layer) and `plan_only` to ~47 µs.

use divan::Bencher;
use divan::counter::ItemsCount;
use kvtransfer::kv::pages::{RemoteBuffer, Run, expand, runs};
use kvtransfer::kv::{KvBuffer, KvLayout};
use kvtransfer::plan::{Plan, PlanParams, plan};
use kvtransfer::{Request, SegmentId};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn main() {
    divan::main();
}

const LAYERS: usize = 61;
const PAGES: usize = 256;
const POOL: usize = 2 * PAGES;
/// Bytes of one page of one layer (32 tokens x 1152 B).
const ITEM: u64 = 36 * 1024;
const PAGE_LAYERS: usize = LAYERS * PAGES;

/// The engine's defaults: 1 MiB slices, two lanes, batches up to 256 KiB on one lane.
const PARAMS: PlanParams = PlanParams {
    max_slice: 1 << 20,
    lanes: 2,
    min_stripe_bytes: 256 << 10,
    first_lane: 0,
};

/// `n` distinct pages of `0..pool`, cut into runs of 1..=8 and shuffled (as `bench --kv`).
fn scattered(rng: &mut StdRng, n: usize, pool: usize) -> Vec<i32> {
    let mut cuts = Vec::new();
    let mut start = 0;
    while start < pool {
        let len = rng.gen_range(1..=8).min(pool - start);
        cuts.push(start..start + len);
        start += len;
    }
    cuts.shuffle(rng);
    cuts.into_iter()
        .flatten()
        .take(n)
        .map(|p| p as i32)
        .collect()
}

/// One room: the sender's layout, the receiver's buffers as the sender addresses them, and
/// the page pairs.
struct Room {
    layout: KvLayout,
    dst: Vec<RemoteBuffer>,
    src_pages: Vec<i32>,
    dst_pages: Vec<i32>,
}

fn room() -> Room {
    let base = 0x7f00_0000_0000u64;
    let layer = POOL as u64 * ITEM;
    let layout = KvLayout::new(
        (0..LAYERS as u64)
            .map(|l| KvBuffer {
                addr: base + l * layer,
                len: layer,
                item_len: ITEM,
            })
            .collect(),
        vec![],
    )
    .expect("valid layout");
    let dst = (0..LAYERS as u64)
        .map(|l| RemoteBuffer {
            segment: SegmentId(1),
            offset: l * layer,
            item_len: ITEM,
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    Room {
        layout,
        dst,
        src_pages: scattered(&mut rng, PAGES, POOL),
        dst_pages: scattered(&mut rng, PAGES, POOL),
    }
}

impl Room {
    fn runs(&self) -> Vec<Run> {
        let mut out = Vec::new();
        runs(&self.src_pages, &self.dst_pages, &mut out);
        out
    }

    fn writes(&self) -> Vec<Request> {
        let mut out = Vec::new();
        expand(&self.runs(), &self.layout, &self.dst, &mut out);
        out
    }

    /// What `KvSender::send` does for pages `range` of the room: runs into a reused vector,
    /// writes into a fresh one, then the plan.
    fn chunk(&self, range: std::ops::Range<usize>, run_buf: &mut Vec<Run>) -> Plan {
        run_buf.clear();
        runs(
            &self.src_pages[range.clone()],
            &self.dst_pages[range],
            run_buf,
        );
        let mut reqs = Vec::new();
        expand(run_buf, &self.layout, &self.dst, &mut reqs);
        plan(&reqs, &PARAMS)
    }
}

/// The whole room in one `send`: runs + expand + plan.
#[divan::bench]
fn room_one_chunk(bencher: Bencher) {
    let r = room();
    let mut run_buf = Vec::new();
    bencher
        .counter(ItemsCount::new(PAGE_LAYERS))
        .bench_local(|| r.chunk(divan::black_box(0..PAGES), &mut run_buf));
}

/// The room in four `send`s of 64 pages (as `bench --kv` sends it).
#[divan::bench]
fn room_four_chunks(bencher: Bencher) {
    let r = room();
    let mut run_buf = Vec::new();
    bencher
        .counter(ItemsCount::new(PAGE_LAYERS))
        .bench_local(|| {
            for k in 0..4 {
                let range = k * PAGES / 4..(k + 1) * PAGES / 4;
                divan::black_box(r.chunk(divan::black_box(range), &mut run_buf));
            }
        });
}

/// Page pairs to runs only (per room: 256 pairs; counted per page-layer for comparison).
#[divan::bench]
fn runs_only(bencher: Bencher) {
    let r = room();
    let mut out = Vec::with_capacity(PAGES);
    bencher
        .counter(ItemsCount::new(PAGE_LAYERS))
        .bench_local(|| {
            out.clear();
            runs(
                divan::black_box(&r.src_pages),
                divan::black_box(&r.dst_pages),
                &mut out,
            );
            out.len()
        });
}

/// Runs to writes only (one per run per layer), into a fresh vector as the sender does.
#[divan::bench]
fn expand_only(bencher: Bencher) {
    let r = room();
    let room_runs = r.runs();
    bencher
        .counter(ItemsCount::new(PAGE_LAYERS))
        .bench_local(|| {
            let mut out = Vec::new();
            expand(divan::black_box(&room_runs), &r.layout, &r.dst, &mut out);
            out
        });
}

/// Writes to per-lane slices only.
#[divan::bench]
fn plan_only(bencher: Bencher) {
    let r = room();
    let reqs = r.writes();
    bencher
        .counter(ItemsCount::new(PAGE_LAYERS))
        .bench_local(|| plan(divan::black_box(&reqs), divan::black_box(&PARAMS)));
}

/// Minor page faults of this process so far.
fn minor_faults() -> i64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0, |u| u.minor_page_faults())
}

/// The room's shape, printed once: runs, writes and slices, and the page faults one
/// whole-room `send` and one quarter-room `send` take (fresh heap memory the allocator handed
/// back to the kernel after the previous call).
#[divan::bench(sample_count = 1, sample_size = 1)]
fn shape(bencher: Bencher) {
    let r = room();
    let (room_runs, reqs) = (r.runs(), r.writes());
    let p = plan(&reqs, &PARAMS);
    let slices: usize = p.lanes.iter().map(Vec::len).sum();
    assert_eq!(p.total_bytes, (PAGE_LAYERS as u64) * ITEM);
    assert_eq!(reqs.len(), room_runs.len() * LAYERS);
    let mut run_buf = Vec::new();
    let faults = |range: std::ops::Range<usize>, run_buf: &mut Vec<Run>| {
        for _ in 0..10 {
            divan::black_box(r.chunk(range.clone(), run_buf));
        }
        let f0 = minor_faults();
        for _ in 0..100 {
            divan::black_box(r.chunk(range.clone(), run_buf));
        }
        (minor_faults() - f0) as f64 / 100.0
    };
    let whole = faults(0..PAGES, &mut run_buf);
    let quarter = faults(0..PAGES / 4, &mut run_buf);
    eprintln!(
        "kv_plan room: {PAGES} page pairs -> {} runs -> {} writes -> {} slices on {} lanes; \
         minor page faults per send: {whole:.1} (whole room), {quarter:.1} (quarter room)",
        room_runs.len(),
        reqs.len(),
        slices,
        p.lanes.len()
    );
    bencher.bench_local(|| divan::black_box(slices));
}
