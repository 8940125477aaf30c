//! The committed C header, `include/kvtransfer.h`, is exactly what cbindgen makes of
//! `src/ffi/` with `cbindgen.toml` now. `KVT_BLESS=1 cargo test --test c_header` rewrites it.

use std::path::{Path, PathBuf};

const REGENERATE: &str = "KVT_BLESS=1 cargo test --test c_header";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn header_path() -> PathBuf {
    root().join("include/kvtransfer.h")
}

/// The header as cbindgen generates it from `src/ffi/mod.rs` and the modules it declares.
fn generate() -> String {
    let config = cbindgen::Config::from_file(root().join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("cbindgen.toml: {e}"));
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root().join("src/ffi/mod.rs"))
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen failed on src/ffi: {e}"));
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("cbindgen writes UTF-8")
}

/// Where two texts first differ: (1-based line, committed line, generated line).
fn first_difference<'a>(committed: &'a str, generated: &'a str) -> (usize, &'a str, &'a str) {
    let (mut a, mut b) = (committed.lines(), generated.lines());
    let mut line = 1;
    loop {
        match (a.next(), b.next()) {
            (Some(x), Some(y)) if x == y => line += 1,
            (x, y) => {
                return (
                    line,
                    x.unwrap_or("<end of file>"),
                    y.unwrap_or("<end of file>"),
                );
            }
        }
    }
}

#[test]
fn committed_header_is_current() {
    let generated = generate();
    let path = header_path();
    if std::env::var_os("KVT_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("c_header: wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let (line, old, new) = first_difference(&committed, &generated);
        panic!(
            "include/kvtransfer.h is stale: it is not what cbindgen generates from src/ffi/.\n\
             First difference at line {line}:\n  committed: {old}\n  generated: {new}\n\
             Regenerate it with `{REGENERATE}` and commit the result."
        );
    }
}

/// Every function and constant of the agreed ABI (the spec shared with the Python package)
/// is in the header, so a rename or a lost `#[no_mangle]` shows up here and not in a caller.
#[test]
fn header_declares_the_agreed_abi() {
    let header = generate();
    let functions = [
        "kvt_abi_version",
        "kvt_last_error_message",
        "kvt_engine_create",
        "kvt_engine_destroy",
        "kvt_engine_local_addr",
        "kvt_engine_transport",
        "kvt_engine_register",
        "kvt_engine_unregister",
        "kvt_engine_connect",
        "kvt_engine_resolve_remote",
        "kvt_batch_submit",
        "kvt_batch_poll",
        "kvt_batch_wait",
        "kvt_batch_release",
        "kvt_transfer_sync_write",
        "kvt_transfer_submit_write",
        "kvt_kv_manager_create",
        "kvt_kv_manager_destroy",
        "kvt_kv_manager_bootstrap_addr",
        "kvt_kv_sender_create",
        "kvt_kv_sender_init",
        "kvt_kv_sender_send",
        "kvt_kv_sender_poll",
        "kvt_kv_sender_failure_reason",
        "kvt_kv_sender_abort",
        "kvt_kv_sender_metrics",
        "kvt_kv_sender_destroy",
        "kvt_kv_receiver_create",
        "kvt_kv_receiver_init",
        "kvt_kv_receiver_poll",
        "kvt_kv_receiver_failure_reason",
        "kvt_kv_receiver_abort",
        "kvt_kv_receiver_metrics",
        "kvt_kv_receiver_destroy",
    ];
    for f in functions {
        assert!(header.contains(&format!(" {f}(")), "{f} is not declared");
    }
    let constants = [
        ("KVT_ABI_VERSION", 1),
        ("KVT_TRANSPORT_AUTO", 0),
        ("KVT_TRANSPORT_TCP", 1),
        ("KVT_TRANSPORT_RDMA", 2),
        ("KVT_OP_WRITE", 0),
        ("KVT_OP_READ", 1),
        ("KVT_BATCH_PENDING", 0),
        ("KVT_BATCH_DONE", 1),
        ("KVT_BATCH_FAILED", 2),
        ("KVT_ROLE_PREFILL", 0),
        ("KVT_ROLE_DECODE", 1),
        ("KVT_POLL_FAILED", 0),
        ("KVT_POLL_BOOTSTRAPPING", 1),
        ("KVT_POLL_WAITING_FOR_INPUT", 2),
        ("KVT_POLL_TRANSFERRING", 3),
        ("KVT_POLL_SUCCESS", 4),
        ("KVT_OK", 0),
        ("KVT_ERR_INVALID_ARGUMENT", -2),
        ("KVT_ERR_PANIC", -20),
    ];
    for (name, value) in constants {
        let line = format!("#define {name} {value}\n");
        assert!(header.contains(&line), "missing `{}`", line.trim_end());
    }
    for t in [
        "typedef struct kvt_engine kvt_engine;",
        "typedef struct kvt_kv_manager kvt_kv_manager;",
        "typedef struct kvt_kv_sender kvt_kv_sender;",
        "typedef struct kvt_kv_receiver kvt_kv_receiver;",
        "typedef struct kvt_engine_config {",
        "typedef struct kvt_request {",
        "typedef struct kvt_kv_buffer {",
        "typedef struct kvt_kv_config {",
        "typedef struct kvt_room_metrics {",
    ] {
        assert!(header.contains(t), "missing `{t}`");
    }
    // Only the C ABI: nothing else of the crate leaks in.
    assert!(
        !header.contains("MAX_CHUNKS"),
        "crate constants leaked into the header"
    );
}

#[test]
fn first_difference_points_at_the_line() {
    assert_eq!(first_difference("a\nb\nc", "a\nx\nc"), (2, "b", "x"));
    assert_eq!(first_difference("a\n", "a\nb\n"), (2, "<end of file>", "b"));
}
