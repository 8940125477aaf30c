//! `kvtransfer doctor` against the sysfs fixture trees and against this host's `/sys`.

use std::process::Output;

use serde_json::Value;

// The integration tests' shared helpers live with the library's tests.
#[path = "../../tests/common/mod.rs"]
mod common;

use common::cli_stdout as stdout;

fn fixture(name: &str) -> String {
    common::sysfs_fixture(name)
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

fn doctor(args: &[&str]) -> Output {
    common::run_cli("doctor", args)
}

fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&stdout(&doctor(&all))).expect("one JSON object")
}

fn check<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {v:#}"))
}

const COMPUTE: [&str; 8] = [
    "mlx5_0", "mlx5_3", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_9", "mlx5_10", "mlx5_11",
];

#[test]
fn every_check_has_a_status_and_a_fix_when_not_ok() {
    for tree in [
        "dgx-h800",
        "two-socket",
        "mixed",
        "rxe-fabric",
        "empty",
        "no-verbs",
    ] {
        let v = json(&["--sysfs", &fixture(tree)]);
        let checks = v["checks"].as_array().expect("checks");
        let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
        for want in [
            "rdma-core",
            "kernel uverbs",
            "devices",
            "link layer",
            "active MTU",
            "RoCEv2 GID",
            "authentication",
            "ulimit -l",
            "nvidia-peermem",
            "dmabuf",
            "libcuda",
            "GPU-NIC map",
        ] {
            assert!(
                names.contains(&want),
                "{tree}: {want} missing from {names:?}"
            );
        }
        for c in checks {
            let status = c["status"].as_str().unwrap();
            assert!(["ok", "warn", "fail", "skip"].contains(&status), "{c}");
            assert!(!c["found"].as_str().unwrap().is_empty(), "{tree}: {c}");
            if status == "warn" || status == "fail" {
                assert!(
                    c["fix"].as_str().is_some_and(|f| !f.is_empty()),
                    "{tree}: {c}"
                );
            }
        }
        assert!(
            ["rdma", "tcp"].contains(&v["transport"].as_str().unwrap()),
            "{v:#}"
        );
    }
}

#[test]
fn dgx_h800_maps_each_gpu_to_its_own_compute_rail() {
    let v = json(&["--sysfs", &fixture("dgx-h800")]);
    let gpus = v["gpus"].as_array().expect("gpus");
    assert_eq!(gpus.len(), 8, "{v:#}");
    for (i, (g, nic)) in gpus.iter().zip(COMPUTE).enumerate() {
        assert_eq!(g["index"], i);
        assert_eq!(g["numa_node"], u32::from(i >= 4));
        assert_eq!(g["rails"], serde_json::json!([format!("{nic}:1")]), "{g:#}");
        assert_eq!(g["nearest"][0]["rail"], format!("{nic}:1"));
        assert_eq!(g["nearest"][0]["distance"], "same-switch");
        assert_ne!(g["nearest"][1]["distance"], "same-switch");
    }
    let nics = v["nics"].as_array().expect("nics");
    assert_eq!(nics.len(), 12);
    let kv: Vec<&str> = nics
        .iter()
        .filter(|n| n["kv"] == true)
        .map(|n| n["device"].as_str().unwrap())
        .collect();
    assert_eq!(kv, COMPUTE);
    for n in nics.iter().filter(|n| n["kv"] == false) {
        let dev = n["device"].as_str().unwrap();
        assert!(
            ["mlx5_1", "mlx5_2", "mlx5_7", "mlx5_8"].contains(&dev),
            "{n}"
        );
        assert!(
            n["not_kv_reason"]
                .as_str()
                .unwrap()
                .contains("no GPU behind its PCIe switch"),
            "{n}"
        );
    }
    assert_eq!(v["host_rails"][0]["numa_node"], 0);
    assert_eq!(
        v["host_rails"][0]["rails"],
        serde_json::json!(["mlx5_0:1", "mlx5_3:1", "mlx5_4:1", "mlx5_5:1"])
    );
    assert_eq!(check(&v, "GPU-NIC map")["status"], "ok");
    assert_eq!(check(&v, "devices")["status"], "ok");
    assert_eq!(check(&v, "kernel uverbs")["status"], "ok");
    assert_eq!(
        check(&v, "active MTU")["status"],
        "ok",
        "netdev MTU 4200 → 4096"
    );
    assert_eq!(check(&v, "nvidia-peermem")["status"], "ok");
    let gid = check(&v, "RoCEv2 GID");
    assert_eq!(gid["status"], "ok");
    assert!(
        gid["found"]
            .as_str()
            .unwrap()
            .contains("mlx5_0:1 index 3 ::ffff:10.0.0.1 (RoCE v2)"),
        "{gid}"
    );
    assert!(
        !gid["found"].as_str().unwrap().contains("mlx5_1:1"),
        "storage NIC is no rail"
    );
    // The library probe is this host's: RDMA when libibverbs loads, else TCP saying why.
    if check(&v, "rdma-core")["status"] == "fail" {
        assert_eq!(v["transport"], "tcp");
        assert!(v["reason"].as_str().unwrap().contains("rdma-core"), "{v:#}");
    } else {
        assert_eq!(v["transport"], "rdma", "{v:#}");
        assert!(
            v["reason"]
                .as_str()
                .unwrap()
                .starts_with("8 KV rail(s): mlx5_0:1, mlx5_3:1")
        );
    }

    let text = stdout(&doctor(&["--sysfs", &fixture("dgx-h800")]));
    for (i, nic) in COMPUTE.iter().enumerate() {
        let line = format!("GPU {i} ");
        let gpu_line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&line))
            .unwrap_or_else(|| panic!("no {line} line in\n{text}"));
        assert!(
            gpu_line.ends_with(&format!("-> {nic}:1 (same-switch)")),
            "{gpu_line}"
        );
    }
    assert!(
        text.contains("not for KV: mlx5_1:1, mlx5_2:1, mlx5_7:1, mlx5_8:1"),
        "{text}"
    );
    assert!(
        text.lines().last().unwrap().starts_with("transport: "),
        "{text}"
    );
}

