//! RDMA device discovery from sysfs, GID choice, rail selection and rail pairing.
//!
//! Everything here reads plain sysfs attribute files below a root given as a [`Path`]
//! (`/sys` in production, a fixture tree under `tests/fixtures/sysfs/` in tests), so it runs
//! and is tested on hosts without RDMA hardware. Nothing here opens a verbs device.
//!
//! The files read, below the root:
//!
//! | path | what |
//! |---|---|
//! | `class/infiniband_verbs/` | present iff the kernel has RDMA support (ib_uverbs) |
//! | `class/infiniband/<dev>/ports/<p>/state` | `4: ACTIVE` |
//! | `class/infiniband/<dev>/ports/<p>/link_layer` | `Ethernet` or `InfiniBand` |
//! | `class/infiniband/<dev>/ports/<p>/lid` | `0x1a` |
//! | `class/infiniband/<dev>/ports/<p>/gids/<i>` | `fe80:0000:...:0001` (all zero: empty) |
//! | `class/infiniband/<dev>/ports/<p>/gid_attrs/types/<i>` | `RoCE v2`, `IB/RoCE v1` |
//! | `class/infiniband/<dev>/ports/<p>/gid_attrs/ndevs/<i>` | the netdev of a RoCE GID |
//! | `class/infiniband/<dev>/device/net/<netdev>/` | netdev of a PCI device (fallback) |
//! | `class/infiniband/<dev>/parent` | netdev under an rxe (Soft-RoCE) device (fallback) |
//! | `class/net/<netdev>/mtu` | Ethernet MTU, from which a RoCE port's MTU follows |
//!
//! [`pci`] places GPUs and RDMA devices on the PCI tree and measures the [`Distance`] between
//! them; [`rails`] decides which rails carry KV and which ones each segment uses; [`numa`]
//! finds the NUMA node of host memory.

use std::cmp::Ordering;
use std::fmt;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::error::{Error, Result};

pub mod matrix;
pub mod numa;
pub mod pci;
pub mod rails;

pub use pci::{Distance, Gpu, Hca, PciDevice, PciTopology, discover_pci, distance};
pub use rails::{Placement, kv_rails, rails_for, ranked_rails};

/// Where sysfs is mounted on a running Linux host.
pub const SYSFS_ROOT: &str = "/sys";

/// Bytes a RoCE v2 packet spends on headers below the IB payload: GRH 40 + UDP 8 + BTH 12 +
/// XRC ETH 4 + AtomicETH 28 + ICRC 4, as the kernel's `iboe_get_mtu` subtracts.
const ROCE_HEADER_BYTES: u32 = 96;

/// The IB path MTUs, in bytes.
const IB_MTUS: [u32; 5] = [256, 512, 1024, 2048, 4096];

/// MTU assumed for an Ethernet port whose netdev MTU cannot be read: what fits a 1500 netdev.
const FALLBACK_ROCE_MTU: u32 = 1024;

/// MTU of an InfiniBand port (sysfs has no active-MTU attribute).
const INFINIBAND_MTU: u32 = 4096;

/// The logical state of a port (`ports/<p>/state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortState {
    /// `1: DOWN`.
    Down,
    /// `2: INIT`.
    Init,
    /// `3: ARMED`.
    Armed,
    /// `4: ACTIVE`: the only state that carries traffic.
    Active,
    /// Anything else (`5: ACTIVE_DEFER`, ...), as sysfs names it.
    Other(String),
}

impl PortState {
    /// Parses sysfs text such as `4: ACTIVE`.
    pub fn parse(text: &str) -> PortState {
        let name = text.split_once(':').map_or(text, |(_, n)| n).trim();
        match name {
            "DOWN" => PortState::Down,
            "INIT" => PortState::Init,
            "ARMED" => PortState::Armed,
            "ACTIVE" => PortState::Active,
            _ => PortState::Other(name.to_string()),
        }
    }

    /// Whether the port can carry traffic.
    pub fn is_active(&self) -> bool {
        *self == PortState::Active
    }
}

impl fmt::Display for PortState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortState::Down => "DOWN",
            PortState::Init => "INIT",
            PortState::Armed => "ARMED",
            PortState::Active => "ACTIVE",
            PortState::Other(s) => s,
        })
    }
}

/// The link layer of a port (`ports/<p>/link_layer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkLayer {
    /// RoCE (including Soft-RoCE): addressed by GID, MTU follows the netdev's.
    Ethernet,
    /// InfiniBand: addressed by LID.
    InfiniBand,
    /// Anything else, as sysfs names it.
    Other(String),
}

