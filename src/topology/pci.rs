//! Where GPUs and RDMA devices sit on the PCI tree, and how far apart they are.
//!
//! Pure over a sysfs root, like the rest of [`topology`](super). Files read below the root:
//!
//! | path | what |
//! |---|---|
//! | `bus/pci/devices/<addr>` | link to `devices/pci<dom>:<bus>/<root port>/.../<addr>` |
//! | `devices/.../<addr>/vendor`, `class` | `0x10de`, `0x030200`: an NVIDIA GPU |
//! | `devices/.../<addr>/device` | PCI device id (`0x2324`) |
//! | `devices/.../<addr>/numa_node` | NUMA node, `-1` when the platform gives none |
//! | `class/infiniband/<dev>/device` | link to the RDMA device's PCI function |
//!
//! A device's **PCI path** is the chain from its root complex (`pci0000:15`, one host bridge)
//! through the root port and any switch ports down to the function itself; two devices'
//! [`Distance`] follows from the longest prefix their paths share.

use std::fmt;
use std::fs;
use std::path::{Component, Path};

use super::{list_dir, natural_cmp, read_attr};
use crate::error::{Error, Result};

/// PCI vendor id of NVIDIA.
const NVIDIA_VENDOR: u16 = 0x10de;

/// PCI class codes (base class and subclass) of a GPU: VGA controller, 3D controller.
const GPU_CLASSES: [u16; 2] = [0x0300, 0x0302];

/// One PCI function and where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Its address, `0000:18:00.0`.
    pub address: String,
    /// The root complex (host bridge) it hangs off, `pci0000:15`.
    pub host_bridge: String,
    /// The bridges between the host bridge and the function, root port first; empty for a
    /// function on the root bus itself.
    pub bridges: Vec<String>,
    /// The NUMA node, `None` where sysfs says `-1` or nothing.
    pub numa_node: Option<u32>,
}

impl PciDevice {
    /// The root port above the function (`0000:15:01.0`), if there is one.
    pub fn root_port(&self) -> Option<&str> {
        self.bridges.first().map(String::as_str)
    }

    /// Host bridge, bridges and the function itself, joined with `/` as in sysfs.
    pub fn path(&self) -> String {
        let mut parts = vec![self.host_bridge.as_str()];
        parts.extend(self.bridges.iter().map(String::as_str));
        parts.push(&self.address);
        parts.join("/")
    }
}

/// How far apart two PCI functions are, nearest first (the order of NCCL's PIX/PXB, PHB and
/// SYS levels). Traffic between a GPU and a NIC that share a switch never crosses the CPU;
/// from [`SameHostBridge`](Distance::SameHostBridge) on it goes through the CPU's root
/// complex, and [`CrossSocket`](Distance::CrossSocket) adds the inter-socket link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Distance {
    /// Both sit below one PCIe bridge under the root port: a PCIe switch.
    SameSwitch,
    /// They share a root port but no bridge below it.
    SameRootPort,
    /// They share a root complex (`pci0000:xx`) but not a root port.
    SameHostBridge,
    /// Different root complexes on one NUMA node (or both with no NUMA node).
    SameNuma,
    /// Different NUMA nodes: traffic crosses the inter-socket link.
    CrossSocket,
    /// One side has no PCI device (Soft-RoCE) or sysfs does not say where it is.
    Unknown,
}

impl Distance {
    /// Short name for tables and JSON: `same-switch`, `cross-socket`, ...
    pub fn name(self) -> &'static str {
        match self {
            Distance::SameSwitch => "same-switch",
            Distance::SameRootPort => "same-root-port",
            Distance::SameHostBridge => "same-host-bridge",
            Distance::SameNuma => "same-numa",
            Distance::CrossSocket => "cross-socket",
            Distance::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The [`Distance`] between two PCI functions.
pub fn distance(a: &PciDevice, b: &PciDevice) -> Distance {
    if a.host_bridge == b.host_bridge {
        let shared = a
            .bridges
            .iter()
            .zip(&b.bridges)
            .take_while(|(x, y)| x == y)
            .count();
        return match shared {
            0 => Distance::SameHostBridge,
            1 => Distance::SameRootPort,
            _ => Distance::SameSwitch,
        };
    }
    if a.numa_node == b.numa_node {
        Distance::SameNuma
    } else {
        Distance::CrossSocket
    }
}

/// An NVIDIA GPU on the PCI bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Position in PCI address order: the CUDA ordinal under `CUDA_DEVICE_ORDER=PCI_BUS_ID`
    /// and the `nvidia-smi` index.
    pub index: usize,
    /// PCI device id (`0x2324` is an H800).
    pub device_id: u16,
    /// Where it sits.
    pub pci: PciDevice,
}

/// An RDMA device and, when it has one, its PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hca {
    /// Device name, `mlx5_0`.
    pub device: String,
    /// Its PCI function; `None` for a software device (rxe) or a link sysfs does not resolve.
    pub pci: Option<PciDevice>,
}

