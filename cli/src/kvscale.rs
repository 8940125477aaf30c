//! `kvtransfer bench --kv MODEL --prefill-procs P --decode-procs D --inflight R`: KV rooms at
//! scale, across processes, all in flight at once.
//!
//! The parent re-executes its own binary once per worker (the hidden `--kv-scale-worker`): P
//! prefill processes, then D decode processes told the prefill bootstrap addresses. Each
//! worker starts its manager, says it is ready (one JSON line on stdout) and waits for `go`
//! on stdin; the parent sends `go` to every worker once all are ready, so both sides start
//! together. Then each worker creates all its rooms as fast as it can (decode: `KvReceiver`
//! new + init; prefill: `KvSender` new + init), polling the rooms created so far every
//! [`SWEEP_EVERY`] creations, and afterwards polls until every room is final. A prefill
//! worker sends a room's pages in one chunk (`is_last`) as soon as its sender waits for input.
//!
//! Rooms are deterministic, so both sides agree without talking: decode process `d` owns rooms
//! `d << 32 | i` for `i` in `0..R/D` (the first `R % D` processes one more), served by prefill
//! process `i % P`. Every room has its own pages on both sides (pools hold every room at
//! once): on prefill `pages` contiguous source pages, on decode destination pages strided by
//! the process's room count (`k * rooms + i`), so each page is its own write, like a paged
//! allocator's scattered pages; plus one 64-byte aux slot per room. Source bytes derive from
//! (room, page); the decode worker checks every destination byte and aux slot after Success.
//!
//! Timestamps are CLOCK_MONOTONIC, one clock for all processes of the machine. A room's
//! bootstrap latency is measured from the moment both ends exist, the later of "the decode
//! side's `init` returned" and "the prefill side began `KvSender::new`", to the first poll on
//! each side that sees `WaitingForInput` or later. Room latency is decode `KvReceiver::new` to
//! decode Success. Each worker also reports its threads and resident memory.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kvtransfer::kv::{KvConfig, KvManager, KvPoll, KvReceiver, KvRole, KvSender, MAX_SLOTS};
use kvtransfer::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::bench::{BenchArgs, Role, config};
use crate::kvbench::KvArgs;

/// Pages per room when `--pages` is not given: a 1K-token request at 32 tokens per page.
pub(crate) const DEFAULT_PAGES: usize = 32;
/// Bytes of one aux slot; one slot per room.
const AUX_BYTES: usize = 64;
/// The page index the aux pattern of a room derives from.
const AUX_PAGE: u64 = u64::MAX;
/// During creation, the rooms created so far are polled after every this many creations.
const SWEEP_EVERY: usize = 32;
/// Pause between poll sweeps that finished no room.
const IDLE_PAUSE: Duration = Duration::from_micros(50);
/// How often the poll loop samples this process's threads and resident memory.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Failure reasons the summary lists.
const SHOWN_FAILURES: usize = 5;

/// Which side a worker process plays (the hidden `--kv-scale-worker`).
#[derive(ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WorkerRole {
    /// Creates senders and sends.
    Prefill,
    /// Creates receivers and verifies what lands.
    Decode,
}

impl WorkerRole {
    /// The role's name, as on the command line.
    fn name(self) -> &'static str {
        match self {
            WorkerRole::Prefill => "prefill",
            WorkerRole::Decode => "decode",
        }
    }
}

/// Options of scale mode (flattened into the KV-room options).
#[derive(Args, Debug)]
#[command(next_help_heading = "KV rooms at scale (--kv with --prefill-procs / --decode-procs)")]
pub(crate) struct ScaleArgs {
    /// Run rooms across P prefill and D decode processes, all in flight at once (2 x 2 when
    /// only one of the two counts is given); `--pages` then defaults to 32.
    #[arg(long, value_name = "P", requires = "kv")]
    prefill_procs: Option<usize>,
    /// Decode processes of scale mode (see --prefill-procs).
    #[arg(long, value_name = "D", requires = "kv")]
    decode_procs: Option<usize>,
    /// Rooms in flight in all, split evenly over the decode processes (scale mode).
    #[arg(long, value_name = "R", default_value_t = 4096, requires = "kv")]
    inflight: usize,
    /// Bytes of one page (scale mode: one page buffer, and one 64-byte aux slot per room).
    #[arg(long, value_name = "BYTES", default_value = "128", value_parser = page_size, requires = "kv")]
    page_bytes: usize,
    /// Skip the warm-up (one room per prefill and decode pair before the burst), so control
    /// channels and data paths open during the burst and count in its first rooms' bootstrap.
    #[arg(long, requires = "kv")]
    cold: bool,
    /// Internal: run as one worker process of scale mode.
    #[arg(long, value_enum, hide = true)]
    kv_scale_worker: Option<WorkerRole>,
    /// Internal: the worker's index among its role's processes.
    #[arg(long, hide = true, default_value_t = 0)]
    kv_scale_index: usize,
    /// Internal: the prefill bootstrap addresses, for decode workers.
    #[arg(long, hide = true, value_delimiter = ',')]
    kv_scale_peers: Vec<SocketAddr>,
}

impl ScaleArgs {
    /// Whether scale mode is on (or this process is one of its workers).
    pub(crate) fn enabled(&self) -> bool {
        self.prefill_procs.is_some() || self.decode_procs.is_some() || self.is_worker()
    }

    /// Whether this process is a worker that a scale-mode parent started.
    fn is_worker(&self) -> bool {
        self.kv_scale_worker.is_some()
    }
}

