//! The only place that reaches registered memory.
//!
//! Registered memory belongs to the caller. The registration contract (see
//! [`TransferEngine::register_memory`](crate::TransferEngine::register_memory)) is that it stays
//! valid until unregistered and that the caller does not touch a range while a transfer that
//! writes it is in flight — the contract an RDMA NIC imposes too. The functions here are safe
//! to call because they demand a [`SegmentGuard`] (the segment cannot be unregistered while it
//! lives) and check that the range lies inside that segment; a range outside is an internal
//! bug and panics rather than touching memory.
//!
//! No Rust reference (`&[u8]`, `&mut [u8]`) is ever formed over registered memory: a peer, a
//! NIC or the caller may write it while we hold it, which a reference forbids. Sockets read
//! and write it through raw `iovec`s ([`Out`], [`read_into_then`]); copies go through raw
//! pointers ([`copy_in`], [`RawAlloc`]).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;

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

/// Most buffers one `sendmsg`/`readv` takes (the kernel's `UIO_MAXIOV`).
pub(crate) const MAX_IOV: usize = 1024;

/// Bytes to send, gathered from engine-owned buffers and registered memory, as raw `iovec`s
/// the kernel reads: registered memory never becomes a Rust slice.
pub(crate) struct Out<'a> {
    iov: Vec<libc::iovec>,
    /// The first entry not yet sent in full.
    first: usize,
    /// Every entry points into a borrow of `'a`: a `&'a [u8]` or the range a `&'a
    /// SegmentGuard` keeps registered.
    _borrows: PhantomData<&'a [u8]>,
}

// SAFETY: the iovecs only point at memory borrowed for `'a` (shared byte slices, or ranges
// of segments pinned by guards borrowed for `'a`), which any thread may read.
unsafe impl Send for Out<'_> {}

impl<'a> Out<'a> {
    /// An empty list with room for `n` entries.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Out {
            iov: Vec::with_capacity(n),
            first: 0,
            _borrows: PhantomData,
        }
    }

    /// A list of engine-owned buffers.
    pub(crate) fn of(parts: &[&'a [u8]]) -> Self {
        let mut o = Out::with_capacity(parts.len());
        parts.iter().for_each(|p| o.bytes(p));
        o
    }

    /// Appends an engine-owned buffer.
    pub(crate) fn bytes(&mut self, b: &'a [u8]) {
        self.iov.push(libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        });
    }

    /// Appends `len` registered bytes at `addr`, which must lie in `guard`'s segment.
    pub(crate) fn registered(&mut self, guard: &'a SegmentGuard, addr: u64, len: usize) {
        check(guard, addr, len);
        self.iov.push(libc::iovec {
            iov_base: addr as usize as *mut libc::c_void,
            iov_len: len,
        });
    }

    /// Nothing left to send.
    pub(crate) fn is_empty(&self) -> bool {
        self.first == self.iov.len()
    }

    /// Forgets every entry.
    pub(crate) fn clear(&mut self) {
        self.iov.clear();
        self.first = 0;
    }

    /// Marks the first `n` unsent bytes sent.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let v = &mut self.iov[self.first];
            if n < v.iov_len {
                // SAFETY: `n` < the entry's length, so the new base stays inside it.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                return;
            }
            n -= v.iov_len;
            self.first += 1;
        }
        while self.first < self.iov.len() && self.iov[self.first].iov_len == 0 {
            self.first += 1;
        }
    }

    /// Sends what the socket takes (at most [`MAX_IOV`] entries) with `MSG_NOSIGNAL`, so a
    /// lost peer answers `EPIPE` instead of raising SIGPIPE; marks it sent.
    pub(crate) fn send(&mut self, s: &impl AsRawFd) -> io::Result<usize> {
        let rest = &mut self.iov[self.first..];
        let n = rest.len().min(MAX_IOV);
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = rest.as_mut_ptr();
        msg.msg_iovlen = n as _;
        // SAFETY: each of the `n` iovecs points at memory borrowed for `'a` (see `Out`), alive
        // while `self` is; the kernel only reads it.
        let r = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.advance(r as usize);
        Ok(r as usize)
    }
}

/// Copies `src` into registered memory at `addr`.
pub(crate) fn copy_in(guard: &SegmentGuard, addr: u64, src: &[u8]) {
    check(guard, addr, src.len());
    // SAFETY: destination inside a pinned segment (checked above); `src` is an engine-owned
    // receive buffer, never registered memory, so the ranges cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as usize as *mut u8, src.len()) }
}

/// Inverts every bit of the byte of registered host memory at `addr` (the TCP target's
/// corruption fault point, for tests of integrity digests).
pub(crate) fn flip_byte(guard: &SegmentGuard, addr: u64) {
    check(guard, addr, 1);
    assert!(guard.segment().info.kind == super::MemoryKind::Host);
    let p = addr as usize as *mut u8;
    // SAFETY: one byte inside a pinned segment of host memory (checked above), which a
    // write frame has just filled and nothing else writes meanwhile (the registration
    // contract); read and written through the raw pointer only.
    unsafe { p.write_volatile(!p.read_volatile()) }
}

/// Feeds the bytes of registered host memory `[addr, addr + len)` to `hasher`, copied
/// through `scratch` (not empty) so that no reference is formed over them.
pub(crate) fn hash_range(
    guard: &SegmentGuard,
    addr: u64,
    len: usize,
    scratch: &mut [u8],
    hasher: &mut xxhash_rust::xxh3::Xxh3,
) {
    check(guard, addr, len);
    assert!(
        guard.segment().info.kind == super::MemoryKind::Host,
        "hashing segment {} of GPU memory from the CPU",
        guard.segment().info.id
    );
    let mut done = 0;
    while done < len {
        let n = (len - done).min(scratch.len());
        // SAFETY: the source lies inside a pinned segment of host memory (checked above),
        // readable by the registration contract; `scratch` is an engine-owned buffer, never
        // registered memory, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (addr as usize + done) as *const u8,
                scratch.as_mut_ptr(),
                n,
            )
        };
        hasher.update(&scratch[..n]);
        done += n;
    }
}