impl LinkLayer {
    /// Parses sysfs text such as `Ethernet`.
    pub fn parse(text: &str) -> LinkLayer {
        match text.trim() {
            "Ethernet" => LinkLayer::Ethernet,
            "InfiniBand" => LinkLayer::InfiniBand,
            other => LinkLayer::Other(other.to_string()),
        }
    }
}

impl fmt::Display for LinkLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkLayer::Ethernet => "Ethernet",
            LinkLayer::InfiniBand => "InfiniBand",
            LinkLayer::Other(s) => s,
        })
    }
}

/// What a GID table entry is for (`gid_attrs/types/<i>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidKind {
    /// RoCE v1 (Ethernet, not routable): `IB/RoCE v1` on an Ethernet port.
    RoCEv1,
    /// RoCE v2 (UDP/IP, routable): `RoCE v2`.
    RoCEv2,
    /// InfiniBand: `IB/RoCE v1` on an InfiniBand port.
    Ib,
    /// A type this code does not know.
    Unknown,
}

impl GidKind {
    /// Parses sysfs text; `IB/RoCE v1` means IB or RoCE v1 depending on the link layer.
    pub fn parse(text: &str, link_layer: &LinkLayer) -> GidKind {
        match text.trim() {
            "RoCE v2" => GidKind::RoCEv2,
            "IB/RoCE v1" if *link_layer == LinkLayer::InfiniBand => GidKind::Ib,
            "IB/RoCE v1" | "RoCE v1" => GidKind::RoCEv1,
            "IB" => GidKind::Ib,
            _ => GidKind::Unknown,
        }
    }
}

impl fmt::Display for GidKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GidKind::RoCEv1 => "RoCE v1",
            GidKind::RoCEv2 => "RoCE v2",
            GidKind::Ib => "IB",
            GidKind::Unknown => "unknown",
        })
    }
}

/// One non-empty entry of a port's GID table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    /// Index in the port's GID table (what `ibv_query_gid` and the QP's `sgid_index` take).
    pub index: u16,
    /// The GID, network byte order.
    pub gid: [u8; 16],
    /// Its type.
    pub kind: GidKind,
    /// The netdev it belongs to (RoCE only).
    pub netdev: Option<String>,
}

impl GidEntry {
    /// The GID as an IPv6 address.
    pub fn address(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.gid)
    }

    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.address().to_ipv4_mapped()
    }

    /// Whether the GID is an IPv6 link-local address (`fe80::/10`).
    pub fn is_link_local(&self) -> bool {
        self.gid[0] == 0xfe && self.gid[1] & 0xc0 == 0x80
    }
}

/// The usual colon form: `fe80::5054:ff:fe00:a01`, `::ffff:198.18.0.1`.
impl fmt::Display for GidEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.address(), f)
    }
}

/// One port of one RDMA device, as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Device name (`mlx5_0`, `rxe0`).
    pub device: String,
    /// Port number (from 1).
    pub port: u8,
    /// Logical state.
    pub state: PortState,
    /// Link layer.
    pub link_layer: LinkLayer,
    /// Active MTU in bytes (256..=4096): for RoCE the largest IB MTU that fits the netdev's
    /// MTU, for InfiniBand 4096.
    pub active_mtu: u32,
    /// LID (InfiniBand; 0 on Ethernet).
    pub lid: u16,
    /// The netdev under a RoCE port.
    pub netdev: Option<String>,
    /// The non-empty GID table entries, by index.
    pub gids: Vec<GidEntry>,
}

impl PortInfo {
    /// `device:port`, the way allow-lists and messages name a port.
    pub fn name(&self) -> String {
        format!("{}:{}", self.device, self.port)
    }
}

/// The largest IB MTU (256..=4096 bytes) that a RoCE packet can carry on a netdev with this
/// MTU once its headers are counted: 4200 → 4096, 9000 → 4096, 1500 → 1024. Never below 256.
pub fn ib_mtu_for_netdev(netdev_mtu: u32) -> u32 {
    let room = netdev_mtu.saturating_sub(ROCE_HEADER_BYTES);
    IB_MTUS
        .iter()
        .copied()
        .rev()
        .find(|&m| m <= room)
        .unwrap_or(IB_MTUS[0])
}

