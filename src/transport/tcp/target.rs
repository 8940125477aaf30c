//! Target side of a TCP data connection: checks every frame against the registered segments,
//! lands write payloads straight in place, serves reads, and acknowledges per batch.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::TcpIo;
use super::io::{DeferredFrame, FrameHandler, FrameReader, Out, Sink, write_all_nb};
use super::poller::{Next, Source};
use super::sender::{Flush, Outbox};
use crate::cuda::{Bounce, DeviceCopy, STAGE_CHUNK};
use crate::error::{Error, Result};
use crate::memory::{SegmentGuard, SegmentTable};
use crate::transport::fence::{ROOM_SLOT_SHIFT, RoomFences, RoomHold};
use crate::transport::notify::{Notifier, imm_decode};
use crate::wire::{FLAG_LAST, FrameHeader, FrameOp, SegmentDesc, encode_segments};

/// Who is on the other end and what the target side needs to answer it.
pub(crate) struct ServeContext {
    pub(crate) segments: Arc<SegmentTable>,
    /// Describes the segments (with their per-rail keys) for segment-list requests.
    pub(crate) describe: Arc<dyn Fn() -> Vec<SegmentDesc> + Send + Sync>,
    pub(crate) notifier: Arc<Notifier>,
    /// Rooms whose writes are refused (aborted KV rooms).
    pub(crate) fences: Arc<RoomFences>,
    pub(crate) shutdown: Arc<AtomicBool>,
    pub(crate) busy_poll: Duration,
    pub(crate) stall: Duration,
    pub(crate) peer: String,
    pub(crate) peer_engine: u64,
    pub(crate) peer_epoch: u64,
    /// The link token the peer presented in its hello.
    pub(crate) peer_token: u64,
    /// Kept for as long as the connection lives (an RDMA control connection's accepted QPs).
    pub(crate) keep: Option<Box<dyn Send>>,
    /// Where refused requests are logged (rate-limited).
    pub(crate) refusals: Arc<crate::refusals::Refusals>,
}

/// Replies waiting to be written before the connection stops reading more requests.
const REPLY_BOUND: usize = 1024;

/// The reading half of a served connection, under one lock.
struct Rx {
    reader: FrameReader,
    target: Target,
}

/// One accepted data connection, served by the engine's poller (requests) and send pool
/// (replies) until it closes, errs or the engine shuts down.
pub(crate) struct ServedConn {
    peer: String,
    /// The peer engine's id, from its hello.
    peer_engine: u64,
    /// The one handle on the socket, shared with the replies.
    socket: Arc<TcpStream>,
    rx: Mutex<Rx>,
    replies: Arc<Replies>,
    dead: AtomicBool,
    busy_poll: Duration,
    shutdown: Arc<AtomicBool>,
    keep: Mutex<Option<Box<dyn Send>>>,
}

impl ServedConn {
    /// Serves `stream` (handshake done) from now on, on the engine's I/O threads.
    pub(crate) fn start(
        stream: TcpStream,
        ctx: ServeContext,
        io: &Arc<TcpIo>,
    ) -> Result<Arc<Self>> {
        stream
            .set_read_timeout(None)
            .and_then(|()| stream.set_write_timeout(None))
            .and_then(|()| stream.set_nonblocking(true))
            .map_err(|e| Error::io("setsockopt", e))?;
        let socket = Arc::new(stream);
        let replies = Arc::new_cyclic(|me| Replies {
            me: me.clone(),
            io: io.clone(),
            outbox: Outbox::new(None),
            socket: socket.clone(),
            writing: Mutex::new(()),
            stall: ctx.stall,
            dead: AtomicBool::new(false),
            rx_parked: AtomicBool::new(false),
            token: OnceLock::new(),
            conn: OnceLock::new(),
            peer: ctx.peer.clone(),
        });
        let target = Target {
            segments: ctx.segments,
            describe: ctx.describe,
            notifier: ctx.notifier,
            fences: ctx.fences,
            hold: None,
            landing: None,
            peer_engine: ctx.peer_engine,
            peer_epoch: ctx.peer_epoch,
            peer_token: ctx.peer_token,
            refusals: ctx.refusals.clone(),
            peer: ctx.peer.clone(),
            replies: replies.clone(),
            errors: HashMap::new(),
        };
        let conn = Arc::new(ServedConn {
            peer: ctx.peer,
            peer_engine: ctx.peer_engine,
            socket,
            rx: Mutex::new(Rx {
                reader: FrameReader::new(),
                target,
            }),
            replies,
            dead: AtomicBool::new(false),
            busy_poll: ctx.busy_poll,
            shutdown: ctx.shutdown,
            keep: Mutex::new(ctx.keep),
        });
        let _ = conn.replies.conn.set(Arc::downgrade(&conn));
        let token = io.poller.register(conn.clone())?;
        let _ = conn.replies.token.set(token);
        Ok(conn)
    }

