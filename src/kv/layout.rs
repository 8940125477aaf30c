//! Where a manager's KV cache lives: layer buffers of fixed-size pages, and aux slots.

use crate::error::{Error, Result};

/// One buffer: `len` bytes at `addr`, made of items (pages, or aux slots) of `item_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBuffer {
    /// Start address (host memory, registered by the manager).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Bytes of one item: one page of this layer, or one aux slot.
    pub item_len: u64,
}

impl KvBuffer {
    /// Items that fit in the buffer.
    pub fn items(&self) -> u64 {
        self.len / self.item_len
    }

    /// Address of item `index`.
    pub fn item_addr(&self, index: u64) -> u64 {
        self.addr + index * self.item_len
    }
}

/// The KV cache of one manager.
///
/// MLA models have one buffer per layer; MHA/GQA models a K and a V buffer per layer (list
/// them all, in the same order on both sides). Page `p` of buffer `b` is the `item_len` bytes
/// at `buffers[b].addr + p * item_len`. Aux buffers hold small per-request slots (host
/// memory), `aux_index` choosing the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    /// Page buffers.
    pub buffers: Vec<KvBuffer>,
    /// Aux buffers.
    pub aux: Vec<KvBuffer>,
}

impl KvLayout {
    /// A checked layout: at least one page buffer, every buffer non-null with room for one
    /// item of non-zero size.
    pub fn new(buffers: Vec<KvBuffer>, aux: Vec<KvBuffer>) -> Result<KvLayout> {
        if buffers.is_empty() {
            return Err(Error::InvalidArgument(
                "a KV layout needs at least one page buffer".into(),
            ));
        }
        for (kind, list) in [("buffer", &buffers), ("aux buffer", &aux)] {
            for (i, b) in list.iter().enumerate() {
                if b.addr == 0 || b.item_len == 0 || b.len < b.item_len {
                    return Err(Error::InvalidArgument(format!(
                        "KV {kind} {i}: addr {:#x}, len {}, item_len {}: needs a non-null address \
                         and room for at least one item of non-zero size",
                        b.addr, b.len, b.item_len
                    )));
                }
                if b.addr.checked_add(b.len).is_none() {
                    return Err(Error::InvalidArgument(format!(
                        "KV {kind} {i} wraps the address space"
                    )));
                }
            }
        }
        Ok(KvLayout { buffers, aux })
    }

    /// Pages every buffer can hold (valid page indices are `0..pages()`).
    pub fn pages(&self) -> u64 {
        self.buffers.iter().map(KvBuffer::items).min().unwrap_or(0)
    }

    /// Aux slots every aux buffer can hold (0 without aux buffers).
    pub fn aux_slots(&self) -> u64 {
        self.aux.iter().map(KvBuffer::items).min().unwrap_or(0)
    }

    /// Bytes of one page across every buffer.
    pub fn page_bytes(&self) -> u64 {
        self.buffers.iter().map(|b| b.item_len).sum()
    }

    /// Bytes of one aux slot across every aux buffer.
    pub fn aux_bytes(&self) -> u64 {
        self.aux.iter().map(|b| b.item_len).sum()
    }