/// Parses `--page-bytes` (K/M suffixes), a positive multiple of 8.
fn page_size(s: &str) -> std::result::Result<usize, String> {
    let n = kvtransfer::config::parse_size("page-bytes", s).map_err(|e| e.to_string())?;
    if n == 0 || n % 8 != 0 {
        return Err(format!("{n} is not a positive multiple of 8"));
    }
    usize::try_from(n).map_err(|e| e.to_string())
}

/// The run's geometry, which every process derives alike from the same flags.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Prefill processes.
    prefill: usize,
    /// Decode processes.
    decode: usize,
    /// Rooms in flight in all.
    inflight: usize,
    /// Pages per room.
    pages: usize,
    /// Bytes of one page.
    page_bytes: usize,
}

impl Plan {
    /// The plan of the flags `k`, checked.
    fn new(k: &KvArgs) -> Result<Plan> {
        let s = &k.scale;
        let plan = Plan {
            prefill: s.prefill_procs.unwrap_or(2),
            decode: s.decode_procs.unwrap_or(2),
            inflight: s.inflight,
            pages: k.pages.unwrap_or(DEFAULT_PAGES),
            page_bytes: s.page_bytes,
        };
        plan.check()?;
        Ok(plan)
    }

    /// Refuses geometries that cannot run.
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.prefill == 0 || self.decode == 0 || self.pages == 0 {
            return bad("--prefill-procs, --decode-procs and --pages must be > 0".into());
        }
        if self.inflight < self.prefill * self.decode {
            return bad(format!(
                "--inflight must be at least prefill x decode processes ({}) so every pair has a room",
                self.prefill * self.decode
            ));
        }
        if self.decode_rooms(0) > MAX_SLOTS as usize {
            return bad(format!(
                "{} rooms per decode process; a decode manager holds at most {MAX_SLOTS}",
                self.decode_rooms(0)
            ));
        }
        let most = self.decode_rooms(0).max(self.prefill_rooms(0).len());
        if most.saturating_mul(self.pages) > i32::MAX as usize {
            return bad("pages of all rooms of one process must fit in i32".into());
        }
        Ok(())
    }

    /// Rooms of decode process `d`.
    fn decode_rooms(&self, d: usize) -> usize {
        self.inflight / self.decode + usize::from(d < self.inflight % self.decode)
    }

    /// The prefill process that serves room `i` of any decode process.
    fn server(&self, i: usize) -> usize {
        i % self.prefill
    }

    /// The rooms prefill process `p` serves, in its local order.
    fn prefill_rooms(&self, p: usize) -> Vec<u64> {
        (0..self.decode)
            .flat_map(|d| {
                (p..self.decode_rooms(d))
                    .step_by(self.prefill)
                    .map(move |i| room_id(d, i))
            })
            .collect()
    }

    /// Page bytes of one room.
    fn bytes_per_room(&self) -> u64 {
        (self.pages * self.page_bytes) as u64
    }
}

/// The id of room `i` of decode process `d`.
fn room_id(d: usize, i: usize) -> u64 {
    (d as u64) << 32 | i as u64
}

