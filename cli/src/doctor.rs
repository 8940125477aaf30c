//! `kvtransfer doctor`: checks what RDMA and GPU transfers need on this host, explains each
//! problem with its fix, shows the GPU↔NIC map and says which transport the engine will use.
//!
//! Sysfs checks read `--sysfs` (a fixture tree in tests); the library probes (libibverbs,
//! libcuda), `ulimit -l` and the kernel release are always this host's. Exit status 0 whatever
//! the checks find (doctor reports, it does not gate); 1 only when it cannot run.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use clap::Args;
use kvtransfer::probe::{self, VerbsLibrary};
use kvtransfer::topology::{self, Distance, LinkLayer, PciTopology, Placement, PortInfo};
use kvtransfer::{EngineConfig, Error, Result, TransportKind};
use serde_json::{Value, json};

/// Doctor options.
#[derive(Args, Debug)]
pub(crate) struct DoctorArgs {
    /// Root of the sysfs tree to read (a fixture tree in tests).
    #[arg(long, default_value = topology::SYSFS_ROOT)]
    sysfs: PathBuf,
    /// Nearest rails per GPU segment (default: KVT_RAILS_PER_GPU, else 1).
    #[arg(long)]
    rails_per_gpu: Option<usize>,
    /// Allowed devices, e.g. mlx5_0,mlx5_3 (default: KVT_DEVICES, else the KV rails).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// GID index on every port (default: KVT_GID_INDEX, else chosen).
    #[arg(long)]
    gid_index: Option<u16>,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skip => "skip",
        }
    }
}

/// One check: what was looked at, what was found, and how to fix it when not ok.
struct Check {
    name: &'static str,
    status: Status,
    found: String,
    fix: Option<String>,
}

fn check(name: &'static str, status: Status, found: impl Into<String>) -> Check {
    Check {
        name,
        status,
        found: found.into(),
        fix: None,
    }
}

impl Check {
    fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }
}

/// The settings that decide rails, from the environment with the flags on top.
struct Settings {
    devices: Option<Vec<String>>,
    gid_index: Option<u16>,
    rails_per_gpu: usize,
    transport: TransportKind,
}

/// What sysfs says about RDMA: ports, the engine's rails, and the PCI placement.
struct Host {
    ports: std::result::Result<Vec<PortInfo>, Error>,
    /// The rails the engine would open, as `(port, gid index)`, in rail order.
    rails: std::result::Result<Vec<(PortInfo, u16)>, Error>,
    /// Usable ports (before the KV narrowing) that are not KV rails.
    not_kv: Vec<PortInfo>,
    pci: PciTopology,
}

pub(crate) fn run(a: DoctorArgs) -> Result<()> {
    if !a.sysfs.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "--sysfs {}: not a directory",
            a.sysfs.display()
        )));
    }
    let mut checks = Vec::new();
    let config =
        match EngineConfig::from_env() {
            Ok(c) => c,
            Err(e) => {
                checks.push(check("config", Status::Fail, e.to_string()).fix(
                    "correct or unset the KVT_* variable it names; the defaults are used below",
                ));
                EngineConfig::default()
            }
        };
    let s = Settings {
        devices: a.devices.clone().or(config.devices.clone()),
        gid_index: a.gid_index.or(config.gid_index),
        rails_per_gpu: a.rails_per_gpu.unwrap_or(config.rails_per_gpu).max(1),
        transport: config.transport,
    };
    let verbs = probe::verbs_library();
    let host = read_host(&a.sysfs, &s);

    checks.push(rdma_core(&verbs));
    checks.push(uverbs(&a.sysfs));
    checks.push(devices(&host));
    checks.push(link_layer(&host));
    checks.push(mtu(&host));
    checks.push(gid(&host, &s));
    checks.push(memlock());
    checks.push(peermem(&a.sysfs, &host.pci));
    checks.push(dmabuf(&a.sysfs, &host.pci));
    checks.push(libcuda(&host.pci));
    checks.push(authentication(&config));
    let map = Map::new(&host, s.rails_per_gpu);
    checks.push(map.check(&host));

    let (transport, reason) = verdict(&verbs, &host, &s);
    if a.json {
        print_json(&a, &s, &checks, &map, &host, transport, &reason);
    } else {
        print_text(&a, &checks, transport, &reason);
    }
    Ok(())
}

