//! Work requests of one queue pair between posting and completion, in posting order. Pure
//! logic, owned by the rail worker (no locks), unit-tested here.
//!
//! Every work request gets a sequence number and a `wr_id` that names its lane slot and the
//! low 32 bits of that number, signalled or not: an RC send queue completes in order, and a
//! failing request reports an error completion even when unsignaled, so any completion
//! says exactly which requests before it are done and which one failed.

use std::collections::VecDeque;

/// Encodes a work request id: lane slot + 1 in the high half (0 is never a valid id), the
/// sequence number's low 32 bits in the low half.
pub(crate) fn wr_id(slot: u32, seq: u64) -> u64 {
    (u64::from(slot) + 1) << 32 | (seq & 0xffff_ffff)
}

/// Decodes [`wr_id`] into `(slot, low 32 bits of the sequence)`; `None` for ids we never
/// give out (0, which a foreign or zeroed completion would carry).
pub(crate) fn split_wr_id(id: u64) -> Option<(u32, u32)> {
    let hi = (id >> 32) as u32;
    (hi != 0).then(|| (hi - 1, id as u32))
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

/// The in-flight window of one send queue. `T` is what a signalled request carries (the
/// batch unit it finishes); it is handed back once every request it covers is complete.
#[derive(Debug)]
pub(crate) struct Outstanding<T> {
    /// Sequence number the next posted request gets.
    next: u64,
    /// Oldest request not yet known complete.
    done: u64,
    /// `(sequence, owner)` of each signalled request still in flight, oldest first.
    marks: VecDeque<(u64, T)>,
}

impl<T> Default for Outstanding<T> {
    fn default() -> Self {
        Outstanding {
            next: 0,
            done: 0,
            marks: VecDeque::new(),
        }
    }
}

impl<T> Outstanding<T> {
    /// Requests posted and not yet complete.
    pub(crate) fn in_flight(&self) -> u64 {
        self.next - self.done
    }

    /// Reserves `n` sequence numbers for a chain about to be posted; returns the first.
    pub(crate) fn reserve(&mut self, n: u32) -> u64 {
        let first = self.next;
        self.next += u64::from(n);
        first
    }

    /// Takes back the last reservation of `n` (its chain was not posted).
    pub(crate) fn unreserve(&mut self, first: u64, n: u32) {
        debug_assert_eq!(first + u64::from(n), self.next, "only the last chain");
        self.next = first;
        while self.marks.back().is_some_and(|(s, _)| *s >= first) {
            self.marks.pop_back();
        }
    }

    /// Records that request `seq` is signalled and finishes `owner`.
    pub(crate) fn mark(&mut self, seq: u64, owner: T) {
        debug_assert!(seq >= self.done && seq < self.next);
        debug_assert!(self.marks.back().is_none_or(|(s, _)| *s < seq));
        self.marks.push_back((seq, owner));
    }

    /// The full sequence number of an in-flight request from its low 32 bits (a wr_id's).
    pub(crate) fn resolve(&self, low: u32) -> Option<u64> {
        let ahead = u64::from(low.wrapping_sub(self.done as u32));
        (ahead < self.in_flight()).then_some(self.done + ahead)
    }

    /// The owner of request `seq`: the next signalled request at or after it (a chain's
    /// requests all belong to the owner of its signal points).
    pub(crate) fn owner_of(&self, seq: u64) -> Option<&T> {
        self.marks.iter().find(|(s, _)| *s >= seq).map(|(_, o)| o)
    }

    /// Request `seq` completed, and with it every request before it (in-order completion).
    /// Returns how many requests that frees and the owners whose requests are now all
    /// complete, oldest first.
    pub(crate) fn complete_through(&mut self, seq: u64) -> (u64, Vec<T>) {
        if seq < self.done || seq >= self.next {
            return (0, Vec::new());
        }
        let freed = seq + 1 - self.done;
        self.done = seq + 1;
        let mut owners = Vec::new();
        while self.marks.front().is_some_and(|(s, _)| *s <= seq) {
            owners.push(self.marks.pop_front().expect("checked").1);
        }
        (freed, owners)
    }

    /// Forgets every request (the QP is gone); returns how many were in flight and their
    /// owners.
    pub(crate) fn clear(&mut self) -> (u64, Vec<T>) {
        let n = self.in_flight();
        self.done = self.next;
        (n, self.marks.drain(..).map(|(_, o)| o).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wr_ids_round_trip_and_zero_is_foreign() {
        for (slot, seq) in [(0u32, 0u64), (7, 1 << 40 | 5), (u32::MAX - 1, u64::MAX)] {
            let id = wr_id(slot, seq);
            assert_ne!(id, 0);
            assert_eq!(split_wr_id(id), Some((slot, seq as u32)));
        }
        assert_eq!(split_wr_id(0), None);
        assert_eq!(split_wr_id(12345), None);
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
                assert_eq!(p.last().unwrap().0, len - 1, "the last is signalled");
                assert!(p.iter().all(|(_, c)| *c as usize <= every));
                assert!(p.windows(2).all(|w| w[0].0 < w[1].0));
            }
        }
        assert!(signal_points(0, 64).is_empty());
        assert_eq!(signal_points(130, 64), vec![(63, 64), (127, 64), (129, 2)]);
    }

    /// Posts one chain of `n` requests signalled every `every`, owned by `owner`.
    fn post(o: &mut Outstanding<&'static str>, n: u32, every: usize, owner: &'static str) -> u64 {
        let first = o.reserve(n);
        for (i, _) in signal_points(n as usize, every) {
            o.mark(first + i as u64, owner);
        }
        first
    }

    #[test]
    fn signalled_completions_free_everything_before_them() {
        let mut o = Outstanding::default();
        post(&mut o, 100, 64, "a");
        post(&mut o, 10, 64, "b");
        assert_eq!(o.in_flight(), 110);
        assert_eq!(o.complete_through(63), (64, vec!["a"]));
        assert_eq!(o.complete_through(99), (36, vec!["a"]));
        assert_eq!(o.complete_through(109), (10, vec!["b"]));
        assert_eq!(o.in_flight(), 0);
        // Stale or foreign completions change nothing.
        assert_eq!(o.complete_through(50), (0, vec![]));
    }

    #[test]
    fn an_unsignaled_failure_names_its_owner() {
        let mut o = Outstanding::default();
        post(&mut o, 100, 64, "a");
        post(&mut o, 10, 64, "b");
        // Request 70 (unsignaled, in a's chain) fails: 0..=69 completed before it.
        assert_eq!(o.owner_of(70), Some(&"a"));
        assert_eq!(o.complete_through(69), (70, vec!["a"]));
        assert_eq!(o.owner_of(100), Some(&"b"));
        let (n, owners) = o.clear();
        assert_eq!((n, owners), (40, vec!["a", "b"]));
        assert_eq!(o.owner_of(105), None);
    }

    #[test]
    fn low_bits_resolve_across_the_32_bit_wrap() {
        let mut o = Outstanding::default();
        o.next = (1 << 32) - 3;
        o.done = o.next;
        let first = post(&mut o, 8, 4, "x");
        for i in 0..8 {
            let seq = first + i;
            assert_eq!(o.resolve(seq as u32), Some(seq));
        }
        assert_eq!(o.resolve((first + 8) as u32), None, "not posted yet");
        assert_eq!(o.resolve((first - 1) as u32), None, "already complete");
        assert_eq!(o.complete_through(first + 3), (4, vec!["x"]));
        assert_eq!(o.resolve(first as u32), None);
    }

    #[test]
    fn an_unposted_chain_is_taken_back() {
        let mut o = Outstanding::default();
        post(&mut o, 5, 64, "a");
        let first = post(&mut o, 70, 64, "b");
        o.unreserve(first, 70);
        assert_eq!(o.in_flight(), 5);
        assert_eq!(o.owner_of(4), Some(&"a"));
        assert_eq!(o.owner_of(5), None);
        assert_eq!(o.complete_through(4), (5, vec!["a"]));
    }
}