#[test]
fn rails_per_gpu_adds_the_next_nearest_rails() {
    let v = json(&["--sysfs", &fixture("dgx-h800"), "--rails-per-gpu", "2"]);
    assert_eq!(v["rails_per_gpu"], 2);
    assert_eq!(
        v["gpus"][1]["rails"],
        serde_json::json!(["mlx5_0:1", "mlx5_3:1"])
    );
    assert_eq!(
        v["gpus"][4]["rails"],
        serde_json::json!(["mlx5_6:1", "mlx5_9:1"])
    );
}

#[test]
fn two_socket_host_warns_about_the_far_rail_and_the_small_mtu() {
    let v = json(&["--sysfs", &fixture("two-socket"), "--rails-per-gpu", "2"]);
    assert_eq!(
        v["gpus"][0]["nearest"],
        serde_json::json!([
            {"rail": "mlx5_0:1", "distance": "same-host-bridge"},
            {"rail": "mlx5_1:1", "distance": "cross-socket"}
        ])
    );
    let map = check(&v, "GPU-NIC map");
    assert_eq!(map["status"], "warn", "{map}");
    assert!(map["found"].as_str().unwrap().contains("across sockets"));
    let mtu = check(&v, "active MTU");
    assert_eq!(mtu["status"], "warn");
    assert!(
        mtu["found"]
            .as_str()
            .unwrap()
            .contains("mlx5_1:1 1024 (netdev enp129s0np0)"),
        "{mtu}"
    );
    assert!(mtu["fix"].as_str().unwrap().contains("mtu 4200"));
    let peermem = check(&v, "nvidia-peermem");
    assert_eq!(peermem["status"], "warn");
    assert!(
        peermem["fix"]
            .as_str()
            .unwrap()
            .contains("modprobe nvidia-peermem")
    );
    let dmabuf = check(&v, "dmabuf");
    assert_eq!(dmabuf["status"], "warn");
    assert!(
        dmabuf["found"]
            .as_str()
            .unwrap()
            .contains("510.47.03 is older than 515"),
        "{dmabuf}"
    );
}

