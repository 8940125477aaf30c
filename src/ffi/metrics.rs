//! Engine metrics for C: totals in a versioned struct, and the full Prometheus text (per
//! peer, per rail, per failure kind, histogram buckets).

use std::ffi::c_char;
use std::time::Duration;

use super::boundary::guard;
use super::engine::kvt_engine;
use super::kv::kvt_kv_manager;
use super::pointers::{arg_ref, out_param, write_c_str};
use super::versioned::{Versioned, field_spans, write_versioned};
use crate::TransferEngine;
use crate::error::Result;
use crate::metrics::{BatchMetrics, MetricsSnapshot, Summary};
use crate::request::BatchId;

/// An engine's metrics, totals only (`kvt_*_metrics_text` has every series). Set
/// `struct_size` to `sizeof(kvt_metrics)` before the call; the library fills the fields it
/// covers. Bytes and batches count batches that ended; latencies are a count and a sum in ns
/// (their mean is `sum / count`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvt_metrics {
    /// `sizeof(kvt_metrics)` as the caller was compiled (set by the caller).
    pub struct_size: u32,
    /// Connected peers.
    pub peers: u32,
    /// Batches done.
    pub batches_done: u64,
    /// Batches failed (deadline aside).
    pub batches_failed: u64,
    /// Batches that missed their deadline.
    pub batches_timed_out: u64,
    /// Bytes written by done batches.
    pub bytes_written: u64,
    /// Bytes read by done batches.
    pub bytes_read: u64,
    /// Done batches timed.
    pub batch_latency_count: u64,
    /// Their submit-to-done times summed, in ns.
    pub batch_latency_sum_ns: u64,
    /// Peer input refused (handshakes, malformed frames, out-of-segment accesses).
    pub refused: u64,
    /// RDMA rails (0 over TCP).
    pub rails: u32,
    /// Reserved (0).
    pub reserved: u32,
    /// Bytes posted over every rail (moved work included).
    pub rail_posted_bytes: u64,
    /// Work requests posted over every rail.
    pub rail_work_requests: u64,
    /// Error completions over every rail.
    pub rail_errors: u64,
    /// Bytes moved off a rail whose path failed.
    pub rail_moved_bytes: u64,
    /// Lanes of failed rails put back.
    pub rail_rejoins: u64,
    /// The KV manager's rooms created (0 without a manager).
    pub rooms_started: u64,
    /// Rooms that reached Success.
    pub rooms_succeeded: u64,
    /// Rooms that failed.
    pub rooms_failed: u64,
    /// Bytes of the rooms that reached Success.
    pub room_bytes: u64,
    /// Rooms timed from first write (decode: first chunk) to Success.
    pub room_transfer_count: u64,
    /// Their times summed, in ns.
    pub room_transfer_sum_ns: u64,
}

impl Versioned for kvt_metrics {
    const C_NAME: &'static str = "kvt_metrics";
    fn zeroed() -> Self {
        kvt_metrics {
            struct_size: 0,
            peers: 0,
            batches_done: 0,
            batches_failed: 0,
            batches_timed_out: 0,
            bytes_written: 0,
            bytes_read: 0,
            batch_latency_count: 0,
            batch_latency_sum_ns: 0,
            refused: 0,
            rails: 0,
            reserved: 0,
            rail_posted_bytes: 0,
            rail_work_requests: 0,
            rail_errors: 0,
            rail_moved_bytes: 0,
            rail_rejoins: 0,
            rooms_started: 0,
            rooms_succeeded: 0,
            rooms_failed: 0,
            room_bytes: 0,
            room_transfer_count: 0,
            room_transfer_sum_ns: 0,
        }
    }
    fn fields() -> Vec<(usize, usize)> {
        field_spans!(kvt_metrics; struct_size, peers, batches_done, batches_failed,
            batches_timed_out, bytes_written, bytes_read, batch_latency_count,
            batch_latency_sum_ns, refused, rails, reserved, rail_posted_bytes, rail_work_requests,
            rail_errors, rail_moved_bytes, rail_rejoins, rooms_started, rooms_succeeded,
            rooms_failed, room_bytes, room_transfer_count, room_transfer_sum_ns)
    }
}

/// What one batch moved and how long it took. Set `struct_size` to
/// `sizeof(kvt_batch_metrics)` before the call; the library fills the fields it covers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvt_batch_metrics {
    /// `sizeof(kvt_batch_metrics)` as the caller was compiled (set by the caller).
    pub struct_size: u32,
    /// Bytes of its write requests.
    pub bytes_written: u64,
    /// Bytes of its read requests.
    pub bytes_read: u64,
    /// From submit until the batch became final, in ns; 0 while it is pending.
    pub latency_ns: u64,
}

