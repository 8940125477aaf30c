//! `kvtransfer bench --kv MODEL`: KV rooms between a prefill and a decode manager in this
//! process, with a real model's layout. Measures room latency (receiver created to receiver
//! Success), rooms/s and GB/s, and checks the bytes of sampled rooms page by page.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kvtransfer::kv::{
    KvBuffer, KvConfig, KvLayout, KvManager, KvPoll, KvReceiver, KvRole, KvSender, MAX_CHUNKS,
};
use kvtransfer::{Error, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::bench::{BenchArgs, Role, config};

/// A model whose KV layout the bench reproduces (one tensor-parallel rank's share).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KvModel {
    /// DeepSeek-V3 (MLA): 61 layer buffers, pages of 32 tokens x 1152 B = 36 KiB.
    #[value(name = "deepseek-v3")]
    DeepseekV3,
    /// Llama-3 70B at TP 8: 80 layers x (K, V) = 160 buffers, pages of 32 tokens x 256 B = 8 KiB.
    #[value(name = "llama-70b-tp8")]
    Llama70bTp8,
}

impl KvModel {
    fn name(self) -> &'static str {
        match self {
            KvModel::DeepseekV3 => "deepseek-v3",
            KvModel::Llama70bTp8 => "llama-70b-tp8",
        }
    }

    /// (page buffers, bytes of one page of one buffer).
    fn shape(self) -> (usize, usize) {
        match self {
            KvModel::DeepseekV3 => (61, 32 * 1152),
            KvModel::Llama70bTp8 => (80 * 2, 32 * 256),
        }
    }
}

/// Options of the KV-room benchmark (`bench --kv MODEL`).
#[derive(Args, Debug)]
#[command(next_help_heading = "KV rooms (--kv)")]
pub(crate) struct KvArgs {
    /// Run KV rooms with this model's layout (prefill and decode managers in this process)
    /// instead of plain block transfers.
    #[arg(long, value_enum, value_name = "MODEL")]
    pub(crate) kv: Option<KvModel>,
    /// Pages per room; each side's page pools hold twice as many per buffer [default: 256; 32
    /// in scale mode].
    #[arg(long, requires = "kv")]
    pub(crate) pages: Option<usize>,
    /// Measured rooms, run one after another.
    #[arg(long, default_value_t = 20, requires = "kv")]
    rooms: usize,
    /// `send` calls per room (the last carries aux).
    #[arg(long, default_value_t = 4, requires = "kv")]
    chunks: usize,
    /// Untimed rooms first (the first room of a process also opens the control channel).
    #[arg(long, default_value_t = 1, requires = "kv")]
    warmup: usize,
    /// Seed of the page selections.
    #[arg(long, default_value_t = 1, requires = "kv")]
    seed: u64,
    /// Verify every room, not only every page of the first and last one.
    #[arg(long, requires = "kv", conflicts_with = "no_verify")]
    verify_all: bool,
    /// Scale mode: rooms across prefill and decode processes (`--prefill-procs`, ...).
    #[command(flatten)]
    pub(crate) scale: crate::kvscale::ScaleArgs,
}

/// Pages per room of the single-process bench when `--pages` is not given.
const DEFAULT_PAGES: usize = 256;

/// One KV benchmark result, as printed with `--json`.
#[derive(Serialize, Debug)]
struct KvReport {
    model: &'static str,
    transport: &'static str,
    buffers: usize,
    pages: usize,
    chunks: usize,
    rooms: usize,
    /// Page bytes one room moves (every page of every buffer; aux not counted).
    bytes_per_room: u64,
    /// Writes the sender posted for the last room (contiguous runs x buffers, plus aux).
    slices_per_room: u64,
    /// Time spent in measured rooms (verification excluded).
    seconds: f64,
    rooms_per_s: f64,
    gbps: f64,
    latency_p50_us: f64,
    latency_p99_us: f64,
    latency_max_us: f64,
    verified: bool,
    verified_rooms: usize,
    verified_pages: u64,
}

/// Aux slots per side, and bytes per slot.
const AUX_SLOTS: usize = 64;
const AUX_ITEM: usize = 128;
/// What destination memory holds before a verified room lands in it.
const POISON: u64 = 0xEEEE_EEEE_EEEE_EEEE;
/// Buffer index the aux slots' pattern is derived from (past any page buffer).
const AUX_PATTERN: usize = 1 << 20;

