//! Pure page logic: checking page indices and turning (source page, destination page) pairs
//! into writes, one per run that is contiguous on both sides, per layer buffer.

use super::layout::{KvBuffer, KvLayout};
use crate::memory::SegmentId;
use crate::request::Request;

/// Pages `[src, src + len)` go to pages `[dst, dst + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First source page.
    pub src: u32,
    /// First destination page.
    pub dst: u32,
    /// Pages in the run.
    pub len: u32,
}

/// Checks that every index is in `0..limit`; the reason names the first bad one.
pub fn check_pages(pages: &[i32], limit: u64, what: &str) -> Result<(), String> {
    match pages.iter().position(|&p| p < 0 || p as u64 >= limit) {
        None => Ok(()),
        Some(i) if pages[i] < 0 => Err(format!("{what} page {i} is negative ({})", pages[i])),
        Some(i) => Err(format!(
            "{what} page {i} is {}, outside 0..{limit}",
            pages[i]
        )),
    }
}

/// Checks that no destination page appears twice (two sources would race for it).
pub fn check_distinct(pages: &[i32]) -> Result<(), String> {
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    match sorted.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(format!("destination page {} appears more than once", w[0])),
        None => Ok(()),
    }
}

/// Splits the pairs `(src[i], dst[i])` into maximal runs contiguous on both sides, in order.
/// Indices must have been checked (non-negative); `src` and `dst` have the same length.
pub fn runs(src: &[i32], dst: &[i32], out: &mut Vec<Run>) {
    debug_assert_eq!(src.len(), dst.len());
    let mut current: Option<Run> = None;
    for (&s, &d) in src.iter().zip(dst) {
        let (s, d) = (s as u32, d as u32);
        match &mut current {
            Some(r) if r.src + r.len == s && r.dst + r.len == d => r.len += 1,
            _ => {
                if let Some(r) = current.take() {
                    out.push(r);
                }
                current = Some(Run {
                    src: s,
                    dst: d,
                    len: 1,
                });
            }
        }
    }
    out.extend(current);
}

/// A destination buffer as the sender addresses it: the peer's segment and the buffer's
/// offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuffer {
    /// The peer's segment holding the buffer.
    pub segment: SegmentId,
    /// Offset of the buffer's first byte in that segment.
    pub offset: u64,
    /// Bytes of one item (must equal the source buffer's).
    pub item_len: u64,
}

/// Appends one write per run per buffer (buffer-major, runs in order). `dst` pairs with
/// `src.buffers` by position.
pub fn expand(runs: &[Run], src: &KvLayout, dst: &[RemoteBuffer], out: &mut Vec<Request>) {
    debug_assert_eq!(src.buffers.len(), dst.len());
    out.reserve(runs.len() * dst.len());
    for (s, d) in src.buffers.iter().zip(dst) {
        let item = s.item_len;
        out.extend(runs.iter().map(|r| {
            Request::write(
                s.item_addr(r.src as u64),
                r.len as u64 * item,
                d.segment,
                d.offset + r.dst as u64 * item,
            )
        }));
    }
}

/// Appends the writes that copy aux slot `src_index` of every source aux buffer to slot
/// `dst_index` of the paired destination buffer.
pub fn expand_aux(
    src: &[KvBuffer],
    src_index: u32,
    dst: &[RemoteBuffer],
    dst_index: u32,
    out: &mut Vec<Request>,
) {
    for (s, d) in src.iter().zip(dst) {
        out.push(Request::write(
            s.item_addr(src_index as u64),
            s.item_len,
            d.segment,
            d.offset + dst_index as u64 * d.item_len,
        ));
    }
}

/// One buffer of a paged transfer outside a room: page `p` is the `item_len` bytes at
/// `local + p * item_len` here and at the peer's segment `remote.segment`, offset
/// `remote.offset + p * item_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedBuffer {
    /// Local address of page 0.
    pub local: u64,
    /// Where page 0 is at the peer (its `item_len` is this buffer's).
    pub remote: RemoteBuffer,
}

