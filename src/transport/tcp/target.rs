//! Target side of a TCP data connection: checks every frame against the registered segments,
//! lands write payloads straight in place, serves reads, and acknowledges per batch.

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::io::{DeferredFrame, FrameHandler, FrameReader, Out, Sink, wait_readable, write_all_nb};
use crate::cuda::{Bounce, DeviceCopy, STAGE_CHUNK};
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
}

/// Serves one accepted data connection until it closes, errs or the engine shuts down.
pub(crate) fn serve(stream: TcpStream, ctx: ServeContext) {
    let ServeContext {
        segments,
        describe,
        notifier,
        fences,
        shutdown,
        busy_poll,
        stall,
        peer,
        peer_engine,
        peer_epoch,
    } = ctx;
    if let Err(e) = stream.set_nonblocking(true) {
        tracing::warn!(%peer, "cannot serve connection: {e}");
        return;
    }
    let (mut input, out) = match stream.try_clone() {
        Ok(out) => (stream, out),
        Err(e) => {
            tracing::warn!(%peer, "cannot serve connection: {e}");
            return;
        }
    };
    let mut reader = FrameReader::new();
    let mut h = Target {
        segments,
        describe,
        notifier,
        fences,
        hold: None,
        landing: None,
        peer_engine,
        peer_epoch,
        out,
        errors: HashMap::new(),
        stall,
    };
    let mut last_activity = Instant::now();
    while !shutdown.load(Ordering::Acquire) {
        match reader.drain(&mut input, &mut h) {
            // Nothing more to read for now: gathered writes land instead of waiting for more
            // (a room fence waits for them).
            Ok(0) => h.land_pending(),
            Ok(_) => last_activity = Instant::now(),
            Err(e) => {
                match e.kind() {
                    io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, "initiator closed the connection")
                    }
                    _ => tracing::warn!(%peer, "closing data connection: {e}"),
                }
                break;
            }
        }
        if last_activity.elapsed() < busy_poll {
            // Stay hot for the next frame: a sleeping thread costs tens of µs to wake.
            std::thread::yield_now();
        } else {
            wait_readable(&input, Duration::from_millis(100));
        }
    }
    let _ = input.shutdown(std::net::Shutdown::Both);
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
    out: TcpStream,
    /// First error code per batch on this connection, reported in its ack.
    errors: HashMap<u64, u16>,
    stall: Duration,
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
        if !l.parts.is_empty() {
            if let Err(e) = l.device.to_device_scatter(&l.parts, &buf[..l.filled]) {
                tracing::warn!(
                    writes = l.parts.len(),
                    "staging copy to the GPU failed: {e}"
                );
                for b in &l.batches {
                    self.errors.entry(*b).or_insert(STAGING_FAILED);
                }
            }
        }
        l.device.recycle(buf);
    }

    fn reply(&mut self, hdr: FrameHeader, payload: &[u8]) -> io::Result<()> {
        let h = hdr.encode();
        write_all_nb(&mut self.out, &mut Out::of(&[&h, payload]), self.stall)
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
                self.serve_staged_read(resp, &guard, hdr)
            }
            Ok(guard) => {
                resp.len = hdr.len;
                let addr = guard.segment().addr() + hdr.offset;
                let h = resp.encode();
                let mut iov = Out::of(&[&h]);
                iov.registered(&guard, addr, hdr.len as usize);
                write_all_nb(&mut self.out, &mut iov, self.stall)
            }
            Err(e) => {
                tracing::debug!("refusing read: {e}");
                resp.status = e.code() as u16;
                self.reply(resp, &[])
            }
        }
    }
}

impl Target {
    /// Answers a read of GPU memory in staging mode: copies it out piece by piece through a
    /// bounce buffer. A copy that fails before the header went out is refused with
    /// `STAGING_FAILED`; one that fails later closes the connection (the header promised the
    /// bytes).
    fn serve_staged_read(
        &mut self,
        mut resp: FrameHeader,
        guard: &crate::memory::SegmentGuard,
        hdr: &FrameHeader,
    ) -> io::Result<()> {
        let device = guard.segment().staging().expect("staged segment").clone();
        let addr = guard.segment().addr() + hdr.offset;
        let mut buf = match device.bounce() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("refusing read: no staging buffer: {e}");
                resp.status = STAGING_FAILED;
                return self.reply(resp, &[]);
            }
        };
        let mut done = 0u64;
        while done < hdr.len {
            let n = (hdr.len - done).min(buf.len() as u64) as usize;
            if let Err(e) = device.to_host(addr + done, &mut buf[..n]) {
                device.recycle(buf);
                if done == 0 {
                    tracing::warn!("refusing read: staging copy failed: {e}");
                    resp.status = STAGING_FAILED;
                    return self.reply(resp, &[]);
                }
                return Err(io::Error::other(format!(
                    "staging copy failed mid-read: {e}"
                )));
            }
            if done == 0 {
                resp.len = hdr.len;
                let h = resp.encode();
                write_all_nb(&mut self.out, &mut Out::of(&[&h, &buf[..n]]), self.stall)?;
            } else {
                write_all_nb(&mut self.out, &mut Out::of(&[&buf[..n]]), self.stall)?;
            }
            done += n as u64;
        }
        device.recycle(buf);
        Ok(())
    }
}

impl FrameHandler for Target {
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
                        tracing::debug!("refusing write: {e}");
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
                self.notifier
                    .part(self.peer_engine, self.peer_epoch, tag, parts);
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