#[test]
fn trees_without_rdma_say_tcp_and_why() {
    let v = json(&["--sysfs", &fixture("no-verbs")]);
    assert_eq!(v["transport"], "tcp");
    assert!(v["reason"].as_str().unwrap().contains("no RDMA"), "{v:#}");
    assert!(
        v["reason"].as_str().unwrap().contains("TCP will be used"),
        "{v:#}"
    );
    let uverbs = check(&v, "kernel uverbs");
    assert_eq!(uverbs["status"], "fail");
    assert!(
        uverbs["fix"]
            .as_str()
            .unwrap()
            .contains("modprobe ib_uverbs")
    );
    assert_eq!(check(&v, "devices")["status"], "skip");
    assert_eq!(check(&v, "GPU-NIC map")["status"], "skip");

    let v = json(&["--sysfs", &fixture("empty")]);
    assert_eq!(v["transport"], "tcp");
    let devices = check(&v, "devices");
    assert_eq!(devices["status"], "fail");
    assert!(
        devices["found"]
            .as_str()
            .unwrap()
            .contains("no RDMA devices"),
        "{devices}"
    );
}

#[test]
fn mixed_host_shows_down_ports_and_mixed_link_layers() {
    let v = json(&["--sysfs", &fixture("mixed")]);
    let devices = check(&v, "devices");
    assert_eq!(devices["status"], "warn");
    assert!(
        devices["found"].as_str().unwrap().contains("mlx5_1:1 DOWN"),
        "{devices}"
    );
    assert_eq!(
        check(&v, "link layer")["status"],
        "warn",
        "RoCE and InfiniBand rails"
    );
    let gid = check(&v, "RoCEv2 GID");
    assert_eq!(gid["status"], "warn", "{gid}");
    assert!(
        gid["found"]
            .as_str()
            .unwrap()
            .contains("no IPv4-mapped GID on mlx5_2:1")
    );
}

#[test]
fn this_host_says_clearly_whether_tcp_will_be_used() {
    let out = doctor(&[]);
    let text = stdout(&out);
    let last = text.lines().last().expect("a summary line");
    let has_rdma = std::path::Path::new("/sys/class/infiniband_verbs").is_dir();
    if has_rdma {
        assert!(last.starts_with("transport: "), "{text}");
    } else {
        // Which reason comes first depends on whether rdma-core is installed on this host
        // (a fresh machine has none until the RDMA suite installs it): doctor names the
        // library when it cannot load it, else the kernel. Both must say TCP will be used.
        let v = json(&[]);
        let reason = if check(&v, "rdma-core")["status"] == "fail" {
            "transport: tcp (no RDMA: rdma-core (libibverbs.so.1) is not installed"
        } else {
            "transport: tcp (no RDMA: the kernel has no RDMA support"
        };
        assert!(last.starts_with(reason), "expected {reason:?}:\n{text}");
        assert!(last.ends_with("TCP will be used)"), "{text}");
        assert!(text.contains("fail  kernel uverbs"), "{text}");
        assert_eq!(v["transport"], "tcp");
        assert_eq!(check(&v, "kernel uverbs")["status"], "fail");
    }
}

#[test]
fn a_missing_sysfs_root_is_an_error() {
    let out = doctor(&["--sysfs", "/no/such/tree"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}

/// `doctor --json` with these environment variables (and no secret inherited).
fn json_env(env: &[(&str, &str)]) -> Value {
    let out = std::process::Command::new(common::cli_bin())
        .args(["doctor", "--json", "--sysfs", &fixture("empty")])
        .env_remove("KVT_SECRET")
        .env_remove("KVT_SECRET_FILE")
        .env_remove("KVT_LISTEN")
        .envs(env.iter().copied())
        .output()
        .expect("run kvtransfer");
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

#[test]
fn doctor_reports_the_authentication_state() {
    let open = json_env(&[("KVT_LISTEN", "0.0.0.0:0")]);
    let c = check(&open, "authentication");
    assert_eq!(c["status"], "warn", "{c:#}");
    assert!(
        c["found"].as_str().unwrap().contains("no cluster secret"),
        "{c:#}"
    );
    assert!(c["fix"].as_str().unwrap().contains("KVT_SECRET"), "{c:#}");

    let local = json_env(&[]);
    assert_eq!(check(&local, "authentication")["status"], "ok");

    let secret = json_env(&[
        ("KVT_LISTEN", "0.0.0.0:0"),
        ("KVT_SECRET", "sixteen bytes at least"),
    ]);
    let c = check(&secret, "authentication");
    assert_eq!(c["status"], "ok", "{c:#}");
    assert!(
        c["found"].as_str().unwrap().contains("cluster secret set"),
        "{c:#}"
    );
}
