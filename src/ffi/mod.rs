//! The C ABI: `kvt_*` functions over opaque handles, declared in `include/kvtransfer.h`.
//!
//! The header is generated from this module by cbindgen (`cbindgen.toml` at the repository
//! root) and committed; `tests/c_header.rs` fails when it is stale, and
//! `KVT_BLESS=1 cargo test --test c_header` rewrites it.
//!
//! Conventions, the same for every function:
//! - The return value is an `int32_t` status: [`KVT_OK`] (0) on success, otherwise the negated
//!   stable [`Error::code`](crate::Error::code) (the `KVT_ERR_*` constants).
//! - Out-parameters are written only on success.
//! - A NULL (or misaligned) handle or pointer argument fails with [`KVT_ERR_INVALID_ARGUMENT`].
//! - A Rust panic never crosses the boundary: it is caught and returned as [`KVT_ERR_PANIC`].
//! - [`kvt_last_error_message`] describes the calling thread's last failure; it is "" after a
//!   call that succeeded.
//! - Config structs start with `uint32_t struct_size`, which the caller sets to `sizeof`; the
//!   library reads only the fields that size covers, and zero or NULL fields mean "default"
//!   (defaults include the `KVT_*` environment overrides).
//!
//! - The library leaves signal handling alone: its socket writes use `MSG_NOSIGNAL`, so a peer
//!   that goes away mid-write is an error (`PeerLost`), never a SIGPIPE, whatever the
//!   program's SIGPIPE set-up.
//!
//! Handles are `Box`ed Rust values behind pointers; each `*_create` has a `*_destroy`, which
//! accepts NULL. All the `unsafe` code of the crate's C surface lives here.

// Types carry their C names (`kvt_engine`, ...), as the header spells them.
#![allow(non_camel_case_types)]

mod boundary;
mod pointers;
mod versioned;

// The ABI proper, in the order the header lists it (cbindgen follows declaration order).
pub mod engine;

pub mod batch;

pub mod kv;

pub mod room;

pub mod metrics;

use std::ffi::c_char;

/// Version of this C ABI; it changes when a function or struct changes incompatibly.
pub const KVT_ABI_VERSION: u32 = 1;

/// Status of a successful call.
pub const KVT_OK: i32 = 0;
/// A configuration value is invalid.
pub const KVT_ERR_INVALID_CONFIG: i32 = -1;
/// An argument is invalid: NULL, misaligned, a bad enum value, a buffer too small.
pub const KVT_ERR_INVALID_ARGUMENT: i32 = -2;
/// A request or registration has zero length.
pub const KVT_ERR_ZERO_LENGTH: i32 = -3;
/// A registration overlaps a registered segment.
pub const KVT_ERR_OVERLAPPING_REGISTRATION: i32 = -4;
/// A local address range is not inside one registered segment.
pub const KVT_ERR_UNREGISTERED_ADDRESS: i32 = -5;
/// No segment with this id exists (locally, or at the peer).
pub const KVT_ERR_UNKNOWN_SEGMENT: i32 = -6;
/// A remote range falls outside the peer's segment.
pub const KVT_ERR_REMOTE_OUT_OF_RANGE: i32 = -7;
/// A segment cannot be unregistered while transfers use it.
pub const KVT_ERR_SEGMENT_BUSY: i32 = -8;
/// No peer with this handle is known.
pub const KVT_ERR_UNKNOWN_PEER: i32 = -9;
/// No batch with this id is known (never submitted, or released).
pub const KVT_ERR_UNKNOWN_BATCH: i32 = -10;
/// The connection to a peer was lost.
pub const KVT_ERR_PEER_LOST: i32 = -11;
/// A deadline passed.
pub const KVT_ERR_TIMEOUT: i32 = -12;
/// A batch failed; the message says which slice and why.
pub const KVT_ERR_BATCH_FAILED: i32 = -13;
/// The peer refused a request.
pub const KVT_ERR_REMOTE_REJECTED: i32 = -14;
/// Malformed protocol data.
pub const KVT_ERR_PROTOCOL: i32 = -15;
/// The handshake with a peer failed.
pub const KVT_ERR_HANDSHAKE: i32 = -16;
/// The requested transport is unavailable here.
pub const KVT_ERR_TRANSPORT_UNAVAILABLE: i32 = -17;
/// The engine is shutting down.
pub const KVT_ERR_SHUTDOWN: i32 = -18;
/// An operating-system call failed.
pub const KVT_ERR_IO: i32 = -19;
/// A Rust panic was caught at the boundary; destroy the handle involved.
pub const KVT_ERR_PANIC: i32 = -20;
/// rdma-core's `libibverbs.so.1` is not installed.
pub const KVT_ERR_RDMA_CORE_MISSING: i32 = -21;
/// The kernel has no RDMA support.
pub const KVT_ERR_RDMA_KERNEL_MISSING: i32 = -22;
/// No usable RDMA device.
pub const KVT_ERR_NO_RDMA_DEVICE: i32 = -23;
/// An RDMA port is not active.
pub const KVT_ERR_PORT_DOWN: i32 = -24;
/// A verbs call failed.
pub const KVT_ERR_VERBS: i32 = -25;
/// No room with this id exists.
pub const KVT_ERR_UNKNOWN_ROOM: i32 = -26;
/// A room with this id is already live.
pub const KVT_ERR_DUPLICATE_ROOM: i32 = -27;
/// Page indices of a room are unusable.
pub const KVT_ERR_INVALID_PAGES: i32 = -28;
/// The two sides' KV layouts cannot be paired.
pub const KVT_ERR_LAYOUT_MISMATCH: i32 = -29;
/// The room failed.
pub const KVT_ERR_ROOM_FAILED: i32 = -30;
/// The operation does not fit the room's current state.
pub const KVT_ERR_ROOM_STATE: i32 = -31;
/// CUDA is unavailable (no driver library, no GPU, driver too old); GPU memory cannot be
/// registered.
pub const KVT_ERR_CUDA_UNAVAILABLE: i32 = -32;
/// A CUDA driver call failed.
pub const KVT_ERR_CUDA: i32 = -33;
/// No segment the peer registered covers the given peer address.
pub const KVT_ERR_REMOTE_UNREGISTERED: i32 = -34;
/// The peer does not share the cluster secret (one side holds none, or they differ).
pub const KVT_ERR_UNAUTHENTICATED: i32 = -35;

