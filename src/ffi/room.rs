//! Rooms: a KV sender on the prefill side and a KV receiver on the decode side, one pair per
//! request, polled through SGLang's KVPoll states.

use std::ffi::c_char;
use std::time::Duration;

use super::boundary::{guard, guard_noting};
use super::kv::kvt_kv_manager;
use super::pointers::{arg_ref, c_slice, c_str, into_handle, out_param, take_handle, write_c_str};
use super::versioned::{Versioned, field_spans, write_versioned};
use crate::error::{Error, Result};
use crate::kv::{KvPoll, KvReceiver, KvSender, RoomMetrics};

/// `kvt_kv_*_failure`: the peer's manager went away (channel closed, unreachable, or silent
/// past the heartbeat timeout).
pub const KVT_FAILURE_PEER_LOST: i32 = 1;
/// `kvt_kv_*_failure`: the peer restarted (a new engine epoch).
pub const KVT_FAILURE_PEER_RESTARTED: i32 = 2;
/// `kvt_kv_*_failure`: a deadline passed (room timeout, or the channel's connect timeout).
pub const KVT_FAILURE_TIMEOUT: i32 = 3;
/// `kvt_kv_*_failure`: aborted by this side's caller.
pub const KVT_FAILURE_ABORTED: i32 = 4;
/// `kvt_kv_*_failure`: aborted by the peer's caller.
pub const KVT_FAILURE_ABORTED_BY_PEER: i32 = 5;
/// `kvt_kv_*_failure`: the two KV layouts do not pair (configuration error).
pub const KVT_FAILURE_LAYOUT_MISMATCH: i32 = 6;
/// `kvt_kv_*_failure`: page indices or counts were refused.
pub const KVT_FAILURE_INVALID_PAGES: i32 = 7;
/// `kvt_kv_*_failure`: the peer refused the room (e.g. a duplicate room id).
pub const KVT_FAILURE_REJECTED: i32 = 8;
/// `kvt_kv_*_failure`: moving the data failed.
pub const KVT_FAILURE_TRANSPORT: i32 = 9;
/// `kvt_kv_*_failure`: the data failed an integrity check.
pub const KVT_FAILURE_INTEGRITY: i32 = 10;
/// `kvt_kv_*_failure`: the manager shut down.
pub const KVT_FAILURE_SHUTDOWN: i32 = 11;

/// Room state: failed (final); see the `*_failure_reason` functions.
pub const KVT_POLL_FAILED: i32 = 0;
/// Room state: the two sides are still exchanging the room's destination.
pub const KVT_POLL_BOOTSTRAPPING: i32 = 1;
/// Room state: both sides know the room; the sender may send.
pub const KVT_POLL_WAITING_FOR_INPUT: i32 = 2;
/// Room state: data is moving.
pub const KVT_POLL_TRANSFERRING: i32 = 3;
/// Room state: every byte (and aux) of the room has landed at the receiver (final).
pub const KVT_POLL_SUCCESS: i32 = 4;

/// The prefill side of one room. Thread-safe, except that `kvt_kv_sender_destroy` must not
/// race another call on it.
pub struct kvt_kv_sender {
    sender: KvSender,
}

/// The decode side of one room. Thread-safe, except that `kvt_kv_receiver_destroy` must not
/// race another call on it.
pub struct kvt_kv_receiver {
    receiver: KvReceiver,
}

/// What a room moved and how long it took. Set `struct_size` to `sizeof(kvt_room_metrics)`
/// before the call; the library fills the fields it covers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvt_room_metrics {
    /// `sizeof(kvt_room_metrics)` as the caller was compiled (set by the caller).
    pub struct_size: u32,
    /// Bytes written (pages and aux) by the sender, or expected by the receiver.
    pub bytes: u64,
    /// Writes after page expansion (one per contiguous run per buffer, plus aux).
    pub slices: u64,
    /// Sender: first send to its first write posted; receiver: init to the first chunk
    /// notification. In ns; 0 = not yet.
    pub queued_to_first_write_ns: u64,
    /// First write posted (receiver: first chunk notified) to the last completion. In ns;
    /// 0 = not yet.
    pub transfer_span_ns: u64,
}

