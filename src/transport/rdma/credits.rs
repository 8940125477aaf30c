//! Send-queue accounting of a QP: how many work requests may be posted, and where a chain is
//! signalled. Pure logic (atomics only), unit-tested here.

use std::sync::atomic::{AtomicI64, Ordering};

/// Free send-queue slots of one QP. Posting takes slots; each signalled completion gives back
/// the slots of every work request it covers (RC completes a send queue in order).
#[derive(Debug)]
pub(crate) struct Credits {
    free: AtomicI64,
    depth: i64,
}

impl Credits {
    /// A QP with `depth` send-queue slots, all free.
    pub(crate) fn new(depth: u32) -> Self {
        Credits {
            free: AtomicI64::new(depth as i64),
            depth: depth as i64,
        }
    }

    /// Takes up to `want` slots; returns how many were taken (0 when the queue is full).
    pub(crate) fn take(&self, want: usize) -> usize {
        let mut have = self.free.load(Ordering::Acquire);
        loop {
            let n = have.min(want as i64);
            if n <= 0 {
                return 0;
            }
            match self.free.compare_exchange_weak(
                have,
                have - n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return n as usize,
                Err(now) => have = now,
            }
        }
    }

    /// Gives back `n` slots.
    pub(crate) fn give(&self, n: u32) {
        let before = self.free.fetch_add(n as i64, Ordering::AcqRel);
        debug_assert!(
            before + n as i64 <= self.depth,
            "more credits returned than taken"
        );
    }

    /// Slots in use (posted, completion not yet seen).
    pub(crate) fn in_use(&self) -> usize {
        (self.depth - self.free.load(Ordering::Acquire)).max(0) as usize
    }
}

/// Where to signal a chain of `len` work requests: every `every`-th and the last. Returns
/// `(index, covers)` pairs, `covers` being the requests that completion accounts for.
pub(crate) fn signal_points(len: usize, every: usize) -> Vec<(usize, u32)> {
    let every = every.max(1);
    let mut out = Vec::with_capacity(len / every + 1);
    let mut since = 0u32;
    for i in 0..len {
        since += 1;
        if i + 1 == len || since as usize == every {
            out.push((i, since));
            since = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn take_never_exceeds_what_is_free() {
        let c = Credits::new(10);
        assert_eq!(c.take(4), 4);
        assert_eq!(c.take(10), 6);
        assert_eq!(c.take(1), 0);
        assert_eq!(c.in_use(), 10);
        c.give(3);
        assert_eq!(c.in_use(), 7);
        assert_eq!(c.take(5), 3);
        c.give(10);
        assert_eq!(c.in_use(), 0);
    }

    #[test]
    fn concurrent_take_and_give_balance() {
        let c = Arc::new(Credits::new(64));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut taken = 0u64;
                    while taken < 10_000 {
                        let n = c.take(7);
                        assert!(c.in_use() <= 64);
                        if n > 0 {
                            taken += n as u64;
                            c.give(n as u32);
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().for_each(|w| w.join().unwrap());
        assert_eq!(c.in_use(), 0);
    }

    #[test]
    fn signal_points_cover_the_chain() {
        for len in [1usize, 2, 63, 64, 65, 128, 200, 256] {
            for every in [1usize, 16, 64, 1000] {
                let p = signal_points(len, every);
                assert_eq!(
                    p.iter().map(|(_, c)| *c as usize).sum::<usize>(),
                    len,
                    "len {len} every {every}"
                );
                assert_eq!(
                    p.last().unwrap().0,
                    len - 1,
                    "the last request is always signalled"
                );
                assert!(
                    p.iter().all(|(_, c)| *c as usize <= every),
                    "no more than `every` per signal"
                );
                assert!(p.windows(2).all(|w| w[0].0 < w[1].0));
            }
        }
        assert!(signal_points(0, 64).is_empty());
        assert_eq!(signal_points(130, 64), vec![(63, 64), (127, 64), (129, 2)]);
    }
}
