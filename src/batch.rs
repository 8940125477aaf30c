//! Completion accounting of a submitted batch.
//!
//! A batch is done when all its *units* completed: one acknowledgement per lane that carried
//! writes, plus one response per read slice. Failure is recorded at once (first reason wins)
//! and is final, but the batch keeps its local segments pinned until every unit has come back
//! or been written off by a dying connection, so memory the transport may still touch can
//! never be unregistered under it.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard};

use crate::memory::SegmentGuard;
use crate::metrics::{BatchMetrics, Outcome, PeerCounters};
use crate::request::BatchStatus;

const PENDING: u8 = 0;
const DONE: u8 = 1;
const FAILED: u8 = 2;

/// One submitted batch.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) id: u64,
    pub(crate) peer: u64,
    pub(crate) deadline: Instant,
    pub(crate) timeout: Duration,
    /// Lanes that carry slices of this batch (for caller-driven progress).
    pub(crate) lanes: Vec<u16>,
    remaining: AtomicU32,
    state: AtomicU8,
    reason: Mutex<Option<String>>,
    /// Held (shared) while bytes of a read are copied into local memory; taken exclusively to
    /// fail the batch, so no byte lands after `Failed` is visible.
    copy_lock: RwLock<()>,
    guards: Mutex<Vec<SegmentGuard>>,
    /// When the last unit came back.
    settled_at: std::sync::OnceLock<Instant>,
    /// When the batch became final.
    ended_at: std::sync::OnceLock<Instant>,
    waiting: AtomicBool,
    wake: (Mutex<()>, Condvar),
    /// Where the batch is counted when it ends (none in unit tests).
    record: Option<Record>,
}

/// What a batch adds to its peer's metrics when it ends.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) peer: PeerCounters,
    pub(crate) started: Instant,
    pub(crate) written: u64,
    pub(crate) read: u64,
}

impl Batch {
    /// A batch waiting for `units` completions.
    pub(crate) fn new(
        id: u64,
        peer: u64,
        timeout: Duration,
        units: u32,
        lanes: Vec<u16>,
        guards: Vec<SegmentGuard>,
    ) -> Self {
        Batch {
            id,
            peer,
            deadline: Instant::now() + timeout,
            timeout,
            lanes,
            remaining: AtomicU32::new(units),
            state: AtomicU8::new(if units == 0 { DONE } else { PENDING }),
            reason: Mutex::new(None),
            copy_lock: RwLock::new(()),
            guards: Mutex::new(if units == 0 { Vec::new() } else { guards }),
            settled_at: std::sync::OnceLock::new(),
            ended_at: if units == 0 {
                std::sync::OnceLock::from(Instant::now())
            } else {
                std::sync::OnceLock::new()
            },
            waiting: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            record: None,
        }
    }

    /// Counts the batch in `record` when it ends.
    pub(crate) fn recorded(mut self, record: Record) -> Self {
        if self.is_final() {
            record
                .peer
                .batch_ended(Outcome::Done, record.started, record.written, record.read);
        } else {
            self.record = Some(record);
        }
        self
    }

    /// The batch just became final with `outcome`.
    fn ended(&self, outcome: Outcome) {
        let _ = self.ended_at.set(Instant::now());
        if let Some(r) = &self.record {
            r.peer.batch_ended(outcome, r.started, r.written, r.read);
        }
    }

    /// Bytes and, once final, submit-to-end latency (zero bytes in unit tests, which record
    /// nothing).
    pub(crate) fn metrics(&self) -> BatchMetrics {
        let Some(r) = &self.record else {
            return BatchMetrics::default();
        };
        BatchMetrics {
            bytes_written: r.written,
            bytes_read: r.read,
            latency: self
                .ended_at
                .get()
                .map(|end| end.saturating_duration_since(r.started)),
        }
    }

    /// Current status; never blocks.
    pub(crate) fn status(&self) -> BatchStatus {
        match self.state.load(Ordering::SeqCst) {
            PENDING => BatchStatus::Pending,
            DONE => BatchStatus::Done,
            _ => BatchStatus::Failed(self.reason.lock().clone().unwrap_or_default()),
        }
    }

    /// True once the batch failed.
    pub(crate) fn is_failed(&self) -> bool {
        self.state.load(Ordering::SeqCst) == FAILED
    }

    /// True once the batch is done or failed.
    pub(crate) fn is_final(&self) -> bool {
        self.state.load(Ordering::SeqCst) != PENDING
    }

    /// When every unit had come back (nothing of the batch left in the transport).
    pub(crate) fn settled_at(&self) -> Option<Instant> {
        self.settled_at.get().copied()
    }

    /// Units still outstanding.
    pub(crate) fn remaining(&self) -> u32 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Marks the batch failed (first reason wins); no-op once final.
    pub(crate) fn fail(&self, reason: impl Into<String>) {
        if self.is_final() {
            return;
        }
        let _exclusive = self.copy_lock.write();
        let mut r = self.reason.lock();
        if self
            .state
            .compare_exchange(PENDING, FAILED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            *r = Some(reason.into());
            drop(r);
            self.ended(Outcome::Failed);
            self.notify();
        }
    }

