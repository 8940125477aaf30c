//! Shared by the integration tests: `kvtransfer bench --role target` as a separate process.

#![allow(dead_code)] // each test file uses part of it

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

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