impl Versioned for kvt_batch_metrics {
    const C_NAME: &'static str = "kvt_batch_metrics";
    fn zeroed() -> Self {
        kvt_batch_metrics {
            struct_size: 0,
            bytes_written: 0,
            bytes_read: 0,
            latency_ns: 0,
        }
    }
    fn fields() -> Vec<(usize, usize)> {
        field_spans!(kvt_batch_metrics; struct_size, bytes_written, bytes_read, latency_ns)
    }
}

fn batch_fields(m: &BatchMetrics) -> kvt_batch_metrics {
    kvt_batch_metrics {
        bytes_written: m.bytes_written,
        bytes_read: m.bytes_read,
        // A pending batch has none; a final one at least 1 ns, so 0 always means pending.
        latency_ns: m.latency.map_or(0, |d| {
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
        }),
        ..kvt_batch_metrics::zeroed()
    }
}

/// What batch `batch` moves and, once final, its latency into `*out` (set
/// `out->struct_size` first); never blocks. Readable until `kvt_batch_release`.
///
/// # Safety
/// `e` is a live engine handle; `out` points to `out->struct_size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_batch_get_metrics(
    e: *const kvt_engine,
    batch: u64,
    out: *mut kvt_batch_metrics,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        let m = e.engine.batch_metrics(BatchId(batch))?;
        // SAFETY: out holds struct_size writable bytes by the contract.
        unsafe { write_versioned(out, &batch_fields(&m), "out") }
    })
}

/// `kvt_batch_wait`, then what the done batch moved and its latency into `*out` (set
/// `out->struct_size` first). A failed batch returns `KVT_ERR_BATCH_FAILED` with `*out` zero;
/// either way the batch is released. A bad `out` is refused before waiting.
///
/// # Safety
/// `e` is a live engine handle; `out` points to `out->struct_size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_batch_wait_metrics(
    e: *const kvt_engine,
    batch: u64,
    out: *mut kvt_batch_metrics,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: out holds struct_size writable bytes by the contract.
        unsafe { write_versioned(out, &kvt_batch_metrics::zeroed(), "out") }?;
        let m = e.engine.wait_metrics(BatchId(batch))?;
        // SAFETY: out holds struct_size writable bytes by the contract.
        unsafe { write_versioned(out, &batch_fields(&m), "out") }
    })
}

fn sum_ns(s: &Summary) -> u64 {
    u64::try_from(Duration::from_secs_f64(s.sum_secs.max(0.0)).as_nanos()).unwrap_or(u64::MAX)
}

fn totals(m: &MetricsSnapshot) -> kvt_metrics {
    let rails = |f: fn(&crate::RailMetrics) -> u64| m.rails.iter().map(f).sum();
    let rooms = m.rooms.as_ref();
    kvt_metrics {
        peers: m.peers.len() as u32,
        batches_done: m.batches_done,
        batches_failed: m.batches_failed,
        batches_timed_out: m.batches_timed_out,
        bytes_written: m.bytes_written,
        bytes_read: m.bytes_read,
        batch_latency_count: m.batch_latency.count,
        batch_latency_sum_ns: sum_ns(&m.batch_latency),
        refused: m.refused,
        rails: m.rails.len() as u32,
        rail_posted_bytes: rails(|r| r.posted_bytes),
        rail_work_requests: rails(|r| r.work_requests),
        rail_errors: rails(|r| r.errors),
        rail_moved_bytes: rails(|r| r.moved_out_bytes),
        rail_rejoins: rails(|r| r.rejoins),
        rooms_started: rooms.map_or(0, |r| r.started),
        rooms_succeeded: rooms.map_or(0, |r| r.succeeded),
        rooms_failed: rooms.map_or(0, |r| r.failed),
        room_bytes: rooms.map_or(0, |r| r.bytes),
        room_transfer_count: rooms.map_or(0, |r| r.transfer.count),
        room_transfer_sum_ns: rooms.map_or(0, |r| sum_ns(&r.transfer)),
        ..kvt_metrics::zeroed()
    }
}