fn read_host(sysfs: &Path, s: &Settings) -> Host {
    let ports = topology::discover(sysfs);
    let pci = topology::discover_pci(sysfs).unwrap_or_default();
    let mut not_kv = Vec::new();
    let rails = match &ports {
        Ok(ports) => {
            topology::usable_rails(ports, s.devices.as_deref(), s.gid_index).map(|usable| {
                let names: Vec<&str> = usable.iter().map(|(p, _)| p.device.as_str()).collect();
                let kv = match s.devices {
                    Some(_) => (0..usable.len()).collect(),
                    None => topology::kv_rails(&pci, &names),
                };
                let mut rails = Vec::new();
                for (i, (p, g)) in usable.iter().enumerate() {
                    if kv.contains(&i) {
                        rails.push(((*p).clone(), g.index));
                    } else {
                        not_kv.push((*p).clone());
                    }
                }
                rails
            })
        }
        Err(e) => Err(clone_error(e)),
    };
    Host {
        ports,
        rails,
        not_kv,
        pci,
    }
}

/// The errors discovery gives, copied (Error is not Clone: it may hold an io::Error).
fn clone_error(e: &Error) -> Error {
    match e {
        Error::RdmaKernelMissing => Error::RdmaKernelMissing,
        Error::RdmaCoreMissing => Error::RdmaCoreMissing,
        other => Error::NoRdmaDevice {
            reason: other.to_string(),
        },
    }
}

/// Whether peers must prove the cluster secret, and whether the listen address needs one.
fn authentication(config: &EngineConfig) -> Check {
    let listen = config.listen;
    match (&config.secret, listen.ip().is_loopback()) {
        (Some(_), _) => check(
            "authentication",
            Status::Ok,
            format!("cluster secret set: peers prove it before anything is revealed (listen {listen})"),
        ),
        (None, true) => check(
            "authentication",
            Status::Ok,
            format!("no cluster secret; listen {listen} is loopback only"),
        )
        .fix("set KVT_SECRET or KVT_SECRET_FILE on every engine before listening beyond loopback"),
        (None, false) => check(
            "authentication",
            Status::Warn,
            format!(
                "no cluster secret and listen {listen} is reachable from the network: anyone who \
                 can reach the port can read and write registered memory"
            ),
        )
        .fix("set KVT_SECRET (at least 16 bytes) or KVT_SECRET_FILE to the same secret on every engine"),
    }
}

fn rdma_core(verbs: &VerbsLibrary) -> Check {
    let path = probe::find_library("libibverbs.so.1")
        .map_or_else(String::new, |p| format!(" ({})", p.display()));
    match verbs {
        VerbsLibrary::Missing => check(
            "rdma-core",
            Status::Fail,
            "libibverbs.so.1 cannot be loaded: rdma-core is not installed",
        )
        .fix("install rdma-core: `apt install rdma-core ibverbs-providers` (Debian/Ubuntu) or `dnf install rdma-core libibverbs`"),
        VerbsLibrary::Failed(e) => check(
            "rdma-core",
            Status::Warn,
            format!("libibverbs.so.1 loaded{path}, but listing devices failed: {e}"),
        )
        .fix("check `ibv_devices`; reinstall rdma-core and ibverbs-providers if it fails too"),
        VerbsLibrary::KernelMissing => check(
            "rdma-core",
            Status::Ok,
            format!("libibverbs.so.1 loaded{path}; the running kernel has no RDMA support for it (ENOSYS)"),
        ),
        VerbsLibrary::Usable { devices } => check(
            "rdma-core",
            Status::Ok,
            format!("libibverbs.so.1 loaded{path}; it lists {devices} device(s)"),
        ),
    }
}