impl Versioned for kvt_room_metrics {
    const C_NAME: &'static str = "kvt_room_metrics";
    fn zeroed() -> Self {
        kvt_room_metrics {
            struct_size: 0,
            bytes: 0,
            slices: 0,
            queued_to_first_write_ns: 0,
            transfer_span_ns: 0,
        }
    }
    fn fields() -> Vec<(usize, usize)> {
        field_spans!(kvt_room_metrics; struct_size, bytes, slices, queued_to_first_write_ns,
            transfer_span_ns)
    }
}

/// Nanoseconds, with 0 kept for "not yet": a span that was measured is at least 1.
fn nanos(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
    })
}

fn metrics(m: &RoomMetrics) -> kvt_room_metrics {
    kvt_room_metrics {
        struct_size: 0,
        bytes: m.bytes,
        slices: m.slices,
        queued_to_first_write_ns: nanos(m.queued_to_first_write),
        transfer_span_ns: nanos(m.transfer_span),
    }
}

/// An `aux_index` argument: negative means "no aux".
fn aux_index(v: i64) -> Result<Option<u32>> {
    if v < 0 {
        return Ok(None);
    }
    u32::try_from(v)
        .map(Some)
        .map_err(|_| Error::InvalidArgument(format!("aux_index {v} is larger than 2^32 - 1")))
}

/// The state as a C value, and the failure reason as the last message when it failed.
fn poll_note(state: KvPoll, reason: impl FnOnce() -> Option<String>) -> (i32, Option<String>) {
    let note = (state == KvPoll::Failed).then(|| reason().unwrap_or_else(|| "failed".into()));
    (state as i32, note)
}

/// Creates the sending side of room `room` in the prefill manager `m` and stores its handle
/// in `*out`; `KVT_ERR_DUPLICATE_ROOM` if that room is live in `m`.
///
/// # Safety
/// `m` is a live manager handle and `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_sender_create(
    m: *mut kvt_kv_manager,
    room: u64,
    out: *mut *mut kvt_kv_sender,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let m = unsafe { arg_ref(m, "m") }?;
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out, "out") }?;
        let sender = KvSender::new(&m.manager, room)?;
        out.write(into_handle(kvt_kv_sender { sender }));
        Ok(())
    })
}

/// Declares that the room carries `num_pages` pages (the receiver names as many) and, when
/// `aux_index >= 0`, aux slot `aux_index` of every aux buffer.
///
/// # Safety
/// `s` is a live sender handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_sender_init(
    s: *mut kvt_kv_sender,
    num_pages: u64,
    aux_index: i64,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let s = unsafe { arg_ref(s, "s") }?;
        let pages = usize::try_from(num_pages)
            .map_err(|_| Error::InvalidArgument(format!("num_pages {num_pages} is too large")))?;
        s.sender.init(pages, self::aux_index(aux_index)?)
    })
}

/// Sends the next chunk of the room: local page indices `pages[0..n]`, which land in the
/// receiver's pages at the same positions of the room. `is_last` marks the final chunk,
/// which also copies the aux slot. Returns once the chunk is queued; poll for completion.
/// Do not modify the pages until the room is final.
///
/// # Safety
/// `s` is a live sender handle; `pages` points to `n` indices (NULL only when `n` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_sender_send(
    s: *mut kvt_kv_sender,
    pages: *const i32,
    n: usize,
    is_last: bool,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let s = unsafe { arg_ref(s, "s") }?;
        // SAFETY: n indices at pages by the contract.
        let pages = unsafe { c_slice(pages, n, "pages") }?;
        s.sender.send(pages, is_last)
    })
}

