//! Which rails carry KV, and which of them one memory segment is registered on and striped
//! over. Pure: a [`PciTopology`] and the rails (device names in rail order) in, rail indices
//! out.
//!
//! - **KV rails.** When some rail shares a PCIe switch with some GPU, the host was built for
//!   GPUDirect RDMA (a DGX: each GPU has its compute NIC behind its own switch), and the KV
//!   rails are exactly the rails that share a switch with a GPU; a NIC outside every GPU's
//!   switch (a storage or management card) is not used for KV. Otherwise (no GPU, no PCI
//!   information, or no switch-local NIC: workstations, VMs, Soft-RoCE) every rail is a KV
//!   rail.
//! - **GPU memory** goes on the `rails_per_gpu` nearest rails by [`Distance`], ties broken by
//!   rail order.
//! - **Host memory** on NUMA node *k* goes on the rails whose NIC is on node *k*; on every
//!   rail when none is, or when the node is unknown.

use super::pci::{Distance, Gpu, PciTopology};

/// Where a memory segment lives, for [`rails_for`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Memory of the GPU at this PCI address (`0000:18:00.0`, as `cuDeviceGetPCIBusId` gives).
    Gpu {
        /// The GPU's PCI address.
        pci: String,
    },
    /// Host memory on this NUMA node (`None`: unknown).
    Host {
        /// The NUMA node.
        numa_node: Option<u32>,
    },
}

/// Indices of the rails (device names, in rail order; a two-port device appears twice) that
/// carry KV, by the rule in the [module docs](self).
pub fn kv_rails<S: AsRef<str>>(topo: &PciTopology, rails: &[S]) -> Vec<usize> {
    let switch_local: Vec<usize> = (0..rails.len())
        .filter(|&r| {
            topo.gpus
                .iter()
                .any(|g| topo.gpu_to_hca(g, rails[r].as_ref()) == Distance::SameSwitch)
        })
        .collect();
    if switch_local.is_empty() {
        (0..rails.len()).collect()
    } else {
        switch_local
    }
}

/// Every rail with its distance from `gpu`, nearest first, ties in rail order.
pub fn ranked_rails<S: AsRef<str>>(
    topo: &PciTopology,
    gpu: &Gpu,
    rails: &[S],
) -> Vec<(usize, Distance)> {
    let mut ranked: Vec<(usize, Distance)> = rails
        .iter()
        .enumerate()
        .map(|(i, r)| (i, topo.gpu_to_hca(gpu, r.as_ref())))
        .collect();
    ranked.sort_by_key(|&(i, d)| (d, i));
    ranked
}

