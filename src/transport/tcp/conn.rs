//! Initiator side of one TCP data connection: posts slices as frames, matches acks and read
//! responses to batches, and writes off everything outstanding when the connection dies.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender, bounded};
use parking_lot::Mutex;

use super::TcpIo;
use super::io::{FrameHandler, FrameReader, Out, Sink, write_all_nb};
use super::poller::{Due, Next, Source};
use super::sender::{Flush, Outbox};
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::memory::SegmentGuard;
use crate::request::Op;
use crate::transport::{Work, describe_remote_code};
use crate::wire::{FLAG_LAST, FrameHeader, FrameOp};

struct PendingRead {
    batch: Arc<Batch>,
    guard: SegmentGuard,
    addr: u64,
    len: u64,
}

#[derive(Default)]
struct Pending {
    /// Batches waiting for this connection's ack, by batch id.
    acks: HashMap<u64, Arc<Batch>>,
    /// Read requests in the order they were written (the target answers in order).
    reads: VecDeque<PendingRead>,
    /// Callers waiting for a segment list, in request order.
    segment_lists: VecDeque<Sender<Vec<u8>>>,
    closed: bool,
}

struct Inbound {
    reader: FrameReader,
    current_read: Option<PendingRead>,
}

/// How long a socket a caller drove stays with it after the caller got what it waited for.
const LINGER: Duration = Duration::from_millis(1);

/// Work items a connection queues for the send pool before `post` waits.
const QUEUE_BOUND: usize = 1024;

/// Called with the reason when a connection dies.
type DeathHook = Box<dyn Fn(&str) + Send + Sync>;

/// One initiator-side data connection. The [poller](super::poller) reads it (acks, read
/// responses, segment lists) unless a caller drives it; the [send pool](super::sender)
/// writes what is posted to it, unless the posting caller writes it itself.
pub(crate) struct TcpConn {
    me: Weak<TcpConn>,
    io: Arc<TcpIo>,
    peer: String,
    epoch: u64,
    /// The one handle on the socket: the writer lock orders writes, the inbound lock reads.
    socket: TcpStream,
    writer: Mutex<()>,
    outbox: Outbox<Work>,
    inbound: Mutex<Inbound>,
    pending: Mutex<Pending>,
    dead: AtomicBool,
    dead_reason: Mutex<Option<String>>,
    /// Callers reading the socket themselves; the poller leaves it to them meanwhile.
    drivers: AtomicUsize,
    /// The poller found callers driving and left the socket unarmed: the last of them arms it.
    parked: AtomicBool,
    /// The socket is (about to be) armed in the poller.
    armed: AtomicBool,
    /// When a caller last drove the socket, in µs since `born`.
    last_driven: AtomicU64,
    born: Instant,
    token: OnceLock<u64>,
    stall: Duration,
    on_death: OnceLock<DeathHook>,
}