/// Appends one request per run per buffer (buffer-major, runs in order) moving the runs'
/// pages in direction `op`. `None` when a page's byte offset overflows `u64` (nothing is
/// appended then); ranges are checked against segments when the batch is submitted.
pub fn expand_paged(
    runs: &[Run],
    buffers: &[PagedBuffer],
    op: crate::request::Op,
    out: &mut Vec<Request>,
) -> Option<()> {
    let start = out.len();
    out.reserve(runs.len() * buffers.len());
    for b in buffers {
        let item = b.remote.item_len;
        for r in runs {
            let made = (|| {
                let local = b.local.checked_add((r.src as u64).checked_mul(item)?)?;
                let remote = b
                    .remote
                    .offset
                    .checked_add((r.dst as u64).checked_mul(item)?)?;
                let len = (r.len as u64).checked_mul(item)?;
                Some(match op {
                    crate::request::Op::Write => {
                        Request::write(local, len, b.remote.segment, remote)
                    }
                    crate::request::Op::Read => Request::read(local, len, b.remote.segment, remote),
                })
            })();
            match made {
                Some(req) => out.push(req),
                None => {
                    out.truncate(start);
                    return None;
                }
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paged_requests_follow_runs_per_buffer_in_both_directions() {
        let mut rs = Vec::new();
        runs(&[0, 1, 5], &[7, 8, 2], &mut rs);
        let bufs = [
            PagedBuffer {
                local: 0x1000,
                remote: RemoteBuffer {
                    segment: SegmentId(3),
                    offset: 64,
                    item_len: 16,
                },
            },
            PagedBuffer {
                local: 0x9000,
                remote: RemoteBuffer {
                    segment: SegmentId(4),
                    offset: 0,
                    item_len: 8,
                },
            },
        ];
        let mut out = Vec::new();
        expand_paged(&rs, &bufs, crate::request::Op::Write, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Request::write(0x1000, 32, SegmentId(3), 64 + 7 * 16),
                Request::write(0x1000 + 5 * 16, 16, SegmentId(3), 64 + 2 * 16),
                Request::write(0x9000, 16, SegmentId(4), 7 * 8),
                Request::write(0x9000 + 5 * 8, 8, SegmentId(4), 2 * 8),
            ]
        );
        let mut back = Vec::new();
        expand_paged(&rs, &bufs[..1], crate::request::Op::Read, &mut back).unwrap();
        assert_eq!(
            back[0],
            Request::read(0x1000, 32, SegmentId(3), 64 + 7 * 16)
        );
        // An offset that overflows appends nothing.
        let huge = [PagedBuffer {
            local: u64::MAX - 8,
            ..bufs[0]
        }];
        let mut none = vec![back[0]];
        assert!(expand_paged(&rs, &huge, crate::request::Op::Write, &mut none).is_none());
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn bad_indices_are_named() {
        assert_eq!(check_pages(&[0, 3, 9], 10, "source"), Ok(()));
        assert_eq!(
            check_pages(&[0, -1], 10, "source").unwrap_err(),
            "source page 1 is negative (-1)"
        );
        assert_eq!(
            check_pages(&[10], 10, "destination").unwrap_err(),
            "destination page 0 is 10, outside 0..10"
        );
        assert!(check_distinct(&[3, 1, 2]).is_ok());
        assert_eq!(
            check_distinct(&[3, 1, 3]).unwrap_err(),
            "destination page 3 appears more than once"
        );
    }

    #[test]
    fn runs_break_where_either_side_jumps() {
        let mut out = Vec::new();
        runs(&[0, 1, 2, 7, 8, 3], &[10, 11, 5, 6, 7, 8], &mut out);
        let got: Vec<(u32, u32, u32)> = out.iter().map(|r| (r.src, r.dst, r.len)).collect();
        assert_eq!(got, [(0, 10, 2), (2, 5, 1), (7, 6, 2), (3, 8, 1)]);
        out.clear();
        runs(&[], &[], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn expansion_writes_every_run_of_every_buffer() {
        let layout = KvLayout::new(
            vec![
                KvBuffer {
                    addr: 0x10000,
                    len: 0x1000,
                    item_len: 0x100,
                },
                KvBuffer {
                    addr: 0x20000,
                    len: 0x800,
                    item_len: 0x80,
                },
            ],
            vec![],
        )
        .unwrap();
        let dst = [
            RemoteBuffer {
                segment: SegmentId(4),
                offset: 0x40,
                item_len: 0x100,
            },
            RemoteBuffer {
                segment: SegmentId(5),
                offset: 0,
                item_len: 0x80,
            },
        ];
        let mut out = Vec::new();
        expand(
            &[Run {
                src: 1,
                dst: 3,
                len: 2,
            }],
            &layout,
            &dst,
            &mut out,
        );
        assert_eq!(
            out,
            [
                Request::write(0x10100, 0x200, SegmentId(4), 0x40 + 0x300),
                Request::write(0x20080, 0x100, SegmentId(5), 0x180),
            ]
        );
    }

    proptest! {
        /// Runs cover exactly the given pairs, in order, each contiguous on both sides.
        #[test]
        fn runs_preserve_every_pair(pairs in prop::collection::vec((0i32..64, 0i32..64), 0..200)) {
            let (src, dst): (Vec<i32>, Vec<i32>) = pairs.iter().copied().unzip();
            let mut out = Vec::new();
            runs(&src, &dst, &mut out);
            let mut back = Vec::new();
            for r in &out {
                prop_assert!(r.len >= 1);
                for k in 0..r.len {
                    back.push(((r.src + k) as i32, (r.dst + k) as i32));
                }
            }
            prop_assert_eq!(back, pairs);
            for w in out.windows(2) {
                let joinable = w[0].src + w[0].len == w[1].src && w[0].dst + w[0].len == w[1].dst;
                prop_assert!(!joinable, "runs are maximal");
            }
        }
    }
}
