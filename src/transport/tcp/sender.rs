//! The send pool: a fixed number of threads write for every TCP connection of an engine.
//!
//! Each connection queues what it has to send in its [`Outbox`] and is scheduled on the pool
//! when its outbox goes from idle to busy. A pool thread writes a fair share of the outbox
//! (blocking on the socket for at most the connection's stall limit), then goes on to the
//! next connection, so a connection with a long queue or a slow peer holds one pool thread
//! at a time, never all of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TryRecvError, bounded, unbounded};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Items a pool thread writes for one connection before it lets the next one go.
const FAIR_SHARE: usize = 64;

/// Something a pool thread writes for.
pub(crate) trait Flush: Send + Sync {
    /// Writes some of what is queued; true when more remains and it must run again.
    fn flush(&self) -> bool;
}

type Job = Option<Arc<dyn Flush>>;

/// The pool's threads and the queue of connections with something to send.
pub(crate) struct SendPool {
    jobs: Sender<Job>,
    queue: Receiver<Job>,
    stopped: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl SendPool {
    /// Starts `threads` pool threads (at least one).
    pub(crate) fn start(threads: usize) -> Result<Arc<Self>> {
        let (jobs, queue) = unbounded();
        let pool = Arc::new(SendPool {
            jobs,
            queue,
            stopped: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        for i in 0..threads.max(1) {
            let queue = pool.queue.clone();
            let jobs = pool.jobs.clone();
            let spawned = thread::Builder::new()
                .name(format!("kvt-send{i}"))
                .spawn(move || {
                    while let Ok(Some(job)) = queue.recv() {
                        if job.flush() {
                            let _ = jobs.send(Some(job));
                        }
                    }
                });
            match spawned {
                Ok(t) => pool.threads.lock().push(t),
                Err(e) => {
                    pool.stop();
                    return Err(Error::io("spawn", e));
                }
            }
        }
        Ok(pool)
    }

    /// Has a pool thread run `job` (after stop, the calling thread runs it to the end).
    pub(crate) fn schedule(&self, job: Arc<dyn Flush>) {
        if self.stopped.load(Ordering::Acquire) {
            while job.flush() {}
            return;
        }
        let _ = self.jobs.send(Some(job));
    }

    /// Stops the pool threads and waits for them (except the calling one); jobs still
    /// queued run to the end on the calling thread, so nothing queued is left behind.
    pub(crate) fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        for _ in &threads {
            let _ = self.jobs.send(None);
        }
        let me = thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        while let Ok(job) = self.queue.try_recv() {
            if let Some(job) = job {
                while job.flush() {}
            }
        }
    }
}

/// A connection's queue of things to send, and whether the connection is scheduled on the
/// pool. Whoever makes the outbox busy schedules its owner; the pool thread that empties it
/// makes it idle again.
pub(crate) struct Outbox<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
    scheduled: AtomicBool,
}

impl<T> Outbox<T> {
    /// An outbox holding at most `bound` items (`None`: no bound; the caller bounds it).
    pub(crate) fn new(bound: Option<usize>) -> Self {
        let (tx, rx) = match bound {
            Some(n) => bounded(n),
            None => unbounded(),
        };
        Outbox {
            tx,
            rx,
            scheduled: AtomicBool::new(false),
        }
    }

    /// Queues `item`, waiting until `deadline` for room. `Ok(true)`: the caller must
    /// schedule the owner on the pool.
    pub(crate) fn push(
        &self,
        item: T,
        deadline: Instant,
    ) -> std::result::Result<bool, SendTimeoutError<T>> {
        let wait = deadline.saturating_duration_since(Instant::now());
        self.tx.send_timeout(item, wait)?;
        Ok(!self.scheduled.swap(true, Ordering::SeqCst))
    }

    /// Items waiting.
    pub(crate) fn len(&self) -> usize {
        self.rx.len()
    }