/// The version of the C ABI this library implements; compare it with the header's
/// `KVT_ABI_VERSION` at start-up.
#[unsafe(no_mangle)]
pub extern "C" fn kvt_abi_version() -> u32 {
    KVT_ABI_VERSION
}

/// The calling thread's last error message: NUL-terminated, "" when the last `kvt_*` call on
/// this thread succeeded. The pointer stays valid until the next `kvt_*` call on this thread;
/// copy the text to keep it. Calling this function does not change the message.
#[unsafe(no_mangle)]
pub extern "C" fn kvt_last_error_message() -> *const c_char {
    boundary::last_error_ptr()
}

/// Installs a log subscriber that writes to stderr with `filter` (a `tracing` filter such as
/// `"info"` or `"kvtransfer=debug"`); NULL means `KVT_LOG`, else `"warn"`. `RUST_LOG` wins when
/// set. Does nothing if a subscriber is already installed.
///
/// # Safety
/// `filter` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_init_logging(filter: *const c_char) -> i32 {
    boundary::guard(|| {
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let filter = match unsafe { pointers::opt_c_str(filter, "filter") }? {
            Some(f) => f.to_string(),
            None => std::env::var("KVT_LOG").unwrap_or_else(|_| "warn".to_string()),
        };
        crate::init_logging(&filter);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use std::ffi::CStr;

    /// The `KVT_ERR_*` constants are the negated stable codes, one per `Error` variant.
    #[test]
    fn error_constants_match_error_codes() {
        let io = || std::io::Error::other("x");
        let pairs: Vec<(i32, Error)> = vec![
            (
                KVT_ERR_INVALID_CONFIG,
                Error::InvalidConfig {
                    field: "f".into(),
                    reason: "r".into(),
                },
            ),
            (KVT_ERR_INVALID_ARGUMENT, Error::InvalidArgument("x".into())),
            (KVT_ERR_ZERO_LENGTH, Error::ZeroLength { what: "request" }),
            (
                KVT_ERR_OVERLAPPING_REGISTRATION,
                Error::OverlappingRegistration {
                    addr: 0,
                    len: 1,
                    existing: 0,
                    existing_addr: 0,
                    existing_len: 1,
                },
            ),
            (
                KVT_ERR_UNREGISTERED_ADDRESS,
                Error::UnregisteredAddress { addr: 0, len: 1 },
            ),
            (
                KVT_ERR_UNKNOWN_SEGMENT,
                Error::UnknownSegment { segment: 1 },
            ),
            (
                KVT_ERR_REMOTE_OUT_OF_RANGE,
                Error::RemoteOutOfRange {
                    segment: 1,
                    offset: 0,
                    len: 1,
                    segment_len: 0,
                },
            ),
            (
                KVT_ERR_SEGMENT_BUSY,
                Error::SegmentBusy {
                    segment: 1,
                    in_flight: 1,
                },
            ),
            (KVT_ERR_UNKNOWN_PEER, Error::UnknownPeer { peer: 1 }),
            (KVT_ERR_UNKNOWN_BATCH, Error::UnknownBatch { batch: 1 }),
            (
                KVT_ERR_PEER_LOST,
                Error::PeerLost {
                    peer: "p".into(),
                    epoch: 1,
                    reason: "r".into(),
                },
            ),
            (
                KVT_ERR_TIMEOUT,
                Error::Timeout {
                    what: "w".into(),
                    after_ms: 1,
                },
            ),
            (
                KVT_ERR_BATCH_FAILED,
                Error::BatchFailed {
                    batch: 1,
                    reason: "r".into(),
                },
            ),
            (
                KVT_ERR_REMOTE_REJECTED,
                Error::RemoteRejected {
                    remote_code: 5,
                    message: "m".into(),
                },
            ),
            (
                KVT_ERR_PROTOCOL,
                Error::Protocol(crate::wire::WireError::BadMagic { got: 0 }),
            ),
            (
                KVT_ERR_HANDSHAKE,
                Error::Handshake {
                    peer: "p".into(),
                    reason: "r".into(),
                },
            ),
            (
                KVT_ERR_TRANSPORT_UNAVAILABLE,
                Error::TransportUnavailable {
                    transport: "rdma",
                    reason: "r".into(),
                },
            ),
            (KVT_ERR_SHUTDOWN, Error::Shutdown),
            (
                KVT_ERR_IO,
                Error::Io {
                    call: "recv",
                    source: io(),
                },
            ),
            (KVT_ERR_PANIC, Error::Panic("p".into())),
            (KVT_ERR_RDMA_CORE_MISSING, Error::RdmaCoreMissing),
            (KVT_ERR_RDMA_KERNEL_MISSING, Error::RdmaKernelMissing),
            (
                KVT_ERR_NO_RDMA_DEVICE,
                Error::NoRdmaDevice { reason: "r".into() },
            ),
            (
                KVT_ERR_PORT_DOWN,
                Error::PortDown {
                    device: "d".into(),
                    port: 1,
                    state: "DOWN".into(),
                },
            ),
            (
                KVT_ERR_VERBS,
                Error::Verbs {
                    call: "ibv_reg_mr",
                    source: io(),
                },
            ),
            (KVT_ERR_UNKNOWN_ROOM, Error::UnknownRoom { room: 1 }),
            (KVT_ERR_DUPLICATE_ROOM, Error::DuplicateRoom { room: 1 }),
            (
                KVT_ERR_INVALID_PAGES,
                Error::InvalidPages {
                    room: 1,
                    reason: "r".into(),
                },
            ),
            (
                KVT_ERR_LAYOUT_MISMATCH,
                Error::LayoutMismatch { reason: "r".into() },
            ),
            (
                KVT_ERR_ROOM_FAILED,
                Error::RoomFailed {
                    room: 1,
                    reason: "r".into(),
                },
            ),
            (
                KVT_ERR_ROOM_STATE,
                Error::RoomState {
                    room: 1,
                    state: "Bootstrapping",
                    op: "send",
                },
            ),
            (
                KVT_ERR_CUDA_UNAVAILABLE,
                Error::CudaUnavailable { reason: "r".into() },
            ),
            (
                KVT_ERR_CUDA,
                Error::Cuda {
                    call: "cuInit",
                    code: 100,
                    name: "CUDA_ERROR_NO_DEVICE".into(),
                },
            ),
            (
                KVT_ERR_REMOTE_UNREGISTERED,
                Error::RemoteUnregistered { addr: 0, len: 1 },
            ),
            (
                KVT_ERR_UNAUTHENTICATED,
                Error::Unauthenticated {
                    peer: "p".into(),
                    reason: "r".into(),
                },
            ),
        ];
        for (status, e) in &pairs {
            assert_eq!(*status, -e.code(), "{e:?}");
        }
        // One constant per code 1..=35, none left out.
        let mut codes: Vec<i32> = pairs.iter().map(|(s, _)| -s).collect();
        codes.sort();
        assert_eq!(codes, (1..=35).collect::<Vec<_>>());
    }

    #[test]
    fn abi_version_and_logging() {
        assert_eq!(kvt_abi_version(), KVT_ABI_VERSION);
        // SAFETY: a NUL-terminated literal.
        assert_eq!(unsafe { kvt_init_logging(c"warn".as_ptr()) }, KVT_OK);
        // SAFETY: NULL is allowed.
        assert_eq!(unsafe { kvt_init_logging(std::ptr::null()) }, KVT_OK);
        // SAFETY: the message pointer is valid until the next kvt_ call on this thread.
        let msg = unsafe { CStr::from_ptr(kvt_last_error_message()) };
        assert_eq!(msg.to_bytes(), b"");
    }
}
