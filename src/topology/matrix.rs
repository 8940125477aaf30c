//! The topology matrix in the shape Mooncake's `get_local_topology` reports: for each memory
//! location (`cpu:<numa node>`, `cuda:<gpu index>`), the RDMA devices to prefer and the other
//! usable ones. Pure: a [`PciTopology`] and the KV rails' device names in, a map out.

use std::collections::BTreeMap;
use std::path::Path;

use super::pci::PciTopology;
use crate::Result;

/// For one memory location: `[preferred devices, other devices]`, each in rail order.
pub type Entry = [Vec<String>; 2];

/// The matrix of `topo` over the KV rails `rails` (device names in rail order; a device with
/// two ports appears once):
/// - `cuda:<i>` for every GPU: the devices at the smallest PCIe distance from it first;
/// - `cpu:<n>` for every NUMA node a device sits on: that node's devices first; a single
///   `cpu:0` with every device preferred when no device reports a node.
///
/// Empty when there are no rails (a host that will use TCP).
pub fn matrix<S: AsRef<str>>(topo: &PciTopology, rails: &[S]) -> BTreeMap<String, Entry> {
    let mut devices: Vec<&str> = Vec::new();
    for r in rails {
        if !devices.contains(&r.as_ref()) {
            devices.push(r.as_ref());
        }
    }
    let mut out = BTreeMap::new();
    if devices.is_empty() {
        return out;
    }
    let split = |near: &dyn Fn(&str) -> bool| -> Entry {
        let (a, b): (Vec<&str>, Vec<&str>) = devices.iter().partition(|d| near(d));
        [
            a.into_iter().map(String::from).collect(),
            b.into_iter().map(String::from).collect(),
        ]
    };
    for gpu in &topo.gpus {
        let best = devices
            .iter()
            .map(|d| topo.gpu_to_hca(gpu, d))
            .min()
            .expect("devices is not empty");
        out.insert(
            format!("cuda:{}", gpu.index),
            split(&|d| topo.gpu_to_hca(gpu, d) == best),
        );
    }
    let mut nodes: Vec<u32> = devices.iter().filter_map(|d| topo.hca_numa(d)).collect();
    nodes.sort_unstable();
    nodes.dedup();
    if nodes.is_empty() {
        out.insert("cpu:0".into(), split(&|_| true));
    }
    for node in nodes {
        out.insert(
            format!("cpu:{node}"),
            split(&|d| topo.hca_numa(d) == Some(node)),
        );
    }
    out
}

/// The matrix of this host (sysfs at `sysfs`) as JSON, over the rails an engine with the
/// device allow-list `allow` would use (without one, the KV rails only). `{}` when the host
/// has no usable RDMA port.
pub fn local_json(sysfs: &Path, allow: Option<&[String]>) -> Result<String> {
    let ports = super::discover(sysfs).unwrap_or_default();
    let usable = super::usable_rails(&ports, allow, None).unwrap_or_default();
    let mut names: Vec<&str> = usable.iter().map(|(p, _)| p.device.as_str()).collect();
    let pci = super::discover_pci(sysfs).unwrap_or_default();
    if allow.is_none() {
        let kv = super::kv_rails(&pci, &names);
        names = kv.into_iter().map(|i| names[i]).collect();
    }
    Ok(to_json(&matrix(&pci, &names)))
}

/// `{"key": [["a", "b"], ["c"]], ...}`: the matrix as compact JSON.
fn to_json(m: &BTreeMap<String, Entry>) -> String {
    let list = |v: &[String]| {
        format!(
            "[{}]",
            v.iter().map(|s| json_str(s)).collect::<Vec<_>>().join(",")
        )
    };
    let entries: Vec<String> = m
        .iter()
        .map(|(k, [near, far])| format!("{}:[{},{}]", json_str(k), list(near), list(far)))
        .collect();
    format!("{{{}}}", entries.join(","))
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::fixture;

    fn json(name: &str) -> serde_json::Value {
        serde_json::from_str(&local_json(&fixture(name), None).unwrap()).unwrap()
    }

    #[test]
    fn each_dgx_gpu_prefers_its_own_compute_nic() {
        let v = json("dgx-h800");
        let kv = [
            "mlx5_0", "mlx5_3", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_9", "mlx5_10", "mlx5_11",
        ];
        for (i, nic) in kv.iter().enumerate() {
            let entry = &v[format!("cuda:{i}")];
            assert_eq!(entry[0], serde_json::json!([nic]), "GPU {i}: {v:#}");
            assert_eq!(entry[1].as_array().unwrap().len(), 7, "{v:#}");
        }
        // The storage NICs are no KV rails, so they appear nowhere.
        assert!(!v.to_string().contains("mlx5_1\""), "{v:#}");
        let cpu0 = v["cpu:0"][0].as_array().unwrap().len();
        let cpu1 = v["cpu:1"][0].as_array().unwrap().len();
        assert_eq!(cpu0 + cpu1, 8, "{v:#}");
    }

    #[test]
    fn the_json_is_what_a_json_parser_reads_back() {
        let mut m = BTreeMap::new();
        m.insert(
            "cuda:0".to_string(),
            [
                vec!["mlx5_0".to_string()],
                vec!["a\"b\\c\u{1}".to_string(), "é".into()],
            ],
        );
        m.insert("cpu:1".to_string(), [Vec::new(), Vec::new()]);
        let v: serde_json::Value = serde_json::from_str(&to_json(&m)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cuda:0": [["mlx5_0"], ["a\"b\\c\u{1}", "é"]], "cpu:1": [[], []]})
        );
        assert_eq!(to_json(&BTreeMap::new()), "{}");
    }

    #[test]
    fn a_host_without_rdma_has_an_empty_matrix() {
        assert_eq!(json("no-verbs"), serde_json::json!({}));
        assert_eq!(json("empty"), serde_json::json!({}));
    }

    #[test]
    fn software_devices_without_numa_are_all_preferred_for_cpu_0() {
        let v = json("rxe-fabric");
        let preferred = v["cpu:0"][0].as_array().unwrap();
        assert!(!preferred.is_empty(), "{v:#}");
        assert_eq!(v["cpu:0"][1], serde_json::json!([]), "{v:#}");
    }

    #[test]
    fn an_allow_list_narrows_the_devices() {
        let allow = vec!["mlx5_1".to_string()];
        let v: serde_json::Value =
            serde_json::from_str(&local_json(&fixture("dgx-h800"), Some(&allow)).unwrap()).unwrap();
        assert_eq!(v["cuda:0"], serde_json::json!([["mlx5_1"], []]), "{v:#}");
    }
}
