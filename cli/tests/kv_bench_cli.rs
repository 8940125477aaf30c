//! `kvtransfer bench --kv`: the CLI runs KV rooms end to end and reports sane JSON.

// The integration tests' shared helpers live with the library's tests.
#[path = "../../tests/common/mod.rs"]
mod common;

use common::{bench, json_num as num};
use serde_json::Value;

#[test]
fn deepseek_rooms_report_json_and_verify() {
    let (ok, stdout, stderr) = bench(&[
        "--kv",
        "deepseek-v3",
        "--pages",
        "16",
        "--rooms",
        "3",
        "--json",
        "--transport",
        "tcp",
    ]);
    assert!(ok, "bench failed:\n{stdout}\n{stderr}");
    let line = stdout.trim();
    assert_eq!(line.lines().count(), 1, "one JSON object: {stdout}");
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));

    assert_eq!(v["model"], "deepseek-v3");
    assert_eq!(v["transport"], "tcp");
    assert_eq!(v["rooms"], 3);
    assert_eq!(v["pages"], 16);
    assert_eq!(v["chunks"], 4);
    assert_eq!(v["buffers"], 61);
    assert_eq!(v["bytes_per_room"], 61 * 16 * 36 * 1024);
    assert_eq!(v["verified"], true);
    // Every page of the first and last room, in every buffer.
    assert_eq!(v["verified_rooms"], 2);
    assert_eq!(v["verified_pages"], 2 * 16 * 61);

    let (seconds, rooms_per_s, gbps) =
        (num(&v, "seconds"), num(&v, "rooms_per_s"), num(&v, "gbps"));
    assert!(seconds > 0.0 && gbps > 0.0 && rooms_per_s > 0.0, "{v}");
    let expect_gbps = 3.0 * num(&v, "bytes_per_room") / seconds / 1e9;
    assert!((gbps - expect_gbps).abs() <= 1e-6 * expect_gbps, "{v}");
    assert!(
        (rooms_per_s - 3.0 / seconds).abs() <= 1e-6 * rooms_per_s,
        "{v}"
    );
    let (p50, p99) = (num(&v, "latency_p50_us"), num(&v, "latency_p99_us"));
    assert!(p50 > 0.0 && p50 <= p99, "{v}");
    assert!(p99 <= num(&v, "latency_max_us"), "{v}");
    // A room's latency cannot exceed all of the measured time.
    assert!(p99 <= seconds * 1e6 * 1.01 + 1.0, "{v}");
    // At least one write per buffer per room.
    assert!(num(&v, "slices_per_room") >= 61.0, "{v}");
}

#[test]
fn bad_kv_options_are_refused() {
    let (ok, _, stderr) = bench(&["--kv", "deepseek-v3", "--pages", "2", "--chunks", "3"]);
    assert!(!ok);
    assert!(stderr.contains("--chunks must be in 1..=2"), "{stderr}");
    let (ok, _, stderr) = bench(&["--kv", "gpt-2", "--pages", "2"]);
    assert!(!ok);
    assert!(stderr.contains("invalid value 'gpt-2'"), "{stderr}");
    let (ok, _, stderr) = bench(&["--pages", "2"]);
    assert!(!ok, "KV options need --kv");
    assert!(stderr.contains("--kv"), "{stderr}");
    let (ok, _, stderr) = bench(&["--kv", "llama-70b-tp8", "--role", "target"]);
    assert!(!ok);
    assert!(stderr.contains("--role loopback"), "{stderr}");
}

/// Regression: 8 KiB pages over TCP leave part of the next frame header buffered after a small
/// frame, which once overflowed the frame reader's arithmetic (panic in debug, a bad slice in
/// release).
#[test]
fn llama_rooms_with_small_pages_verify() {
    let (ok, stdout, stderr) = bench(&[
        "--kv",
        "llama-70b-tp8",
        "--pages",
        "64",
        "--rooms",
        "5",
        "--json",
        "--transport",
        "tcp",
    ]);
    assert!(ok, "bench failed:\n{stdout}\n{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["buffers"], 160);
    assert_eq!(v["verified"], true);
    assert!(num(&v, "gbps") > 0.0, "{v}");
}