/// Lists every port of every RDMA device under `sysfs` (normally [`SYSFS_ROOT`]), devices in
/// natural name order (`mlx5_2` before `mlx5_10`), ports by number.
///
/// Errors: [`Error::RdmaKernelMissing`] when there is no `class/infiniband_verbs` (a kernel
/// without RDMA support); [`Error::NoRdmaDevice`] when there is no device; [`Error::Io`] when
/// a port's `state`, `link_layer` or `lid` cannot be read or parsed.
pub fn discover(sysfs: &Path) -> Result<Vec<PortInfo>> {
    if !sysfs.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "sysfs root {} is not a directory",
            sysfs.display()
        )));
    }
    if !sysfs.join("class/infiniband_verbs").is_dir() {
        return Err(Error::RdmaKernelMissing);
    }
    let class = sysfs.join("class/infiniband");
    let mut devices = list_dir(&class)?;
    if devices.is_empty() {
        return Err(Error::NoRdmaDevice {
            reason: format!("no RDMA devices in {}", class.display()),
        });
    }
    devices.sort_by(|a, b| natural_cmp(a, b));
    let mut ports = Vec::new();
    for device in &devices {
        let dev_dir = class.join(device);
        let mut numbers: Vec<u8> = list_dir(&dev_dir.join("ports"))?
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        numbers.sort_unstable();
        for port in numbers {
            ports.push(read_port(&dev_dir, device, port, sysfs)?);
        }
    }
    Ok(ports)
}