    /// The memory a chunk digest covers, in the order it is hashed: for every page buffer in
    /// layout order, the item of each of `pages` in order (runs of consecutive pages as one
    /// range); then, if `aux` is set, that slot of every aux buffer. Pages and slot must be in
    /// range (checked by the room calls).
    pub fn digest_ranges(&self, pages: &[i32], aux: Option<u32>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in &self.buffers {
            for &p in pages {
                let (addr, len) = (b.addr + p as u64 * b.item_len, b.item_len);
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == addr => last.1 += len,
                    _ => out.push((addr, len)),
                }
            }
        }
        if let Some(slot) = aux {
            out.extend(
                self.aux
                    .iter()
                    .map(|b| (b.addr + slot as u64 * b.item_len, b.item_len)),
            );
        }
        out
    }

    /// Checks that pages of `self` can be copied to pages of `dst`: the same number of
    /// buffers with the same item sizes, in order, and the same for aux.
    pub fn check_pairs_with(&self, dst: &KvLayout) -> Result<()> {
        let mismatch = |reason: String| Err(Error::LayoutMismatch { reason });
        for (kind, a, b) in [
            ("page", &self.buffers, &dst.buffers),
            ("aux", &self.aux, &dst.aux),
        ] {
            if a.len() != b.len() {
                return mismatch(format!(
                    "{} {kind} buffers here, {} at the peer",
                    a.len(),
                    b.len()
                ));
            }
            if let Some((i, (x, y))) = a
                .iter()
                .zip(b.iter())
                .enumerate()
                .find(|(_, (x, y))| x.item_len != y.item_len)
            {
                return mismatch(format!(
                    "{kind} buffer {i}: item_len {} here, {} at the peer",
                    x.item_len, y.item_len
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn digest_ranges_go_buffer_by_buffer_and_join_consecutive_pages() {
        let l = super::KvLayout::new(
            vec![
                super::KvBuffer {
                    addr: 0x10000,
                    len: 8 * 100,
                    item_len: 100,
                },
                super::KvBuffer {
                    addr: 0x20000,
                    len: 8 * 10,
                    item_len: 10,
                },
            ],
            vec![super::KvBuffer {
                addr: 0x30000,
                len: 4 * 7,
                item_len: 7,
            }],
        )
        .unwrap();
        assert_eq!(
            l.digest_ranges(&[3, 4, 5, 1], Some(2)),
            vec![
                (0x10000 + 300, 300),
                (0x10000 + 100, 100),
                (0x20000 + 30, 30),
                (0x20000 + 10, 10),
                (0x30000 + 14, 7),
            ]
        );
        assert_eq!(l.digest_ranges(&[], Some(0)), vec![(0x30000, 7)]);
        assert!(l.digest_ranges(&[], None).is_empty());
    }

    use super::*;

    fn buf(addr: u64, len: u64, item_len: u64) -> KvBuffer {
        KvBuffer {
            addr,
            len,
            item_len,
        }
    }

    #[test]
    fn pages_are_the_smallest_buffer_s() {
        let l = KvLayout::new(
            vec![buf(0x1000, 10 * 64, 64), buf(0x9000, 7 * 32 + 5, 32)],
            vec![buf(0x20000, 4 * 8, 8)],
        )
        .unwrap();
        assert_eq!(l.pages(), 7);
        assert_eq!(l.aux_slots(), 4);
        assert_eq!(l.page_bytes(), 96);
        assert_eq!(l.aux_bytes(), 8);
        assert_eq!(l.buffers[1].item_addr(3), 0x9000 + 96);
    }

    #[test]
    fn bad_buffers_are_refused() {
        assert!(KvLayout::new(vec![], vec![]).is_err());
        assert!(KvLayout::new(vec![buf(0, 64, 64)], vec![]).is_err());
        assert!(KvLayout::new(vec![buf(0x1000, 64, 0)], vec![]).is_err());
        assert!(KvLayout::new(vec![buf(0x1000, 63, 64)], vec![]).is_err());
        assert!(KvLayout::new(vec![buf(0x1000, 64, 64)], vec![buf(0x1000, 4, 8)]).is_err());
        assert!(KvLayout::new(vec![buf(u64::MAX - 10, 64, 64)], vec![]).is_err());
    }

    #[test]
    fn pairing_needs_equal_item_sizes_in_order() {
        let a = KvLayout::new(vec![buf(0x1000, 640, 64), buf(0x2000, 320, 32)], vec![]).unwrap();
        let b = KvLayout::new(vec![buf(0x5000, 6400, 64), buf(0x9000, 32, 32)], vec![]).unwrap();
        a.check_pairs_with(&b).unwrap();
        let swapped =
            KvLayout::new(vec![buf(0x2000, 320, 32), buf(0x1000, 640, 64)], vec![]).unwrap();
        let e = a.check_pairs_with(&swapped).unwrap_err().to_string();
        assert!(
            e.contains("page buffer 0: item_len 64 here, 32 at the peer"),
            "{e}"
        );
        let with_aux = KvLayout::new(b.buffers.clone(), vec![buf(0x7000, 64, 8)]).unwrap();
        let e = a.check_pairs_with(&with_aux).unwrap_err().to_string();
        assert!(e.contains("0 aux buffers here, 1 at the peer"), "{e}");
    }
}
