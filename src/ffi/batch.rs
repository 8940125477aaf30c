//! Batches of one-sided requests: submit, poll, wait, release; and Mooncake-style writes
//! whose destinations are the peer's virtual addresses.

use std::time::Duration;

use super::boundary::{guard, guard_noting};
use super::engine::kvt_engine;
use super::pointers::{arg_ref, c_slice, out_param};
use crate::engine::{PageBuffer, PeerId, TransferEngine};
use crate::error::{Error, Result};
use crate::memory::SegmentId;
use crate::request::{BatchId, BatchStatus, Op, Request};

/// `kvt_request.op`: copy local memory into the peer's segment.
pub const KVT_OP_WRITE: u32 = 0;
/// `kvt_request.op`: copy the peer's segment into local memory.
pub const KVT_OP_READ: u32 = 1;

/// `kvt_batch_poll`: some requests are still moving.
pub const KVT_BATCH_PENDING: i32 = 0;
/// `kvt_batch_poll`: every byte has landed (writes acknowledged by the peer, reads local).
pub const KVT_BATCH_DONE: i32 = 1;
/// `kvt_batch_poll`: the batch failed (final); the reason is in `kvt_last_error_message`.
pub const KVT_BATCH_FAILED: i32 = 2;

/// One transfer of `len` bytes between local memory at `local_addr` (inside a segment
/// registered with this engine) and the peer's segment `remote_segment` at `remote_offset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvt_request {
    /// `KVT_OP_WRITE` or `KVT_OP_READ`.
    pub op: u32,
    /// Segment id at the peer.
    pub remote_segment: u32,
    /// Local virtual address.
    pub local_addr: u64,
    /// Bytes to move (not 0).
    pub len: u64,
    /// Offset inside the peer's segment.
    pub remote_offset: u64,
}

fn to_request(i: usize, r: &kvt_request) -> Result<Request> {
    let seg = SegmentId(r.remote_segment);
    match r.op {
        KVT_OP_WRITE => Ok(Request::write(r.local_addr, r.len, seg, r.remote_offset)),
        KVT_OP_READ => Ok(Request::read(r.local_addr, r.len, seg, r.remote_offset)),
        other => Err(Error::InvalidArgument(format!(
            "reqs[{i}].op is {other}, not KVT_OP_WRITE (0) or KVT_OP_READ (1)"
        ))),
    }
}

/// Checks every request and submits them as one batch; nothing moves when one is wrong.
/// `timeout_ms` 0 takes the engine's batch timeout. Stores the batch id in `*out_batch`.
///
/// # Safety
/// `e` is a live engine handle, `reqs` points to `n` requests (NULL only when `n` is 0), and
/// `out_batch` is writable. Local memory must not be touched until the batch is final.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_batch_submit(
    e: *mut kvt_engine,
    peer: u64,
    reqs: *const kvt_request,
    n: usize,
    timeout_ms: u64,
    out_batch: *mut u64,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out_batch, "out_batch") }?;
        // SAFETY: n requests at reqs by the contract.
        let reqs = unsafe { c_slice(reqs, n, "reqs") }?;
        let requests = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| to_request(i, r))
            .collect::<Result<Vec<_>>>()?;
        let timeout = match timeout_ms {
            0 => e.engine.config().batch_timeout,
            ms => Duration::from_millis(ms),
        };
        let batch = e
            .engine
            .submit_with_timeout(PeerId(peer), &requests, timeout)?;
        out.write(batch.0);
        Ok(())
    })
}

/// Stores the batch's state (`KVT_BATCH_PENDING`, `_DONE` or `_FAILED`) in `*out_status`;
/// never blocks. For a failed batch the call still returns `KVT_OK`, and
/// `kvt_last_error_message` holds the reason. Final states stay readable until
/// `kvt_batch_release`.
///
/// # Safety
/// `e` is a live engine handle and `out_status` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_batch_poll(
    e: *mut kvt_engine,
    batch: u64,
    out_status: *mut i32,
) -> i32 {
    guard_noting(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out_status, "out_status") }?;
        let (status, note) = match e.engine.poll(BatchId(batch))? {
            BatchStatus::Pending => (KVT_BATCH_PENDING, None),
            BatchStatus::Done => (KVT_BATCH_DONE, None),
            BatchStatus::Failed(reason) => (
                KVT_BATCH_FAILED,
                Some(Error::BatchFailed { batch, reason }.to_string()),
            ),
        };
        out.write(status);
        Ok(note)
    })
}