fn uverbs(sysfs: &Path) -> Check {
    let dir = sysfs.join("class/infiniband_verbs");
    if !dir.is_dir() {
        return check(
            "kernel uverbs",
            Status::Fail,
            format!(
                "no {}: the kernel has no RDMA support (ib_uverbs is not loaded)",
                dir.display()
            ),
        )
        .fix("load the RDMA drivers: `modprobe ib_uverbs mlx5_ib` (ConnectX); with no RDMA NIC, Soft-RoCE for testing: `modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0`");
    }
    let abi = fs::read_to_string(dir.join("abi_version")).unwrap_or_default();
    let n = fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("uverbs"))
                .count()
        })
        .unwrap_or(0);
    check(
        "kernel uverbs",
        Status::Ok,
        format!(
            "{} present (ABI version {}, {n} uverbs device(s))",
            dir.display(),
            abi.trim()
        ),
    )
}

fn port_list(ports: &[PortInfo]) -> String {
    ports
        .iter()
        .map(|p| format!("{} {}", p.name(), p.state))
        .collect::<Vec<_>>()
        .join(", ")
}

fn devices(host: &Host) -> Check {
    let ports = match &host.ports {
        Ok(p) => p,
        Err(Error::RdmaKernelMissing) => {
            return check(
                "devices",
                Status::Skip,
                "no kernel RDMA support, so no devices",
            );
        }
        Err(e) => {
            return check("devices", Status::Fail, e.to_string()).fix(
                "check the NIC is there (`lspci | grep -i mellanox`) and its driver is loaded (mlx5_core, mlx5_ib)",
            );
        }
    };
    let devices = host.pci.hcas.len().max(1);
    let active = ports.iter().filter(|p| p.state.is_active()).count();
    let found = format!(
        "{devices} device(s), {} port(s), {active} ACTIVE: {}",
        ports.len(),
        port_list(ports)
    );
    let fix = "bring the link up: check the cable and the switch port, `ip link set <netdev> up`; `rdma link` and `ibstat` show the physical state";
    match active {
        0 => check("devices", Status::Fail, found).fix(fix),
        n if n < ports.len() => check("devices", Status::Warn, found).fix(fix),
        _ => check("devices", Status::Ok, found),
    }
}

/// The engine's rails, or `None` (with the check to report) when there are none.
fn rails_or_skip<'a>(
    host: &'a Host,
    name: &'static str,
) -> std::result::Result<&'a [(PortInfo, u16)], Check> {
    match &host.rails {
        Ok(r) if !r.is_empty() => Ok(r),
        Ok(_) => Err(check(name, Status::Skip, "no rails")),
        Err(e) => Err(check(name, Status::Skip, format!("no rails: {e}"))),
    }
}

fn link_layer(host: &Host) -> Check {
    let rails = match rails_or_skip(host, "link layer") {
        Ok(r) => r,
        Err(c) => return c,
    };
    let count = |l: &LinkLayer| rails.iter().filter(|(p, _)| p.link_layer == *l).count();
    let (eth, ib) = (count(&LinkLayer::Ethernet), count(&LinkLayer::InfiniBand));
    let found = rails
        .iter()
        .map(|(p, _)| format!("{} {}", p.name(), p.link_layer))
        .collect::<Vec<_>>()
        .join(", ");
    if eth + ib < rails.len() || (eth > 0 && ib > 0) {
        return check("link layer", Status::Warn, format!("mixed link layers: {found}")).fix(
            "rails pair by position with the peer's rails, and RoCE and InfiniBand ports cannot talk: narrow the rails with KVT_DEVICES to one link layer",
        );
    }
    let kind = if ib > 0 {
        "InfiniBand"
    } else {
        "Ethernet (RoCE)"
    };
    check(
        "link layer",
        Status::Ok,
        format!("{kind} on all {} rail(s)", rails.len()),
    )
}

fn mtu(host: &Host) -> Check {
    let rails = match rails_or_skip(host, "active MTU") {
        Ok(r) => r,
        Err(c) => return c,
    };
    let small: Vec<String> = rails
        .iter()
        .filter(|(p, _)| p.active_mtu < 4096)
        .map(|(p, _)| {
            format!(
                "{} {} (netdev {})",
                p.name(),
                p.active_mtu,
                p.netdev.as_deref().unwrap_or("?")
            )
        })
        .collect();
    if small.is_empty() {
        return check(
            "active MTU",
            Status::Ok,
            format!("4096 on all {} rail(s)", rails.len()),
        );
    }
    check(
        "active MTU",
        Status::Warn,
        format!("below 4096: {}", small.join(", ")),
    )
    .fix("raise the netdev MTU so RoCE can carry 4096-byte packets: `ip link set dev <netdev> mtu 4200` (or 9000), on the switch ports too; the path MTU is the smaller of both ends")
}

