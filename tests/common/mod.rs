//! Shared by the integration tests: `kvtransfer bench --role target` as a separate process,
//! running CLI subcommands against the sysfs fixture trees, and counting this process's
//! threads.

#![allow(dead_code)] // each test file uses part of it

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use kvtransfer::SegmentId;

/// The `kvtransfer` command: the one cargo built for this test when the test belongs to the
/// `kvtransfer-cli` package (`cli/tests/`), else the one beside this test's executable (the
/// guest's suite: `scripts/rdma-tests.sh` builds it first).
pub fn cli_bin() -> PathBuf {
    if let Some(bin) = option_env!("CARGO_BIN_EXE_kvtransfer") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/kvtransfer
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary lives in target/<profile>/deps")
        .join("kvtransfer");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p kvtransfer-cli)",
        bin.display()
    );
    bin
}

/// The repository root (the library's manifest directory; `cli/`'s parent for its tests).
pub fn repo_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if dir.join("tests/fixtures").is_dir() {
        dir
    } else {
        dir.parent()
            .expect("cli/ lives in the repository")
            .to_path_buf()
    }
}

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
    let mut child = Command::new(cli_bin())
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
    repo_root().join("tests/fixtures/sysfs").join(name)
}

/// Runs `kvtransfer <subcommand> <args>` with no `KVT_*` variable steering rails or transport.
pub fn run_cli(subcommand: &str, args: &[&str]) -> Output {
    Command::new(cli_bin())
        .arg(subcommand)
        .args(args)
        .env_remove("KVT_DEVICES")
        .env_remove("KVT_GID_INDEX")
        .env_remove("KVT_RAILS_PER_GPU")
        .env_remove("KVT_TRANSPORT")
        .output()
        .expect("run kvtransfer")
}

/// Runs `kvtransfer bench <args>` (as [`run_cli`]); returns its exit status, stdout and
/// stderr.
pub fn bench(args: &[&str]) -> (bool, String, String) {
    let out = run_cli("bench", args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Field `field` of a JSON report as a finite number; panics naming it otherwise.
pub fn json_num(v: &serde_json::Value, field: &str) -> f64 {
    let x = v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("field {field} missing or not a number in {v}"));
    assert!(x.is_finite(), "{field} = {x} in {v}");
    x
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

/// Streams `reqs` to `peer` batch after batch on `engine` until a submit or wait fails;
/// signals `first_done` after the first batch completed. Returns the batches completed.
fn stream_batches(
    engine: &kvtransfer::TransferEngine,
    peer: kvtransfer::PeerId,
    reqs: &[kvtransfer::Request],
    first_done: std::sync::mpsc::Sender<()>,
) -> u32 {
    let mut ok = 0u32;
    loop {
        let Ok(batch) = engine.submit(peer, reqs) else {
            return ok;
        };
        if engine.wait(batch).is_err() {
            return ok;
        }
        ok += 1;
        if ok == 1 {
            let _ = first_done.send(());
        }
    }
}

/// One round of the destroy guarantee. `streamer` connects to `other` and streams `reqs`
/// (built from the registered `mem` and the peer's segment by `requests`) from another
/// thread; once the first batch completed, `stop` ends the engine that registered `mem`
/// (dropping or shutting it down) while the stream may be in flight, and at once `mem` is
/// reused as `reuse` says. It must stay all zero after the stream has ended. Returns the
/// batches that completed.
fn stop_while_streaming(
    streamer: &kvtransfer::TransferEngine,
    other: std::net::SocketAddr,
    mem: *mut u8,
    len: usize,
    requests: impl FnOnce() -> Vec<kvtransfer::Request>,
    stop: impl FnOnce(),
    reuse: Reuse,
) -> Result<u32, String> {
    let peer = streamer.connect(other).map_err(|e| e.to_string())?;
    let reqs = requests();
    let (first_done, landed) = std::sync::mpsc::channel();
    let (first, batches) = std::thread::scope(|s| {
        let stream = s.spawn(|| stream_batches(streamer, peer, &reqs, first_done));
        let first = landed.recv_timeout(std::time::Duration::from_secs(30));
        stop();
        match reuse {
            Reuse::Remap => assert_eq!(map_anon(len, Some(mem)), mem),
            Reuse::Zero => {
                // SAFETY: the test's own mapping of `len` bytes; volatile, as a late write
                // would race it.
                (0..len).for_each(|i| unsafe { std::ptr::write_volatile(mem.add(i), 0) })
            }
        }
        (first, stream.join().unwrap())
    });
    let written = first_nonzero(mem, len);
    let _ = streamer.disconnect(peer);
    // SAFETY: the test's mapping; the engine that registered it has stopped.
    unsafe { libc::munmap(mem.cast(), len) };
    first.map_err(|_| "no batch completed before the stop".to_string())?;
    match written {
        Some(at) => Err(format!(
            "byte {at} of the reused memory was written after the stop ({reuse:?})"
        )),
        None => Ok(batches),
    }
}

/// The writing side: `target` registers fresh memory of `len` bytes, `initiator` streams
/// writes of `block` bytes from `src` into it, and `target` is dropped mid-stream.
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
    // SAFETY: `mem` stays mapped until `target`, which registered it, is dropped.
    let seg = unsafe { target.register_memory(mem, len) }.map_err(|e| e.to_string())?;
    let addr = target.local_addr();
    let requests = || {
        (0..len as u64 / block)
            .map(|i| Request::write(src.addr() + i * block, block, seg.id, i * block))
            .collect()
    };
    stop_while_streaming(initiator, addr, mem, len, requests, || drop(target), reuse)
}

/// The reading side: `reader` registers fresh memory of `len` bytes and streams READs of
/// `block` bytes from `source`'s `src` (all of whose bytes are non-zero) into it;
/// `reader.shutdown()` is called mid-stream, while the streaming thread may be inside `wait`
/// driving the connection itself.
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
    let requests = || {
        (0..len as u64 / block)
            .map(|i| Request::read(mem as u64 + i * block, block, src.segment(), i * block))
            .collect()
    };
    stop_while_streaming(
        reader,
        source.local_addr(),
        mem,
        len,
        requests,
        || reader.shutdown(),
        reuse,
    )
}

