//! Connector threads: the blocking connects of a prefill manager's data paths (an engine
//! connect to each decode engine, which may set up RDMA) run here, never on a caller's thread
//! or the driver's; control channels connect without blocking, in `wires`. At most
//! [`MAX_CONNECTORS`] run at once and idle ones leave after 250 ms, so a manager that is not
//! connecting holds none.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

/// A blocking connect to run.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Up to [`MAX_CONNECTORS`] threads that run blocking connects; idle ones leave after 250 ms.
pub(crate) struct Connector {
    tx: Sender<Job>,
    rx: Receiver<Job>,
    state: Arc<Mutex<(usize, usize)>>,
}

/// Most connects in progress at once.
const MAX_CONNECTORS: usize = 4;
/// How long an idle connector thread waits for more work before it leaves.
const IDLE: Duration = Duration::from_millis(250);

impl Connector {
    /// No thread until the first job.
    pub(crate) fn new() -> Connector {
        let (tx, rx) = crossbeam_channel::unbounded();
        Connector {
            tx,
            rx,
            state: Arc::new(Mutex::new((0, 0))),
        }
    }

    /// Runs `job` on an idle connector thread, or a new one while fewer than the most run.
    pub(crate) fn submit(&self, job: Job) {
        let mut st = self.state.lock();
        let _ = self.tx.send(job);
        let (workers, idle) = *st;
        if idle > 0 || workers >= MAX_CONNECTORS {
            return;
        }
        st.0 += 1;
        let (rx, state) = (self.rx.clone(), self.state.clone());
        let spawned = thread::Builder::new()
            .name("kvt-kv-connect".into())
            .spawn(move || connector(rx, state));
        if spawned.is_err() {
            st.0 -= 1;
        }
    }
}

fn connector(rx: Receiver<Job>, state: Arc<Mutex<(usize, usize)>>) {
    loop {
        state.lock().1 += 1;
        let r = rx.recv_timeout(IDLE);
        {
            let mut st = state.lock();
            st.1 -= 1;
            if matches!(
                r,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected)
            ) && rx.is_empty()
            {
                st.0 -= 1;
                return;
            }
        }
        if let Ok(job) = r {
            job();
        }
    }
}