/// Stores the room's state (`KVT_POLL_*`) in `*out_state`; never blocks. When the state is
/// `KVT_POLL_FAILED` the call returns `KVT_OK` and the reason is also in
/// `kvt_last_error_message`.
///
/// # Safety
/// `s` is a live sender handle and `out_state` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_sender_poll(s: *const kvt_kv_sender, out_state: *mut i32) -> i32 {
    guard_noting(|| {
        // SAFETY: a live handle by the contract.
        let s = unsafe { arg_ref(s, "s") }?;
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out_state, "out_state") }?;
        let (state, note) = poll_note(s.sender.poll(), || s.sender.failure_reason());
        out.write(state);
        Ok(note)
    })
}

/// Why the room failed, into `buf` of `cap` bytes with a NUL; "" when it has not failed.
///
/// # Safety
/// `s` is a live sender handle; `buf` is writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_sender_failure_reason(
    s: *const kvt_kv_sender,
    buf: *mut c_char,
    cap: usize,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let s = unsafe { arg_ref(s, "s") }?;
        let reason = s.sender.failure_reason().unwrap_or_default();
        // SAFETY: writable for cap bytes by the contract.
        unsafe { write_c_str(buf, cap, &reason, "buf") }
    })
}

/// The kind of the room's failure (`KVT_FAILURE_*`; 0 while it has not failed) into `*kind`,
/// and the `KVT_POLL_*` state it failed in into `*state` (for a timeout: where it was stuck;
/// `state` may be NULL).
///
/// # Safety
/// `s` is a live sender handle; `kind` is writable; `state` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_sender_failure(
    s: *const kvt_kv_sender,
    kind: *mut i32,
    state: *mut i32,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let s = unsafe { arg_ref(s, "s") }?;
        // SAFETY: writable by the contract.
        let kind = unsafe { out_param(kind, "kind") }?;
        let f = s.sender.failure();
        kind.write(f.as_ref().map_or(0, |f| f.kind.code()));
        if !state.is_null() {
            // SAFETY: non-null, so writable by the contract.
            let state = unsafe { out_param(state, "state") }?;
            state.write(f.map_or(0, |f| f.state as i32));
        }
        Ok(())
    })
}

/// Fails the room (unless it succeeded) and returns once none of its writes can land at the
/// receiver any more; may block up to the abort timeout.
///
/// # Safety
/// `s` is a live sender handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_sender_abort(s: *mut kvt_kv_sender) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let s = unsafe { arg_ref(s, "s") }?;
        s.sender.abort()
    })
}

/// Fills `*out` (the fields its `struct_size` covers) with what the room moved so far.
///
/// # Safety
/// `s` is a live sender handle; `out` points to a `kvt_room_metrics` with `struct_size` set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_sender_metrics(
    s: *const kvt_kv_sender,
    out: *mut kvt_room_metrics,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let s = unsafe { arg_ref(s, "s") }?;
        // SAFETY: out holds struct_size writable bytes by the contract.
        unsafe { write_versioned(out, &metrics(&s.sender.metrics()), "out") }
    })
}

/// Frees a sender; NULL is a no-op. A room that is not final is aborted first, which may
/// block up to the abort timeout.
///
/// # Safety
/// `s` is NULL or a handle from `kvt_kv_sender_create` not destroyed yet, used by no other
/// thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_sender_destroy(s: *mut kvt_kv_sender) -> i32 {
    guard(|| {
        // SAFETY: forwarded contract.
        drop(unsafe { take_handle(s) });
        Ok(())
    })
}

/// Creates the receiving side of room `room` in the decode manager `m`, served by the
/// prefill manager at `bootstrap_addr` (`"ip:port"`), and stores its handle in `*out`. A
/// prefill side that cannot be reached fails the room (see poll), not this call.
///
/// # Safety
/// `m` is a live manager handle, `bootstrap_addr` NUL-terminated, `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_receiver_create(
    m: *mut kvt_kv_manager,
    bootstrap_addr: *const c_char,
    room: u64,
    out: *mut *mut kvt_kv_receiver,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let m = unsafe { arg_ref(m, "m") }?;
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out, "out") }?;
        // SAFETY: NUL-terminated by the contract.
        let addr = unsafe { c_str(bootstrap_addr, "bootstrap_addr") }?;
        let receiver = KvReceiver::new(&m.manager, addr, room)?;
        out.write(into_handle(kvt_kv_receiver { receiver }));
        Ok(())
    })
}