/// Reads one port's attributes, GID table, netdev and MTU.
fn read_port(dev_dir: &Path, device: &str, port: u8, sysfs: &Path) -> Result<PortInfo> {
    let dir = dev_dir.join("ports").join(port.to_string());
    let state = PortState::parse(&read_required(&dir.join("state"))?);
    let link_layer = LinkLayer::parse(&read_required(&dir.join("link_layer"))?);
    let lid_path = dir.join("lid");
    let lid_text = read_required(&lid_path)?;
    let lid = u16::from_str_radix(lid_text.trim_start_matches("0x"), 16)
        .map_err(|e| sysfs_error(&lid_path, io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let gids = read_gids(&dir, &link_layer)?;
    let netdev = gids
        .iter()
        .find_map(|g| g.netdev.clone())
        .or_else(|| fallback_netdev(dev_dir, port));
    let active_mtu = match link_layer {
        LinkLayer::InfiniBand => INFINIBAND_MTU,
        _ => netdev
            .as_ref()
            .and_then(|n| read_attr(&sysfs.join("class/net").join(n).join("mtu")).ok())
            .and_then(|m| m.parse().ok())
            .map_or(FALLBACK_ROCE_MTU, ib_mtu_for_netdev),
    };
    Ok(PortInfo {
        device: device.to_string(),
        port,
        state,
        link_layer,
        active_mtu,
        lid,
        netdev,
        gids,
    })
}

/// Reads the non-empty entries of a port's GID table. An entry is skipped when its GID is all
/// zero, or when its type cannot be read (the kernel answers EINVAL for an empty entry).
fn read_gids(port_dir: &Path, link_layer: &LinkLayer) -> Result<Vec<GidEntry>> {
    let mut indices: Vec<u16> = list_dir(&port_dir.join("gids"))?
        .iter()
        .filter_map(|i| i.parse().ok())
        .collect();
    indices.sort_unstable();
    // Kernels before 4.9 have no gid_attrs at all: every GID then counts, typed by link layer.
    let has_attrs = port_dir.join("gid_attrs").is_dir();
    let mut gids = Vec::new();
    for index in indices {
        let name = index.to_string();
        let Some(gid) = read_attr(&port_dir.join("gids").join(&name))
            .ok()
            .and_then(|t| t.parse::<Ipv6Addr>().ok())
            .map(|a| a.octets())
        else {
            continue;
        };
        if gid == [0; 16] {
            continue;
        }
        let kind = if has_attrs {
            match read_attr(&port_dir.join("gid_attrs/types").join(&name)) {
                Ok(t) => GidKind::parse(&t, link_layer),
                Err(e) => {
                    tracing::debug!(dir = %port_dir.display(), index, error = %e, "GID type unreadable; entry skipped");
                    continue;
                }
            }
        } else if *link_layer == LinkLayer::InfiniBand {
            GidKind::Ib
        } else {
            GidKind::Unknown
        };
        let netdev = read_attr(&port_dir.join("gid_attrs/ndevs").join(&name))
            .ok()
            .filter(|n| !n.is_empty());
        gids.push(GidEntry {
            index,
            gid,
            kind,
            netdev,
        });
    }
    Ok(gids)
}

/// The netdev of a port whose GIDs name none: the device's `device/net/<netdev>` whose
/// `dev_port` is `port - 1` (or the only one, or the first by name), else an rxe device's
/// `parent`.
fn fallback_netdev(dev_dir: &Path, port: u8) -> Option<String> {
    let net = dev_dir.join("device/net");
    let mut names = list_dir(&net).unwrap_or_default();
    names.sort_by(|a, b| natural_cmp(a, b));
    let on_port = names.iter().find(|n| {
        read_attr(&net.join(n).join("dev_port"))
            .ok()
            .and_then(|d| d.parse::<u32>().ok())
            == Some(u32::from(port) - 1)
    });
    on_port
        .or(names.first())
        .cloned()
        .or_else(|| read_attr(&dev_dir.join("parent")).ok())
        .filter(|n| !n.is_empty())
}

/// The GID a port's queue pairs should use.
///
/// - `configured`: that index, which must be a non-empty entry of the table.
/// - InfiniBand: index 0 (subnet prefix + port GUID).
/// - Otherwise RoCE v2 only, the first of: an IPv4-mapped GID (`::ffff:a.b.c.d`) on the
///   port's netdev; any IPv4-mapped GID (a VLAN's, say); a global IPv6 GID; a link-local one.
///   Lowest index first within each class.
pub fn choose_gid(port: &PortInfo, configured: Option<u16>) -> Result<GidEntry> {
    if let Some(index) = configured {
        return port
            .gids
            .iter()
            .find(|g| g.index == index)
            .cloned()
            .ok_or_else(|| Error::InvalidConfig {
                field: "gid_index".into(),
                reason: format!(
                    "port {} has no GID at index {index} (non-empty entries: {})",
                    port.name(),
                    index_list(&port.gids)
                ),
            });
    }
    if port.link_layer == LinkLayer::InfiniBand {
        return port
            .gids
            .iter()
            .find(|g| g.index == 0)
            .cloned()
            .ok_or_else(|| Error::NoRdmaDevice {
                reason: format!("InfiniBand port {} has no GID at index 0", port.name()),
            });
    }
    let v2 = || port.gids.iter().filter(|g| g.kind == GidKind::RoCEv2);
    let on_netdev = |g: &GidEntry| g.netdev.is_none() || g.netdev == port.netdev;
    v2().find(|g| g.ipv4().is_some() && on_netdev(g))
        .or_else(|| v2().find(|g| g.ipv4().is_some()))
        .or_else(|| v2().find(|g| !g.is_link_local()))
        .or_else(|| v2().next())
        .cloned()
        .ok_or_else(|| {
            let why = if port.gids.is_empty() {
                "its GID table is empty".to_string()
            } else {
                format!(
                    "no RoCE v2 GID among entries {}; name one with a GID index",
                    index_list(&port.gids)
                )
            };
            Error::NoRdmaDevice {
                reason: format!("port {} has no usable GID: {why}", port.name()),
            }
        })
}

/// `0, 1, 3` (or `none`).
fn index_list(gids: &[GidEntry]) -> String {
    if gids.is_empty() {
        return "none".into();
    }
    gids.iter()
        .map(|g| g.index.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether an allow-list entry (`dev` or `dev:port`) names this port.
fn allows(entry: &str, port: &PortInfo) -> bool {
    match entry.trim().split_once(':') {
        Some((dev, p)) => dev == port.device && p.parse::<u8>() == Ok(port.port),
        None => entry.trim() == port.device,
    }
}

/// The allow-list entries (`dev` or `dev:port`) that name none of `ports`.
pub fn unmatched_allow<'a>(ports: &[PortInfo], allow: &'a [String]) -> Vec<&'a str> {
    allow
        .iter()
        .map(String::as_str)
        .filter(|e| !ports.iter().any(|p| allows(e, p)))
        .collect()
}

/// The ports that may carry data: ACTIVE, and named by `allow` when one is given (entries
/// `dev` or `dev:port`, like the `devices` setting `mlx5_0,mlx5_3:1`).
///
/// Ordered by device name in natural order (`mlx5_2` before `mlx5_10`), then port, whatever
/// the order of `allow`: rail *i* is then the same NIC position on every host of a
/// rail-optimised fabric.
pub fn select_rails<'a>(ports: &'a [PortInfo], allow: Option<&[String]>) -> Vec<&'a PortInfo> {
    let mut rails: Vec<&PortInfo> = ports
        .iter()
        .filter(|p| p.state.is_active())
        .filter(|p| allow.is_none_or(|list| list.iter().any(|e| allows(e, p))))
        .collect();
    rails.sort_by(|a, b| natural_cmp(&a.device, &b.device).then(a.port.cmp(&b.port)));
    rails
}

