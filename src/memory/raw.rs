//! The only place that turns registered addresses into byte slices.
//!
//! Registered memory belongs to the caller; the registration contract (see
//! [`TransferEngine::register_memory`](crate::TransferEngine::register_memory)) is that it stays
//! valid until unregistered and that the caller does not touch a range while a transfer that
//! writes it is in flight — the same contract an RDMA NIC imposes. Every function here is
//! `unsafe` and only ever called with a range that the segment table has validated and pinned.

use std::io::{self, Read};

/// Borrows `len` bytes at `addr` for reading.
///
/// # Safety
/// `[addr, addr + len)` must be inside a pinned, registered segment for the returned lifetime.
pub(crate) unsafe fn bytes<'a>(addr: u64, len: usize) -> &'a [u8] {
    // SAFETY: the caller guarantees the range is valid, registered memory that stays mapped
    // while the borrow lives (the segment is pinned by a SegmentGuard).
    unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len) }
}

/// Borrows `len` bytes at `addr` for writing.
///
/// # Safety
/// As [`bytes`], and no other borrow of the range may exist while this one lives.
pub(crate) unsafe fn bytes_mut<'a>(addr: u64, len: usize) -> &'a mut [u8] {
    // SAFETY: the caller guarantees the range is valid registered memory that no one else
    // accesses while a transfer writing it is in flight (registration contract).
    unsafe { std::slice::from_raw_parts_mut(addr as usize as *mut u8, len) }
}

/// Copies `src` to `addr`.
///
/// # Safety
/// As [`bytes_mut`] for `[addr, addr + src.len())`.
pub(crate) unsafe fn copy_in(addr: u64, src: &[u8]) {
    // SAFETY: forwarded from the caller's contract; `src` cannot alias registered memory that
    // is being written (it is an engine-owned receive buffer).
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as usize as *mut u8, src.len()) }
}

/// Reads from `r` straight into `[addr, addr + len)`; returns the bytes read (0 = EOF).
///
/// # Safety
/// As [`bytes_mut`].
pub(crate) unsafe fn read_into(r: &mut impl Read, addr: u64, len: usize) -> io::Result<usize> {
    // SAFETY: forwarded from the caller's contract.
    let dst = unsafe { bytes_mut(addr, len) };
    r.read(dst)
}
