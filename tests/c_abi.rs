//! C programs against the C ABI: each is compiled with the system `cc` against
//! `include/kvtransfer.h` and the cdylib (`libkvtransfer.so`), run, and checked for exit
//! status 0 and the lines it prints.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>/`: the test executable lives in its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// The directory holding a current `libkvtransfer.so`.
///
/// `cargo test` compiles the library with every crate type of `[lib]`, cdylib included, into
/// `target/<profile>/deps/`, but only `cargo build` copies it up to `target/<profile>/`, where
/// it may be stale. So `deps/` comes first; without either, the test builds the library.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let profile = profile_dir();
        for dir in [profile.join("deps"), profile.clone()] {
            if dir.join("libkvtransfer.so").is_file() {
                return dir;
            }
        }
        let name = profile
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let cargo_profile = if name == "debug" { "dev" } else { name };
        let target_dir = profile.parent().expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--lib", "--profile", cargo_profile, "--target-dir"])
            .arg(target_dir)
            .current_dir(root())
            .status()
            .expect("run cargo build --lib");
        assert!(status.success(), "cargo build --lib failed");
        assert!(
            profile.join("libkvtransfer.so").is_file(),
            "no libkvtransfer.so after build"
        );
        profile
    })
}

/// Compiles `source` (relative to the repository root) into an executable named `name`.
fn compile(source: &str, name: &str) -> PathBuf {
    let lib = lib_dir();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let mut rpath = std::ffi::OsString::from("-Wl,-rpath,");
    rpath.push(lib);
    let output = Command::new("cc")
        .args(["-std=c11", "-O2", "-g"])
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join(source))
        .arg("-o")
        .arg(&out)
        .arg("-L")
        .arg(lib)
        .arg("-lkvtransfer")
        .arg(rpath)
        .output()
        .expect("run cc (gcc is installed by scripts/setup.sh)");
    assert!(
        output.status.success(),
        "cc {source} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Runs a compiled program; returns its stdout after checking it exited with 0.
fn run(exe: &Path, args: &[&str]) -> String {
    let output = Command::new(exe)
        .args(args)
        // cargo puts target/<profile>/ on LD_LIBRARY_PATH for tests, which outranks the
        // program's rpath (DT_RUNPATH) and may hold an older libkvtransfer.so.
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("KVT_LISTEN")
        .env_remove("KVT_TRANSPORT")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("--- {} stdout\n{stdout}--- stderr\n{stderr}", exe.display());
    assert!(
        output.status.success(),
        "{} exited with {}",
        exe.display(),
        output.status
    );
    stdout
}

#[test]
fn engine_batches_and_errors_from_c() {
    let exe = compile("tests/c/engine.c", "engine");
    let out = run(&exe, &[]);
    for line in [
        "write batch: verified 4194304 bytes",
        "read batch: verified 4194304 bytes",
        "address writes: verified 300003 bytes twice",
        "expected error KVT_ERR_INVALID_ARGUMENT: invalid argument: e is NULL",
        "expected error KVT_ERR_UNREGISTERED_ADDRESS: local memory",
        "expected error KVT_ERR_INVALID_ARGUMENT: invalid argument: cfg->struct_size is 0",
        "write to a destroyed peer fails: -",
        "engine.c: all checks passed",
    ] {
        assert!(out.contains(line), "missing {line:?} in the output");
    }
}

#[test]
fn prefill_decode_example_moves_a_room_and_verifies_it() {
    let exe = compile("examples/c/prefill_decode.c", "prefill_decode");
    let out = run(&exe, &[]);
    // 61 layers x 256 pages x 36 KiB, plus one 4 KiB aux slot.
    let bytes = 61 * 256 * 36 * 1024 + 4096;
    assert!(
        out.contains(&format!(
            "verified {bytes} bytes: 256 pages x 61 layers and the aux slot"
        )),
        "no verification line"
    );
    // "room 42: 549.0 MiB in N writes, T ms = R GB/s (...)"
    let rate: f64 = out
        .lines()
        .find(|l| l.starts_with("room 42: 549.0 MiB in "))
        .and_then(|l| l.split_once(" = ")?.1.split_once(" GB/s"))
        .and_then(|(r, _)| r.parse().ok())
        .expect("a line with the room's GB/s");
    assert!(rate > 0.0, "{rate} GB/s");
}

#[test]
fn kv_rooms_and_errors_from_c() {
    let exe = compile("tests/c/kv.c", "kv");
    let out = run(&exe, &[]);
    for line in [
        "room 1: 41024 bytes verified",
        "expected error KVT_ERR_DUPLICATE_ROOM: room 2 already exists",
        "expected error KVT_ERR_INVALID_PAGES: room 2: invalid pages",
        "aborted room: receiver says: ",
        "unreachable prefill side: ",
        "create + init against a silent listener: ",
        "silent listener: kind 3 while 1 after ",
        "kv.c: all checks passed",
    ] {
        assert!(out.contains(line), "missing {line:?} in the output");
    }
}

/// The fenced ` ```c ` blocks of the README and of `docs/*.md`, with the file each is in.
fn c_samples() -> Vec<(String, String)> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("a docs entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("a readable guide");
        let mut block: Option<String> = None;
        for line in text.lines() {
            match &mut block {
                None if line.trim_end() == "```c" => block = Some(String::new()),
                Some(b) if line.trim_end() == "```" => {
                    out.push((f.display().to_string(), std::mem::take(b)));
                    block = None;
                }
                Some(b) => {
                    b.push_str(line);
                    b.push('\n');
                }
                None => {}
            }
        }
    }
    out
}

#[test]
fn the_c_samples_of_the_docs_compile_and_run() {
    let samples = c_samples();
    assert!(!samples.is_empty(), "docs/c-abi.md has a C sample");
    for (i, (file, code)) in samples.iter().enumerate() {
        let source = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("doc_sample_{i}.c"));
        std::fs::write(&source, code).unwrap();
        eprintln!("C sample {i} of {file}");
        // `compile` joins the root with an absolute path, which gives the path itself.
        let exe = compile(source.to_str().unwrap(), &format!("doc_sample_{i}"));
        run(&exe, &[]);
    }
}