fn gid(host: &Host, s: &Settings) -> Check {
    let rails = match rails_or_skip(host, "RoCEv2 GID") {
        Ok(r) => r,
        Err(c) => {
            // No rails may mean: no port has a usable GID; say so when that is the reason.
            if let Err(Error::NoRdmaDevice { reason }) = &host.rails
                && reason.contains("GID")
            {
                return check("RoCEv2 GID", Status::Fail, reason.clone()).fix(gid_fix());
            }
            return c;
        }
    };
    let roce: Vec<&PortInfo> = rails
        .iter()
        .map(|(p, _)| p)
        .filter(|p| p.link_layer == LinkLayer::Ethernet)
        .collect();
    if roce.is_empty() {
        return check(
            "RoCEv2 GID",
            Status::Skip,
            "InfiniBand rails: GID index 0 and LIDs",
        );
    }
    let mut lines = Vec::new();
    let mut not_ipv4 = Vec::new();
    for p in roce {
        if let Ok(g) = topology::choose_gid(p, s.gid_index) {
            lines.push(format!("{} index {} {} ({})", p.name(), g.index, g, g.kind));
            if g.ipv4().is_none() {
                not_ipv4.push(p.name());
            }
        }
    }
    let found = format!("index used per rail: {}", lines.join(", "));
    if not_ipv4.is_empty() {
        check("RoCEv2 GID", Status::Ok, found)
    } else {
        check(
            "RoCEv2 GID",
            Status::Warn,
            format!("{found}; no IPv4-mapped GID on {}", not_ipv4.join(", ")),
        )
        .fix(gid_fix())
    }
}

fn gid_fix() -> &'static str {
    "give the port's netdev an IPv4 address (`ip addr add 10.0.0.5/24 dev <netdev>`) so a RoCE v2 IPv4-mapped GID appears, or name a RoCE v2 entry with KVT_GID_INDEX (`show_gids` lists them)"
}

fn memlock() -> Check {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft == RLIM_INFINITY => check("ulimit -l", Status::Ok, "unlimited"),
        Ok((soft, hard)) => check(
            "ulimit -l",
            Status::Warn,
            format!(
                "{} KiB (hard limit {}): RDMA registration of more pinned memory fails with ENOMEM",
                soft / 1024,
                if hard == RLIM_INFINITY {
                    "unlimited".to_string()
                } else {
                    format!("{} KiB", hard / 1024)
                }
            ),
        )
        .fix("`ulimit -l unlimited` in the launching shell; services: LimitMEMLOCK=infinity (systemd), `--ulimit memlock=-1` (docker), `* - memlock unlimited` in /etc/security/limits.conf"),
        Err(e) => check("ulimit -l", Status::Warn, format!("getrlimit failed: {e}")),
    }
}

fn nvidia_loaded(sysfs: &Path, pci: &PciTopology) -> bool {
    !pci.gpus.is_empty() || sysfs.join("module/nvidia").is_dir()
}

fn peermem(sysfs: &Path, pci: &PciTopology) -> Check {
    if sysfs.join("module/nvidia_peermem").is_dir() {
        return check(
            "nvidia-peermem",
            Status::Ok,
            "loaded (module/nvidia_peermem)",
        );
    }
    if !nvidia_loaded(sysfs, pci) {
        return check("nvidia-peermem", Status::Skip, "no NVIDIA GPU");
    }
    check(
        "nvidia-peermem",
        Status::Warn,
        "not loaded: GPU memory is registered through dma-buf, or else staged over TCP",
    )
    .fix("`modprobe nvidia-peermem` (part of the NVIDIA driver since 470); needed unless dma-buf registration works")
}

/// `535.161.08` → 535.
fn major(version: &str) -> Option<u32> {
    version.trim().split('.').next()?.parse().ok()
}