/// Names the room's destination: its pages land in local pages `pages[0..n]` (in room
/// order) and, when `aux_index >= 0`, aux in slot `aux_index` of every aux buffer. Nothing
/// is sent when the pages are wrong (`KVT_ERR_INVALID_PAGES`).
///
/// # Safety
/// `r` is a live receiver handle; `pages` points to `n` indices (NULL only when `n` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_receiver_init(
    r: *mut kvt_kv_receiver,
    pages: *const i32,
    n: usize,
    aux_index: i64,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let r = unsafe { arg_ref(r, "r") }?;
        // SAFETY: n indices at pages by the contract.
        let pages = unsafe { c_slice(pages, n, "pages") }?;
        r.receiver.init(pages, self::aux_index(aux_index)?)
    })
}

/// Stores the room's state (`KVT_POLL_*`) in `*out_state`; never blocks. When the state is
/// `KVT_POLL_FAILED` the call returns `KVT_OK` and the reason is also in
/// `kvt_last_error_message`. Read the pages only after `KVT_POLL_SUCCESS`.
///
/// # Safety
/// `r` is a live receiver handle and `out_state` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_receiver_poll(
    r: *const kvt_kv_receiver,
    out_state: *mut i32,
) -> i32 {
    guard_noting(|| {
        // SAFETY: a live handle by the contract.
        let r = unsafe { arg_ref(r, "r") }?;
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out_state, "out_state") }?;
        let (state, note) = poll_note(r.receiver.poll(), || r.receiver.failure_reason());
        out.write(state);
        Ok(note)
    })
}

/// Why the room failed, into `buf` of `cap` bytes with a NUL; "" when it has not failed.
///
/// # Safety
/// `r` is a live receiver handle; `buf` is writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_receiver_failure_reason(
    r: *const kvt_kv_receiver,
    buf: *mut c_char,
    cap: usize,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let r = unsafe { arg_ref(r, "r") }?;
        let reason = r.receiver.failure_reason().unwrap_or_default();
        // SAFETY: writable for cap bytes by the contract.
        unsafe { write_c_str(buf, cap, &reason, "buf") }
    })
}

/// The kind of the room's failure (`KVT_FAILURE_*`; 0 while it has not failed) into `*kind`,
/// and the `KVT_POLL_*` state it failed in into `*state` (for a timeout: where it was stuck;
/// `state` may be NULL).
///
/// # Safety
/// `r` is a live receiver handle; `kind` is writable; `state` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_receiver_failure(
    r: *const kvt_kv_receiver,
    kind: *mut i32,
    state: *mut i32,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let r = unsafe { arg_ref(r, "r") }?;
        // SAFETY: writable by the contract.
        let kind = unsafe { out_param(kind, "kind") }?;
        let f = r.receiver.failure();
        kind.write(f.as_ref().map_or(0, |f| f.kind.code()));
        if !state.is_null() {
            // SAFETY: non-null, so writable by the contract.
            let state = unsafe { out_param(state, "state") }?;
            state.write(f.map_or(0, |f| f.state as i32));
        }
        Ok(())
    })
}

/// Fails the room (unless it succeeded) and returns once nothing of it can land in its pages
/// any more, so they can be reused; may block up to the abort timeout.
///
/// # Safety
/// `r` is a live receiver handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_receiver_abort(r: *mut kvt_kv_receiver) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let r = unsafe { arg_ref(r, "r") }?;
        r.receiver.abort()
    })
}

