//! Shared by the integration tests: `kvtransfer bench --role target` as a separate process,
//! and running CLI subcommands against the sysfs fixture trees.

#![allow(dead_code)] // each test file uses part of it

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use kvtransfer::SegmentId;

/// A target process; killed when dropped.
pub struct Target {
    /// The process (tests kill or stop it on purpose).
    pub child: Child,
    /// Its bootstrap address.
    pub addr: String,
    /// The segment it serves.
    pub segment: SegmentId,
    /// That segment's length.
    pub len: u64,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kvtransfer bench --role target` on `transport` with a `buffer` buffer (like `64M`)
/// and the extra environment `env`, and reads the JSON line it prints.
pub fn spawn_target(transport: &str, buffer: &str, env: &[(&str, String)]) -> Target {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvtransfer"))
        .args([
            "bench",
            "--role",
            "target",
            "--transport",
            transport,
            "--buffer-size",
            buffer,
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start kvtransfer target");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("target's first line");
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    Target {
        child,
        addr: v["listening"].as_str().expect("listening").to_string(),
        segment: SegmentId(v["segment"].as_u64().expect("segment") as u32),
        len: v["len"].as_u64().expect("len"),
    }
}

/// The sysfs fixture tree `name` under `tests/fixtures/sysfs`.
pub fn sysfs_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysfs")
        .join(name)
}

/// Runs `kvtransfer <subcommand> <args>` with no `KVT_*` variable steering rails or transport.
pub fn run_cli(subcommand: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvtransfer"))
        .arg(subcommand)
        .args(args)
        .env_remove("KVT_DEVICES")
        .env_remove("KVT_GID_INDEX")
        .env_remove("KVT_RAILS_PER_GPU")
        .env_remove("KVT_TRANSPORT")
        .output()
        .expect("run kvtransfer")
}

/// The stdout of a CLI run that must have succeeded without a panic.
pub fn cli_stdout(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}
