//! `kvtransfer devices`: every RDMA port sysfs shows, the GID each would use, and which
//! transport `auto` would pick, from the same [`topology`] code the engine uses.

use std::path::PathBuf;

use clap::Args;
use kvtransfer::topology::{self, GidEntry, PortInfo};
use kvtransfer::{Error, Result};
use serde_json::{Value, json};

/// Devices options.
#[derive(Args, Debug)]
pub(crate) struct DevicesArgs {
    /// Root of the sysfs tree to read (a fixture tree in tests).
    #[arg(long, default_value = topology::SYSFS_ROOT)]
    sysfs: PathBuf,
    /// Use this GID index on every port instead of choosing one (like KVT_GID_INDEX).
    #[arg(long)]
    gid_index: Option<u16>,
    /// Allowed devices, e.g. mlx5_0,mlx5_3 or mlx5_0:1 (like KVT_DEVICES); default all.
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// What `auto` would do, and why.
struct Verdict {
    /// Rails `auto` would open, as `device:port`, in rail order.
    rails: Vec<String>,
    /// Why TCP, when there are no rails.
    reason: String,
}

pub(crate) fn run(a: DevicesArgs) -> Result<()> {
    if !a.sysfs.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "--sysfs {}: not a directory",
            a.sysfs.display()
        )));
    }
    let allow = a.devices.as_deref();
    let (ports, verdict) = match topology::discover(&a.sysfs) {
        Ok(ports) => {
            let verdict = match topology::usable_rails(&ports, allow, a.gid_index) {
                Ok(rails) => Verdict {
                    rails: rails.iter().map(|(p, _)| p.name()).collect(),
                    reason: String::new(),
                },
                Err(e) => Verdict {
                    rails: Vec::new(),
                    reason: e.to_string(),
                },
            };
            (ports, verdict)
        }
        Err(e) => (
            Vec::new(),
            Verdict {
                rails: Vec::new(),
                reason: e.to_string(),
            },
        ),
    };
    let unmatched = allow.map_or_else(Vec::new, |l| topology::unmatched_allow(&ports, l));
    if a.json {
        print_json(&ports, &verdict, &a, &unmatched);
    } else {
        print_table(&ports, &verdict, &a, &unmatched);
    }
    Ok(())
}

/// What GPU memory would be registered as here: `(available, one-line summary)`.
fn gpu_memory(verdict: &Verdict, a: &DevicesArgs) -> (bool, String) {
    let mode = std::env::var("KVT_GPU_MODE")
        .ok()
        .and_then(|v| v.parse::<kvtransfer::GpuMode>().ok())
        .unwrap_or_default();
    match kvtransfer::cuda::driver_info() {
        Err(kvtransfer::Error::CudaUnavailable { reason }) => (
            false,
            format!("CUDA unavailable ({reason}); GPU segments cannot be registered"),
        ),
        Err(e) => (false, format!("{e}; GPU segments cannot be registered")),
        Ok((version, gpus)) => {
            let driver = format!(
                "{gpus} GPU{}, CUDA driver {}.{}",
                if gpus == 1 { "" } else { "s" },
                version / 1000,
                version % 1000 / 10
            );
            if verdict.rails.is_empty() {
                return (
                    true,
                    format!("{driver}; transport tcp: GPU segments go through host staging"),
                );
            }
            let dmabuf = kvtransfer::cuda::dmabuf_export_supported().unwrap_or(false);
            let peermem = a.sysfs.join("module/nvidia_peermem").exists();
            let yes = |b: bool| if b { "yes" } else { "no" };
            (
                true,
                format!(
                    "{driver}; rdma gpu_mode {}: dmabuf (driver exports dma-bufs: {}) → peermem \
                     (nvidia_peermem loaded: {}) → staging (over the TCP control connection)",
                    mode.as_str(),
                    yes(dmabuf),
                    yes(peermem)
                ),
            )
        }
    }
}

