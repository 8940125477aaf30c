//! The TCP poller: a fixed number of I/O threads wait on one epoll set that holds every TCP
//! connection of an engine, so threads do not grow with peers.
//!
//! Each connection is registered with `EPOLLONESHOT`: once its socket is reported readable,
//! exactly one I/O thread runs its [`Source::ready`], and no other thread hears of the socket
//! until the source is armed again. Handlers read without blocking and never wait on a peer
//! (what they send goes through the [send pool](super::sender)), so one slow peer costs no
//! I/O thread.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// What a source wants after handling readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Arm it again for readability.
    Read,
    /// Leave it unarmed: whoever parked it calls [`Poller::arm`] later.
    Park,
    /// Forget it (the connection is over).
    Done,
}

/// A socket the poller watches.
pub(crate) trait Source: Send + Sync {
    /// The socket.
    fn fd(&self) -> BorrowedFd<'_>;
    /// The socket is readable (or failed). Runs on one I/O thread at a time per source.
    fn ready(&self) -> Next;
    /// The source is about to be armed (by [`Poller::arm`], whoever called it).
    fn arming(&self) {}
    /// A deferred arm ([`Poller::arm_later`]) is due: arm now, or not yet.
    fn due(&self) -> Due {
        Due::Now
    }
}

/// What a source wants when its deferred arm is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Arm it now.
    Now,
    /// Ask again after this long.
    Later(Duration),
    /// Leave it unarmed: the source arms it itself later.
    Parked,
}

/// Token of the stop event.
const STOP: u64 = 0;

/// Token of the event that wakes a thread to look at the deferred arms again.
const KICK: u64 = 1;

const INTEREST: EpollFlags = EpollFlags::EPOLLIN
    .union(EpollFlags::EPOLLRDHUP)
    .union(EpollFlags::EPOLLONESHOT);