/// Fills `*out` (the fields its `struct_size` covers) with what the room moved so far.
///
/// # Safety
/// `r` is a live receiver handle; `out` points to a `kvt_room_metrics` with `struct_size` set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_receiver_metrics(
    r: *const kvt_kv_receiver,
    out: *mut kvt_room_metrics,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let r = unsafe { arg_ref(r, "r") }?;
        // SAFETY: out holds struct_size writable bytes by the contract.
        unsafe { write_versioned(out, &metrics(&r.receiver.metrics()), "out") }
    })
}

/// Frees a receiver; NULL is a no-op. A room that has not succeeded is aborted first (which
/// may block up to the abort timeout), so its pages can be reused once this returns.
///
/// # Safety
/// `r` is NULL or a handle from `kvt_kv_receiver_create` not destroyed yet, used by no other
/// thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_receiver_destroy(r: *mut kvt_kv_receiver) -> i32 {
    guard(|| {
        // SAFETY: forwarded contract.
        drop(unsafe { take_handle(r) });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_constants_are_the_kinds_codes() {
        use crate::kv::FailureKind as K;
        let pairs = [
            (KVT_FAILURE_PEER_LOST, K::PeerLost),
            (KVT_FAILURE_PEER_RESTARTED, K::PeerRestarted),
            (KVT_FAILURE_TIMEOUT, K::Timeout),
            (KVT_FAILURE_ABORTED, K::Aborted),
            (KVT_FAILURE_ABORTED_BY_PEER, K::AbortedByPeer),
            (KVT_FAILURE_LAYOUT_MISMATCH, K::LayoutMismatch),
            (KVT_FAILURE_INVALID_PAGES, K::InvalidPages),
            (KVT_FAILURE_REJECTED, K::Rejected),
            (KVT_FAILURE_TRANSPORT, K::Transport),
            (KVT_FAILURE_INTEGRITY, K::Integrity),
            (KVT_FAILURE_SHUTDOWN, K::Shutdown),
        ];
        assert_eq!(pairs.len(), K::ALL.len());
        for (c, k) in pairs {
            assert_eq!(c, k.code());
        }
    }

    #[test]
    fn poll_constants_are_the_kv_poll_values() {
        for (c, p) in [
            (KVT_POLL_FAILED, KvPoll::Failed),
            (KVT_POLL_BOOTSTRAPPING, KvPoll::Bootstrapping),
            (KVT_POLL_WAITING_FOR_INPUT, KvPoll::WaitingForInput),
            (KVT_POLL_TRANSFERRING, KvPoll::Transferring),
            (KVT_POLL_SUCCESS, KvPoll::Success),
        ] {
            assert_eq!(c, p as i32);
            assert_eq!(poll_note(p, || None).0, c);
        }
    }

    #[test]
    fn aux_index_negative_means_none() {
        assert_eq!(aux_index(-1).unwrap(), None);
        assert_eq!(aux_index(i64::MIN).unwrap(), None);
        assert_eq!(aux_index(0).unwrap(), Some(0));
        assert_eq!(aux_index(u32::MAX as i64).unwrap(), Some(u32::MAX));
        assert_eq!(aux_index(1 << 32).unwrap_err().code(), 2);
    }

    #[test]
    fn metrics_keep_zero_for_not_yet() {
        let m = metrics(&RoomMetrics {
            bytes: 10,
            slices: 2,
            queued_to_first_write: Some(Duration::ZERO),
            transfer_span: None,
        });
        assert_eq!(
            (
                m.bytes,
                m.slices,
                m.queued_to_first_write_ns,
                m.transfer_span_ns
            ),
            (10, 2, 1, 0)
        );
        assert_eq!(nanos(Some(Duration::from_micros(3))), 3000);
    }

    #[test]
    fn a_failed_poll_notes_its_reason() {
        assert_eq!(poll_note(KvPoll::Success, || None), (4, None));
        assert_eq!(
            poll_note(KvPoll::Failed, || Some("aborted by the sender".into())),
            (0, Some("aborted by the sender".into()))
        );
    }
}