/// Blocks until the batch is final and releases it: `KVT_OK` when done,
/// `KVT_ERR_BATCH_FAILED` (the reason in `kvt_last_error_message`) when it failed.
///
/// # Safety
/// `e` is a live engine handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_batch_wait(e: *mut kvt_engine, batch: u64) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        e.engine.wait(BatchId(batch))
    })
}

/// Forgets a batch id, so its status can no longer be polled; an unknown or already released
/// id is a no-op. Release every batch you poll to completion (`kvt_batch_wait` releases for
/// you).
///
/// # Safety
/// `e` is a live engine handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_batch_release(e: *mut kvt_engine, batch: u64) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        e.engine.release(BatchId(batch));
        Ok(())
    })
}

/// The direction a `KVT_OP_*` value names.
fn op_from(op: u32) -> Result<Op> {
    match op {
        KVT_OP_WRITE => Ok(Op::Write),
        KVT_OP_READ => Ok(Op::Read),
        other => Err(Error::InvalidArgument(format!(
            "op is {other}, not KVT_OP_WRITE (0) or KVT_OP_READ (1)"
        ))),
    }
}

/// Requests from parallel arrays: `len[i]` bytes between local `src[i]` and the peer's
/// virtual address `dst[i]` (written there for `KVT_OP_WRITE`, read from there for
/// `KVT_OP_READ`), each peer address resolved to (segment, offset).
fn address_requests(
    engine: &TransferEngine,
    peer: PeerId,
    op: u32,
    src: &[u64],
    dst: &[u64],
    len: &[u64],
) -> Result<Vec<Request>> {
    let make = match op_from(op)? {
        Op::Write => Request::write,
        Op::Read => Request::read,
    };
    src.iter()
        .zip(dst)
        .zip(len)
        .map(|((&s, &d), &l)| {
            let (segment, offset) = engine.resolve_remote(peer, d, l)?;
            Ok(make(s, l, segment, offset))
        })
        .collect()
}

/// # Safety
/// `e` is a live engine handle; `src`, `dst` and `len` point to `n` values each (NULL only
/// when `n` is 0).
unsafe fn address_batch<'a>(
    e: *mut kvt_engine,
    peer: u64,
    op: u32,
    src: *const u64,
    dst: *const u64,
    len: *const u64,
    n: usize,
) -> Result<(&'a TransferEngine, Vec<Request>)> {
    // SAFETY: a live handle by the contract.
    let e = unsafe { arg_ref(e, "e") }?;
    // SAFETY: n values at each pointer by the contract.
    let (src, dst, len) = unsafe {
        (
            c_slice(src, n, "src")?,
            c_slice(dst, n, "dst")?,
            c_slice(len, n, "len")?,
        )
    };
    let requests = address_requests(&e.engine, PeerId(peer), op, src, dst, len)?;
    Ok((&e.engine, requests))
}

/// Moves `len[i]` bytes between local address `src[i]` and the peer's virtual address
/// `dst[i]` for every `i < n`, as one batch (`op` `KVT_OP_WRITE`: local to peer;
/// `KVT_OP_READ`: peer to local), and waits for it. Each peer range must lie inside one
/// segment the peer registered (`KVT_ERR_REMOTE_UNREGISTERED` otherwise; nothing moves then).
///
/// # Safety
/// `e` is a live engine handle; `src`, `dst` and `len` point to `n` values each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_transfer_sync(
    e: *mut kvt_engine,
    peer: u64,
    op: u32,
    src: *const u64,
    dst: *const u64,
    len: *const u64,
    n: usize,
) -> i32 {
    guard(|| {
        // SAFETY: the contract above is address_batch's.
        let (engine, requests) = unsafe { address_batch(e, peer, op, src, dst, len, n) }?;
        engine.transfer_sync(PeerId(peer), &requests)
    })
}

/// Like `kvt_transfer_sync`, but returns at once with the batch id in `*out_batch` (poll or
/// wait it like any batch); `timeout_ms` is the batch's deadline (0: the engine's default).
///
/// # Safety
/// As for `kvt_transfer_sync`; `out_batch` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_transfer_submit(
    e: *mut kvt_engine,
    peer: u64,
    op: u32,
    src: *const u64,
    dst: *const u64,
    len: *const u64,
    n: usize,
    timeout_ms: u64,
    out_batch: *mut u64,
) -> i32 {
    guard(|| {
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out_batch, "out_batch") }?;
        // SAFETY: the contract above is address_batch's.
        let (engine, requests) = unsafe { address_batch(e, peer, op, src, dst, len, n) }?;
        let batch = if timeout_ms == 0 {
            engine.submit(PeerId(peer), &requests)?
        } else {
            engine.submit_with_timeout(
                PeerId(peer),
                &requests,
                Duration::from_millis(timeout_ms),
            )?
        };
        out.write(batch.0);
        Ok(())
    })
}