/// The rails (indices into `rails`, ascending) a segment at `placement` is registered on
/// and striped over:
/// - GPU memory: the `rails_per_gpu` nearest (at least 1, at most all); every rail when the
///   GPU is not in `topo` (registering everywhere is always correct, only slower).
/// - Host memory: the rails on its NUMA node, or every rail when there are none.
///
/// `rails` is the engine's rail list, normally already narrowed to [`kv_rails`]. Empty only
/// when `rails` is.
pub fn rails_for<S: AsRef<str>>(
    topo: &PciTopology,
    rails: &[S],
    placement: &Placement,
    rails_per_gpu: usize,
) -> Vec<usize> {
    let all = || (0..rails.len()).collect::<Vec<_>>();
    let mut chosen = match placement {
        Placement::Gpu { pci } => match topo.gpu(pci) {
            Some(gpu) => ranked_rails(topo, gpu, rails)
                .into_iter()
                .take(rails_per_gpu.max(1))
                .map(|(i, _)| i)
                .collect(),
            None => all(),
        },
        Placement::Host { numa_node: None } => all(),
        Placement::Host {
            numa_node: Some(node),
        } => {
            let local: Vec<usize> = (0..rails.len())
                .filter(|&r| topo.hca_numa(rails[r].as_ref()) == Some(*node))
                .collect();
            if local.is_empty() { all() } else { local }
        }
    };
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::pci::discover_pci;
    use crate::topology::{discover, fixture, usable_rails};

    /// The topology and the usable rails' device names of a fixture tree.
    fn host(name: &str) -> (PciTopology, Vec<String>) {
        let root = fixture(name);
        let ports = discover(&root).unwrap();
        let rails = usable_rails(&ports, None, None)
            .unwrap()
            .iter()
            .map(|(p, _)| p.device.clone())
            .collect();
        (discover_pci(&root).unwrap(), rails)
    }

    fn names(rails: &[String], picked: &[usize]) -> Vec<String> {
        picked.iter().map(|&i| rails[i].clone()).collect()
    }

    const DGX_COMPUTE: [&str; 8] = [
        "mlx5_0", "mlx5_3", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_9", "mlx5_10", "mlx5_11",
    ];

    #[test]
    fn dgx_kv_rails_are_the_eight_compute_nics() {
        let (topo, rails) = host("dgx-h800");
        assert_eq!(
            rails.len(),
            12,
            "all twelve ports are ACTIVE with a RoCE v2 GID"
        );
        assert_eq!(names(&rails, &kv_rails(&topo, &rails)), DGX_COMPUTE);
    }

    #[test]
    fn each_dgx_gpu_maps_to_its_own_switch_local_nic() {
        let (topo, all) = host("dgx-h800");
        let kv: Vec<String> = names(&all, &kv_rails(&topo, &all));
        for (gpu, nic) in topo.gpus.iter().zip(DGX_COMPUTE) {
            let placement = Placement::Gpu {
                pci: gpu.pci.address.clone(),
            };
            assert_eq!(names(&kv, &rails_for(&topo, &kv, &placement, 1)), [nic]);
            // Also when the storage NICs are among the rails: they are never nearer.
            assert_eq!(names(&all, &rails_for(&topo, &all, &placement, 1)), [nic]);
            let ranked = ranked_rails(&topo, gpu, &kv);
            assert_eq!(ranked[0].1, Distance::SameSwitch);
            assert!(ranked[1..].iter().all(|(_, d)| *d >= Distance::SameNuma));
        }
    }

    #[test]
    fn more_rails_per_gpu_add_the_nearest_next_ones_in_rail_order() {
        let (topo, all) = host("dgx-h800");
        let kv: Vec<String> = names(&all, &kv_rails(&topo, &all));
        let gpu = |i: usize| Placement::Gpu {
            pci: topo.gpus[i].pci.address.clone(),
        };
        // GPU 1: its own NIC, then the same-socket ones in rail order.
        assert_eq!(
            names(&kv, &rails_for(&topo, &kv, &gpu(1), 2)),
            ["mlx5_0", "mlx5_3"]
        );
        assert_eq!(
            names(&kv, &rails_for(&topo, &kv, &gpu(1), 4)),
            ["mlx5_0", "mlx5_3", "mlx5_4", "mlx5_5"]
        );
        // GPU 6: own NIC first, then socket 1's.
        assert_eq!(
            names(&kv, &rails_for(&topo, &kv, &gpu(6), 3)),
            ["mlx5_6", "mlx5_9", "mlx5_10"]
        );
        // Over the whole list, GPU 0's next nearest is the storage NIC on its root complex.
        assert_eq!(
            names(&all, &rails_for(&topo, &all, &gpu(0), 2)),
            ["mlx5_0", "mlx5_1"]
        );
        assert_eq!(rails_for(&topo, &kv, &gpu(3), 0).len(), 1, "at least one");
        assert_eq!(rails_for(&topo, &kv, &gpu(3), 99).len(), 8, "at most all");
    }

    #[test]
    fn host_memory_uses_its_numa_nodes_rails() {
        let (topo, all) = host("dgx-h800");
        let kv: Vec<String> = names(&all, &kv_rails(&topo, &all));
        let on = |node| Placement::Host {
            numa_node: Some(node),
        };
        assert_eq!(
            names(&kv, &rails_for(&topo, &kv, &on(0), 1)),
            DGX_COMPUTE[..4]
        );
        assert_eq!(
            names(&kv, &rails_for(&topo, &kv, &on(1), 1)),
            DGX_COMPUTE[4..]
        );
        assert_eq!(
            rails_for(&topo, &kv, &on(7), 1).len(),
            8,
            "no rail on node 7"
        );
        let unknown = Placement::Host { numa_node: None };
        assert_eq!(rails_for(&topo, &kv, &unknown, 1).len(), 8);
    }

    #[test]
    fn two_socket_host_keeps_both_rails_and_prefers_the_gpus_socket() {
        let (topo, rails) = host("two-socket");
        assert_eq!(rails, ["mlx5_0", "mlx5_1"]);
        assert_eq!(
            kv_rails(&topo, &rails),
            [0, 1],
            "no switch-local NIC: all rails"
        );
        let gpu = Placement::Gpu {
            pci: "0000:01:00.0".into(),
        };
        assert_eq!(rails_for(&topo, &rails, &gpu, 1), [0]);
        assert_eq!(rails_for(&topo, &rails, &gpu, 2), [0, 1]);
        let node1 = Placement::Host { numa_node: Some(1) };
        assert_eq!(rails_for(&topo, &rails, &node1, 1), [1]);
        let unknown_gpu = Placement::Gpu {
            pci: "0000:42:00.0".into(),
        };
        assert_eq!(rails_for(&topo, &rails, &unknown_gpu, 1), [0, 1]);
    }

    #[test]
    fn hosts_without_pci_information_use_every_rail() {
        let (topo, rails) = host("rxe-fabric");
        assert_eq!(kv_rails(&topo, &rails), [0, 1, 2, 3]);
        let host_mem = Placement::Host { numa_node: Some(0) };
        assert_eq!(rails_for(&topo, &rails, &host_mem, 1), [0, 1, 2, 3]);
        let none: [&str; 0] = [];
        assert!(kv_rails(&topo, &none).is_empty());
        assert!(rails_for(&topo, &none, &host_mem, 1).is_empty());
    }
}
