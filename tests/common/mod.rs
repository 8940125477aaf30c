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

/// Anonymous private memory of `len` bytes; with `at`, exactly there, replacing the test's own
/// mapping (as an allocator reuses an address).
pub fn map_anon(len: usize, at: Option<*mut u8>) -> *mut u8 {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | at.map_or(0, |_| libc::MAP_FIXED);
    // SAFETY: an anonymous private mapping; with MAP_FIXED it replaces the test's own mapping
    // at `at`, which no Rust reference points into.
    let p = unsafe {
        libc::mmap(
            at.map_or(std::ptr::null_mut(), |p| p.cast()),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p.cast()
}

/// The first non-zero byte of the `len` bytes at `p`, read with volatile loads (another
/// thread could be writing them if a guarantee were broken).
pub fn first_nonzero(p: *const u8, len: usize) -> Option<usize> {
    // SAFETY: the callers pass a live mapping of `len` bytes that they own.
    (0..len).find(|&i| unsafe { std::ptr::read_volatile(p.add(i)) } != 0)
}

/// How the caller reuses memory right after the engine that registered it is dropped.
#[derive(Clone, Copy, Debug)]
pub enum Reuse {
    /// Unmap it and map fresh memory at the same address (an allocator returning pages to
    /// the kernel and getting others). Over RDMA a late write would land in the old pinned
    /// pages, not the fresh ones, so this catches TCP's late writes only.
    Remap,
    /// Keep the pages and zero them (an allocator handing the same pages out again): catches
    /// late writes on every transport.
    Zero,
}

/// One round of the destroy guarantee: `target` registers fresh memory of `len` bytes,
/// `initiator` streams writes of `block` bytes into it from another thread, and once the
/// first batch landed `target` is dropped; at once the memory is reused as `reuse` says, and
/// it must stay all zero after the stream has ended. Returns the batches that completed
/// before the drop.
pub fn destroy_while_streaming(
    initiator: &kvtransfer::TransferEngine,
    src: &kvtransfer::HostBuffer,
    target: kvtransfer::TransferEngine,
    len: usize,
    block: u64,
    reuse: Reuse,
) -> Result<u32, String> {
    use kvtransfer::Request;
    let mem = map_anon(len, None);
    // SAFETY: `mem` stays mapped until `target`, which registered it, is dropped below.
    let seg = unsafe { target.register_memory(mem, len) }.map_err(|e| e.to_string())?;
    let peer = initiator
        .connect(target.local_addr())
        .map_err(|e| e.to_string())?;
    let reqs: Vec<Request> = (0..len as u64 / block)
        .map(|i| Request::write(src.addr() + i * block, block, seg.id, i * block))
        .collect();
    let (first_done, landed) = std::sync::mpsc::channel();
    let (fresh, batches) = std::thread::scope(|s| {
        let streamer = s.spawn(|| {
            let mut ok = 0u32;
            loop {
                let Ok(batch) = initiator.submit(peer, &reqs) else {
                    return ok;
                };
                if initiator.wait(batch).is_err() {
                    return ok;
                }
                ok += 1;
                if ok == 1 {
                    let _ = first_done.send(());
                }
            }
        });
        let first = landed.recv_timeout(std::time::Duration::from_secs(30));
        drop(target);
        let fresh = match reuse {
            Reuse::Remap => map_anon(len, Some(mem)),
            Reuse::Zero => {
                // SAFETY: the test's own mapping of `len` bytes; volatile, as a late write
                // would race it.
                (0..len).for_each(|i| unsafe { std::ptr::write_volatile(mem.add(i), 0) });
                mem
            }
        };
        let batches = streamer.join().unwrap();
        (first.map(|_| fresh), batches)
    });
    let fresh = fresh.map_err(|_| "no batch landed before the drop".to_string())?;
    assert_eq!(fresh, mem);
    let written = first_nonzero(fresh, len);
    let _ = initiator.disconnect(peer);
    // SAFETY: the test's mapping, registered nowhere any more.
    unsafe { libc::munmap(fresh.cast(), len) };
    match written {
        Some(at) => Err(format!(
            "byte {at} of the reused memory was written after the drop ({reuse:?})"
        )),
        None => Ok(batches),
    }
}

/// The reading side of the destroy guarantee: `reader` registers fresh memory of `len` bytes
/// and streams READs of `block` bytes from `source` (all of whose bytes are non-zero) into it
/// from another thread; once the first batch landed, `reader.shutdown()` is called from this
/// one, while the streaming thread may be inside `wait` driving the connection itself. At
/// once the memory is reused as `reuse` says; it must stay all zero after the stream ended.
pub fn shutdown_while_reading(
    reader: &kvtransfer::TransferEngine,
    source: &kvtransfer::TransferEngine,
    src: &kvtransfer::HostBuffer,
    len: usize,
    block: u64,
    reuse: Reuse,
) -> Result<u32, String> {
    use kvtransfer::Request;
    let mem = map_anon(len, None);
    // SAFETY: `mem` stays mapped until after `reader` shut down (and is then only reused).
    unsafe { reader.register_memory(mem, len) }.map_err(|e| e.to_string())?;
    let peer = reader
        .connect(source.local_addr())
        .map_err(|e| e.to_string())?;
    let reqs: Vec<Request> = (0..len as u64 / block)
        .map(|i| Request::read(mem as u64 + i * block, block, src.segment(), i * block))
        .collect();
    let (first_done, landed) = std::sync::mpsc::channel();
    let (first, batches) = std::thread::scope(|s| {
        let streamer = s.spawn(|| {
            let mut ok = 0u32;
            loop {
                let Ok(batch) = reader.submit(peer, &reqs) else {
                    return ok;
                };
                if reader.wait(batch).is_err() {
                    return ok;
                }
                ok += 1;
                if ok == 1 {
                    let _ = first_done.send(());
                }
            }
        });
        let first = landed.recv_timeout(std::time::Duration::from_secs(30));
        reader.shutdown();
        match reuse {
            Reuse::Remap => {
                map_anon(len, Some(mem));
            }
            Reuse::Zero => {
                // SAFETY: the test's own mapping of `len` bytes; volatile, as a late write
                // would race it.
                (0..len).for_each(|i| unsafe { std::ptr::write_volatile(mem.add(i), 0) })
            }
        }
        (first, streamer.join().unwrap())
    });
    first.map_err(|_| "no batch landed before the shutdown".to_string())?;
    let written = first_nonzero(mem, len);
    // SAFETY: the test's mapping; the engine that registered it has shut down.
    unsafe { libc::munmap(mem.cast(), len) };
    match written {
        Some(at) => Err(format!(
            "byte {at} of the reused memory was written after shutdown ({reuse:?})"
        )),
        None => Ok(batches),
    }
}