/// The bytes of page `k` of room `room` (`AUX_PAGE`: its aux slot): 64-bit words derived
/// from both, so a page landing in another room's place or out of order shows.
fn pattern(room: u64, k: u64, len: usize) -> Vec<u8> {
    let seed = room.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ k.wrapping_add(1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    (0..len as u64 / 8)
        .flat_map(|i| (seed ^ (i + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)).to_le_bytes())
        .collect()
}

/// Nanoseconds of CLOCK_MONOTONIC: one clock for every process of the machine, so the two
/// sides' timestamps compare.
fn now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Entries of a `/proc` directory (threads: `/proc/self/task`).
fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`), in KiB; 0 if absent.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// This process's threads and resident memory, sampled while rooms run.
#[derive(Debug)]
struct ProcStats {
    /// Threads when rooms started.
    threads_start: usize,
    /// Most threads seen.
    threads_peak: usize,
    /// Most resident memory seen (KiB).
    rss_peak_kib: u64,
    /// When the last sample was taken.
    last: Instant,
}

impl ProcStats {
    /// Takes the first sample.
    fn new() -> ProcStats {
        let threads = count_dir("/proc/self/task");
        ProcStats {
            threads_start: threads,
            threads_peak: threads,
            rss_peak_kib: status_kib("VmRSS"),
            last: Instant::now(),
        }
    }

    /// Samples now.
    fn sample(&mut self) {
        self.threads_peak = self.threads_peak.max(count_dir("/proc/self/task"));
        self.rss_peak_kib = self.rss_peak_kib.max(status_kib("VmRSS"));
        self.last = Instant::now();
    }

    /// Samples if the last sample is older than [`SAMPLE_EVERY`].
    fn maybe_sample(&mut self) {
        if self.last.elapsed() >= SAMPLE_EVERY {
            self.sample();
        }
    }
}

/// One room's timestamps (CLOCK_MONOTONIC ns; 0: not reached).
#[derive(Serialize, Deserialize, Default, Clone, Copy, Debug)]
struct Times {
    /// Before `KvReceiver::new` / `KvSender::new`.
    created: u64,
    /// After `init` returned.
    inited: u64,
    /// First poll that saw `WaitingForInput` or later.
    bootstrapped: u64,
    /// After `send` returned (prefill).
    sent: u64,
    /// First poll that saw Success.
    done: u64,
}

/// What a poll found a room to need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Nothing now.
    Open,
    /// A prefill room waiting for its pages.
    Ready,
    /// Success or Failed.
    Final,
}

/// A worker's side of one room.
enum Handle {
    /// Decode side.
    Rx(KvReceiver),
    /// Prefill side.
    Tx(KvSender),
}

/// One worker process's rooms and what it saw of them.
struct Worker<'m> {
    /// This process's manager.
    mgr: &'m KvManager,
    /// The run.
    plan: Plan,
    /// Which side this worker plays.
    role: WorkerRole,
    /// Room ids, in local order (decode: `i`; prefill: as [`Plan::prefill_rooms`]).
    ids: Vec<u64>,
    /// Prefill bootstrap addresses (decode workers).
    peers: Vec<SocketAddr>,
    /// Each room's receiver or sender (None: creating it failed).
    handles: Vec<Option<Handle>>,
    /// Each room's timestamps.
    times: Vec<Times>,
    /// Rooms that failed, and why.
    failures: Vec<(u64, String)>,
}

impl<'m> Worker<'m> {
    /// The worker for `ids` in `mgr`.
    fn new(mgr: &'m KvManager, plan: Plan, role: WorkerRole, ids: Vec<u64>) -> Worker<'m> {
        let n = ids.len();
        Worker {
            mgr,
            plan,
            role,
            ids,
            peers: Vec::new(),
            handles: (0..n).map(|_| None).collect(),
            times: vec![Times::default(); n],
            failures: Vec::new(),
        }
    }

    /// Creates room `i` (new + init), timing it; false (and a failure) if that failed.
    fn create(&mut self, i: usize) -> bool {
        self.times[i].created = now_ns();
        let made = match self.role {
            WorkerRole::Decode => self.receiver(i).map(Handle::Rx),
            WorkerRole::Prefill => self.sender(i).map(Handle::Tx),
        };
        self.times[i].inited = now_ns();
        match made {
            Ok(h) => self.handles[i] = Some(h),
            Err(e) => self.failures.push((self.ids[i], e.to_string())),
        }
        self.handles[i].is_some()
    }

    /// Decode room `i`: its destination pages, strided by the room count.
    fn dst_pages(&self, i: usize) -> Vec<i32> {
        let n = self.ids.len();
        (0..self.plan.pages).map(|k| (k * n + i) as i32).collect()
    }

    /// A receiver for decode room `i`, its destination named.
    fn receiver(&self, i: usize) -> Result<KvReceiver> {
        let addr = self.peers[self.plan.server(i)];
        let rx = KvReceiver::new(self.mgr, addr, self.ids[i])?;
        rx.init(&self.dst_pages(i), Some(i as u32))?;
        Ok(rx)
    }

    /// A sender for prefill room `j`.
    fn sender(&self, j: usize) -> Result<KvSender> {
        let tx = KvSender::new(self.mgr, self.ids[j])?;
        tx.init(self.plan.pages, Some(j as u32))?;
        Ok(tx)
    }

    /// Polls room `i`, timing what it sees.
    fn poll(&mut self, i: usize) -> Step {
        let state = match &self.handles[i] {
            Some(Handle::Rx(rx)) => rx.poll(),
            Some(Handle::Tx(tx)) => tx.poll(),
            None => return Step::Final,
        };
        let now = now_ns();
        let t = &mut self.times[i];
        if t.bootstrapped == 0 && state >= KvPoll::WaitingForInput {
            t.bootstrapped = now;
        }
        match state {
            KvPoll::Success => {
                t.done = now;
                Step::Final
            }
            KvPoll::Failed => {
                let reason = self.failure_reason(i);
                self.failures.push((self.ids[i], reason));
                Step::Final
            }
            KvPoll::WaitingForInput if t.sent == 0 => Step::Ready,
            _ => Step::Open,
        }
    }

    /// Sends prefill room `j`'s pages in one chunk; true (and a failure) if that failed.
    fn send(&mut self, j: usize) -> bool {
        let Some(Handle::Tx(tx)) = &self.handles[j] else {
            return false;
        };
        let first = (j * self.plan.pages) as i32;
        let src: Vec<i32> = (first..first + self.plan.pages as i32).collect();
        match tx.send(&src, true) {
            Ok(()) => {
                self.times[j].sent = now_ns();
                false
            }
            Err(e) => {
                self.failures.push((self.ids[j], format!("send: {e}")));
                true
            }
        }
    }

    /// Why room `i` failed, as its handle says.
    fn failure_reason(&self, i: usize) -> String {
        let reason = match &self.handles[i] {
            Some(Handle::Rx(rx)) => rx.failure_reason(),
            Some(Handle::Tx(tx)) => tx.failure_reason(),
            None => None,
        };
        reason.unwrap_or_else(|| "failed (no reason given)".into())
    }

    /// Polls every room of `open` once, then sends the rooms that wait for input (after the
    /// polls, so no room's timestamps wait for other rooms' sends); drops the final ones.
    /// Returns how many rooms finished or were sent.
    fn sweep(&mut self, open: &mut Vec<usize>) -> usize {
        let before = open.len();
        let mut ready = Vec::new();
        open.retain(|&i| match self.poll(i) {
            Step::Final => false,
            Step::Ready => {
                ready.push(i);
                true
            }
            Step::Open => true,
        });
        let failed: Vec<usize> = ready.iter().copied().filter(|&j| self.send(j)).collect();
        if !failed.is_empty() {
            open.retain(|i| !failed.contains(i));
        }
        before - open.len() + ready.len()
    }

    /// Creates every room, then polls until all are final. Returns when the last room was
    /// created (CLOCK_MONOTONIC ns).
    fn drive(&mut self, stats: &mut ProcStats) -> u64 {
        let mut open = Vec::with_capacity(self.ids.len());
        for i in 0..self.ids.len() {
            if self.create(i) {
                open.push(i);
            }
            if (i + 1) % SWEEP_EVERY == 0 {
                self.sweep(&mut open);
            }
        }
        let created = now_ns();
        stats.sample();
        while !open.is_empty() {
            if self.sweep(&mut open) == 0 {
                std::thread::sleep(IDLE_PAUSE);
            }
            stats.maybe_sample();
        }
        created
    }

    /// Prefill: fills every room's source pages and aux slot with its pattern.
    fn fill(&self) -> Result<()> {
        let (pages, aux) = self.buffers()?;
        let pb = self.plan.page_bytes;
        for (j, &room) in self.ids.iter().enumerate() {
            for k in 0..self.plan.pages {
                pages.write((j * self.plan.pages + k) * pb, &pattern(room, k as u64, pb));
            }
            aux.write(j * AUX_BYTES, &pattern(room, AUX_PAGE, AUX_BYTES));
        }
        Ok(())
    }

    /// The page buffer and the aux buffer the manager owns.
    fn buffers(&self) -> Result<(&kvtransfer::HostBuffer, &kvtransfer::HostBuffer)> {
        let missing = || Error::InvalidArgument("manager owns no memory".into());
        let pages = self.mgr.buffer(0).ok_or_else(missing)?;
        Ok((pages, self.mgr.aux_buffer(0).ok_or_else(missing)?))
    }

    /// Decode: checks every destination byte and aux slot of each room that succeeded.
    /// Returns the rooms verified and the mismatches.
    fn verify(&self) -> Result<(usize, Vec<(u64, String)>)> {
        let (pages, aux) = self.buffers()?;
        let pb = self.plan.page_bytes;
        let (mut ok, mut bad) = (0, Vec::new());
        let mut got = vec![0u8; pb.max(AUX_BYTES)];
        for (i, &room) in self.ids.iter().enumerate() {
            if self.times[i].done == 0 {
                continue;
            }
            let mut wrong = None;
            for (k, &p) in self.dst_pages(i).iter().enumerate() {
                pages.read(p as usize * pb, &mut got[..pb]);
                if got[..pb] != pattern(room, k as u64, pb) {
                    wrong.get_or_insert(format!("page {k} (destination page {p}) differs"));
                }
            }
            aux.read(i * AUX_BYTES, &mut got[..AUX_BYTES]);
            if got[..AUX_BYTES] != pattern(room, AUX_PAGE, AUX_BYTES) {
                wrong.get_or_insert(format!("aux slot {i} differs"));
            }
            match wrong {
                None => ok += 1,
                Some(w) => bad.push((room, w)),
            }
        }
        Ok((ok, bad))
    }
}

/// What one worker process reports to the parent (one JSON line).
#[derive(Serialize, Deserialize, Debug)]
struct WorkerReport {
    /// Which side.
    role: WorkerRole,
    /// Index among its role's workers.
    index: usize,
    /// Process id.
    pid: u32,
    /// Transport the engine uses.
    transport: String,
    /// When `go` arrived.
    go_ns: u64,
    /// When the last room had been created.
    created_ns: u64,
    /// When the last room was final.
    end_ns: u64,
    /// Threads when `go` arrived.
    threads_start: usize,
    /// Most threads seen while rooms ran.
    threads_peak: usize,
    /// Threads once every room was final.
    threads_end: usize,
    /// Most resident memory seen while rooms ran (KiB).
    rss_peak_kib: u64,
    /// Resident memory at the end (KiB).
    rss_end_kib: u64,
    /// Peak resident memory per the kernel (VmHWM, KiB).
    hwm_kib: u64,
    /// Room ids, and their timestamps in the same order.
    ids: Vec<u64>,
    /// Timestamps of the rooms of `ids`.
    times: Vec<Times>,
    /// Rooms that failed, and why.
    failures: Vec<(u64, String)>,
    /// Decode: rooms whose every byte checked out.
    verified: usize,
    /// Decode: rooms whose bytes did not, and where.
    mismatches: Vec<(u64, String)>,
}

/// Starts a manager for `rooms` rooms of `plan` that owns its memory: one page buffer and one
/// aux buffer of a 64-byte slot per room.
fn manager(a: &BenchArgs, role: KvRole, plan: &Plan, rooms: usize) -> Result<KvManager> {
    KvManager::with_owned_memory(
        config(a, "127.0.0.1:0")?,
        KvConfig::new(role),
        &[((rooms * plan.pages) as u64, plan.page_bytes as u64)],
        &[(rooms as u64, AUX_BYTES as u64)],
    )
}

/// Prints one JSON line on stdout and flushes it.
fn say(v: &impl Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(v).expect("serialisable"))
        .and_then(|()| out.flush())
        .map_err(|e| Error::Io {
            call: "write to the parent",
            source: e,
        })
}

/// Reads stdin until a line `go` (Ok(true)) or its end (Ok(false)).
fn wait_for_go() -> Result<bool> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| Error::Io {
                call: "read stdin",
                source: e,
            })?;
        if n == 0 {
            return Ok(false);
        }
        if line.trim() == "go" {
            return Ok(true);
        }
    }
}

/// Room ids of warm-up rooms: bit 63 set, then the decode index and the prefill index.
fn warm_room(decode: usize, prefill: usize) -> u64 {
    1 << 63 | (decode as u64) << 32 | prefill as u64
}

/// Longest a warm-up room may take.
const WARM_LIMIT: Duration = Duration::from_secs(30);

/// Decode worker `index`: one room from each prefill process, to Success, so the control
/// channels and data paths are open before the burst (as in a server that has been up).
fn warm_up_decode(mgr: &KvManager, peers: &[SocketAddr], index: usize) -> Result<()> {
    let rooms: Vec<KvReceiver> = peers
        .iter()
        .enumerate()
        .map(|(p, addr)| {
            let rx = KvReceiver::new(mgr, *addr, warm_room(index, p))?;
            rx.init(&[p as i32], None)?;
            Ok(rx)
        })
        .collect::<Result<_>>()?;
    let until = Instant::now() + WARM_LIMIT;
    for rx in &rooms {
        loop {
            match rx.poll() {
                KvPoll::Success => break,
                KvPoll::Failed => {
                    return Err(Error::RoomFailed {
                        room: rx.room(),
                        reason: format!("warm-up: {}", rx.failure_reason().unwrap_or_default()),
                    });
                }
                _ if Instant::now() > until => {
                    return Err(Error::Timeout {
                        what: "warm-up room".into(),
                        after_ms: WARM_LIMIT.as_millis() as u64,
                    });
                }
                _ => std::thread::sleep(IDLE_PAUSE),
            }
        }
    }
    Ok(())
}

/// Prefill worker `index`: a sender for each decode process's warm-up room.
fn warm_senders(mgr: &KvManager, plan: &Plan, index: usize) -> Result<Vec<KvSender>> {
    (0..plan.decode)
        .map(|d| {
            let tx = KvSender::new(mgr, warm_room(d, index))?;
            tx.init(1, None)?;
            Ok(tx)
        })
        .collect()
}

/// Sends each warm-up room's page once it is paired, until all are final (or the limit).
fn drive_warm_senders(senders: &[KvSender]) {
    let until = Instant::now() + WARM_LIMIT;
    let mut sent = vec![false; senders.len()];
    while Instant::now() < until {
        let mut open = 0;
        for (tx, sent) in senders.iter().zip(&mut sent) {
            match tx.poll() {
                KvPoll::WaitingForInput if !*sent => *sent = tx.send(&[0], true).is_ok(),
                s if !s.is_final() => open += 1,
                _ => {}
            }
        }
        if open == 0 && sent.iter().all(|s| *s) {
            return;
        }
        std::thread::sleep(IDLE_PAUSE);
    }
}

/// One worker process: see the module docs.
fn worker(a: &BenchArgs, k: &KvArgs, role: WorkerRole) -> Result<()> {
    let plan = Plan::new(k)?;
    let index = k.scale.kv_scale_index;
    let (kv_role, ids) = match role {
        WorkerRole::Prefill => (KvRole::Prefill, plan.prefill_rooms(index)),
        WorkerRole::Decode => (
            KvRole::Decode,
            (0..plan.decode_rooms(index))
                .map(|i| room_id(index, i))
                .collect(),
        ),
    };
    let mgr = manager(a, kv_role, &plan, ids.len())?;
    let mut w = Worker::new(&mgr, plan, role, ids);
    w.peers = k.scale.kv_scale_peers.clone();
    if role == WorkerRole::Decode && w.peers.len() != plan.prefill {
        return Err(Error::InvalidArgument(format!(
            "decode worker got {} prefill addresses for {} prefill processes",
            w.peers.len(),
            plan.prefill
        )));
    }
    if role == WorkerRole::Prefill {
        w.fill()?;
    }
    let warm = !k.scale.cold;
    if warm && role == WorkerRole::Decode {
        warm_up_decode(&mgr, &w.peers, index)?;
    }
    let warm_senders = match (warm, role) {
        (true, WorkerRole::Prefill) => warm_senders(&mgr, &plan, index)?,
        _ => Vec::new(),
    };
    say(&serde_json::json!({"ready": role.name(), "addr": mgr.bootstrap_addr().to_string()}))?;
    let go = std::thread::scope(|s| {
        if !warm_senders.is_empty() {
            s.spawn(|| drive_warm_senders(&warm_senders));
        }
        wait_for_go()
    })?;
    drop(warm_senders);
    if !go {
        return Ok(());
    }
    let report = run_worker(&mut w, index, a.no_verify)?;
    say(&report)?;
    // Stay (rooms and manager alive) until the parent closes stdin: it does so once every
    // worker has reported, prefill first.
    let _ = wait_for_go();
    drop(w);
    drop(mgr);
    Ok(())
}

/// Runs the worker's rooms from `go` to the last final one and builds its report.
fn run_worker(w: &mut Worker<'_>, index: usize, no_verify: bool) -> Result<WorkerReport> {
    let go_ns = now_ns();
    let mut stats = ProcStats::new();
    let created_ns = w.drive(&mut stats);
    let end_ns = now_ns();
    stats.sample();
    let (verified, mismatches) = match w.role {
        WorkerRole::Decode if !no_verify => w.verify()?,
        _ => (0, Vec::new()),
    };
    Ok(WorkerReport {
        role: w.role,
        index,
        pid: std::process::id(),
        transport: w.mgr.engine().transport().to_string(),
        go_ns,
        created_ns,
        end_ns,
        threads_start: stats.threads_start,
        threads_peak: stats.threads_peak,
        threads_end: count_dir("/proc/self/task"),
        rss_peak_kib: stats.rss_peak_kib,
        rss_end_kib: status_kib("VmRSS"),
        hwm_kib: status_kib("VmHWM"),
        ids: w.ids.clone(),
        times: w.times.clone(),
        failures: std::mem::take(&mut w.failures)
            .into_iter()
            .map(|(id, why)| (id, format!("{}: {why}", w.role.name())))
            .collect(),
        verified,
        mismatches,
    })
}

/// One worker process, as the parent holds it.
struct Kid {
    /// Which side.
    role: WorkerRole,
    /// Index among its role's workers.
    index: usize,
    /// The process.
    child: Child,
    /// Its stdin (`go`; closing it lets the worker exit).
    stdin: Option<ChildStdin>,
    /// Its stdout (ready line, then report).
    stdout: BufReader<ChildStdout>,
}

impl Kid {
    /// Starts worker `index` of `role`: this binary with this process's arguments plus the
    /// worker flags (so transport, connections and logging carry over; so does the
    /// environment). Its stderr is ours.
    fn spawn(role: WorkerRole, index: usize, peers: &[String]) -> Result<Kid> {
        let exe = std::env::current_exe().map_err(|e| Error::Io {
            call: "current_exe",
            source: e,
        })?;
        let mut cmd = Command::new(exe);
        cmd.args(std::env::args_os().skip(1)).args([
            "--kv-scale-worker",
            role.name(),
            "--kv-scale-index",
            &index.to_string(),
        ]);
        if !peers.is_empty() {
            cmd.args(["--kv-scale-peers", &peers.join(",")]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::Io {
                call: "spawn a scale worker",
                source: e,
            })?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Kid {
            role,
            index,
            child,
            stdin,
            stdout,
        })
    }

    /// The next line the worker prints, parsed; an error naming the worker if it ends first.
    fn read<T: for<'de> Deserialize<'de>>(&mut self, what: &str) -> Result<T> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).map_err(|e| Error::Io {
            call: "read a scale worker",
            source: e,
        })?;
        if n == 0 {
            let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(worker_error(format!(
                "{} worker {} ended before its {what} ({status})",
                self.role.name(),
                self.index
            )));
        }
        serde_json::from_str(line.trim()).map_err(|e| {
            worker_error(format!(
                "{} worker {} said {line:?}: {e}",
                self.role.name(),
                self.index
            ))
        })
    }

    /// Writes `go` to the worker.
    fn go(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().expect("not closed yet");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .map_err(|e| Error::Io {
                call: "tell a scale worker to go",
                source: e,
            })
    }

    /// Closes the worker's stdin (it then exits) and waits for it; an error if it failed.
    fn finish(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait().map_err(|e| Error::Io {
            call: "wait for a scale worker",
            source: e,
        })?;
        if status.success() {
            return Ok(());
        }
        Err(worker_error(format!(
            "{} worker {} exited with {status}",
            self.role.name(),
            self.index
        )))
    }
}

/// An error about a worker process (`msg` names it).
fn worker_error(msg: String) -> Error {
    Error::Io {
        call: "a scale worker",
        source: std::io::Error::other(msg),
    }
}

/// The workers; any still running when this is dropped are killed.
struct Kids(Vec<Kid>);

impl Drop for Kids {
    fn drop(&mut self) {
        for k in &mut self.0 {
            if matches!(k.child.try_wait(), Ok(None)) {
                let _ = k.child.kill();
                let _ = k.child.wait();
            }
        }
    }
}

/// A worker's ready line.
#[derive(Deserialize, Debug)]
struct Ready {
    addr: String,
}

/// Starts the workers, waits until all are ready and tells them to go.
fn start(plan: &Plan) -> Result<Kids> {
    let mut kids = Kids(Vec::with_capacity(plan.prefill + plan.decode));
    for p in 0..plan.prefill {
        kids.0.push(Kid::spawn(WorkerRole::Prefill, p, &[])?);
    }
    let mut addrs = Vec::with_capacity(plan.prefill);
    for kid in &mut kids.0 {
        addrs.push(kid.read::<Ready>("bootstrap address")?.addr);
    }
    for d in 0..plan.decode {
        kids.0.push(Kid::spawn(WorkerRole::Decode, d, &addrs)?);
    }
    for kid in &mut kids.0[plan.prefill..] {
        kid.read::<Ready>("ready line")?;
    }
    for kid in &mut kids.0 {
        kid.go()?;
    }
    Ok(kids)
}

/// Reads every worker's report (concurrently, so none blocks on a full pipe), then lets the
/// workers exit: prefill first, so the decode side has nothing in flight to lose.
fn collect(kids: &mut Kids) -> Result<Vec<WorkerReport>> {
    let reports: Vec<Result<WorkerReport>> = std::thread::scope(|s| {
        let readers: Vec<_> = kids
            .0
            .iter_mut()
            .map(|k| s.spawn(move || k.read::<WorkerReport>("report")))
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().expect("reader thread panicked"))
            .collect()
    });
    let reports = reports.into_iter().collect::<Result<Vec<_>>>()?;
    for kid in &mut kids.0 {
        kid.finish()?;
    }
    Ok(reports)
}

/// p50, p99 and max of microsecond samples (all 0 when there are none).
#[derive(Serialize, Debug, Default)]
struct Quantiles {
    /// Median, µs.
    p50_us: f64,
    /// 99th percentile, µs.
    p99_us: f64,
    /// Largest, µs.
    max_us: f64,
}

impl Quantiles {
    /// The quantiles of nanosecond samples `v` (nearest rank).
    fn of(mut v: Vec<u64>) -> Quantiles {
        if v.is_empty() {
            return Quantiles::default();
        }
        v.sort_unstable();
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        let us = |ns: u64| ns as f64 / 1e3;
        Quantiles {
            p50_us: us(rank(0.50)),
            p99_us: us(rank(0.99)),
            max_us: us(*v.last().expect("not empty")),
        }
    }
}

/// One worker's line of the summary.
#[derive(Serialize, Debug)]
struct ProcessRow {
    /// Which side.
    role: WorkerRole,
    /// Index among its role's workers.
    index: usize,
    /// Process id.
    pid: u32,
    /// Rooms it ran.
    rooms: usize,
    /// `go` to the last room created.
    create_ms: f64,
    /// Threads when `go` arrived.
    threads_start: usize,
    /// Most threads while rooms ran.
    threads_peak: usize,
    /// Threads once every room was final.
    threads_end: usize,
    /// Most resident memory while rooms ran (MiB).
    rss_peak_mib: f64,
    /// Resident memory at the end (MiB).
    rss_end_mib: f64,
    /// VmHWM (MiB).
    hwm_mib: f64,
}

/// The whole run, as printed with `--json`.
#[derive(Serialize, Debug)]
struct ScaleReport {
    /// The `--kv` model (scale mode uses only its name: one page buffer).
    model: String,
    /// Transport of the workers.
    transport: String,
    /// Prefill processes.
    prefill_procs: usize,
    /// Decode processes.
    decode_procs: usize,
    /// Rooms in flight.
    inflight: usize,
    /// Pages per room.
    pages: usize,
    /// Bytes of one page.
    page_bytes: usize,
    /// Page bytes per room (aux not counted).
    bytes_per_room: u64,
    /// Rooms run.
    rooms: usize,
    /// Rooms the decode side saw succeed.
    succeeded: usize,
    /// Rooms that failed on either side.
    failures: usize,
    /// The first few failures.
    failure_reasons: Vec<String>,
    /// Whether destination bytes were checked.
    verified: bool,
    /// Rooms whose every destination byte and aux slot checked out.
    verified_rooms: usize,
    /// Rooms with a wrong byte.
    mismatches: usize,
    /// The first few of them, and where.
    mismatch_reasons: Vec<String>,
    /// The first room that failed or mismatched, and why (for the exit status).
    #[serde(skip)]
    first_failure: Option<(u64, String)>,
    /// Spread of the workers' `go` arrival.
    start_skew_ms: f64,
    /// First `go` to the last decode Success.
    seconds: f64,
    /// Succeeded rooms per second of `seconds`.
    rooms_per_s: f64,
    /// How the bootstrap latencies are measured.
    bootstrap_measure: &'static str,
    /// "warm" (one room per prefill and decode pair ran before the burst) or "cold".
    channels: &'static str,
    /// Bootstrap latency seen by the decode side.
    bootstrap_decode: Quantiles,
    /// Bootstrap latency seen by the prefill side.
    bootstrap_prefill: Quantiles,
    /// Decode `KvReceiver::new` to decode Success.
    room_latency: Quantiles,
    /// One row per worker process.
    processes: Vec<ProcessRow>,
}

/// What [`ScaleReport::bootstrap_measure`] says.
const BOOTSTRAP_MEASURE: &str = "CLOCK_MONOTONIC from max(decode init returned, prefill \
    KvSender::new began) to the first poll on that side seeing WaitingForInput or later";

/// Per room, the decode and the prefill timestamps, joined by room id.
fn join_rooms(reports: &[WorkerReport]) -> Vec<(Times, Option<Times>)> {
    let prefill: HashMap<u64, Times> = reports
        .iter()
        .filter(|r| r.role == WorkerRole::Prefill)
        .flat_map(|r| r.ids.iter().copied().zip(r.times.iter().copied()))
        .collect();
    reports
        .iter()
        .filter(|r| r.role == WorkerRole::Decode)
        .flat_map(|r| r.ids.iter().zip(&r.times))
        .map(|(id, &t)| (t, prefill.get(id).copied()))
        .collect()
}

/// Bootstrap latencies (decode side, prefill side) and room latencies of the joined rooms.
fn latencies(rooms: &[(Times, Option<Times>)]) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let (mut dec, mut pre, mut room) = (Vec::new(), Vec::new(), Vec::new());
    for (d, p) in rooms {
        if d.done != 0 {
            room.push(d.done - d.created);
        }
        let Some(p) = p.filter(|p| p.created != 0 && d.inited != 0) else {
            continue;
        };
        let both = d.inited.max(p.created);
        if d.bootstrapped != 0 {
            dec.push(d.bootstrapped.saturating_sub(both));
        }
        if p.bootstrapped != 0 {
            pre.push(p.bootstrapped.saturating_sub(both));
        }
    }
    (dec, pre, room)
}

/// One summary row per worker.
fn process_rows(reports: &[WorkerReport]) -> Vec<ProcessRow> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    reports
        .iter()
        .map(|r| ProcessRow {
            role: r.role,
            index: r.index,
            pid: r.pid,
            rooms: r.ids.len(),
            create_ms: r.created_ns.saturating_sub(r.go_ns) as f64 / 1e6,
            threads_start: r.threads_start,
            threads_peak: r.threads_peak,
            threads_end: r.threads_end,
            rss_peak_mib: mib(r.rss_peak_kib),
            rss_end_mib: mib(r.rss_end_kib),
            hwm_mib: mib(r.hwm_kib),
        })
        .collect()
}

/// Builds the summary of a run of `plan` from the workers' reports.
fn summarise(
    model: &str,
    plan: &Plan,
    reports: &[WorkerReport],
    verify: bool,
    cold: bool,
) -> ScaleReport {
    let rooms = join_rooms(reports);
    let (dec, pre, room) = latencies(&rooms);
    let failed = sorted(reports.iter().flat_map(|r| &r.failures));
    let mismatched = sorted(reports.iter().flat_map(|r| &r.mismatches));
    let failed_rooms: BTreeSet<u64> = failed.iter().map(|(id, _)| *id).collect();
    let go = reports.iter().map(|r| r.go_ns).min().unwrap_or(0);
    let last_go = reports.iter().map(|r| r.go_ns).max().unwrap_or(0);
    let end = rooms.iter().map(|(d, _)| d.done).max().unwrap_or(go);
    let seconds = end.saturating_sub(go) as f64 / 1e9;
    let succeeded = rooms.iter().filter(|(d, _)| d.done != 0).count();
    let verified_rooms = reports.iter().map(|r| r.verified).sum();
    ScaleReport {
        model: model.to_string(),
        transport: reports
            .first()
            .map(|r| r.transport.clone())
            .unwrap_or_default(),
        prefill_procs: plan.prefill,
        decode_procs: plan.decode,
        inflight: plan.inflight,
        pages: plan.pages,
        page_bytes: plan.page_bytes,
        bytes_per_room: plan.bytes_per_room(),
        rooms: rooms.len(),
        succeeded,
        failures: failed_rooms.len(),
        failure_reasons: first_few(&failed),
        verified: verify && verified_rooms > 0,
        verified_rooms,
        mismatches: mismatched.len(),
        mismatch_reasons: first_few(&mismatched),
        first_failure: failed
            .first()
            .or(mismatched.first())
            .map(|&(id, why)| (*id, why.clone())),
        start_skew_ms: last_go.saturating_sub(go) as f64 / 1e6,
        seconds,
        rooms_per_s: succeeded as f64 / seconds.max(1e-9),
        bootstrap_measure: BOOTSTRAP_MEASURE,
        channels: if cold { "cold" } else { "warm" },
        bootstrap_decode: Quantiles::of(dec),
        bootstrap_prefill: Quantiles::of(pre),
        room_latency: Quantiles::of(room),
        processes: process_rows(reports),
    }
}

/// (room, reason) pairs sorted by room.
fn sorted<'r>(list: impl Iterator<Item = &'r (u64, String)>) -> Vec<&'r (u64, String)> {
    let mut v: Vec<_> = list.collect();
    v.sort_by_key(|(id, _)| *id);
    v
}

/// The first [`SHOWN_FAILURES`] of `list`, as text.
fn first_few(list: &[&(u64, String)]) -> Vec<String> {
    list.iter()
        .take(SHOWN_FAILURES)
        .map(|(id, why)| format!("room {id:#x}: {why}"))
        .collect()
}

/// Prints the summary as text.
fn print_text(r: &ScaleReport) {
    println!(
        "kv scale {} {}: {} prefill x {} decode processes, {} rooms in flight \
         ({} pages x {} B + {} B aux per room); workers started within {:.2} ms",
        r.model,
        r.transport,
        r.prefill_procs,
        r.decode_procs,
        r.inflight,
        r.pages,
        r.page_bytes,
        AUX_BYTES,
        r.start_skew_ms
    );
    println!(
        "rooms: {} succeeded, {} failed, {} verified, {} mismatched; {:.3} s from go to the \
         last Success ({:.0} rooms/s)",
        r.succeeded, r.failures, r.verified_rooms, r.mismatches, r.seconds, r.rooms_per_s
    );
    for why in &r.failure_reasons {
        println!("  failure: {why}");
    }
    for why in &r.mismatch_reasons {
        println!("  mismatch: {why}");
    }
    println!("\n| latency, ms | p50 | p99 | max |\n|---|---|---|---|");
    for (name, q) in [
        ("bootstrap, decode side", &r.bootstrap_decode),
        ("bootstrap, prefill side", &r.bootstrap_prefill),
        ("room (receiver created to Success)", &r.room_latency),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            q.p50_us / 1e3,
            q.p99_us / 1e3,
            q.max_us / 1e3
        );
    }
    println!("bootstrap: {}", r.bootstrap_measure);
    println!(
        "channels: {} ({})",
        r.channels,
        if r.channels == "warm" {
            "one room per prefill and decode pair ran before the burst"
        } else {
            "opened during the burst"
        }
    );
    println!(
        "\n| process | rooms | create ms | threads start / peak / end | RSS MiB peak / end | HWM MiB |\n|---|---|---|---|---|---|"
    );
    for p in &r.processes {
        println!(
            "| {} {} (pid {}) | {} | {:.1} | {} / {} / {} | {:.1} / {:.1} | {:.1} |",
            p.role.name(),
            p.index,
            p.pid,
            p.rooms,
            p.create_ms,
            p.threads_start,
            p.threads_peak,
            p.threads_end,
            p.rss_peak_mib,
            p.rss_end_mib,
            p.hwm_mib
        );
    }
}

/// An error if any room failed or mismatched.
fn verdict(r: &ScaleReport) -> Result<()> {
    let Some((room, why)) = &r.first_failure else {
        return Ok(());
    };
    Err(Error::RoomFailed {
        room: *room,
        reason: format!(
            "{why} ({} of {} rooms failed, {} mismatched)",
            r.failures, r.rooms, r.mismatches
        ),
    })
}

/// `bench --kv MODEL --prefill-procs P --decode-procs D`: see the module docs.
pub(crate) fn run(a: &BenchArgs, k: &KvArgs) -> Result<()> {
    if let Some(role) = k.scale.kv_scale_worker {
        return worker(a, k, role);
    }
    if a.role != Role::Loopback {
        return Err(Error::InvalidArgument(
            "scale mode starts its own prefill and decode processes: use --role loopback".into(),
        ));
    }
    let plan = Plan::new(k)?;
    let model =
        k.kv.and_then(|m| m.to_possible_value())
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
    let mut kids = start(&plan)?;
    let reports = collect(&mut kids)?;
    let report = summarise(&model, &plan, &reports, !a.no_verify, k.scale.cold);
    if a.json {
        println!("{}", serde_json::to_string(&report).expect("serialisable"));
    } else {
        print_text(&report);
    }
    verdict(&report)
}