/// The epoll set and its I/O threads.
pub(crate) struct Poller {
    epoll: Epoll,
    stop_event: EventFd,
    kick: EventFd,
    stopped: AtomicBool,
    /// Sources to arm at a given time ([`arm_later`](Self::arm_later)).
    deferred: Mutex<Vec<(u64, Instant)>>,
    sources: Mutex<HashMap<u64, Arc<dyn Source>>>,
    next: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Poller {
    /// Creates the epoll set and starts `threads` I/O threads (at least one).
    pub(crate) fn start(threads: usize) -> Result<Arc<Self>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| Error::io("epoll_create1", e.into()))?;
        let stop_event = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::io("eventfd", e.into()))?;
        // Level-triggered and never read: once written, it wakes every thread until all exit.
        epoll
            .add(&stop_event, EpollEvent::new(EpollFlags::EPOLLIN, STOP))
            .map_err(|e| Error::io("epoll_ctl", e.into()))?;
        let kick = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::io("eventfd", e.into()))?;
        epoll
            .add(&kick, EpollEvent::new(EpollFlags::EPOLLIN, KICK))
            .map_err(|e| Error::io("epoll_ctl", e.into()))?;
        let poller = Arc::new(Poller {
            epoll,
            stop_event,
            kick,
            stopped: AtomicBool::new(false),
            deferred: Mutex::new(Vec::new()),
            sources: Mutex::new(HashMap::new()),
            next: AtomicU64::new(KICK + 1),
            threads: Mutex::new(Vec::new()),
        });
        for i in 0..threads.max(1) {
            let p = poller.clone();
            let spawned = thread::Builder::new()
                .name(format!("kvt-io{i}"))
                .spawn(move || p.run());
            match spawned {
                Ok(t) => poller.threads.lock().push(t),
                Err(e) => {
                    poller.stop();
                    return Err(Error::io("spawn", e));
                }
            }
        }
        Ok(poller)
    }

    /// Starts watching `source` for readability; returns its token.
    pub(crate) fn register(&self, source: Arc<dyn Source>) -> Result<u64> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let mut sources = self.sources.lock();
        self.epoll
            .add(source.fd(), EpollEvent::new(INTEREST, token))
            .map_err(|e| Error::io("epoll_ctl(ADD)", e.into()))?;
        sources.insert(token, source);
        Ok(token)
    }

    /// Arms a parked source again: an I/O thread runs it as soon as its socket is readable
    /// (at once if it already is).
    pub(crate) fn arm(&self, token: u64) {
        self.modify(token, INTEREST, true);
    }

    /// Takes back an armed source's interest: no I/O thread is woken for it until it is
    /// armed again. For a caller that reads the socket itself: an armed socket whose data the
    /// caller takes first would wake a thread (inside `epoll_wait`) for nothing each time.
    pub(crate) fn disarm(&self, token: u64) {
        self.modify(token, EpollFlags::EPOLLONESHOT, false);
    }

    fn modify(&self, token: u64, flags: EpollFlags, arming: bool) {
        let sources = self.sources.lock();
        if let Some(s) = sources.get(&token) {
            if arming {
                s.arming();
            }
            if let Err(e) = self
                .epoll
                .modify(s.fd(), &mut EpollEvent::new(flags, token))
            {
                tracing::debug!(token, "epoll_ctl(MOD): {e}");
            }
        }
    }

    /// Arms a parked source `after` from now instead of at once: a caller that drives the
    /// socket itself and is likely back within microseconds (a latency loop) then costs no
    /// I/O thread wake-up per batch, while replies nobody waits on are read within `after`.
    pub(crate) fn arm_later(&self, token: u64, after: Duration) {
        let mut deferred = self.deferred.lock();
        if deferred.is_empty() {
            // Threads may be waiting without a timeout: one recomputes it.
            let _ = self.kick.write(1);
        }
        deferred.push((token, Instant::now() + after));
    }

    /// Arms every deferred source whose time has come; returns how long until the next.
    fn arm_due(&self) -> Option<Duration> {
        let now = Instant::now();
        let (due, next) = {
            let mut deferred = self.deferred.lock();
            let mut due = Vec::new();
            deferred.retain(|&(t, at)| {
                let ready = at <= now;
                if ready {
                    due.push(t);
                }
                !ready
            });
            let next = deferred.iter().map(|&(_, at)| at - now).min();
            (due, next)
        };
        let mut next = next;
        for t in due {
            let source = self.sources.lock().get(&t).cloned();
            match source.map(|s| s.due()) {
                Some(Due::Now) => self.arm(t),
                Some(Due::Later(d)) => {
                    self.deferred.lock().push((t, now + d));
                    next = Some(next.map_or(d, |n| n.min(d)));
                }
                Some(Due::Parked) | None => {}
            }
        }
        next
    }

    /// Stops watching a source. An I/O thread already running it finishes that run.
    pub(crate) fn deregister(&self, token: u64) {
        let removed = {
            let mut sources = self.sources.lock();
            let s = sources.remove(&token);
            if let Some(s) = &s {
                let _ = self.epoll.delete(s.fd());
            }
            s
        };
        // Dropped outside the lock: it may be the last handle on a connection.
        drop(removed);
    }

    /// Sources being watched.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.sources.lock().len()
    }

    /// Stops the I/O threads and waits for them (except the calling one), then forgets every
    /// source. Later registrations fail with `Shutdown`.
    pub(crate) fn stop(&self) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            let _ = self.stop_event.write(1);
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        let me = thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        let sources: Vec<_> = self.sources.lock().drain().collect();
        for (_, s) in &sources {
            let _ = self.epoll.delete(s.fd());
        }
    }

    fn run(&self) {
        // One event per wait: a thread busy with one connection leaves the rest to the others.
        let mut events = [EpollEvent::empty()];
        while !self.stopped.load(Ordering::Acquire) {
            let timeout = match self.arm_due() {
                // Rounded up: a wait of 0 ms would spin until the deadline.
                Some(d) => {
                    EpollTimeout::try_from(d.as_millis().saturating_add(1).min(1_000) as i32)
                        .unwrap_or(EpollTimeout::NONE)
                }
                None => EpollTimeout::NONE,
            };
            match self.epoll.wait(&mut events, timeout) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("epoll_wait failed: {e}");
                    thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            }
            let token = events[0].data();
            if token == KICK {
                let _ = self.kick.read();
                continue;
            }
            if token == STOP {
                continue;
            }
            let source = self.sources.lock().get(&token).cloned();
            let Some(source) = source else { continue };
            match source.ready() {
                Next::Read => self.arm(token),
                Next::Park => {}
                Next::Done => self.deregister(token),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::sync::atomic::AtomicUsize;

    use crossbeam_channel::{Sender, unbounded};

    use super::*;

    /// Reads whatever arrives and reports it; done at end of stream.
    struct Echo {
        s: TcpStream,
        got: Sender<Vec<u8>>,
        running: AtomicUsize,
        overlaps: AtomicUsize,
        park_after: Option<usize>,
        seen: AtomicUsize,
        /// `due` answers `Later` this many times, then `Now`.
        later: AtomicUsize,
        dues: AtomicUsize,
    }

    impl Source for Echo {
        fn fd(&self) -> BorrowedFd<'_> {
            self.s.as_fd()
        }
        fn ready(&self) -> Next {
            if self.running.fetch_add(1, Ordering::SeqCst) != 0 {
                self.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            let mut buf = [0u8; 64];
            let r = (&self.s).read(&mut buf);
            self.running.fetch_sub(1, Ordering::SeqCst);
            match r {
                Ok(0) => Next::Done,
                Ok(n) => {
                    let _ = self.got.send(buf[..n].to_vec());
                    let seen = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
                    if self.park_after == Some(seen) {
                        Next::Park
                    } else {
                        Next::Read
                    }
                }
                Err(_) => Next::Read,
            }
        }
        fn due(&self) -> Due {
            self.dues.fetch_add(1, Ordering::SeqCst);
            if self.later.load(Ordering::SeqCst) == 0 {
                return Due::Now;
            }
            self.later.fetch_sub(1, Ordering::SeqCst);
            Due::Later(Duration::from_millis(2))
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn many_sockets_share_two_threads_and_a_parked_one_waits_for_arm() {
        let poller = Poller::start(2).unwrap();
        let (tx, rx) = unbounded();
        let mut writers = Vec::new();
        let mut echoes = Vec::new();
        for i in 0..50 {
            let (a, b) = pair();
            let echo = Arc::new(Echo {
                s: b,
                got: tx.clone(),
                running: AtomicUsize::new(0),
                overlaps: AtomicUsize::new(0),
                park_after: (i == 0).then_some(1),
                seen: AtomicUsize::new(0),
                later: AtomicUsize::new(0),
                dues: AtomicUsize::new(0),
            });
            let token = poller.register(echo.clone()).unwrap();
            writers.push(a);
            echoes.push((echo, token));
        }
        assert_eq!(poller.threads.lock().len(), 2);
        for (i, w) in writers.iter_mut().enumerate() {
            w.write_all(format!("{i:02}").as_bytes()).unwrap();
        }
        let mut got: Vec<_> = (0..50).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got[0], b"00");
        assert_eq!(got[49], b"49");
        // Source 0 is parked: its next bytes wait until it is armed.
        writers[0].write_all(b"xx").unwrap();
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a parked source was run"
        );
        poller.arm(echoes[0].1);
        assert_eq!(rx.recv().unwrap(), b"xx");
        // Closing a writer ends its source.
        drop(writers.remove(1));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while poller.len() != 49 {
            assert!(
                std::time::Instant::now() < deadline,
                "a closed source stayed registered"
            );
            thread::yield_now();
        }
        assert!(
            echoes
                .iter()
                .all(|(e, _)| e.overlaps.load(Ordering::SeqCst) == 0)
        );
        poller.stop();
        assert_eq!(poller.len(), 0);
        assert!(matches!(
            poller.register(echoes[2].0.clone()),
            Err(Error::Shutdown)
        ));
    }

    #[test]
    fn a_deferred_arm_asks_the_source_until_it_says_now() {
        let poller = Poller::start(1).unwrap();
        let (tx, rx) = unbounded();
        let (mut a, b) = pair();
        let echo = Arc::new(Echo {
            s: b,
            got: tx,
            running: AtomicUsize::new(0),
            overlaps: AtomicUsize::new(0),
            park_after: Some(1),
            seen: AtomicUsize::new(0),
            later: AtomicUsize::new(3),
            dues: AtomicUsize::new(0),
        });
        let token = poller.register(echo.clone()).unwrap();
        a.write_all(b"1").unwrap();
        assert_eq!(rx.recv().unwrap(), b"1");
        // Parked now; the next bytes wait for the deferred arm, which the source puts off
        // three times before it is armed.
        a.write_all(b"2").unwrap();
        poller.arm_later(token, Duration::from_millis(1));
        assert_eq!(rx.recv().unwrap(), b"2");
        assert_eq!(echo.dues.load(Ordering::SeqCst), 4);
        poller.stop();
    }
}