    /// Fails the batch if its deadline passed and the copy lock is free right now.
    /// Returns true when the batch is (now) final.
    pub(crate) fn check_deadline(&self, now: Instant) -> bool {
        if self.is_final() {
            return true;
        }
        if now < self.deadline {
            return false;
        }
        if let Some(_exclusive) = self.copy_lock.try_write() {
            let mut r = self.reason.lock();
            if self
                .state
                .compare_exchange(PENDING, FAILED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                *r = Some(format!(
                    "deadline of {} ms exceeded with {} of its completions outstanding",
                    self.timeout.as_millis(),
                    self.remaining()
                ));
                drop(r);
                self.ended(Outcome::TimedOut);
                self.notify();
            }
        }
        self.is_final()
    }

    /// Records one completed unit; `Err` fails the batch with that reason.
    pub(crate) fn complete_unit(&self, result: Result<(), String>) {
        if let Err(reason) = result {
            self.fail(reason);
        }
        let before = self.remaining.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(
            before > 0,
            "batch {} completed more units than it had",
            self.id
        );
        if before == 1 {
            let _ = self.settled_at.set(Instant::now());
            if self
                .state
                .compare_exchange(PENDING, DONE, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                self.ended(Outcome::Done);
            }
            // Nothing of this batch is in the transport any more: unpin local memory.
            self.guards.lock().clear();
            self.notify();
        }
    }

    /// Records `n` units as written off because `reason` (a lost connection, a failed batch).
    pub(crate) fn abandon_units(&self, n: u32, reason: &str) {
        for _ in 0..n {
            self.complete_unit(Err(reason.to_string()));
        }
    }

    /// Shared copy permission for writing read data into local memory, or `None` if the batch
    /// already failed (the bytes must then be discarded).
    pub(crate) fn copy_permit(&self) -> Option<RwLockReadGuard<'_, ()>> {
        let g = self.copy_lock.read();
        (!self.is_failed()).then_some(g)
    }

    /// Blocks until the batch is final, `until` passes, or a wake-up; returns true if final.
    pub(crate) fn sleep_until(&self, until: Instant) -> bool {
        let mut g = self.wake.0.lock();
        self.waiting.store(true, Ordering::SeqCst);
        if !self.is_final() {
            let _ = self.wake.1.wait_until(&mut g, until);
        }
        self.is_final()
    }

    fn notify(&self) {
        if self.waiting.load(Ordering::SeqCst) {
            let _g = self.wake.0.lock();
            self.wake.1.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryKind, SegmentTable};

    fn batch(units: u32, guards: Vec<SegmentGuard>) -> Batch {
        Batch::new(1, 1, Duration::from_secs(10), units, vec![0], guards)
    }

    #[test]
    fn done_after_all_units() {
        let b = batch(3, vec![]);
        assert_eq!(b.status(), BatchStatus::Pending);
        b.complete_unit(Ok(()));
        b.complete_unit(Ok(()));
        assert_eq!(b.status(), BatchStatus::Pending);
        b.complete_unit(Ok(()));
        assert_eq!(b.status(), BatchStatus::Done);
    }

    #[test]
    fn failure_is_immediate_final_and_first_reason_wins() {
        let b = batch(3, vec![]);
        b.complete_unit(Err("first".into()));
        assert_eq!(b.status(), BatchStatus::Failed("first".into()));
        b.complete_unit(Err("second".into()));
        b.complete_unit(Ok(()));
        assert_eq!(b.status(), BatchStatus::Failed("first".into()));
        assert_eq!(b.remaining(), 0);
    }

    #[test]
    fn memory_stays_pinned_until_every_unit_is_back() {
        let t = SegmentTable::default();
        let s = t.register(0x1000, 64, MemoryKind::Host).unwrap();
        let b = batch(2, vec![t.pin_range(s.id, 0, 1).unwrap()]);
        b.fail("timed out");
        assert!(b.is_failed());
        assert!(
            t.unregister(s.id).is_err(),
            "a failed batch with units outstanding still pins"
        );
        b.abandon_units(2, "connection closed");
        t.unregister(s.id).unwrap();
    }

    #[test]
    fn deadline_fails_only_after_it_passes() {
        let b = Batch::new(1, 1, Duration::from_millis(5), 1, vec![0], vec![]);
        assert!(!b.check_deadline(Instant::now()));
        assert!(b.check_deadline(Instant::now() + Duration::from_millis(6)));
        assert!(matches!(b.status(), BatchStatus::Failed(r) if r.contains("deadline")));
    }

    #[test]
    fn copy_permit_refused_after_failure() {
        let b = batch(1, vec![]);
        assert!(b.copy_permit().is_some());
        b.fail("x");
        assert!(b.copy_permit().is_none());
    }

    #[test]
    fn zero_units_is_done() {
        assert_eq!(batch(0, vec![]).status(), BatchStatus::Done);
    }
}
