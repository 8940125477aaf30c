//! The static library links beside libibverbs: `scripts/static-lib.sh` renames the verbs
//! loader's symbols in this build's `libkvtransfer.a`, and `tests/c/static_ibverbs.c` is
//! linked against it and the system's libibverbs, then run (see that file for what it
//! checks). Needs libibverbs-dev and binutils, which `scripts/setup.sh` installs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>/deps/libkvtransfer.a`, which `cargo test` builds with the other crate
/// types of `[lib]`.
fn archive() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let a = exe.parent().expect("deps/").join("libkvtransfer.a");
    assert!(a.is_file(), "no {} (cargo test builds it)", a.display());
    a
}

fn output_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Defined global symbols of an archive with a libibverbs/librdmacm/mlx5dv name.
fn verbs_names_defined(a: &Path) -> Vec<String> {
    output_of(Command::new("nm").args(["-g", "--defined-only"]).arg(a))
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|n| {
            let n = n.trim_start_matches('_');
            ["ibv_", "rdma_", "mlx5dv_"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_static_library_links_and_runs_beside_libibverbs() {
    assert!(
        Path::new("/usr/include/infiniband/verbs.h").is_file(),
        "libibverbs-dev is not installed (scripts/setup.sh installs it)"
    );
    let cargo_a = archive();
    // What the rename is for: cargo's archive carries the loader under libibverbs' names.
    assert!(
        !verbs_names_defined(&cargo_a).is_empty(),
        "cargo's archive defines no ibv_* name: is the rename still needed?"
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("static");
    output_of(
        Command::new("bash")
            .arg(root().join("scripts/static-lib.sh"))
            .arg("--from")
            .arg(&cargo_a)
            .arg("--out")
            .arg(&dir),
    );
    let ours = dir.join("libkvtransfer.a");
    assert_eq!(verbs_names_defined(&ours), Vec::<String>::new());

    let exe = dir.join("static_ibverbs");
    output_of(
        Command::new("cc")
            .args(["-std=c11", "-O2", "-g", "-Wall", "-Wextra", "-Werror"])
            .arg("-I")
            .arg(root().join("include"))
            .arg(root().join("tests/c/static_ibverbs.c"))
            .arg("-o")
            .arg(&exe)
            // Ours before libibverbs, the usual order. With cargo's own archive this links
            // too, but the program's ibv_* calls then land in our loader (checked in C).
            .arg(&ours)
            .arg("-libverbs")
            // What rustc's native-static-libs asks for.
            .args([
                "-ldl",
                "-lgcc_s",
                "-lutil",
                "-lrt",
                "-lpthread",
                "-lm",
                "-lc",
            ]),
    );
    let out = output_of(
        Command::new(&exe)
            .env_remove("KVT_TRANSPORT")
            .env_remove("KVT_LISTEN"),
    );
    eprintln!("{out}");
    assert!(out.contains("libibverbs (") && out.contains("verified 1048576 bytes"));
    assert!(out.contains("static_ibverbs.c: all checks passed"), "{out}");
}