impl TcpConn {
    /// Wraps a connected, handshaken socket and hands it to the engine's poller.
    pub(crate) fn start(
        stream: TcpStream,
        peer: String,
        epoch: u64,
        io: &Arc<TcpIo>,
        stall: Duration,
    ) -> Result<Arc<Self>> {
        stream
            .set_read_timeout(None)
            .map_err(|e| Error::io("setsockopt", e))?;
        stream
            .set_write_timeout(None)
            .map_err(|e| Error::io("setsockopt", e))?;
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("fcntl(O_NONBLOCK)", e))?;
        let conn = Arc::new_cyclic(|me| TcpConn {
            me: me.clone(),
            io: io.clone(),
            peer,
            epoch,
            writer: Mutex::new(()),
            inbound: Mutex::new(Inbound {
                reader: FrameReader::new(),
                current_read: None,
            }),
            socket: stream,
            outbox: Outbox::new(Some(QUEUE_BOUND)),
            pending: Mutex::new(Pending::default()),
            dead: AtomicBool::new(false),
            dead_reason: Mutex::new(None),
            drivers: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            // Registration arms it.
            armed: AtomicBool::new(true),
            last_driven: AtomicU64::new(0),
            born: Instant::now(),
            token: OnceLock::new(),
            stall,
            on_death: OnceLock::new(),
        });
        let token = io.poller.register(conn.clone())?;
        let _ = conn.token.set(token);
        Ok(conn)
    }

    /// Runs `f` with the reason when the connection dies (an RDMA link stops its QPs).
    pub(crate) fn on_death(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.on_death.set(Box::new(f));
        if self.dead.load(Ordering::Acquire)
            && let Some(f) = self.on_death.get()
        {
            f(&self.lost().to_string());
        }
    }

    /// Acks and read responses this connection still waits for (a load measure for choosing
    /// a lane).
    pub(crate) fn outstanding(&self) -> usize {
        let p = self.pending.lock();
        p.acks.len() + p.reads.len() + self.outbox.len()
    }

    /// `Err(PeerLost)` once the connection died.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.dead.load(Ordering::Acquire) {
            return Err(self.lost());
        }
        Ok(())
    }

    fn lost(&self) -> Error {
        Error::PeerLost {
            peer: self.peer.clone(),
            epoch: self.epoch,
            reason: self
                .dead_reason
                .lock()
                .clone()
                .unwrap_or_else(|| "connection closed".into()),
        }
    }

    /// Hands `work` to the connection: written right here when `inline` and nothing is queued,
    /// else by the sender thread.
    pub(crate) fn post(&self, work: Work, inline: bool) {
        if inline
            && self.outbox.is_idle()
            && let Some(_writing) = self.writer.try_lock()
        {
            self.send(&self.socket, work);
            return;
        }
        // Backpressure: a full outbox waits for the send pool, until the batch deadline.
        let deadline = work.batch.deadline;
        match self.outbox.push(work, deadline) {
            Ok(true) => self.schedule(),
            Ok(false) => {}
            Err(e) => {
                let reason = match &e {
                    SendTimeoutError::Timeout(_) => {
                        "the connection's send queue stayed full until the batch deadline"
                    }
                    SendTimeoutError::Disconnected(_) => "connection closed",
                };
                e.into_inner().abandon(reason);
            }
        }
    }

    fn schedule(&self) {
        if let Some(me) = self.me.upgrade() {
            self.io.pool.schedule(me);
        }
    }

    /// Writes one work item's frames, then completes its "sent" unit once the work (and its
    /// pins) is dropped. Called with the writer lock held, so the order in which reads are
    /// queued in `pending` is the order they appear on the wire.
    fn send(&self, w: &TcpStream, work: Work) {
        match self.send_frames(w, &work) {
            Ok(()) => {
                let batch = work.batch.clone();
                drop(work);
                batch.complete_unit(Ok(()));
            }
            Err(reason) => work.abandon(&reason),
        }
    }

    /// `Err` when nothing was registered or written (the caller writes every unit off); once
    /// the work's acks and reads are registered, failures go through [`die`](Self::die).
    fn send_frames(&self, w: &TcpStream, work: &Work) -> std::result::Result<(), String> {
        if self.dead.load(Ordering::Acquire) {
            return Err(self.lost().to_string());
        }
        if work.batch.is_failed() {
            return Err("batch failed before it was sent".into());
        }
        let batch_id = work.batch.id;
        let last_write = work.slices.iter().rposition(|s| s.op == Op::Write);
        {
            let mut p = self.pending.lock();
            if p.closed {
                drop(p);
                return Err(self.lost().to_string());
            }
            if last_write.is_some() {
                p.acks.insert(batch_id, work.batch.clone());
            }
            for s in work.slices.iter().filter(|s| s.op == Op::Read) {
                p.reads.push_back(PendingRead {
                    batch: work.batch.clone(),
                    guard: work.guard_for(s.local_addr, s.len).clone(),
                    addr: s.local_addr,
                    len: s.len,
                });
            }
        }
        let headers: Vec<[u8; 40]> = work
            .slices
            .iter()
            .enumerate()
            .map(|(i, s)| {
                FrameHeader {
                    op: if s.op == Op::Write {
                        FrameOp::Write
                    } else {
                        FrameOp::ReadRequest
                    },
                    flags: if Some(i) == last_write { FLAG_LAST } else { 0 },
                    status: 0,
                    segment: s.remote_segment.0,
                    batch: batch_id,
                    offset: s.remote_offset,
                    len: s.len,
                    tag: work
                        .notify
                        .map_or(0, |n| super::target::TAG_ROOM | n as u64),
                }
                .encode()
            })
            .collect();
        let notify = work.notify.map(|tag| {
            FrameHeader {
                op: FrameOp::Notify,
                flags: 0,
                status: 0,
                segment: 0,
                batch: batch_id,
                offset: 0,
                len: 0,
                tag: tag as u64,
            }
            .encode()
        });
        let mut iov = Out::with_capacity(work.slices.len() * 2 + 1);
        let mut sent = Ok(());
        let mut i = 0;
        while i < work.slices.len() {
            let (s, h) = (&work.slices[i], &headers[i]);
            let staged = (s.op == Op::Write)
                .then(|| work.guard_for(s.local_addr, s.len).segment().staging())
                .flatten();
            let Some(device) = staged else {
                iov.bytes(h);
                if s.op == Op::Write {
                    let guard = work.guard_for(s.local_addr, s.len);
                    iov.registered(guard, s.local_addr, s.len as usize);
                }
                i += 1;
                continue;
            };
            // GPU memory without GPUDirect: what is queued goes first, then the payloads
            // through bounce buffers.
            sent = write_all_nb(w, &mut iov, self.stall);
            iov.clear();
            let run = staged_run(work, i, device);
            sent = sent.and_then(|()| {
                if run > 1 || s.len as usize <= crate::cuda::STAGE_CHUNK {
                    send_gathered(
                        w,
                        device.as_ref(),
                        &work.slices[i..i + run],
                        &headers[i..i + run],
                        self.stall,
                    )
                } else {
                    write_all_nb(w, &mut Out::of(&[h]), self.stall).and_then(|()| {
                        send_staged(w, device.as_ref(), s.local_addr, s.len, self.stall)
                    })
                }
            });
            if sent.is_err() {
                break;
            }
            i += run;
        }
        if sent.is_ok() {
            if let Some(n) = &notify {
                iov.bytes(n);
            }
            sent = write_all_nb(w, &mut iov, self.stall);
        }
        tracing::trace!(
            batch = batch_id,
            slices = work.slices.len(),
            ?sent,
            "frames written"
        );
        if let Err(e) = sent {
            self.die(format!("send failed: {e}"));
        }
        Ok(())
    }

    /// Caller-driven progress: reads whatever the socket has, without blocking. Returns false
    /// when another thread is already reading this connection.
    pub(crate) fn progress(&self) -> bool {
        self.last_driven.store(self.now_us(), Ordering::Relaxed);
        match self.inbound.try_lock() {
            Some(mut inb) => {
                self.drain(&mut inb);
                true
            }
            None => false,
        }
    }

    fn now_us(&self) -> u64 {
        self.born.elapsed().as_micros() as u64
    }

    /// Marks a caller as driving this connection: the poller leaves the socket to it. The
    /// first driver disarms an armed socket (and so owes the poller the arm when the last
    /// one leaves): its data would otherwise wake an I/O thread for nothing, as the caller
    /// reads it first.
    pub(crate) fn start_driving(&self) {
        if self.drivers.fetch_add(1, Ordering::SeqCst) == 0
            && self.armed.swap(false, Ordering::SeqCst)
        {
            self.parked.store(true, Ordering::SeqCst);
            if let Some(&t) = self.token.get() {
                self.io.poller.disarm(t);
            }
        }
    }

    /// Ends [`start_driving`](Self::start_driving); the last driver to leave hands the
    /// socket back to the poller: at once with `hand_back` (the caller is about to sleep on
    /// a batch that needs replies), else after [`LINGER`] in case the caller comes back (a
    /// latency loop does within microseconds; each hand-back costs an I/O thread wake-up).
    pub(crate) fn stop_driving(&self, hand_back: bool) {
        if hand_back {
            // The caller sleeps now: the poller must not wait for it to come back.
            self.last_driven.store(0, Ordering::Relaxed);
        }
        if self.drivers.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let Some(&t) = self.token.get() else { return };
        let owed = self.parked.swap(false, Ordering::SeqCst);
        if hand_back && (owed || !self.armed.load(Ordering::SeqCst)) {
            // Also when a deferred arm holds it: the caller's replies must not wait for
            // that. Should an I/O thread be in `ready` meanwhile, a second one may enter it
            // too, which `ready` allows (its reading is under the inbound lock).
            self.io.poller.arm(t);
        } else if owed {
            self.io.poller.arm_later(t, LINGER);
        }
    }

    fn drain(&self, inb: &mut Inbound) -> usize {
        // A dead connection reads nothing more into local memory (see `join`).
        if self.dead.load(Ordering::Acquire) {
            return 0;
        }
        let Inbound {
            reader,
            current_read,
        } = inb;
        let mut h = Handler {
            conn: self,
            current_read,
        };
        match reader.drain(&self.socket, &mut h) {
            Ok(n) => n,
            Err(e) => {
                let reason = match e.kind() {
                    io::ErrorKind::UnexpectedEof => "peer closed the connection".to_string(),
                    io::ErrorKind::InvalidData => format!("protocol violation by peer: {e}"),
                    _ => format!("receive failed: {e}"),
                };
                self.die(reason.clone());
                // We hold the inbound lock, so `die` could not clear the half-read frame:
                // drop it (and its pin) here, then write its read off.
                reader.reset();
                if let Some(r) = current_read.take() {
                    let batch = r.batch.clone();
                    drop(r);
                    batch.complete_unit(Err(reason));
                }
                0
            }
        }
    }

    /// Asks the target for its current segment list.
    pub(crate) fn fetch_segments(&self, timeout: Duration) -> Result<Vec<u8>> {
        let (tx, rx) = bounded(1);
        {
            let w = self.writer.lock();
            {
                let mut p = self.pending.lock();
                if p.closed {
                    return Err(self.lost());
                }
                p.segment_lists.push_back(tx);
            }
            let hdr = FrameHeader {
                op: FrameOp::SegmentsRequest,
                flags: 0,
                status: 0,
                segment: 0,
                batch: 0,
                offset: 0,
                len: 0,
                tag: 0,
            }
            .encode();
            if let Err(e) = write_all_nb(&self.socket, &mut Out::of(&[&hdr]), self.stall) {
                drop(w);
                self.die(format!("send failed: {e}"));
                return Err(self.lost());
            }
        }
        let deadline = Instant::now() + timeout;
        self.start_driving();
        let out = loop {
            self.progress();
            match rx.try_recv() {
                Ok(v) => break Ok(v),
                Err(crossbeam_channel::TryRecvError::Disconnected) => break Err(self.lost()),
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            if Instant::now() > deadline {
                break Err(Error::Timeout {
                    what: "segment list from peer".into(),
                    after_ms: timeout.as_millis() as u64,
                });
            }
            thread::yield_now();
        };
        self.stop_driving(true);
        out
    }

    /// Kills the connection: everything outstanding on it fails with `reason`.
    pub(crate) fn die(&self, reason: String) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        if reason.ends_with("locally") {
            tracing::debug!(peer = %self.peer, %reason, "tcp connection closed");
        } else {
            tracing::warn!(peer = %self.peer, %reason, "tcp connection lost");
        }
        if let Some(f) = self.on_death.get() {
            f(&reason);
        }
        *self.dead_reason.lock() = Some(reason.clone());
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(&t) = self.token.get() {
            self.io.poller.deregister(t);
        }
        let (acks, reads) = {
            let mut p = self.pending.lock();
            p.closed = true;
            p.segment_lists.clear();
            (std::mem::take(&mut p.acks), std::mem::take(&mut p.reads))
        };
        let msg = self.lost().to_string();
        for w in self.outbox.take_all() {
            w.abandon(&msg);
        }
        for b in acks.into_values() {
            b.complete_unit(Err(msg.clone()));
        }
        for r in reads {
            let batch = r.batch.clone();
            drop(r);
            batch.complete_unit(Err(msg.clone()));
        }
        if let Some(r) = self
            .inbound
            .try_lock()
            .and_then(|mut i| i.current_read.take())
        {
            r.batch.complete_unit(Err(msg));
        }
    }

    /// Closes the connection on purpose.
    pub(crate) fn close(&self) {
        self.die("connection closed locally".into());
    }

    /// After [`close`](Self::close) (or the connection's death): waits until no thread
    /// reads or writes local memory for this connection any more. A send pool thread writes
    /// under the writer lock and a reader (poller or driving caller) under the inbound lock,
    /// and each checks for death first; once both locks have been taken here, none is at
    /// work and none starts.
    pub(crate) fn join(&self) {
        if self.dead.load(Ordering::Acquire) {
            drop(self.writer.lock());
            drop(self.inbound.lock());
        }
    }
}