/// The rail a port would be, or why it is none.
fn rail_of(
    port: &PortInfo,
    verdict: &Verdict,
    a: &DevicesArgs,
) -> std::result::Result<usize, String> {
    let name = port.name();
    if let Some(i) = verdict.rails.iter().position(|r| *r == name) {
        return Ok(i);
    }
    if !port.state.is_active() {
        return Err(format!("port {}", port.state));
    }
    let allowed = topology::select_rails(std::slice::from_ref(port), a.devices.as_deref());
    if allowed.is_empty() {
        return Err("not in --devices".into());
    }
    Err("no usable GID".into())
}

fn gid_text(g: &GidEntry) -> String {
    format!("{} {} ({})", g.index, g, g.kind)
}

fn print_table(ports: &[PortInfo], verdict: &Verdict, a: &DevicesArgs, unmatched: &[&str]) {
    if ports.is_empty() {
        println!("no RDMA ports under {}", a.sysfs.display());
    } else {
        let header = [
            "DEVICE", "PORT", "STATE", "LINK", "MTU", "LID", "NETDEV", "GID", "RAIL",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for p in ports {
            let gid = match topology::choose_gid(p, a.gid_index) {
                Ok(g) => gid_text(&g),
                Err(e) => format!("none: {e}"),
            };
            let rail = match rail_of(p, verdict, a) {
                Ok(i) => i.to_string(),
                Err(why) => format!("- ({why})"),
            };
            rows.push(vec![
                p.device.clone(),
                p.port.to_string(),
                p.state.to_string(),
                p.link_layer.to_string(),
                p.active_mtu.to_string(),
                format!("{:#x}", p.lid),
                p.netdev.clone().unwrap_or_else(|| "-".into()),
                gid,
                rail,
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            println!("{}", line.join("  ").trim_end());
        }
    }
    for entry in unmatched {
        println!("note: --devices entry {entry} names no port");
    }
    if verdict.rails.is_empty() {
        println!("transport auto: tcp ({})", verdict.reason);
    } else {
        let n = verdict.rails.len();
        println!(
            "transport auto: rdma ({n} usable rail{}: {})",
            if n == 1 { "" } else { "s" },
            verdict.rails.join(", ")
        );
    }
    println!("GPU memory: {}", gpu_memory(verdict, a).1);
}

fn gid_json(g: &GidEntry) -> Value {
    json!({
        "index": g.index,
        "gid": g.to_string(),
        "type": g.kind.to_string(),
        "netdev": g.netdev,
    })
}

fn print_json(ports: &[PortInfo], verdict: &Verdict, a: &DevicesArgs, unmatched: &[&str]) {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let (gid, gid_error) = match topology::choose_gid(p, a.gid_index) {
                Ok(g) => (gid_json(&g), Value::Null),
                Err(e) => (Value::Null, Value::String(e.to_string())),
            };
            let (rail, excluded) = match rail_of(p, verdict, a) {
                Ok(i) => (json!(i), Value::Null),
                Err(why) => (Value::Null, Value::String(why)),
            };
            json!({
                "device": p.device,
                "port": p.port,
                "state": p.state.to_string(),
                "link_layer": p.link_layer.to_string(),
                "mtu": p.active_mtu,
                "lid": p.lid,
                "netdev": p.netdev,
                "gid": gid,
                "gid_error": gid_error,
                "rail": rail,
                "excluded": excluded,
                "gids": p.gids.iter().map(gid_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    let (transport, reason) = if verdict.rails.is_empty() {
        ("tcp", verdict.reason.clone())
    } else {
        ("rdma", format!("{} usable rails", verdict.rails.len()))
    };
    let (gpu_available, gpu_summary) = gpu_memory(verdict, a);
    let out = json!({
        "gpu": { "available": gpu_available, "summary": gpu_summary },
        "transport": transport,
        "reason": reason,
        "rails": verdict.rails,
        "unmatched_devices": unmatched,
        "ports": ports,
    });
    println!("{out}");
}