/// The GPUs and RDMA devices of a host, with their places on the PCI tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PciTopology {
    /// NVIDIA GPUs, by PCI address.
    pub gpus: Vec<Gpu>,
    /// RDMA devices, in natural name order (`mlx5_2` before `mlx5_10`).
    pub hcas: Vec<Hca>,
}

impl PciTopology {
    /// The RDMA device called `device`.
    pub fn hca(&self, device: &str) -> Option<&Hca> {
        self.hcas.iter().find(|h| h.device == device)
    }

    /// The GPU at PCI address `address` (`0000:18:00.0`; case and a missing domain are
    /// forgiven: `18:00.0`, as CUDA's `cuDeviceGetPCIBusId` may give `0000:18:00.0`).
    pub fn gpu(&self, address: &str) -> Option<&Gpu> {
        let want = normalize_address(address);
        self.gpus.iter().find(|g| g.pci.address == want)
    }

    /// The [`Distance`] between a GPU and an RDMA device; [`Distance::Unknown`] when the
    /// device has no PCI function.
    pub fn gpu_to_hca(&self, gpu: &Gpu, device: &str) -> Distance {
        match self.hca(device).and_then(|h| h.pci.as_ref()) {
            Some(pci) => distance(&gpu.pci, pci),
            None => Distance::Unknown,
        }
    }

    /// The NUMA node of an RDMA device, if sysfs gives one.
    pub fn hca_numa(&self, device: &str) -> Option<u32> {
        self.hca(device)
            .and_then(|h| h.pci.as_ref())
            .and_then(|p| p.numa_node)
    }
}

/// Lowercase, with the `0000:` domain added when missing.
fn normalize_address(address: &str) -> String {
    let a = address.trim().to_ascii_lowercase();
    if a.matches(':').count() == 1 {
        format!("0000:{a}")
    } else {
        a
    }
}

/// Reads the GPUs under `bus/pci/devices` and the PCI function of every RDMA device under
/// `class/infiniband`. A host without either gives empty lists; a device whose link does not
/// resolve into `devices/pci*` gets no PCI function. Errors only when `sysfs` is not a
/// directory.
pub fn discover_pci(sysfs: &Path) -> Result<PciTopology> {
    if !sysfs.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "sysfs root {} is not a directory",
            sysfs.display()
        )));
    }
    let root = fs::canonicalize(sysfs).map_err(|e| Error::io("read sysfs", e))?;
    let bus = sysfs.join("bus/pci/devices");
    let mut gpus = Vec::new();
    for name in list_dir(&bus).unwrap_or_default() {
        let dir = bus.join(&name);
        let hex = |attr: &str| {
            read_attr(&dir.join(attr))
                .ok()
                .and_then(|t| u32::from_str_radix(t.trim_start_matches("0x"), 16).ok())
        };
        let (Some(vendor), Some(class)) = (hex("vendor"), hex("class")) else {
            continue;
        };
        if vendor != u32::from(NVIDIA_VENDOR) || !GPU_CLASSES.contains(&((class >> 8) as u16)) {
            continue;
        }
        if let Some(pci) = resolve(&root, &dir) {
            gpus.push(Gpu {
                index: 0,
                device_id: hex("device").unwrap_or(0) as u16,
                pci,
            });
        }
    }
    gpus.sort_by(|a, b| a.pci.address.cmp(&b.pci.address));
    for (i, g) in gpus.iter_mut().enumerate() {
        g.index = i;
    }
    let class = sysfs.join("class/infiniband");
    let mut names = list_dir(&class).unwrap_or_default();
    names.sort_by(|a, b| natural_cmp(a, b));
    let hcas = names
        .into_iter()
        .map(|device| Hca {
            pci: resolve(&root, &class.join(&device).join("device")),
            device,
        })
        .collect();
    Ok(PciTopology { gpus, hcas })
}