/// The first word of `page` of `buffer` in the source pattern.
fn page_seed(buffer: usize, page: usize) -> u64 {
    ((buffer as u64) << 32 | page as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Word `i` of a page whose pattern starts from `seed`.
fn pattern_word(seed: u64, i: usize) -> u64 {
    seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// One manager and the memory its layout points into. `mgr` is declared first so it is
/// dropped before the memory.
struct Side {
    mgr: KvManager,
    /// Page buffer `b`, page `p` is `item_words` words at `(b * pool + p) * item_words`.
    mem: Vec<u64>,
    aux: Vec<u64>,
    pool: usize,
    item_words: usize,
}

impl Side {
    /// Allocates `buffers` buffers of `pool` pages of `item` bytes and aux slots, fills pages
    /// and aux with the source pattern (`fill`) or with poison, then starts a manager on them.
    fn new(
        a: &BenchArgs,
        role: KvRole,
        (buffers, item): (usize, usize),
        pool: usize,
        fill: bool,
    ) -> Result<Side> {
        let item_words = item / 8;
        // Every word is written here, so the memory is faulted in before anything is timed.
        let mut mem = vec![0u64; buffers * pool * item_words];
        let mut aux = vec![0u64; AUX_SLOTS * AUX_ITEM / 8];
        if fill {
            for (k, page) in mem.chunks_exact_mut(item_words).enumerate() {
                let seed = page_seed(k / pool, k % pool);
                for (i, w) in page.iter_mut().enumerate() {
                    *w = pattern_word(seed, i);
                }
            }
            for (slot, words) in aux.chunks_exact_mut(AUX_ITEM / 8).enumerate() {
                let seed = page_seed(AUX_PATTERN, slot);
                for (i, w) in words.iter_mut().enumerate() {
                    *w = pattern_word(seed, i);
                }
            }
        } else {
            mem.fill(POISON);
            aux.fill(POISON);
        }
        let base = mem.as_mut_ptr() as u64;
        let buffer_len = (pool * item) as u64;
        let layout = KvLayout::new(
            (0..buffers as u64)
                .map(|b| KvBuffer {
                    addr: base + b * buffer_len,
                    len: buffer_len,
                    item_len: item as u64,
                })
                .collect(),
            vec![KvBuffer {
                addr: aux.as_mut_ptr() as u64,
                len: (AUX_SLOTS * AUX_ITEM) as u64,
                item_len: AUX_ITEM as u64,
            }],
        )?;
        // SAFETY: `mem` and `aux` are owned by the returned `Side`, which drops `mgr` (and the
        // caller drops every room) before them; their heap blocks never move or resize.
        let mgr =
            unsafe { KvManager::new(config(a, "127.0.0.1:0")?, KvConfig::new(role), layout)? };
        Ok(Side {
            mgr,
            mem,
            aux,
            pool,
            item_words,
        })
    }

    fn page_range(&self, buffer: usize, page: usize) -> std::ops::Range<usize> {
        let at = (buffer * self.pool + page) * self.item_words;
        at..at + self.item_words
    }

    fn aux_range(slot: usize) -> std::ops::Range<usize> {
        slot * AUX_ITEM / 8..(slot + 1) * AUX_ITEM / 8
    }

    fn buffers(&self) -> usize {
        self.mem.len() / (self.pool * self.item_words)
    }

    /// Poisons the destination pages (every buffer) and aux slot of a room about to be
    /// verified, so bytes left over from earlier rooms cannot pass for this one's.
    fn poison(&mut self, pages: &[i32], aux_slot: usize) {
        for b in 0..self.buffers() {
            for &p in pages {
                let r = self.page_range(b, p as usize);
                self.mem[r].fill(POISON);
            }
        }
        self.aux[Side::aux_range(aux_slot)].fill(POISON);
    }

    /// Checks that destination page `dst[i]` of every buffer holds the pattern of source page
    /// `src[i]`, and the aux slot that of the source aux slot. Returns the pages checked.
    fn check(
        &self,
        room: u64,
        src: &[i32],
        dst: &[i32],
        (src_aux, dst_aux): (usize, usize),
    ) -> Result<u64> {
        let differs = |what: String, got: &[u64], seed: u64| -> Result<()> {
            match (0..got.len()).find(|&i| got[i] != pattern_word(seed, i)) {
                None => Ok(()),
                Some(i) => Err(Error::RoomFailed {
                    room,
                    reason: format!(
                        "verification failed: {what} differs at byte {} (got {:#018x}, want {:#018x})",
                        i * 8,
                        got[i],
                        pattern_word(seed, i)
                    ),
                }),
            }
        };
        for b in 0..self.buffers() {
            for (&s, &d) in src.iter().zip(dst) {
                let got = &self.mem[self.page_range(b, d as usize)];
                differs(
                    format!("buffer {b}: source page {s} -> destination page {d}"),
                    got,
                    page_seed(b, s as usize),
                )?;
            }
        }
        differs(
            format!("aux slot {src_aux} -> {dst_aux}"),
            &self.aux[Side::aux_range(dst_aux)],
            page_seed(AUX_PATTERN, src_aux),
        )?;
        Ok((src.len() * self.buffers()) as u64)
    }
}

/// `n` distinct pages of `0..pool`: the pool cut into runs of 1..=8 pages, the runs shuffled,
/// the first `n` pages taken (scattered, partly contiguous, like a paged KV allocator's).
fn scattered(rng: &mut StdRng, n: usize, pool: usize) -> Vec<i32> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < pool {
        let len = rng.gen_range(1..=8).min(pool - start);
        runs.push(start..start + len);
        start += len;
    }
    runs.shuffle(rng);
    runs.into_iter()
        .flatten()
        .take(n)
        .map(|p| p as i32)
        .collect()
}

/// Bytes of memory the system can still hand out (`MemAvailable`), if it says.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One room's figures.
struct RoomRun {
    /// Receiver created to receiver Success first seen.
    latency: Duration,
    /// Writes the sender posted.
    slices: u64,
}

/// Fails with both sides' reasons if either side of `room` failed.
fn check_alive(room: u64, receiver: &KvReceiver, sender: &KvSender) -> Result<()> {
    let (r, s) = (receiver.poll(), sender.poll());
    if r == KvPoll::Failed || s == KvPoll::Failed {
        return Err(Error::RoomFailed {
            room,
            reason: format!(
                "receiver {} ({}), sender {} ({})",
                r.as_str(),
                receiver.failure_reason().unwrap_or_default(),
                s.as_str(),
                sender.failure_reason().unwrap_or_default()
            ),
        });
    }
    Ok(())
}

/// Waits politely: yields for the first few rounds, then sleeps briefly, so the engines'
/// threads keep the cores while a large room is on the wire.
fn backoff(round: &mut u32) {
    *round += 1;
    if *round < 64 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// Runs room `room` from the receiver's creation to Success on both sides.
fn run_room(
    prefill: &KvManager,
    decode: &KvManager,
    room: u64,
    (src, dst): (&[i32], &[i32]),
    (src_aux, dst_aux): (u32, u32),
    chunks: usize,
) -> Result<RoomRun> {
    let t0 = Instant::now();
    let receiver = KvReceiver::new(decode, prefill.bootstrap_addr(), room)?;
    receiver.init(dst, Some(dst_aux))?;
    let sender = KvSender::new(prefill, room)?;
    sender.init(src.len(), Some(src_aux))?;
    let mut round = 0;
    while sender.poll() != KvPoll::WaitingForInput {
        check_alive(room, &receiver, &sender)?;
        backoff(&mut round);
    }
    let n = src.len();
    for k in 0..chunks {
        sender.send(&src[k * n / chunks..(k + 1) * n / chunks], k + 1 == chunks)?;
    }
    let mut latency = None;
    round = 0;
    loop {
        if latency.is_none() && receiver.poll() == KvPoll::Success {
            latency = Some(t0.elapsed());
        }
        if latency.is_some() && sender.poll() == KvPoll::Success {
            break;
        }
        check_alive(room, &receiver, &sender)?;
        backoff(&mut round);
    }
    Ok(RoomRun {
        latency: latency.expect("set before the loop ends"),
        slices: sender.metrics().slices,
    })
}

/// `bench --kv MODEL`: see the module docs.
pub(crate) fn run(a: &BenchArgs, k: &KvArgs) -> Result<()> {
    if k.scale.enabled() {
        return crate::kvscale::run(a, k);
    }
    let model = k.kv.expect("called with --kv");
    let pages = k.pages.unwrap_or(DEFAULT_PAGES);
    if a.role != Role::Loopback {
        return Err(Error::InvalidArgument(
            "--kv runs the prefill and the decode side in this process: use --role loopback".into(),
        ));
    }
    let pool = pages.checked_mul(2).filter(|&p| p <= i32::MAX as usize);
    let Some(pool) = pool.filter(|_| pages > 0) else {
        return Err(Error::InvalidArgument(format!(
            "--pages must be in 1..={}",
            i32::MAX / 2
        )));
    };
    if k.rooms == 0 {
        return Err(Error::InvalidArgument("--rooms must be > 0".into()));
    }
    let max_chunks = pages.min(MAX_CHUNKS as usize);
    if k.chunks == 0 || k.chunks > max_chunks {
        return Err(Error::InvalidArgument(format!(
            "--chunks must be in 1..={max_chunks} (at most one per page, at most {MAX_CHUNKS})"
        )));
    }
    let (buffers, item) = model.shape();
    let side_bytes = (buffers * pool * item) as u64;
    if let Some(avail) = mem_available()
        && 2 * side_bytes > avail
    {
        return Err(Error::InvalidArgument(format!(
            "{} pages of {} need 2 x {:.2} GB (pools of {pool} pages per buffer); {:.2} GB available",
            pages,
            model.name(),
            side_bytes as f64 / 1e9,
            avail as f64 / 1e9
        )));
    }
    let prefill = Side::new(a, KvRole::Prefill, (buffers, item), pool, true)?;
    let mut decode = Side::new(a, KvRole::Decode, (buffers, item), pool, false)?;
    let bytes_per_room = (pages * buffers * item) as u64;
    if !a.json {
        eprintln!(
            "kv {}: {} buffers x {} pages x {} KiB = {:.1} MB per room, pools of {} pages ({:.2} GB per side), transport {}",
            model.name(),
            buffers,
            pages,
            item / 1024,
            bytes_per_room as f64 / 1e6,
            pool,
            side_bytes as f64 / 1e9,
            prefill.mgr.engine().transport()
        );
    }
    let bar = (std::io::stderr().is_terminal() && !a.json).then(|| {
        let b = ProgressBar::new(k.rooms as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} rooms {elapsed} {msg}")
                .expect("valid template"),
        );
        b
    });
    let mut rng = StdRng::seed_from_u64(k.seed);
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    let (mut busy, mut slices) = (Duration::ZERO, 0);
    let (mut verified_rooms, mut verified_pages) = (0, 0);
    for i in 0..k.warmup + k.rooms {
        let measured = i.checked_sub(k.warmup);
        let verify =
            !a.no_verify && measured.is_some_and(|m| k.verify_all || m == 0 || m + 1 == k.rooms);
        let room = i as u64 + 1;
        let src = scattered(&mut rng, pages, pool);
        let dst = scattered(&mut rng, pages, pool);
        let aux = (i % AUX_SLOTS, (i * 7 + 3) % AUX_SLOTS);
        if verify {
            decode.poison(&dst, aux.1);
        }
        let t0 = Instant::now();
        let r = run_room(
            &prefill.mgr,
            &decode.mgr,
            room,
            (&src, &dst),
            (aux.0 as u32, aux.1 as u32),
            k.chunks,
        )?;
        let took = t0.elapsed();
        if measured.is_some() {
            busy += took;
            slices = r.slices;
            h.saturating_record((r.latency.as_nanos() / 1000).max(1) as u64);
        }
        if verify {
            verified_pages += decode.check(room, &src, &dst, aux)?;
            verified_rooms += 1;
        }
        if let (Some(b), Some(m)) = (&bar, measured) {
            b.set_position(m as u64 + 1);
            b.set_message(format!(
                "{:.2} GB/s",
                (m as u64 + 1) as f64 * bytes_per_room as f64 / busy.as_secs_f64() / 1e9
            ));
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // The sending side goes first: its data connections close locally, and the decode side
    // has nothing in flight to lose.
    let transport = prefill.mgr.engine().transport();
    let metrics = [
        ("prefill", prefill.mgr.engine().metrics()),
        ("decode", decode.mgr.engine().metrics()),
    ];
    drop(prefill);
    drop(decode);
    let seconds = busy.as_secs_f64();
    let report = KvReport {
        model: model.name(),
        transport,
        buffers,
        pages,
        chunks: k.chunks,
        rooms: k.rooms,
        bytes_per_room,
        slices_per_room: slices,
        seconds,
        rooms_per_s: k.rooms as f64 / seconds,
        gbps: (bytes_per_room * k.rooms as u64) as f64 / seconds / 1e9,
        latency_p50_us: h.value_at_quantile(0.5) as f64,
        latency_p99_us: h.value_at_quantile(0.99) as f64,
        latency_max_us: h.max() as f64,
        verified: verified_rooms > 0,
        verified_rooms,
        verified_pages,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        println!(
            "kv {} {}: {} rooms x {} pages in {} chunks ({:.1} MB, {} writes per room): \
             {:.2} rooms/s, {:.3} GB/s, room latency p50 {} us p99 {} us max {} us, \
             verified {} rooms ({} pages)",
            report.model,
            report.transport,
            report.rooms,
            report.pages,
            report.chunks,
            bytes_per_room as f64 / 1e6,
            report.slices_per_room,
            report.rooms_per_s,
            report.gbps,
            report.latency_p50_us,
            report.latency_p99_us,
            report.latency_max_us,
            report.verified_rooms,
            report.verified_pages
        );
        for (who, m) in &metrics {
            println!("{}", crate::report::summary(who, m));
        }
    }
    Ok(())
}