/// `6.1.0-18-amd64` → (6, 1).
fn kernel_release() -> Option<(String, (u32, u32))> {
    let text = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let text = text.trim().to_string();
    let mut parts = text.split(|c: char| !c.is_ascii_digit());
    let v = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some((text, v))
}

fn dmabuf(sysfs: &Path, pci: &PciTopology) -> Check {
    let Ok(driver) = fs::read_to_string(sysfs.join("module/nvidia/version")) else {
        let why = if pci.gpus.is_empty() {
            "no NVIDIA GPU"
        } else {
            "NVIDIA driver not loaded (no module/nvidia/version)"
        };
        return check("dmabuf", Status::Skip, why);
    };
    let driver = driver.trim().to_string();
    let kernel = kernel_release();
    let kernel_text = kernel.as_ref().map_or("unknown".into(), |(t, _)| t.clone());
    let fix = "GPU memory over dma-buf (cuMemGetHandleForAddressRange + ibv_reg_dmabuf_mr) needs Linux ≥ 5.12, NVIDIA driver ≥ 515 with the open kernel modules (nvidia-open / *-open packages) and rdma-core ≥ 34; otherwise load nvidia-peermem";
    if kernel.as_ref().is_some_and(|(_, v)| *v < (5, 12)) {
        return check(
            "dmabuf",
            Status::Warn,
            format!("kernel {kernel_text} is older than 5.12 (no RDMA dma-buf)"),
        )
        .fix(fix);
    }
    if major(&driver).is_none_or(|m| m < 515) {
        return check(
            "dmabuf",
            Status::Warn,
            format!("NVIDIA driver {driver} is older than 515 (no dma-buf export)"),
        )
        .fix(fix);
    }
    // Which kernel module flavour: only the running host's /proc says, so only with /sys.
    let flavour = if fs::canonicalize(sysfs).ok().as_deref() == Some(Path::new("/sys")) {
        fs::read_to_string("/proc/driver/nvidia/version").ok()
    } else {
        None
    };
    match flavour {
        Some(v) if !v.contains("Open Kernel Module") => check(
            "dmabuf",
            Status::Warn,
            format!("NVIDIA driver {driver} runs the proprietary kernel module (dma-buf export needs the open one)"),
        )
        .fix(fix),
        Some(_) => check(
            "dmabuf",
            Status::Ok,
            format!("kernel {kernel_text}, NVIDIA driver {driver} (open kernel module)"),
        ),
        None => check(
            "dmabuf",
            Status::Ok,
            format!("kernel {kernel_text} ≥ 5.12, NVIDIA driver {driver} ≥ 515 (module flavour not checked)"),
        ),
    }
}

fn libcuda(pci: &PciTopology) -> Check {
    match probe::find_library("libcuda.so.1") {
        Some(p) => check("libcuda", Status::Ok, format!("libcuda.so.1 at {}", p.display())),
        None if pci.gpus.is_empty() => check(
            "libcuda",
            Status::Skip,
            "libcuda.so.1 not found and no NVIDIA GPU: host memory only",
        ),
        None => check(
            "libcuda",
            Status::Fail,
            "libcuda.so.1 not found: GPU memory cannot be registered",
        )
        .fix("install the NVIDIA driver's user-space library (Debian: `apt install libcuda1`; in a container, run it with the NVIDIA container toolkit, `--gpus all`)"),
    }
}

/// One GPU's line of the map.
struct GpuRails {
    index: usize,
    pci: String,
    numa_node: Option<u32>,
    /// Every rail by distance, nearest first.
    ranked: Vec<(String, Distance)>,
    /// The rails its segments use.
    used: Vec<String>,
}

/// The GPU↔NIC map and the rails of each NUMA node's host memory.
struct Map {
    rails_per_gpu: usize,
    gpus: Vec<GpuRails>,
    host: Vec<(Option<u32>, Vec<String>)>,
}

