//! `kvtransfer devices` against the sysfs fixture trees and against this host's `/sys`.

use std::process::Output;

use serde_json::Value;

// The integration tests' shared helpers live with the library's tests.
#[path = "../../tests/common/mod.rs"]
mod common;

use common::{cli_stdout as stdout, sysfs_fixture as fixture};

fn devices(args: &[&str]) -> Output {
    common::run_cli("devices", args)
}

fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&stdout(&devices(&all))).expect("one JSON object")
}

#[test]
fn rxe_fabric_gives_four_rdma_rails_on_gid_index_1() {
    let sysfs = fixture("rxe-fabric");
    let v = json(&["--sysfs", sysfs.to_str().unwrap()]);
    assert_eq!(v["transport"], "rdma", "{v:#}");
    let ports = v["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 4);
    for (i, p) in ports.iter().enumerate() {
        assert_eq!(p["state"], "ACTIVE");
        assert_eq!(p["mtu"], 4096);
        assert_eq!(p["rail"], i);
        assert_eq!(p["gid"]["index"], 1, "{p:#}");
        assert_eq!(p["gid"]["type"], "RoCE v2");
        assert_eq!(p["gid"]["gid"], format!("::ffff:198.18.0.{}", i + 1));
    }

    let table = stdout(&devices(&["--sysfs", sysfs.to_str().unwrap()]));
    assert!(table.contains("rxeA0"), "{table}");
    assert!(table.contains("::ffff:198.18.0.1 (RoCE v2)"), "{table}");
    assert!(
        table.contains(
            "transport auto: rdma (4 usable rails: rxeA0:1, rxeA1:1, rxeB0:1, rxeB1:1)\n"
        ),
        "{table}"
    );
    let last = table.lines().last().unwrap_or("");
    assert!(last.starts_with("GPU memory: "), "{table}");
}

#[test]
fn options_narrow_the_rails_and_pick_the_gid() {
    let sysfs = fixture("rxe-fabric");
    let v = json(&[
        "--sysfs",
        sysfs.to_str().unwrap(),
        "--devices",
        "rxeB1,rxeA0:1",
        "--gid-index",
        "0",
    ]);
    assert_eq!(
        v["rails"],
        serde_json::json!(["rxeA0:1", "rxeB1:1"]),
        "{v:#}"
    );
    assert_eq!(v["ports"][1]["excluded"], "not in --devices");
    assert_eq!(v["ports"][0]["gid"]["index"], 0);

    let v = json(&["--sysfs", sysfs.to_str().unwrap(), "--gid-index", "5"]);
    assert_eq!(v["transport"], "tcp", "{v:#}");
    assert!(
        v["reason"].as_str().unwrap().contains("no GID at index 5"),
        "{v:#}"
    );
}

#[test]
fn no_verbs_means_tcp_with_the_reason() {
    let sysfs = fixture("no-verbs");
    let v = json(&["--sysfs", sysfs.to_str().unwrap()]);
    assert_eq!(v["transport"], "tcp");
    let reason = v["reason"].as_str().expect("reason");
    assert!(
        reason.contains("kernel has no RDMA support (no /sys/class/infiniband_verbs)"),
        "{reason}"
    );
    assert_eq!(v["ports"].as_array().map(Vec::len), Some(0));

    let table = stdout(&devices(&["--sysfs", sysfs.to_str().unwrap()]));
    assert!(table.contains("no RDMA ports"), "{table}");
    assert!(
        table.contains("transport auto: tcp (RDMA unavailable: the kernel has no RDMA support"),
        "{table}"
    );
}

#[test]
fn gpu_memory_line_says_why_cuda_is_unusable() {
    if std::env::var_os("KVT_TEST_GPU").is_some() {
        return;
    }
    let sysfs = fixture("no-verbs");
    let table = stdout(&devices(&["--sysfs", sysfs.to_str().unwrap()]));
    assert!(
        table.contains(
            "GPU memory: CUDA unavailable (libcuda.so.1 not found (no NVIDIA driver on the loader \
             path)); GPU segments cannot be registered"
        ),
        "{table}"
    );
    let v = json(&["--sysfs", sysfs.to_str().unwrap()]);
    assert_eq!(v["gpu"]["available"], false);
    assert!(
        v["gpu"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("libcuda.so.1 not found")),
        "{v:#}"
    );
}

#[test]
fn this_hosts_sys_is_read_and_the_command_succeeds() {
    let table = stdout(&devices(&[]));
    assert!(table.contains("transport auto: "), "{table}");
    let v = json(&[]);
    assert!(v["transport"] == "rdma" || v["transport"] == "tcp", "{v:#}");
}

#[test]
fn a_sysfs_root_that_does_not_exist_is_an_error() {
    let out = devices(&["--sysfs", "/no/such/sysfs"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--sysfs /no/such/sysfs: not a directory"),
        "{err}"
    );
}