    /// The peer engine's id, from its hello.
    pub(crate) fn peer_engine(&self) -> u64 {
        self.peer_engine
    }

    /// Whether the connection has ended.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Ends the connection: no request is read and no reply written any more, and what it
    /// kept (accepted QPs) goes.
    pub(crate) fn close(&self) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        self.replies.dead.store(true, Ordering::Release);
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(&t) = self.replies.token.get() {
            self.replies.io.poller.deregister(t);
        }
        drop(self.keep.lock().take());
    }

    /// After [`close`](Self::close): waits until no thread reads or writes local memory for
    /// this connection (each does so under a lock, after checking for death).
    pub(crate) fn join(&self) {
        drop(self.rx.lock());
        drop(self.replies.writing.lock());
    }
}

impl Source for ServedConn {
    fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    fn ready(&self) -> Next {
        let mut rx = self.rx.lock();
        let mut last_activity = Instant::now();
        loop {
            // A closed connection lands nothing more (see `join`).
            if self.is_dead() {
                return Next::Done;
            }
            let Rx { reader, target } = &mut *rx;
            match reader.drain(&self.socket, target) {
                // Nothing more to read for now: gathered writes land instead of waiting for
                // more (a room fence waits for them).
                Ok(0) => target.land_pending(),
                Ok(_) => last_activity = Instant::now(),
                Err(e) => {
                    match e.kind() {
                        io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(peer = %self.peer, "initiator closed the connection")
                        }
                        _ => target.refusals.refuse(
                            "a data connection",
                            &format_args!("from {}: closed: {e}", self.peer),
                        ),
                    }
                    drop(rx);
                    self.close();
                    return Next::Done;
                }
            }
            let parked = &self.replies.rx_parked;
            if self.replies.outbox.len() >= REPLY_BOUND {
                // The initiator does not read its replies: stop reading its requests until
                // the send pool has written them (it arms the socket again).
                parked.store(true, Ordering::SeqCst);
                if self.replies.outbox.len() >= REPLY_BOUND || !parked.swap(false, Ordering::SeqCst)
                {
                    return Next::Park;
                }
            }
            if last_activity.elapsed() >= self.busy_poll || self.shutdown.load(Ordering::Acquire) {
                return Next::Read;
            }
            // Stay hot for the next frame: a sleeping thread costs tens of µs to wake.
            std::thread::yield_now();
        }
    }
}

/// What a target sends back, in order.
enum Reply {
    /// Bytes (a frame header, a small payload), then for a read of host memory the pinned
    /// bytes `(pin, address, length)`.
    Bytes {
        head: Vec<u8>,
        body: Option<(SegmentGuard, u64, usize)>,
    },
    /// A read of GPU memory in staging mode, copied out through bounce buffers as it goes.
    StagedRead {
        resp: FrameHeader,
        guard: SegmentGuard,
        req: FrameHeader,
    },
}

impl Reply {
    fn frame(hdr: FrameHeader, payload: &[u8]) -> Reply {
        let mut head = Vec::with_capacity(crate::wire::FRAME_HEADER_LEN + payload.len());
        head.extend_from_slice(&hdr.encode());
        head.extend_from_slice(payload);
        Reply::Bytes { head, body: None }
    }