    /// Nothing waits and no pool thread is writing for the owner.
    pub(crate) fn is_idle(&self) -> bool {
        !self.scheduled.load(Ordering::SeqCst) && self.rx.is_empty()
    }

    /// Pool side: hands up to a fair share of items to `write`, in order. True when more
    /// remain and the owner must run again. Once this has made the outbox idle, a push may
    /// schedule the owner again before this call returns: owners hold their writer lock
    /// across the call, so that the next run writes after this one.
    pub(crate) fn flush_with(&self, mut write: impl FnMut(T)) -> bool {
        for _ in 0..FAIR_SHARE {
            match self.rx.try_recv() {
                Ok(item) => write(item),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        if !self.rx.is_empty() {
            return true;
        }
        self.scheduled.store(false, Ordering::SeqCst);
        // An item pushed after the emptiness check saw the flag still set and scheduled
        // nothing: take the owner back unless a later push already did.
        !self.rx.is_empty() && !self.scheduled.swap(true, Ordering::SeqCst)
    }

    /// Takes every waiting item (a dead connection writes them off).
    pub(crate) fn take_all(&self) -> Vec<T> {
        self.rx.try_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// Records items in order, per owner.
    struct Owner {
        me: std::sync::Weak<Owner>,
        pool: Arc<SendPool>,
        outbox: Outbox<usize>,
        writer: Mutex<()>,
        written: Mutex<Vec<usize>>,
        writing: AtomicUsize,
        overlaps: AtomicUsize,
    }

    impl Owner {
        fn push(&self, i: usize) {
            let far = Instant::now() + Duration::from_secs(10);
            if self.outbox.push(i, far).ok().unwrap() {
                self.pool.schedule(self.me.upgrade().unwrap());
            }
        }
    }

    impl Flush for Owner {
        fn flush(&self) -> bool {
            // As connections hold their writer lock (see `Outbox::flush_with`).
            let _writer = self.writer.lock();
            self.outbox.flush_with(|i| {
                if self.writing.fetch_add(1, Ordering::SeqCst) != 0 {
                    self.overlaps.fetch_add(1, Ordering::SeqCst);
                }
                self.written.lock().push(i);
                self.writing.fetch_sub(1, Ordering::SeqCst);
            })
        }
    }

    #[test]
    fn every_item_is_written_once_in_order_by_one_thread_at_a_time() {
        let pool = SendPool::start(3).unwrap();
        let owners: Vec<Arc<Owner>> = (0..8)
            .map(|_| {
                Arc::new_cyclic(|me| Owner {
                    me: me.clone(),
                    pool: pool.clone(),
                    outbox: Outbox::new(Some(16)),
                    writer: Mutex::new(()),
                    written: Mutex::new(Vec::new()),
                    writing: AtomicUsize::new(0),
                    overlaps: AtomicUsize::new(0),
                })
            })
            .collect();
        let pushers: Vec<_> = owners
            .iter()
            .map(|o| {
                let o = o.clone();
                thread::spawn(move || (0..2_000).for_each(|i| o.push(i)))
            })
            .collect();
        pushers.into_iter().for_each(|t| t.join().unwrap());
        // Stop runs whatever is still queued, so every item is written when it returns.
        pool.stop();
        for o in &owners {
            assert_eq!(*o.written.lock(), (0..2_000).collect::<Vec<_>>());
            assert_eq!(o.overlaps.load(Ordering::SeqCst), 0);
            assert!(o.outbox.is_idle());
        }
    }

    #[test]
    fn a_full_outbox_gives_the_item_back_at_the_deadline() {
        let outbox = Outbox::new(Some(1));
        assert!(outbox.push(1, Instant::now()).unwrap());
        // Already scheduled: the second push does not ask for scheduling again.
        let e = outbox.push(2, Instant::now() + Duration::from_millis(20));
        assert!(matches!(e, Err(SendTimeoutError::Timeout(2))));
        assert_eq!(outbox.take_all(), vec![1]);
    }
}