/// One buffer of `kvt_transfer_pages`: page `p` is the `item_len` bytes at
/// `local_addr + p * item_len` here and at `remote_addr + p * item_len` at the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvt_page_buffer {
    /// Local address of page 0 (registered memory).
    pub local_addr: u64,
    /// The peer's address of page 0 (inside a segment it registered).
    pub remote_addr: u64,
    /// Bytes of one page of this buffer, the same on both sides.
    pub item_len: u64,
}

/// Submits one batch moving pages of `nbuf` buffers (a paged KV cache: one buffer per layer,
/// or a K and a V buffer per layer) in direction `op`: page `local_pages[i]` of every buffer
/// here and page `remote_pages[i]` of the same buffer at the peer, for every `i < npages`.
/// The library groups the pages into runs contiguous on both sides and makes one request per
/// run and buffer, so an engine passes page indices, not addresses. The batch id goes to
/// `*out_batch` (poll or wait it); `timeout_ms` is its deadline (0: the default).
/// Refused with nothing sent: a negative page, lists of different lengths, no buffer, a zero
/// `item_len`, or a page outside registered memory on either side.
///
/// # Safety
/// `e` is a live engine handle; `buffers` points to `nbuf` entries; `local_pages` and
/// `remote_pages` to `npages` values each (NULL only when the count is 0); `out_batch` is
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_transfer_pages(
    e: *mut kvt_engine,
    peer: u64,
    op: u32,
    buffers: *const kvt_page_buffer,
    nbuf: usize,
    local_pages: *const i32,
    remote_pages: *const i32,
    npages: usize,
    timeout_ms: u64,
    out_batch: *mut u64,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out_batch, "out_batch") }?;
        // SAFETY: nbuf and npages values at the pointers by the contract.
        let (buffers, local, remote) = unsafe {
            (
                c_slice(buffers, nbuf, "buffers")?,
                c_slice(local_pages, npages, "local_pages")?,
                c_slice(remote_pages, npages, "remote_pages")?,
            )
        };
        let op = op_from(op)?;
        let buffers: Vec<PageBuffer> = buffers
            .iter()
            .map(|b| PageBuffer {
                local: b.local_addr,
                remote: b.remote_addr,
                item_len: b.item_len,
            })
            .collect();
        let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
        let batch = e
            .engine
            .submit_pages(PeerId(peer), op, &buffers, local, remote, timeout)?;
        out.write(batch.0);
        Ok(())
    })
}

/// `kvt_transfer_sync` with `KVT_OP_WRITE` (Mooncake's `transferSyncWrite`).
///
/// # Safety
/// As for `kvt_transfer_sync`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_transfer_sync_write(
    e: *mut kvt_engine,
    peer: u64,
    src: *const u64,
    dst: *const u64,
    len: *const u64,
    n: usize,
) -> i32 {
    // SAFETY: the same contract.
    unsafe { kvt_transfer_sync(e, peer, KVT_OP_WRITE, src, dst, len, n) }
}

/// `kvt_transfer_submit` with `KVT_OP_WRITE` and the default deadline.
///
/// # Safety
/// As for `kvt_transfer_submit`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_transfer_submit_write(
    e: *mut kvt_engine,
    peer: u64,
    src: *const u64,
    dst: *const u64,
    len: *const u64,
    n: usize,
    out_batch: *mut u64,
) -> i32 {
    // SAFETY: the same contract.
    unsafe { kvt_transfer_submit(e, peer, KVT_OP_WRITE, src, dst, len, n, 0, out_batch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_map_to_requests() {
        let r = kvt_request {
            op: KVT_OP_READ,
            remote_segment: 4,
            local_addr: 0x1000,
            len: 64,
            remote_offset: 8,
        };
        assert_eq!(
            to_request(0, &r).unwrap(),
            Request::read(0x1000, 64, SegmentId(4), 8)
        );
        let w = kvt_request {
            op: KVT_OP_WRITE,
            ..r
        };
        assert_eq!(
            to_request(0, &w).unwrap(),
            Request::write(0x1000, 64, SegmentId(4), 8)
        );
        let bad = kvt_request { op: 2, ..r };
        let e = to_request(5, &bad).unwrap_err();
        assert_eq!(e.code(), 2);
        assert!(e.to_string().contains("reqs[5].op is 2"), "{e}");
    }
}