/// Reads from socket `s` into registered memory `[addr, addr + len)` and, in the same call,
/// up to `tail.len()` further bytes into `tail` (the start of the next frame). Returns bytes
/// read.
pub(crate) fn read_into_then(
    guard: &SegmentGuard,
    addr: u64,
    len: usize,
    tail: &mut [u8],
    s: &impl AsRawFd,
) -> io::Result<usize> {
    check(guard, addr, len);
    let iov = [
        libc::iovec {
            iov_base: addr as usize as *mut libc::c_void,
            iov_len: len,
        },
        libc::iovec {
            iov_base: tail.as_mut_ptr().cast(),
            iov_len: tail.len(),
        },
    ];
    // SAFETY: the first range lies inside a segment the guard keeps registered (checked
    // above), which by the registration contract nobody else touches while a transfer into it
    // is in flight; the second is `tail`, exclusively borrowed. The kernel writes only these.
    let r = unsafe { libc::readv(s.as_raw_fd(), iov.as_ptr(), 2) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// A page-aligned, zeroed heap allocation whose bytes are only ever reached through raw
/// addresses and raw copies, never references (so the engine may write it while the owner
/// holds it).
#[derive(Debug)]
pub(crate) struct RawAlloc {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: RawAlloc is a plain owned allocation; it has no thread affinity.
unsafe impl Send for RawAlloc {}
// SAFETY: shared access hands out the address and raw copies (`read_at`, `write_at`), never
// a reference into the bytes; concurrent copies of one range follow the registration
// contract (a range a transfer is writing is not read or written meanwhile).
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The unsent bytes of `out`, gathered (reads only the iovecs' ranges).
    fn unsent(out: &Out<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        for io in &out.iov[out.first..] {
            // SAFETY: every entry points into a slice borrowed for the list's lifetime.
            let s = unsafe { std::slice::from_raw_parts(io.iov_base.cast::<u8>(), io.iov_len) };
            v.extend_from_slice(s);
        }
        v
    }

    #[test]
    fn advancing_walks_across_entries_and_skips_empty_ones() {
        let (a, b, c) = (b"abc".to_vec(), Vec::new(), b"defgh".to_vec());
        let mut out = Out::of(&[&a, &b, &c]);
        assert_eq!(unsent(&out), b"abcdefgh");
        out.advance(2);
        assert_eq!(unsent(&out), b"cdefgh");
        out.advance(1);
        assert_eq!(out.first, 2, "the empty entry is skipped");
        assert_eq!(unsent(&out), b"defgh");
        out.advance(4);
        assert_eq!(unsent(&out), b"h");
        assert!(!out.is_empty());
        out.advance(1);
        assert!(out.is_empty());
        out.clear();
        assert!(out.is_empty());
    }

    #[test]
    fn hashing_registered_memory_equals_hashing_its_bytes_and_a_flipped_byte_shows() {
        use crate::memory::{MemoryKind, SegmentTable};
        let mem = RawAlloc::zeroed(10_000).unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_at(0, &bytes);
        let t = SegmentTable::default();
        let s = t.register(mem.addr(), 10_000, MemoryKind::Host).unwrap();
        let g = t.pin_range(s.id, 0, 10_000).unwrap();
        let hash = |addr: u64, len: usize| {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            // A scratch smaller than the range: it is hashed in pieces.
            hash_range(&g, addr, len, &mut [0u8; 333], &mut h);
            h.digest()
        };
        assert_eq!(hash(mem.addr(), 10_000), xxhash_rust::xxh3::xxh3_64(&bytes));
        assert_eq!(
            hash(mem.addr() + 100, 5_000),
            xxhash_rust::xxh3::xxh3_64(&bytes[100..5_100])
        );
        flip_byte(&g, mem.addr() + 4_000);
        let mut back = vec![0u8; 10_000];
        mem.read_at(0, &mut back);
        assert_eq!(back[4_000], !bytes[4_000]);
        assert_ne!(hash(mem.addr(), 10_000), xxhash_rust::xxh3::xxh3_64(&bytes));
    }

    #[test]
    #[should_panic(expected = "outside segment")]
    fn hashing_past_the_segment_panics_before_reading() {
        use crate::memory::{MemoryKind, SegmentTable};
        let mem = RawAlloc::zeroed(4096).unwrap();
        let t = SegmentTable::default();
        let s = t.register(mem.addr(), 4096, MemoryKind::Host).unwrap();
        let g = t.pin_range(s.id, 0, 4096).unwrap();
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        hash_range(&g, mem.addr() + 4000, 100, &mut [0u8; 64], &mut h);
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri has no sendmsg")]
    fn a_send_takes_what_the_socket_takes_and_the_rest_stays() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let (tx, mut rx) = UnixStream::pair().unwrap();
        let (a, b) = (vec![1u8; 1000], vec![2u8; 24]);
        let mut out = Out::of(&[&a, &b]);
        let mut sent = 0;
        while !out.is_empty() {
            sent += out.send(&tx).unwrap();
        }
        assert_eq!(sent, 1024);
        let mut got = vec![0u8; 1024];
        rx.read_exact(&mut got).unwrap();
        assert_eq!(&got[..1000], &a[..]);
        assert_eq!(&got[1000..], &b[..]);
    }
}