/// The [`PciDevice`] a sysfs link (or directory) leads to, when it lands in
/// `<root>/devices/pci<dom>:<bus>/.../<addr>`.
fn resolve(root: &Path, link: &Path) -> Option<PciDevice> {
    let real = fs::canonicalize(link).ok()?;
    let rel = real.strip_prefix(root).ok()?;
    let mut parts = rel.components().filter_map(|c| match c {
        Component::Normal(s) => s.to_str(),
        _ => None,
    });
    if parts.next()? != "devices" {
        return None;
    }
    let host_bridge = parts.next().filter(|h| h.starts_with("pci"))?.to_string();
    let mut chain: Vec<String> = parts.map(str::to_string).collect();
    if !chain.iter().all(|c| is_pci_address(c)) {
        return None;
    }
    let address = chain.pop()?;
    let numa_node = read_attr(&real.join("numa_node"))
        .ok()
        .and_then(|t| t.parse::<i64>().ok())
        .and_then(|n| u32::try_from(n).ok());
    Some(PciDevice {
        address,
        host_bridge,
        bridges: chain,
        numa_node,
    })
}

/// `0000:18:00.0`: domain, bus, device and function in hex.
fn is_pci_address(s: &str) -> bool {
    let Some((rest, function)) = s.rsplit_once('.') else {
        return false;
    };
    let fields: Vec<&str> = rest.split(':').collect();
    fields.len() == 3
        && fields
            .iter()
            .chain(std::iter::once(&function))
            .all(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::fixture;

    fn dev(path: &str, numa: Option<u32>) -> PciDevice {
        let mut parts: Vec<String> = path.split('/').map(str::to_string).collect();
        let address = parts.pop().unwrap();
        PciDevice {
            address,
            host_bridge: parts.remove(0),
            bridges: parts,
            numa_node: numa,
        }
    }

    #[test]
    fn distance_classes_follow_the_shared_path() {
        let gpu = dev(
            "pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:01.0/0000:19:00.0",
            Some(0),
        );
        let nic = dev(
            "pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:00.0/0000:18:00.0",
            Some(0),
        );
        assert_eq!(distance(&gpu, &nic), Distance::SameSwitch);
        let below_port = dev("pci0000:15/0000:15:01.0/0000:1a:00.0", Some(0));
        assert_eq!(distance(&gpu, &below_port), Distance::SameRootPort);
        let other_port = dev("pci0000:15/0000:15:03.0/0000:1f:00.0", Some(0));
        assert_eq!(distance(&gpu, &other_port), Distance::SameHostBridge);
        let on_root_bus = dev("pci0000:15/0000:15:05.0", Some(0));
        assert_eq!(distance(&gpu, &on_root_bus), Distance::SameHostBridge);
        let same_node = dev("pci0000:26/0000:26:01.0/0000:29:00.0", Some(0));
        assert_eq!(distance(&gpu, &same_node), Distance::SameNuma);
        let other_node = dev("pci0000:95/0000:95:01.0/0000:98:00.0", Some(1));
        assert_eq!(distance(&gpu, &other_node), Distance::CrossSocket);
        // No NUMA information on either side (a one-socket VM): not cross-socket.
        let (a, b) = (
            dev("pci0000:00/0000:00:04.0", None),
            dev("pci0000:10/0000:10:00.0", None),
        );
        assert_eq!(distance(&a, &b), Distance::SameNuma);
        assert_eq!(
            distance(&a, &dev("pci0000:10/0000:10:00.0", Some(0))),
            Distance::CrossSocket
        );
        // Symmetric.
        assert_eq!(distance(&nic, &gpu), Distance::SameSwitch);
        assert!(Distance::SameSwitch < Distance::SameRootPort);
        assert!(Distance::SameNuma < Distance::CrossSocket);
        assert!(Distance::CrossSocket < Distance::Unknown);
    }

    #[test]
    fn dgx_h800_has_eight_gpus_each_behind_a_switch_with_one_nic() {
        let topo = discover_pci(&fixture("dgx-h800")).unwrap();
        let addresses: Vec<&str> = topo.gpus.iter().map(|g| g.pci.address.as_str()).collect();
        assert_eq!(
            addresses,
            [
                "0000:19:00.0",
                "0000:2a:00.0",
                "0000:3b:00.0",
                "0000:4c:00.0",
                "0000:99:00.0",
                "0000:aa:00.0",
                "0000:bb:00.0",
                "0000:cc:00.0"
            ],
            "NVSwitches (class 0680) and the BMC's VGA (vendor 1a03) are no GPUs"
        );
        for (i, g) in topo.gpus.iter().enumerate() {
            assert_eq!(g.index, i);
            assert_eq!(g.device_id, 0x2324);
            assert_eq!(g.pci.numa_node, Some(u32::from(i >= 4)));
            assert_eq!(g.pci.bridges.len(), 3, "root port, switch up, switch down");
        }
        let g0 = &topo.gpus[0];
        assert_eq!(g0.pci.host_bridge, "pci0000:15");
        assert_eq!(g0.pci.root_port(), Some("0000:15:01.0"));
        assert_eq!(
            g0.pci.path(),
            "pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:01.0/0000:19:00.0"
        );
        let names: Vec<&str> = topo.hcas.iter().map(|h| h.device.as_str()).collect();
        assert_eq!(names.len(), 12);
        assert_eq!(names[..3], ["mlx5_0", "mlx5_1", "mlx5_2"]);
        assert_eq!(names[11], "mlx5_11");
        let m0 = topo.hca("mlx5_0").unwrap().pci.as_ref().unwrap();
        assert_eq!(m0.address, "0000:18:00.0");
        assert_eq!(m0.numa_node, Some(0));
        assert_eq!(topo.hca_numa("mlx5_8"), Some(1));

        let classes = |device: &str| -> Vec<Distance> {
            topo.gpus
                .iter()
                .map(|g| topo.gpu_to_hca(g, device))
                .collect()
        };
        use Distance::*;
        assert_eq!(
            classes("mlx5_0"),
            [
                SameSwitch,
                SameNuma,
                SameNuma,
                SameNuma,
                CrossSocket,
                CrossSocket,
                CrossSocket,
                CrossSocket
            ]
        );
        assert_eq!(
            classes("mlx5_1"),
            [
                SameHostBridge,
                SameNuma,
                SameNuma,
                SameNuma,
                CrossSocket,
                CrossSocket,
                CrossSocket,
                CrossSocket
            ],
            "a storage NIC on GPU 0's root complex, behind another root port"
        );
        assert_eq!(classes("mlx5_11")[7], SameSwitch);
        assert_eq!(classes("mlx5_7")[4], SameHostBridge);
    }

    #[test]
    fn gpus_are_found_by_address_in_any_spelling() {
        let topo = discover_pci(&fixture("dgx-h800")).unwrap();
        for spelling in ["0000:2a:00.0", "0000:2A:00.0", "2a:00.0", " 0000:2a:00.0\n"] {
            assert_eq!(topo.gpu(spelling).map(|g| g.index), Some(1), "{spelling:?}");
        }
        assert!(topo.gpu("0000:2a:00.1").is_none());
    }

    #[test]
    fn two_socket_host_and_trees_without_pci() {
        let topo = discover_pci(&fixture("two-socket")).unwrap();
        assert_eq!(topo.gpus.len(), 1);
        assert_eq!(
            topo.gpus[0].pci.address, "0000:01:00.0",
            "a VGA-class GPU counts"
        );
        let g = &topo.gpus[0];
        assert_eq!(topo.gpu_to_hca(g, "mlx5_0"), Distance::SameHostBridge);
        assert_eq!(topo.gpu_to_hca(g, "mlx5_1"), Distance::CrossSocket);
        assert_eq!(topo.gpu_to_hca(g, "mlx5_9"), Distance::Unknown);

        // Soft-RoCE devices have no PCI function; `mixed` has a device/ directory that is no
        // link into devices/: neither is an error, both come out without PCI information.
        for name in ["rxe-fabric", "mixed"] {
            let topo = discover_pci(&fixture(name)).unwrap();
            assert!(topo.gpus.is_empty());
            assert!(!topo.hcas.is_empty());
            assert!(topo.hcas.iter().all(|h| h.pci.is_none()), "{name}");
        }
        let empty = discover_pci(&fixture("no-verbs")).unwrap();
        assert_eq!(empty, PciTopology::default());
        assert!(discover_pci(&fixture("no-such-tree")).is_err());
    }

    #[test]
    fn pci_addresses_parse() {
        assert!(is_pci_address("0000:18:00.0"));
        assert!(is_pci_address("10000:e1:00.7"));
        assert!(!is_pci_address("pci0000:15"));
        assert!(!is_pci_address("infiniband"));
        assert!(!is_pci_address("0000:18:00"));
        assert!(!is_pci_address("0000::00.0"));
    }
}