/// The rails an engine would open: [`select_rails`], each with its [`choose_gid`] GID, in
/// rail order. A selected port without a usable GID is left out; `devices` shows why.
///
/// Errors with [`Error::NoRdmaDevice`] when no rail remains, saying why (allow-list matches
/// nothing, no ACTIVE port, no usable GID).
pub fn usable_rails<'a>(
    ports: &'a [PortInfo],
    allow: Option<&[String]>,
    gid_index: Option<u16>,
) -> Result<Vec<(&'a PortInfo, GidEntry)>> {
    let selected = select_rails(ports, allow);
    let mut first_gid_error = None;
    let mut rails = Vec::with_capacity(selected.len());
    for port in selected.iter().copied() {
        match choose_gid(port, gid_index) {
            Ok(gid) => rails.push((port, gid)),
            Err(e) => {
                first_gid_error.get_or_insert(e);
            }
        }
    }
    if !rails.is_empty() {
        return Ok(rails);
    }
    let reason = if let Some(e) = first_gid_error {
        format!("no selected port has a usable GID ({e})")
    } else if ports.is_empty() {
        "no RDMA devices".to_string()
    } else {
        let allowed: Vec<&PortInfo> = match allow {
            Some(list) => ports
                .iter()
                .filter(|p| list.iter().any(|e| allows(e, p)))
                .collect(),
            None => ports.iter().collect(),
        };
        if allowed.is_empty() {
            format!(
                "device list {} names none of the ports {}",
                allow.unwrap_or_default().join(","),
                ports
                    .iter()
                    .map(PortInfo::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "no ACTIVE port ({})",
                allowed
                    .iter()
                    .map(|p| format!("{} {}", p.name(), p.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    Err(Error::NoRdmaDevice { reason })
}

/// Rail-aligned pairing of `local` rails with a peer's `remote` rails, as `(local, remote)`
/// index pairs, one per local rail: local rail *i* talks to remote rail *i* (the NIC on the
/// same leaf switch of a rail-optimised fabric). When this side has more rails, the extra
/// local rail *i* pairs with remote rail `i % remote`, spreading them round-robin; when the
/// peer has more, its extra rails are not used by this side. Empty if either side has none.
pub fn pair_rails(local: usize, remote: usize) -> Vec<(usize, usize)> {
    if remote == 0 {
        return Vec::new();
    }
    (0..local).map(|i| (i, i % remote)).collect()
}

/// Compares names so that digit runs compare as numbers: `mlx5_2` < `mlx5_10`.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let run = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (run(a), run(b));
                let strip = |s: &[u8]| -> usize { s.iter().take_while(|&&c| c == b'0').count() };
                let (da, db) = (
                    &a[strip(&a[..na]).min(na)..na],
                    &b[strip(&b[..nb]).min(nb)..nb],
                );
                let ord = da
                    .len()
                    .cmp(&db.len())
                    .then_with(|| da.cmp(db))
                    .then(na.cmp(&nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// Reads a sysfs attribute, trimmed.
fn read_attr(path: &Path) -> io::Result<String> {
    fs::read_to_string(path).map(|s| s.trim().to_string())
}

/// Reads a sysfs attribute that must be there, trimmed.
fn read_required(path: &Path) -> Result<String> {
    read_attr(path).map_err(|e| sysfs_error(path, e))
}

/// The entry names of a directory; a missing directory has none.
fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(sysfs_error(dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| sysfs_error(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// An [`Error::Io`] that names the sysfs path.
fn sysfs_error(path: &Path, e: io::Error) -> Error {
    Error::io(
        "read sysfs",
        io::Error::new(e.kind(), format!("{}: {e}", path.display())),
    )
}

/// A sysfs fixture tree under `tests/fixtures/sysfs/` (for the topology tests).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysfs")
        .join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(name: &str) -> Vec<PortInfo> {
        discover(&fixture(name)).expect("fixture discovers")
    }

    fn port<'a>(ports: &'a [PortInfo], device: &str, port: u8) -> &'a PortInfo {
        ports
            .iter()
            .find(|p| p.device == device && p.port == port)
            .expect("port present")
    }

    fn names(rails: &[&PortInfo]) -> Vec<String> {
        rails.iter().map(|p| p.name()).collect()
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn discovers_the_rxe_fabric() {
        let ports = ports("rxe-fabric");
        let names: Vec<String> = ports.iter().map(PortInfo::name).collect();
        assert_eq!(names, ["rxeA0:1", "rxeA1:1", "rxeB0:1", "rxeB1:1"]);
        for (n, p) in ports.iter().enumerate() {
            assert_eq!(p.state, PortState::Active);
            assert_eq!(p.link_layer, LinkLayer::Ethernet);
            assert_eq!(p.active_mtu, 4096, "netdev MTU 4200");
            assert_eq!(p.lid, 0);
            let netdev = format!("v{}", &p.device[3..]);
            assert_eq!(p.netdev.as_deref(), Some(netdev.as_str()));
            // Entries 2 and 3 are all zero and skipped.
            assert_eq!(p.gids.len(), 2);
            assert_eq!(p.gids[0].index, 0);
            assert!(p.gids[0].is_link_local());
            assert_eq!(p.gids[0].kind, GidKind::RoCEv2);
            assert_eq!(p.gids[1].index, 1);
            assert_eq!(p.gids[1].kind, GidKind::RoCEv2);
            assert_eq!(p.gids[1].netdev.as_deref(), Some(netdev.as_str()));
            assert_eq!(
                p.gids[1].ipv4(),
                Some(Ipv4Addr::new(198, 18, 0, n as u8 + 1))
            );
            assert_eq!(p.gids[1].to_string(), format!("::ffff:198.18.0.{}", n + 1));
        }
        assert_eq!(ports[0].gids[0].to_string(), "fe80::5054:ff:fe00:a01");
    }

    #[test]
    fn discovers_the_mixed_host() {
        let ports = ports("mixed");
        let names: Vec<String> = ports.iter().map(PortInfo::name).collect();
        assert_eq!(
            names,
            ["mlx5_0:1", "mlx5_1:1", "mlx5_2:1", "mlx5_10:1", "mlx5_10:2"]
        );

        let m0 = port(&ports, "mlx5_0", 1);
        assert_eq!(m0.state, PortState::Active);
        assert_eq!(m0.netdev.as_deref(), Some("eth2"));
        assert_eq!(m0.active_mtu, 4096, "netdev MTU 9000");
        let kinds: Vec<(u16, GidKind)> = m0.gids.iter().map(|g| (g.index, g.kind)).collect();
        assert_eq!(
            kinds,
            [
                (0, GidKind::RoCEv1),
                (1, GidKind::RoCEv2),
                (2, GidKind::RoCEv1),
                (3, GidKind::RoCEv2)
            ],
            "the empty entry 4 is skipped"
        );

        let m1 = port(&ports, "mlx5_1", 1);
        assert_eq!(m1.state, PortState::Down);
        assert_eq!(m1.active_mtu, 1024, "netdev MTU 1500");

        // No gid_attrs/ndevs: the netdev comes from device/net, the GIDs name none.
        let m2 = port(&ports, "mlx5_2", 1);
        assert_eq!(m2.netdev.as_deref(), Some("eth4"));
        assert!(m2.gids.iter().all(|g| g.netdev.is_none()));
        assert_eq!(m2.active_mtu, 1024);

        for (n, lid) in [(1, 0x1a), (2, 0x1b)] {
            let ib = port(&ports, "mlx5_10", n);
            assert_eq!(ib.link_layer, LinkLayer::InfiniBand);
            assert_eq!(ib.lid, lid);
            assert_eq!(ib.active_mtu, 4096);
            assert_eq!(ib.netdev, None);
            assert_eq!(ib.gids.len(), 1);
            assert_eq!(ib.gids[0].kind, GidKind::Ib);
        }
    }

    #[test]
    fn kernel_without_rdma_and_host_without_devices_fail_distinctly() {
        let no_verbs = discover(&fixture("no-verbs")).unwrap_err();
        assert!(matches!(no_verbs, Error::RdmaKernelMissing), "{no_verbs}");
        assert!(
            no_verbs
                .to_string()
                .contains("kernel has no RDMA support (no /sys/class/infiniband_verbs)"),
            "{no_verbs}"
        );
        let empty = discover(&fixture("empty")).unwrap_err();
        match &empty {
            Error::NoRdmaDevice { reason } => {
                assert!(reason.starts_with("no RDMA devices"), "{reason}")
            }
            other => panic!("expected NoRdmaDevice, got {other}"),
        }
        assert_ne!(no_verbs.code(), empty.code());
        let missing = discover(&fixture("no-such-tree")).unwrap_err();
        assert!(matches!(missing, Error::InvalidArgument(_)), "{missing}");
    }

    #[test]
    fn default_gid_is_the_ipv4_mapped_roce_v2_one() {
        for p in &ports("rxe-fabric") {
            assert_eq!(choose_gid(p, None).unwrap().index, 1, "{}", p.name());
        }
        let mixed = ports("mixed");
        let m0 = choose_gid(port(&mixed, "mlx5_0", 1), None).unwrap();
        assert_eq!((m0.index, m0.kind), (3, GidKind::RoCEv2));
        assert_eq!(m0.ipv4(), Some(Ipv4Addr::new(10, 0, 0, 5)));
        // Only IPv6: the global RoCE v2 GID beats the link-local one.
        assert_eq!(
            choose_gid(port(&mixed, "mlx5_2", 1), None).unwrap().index,
            3
        );
        // InfiniBand: index 0.
        assert_eq!(
            choose_gid(port(&mixed, "mlx5_10", 2), None).unwrap().index,
            0
        );
    }

    #[test]
    fn roce_v2_link_local_is_the_last_resort_and_v1_only_is_an_error() {
        let mut p = port(&ports("mixed"), "mlx5_0", 1).clone();
        p.gids.retain(|g| g.index < 2);
        assert_eq!(choose_gid(&p, None).unwrap().index, 1);
        p.gids.retain(|g| g.kind == GidKind::RoCEv1);
        let e = choose_gid(&p, None).unwrap_err();
        assert!(matches!(e, Error::NoRdmaDevice { .. }), "{e}");
        assert!(e.to_string().contains("no RoCE v2 GID"), "{e}");
        p.gids.clear();
        assert!(
            choose_gid(&p, None)
                .unwrap_err()
                .to_string()
                .contains("GID table is empty")
        );
    }

    #[test]
    fn configured_gid_index_is_honoured_and_checked() {
        let rxe = ports("rxe-fabric");
        let g = choose_gid(&rxe[0], Some(0)).unwrap();
        assert_eq!(g.index, 0);
        assert!(g.is_link_local());
        let mixed = ports("mixed");
        let m0 = port(&mixed, "mlx5_0", 1);
        assert_eq!(choose_gid(m0, Some(2)).unwrap().kind, GidKind::RoCEv1);
        for missing in [4, 9] {
            let e = choose_gid(m0, Some(missing)).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
            let text = e.to_string();
            assert!(
                text.contains(&format!("mlx5_0:1 has no GID at index {missing}")),
                "{text}"
            );
            assert!(text.contains("0, 1, 2, 3"), "{text}");
        }
    }

    #[test]
    fn rails_are_active_ports_in_natural_order() {
        let mixed = ports("mixed");
        assert_eq!(
            names(&select_rails(&mixed, None)),
            ["mlx5_0:1", "mlx5_2:1", "mlx5_10:1", "mlx5_10:2"],
            "mlx5_1 is DOWN; mlx5_2 sorts before mlx5_10"
        );
        let mut shuffled = mixed.clone();
        shuffled.reverse();
        assert_eq!(
            names(&select_rails(&shuffled, None)),
            names(&select_rails(&mixed, None))
        );
    }

    #[test]
    fn allow_list_names_devices_or_ports() {
        let mixed = ports("mixed");
        let rxe = ports("rxe-fabric");
        let pick = |ports: &[PortInfo], list: &[&str]| {
            let list = strings(list);
            names(&select_rails(ports, Some(&list)))
        };
        assert_eq!(pick(&mixed, &["mlx5_0"]), ["mlx5_0:1"]);
        assert_eq!(pick(&rxe, &["rxeB1", "rxeA0"]), ["rxeA0:1", "rxeB1:1"]);
        assert_eq!(pick(&mixed, &["mlx5_10:2"]), ["mlx5_10:2"]);
        assert_eq!(pick(&mixed, &["mlx5_10"]), ["mlx5_10:1", "mlx5_10:2"]);
        assert_eq!(
            pick(&mixed, &["mlx5_1"]),
            Vec::<String>::new(),
            "DOWN even when named"
        );
        assert_eq!(
            pick(&mixed, &["mlx5_10:3", "mlx5_1x", "mlx5"]),
            Vec::<String>::new()
        );
        assert_eq!(
            unmatched_allow(&mixed, &strings(&["mlx5_0", "mlx5_9", "mlx5_10:3"])),
            ["mlx5_9", "mlx5_10:3"]
        );
    }

    #[test]
    fn usable_rails_pair_ports_with_gids_or_say_why_none() {
        let rxe = ports("rxe-fabric");
        let rails = usable_rails(&rxe, None, None).unwrap();
        assert_eq!(rails.len(), 4);
        assert!(rails.iter().all(|(_, g)| g.index == 1));

        let mixed = ports("mixed");
        let why = |allow: &[&str], gid: Option<u16>| {
            let allow = strings(allow);
            match usable_rails(&mixed, Some(&allow), gid).unwrap_err() {
                Error::NoRdmaDevice { reason } => reason,
                other => panic!("expected NoRdmaDevice, got {other}"),
            }
        };
        assert!(why(&["mlx5_1"], None).contains("no ACTIVE port (mlx5_1:1 DOWN)"));
        assert!(why(&["mlx5_9"], None).contains("names none of the ports"));
        assert!(why(&["mlx5_10"], Some(7)).contains("no GID at index 7"));
        // A GID index that only some rails have leaves the others out.
        let rails = usable_rails(&mixed, None, Some(3)).unwrap();
        let names: Vec<String> = rails.iter().map(|(p, _)| p.name()).collect();
        assert_eq!(names, ["mlx5_0:1", "mlx5_2:1"]);
    }

    #[test]
    fn roce_mtu_is_the_largest_ib_mtu_that_fits_the_netdev() {
        assert_eq!(ib_mtu_for_netdev(4200), 4096);
        assert_eq!(ib_mtu_for_netdev(9000), 4096);
        assert_eq!(ib_mtu_for_netdev(1500), 1024);
        assert_eq!(
            ib_mtu_for_netdev(4096),
            2048,
            "4096 leaves no room for the headers"
        );
        assert_eq!(ib_mtu_for_netdev(4096 + ROCE_HEADER_BYTES), 4096);
        assert_eq!(ib_mtu_for_netdev(2048 + ROCE_HEADER_BYTES), 2048);
        assert_eq!(ib_mtu_for_netdev(700), 512);
        assert_eq!(ib_mtu_for_netdev(600), 256);
        assert_eq!(ib_mtu_for_netdev(68), 256);
        assert_eq!(ib_mtu_for_netdev(0), 256);
    }

    #[test]
    fn rails_pair_by_position_and_wrap_the_extra_local_ones() {
        assert_eq!(pair_rails(2, 2), [(0, 0), (1, 1)]);
        assert_eq!(pair_rails(2, 1), [(0, 0), (1, 0)]);
        assert_eq!(pair_rails(1, 2), [(0, 0)]);
        assert_eq!(pair_rails(3, 2), [(0, 0), (1, 1), (2, 0)]);
        assert_eq!(pair_rails(0, 2), []);
        assert_eq!(pair_rails(2, 0), []);
    }

    #[test]
    fn sysfs_text_parses() {
        assert_eq!(PortState::parse("4: ACTIVE"), PortState::Active);
        assert_eq!(PortState::parse("1: DOWN"), PortState::Down);
        assert_eq!(PortState::parse("2: INIT"), PortState::Init);
        assert_eq!(PortState::parse("3: ARMED"), PortState::Armed);
        assert_eq!(
            PortState::parse("5: ACTIVE_DEFER"),
            PortState::Other("ACTIVE_DEFER".into())
        );
        assert_eq!(LinkLayer::parse("InfiniBand"), LinkLayer::InfiniBand);
        assert_eq!(
            GidKind::parse("IB/RoCE v1", &LinkLayer::Ethernet),
            GidKind::RoCEv1
        );
        assert_eq!(
            GidKind::parse("IB/RoCE v1", &LinkLayer::InfiniBand),
            GidKind::Ib
        );
        assert_eq!(
            GidKind::parse("RoCE v2", &LinkLayer::Ethernet),
            GidKind::RoCEv2
        );
        assert_eq!(GidKind::parse("", &LinkLayer::Ethernet), GidKind::Unknown);
    }

    #[test]
    fn natural_order_compares_digit_runs_as_numbers() {
        let mut names = [
            "mlx5_10", "mlx5_2", "mlx5_1", "mlx4_0", "mlx5_02", "rxe0", "mlx5_",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "mlx4_0", "mlx5_", "mlx5_1", "mlx5_2", "mlx5_02", "mlx5_10", "rxe0"
            ]
        );
        assert_eq!(natural_cmp("rxeA0", "rxeA1"), Ordering::Less);
        assert_eq!(natural_cmp("rxeA1", "rxeB0"), Ordering::Less);
        assert_eq!(natural_cmp("a", "a"), Ordering::Equal);
    }
}