    /// The bytes of a `Bytes` reply, as one vectored write.
    fn iov(&self) -> Out<'_> {
        let mut iov = Out::with_capacity(2);
        if let Reply::Bytes { head, body } = self {
            iov.bytes(head);
            if let Some((guard, addr, len)) = body {
                iov.registered(guard, *addr, *len);
            }
        }
        iov
    }

    /// Length of a `Bytes` reply.
    fn len(&self) -> usize {
        match self {
            Reply::Bytes { head, body } => head.len() + body.as_ref().map_or(0, |b| b.2),
            Reply::StagedRead { .. } => 0,
        }
    }

    /// What is left of a `Bytes` reply once its first `n` bytes are written.
    fn skip(self, n: usize) -> Reply {
        match self {
            Reply::Bytes { head, body } if n < head.len() => Reply::Bytes {
                head: head[n..].to_vec(),
                body,
            },
            Reply::Bytes { head, body } => {
                let n = n - head.len();
                Reply::Bytes {
                    head: Vec::new(),
                    body: body.map(|(g, addr, len)| (g, addr + n as u64, len - n)),
                }
            }
            other => other,
        }
    }
}

/// Writes what the socket takes now, without waiting; returns how many bytes that was.
fn send_now(out: &TcpStream, iov: &mut Out<'_>) -> io::Result<usize> {
    let mut sent = 0;
    while !iov.is_empty() {
        match iov.send(out) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer closed")),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// A served connection's replies, written by the send pool.
struct Replies {
    me: Weak<Replies>,
    io: Arc<TcpIo>,
    outbox: Outbox<Reply>,
    socket: Arc<TcpStream>,
    /// Held while a reply is written, so replies go out whole and in order.
    writing: Mutex<()>,
    stall: Duration,
    dead: AtomicBool,
    /// The connection stopped reading requests until replies drain.
    rx_parked: AtomicBool,
    /// The connection's token in the poller (the replies and their connection share it).
    token: OnceLock<u64>,
    /// The connection, to read it again once replies drain (see `flush`).
    conn: OnceLock<Weak<ServedConn>>,
    peer: String,
}

impl Replies {
    /// Sends `r`: on the reader's own thread as far as the socket takes it without waiting
    /// when nothing else is queued (an ack then costs no thread wake-up), the rest through
    /// the send pool. Only the connection's reader calls this, so replies keep their order.
    fn send(&self, mut r: Reply) {
        if matches!(r, Reply::Bytes { .. })
            && self.outbox.is_idle()
            && let Some(_writing) = self.writing.try_lock()
        {
            if self.dead.load(Ordering::Acquire) {
                return;
            }
            let sent = send_now(&self.socket, &mut r.iov());
            match sent {
                Ok(n) if n == r.len() => return,
                // The rest goes first: nothing else is queued and only we queue.
                Ok(n) => r = r.skip(n),
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
        // The outbox has no bound (the reader parks instead), so this never waits.
        if let Ok(true) = self.outbox.push(r, Instant::now())
            && let Some(me) = self.me.upgrade()
        {
            self.io.pool.schedule(me);
        }
    }
}

impl Replies {
    /// A reply could not be written: the connection ends (its reader sees the end).
    fn fail(&self, e: io::Error) {
        tracing::warn!(peer = %self.peer, "closing data connection: reply failed: {e}");
        self.dead.store(true, Ordering::Release);
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

impl Flush for Replies {
    fn flush(&self) -> bool {
        let writing = self.writing.lock();
        let more = self.outbox.flush_with(|r| {
            if self.dead.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = write_reply(&self.socket, r, self.stall) {
                self.fail(e);
            }
        });
        drop(writing);
        if self.outbox.len() < REPLY_BOUND / 2 && self.rx_parked.swap(false, Ordering::SeqCst) {
            // Read the connection again right here: frames may wait in the reader's buffer,
            // which no readiness event would announce. The socket is parked, so no I/O thread
            // runs it meanwhile.
            let conn = self.conn.get().and_then(Weak::upgrade);
            if let (Some(conn), Some(&t)) = (conn, self.token.get()) {
                match conn.ready() {
                    Next::Read => self.io.poller.arm(t),
                    Next::Park => {}
                    Next::Done => self.io.poller.deregister(t),
                }
            }
        }
        more
    }
}

fn write_reply(out: &TcpStream, r: Reply, stall: Duration) -> io::Result<()> {
    match r {
        Reply::Bytes { .. } => write_all_nb(out, &mut r.iov(), stall),
        Reply::StagedRead { resp, guard, req } => write_staged_read(out, resp, &guard, &req, stall),
    }
}

/// Answers a read of GPU memory in staging mode: copies it out piece by piece through a
/// bounce buffer. A copy that fails before the header went out is refused with
/// `STAGING_FAILED`; one that fails later closes the connection (the header promised the
/// bytes).
fn write_staged_read(
    out: &TcpStream,
    mut resp: FrameHeader,
    guard: &SegmentGuard,
    hdr: &FrameHeader,
    stall: Duration,
) -> io::Result<()> {
    let refuse = |out: &TcpStream, mut resp: FrameHeader| {
        resp.status = STAGING_FAILED;
        resp.len = 0;
        write_all_nb(out, &mut Out::of(&[&resp.encode()]), stall)
    };
    let device = guard.segment().staging().expect("staged segment").clone();
    let addr = guard.segment().addr() + hdr.offset;
    let mut buf = match device.bounce() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("refusing read: no staging buffer: {e}");
            return refuse(out, resp);
        }
    };
    let mut done = 0u64;
    while done < hdr.len {
        let n = (hdr.len - done).min(buf.len() as u64) as usize;
        if let Err(e) = device.to_host(addr + done, &mut buf[..n]) {
            device.recycle(buf);
            if done == 0 {
                tracing::warn!("refusing read: staging copy failed: {e}");
                return refuse(out, resp);
            }
            return Err(io::Error::other(format!(
                "staging copy failed mid-read: {e}"
            )));
        }
        let sent = if done == 0 {
            resp.len = hdr.len;
            let h = resp.encode();
            write_all_nb(out, &mut Out::of(&[&h, &buf[..n]]), stall)
        } else {
            write_all_nb(out, &mut Out::of(&[&buf[..n]]), stall)
        };
        if let Err(e) = sent {
            device.recycle(buf);
            return Err(e);
        }
        done += n as u64;
    }
    device.recycle(buf);
    Ok(())
}

/// Ack status of writes refused because their room was aborted (`Error::RoomFailed`'s code).
const ROOM_ABORTED: u16 = 30;

/// Ack status of writes whose staging copy into GPU memory failed (`Error::Cuda`'s code).
const STAGING_FAILED: u16 = 33;

/// Marks a write frame that belongs to a notified batch (a KV room): bit 32 of its tag.
pub(crate) const TAG_ROOM: u64 = 1 << 32;

/// The notification tag (24 bits) a write frame carries, if it belongs to a notified batch.
fn room_tag(hdr: &FrameHeader) -> Option<u32> {
    (hdr.tag & TAG_ROOM != 0).then(|| imm_decode(hdr.tag as u32).0)
}

struct Target {
    segments: Arc<SegmentTable>,
    describe: Arc<dyn Fn() -> Vec<SegmentDesc> + Send + Sync>,
    notifier: Arc<Notifier>,
    fences: Arc<RoomFences>,
    /// The room gate held while the current write frame's payload lands.
    hold: Option<RoomHold>,
    /// Small staged writes read but not yet copied to the device.
    landing: Option<Landing>,
    peer_engine: u64,
    peer_epoch: u64,
    peer_token: u64,
    refusals: Arc<crate::refusals::Refusals>,
    peer: String,
    replies: Arc<Replies>,
    /// First error code per batch on this connection, reported in its ack.
    errors: HashMap<u64, u16>,
}

/// Small writes to staged GPU memory gathered in one bounce buffer, landed with one device
/// copy before anything depends on them (their batch's ack, a notification, a read, a write
/// that does not join). Until then their pins and room gates stay held.
struct Landing {
    device: Arc<dyn DeviceCopy>,
    /// `None` while a frame is being read into it.
    buf: Option<Bounce>,
    filled: usize,
    /// Device destination and length of each frame, in buffer order.
    parts: Vec<(u64, usize)>,
    batches: Vec<u64>,
    guards: Vec<SegmentGuard>,
    holds: Vec<RoomHold>,
}

impl Target {
    /// Where a write of `len` bytes to staged memory at `addr` goes: into the landing buffer
    /// when it fits there (started if need be), else through the frame's own staging.
    fn staged_sink(&mut self, guard: SegmentGuard, addr: u64, len: u64) -> Sink {
        let device = guard.segment().staging().expect("staged segment").clone();
        let joins = self.landing.as_ref().is_some_and(|l| {
            Arc::ptr_eq(&l.device, &device)
                && l.buf
                    .as_ref()
                    .is_some_and(|b| l.filled + len as usize <= b.len())
        });
        if !joins {
            self.land_pending();
            if len as usize > STAGE_CHUNK {
                return Sink::memory(guard, addr, None);
            }
            match device.bounce() {
                Ok(buf) => {
                    self.landing = Some(Landing {
                        device: device.clone(),
                        buf: Some(buf),
                        filled: 0,
                        parts: Vec::new(),
                        batches: Vec::new(),
                        guards: Vec::new(),
                        holds: Vec::new(),
                    })
                }
                // The frame's own staging reports the failure.
                Err(_) => return Sink::memory(guard, addr, None),
            }
        }
        let l = self.landing.as_mut().expect("joined or started above");
        let buf = l.buf.take().expect("joined or started with its buffer");
        Sink::deferred(guard, addr, device, buf, l.filled)
    }

    /// Takes a deferred frame back into the landing buffer once read.
    fn gathered(&mut self, hdr: &FrameHeader, frame: DeferredFrame) {
        let l = self
            .landing
            .as_mut()
            .expect("a deferred frame belongs to the landing");
        l.buf = Some(frame.buf);
        match frame.error {
            None => {
                l.filled = frame.filled;
                l.parts.push((
                    frame.guard.segment().addr() + hdr.offset,
                    frame.filled - frame.start,
                ));
                l.batches.push(hdr.batch);
                l.guards.push(frame.guard);
                l.holds.extend(self.hold.take());
            }
            Some(reason) => {
                tracing::warn!(batch = hdr.batch, "staged write failed: {reason}");
                self.errors.entry(hdr.batch).or_insert(STAGING_FAILED);
            }
        }
    }

    /// Copies every gathered write to the device (one copy), then lets their pins and room
    /// gates go; a failed copy fails each of their batches.
    fn land_pending(&mut self) {
        if self.landing.as_ref().is_some_and(|l| l.buf.is_none()) {
            // A frame is being read into the buffer (the socket ran dry mid-frame): everything
            // lands once it is complete.
            return;
        }
        let Some(l) = self.landing.take() else { return };
        let buf = l.buf.expect("checked above");
        if !l.parts.is_empty()
            && let Err(e) = l.device.to_device_scatter(&l.parts, &buf[..l.filled])
        {
            tracing::warn!(
                writes = l.parts.len(),
                "staging copy to the GPU failed: {e}"
            );
            for b in &l.batches {
                self.errors.entry(*b).or_insert(STAGING_FAILED);
            }
        }
        l.device.recycle(buf);
    }

    fn reply(&mut self, hdr: FrameHeader, payload: &[u8]) -> io::Result<()> {
        self.replies.send(Reply::frame(hdr, payload));
        Ok(())
    }

    fn serve_read(&mut self, hdr: &FrameHeader) -> io::Result<()> {
        let mut resp = FrameHeader {
            op: FrameOp::ReadResponse,
            flags: 0,
            status: 0,
            len: 0,
            ..*hdr
        };
        match self
            .segments
            .pin_range(crate::memory::SegmentId(hdr.segment), hdr.offset, hdr.len)
        {
            Ok(guard) if guard.segment().staging().is_some() => {
                self.replies.send(Reply::StagedRead {
                    resp,
                    guard,
                    req: *hdr,
                });
                Ok(())
            }
            Ok(guard) => {
                resp.len = hdr.len;
                let addr = guard.segment().addr() + hdr.offset;
                self.replies.send(Reply::Bytes {
                    head: resp.encode().to_vec(),
                    body: Some((guard, addr, hdr.len as usize)),
                });
                Ok(())
            }
            Err(e) => {
                let peer = &self.peer;
                self.refusals
                    .refuse("a read", &format_args!("from {peer}: {e}"));
                resp.status = e.code() as u16;
                self.reply(resp, &[])
            }
        }
    }
}

impl FrameHandler for Target {
    fn pause(&self) -> bool {
        // The initiator does not read its replies: stop reading its requests (bounded memory).
        self.replies.outbox.len() >= REPLY_BOUND
    }

    fn on_header(&mut self, hdr: &FrameHeader) -> io::Result<Sink> {
        if hdr.op != FrameOp::Write {
            // Whatever follows may depend on the gathered writes having landed.
            self.land_pending();
        }
        match hdr.op {
            FrameOp::Write => {
                if let Some(tag) = room_tag(hdr) {
                    let key = (self.peer_engine, self.peer_epoch, tag >> ROOM_SLOT_SHIFT);
                    match self.fences.enter(key) {
                        Some(hold) => self.hold = Some(hold),
                        None => {
                            // Gathered writes may hold this room's gate: let its fence return.
                            self.land_pending();
                            tracing::debug!(slot = key.2, "dropping a write of an aborted room");
                            self.errors.entry(hdr.batch).or_insert(ROOM_ABORTED);
                            return Ok(Sink::Discard);
                        }
                    }
                }
                match self.segments.pin_range(
                    crate::memory::SegmentId(hdr.segment),
                    hdr.offset,
                    hdr.len,
                ) {
                    Ok(guard) if guard.segment().staging().is_some() => {
                        let addr = guard.segment().addr() + hdr.offset;
                        Ok(self.staged_sink(guard, addr, hdr.len))
                    }
                    Ok(guard) => {
                        let addr = guard.segment().addr() + hdr.offset;
                        Ok(Sink::memory(guard, addr, None))
                    }
                    Err(e) => {
                        let peer = &self.peer;
                        self.refusals
                            .refuse("a write", &format_args!("from {peer}: {e}"));
                        self.errors.entry(hdr.batch).or_insert(e.code() as u16);
                        Ok(Sink::Discard)
                    }
                }
            }
            FrameOp::ReadRequest | FrameOp::SegmentsRequest | FrameOp::Notify => Ok(Sink::Discard),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected {other:?} frame from initiator"),
            )),
        }
    }

    fn on_frame(&mut self, hdr: &FrameHeader, sink: Sink) -> io::Result<()> {
        if hdr.op == FrameOp::Write {
            sink.maybe_corrupt();
        }
        // A staged write reaches GPU memory here (or, gathered, before its batch's ack or
        // anything else that may depend on it); then the pin goes.
        match sink.take_deferred() {
            Ok(frame) => self.gathered(hdr, frame),
            Err(sink) => {
                if let Err(reason) = sink.land() {
                    tracing::warn!(
                        batch = hdr.batch,
                        segment = hdr.segment,
                        "staged write failed: {reason}"
                    );
                    self.errors.entry(hdr.batch).or_insert(STAGING_FAILED);
                }
            }
        }
        self.hold = None;
        match hdr.op {
            FrameOp::Write if hdr.flags & FLAG_LAST != 0 => {
                self.land_pending();
                let status = self.errors.remove(&hdr.batch).unwrap_or(0);
                tracing::trace!(batch = hdr.batch, status, "ack");
                let ack = FrameHeader {
                    op: FrameOp::Ack,
                    flags: 0,
                    status,
                    segment: 0,
                    batch: hdr.batch,
                    offset: 0,
                    len: 0,
                    tag: 0,
                };
                self.reply(ack, &[])
            }
            FrameOp::ReadRequest => self.serve_read(hdr),
            FrameOp::Notify => {
                let (tag, parts) = imm_decode(hdr.tag as u32);
                let key = (self.peer_engine, self.peer_epoch, tag >> ROOM_SLOT_SHIFT);
                if self.fences.enter(key).is_none() {
                    return Ok(());
                }
                self.notifier.part(
                    self.peer_engine,
                    self.peer_epoch,
                    self.peer_token,
                    tag,
                    parts,
                );
                Ok(())
            }
            FrameOp::SegmentsRequest => {
                let list: Vec<SegmentDesc> = (self.describe)();
                let mut payload = Vec::new();
                encode_segments(&list, &mut payload);
                let resp = FrameHeader {
                    op: FrameOp::SegmentsResponse,
                    flags: 0,
                    status: 0,
                    segment: 0,
                    batch: 0,
                    offset: 0,
                    len: payload.len() as u64,
                    tag: 0,
                };
                self.reply(resp, &payload)
            }
            _ => Ok(()),
        }
    }
}