/// Threads of this process.
pub fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Waits (up to 10 s) until this process has `want` threads or fewer; returns what it last
/// saw. Threads that are about to exit (a handshake or connector thread whose work is done)
/// still count for a moment.
pub fn settle_threads(want: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = threads();
        if now <= want || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::yield_now();
    }
}

/// Runs the connecting side of the handshake over `s` by hand, as a peer speaking the
/// protocol would (with `secret`, if any); returns the engine's hello or why it failed.
pub fn raw_handshake(
    s: &mut std::net::TcpStream,
    hello: kvtransfer::wire::Hello,
    secret: Option<&[u8]>,
) -> Result<kvtransfer::wire::Hello, String> {
    use kvtransfer::wire::{self, Initiator, Secret, Step};
    use std::io::{Read, Write};
    let secret = secret.map(|b| Secret::new(b).unwrap());
    let (mut hs, first) = Initiator::start(secret, rand_nonce(), hello);
    s.write_all(&first).map_err(|e| e.to_string())?;
    let mut rx = Vec::new();
    loop {
        if let Some((kind, body, used)) =
            wire::next_message(&rx, hs.expects(), wire::MAX_HELLO_BODY)
                .map_err(|e| e.to_string())?
        {
            let step = hs.on_message(kind, body).map_err(|e| e.to_string())?;
            rx.drain(..used);
            match step {
                Step::Send(b) => s.write_all(&b).map_err(|e| e.to_string())?,
                Step::Done(h) => return Ok(h),
                Step::Refuse(b, e) => {
                    let _ = s.write_all(&b);
                    return Err(e.to_string());
                }
                Step::Answer(_) => unreachable!(),
            }
            continue;
        }
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => return Err("end of stream".into()),
            Ok(n) => rx.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A nonce good enough for tests (time and a counter).
fn rand_nonce() -> [u8; 32] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut n = [0u8; 32];
    n[..8].copy_from_slice(&t.to_le_bytes());
    n[8..16].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    n
}

/// A KV manager over `mem` as one buffer of 4 KiB pages, on TCP, with `secret` if any and a
/// 2 s connect timeout.
///
/// The caller keeps `mem` alive and unmoved until the manager is dropped.
pub fn kv_manager(
    role: kvtransfer::kv::KvRole,
    secret: Option<&str>,
    mem: &mut [u8],
) -> kvtransfer::kv::KvManager {
    use kvtransfer::kv::{KvBuffer, KvConfig, KvLayout, KvManager};
    use kvtransfer::{EngineConfig, TransportKind};
    kvtransfer::init_logging("error");
    let layout = KvLayout::new(
        vec![KvBuffer {
            addr: mem.as_mut_ptr() as u64,
            len: mem.len() as u64,
            item_len: 4096,
        }],
        Vec::new(),
    )
    .unwrap();
    let cfg = KvConfig {
        connect_timeout: std::time::Duration::from_secs(2),
        ..KvConfig::new(role)
    };
    let mut b = EngineConfig::builder().transport(TransportKind::Tcp);
    if let Some(s) = secret {
        b = b.secret(s);
    }
    // SAFETY: the caller keeps `mem` alive and unmoved until the manager is dropped.
    unsafe { KvManager::new(b.build().unwrap(), cfg, layout).unwrap() }
}

/// Waits (yielding, at most 30 s) until `f` holds; panics naming `what` otherwise.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

/// A hello of engine `(engine_id, epoch)` for a connection of `purpose`: no segments, TCP.
pub fn tcp_hello(
    engine_id: u64,
    epoch: u64,
    purpose: kvtransfer::wire::ConnPurpose,
) -> kvtransfer::wire::Hello {
    kvtransfer::wire::Hello {
        engine_id,
        epoch,
        purpose,
        conn_index: 0,
        token: 0,
        segments: Vec::new(),
        endpoints: vec![kvtransfer::wire::Endpoint {
            transport: kvtransfer::wire::TransportId::Tcp,
            data: Vec::new(),
        }],
    }
}
