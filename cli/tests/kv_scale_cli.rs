//! `kvtransfer bench --kv MODEL --prefill-procs 2 --decode-procs 2 --inflight 1024`: rooms
//! across four processes, all in flight at once, succeed and verify, and the JSON report
//! carries the latencies and every process's threads and memory. Speed goals live in the
//! benchmark (docs/performance.md), not here.

// The integration tests' shared helpers live with the library's tests.
#[path = "../../tests/common/mod.rs"]
mod common;

use common::{bench, json_num as num};
use serde_json::Value;

/// Rooms in flight in the test run.
const ROOMS: u64 = 1024;

/// Checks one p50/p99/max latency object.
fn check_quantiles(v: &Value, field: &str) {
    let q = &v[field];
    let (p50, p99, max) = (num(q, "p50_us"), num(q, "p99_us"), num(q, "max_us"));
    assert!(
        0.0 <= p50 && p50 <= p99 && p99 <= max,
        "{field}: {q} in {v}"
    );
}

/// Checks one process's line: its rooms, threads and memory.
fn check_process(p: &Value) {
    assert!(p["role"] == "prefill" || p["role"] == "decode", "{p}");
    assert!(num(p, "rooms") > 0.0, "{p}");
    for f in ["threads_start", "threads_peak", "threads_end"] {
        assert!(num(p, f) > 0.0, "{f}: {p}");
    }
    assert!(num(p, "threads_peak") >= num(p, "threads_end"), "{p}");
    for f in ["rss_peak_mib", "rss_end_mib", "hwm_mib"] {
        assert!(num(p, f) > 0.0, "{f}: {p}");
    }
}

#[test]
fn rooms_in_flight_across_two_by_two_processes_succeed_and_verify() {
    let inflight = ROOMS.to_string();
    let (ok, stdout, stderr) = bench(&[
        "--kv",
        "deepseek-v3",
        "--prefill-procs",
        "2",
        "--decode-procs",
        "2",
        "--inflight",
        &inflight,
        "--transport",
        "tcp",
        "--json",
    ]);
    assert!(ok, "bench failed:\n{stdout}\n{stderr}");
    let line = stdout.trim();
    assert_eq!(line.lines().count(), 1, "one JSON object: {stdout}");
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));

    assert_eq!(v["transport"], "tcp", "{v}");
    assert_eq!(v["prefill_procs"], 2, "{v}");
    assert_eq!(v["decode_procs"], 2, "{v}");
    assert_eq!(v["inflight"], ROOMS, "{v}");
    assert_eq!(v["pages"], 32, "{v}");
    assert_eq!(v["rooms"], ROOMS, "{v}");
    assert_eq!(v["succeeded"], ROOMS, "{v}");
    assert_eq!(v["failures"], 0, "{v}");
    assert_eq!(v["mismatches"], 0, "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["verified_rooms"], ROOMS, "{v}");
    assert!(
        num(&v, "seconds") > 0.0 && num(&v, "rooms_per_s") > 0.0,
        "{v}"
    );
    for f in ["bootstrap_decode", "bootstrap_prefill", "room_latency"] {
        check_quantiles(&v, f);
    }

    let procs = v["processes"].as_array().expect("processes");
    assert_eq!(procs.len(), 4, "{v}");
    procs.iter().for_each(check_process);
    let rooms_of = |role: &str| -> f64 {
        procs
            .iter()
            .filter(|p| p["role"] == role)
            .map(|p| num(p, "rooms"))
            .sum()
    };
    // Every room has one decode and one prefill end.
    assert_eq!(rooms_of("decode"), ROOMS as f64, "{v}");
    assert_eq!(rooms_of("prefill"), ROOMS as f64, "{v}");
}

#[test]
fn bad_scale_options_are_refused() {
    let (ok, _, stderr) = bench(&[
        "--kv",
        "deepseek-v3",
        "--prefill-procs",
        "3",
        "--decode-procs",
        "2",
        "--inflight",
        "4",
    ]);
    assert!(!ok);
    assert!(stderr.contains("--inflight must be at least"), "{stderr}");
    let (ok, _, stderr) = bench(&[
        "--kv",
        "deepseek-v3",
        "--decode-procs",
        "1",
        "--page-bytes",
        "12",
    ]);
    assert!(!ok);
    assert!(stderr.contains("multiple of 8"), "{stderr}");
}
