//! `kvtransfer bench --peers 1,8,64`: what one engine costs as its peer count grows. For each
//! N it starts a fresh engine, connects it to N peer processes (`bench --role target`
//! children, started once and shared by every N), writes 4 KiB to each and reads this
//! process's threads, resident memory and file descriptors from `/proc/self`. The peers use
//! `KVT_SCALE_PEER_DEVICES` as their `KVT_DEVICES` when it is set.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use kvtransfer::{Error, Request, Result, TransferEngine};
use serde::Serialize;

/// One row of the table.
#[derive(Serialize, Debug)]
struct Row {
    peers: usize,
    transport: String,
    connect_ms: f64,
    connect_ms_per_peer: f64,
    threads: usize,
    threads_before: usize,
    rss_mib: f64,
    fds: usize,
    fds_before: usize,
}

/// The peer processes; killed when dropped.
struct Peers(Vec<(Child, String)>);

impl Drop for Peers {
    fn drop(&mut self) {
        for (c, _) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_peer(transport: Option<&str>) -> Result<(Child, String)> {
    let exe = std::env::current_exe().map_err(|e| Error::Io {
        call: "current_exe",
        source: e,
    })?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "--role", "target", "--buffer-size", "1M"]);
    if let Some(t) = transport {
        cmd.args(["--transport", t]);
    }
    // Peers on other devices than this engine (RDMA: the other side of the fabric).
    if let Ok(devs) = std::env::var("KVT_SCALE_PEER_DEVICES") {
        cmd.env("KVT_DEVICES", devs);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Io {
            call: "spawn peer",
            source: e,
        })?;
    let mut line = String::new();
    let out = child.stdout.take().expect("piped");
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| Error::Io {
            call: "read peer address",
            source: e,
        })?;
    let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|e| {
        let _ = child.kill();
        Error::InvalidArgument(format!("peer said {line:?}: {e}"))
    })?;
    let addr = v["listening"].as_str().unwrap_or_default().to_string();
    Ok((child, addr))
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs the scale table for each peer count in `counts`.
pub(crate) fn run(a: &crate::bench::BenchArgs, counts: &[usize], json: bool) -> Result<()> {
    let most = counts.iter().copied().max().unwrap_or(0);
    if most == 0 {
        return Err(Error::InvalidArgument("--peers wants counts > 0".into()));
    }
    let transport = a.transport_name();
    let mut peers = Peers(Vec::with_capacity(most));
    for _ in 0..most {
        peers.0.push(spawn_peer(transport)?);
    }
    if !json {
        println!(
            "| peers | transport | connect ms (per peer) | threads (before) | RSS MiB | fds (before) |"
        );
        println!("|---|---|---|---|---|---|");
    }
    for &n in counts {
        let threads_before = count_dir("/proc/self/task");
        let fds_before = count_dir("/proc/self/fd");
        let engine = TransferEngine::new(crate::bench::config(a, "127.0.0.1:0")?)?;
        let buf = engine.alloc(4096)?;
        let t0 = Instant::now();
        let mut ids = Vec::with_capacity(n);
        for (_, addr) in &peers.0[..n] {
            ids.push(engine.connect(addr.as_str())?);
        }
        let connect = t0.elapsed().as_secs_f64() * 1e3;
        for &p in &ids {
            let seg = engine
                .remote_segments(p)?
                .into_iter()
                .next()
                .ok_or_else(|| Error::InvalidArgument("peer has no segment".into()))?;
            engine.transfer_sync(p, &[Request::write(buf.addr(), 4096, seg.id, 0)])?;
        }
        let row = Row {
            peers: n,
            transport: engine.transport().to_string(),
            connect_ms: connect,
            connect_ms_per_peer: connect / n as f64,
            threads: count_dir("/proc/self/task"),
            threads_before,
            rss_mib: rss_mib(),
            fds: count_dir("/proc/self/fd"),
            fds_before,
        };
        if json {
            println!("{}", serde_json::to_string(&row).expect("serialisable"));
        } else {
            println!(
                "| {} | {} | {:.1} ({:.2}) | {} ({}) | {:.1} | {} ({}) |",
                row.peers,
                row.transport,
                row.connect_ms,
                row.connect_ms_per_peer,
                row.threads,
                row.threads_before,
                row.rss_mib,
                row.fds,
                row.fds_before
            );
        }
        drop(buf);
        drop(engine);
    }
    Ok(())
}