impl Map {
    fn new(host: &Host, rails_per_gpu: usize) -> Map {
        let rails: Vec<&PortInfo> = match &host.rails {
            Ok(r) => r.iter().map(|(p, _)| p).collect(),
            Err(_) => Vec::new(),
        };
        let devices: Vec<&str> = rails.iter().map(|p| p.device.as_str()).collect();
        let names = |idx: &[usize]| idx.iter().map(|&i| rails[i].name()).collect::<Vec<_>>();
        let gpus = host
            .pci
            .gpus
            .iter()
            .map(|g| {
                let placement = Placement::Gpu {
                    pci: g.pci.address.clone(),
                };
                GpuRails {
                    index: g.index,
                    pci: g.pci.address.clone(),
                    numa_node: g.pci.numa_node,
                    ranked: topology::ranked_rails(&host.pci, g, &devices)
                        .into_iter()
                        .map(|(i, d)| (rails[i].name(), d))
                        .collect(),
                    used: names(&topology::rails_for(
                        &host.pci,
                        &devices,
                        &placement,
                        rails_per_gpu,
                    )),
                }
            })
            .collect();
        let mut nodes: Vec<Option<u32>> =
            rails.iter().map(|p| host.pci.hca_numa(&p.device)).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let host_rails = nodes
            .into_iter()
            .map(|n| {
                let placement = Placement::Host { numa_node: n };
                (
                    n,
                    names(&topology::rails_for(&host.pci, &devices, &placement, 1)),
                )
            })
            .collect();
        Map {
            rails_per_gpu,
            gpus,
            host: host_rails,
        }
    }

