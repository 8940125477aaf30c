//! The poster: one thread per prefill manager that posts the chunks `KvSender::send` planned.
//! Posting may wait when a peer's queues are full (a TCP connection's bounded outbox, an RDMA
//! rail's command queue): that wait happens here, never on a scheduler's thread. Chunks are
//! posted in the order they were sent.

use std::sync::Weak;
use std::thread;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::manager::Shared;
use super::room::{PostJob, post_job};
use crate::error::{Error, Result};

/// The poster thread and its queue.
pub(crate) struct Poster {
    tx: Mutex<Option<Sender<PostJob>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Poster {
    /// A poster with no thread yet (decode managers never start one).
    pub(crate) fn new() -> Poster {
        Poster {
            tx: Mutex::new(None),
            thread: Mutex::new(None),
        }
    }

    /// Starts the thread for manager `m`.
    pub(crate) fn start(&self, m: Weak<Shared>) -> Result<()> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let t = thread::Builder::new()
            .name("kvt-kv-post".into())
            .spawn(move || run(m, rx))
            .map_err(|e| Error::io("spawn", e))?;
        *self.tx.lock() = Some(tx);
        *self.thread.lock() = Some(t);
        Ok(())
    }

    /// Queues a chunk; gives it back when the poster has stopped (the manager is gone).
    pub(crate) fn submit(&self, job: PostJob) -> std::result::Result<(), PostJob> {
        match self.tx.lock().as_ref() {
            Some(tx) => tx.send(job).map_err(|e| e.into_inner()),
            None => Err(job),
        }
    }

    /// Lets the thread finish what is queued (rooms that ended post nothing) and joins it.
    pub(crate) fn stop(&self) {
        drop(self.tx.lock().take());
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

fn run(m: Weak<Shared>, rx: Receiver<PostJob>) {
    while let Ok(job) = rx.recv() {
        let Some(m) = m.upgrade() else { return };
        post_job(&m, job);
    }
}
