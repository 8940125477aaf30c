//! The only place that turns registered addresses into bytes.
//!
//! Registered memory belongs to the caller. The registration contract (see
//! [`TransferEngine::register_memory`](crate::TransferEngine::register_memory)) is that it stays
//! valid until unregistered and that the caller does not touch a range while a transfer that
//! writes it is in flight — the contract an RDMA NIC imposes too. The functions here are safe
//! to call because they demand a [`SegmentGuard`] (the segment cannot be unregistered while it
//! lives) and check that the range lies inside that segment; a range outside is an internal
//! bug and panics rather than touching memory.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io::{self, IoSliceMut, Read};

use super::SegmentGuard;

fn check(guard: &SegmentGuard, addr: u64, len: usize) {
    let s = &guard.segment().info;
    let ok = addr >= s.base
        && addr
            .checked_add(len as u64)
            .is_some_and(|end| end <= s.base + s.len);
    assert!(
        ok,
        "range {addr:#x}+{len} outside segment {} [{:#x}, +{})",
        s.id, s.base, s.len
    );
}

/// Borrows `len` registered bytes at `addr` for reading (the source of a write or read response).
pub(crate) fn bytes(guard: &SegmentGuard, addr: u64, len: usize) -> &[u8] {
    check(guard, addr, len);
    // SAFETY: the range lies inside a registered segment (checked above) that the guard keeps
    // registered, hence mapped, for as long as the borrow of `guard` lives.
    unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len) }
}

/// Copies `src` into registered memory at `addr`.
pub(crate) fn copy_in(guard: &SegmentGuard, addr: u64, src: &[u8]) {
    check(guard, addr, src.len());
    // SAFETY: destination inside a pinned segment (checked above); `src` is an engine-owned
    // receive buffer, never registered memory, so the ranges cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as usize as *mut u8, src.len()) }
}

/// Reads from `r` into registered memory `[addr, addr + len)` and, in the same call, up to
/// `tail.len()` further bytes into `tail` (the start of the next frame). Returns bytes read.
pub(crate) fn read_into_then(
    guard: &SegmentGuard,
    addr: u64,
    len: usize,
    tail: &mut [u8],
    r: &mut impl Read,
) -> io::Result<usize> {
    check(guard, addr, len);
    // SAFETY: inside a pinned segment (checked above). By the registration contract nobody else
    // reads or writes the range while a transfer into it is in flight, so this exclusive borrow
    // for the duration of one `read` does not alias.
    let dst = unsafe { std::slice::from_raw_parts_mut(addr as usize as *mut u8, len) };
    r.read_vectored(&mut [IoSliceMut::new(dst), IoSliceMut::new(tail)])
}

/// A page-aligned, zeroed heap allocation whose bytes are only ever reached through raw
/// addresses (so the engine may write it while the owner holds it).
#[derive(Debug)]
pub(crate) struct RawAlloc {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: RawAlloc is a plain owned allocation; it has no thread affinity.
unsafe impl Send for RawAlloc {}
// SAFETY: shared access only hands out the address; byte access goes through the checked
// functions above under the registration contract.
unsafe impl Sync for RawAlloc {}

impl RawAlloc {
    /// Allocates `len` zeroed bytes aligned to 4 KiB (`len` > 0).
    pub(crate) fn zeroed(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("allocating {len} bytes"),
            ));
        }
        Ok(RawAlloc { ptr, layout })
    }

    /// Start address.
    pub(crate) fn addr(&self) -> u64 {
        self.ptr as usize as u64
    }

    /// Length in bytes.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.layout.size()
    }

    /// Copies `dst.len()` bytes at `offset` out of the allocation.
    pub(crate) fn read_at(&self, offset: usize, dst: &mut [u8]) {
        assert!(
            offset
                .checked_add(dst.len())
                .is_some_and(|e| e <= self.layout.size()),
            "read out of bounds"
        );
        // SAFETY: bounds checked above; the allocation lives as long as `self`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `src` into the allocation at `offset`.
    pub(crate) fn write_at(&self, offset: usize, src: &[u8]) {
        assert!(
            offset
                .checked_add(src.len())
                .is_some_and(|e| e <= self.layout.size()),
            "write out of bounds"
        );
        // SAFETY: bounds checked above; `src` is caller memory distinct from this allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), src.len()) }
    }
}

impl Drop for RawAlloc {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}