/// Writes `engine`'s text into `buf` (see [`kvt_engine_metrics_text`]).
///
/// # Safety
/// As [`kvt_engine_metrics_text`] for `buf`, `cap` and `out_len`.
unsafe fn text_into(
    engine: &TransferEngine,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> Result<()> {
    let text = engine.metrics_text();
    // SAFETY: writable by the contract.
    let len = unsafe { out_param(out_len, "out_len") }?;
    if buf.is_null() && cap == 0 {
        len.write(text.len() + 1);
        return Ok(());
    }
    // SAFETY: buf is writable for cap bytes by the contract.
    unsafe { write_c_str(buf, cap, &text, "buf") }?;
    len.write(text.len());
    Ok(())
}

/// The engine's metric totals into `*out` (set `out->struct_size` first).
///
/// # Safety
/// `e` is a live engine handle; `out` points to `out->struct_size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_metrics(e: *const kvt_engine, out: *mut kvt_metrics) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: out holds struct_size writable bytes by the contract.
        unsafe { write_versioned(out, &totals(&e.engine.metrics()), "out") }
    })
}

/// The engine's metrics in the Prometheus text format (OpenMetrics 1.0, ending in `# EOF`),
/// into `buf` of `cap` bytes with a NUL, its length (NUL excluded) in `*out_len`. With `buf`
/// NULL and `cap` 0 nothing is written but `*out_len`: the bytes needed, NUL included. A
/// buffer too small gives `KVT_ERR_INVALID_ARGUMENT` and is left untouched; new series may
/// appear between two calls, so leave room (64 KiB holds an engine with a few dozen peers).
///
/// # Safety
/// `e` is a live engine handle; `buf` is NULL with `cap` 0, or writable for `cap` bytes;
/// `out_len` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_metrics_text(
    e: *const kvt_engine,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: forwarded contract.
        unsafe { text_into(&e.engine, buf, cap, out_len) }
    })
}

/// As [`kvt_engine_metrics`], for the engine of a KV manager (its rooms included).
///
/// # Safety
/// `m` is a live manager handle; `out` points to `out->struct_size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_manager_metrics(
    m: *const kvt_kv_manager,
    out: *mut kvt_metrics,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let m = unsafe { arg_ref(m, "m") }?;
        // SAFETY: out holds struct_size writable bytes by the contract.
        unsafe { write_versioned(out, &totals(&m.manager.engine().metrics()), "out") }
    })
}

/// As [`kvt_engine_metrics_text`], for the engine of a KV manager (its rooms included).
///
/// # Safety
/// `m` is a live manager handle; `buf` is NULL with `cap` 0, or writable for `cap` bytes;
/// `out_len` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_manager_metrics_text(
    m: *const kvt_kv_manager,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let m = unsafe { arg_ref(m, "m") }?;
        // SAFETY: forwarded contract.
        unsafe { text_into(m.manager.engine(), buf, cap, out_len) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::engine::{kvt_engine_create, kvt_engine_destroy};

    #[test]
    fn totals_and_text_through_the_c_calls() {
        let mut e = std::ptr::null_mut();
        // SAFETY: a NULL config takes the defaults; `e` is written on success.
        assert_eq!(unsafe { kvt_engine_create(std::ptr::null(), &mut e) }, 0);
        let mut m = kvt_metrics::zeroed();
        m.struct_size = std::mem::size_of::<kvt_metrics>() as u32;
        // SAFETY: a live handle and a whole struct.
        assert_eq!(unsafe { kvt_engine_metrics(e, &mut m) }, 0);
        assert_eq!((m.peers, m.batches_done, m.rooms_started), (0, 0, 0));
        let mut need = 0usize;
        // SAFETY: the size query: NULL buffer, cap 0.
        let r = unsafe { kvt_engine_metrics_text(e, std::ptr::null_mut(), 0, &mut need) };
        assert_eq!(r, 0);
        let mut small = vec![0 as c_char; 8];
        let mut len = 0usize;
        // SAFETY: `small` is writable for its length.
        let r = unsafe { kvt_engine_metrics_text(e, small.as_mut_ptr(), small.len(), &mut len) };
        assert_eq!(r, crate::ffi::KVT_ERR_INVALID_ARGUMENT);
        assert_eq!(len, 0, "nothing written on failure");
        let mut buf = vec![0 as c_char; need + 4096];
        // SAFETY: `buf` is writable for its length.
        let r = unsafe { kvt_engine_metrics_text(e, buf.as_mut_ptr(), buf.len(), &mut len) };
        assert_eq!(r, 0);
        // SAFETY: NUL-terminated by the call.
        let text = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_str()
            .unwrap();
        assert_eq!(text.len(), len);
        assert!(
            text.contains("kvt_batches_total{outcome=\"done\"} 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        // SAFETY: the handle made above, destroyed once.
        assert_eq!(unsafe { kvt_engine_destroy(e) }, 0);
    }
}