/// `ready` may run on two I/O threads at once (after a caller's hand-back arm, see
/// `stop_driving`): everything it reads, it reads under the inbound lock.
impl Source for TcpConn {
    fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    fn arming(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn due(&self) -> Due {
        match self.held() {
            Held::Driving => Due::Parked,
            Held::Recently => Due::Later(LINGER),
            Held::No => Due::Now,
        }
    }

    fn ready(&self) -> Next {
        // One-shot: the event that got us here disarmed the socket.
        self.armed.store(false, Ordering::SeqCst);
        if self.dead.load(Ordering::Acquire) {
            return Next::Done;
        }
        match self.held() {
            Held::Driving => return Next::Park,
            Held::Recently => {
                // Reading here would arm the socket again, and the caller's next reply
                // would wake an I/O thread again.
                if let Some(&t) = self.token.get() {
                    self.io.poller.arm_later(t, LINGER);
                }
                return Next::Park;
            }
            Held::No => {}
        }
        let mut inb = self.inbound.lock();
        self.drain(&mut inb);
        drop(inb);
        if self.dead.load(Ordering::Acquire) {
            Next::Done
        } else {
            Next::Read
        }
    }
}

/// Whether callers have a connection's socket, as the poller finds it.
enum Held {
    /// A caller drives it now: it stays parked, and the last driver to leave arms it.
    Driving,
    /// A caller drove it less than [`LINGER`] ago and is likely back soon (a latency loop
    /// between batches): leave it to that caller a little longer.
    Recently,
    /// Nobody: the poller reads it.
    No,
}

impl TcpConn {
    fn held(&self) -> Held {
        if self.drivers.load(Ordering::SeqCst) > 0 {
            // Park; the last driver to leave arms the socket again, unless it left before
            // seeing the flag: then we go on.
            self.parked.store(true, Ordering::SeqCst);
            if self.drivers.load(Ordering::SeqCst) > 0 || !self.parked.swap(false, Ordering::SeqCst)
            {
                return Held::Driving;
            }
        }
        let idle_us = self
            .now_us()
            .saturating_sub(self.last_driven.load(Ordering::Relaxed));
        if idle_us < LINGER.as_micros() as u64 {
            Held::Recently
        } else {
            Held::No
        }
    }
}

impl Flush for TcpConn {
    fn flush(&self) -> bool {
        let _writing = self.writer.lock();
        self.outbox.flush_with(|work| self.send(&self.socket, work))
    }
}

/// How many write slices from `first` on, all staged on `device`, fit one bounce buffer
/// together (at least one).
fn staged_run(work: &Work, first: usize, device: &Arc<dyn crate::cuda::DeviceCopy>) -> usize {
    let mut bytes = 0usize;
    let mut n = 0;
    for s in &work.slices[first..] {
        let same = s.op == Op::Write
            && work
                .guard_for(s.local_addr, s.len)
                .segment()
                .staging()
                .is_some_and(|d| Arc::ptr_eq(d, device));
        if !same || bytes + s.len as usize > crate::cuda::STAGE_CHUNK {
            break;
        }
        bytes += s.len as usize;
        n += 1;
    }
    n.max(1)
}

/// Writes the frames of `slices` (staged writes whose payloads fit one bounce buffer
/// together): their pages are gathered with one wait on the device, then headers and
/// payloads go out in one vectored write.
fn send_gathered(
    w: &TcpStream,
    device: &dyn crate::cuda::DeviceCopy,
    slices: &[crate::plan::Slice],
    headers: &[[u8; 40]],
    stall: Duration,
) -> io::Result<()> {
    let mut buf = device
        .bounce()
        .map_err(|e| io::Error::other(format!("no staging buffer: {e}")))?;
    let parts: Vec<(u64, usize)> = slices
        .iter()
        .map(|s| (s.local_addr, s.len as usize))
        .collect();
    device
        .to_host_gather(&parts, &mut buf)
        .map_err(|e| io::Error::other(format!("staging copy from the GPU failed: {e}")))?;
    let mut iov = Out::with_capacity(slices.len() * 2);
    let mut at = 0;
    for (h, &(_, n)) in headers.iter().zip(&parts) {
        iov.bytes(h);
        iov.bytes(&buf[at..at + n]);
        at += n;
    }
    let sent = write_all_nb(w, &mut iov, stall);
    drop(iov);
    device.recycle(buf);
    sent
}

/// Writes `len` bytes of GPU memory at `addr` through a staging bounce buffer.
fn send_staged(
    w: &TcpStream,
    device: &dyn crate::cuda::DeviceCopy,
    addr: u64,
    len: u64,
    stall: Duration,
) -> io::Result<()> {
    let mut buf = device
        .bounce()
        .map_err(|e| io::Error::other(format!("no staging buffer: {e}")))?;
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        device
            .to_host(addr + done, &mut buf[..n])
            .map_err(|e| io::Error::other(format!("staging copy from the GPU failed: {e}")))?;
        write_all_nb(w, &mut Out::of(&[&buf[..n]]), stall)?;
        done += n as u64;
    }
    device.recycle(buf);
    Ok(())
}