    fn check(&self, host: &Host) -> Check {
        const NAME: &str = "GPU-NIC map";
        let kv: Vec<String> = match &host.rails {
            Ok(r) => r.iter().map(|(p, _)| p.name()).collect(),
            Err(_) => Vec::new(),
        };
        if self.gpus.is_empty() {
            return check(NAME, Status::Skip, "no NVIDIA GPU on the PCI bus");
        }
        let mut found = format!("{} GPU(s), {} KV rail(s)", self.gpus.len(), kv.len());
        if kv.is_empty() {
            return check(NAME, Status::Skip, format!("{found}: no rails to map"));
        }
        let _ = write!(
            found,
            " ({}), {} per GPU",
            kv.join(", "),
            self.rails_per_gpu
        );
        if !host.not_kv.is_empty() {
            let _ = write!(
                found,
                "; not for KV: {} (no GPU behind their PCIe switch)",
                host.not_kv
                    .iter()
                    .map(PortInfo::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mut far = Vec::new();
        for g in &self.gpus {
            let dist: Vec<String> = g
                .used
                .iter()
                .map(|r| {
                    let d = g.ranked.iter().find(|(n, _)| n == r).map(|(_, d)| *d);
                    if d.is_some_and(|d| d >= Distance::CrossSocket) {
                        far.push(format!("GPU {}", g.index));
                    }
                    format!("{r} ({})", d.map_or("?", Distance::name))
                })
                .collect();
            let _ = write!(
                found,
                "\nGPU {} {} numa {} -> {}",
                g.index,
                g.pci,
                numa_text(g.numa_node),
                dist.join(", ")
            );
        }
        for (node, rails) in &self.host {
            let _ = write!(
                found,
                "\nnearest to numa {}: {}",
                numa_text(*node),
                rails.join(", ")
            );
        }
        if !self.host.is_empty() {
            found.push_str(
                "\nhost memory: registered on every KV rail, striped over its NUMA node's rails",
            );
        }
        if far.is_empty() {
            check(NAME, Status::Ok, found)
        } else {
            far.dedup();
            check(
                NAME,
                Status::Warn,
                format!(
                    "{found}\n{} reach their rails across sockets",
                    far.join(", ")
                ),
            )
            .fix(
                "put a NIC on each GPU's socket, or run the GPU's process on the socket of its NIC",
            )
        }
    }
}

fn numa_text(n: Option<u32>) -> String {
    n.map_or("-".into(), |n| n.to_string())
}

/// Which transport an engine with this configuration would use, and why.
fn verdict(verbs: &VerbsLibrary, host: &Host, s: &Settings) -> (&'static str, String) {
    if s.transport == TransportKind::Tcp {
        return ("tcp", "the configuration says transport = tcp".into());
    }
    let no_rdma = match (verbs, &host.rails) {
        (VerbsLibrary::Missing, _) => Some(Error::RdmaCoreMissing.to_string()),
        (_, Err(e)) => Some(e.to_string()),
        (_, Ok(r)) if r.is_empty() => Some("no KV rail".to_string()),
        _ => None,
    };
    match no_rdma {
        None => {
            let rails = host.rails.as_ref().map(Vec::as_slice).unwrap_or_default();
            let names: Vec<String> = rails.iter().map(|(p, _)| p.name()).collect();
            (
                "rdma",
                format!("{} KV rail(s): {}", names.len(), names.join(", ")),
            )
        }
        Some(why) if s.transport == TransportKind::Rdma => (
            "none",
            format!("the configuration requires RDMA, so engine creation fails: {why}"),
        ),
        Some(why) => {
            let why = why.trim_start_matches("RDMA unavailable: ");
            ("tcp", format!("no RDMA: {why}; TCP will be used"))
        }
    }
}

fn print_text(a: &DoctorArgs, checks: &[Check], transport: &str, reason: &str) {
    let mut out = format!("kvtransfer doctor (sysfs {})\n", a.sysfs.display());
    for c in checks {
        let mut lines = c.found.lines();
        let _ = writeln!(
            out,
            "{:<5} {:<15} {}",
            c.status.name(),
            c.name,
            lines.next().unwrap_or("")
        );
        for line in lines {
            let _ = writeln!(out, "{:22}{line}", "");
        }
        if let Some(fix) = &c.fix {
            let _ = writeln!(out, "{:22}fix: {fix}", "");
        }
    }
    let _ = writeln!(out, "transport: {transport} ({reason})");
    emit(&out);
}

/// Writes to stdout; a closed pipe (`doctor | head`) is not an error worth a panic.
fn emit(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn print_json(
    a: &DoctorArgs,
    s: &Settings,
    checks: &[Check],
    map: &Map,
    host: &Host,
    transport: &str,
    reason: &str,
) {
    let checks: Vec<Value> = checks
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "status": c.status.name(),
                "found": c.found,
                "fix": c.fix,
            })
        })
        .collect();
    let gpus: Vec<Value> = map
        .gpus
        .iter()
        .map(|g| {
            json!({
                "index": g.index,
                "pci": g.pci,
                "numa_node": g.numa_node,
                "rails": g.used,
                "nearest": g.ranked.iter().map(|(r, d)| json!({"rail": r, "distance": d.name()})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let kv: Vec<String> = match &host.rails {
        Ok(r) => r.iter().map(|(p, _)| p.device.clone()).collect(),
        Err(_) => Vec::new(),
    };
    let nics: Vec<Value> = host
        .pci
        .hcas
        .iter()
        .map(|h| {
            json!({
                "device": h.device,
                "pci": h.pci.as_ref().map(|p| p.address.clone()),
                "numa_node": h.pci.as_ref().and_then(|p| p.numa_node),
                "kv": kv.contains(&h.device),
                "not_kv_reason": (!kv.contains(&h.device)).then(|| not_kv_reason(host, &h.device)),
            })
        })
        .collect();
    let host_rails: Vec<Value> = map
        .host
        .iter()
        .map(|(n, r)| json!({"numa_node": n, "rails": r}))
        .collect();
    let out = json!({
        "sysfs": a.sysfs.display().to_string(),
        "transport": transport,
        "reason": reason,
        "rails_per_gpu": s.rails_per_gpu,
        "checks": checks,
        "gpus": gpus,
        "nics": nics,
        "host_rails": host_rails,
    });
    emit(&format!("{out}\n"));
}

/// Why a device carries no KV.
fn not_kv_reason(host: &Host, device: &str) -> String {
    if host.not_kv.iter().any(|p| p.device == device) {
        return "no GPU behind its PCIe switch (storage or management NIC)".into();
    }
    match &host.ports {
        Ok(ports) => {
            let mine: Vec<PortInfo> = ports
                .iter()
                .filter(|p| p.device == device)
                .cloned()
                .collect();
            if mine.iter().all(|p| !p.state.is_active()) {
                format!("no ACTIVE port ({})", port_list(&mine))
            } else {
                "not selected (device list or no usable GID)".into()
            }
        }
        Err(e) => e.to_string(),
    }
}
