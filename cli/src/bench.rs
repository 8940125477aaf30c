//! `kvtransfer bench`: bandwidth (batches of blocks) or latency (single writes) between two
//! engines, in one process (`loopback`) or two (`target` + `initiator`); with `--kv MODEL`,
//! KV rooms instead (see `kvbench`).

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kvtransfer::{
    EngineConfig, Error, HostBuffer, PeerId, Request, Result, SegmentId, TransferEngine,
    TransportKind,
};
use serde::Serialize;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Serve a buffer until killed; prints one JSON line with address and segment.
    Target,
    /// Run against a target started elsewhere (`--target ADDR`).
    Initiator,
    /// Both engines in this process.
    Loopback,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BenchOp {
    /// Local → remote.
    Write,
    /// Remote → local.
    Read,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Layout {
    /// Block i goes to remote offset i: the planner coalesces a batch into large slices.
    Contiguous,
    /// Block i goes to remote slot (n-1-i): nothing coalesces, every block is its own slice.
    Reversed,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Batches of blocks, as fast as possible.
    Throughput,
    /// One block per transfer, timed one at a time.
    Latency,
}

/// Benchmark options.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Which side(s) this process plays.
    #[arg(long, value_enum, default_value = "loopback")]
    pub(crate) role: Role,
    /// Write or read.
    #[arg(long, value_enum, default_value = "write")]
    op: BenchOp,
    /// Throughput or latency.
    #[arg(long, value_enum, default_value = "throughput")]
    mode: Mode,
    /// Bytes per block (K/M suffixes).
    #[arg(long, default_value = "64K", value_parser = size)]
    block_size: u64,
    /// Blocks per batch (throughput mode).
    #[arg(long, default_value_t = 128)]
    batch_size: u64,
    /// Where blocks land remotely (contiguous coalesces; reversed keeps blocks separate).
    #[arg(long, value_enum, default_value = "contiguous")]
    layout: Layout,
    /// Batches each thread keeps in flight.
    #[arg(long, default_value_t = 2)]
    depth: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Submitting threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Transport (auto, tcp, rdma); default from KVT_TRANSPORT, else auto.
    #[arg(long)]
    transport: Option<String>,
    /// Connections per peer (default from config).
    #[arg(long)]
    connections: Option<usize>,
    /// Target address (initiator role).
    #[arg(long)]
    target: Option<String>,
    /// Listen address (target role; loopback uses an ephemeral port).
    #[arg(long)]
    listen: Option<String>,
    /// Target buffer size (target role); initiators use what fits.
    #[arg(long, value_parser = size)]
    buffer_size: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Skip the end-of-run check of the destination bytes (writes are read back and compared;
    /// reads are compared with the pattern a fresh target fills its buffer with).
    #[arg(long)]
    pub(crate) no_verify: bool,
    /// Peer counts, e.g. `1,8,64`: instead of bandwidth, connect one engine to that many peer
    /// processes and report its threads, memory, file descriptors and connect time.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<usize>,
    /// KV-room options (`--kv MODEL` switches to them).
    #[command(flatten)]
    kv: crate::kvbench::KvArgs,
}

fn size(s: &str) -> std::result::Result<u64, String> {
    kvtransfer::config::parse_size("size", s).map_err(|e| e.to_string())
}

/// One benchmark result, as printed with `--json`.
#[derive(Serialize, Debug)]
struct Report {
    transport: &'static str,
    op: BenchOp,
    mode: Mode,
    block_size: u64,
    batch_size: u64,
    layout: Layout,
    threads: usize,
    connections: usize,
    depth: usize,
    bytes: u64,
    seconds: f64,
    gbps: f64,
    blocks_per_s: f64,
    latency_p50_us: f64,
    latency_p99_us: f64,
    latency_max_us: f64,
    cpu_seconds: f64,
    verified: bool,
    /// The initiator engine's metric totals at the end (verification included).
    metrics: serde_json::Value,
}

pub(crate) fn config(a: &BenchArgs, listen: &str) -> Result<EngineConfig> {
    let mut b = EngineConfig::builder().env_overrides().listen(listen);
    if let Some(t) = &a.transport {
        b = b.transport(t.parse::<TransportKind>()?);
    }
    if let Some(c) = a.connections {
        b = b.connections_per_peer(c);
    }
    b.build()
}

/// The byte at `i` of the target's pattern (so a separate initiator can verify reads).
fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn fill_pattern(buf: &HostBuffer, salt: u8) {
    let chunk = 1 << 20;
    let mut tmp = vec![0u8; chunk];
    let mut off = 0;
    while off < buf.len() {
        let n = chunk.min(buf.len() - off);
        for (i, b) in tmp[..n].iter_mut().enumerate() {
            *b = pattern_byte((off + i) as u64) ^ salt;
        }
        buf.write(off, &tmp[..n]);
        off += n;
    }
}

fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

impl BenchArgs {
    /// The `--transport` given, if any.
    pub(crate) fn transport_name(&self) -> Option<&str> {
        self.transport.as_deref()
    }
}

pub(crate) fn run(a: BenchArgs) -> Result<()> {
    if a.kv.kv.is_some() {
        return crate::kvbench::run(&a, &a.kv);
    }
    if !a.peers.is_empty() {
        return crate::scale::run(&a, &a.peers, a.json);
    }
    if a.block_size == 0 || a.batch_size == 0 || a.threads == 0 || a.depth == 0 {
        return Err(Error::InvalidArgument(
            "block size, batch size, threads and depth must be > 0".into(),
        ));
    }
    let (batch, depth) = match a.mode {
        Mode::Latency => (1, 1),
        Mode::Throughput => (a.batch_size, a.depth),
    };
    let region = a.block_size * batch;
    let needed = region * a.threads as u64;
    match a.role {
        Role::Target => {
            let engine =
                TransferEngine::new(config(&a, a.listen.as_deref().unwrap_or("127.0.0.1:0"))?)?;
            let buf = engine.alloc(a.buffer_size.unwrap_or(needed.max(64 << 20)) as usize)?;
            fill_pattern(&buf, 0);
            println!(
                "{}",
                serde_json::json!({"listening": engine.local_addr().to_string(), "segment": buf.segment().0,
                    "len": buf.len(), "transport": engine.transport()})
            );
            let _ = std::io::stdout().flush();
            let _keep = buf;
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Role::Loopback => {
            let target = TransferEngine::new(config(&a, "127.0.0.1:0")?)?;
            let remote = target.alloc(needed as usize)?;
            fill_pattern(&remote, 0);
            let initiator = TransferEngine::new(config(&a, "127.0.0.1:0")?)?;
            let peer = initiator.connect(target.local_addr())?;
            measure(&a, &initiator, peer, remote.segment(), batch, depth)
        }
        Role::Initiator => {
            let addr = a
                .target
                .clone()
                .ok_or_else(|| Error::InvalidArgument("--target ADDR is required".into()))?;
            let initiator = TransferEngine::new(config(&a, "127.0.0.1:0")?)?;
            let peer = initiator.connect(addr.as_str())?;
            let seg = initiator
                .remote_segments(peer)?
                .into_iter()
                .max_by_key(|s| s.len)
                .ok_or_else(|| Error::InvalidArgument("target has no registered segment".into()))?;
            if seg.len < needed {
                return Err(Error::InvalidArgument(format!(
                    "target segment has {} bytes; this run needs {needed}",
                    seg.len
                )));
            }
            measure(&a, &initiator, peer, seg.id, batch, depth)
        }
    }
}

fn measure(
    a: &BenchArgs,
    engine: &TransferEngine,
    peer: PeerId,
    remote: SegmentId,
    batch: u64,
    depth: usize,
) -> Result<()> {
    let region = a.block_size * batch;
    let local = engine.alloc((region * a.threads as u64) as usize)?;
    fill_pattern(&local, 0x5A);
    let requests: Vec<Vec<Request>> = (0..a.threads as u64)
        .map(|t| {
            (0..batch)
                .map(|i| {
                    let off = t * region + i * a.block_size;
                    let slot = match a.layout {
                        Layout::Contiguous => i,
                        Layout::Reversed => batch - 1 - i,
                    };
                    let roff = t * region + slot * a.block_size;
                    match a.op {
                        BenchOp::Write => {
                            Request::write(local.addr() + off, a.block_size, remote, roff)
                        }
                        BenchOp::Read => {
                            Request::read(local.addr() + off, a.block_size, remote, roff)
                        }
                    }
                })
                .collect()
        })
        .collect();
    // Warm up: one batch per thread, so connections and caches are hot before timing.
    for r in &requests {
        engine.transfer_sync(peer, r)?;
    }
    let bar = (std::io::stderr().is_terminal() && !a.json).then(|| {
        let b = ProgressBar::new((a.duration * 10.0) as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
                .expect("valid template"),
        );
        b
    });
    let bytes = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(a.duration);
    let histograms: Vec<Result<Histogram<u64>>> = std::thread::scope(|s| {
        let workers: Vec<_> = requests
            .iter()
            .map(|reqs| {
                let (bytes, stop) = (&bytes, &stop);
                s.spawn(move || -> Result<Histogram<u64>> {
                    let mut h =
                        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
                    let mut inflight: VecDeque<(kvtransfer::BatchId, Instant)> = VecDeque::new();
                    while !stop.load(Ordering::Relaxed) || !inflight.is_empty() {
                        while inflight.len() < depth && !stop.load(Ordering::Relaxed) {
                            let t0 = Instant::now();
                            inflight.push_back((engine.submit(peer, reqs)?, t0));
                        }
                        let Some((id, t0)) = inflight.pop_front() else {
                            break;
                        };
                        engine.wait(id)?;
                        h.saturating_record(t0.elapsed().as_nanos().max(1000) as u64 / 1000);
                        bytes.fetch_add(region, Ordering::Relaxed);
                        if Instant::now() >= until {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    Ok(h)
                })
            })
            .collect();
        if let Some(b) = &bar {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                b.set_position((start.elapsed().as_secs_f64() * 10.0) as u64);
                let secs = start.elapsed().as_secs_f64();
                b.set_message(format!(
                    "{:.2} GB/s",
                    bytes.load(Ordering::Relaxed) as f64 / secs / 1e9
                ));
            }
            b.finish_and_clear();
        }
        workers
            .into_iter()
            .map(|w| w.join().expect("bench thread panicked"))
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for r in histograms {
        h.add(r?).expect("same bounds");
    }
    let verified = if a.no_verify {
        false
    } else {
        verify(a, engine, peer, remote, &local, region)?
    };
    let bytes = bytes.load(Ordering::Relaxed);
    let report = Report {
        transport: engine.transport(),
        op: a.op,
        mode: a.mode,
        block_size: a.block_size,
        batch_size: batch,
        layout: a.layout,
        threads: a.threads,
        connections: engine.peer_info(peer)?.lanes,
        depth,
        bytes,
        seconds,
        gbps: bytes as f64 / seconds / 1e9,
        blocks_per_s: (bytes / a.block_size) as f64 / seconds,
        latency_p50_us: h.value_at_quantile(0.5) as f64,
        latency_p99_us: h.value_at_quantile(0.99) as f64,
        latency_max_us: h.max() as f64,
        cpu_seconds: cpu,
        verified,
        metrics: {
            let m = engine.metrics();
            serde_json::json!({
                "batches_done": m.batches_done,
                "batches_failed": m.batches_failed,
                "batches_timed_out": m.batches_timed_out,
                "bytes_written": m.bytes_written,
                "bytes_read": m.bytes_read,
                "batch_latency_mean_us": m.batch_latency.mean().map(|d| d.as_secs_f64() * 1e6),
                "refused": m.refused,
            })
        },
    };
    if a.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        println!(
            "{} {} {:?}: {} B x {} per batch, {} thread(s), {} connection(s): {:.3} GB/s, {:.0} blocks/s, \
             latency p50 {} us p99 {} us, cpu {:.2} s, verified {}",
            report.transport,
            serde_json::to_string(&a.op)
                .expect("serializable")
                .trim_matches('"'),
            a.mode,
            a.block_size,
            batch,
            a.threads,
            report.connections,
            report.gbps,
            report.blocks_per_s,
            report.latency_p50_us,
            report.latency_p99_us,
            report.cpu_seconds,
            verified
        );
        println!("{}", crate::report::summary("initiator", &engine.metrics()));
    }
    Ok(())
}

/// Checks the destination bytes: for writes, reads the target region back and compares it
/// with the source; for reads, compares local bytes with the target's known pattern.
fn verify(
    a: &BenchArgs,
    engine: &TransferEngine,
    peer: PeerId,
    remote: SegmentId,
    local: &HostBuffer,
    region: u64,
) -> Result<bool> {
    let total = region * a.threads as u64;
    let bs = a.block_size as usize;
    let blocks = (region / a.block_size) as usize;
    // Block i of a thread's region pairs with remote slot `slot(i)`; reversed is its own inverse.
    let slot = |i: usize| match a.layout {
        Layout::Contiguous => i,
        Layout::Reversed => blocks - 1 - i,
    };
    let permute = |src: &[u8]| -> Vec<u8> {
        let mut out = vec![0u8; src.len()];
        for t in 0..a.threads {
            let base = t * region as usize;
            for i in 0..blocks {
                let (from, to) = (base + slot(i) * bs, base + i * bs);
                out[to..to + bs].copy_from_slice(&src[from..from + bs]);
            }
        }
        out
    };
    let mut got = vec![0u8; total as usize];
    let expected: Vec<u8> = match a.op {
        BenchOp::Write => {
            let check = engine.alloc(total as usize)?;
            engine.transfer_sync(peer, &[Request::read(check.addr(), total, remote, 0)])?;
            check.read(0, &mut got);
            permute(&local.to_vec())
        }
        BenchOp::Read => {
            local.read(0, &mut got);
            permute(&(0..total).map(pattern_byte).collect::<Vec<u8>>())
        }
    };
    if got != expected {
        let at = got
            .iter()
            .zip(&expected)
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        return Err(Error::BatchFailed {
            batch: 0,
            reason: format!("verification failed at byte {at}"),
        });
    }
    Ok(true)
}