struct Handler<'a> {
    conn: &'a TcpConn,
    current_read: &'a mut Option<PendingRead>,
}

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl FrameHandler for Handler<'_> {
    fn on_header(&mut self, hdr: &FrameHeader) -> io::Result<Sink> {
        match hdr.op {
            FrameOp::Ack => Ok(Sink::Discard),
            FrameOp::ReadResponse => {
                let r = self
                    .conn
                    .pending
                    .lock()
                    .reads
                    .pop_front()
                    .ok_or_else(|| protocol("read response without a read request".into()))?;
                if hdr.batch != r.batch.id {
                    return Err(protocol(format!(
                        "read response for batch {} while {} was expected",
                        hdr.batch, r.batch.id
                    )));
                }
                let sink = if hdr.status == 0 {
                    if hdr.len != r.len {
                        return Err(protocol(format!(
                            "read response of {} bytes for a {}-byte read",
                            hdr.len, r.len
                        )));
                    }
                    Sink::memory(r.guard.clone(), r.addr, Some(r.batch.clone()))
                } else {
                    Sink::Discard
                };
                *self.current_read = Some(r);
                Ok(sink)
            }
            FrameOp::SegmentsResponse => Ok(Sink::Collect(Vec::with_capacity(
                hdr.len.min(1 << 20) as usize,
            ))),
            other => Err(protocol(format!("unexpected {other:?} frame from target"))),
        }
    }

    fn on_frame(&mut self, hdr: &FrameHeader, sink: Sink) -> io::Result<()> {
        // A read's pin goes before its unit completes: completion may unregister the memory.
        let (collected, landed) = match sink {
            Sink::Collect(v) => (Some(v), Ok(())),
            other => (None, other.land()),
        };
        let result = if hdr.status == 0 {
            landed
        } else {
            Err(describe_remote_code(hdr.status, hdr))
        };
        match hdr.op {
            FrameOp::Ack => {
                tracing::trace!(batch = hdr.batch, "ack received");
                let b = self.conn.pending.lock().acks.remove(&hdr.batch);
                match b {
                    Some(b) => b.complete_unit(result),
                    None => return Err(protocol(format!("ack for unknown batch {}", hdr.batch))),
                }
            }
            FrameOp::ReadResponse => {
                if let Some(r) = self.current_read.take() {
                    let batch = r.batch.clone();
                    drop(r);
                    batch.complete_unit(result);
                }
            }
            FrameOp::SegmentsResponse => {
                if let (Some(v), Some(tx)) = (
                    collected,
                    self.conn.pending.lock().segment_lists.pop_front(),
                ) {
                    let _ = tx.send(v);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
