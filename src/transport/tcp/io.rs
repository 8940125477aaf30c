//! Socket helpers shared by both ends of a TCP data connection: readiness waits, vectored
//! writes on non-blocking sockets, and the resumable frame reader.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::batch::Batch;
use crate::cuda::{Bounce, DeviceCopy};
pub(crate) use crate::memory::raw::Out;
use crate::memory::{SegmentGuard, raw};
use crate::wire::{FRAME_HEADER_LEN, FrameHeader};

fn wait_for(s: &TcpStream, what: PollFlags, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(s.as_fd(), what)];
    let ms =
        PollTimeout::try_from(timeout.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(n) => n > 0,
        Err(nix::errno::Errno::EINTR) => false,
        Err(_) => true,
    }
}

/// Writes all of `buf` to a blocking socket (its write timeout bounds each wait), as
/// [`Out::send`] does: no SIGPIPE.
pub(crate) fn send_all(s: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut out = Out::of(&[buf]);
    while !out.is_empty() {
        match out.send(s) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer closed")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes every byte of `bufs` to a non-blocking socket, waiting for room when it is full.
/// Gives up with `TimedOut` when the peer accepts nothing for `stall`.
pub(crate) fn write_all_nb(s: &TcpStream, out: &mut Out<'_>, stall: Duration) -> io::Result<()> {
    let mut stalled_since: Option<Instant> = None;
    while !out.is_empty() {
        match out.send(s) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer closed")),
            Ok(_) => stalled_since = None,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > stall {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "peer stopped reading",
                    ));
                }
                wait_for(s, PollFlags::POLLOUT, Duration::from_millis(50));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Test-only fault point: each of the next this-many write frames that land in host memory
/// at a TCP target of this process gets its first byte flipped once it landed, a corruption
/// in flight that no transport check sees ([`crate::testing::corrupt_tcp_writes`]).
pub(crate) static CORRUPT_WRITES: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(0);

/// Where the payload of the frame being read goes.
#[derive(Debug)]
pub(crate) enum Sink {
    /// Into memory at this address (validated and pinned by whoever chose it). With a batch,
    /// each chunk is copied under the batch's copy permit and the rest is discarded once the
    /// batch fails.
    Memory {
        guard: SegmentGuard,
        addr: u64,
        batch: Option<Arc<Batch>>,
    },
    /// Into GPU memory reached through staging: through a bounce buffer, copied to the device
    /// each time it fills and when the frame ends (see [`Sink::land`]).
    Staged(Box<Staged>),
    /// Read and thrown away.
    Discard,
    /// Collected into a buffer (small control payloads).
    Collect(Vec<u8>),
}

impl Sink {
    /// Where a payload for `[addr, ..)` of the guarded segment goes: in place for host memory,
    /// through a bounce buffer for GPU memory registered in staging mode.
    pub(crate) fn memory(guard: SegmentGuard, addr: u64, batch: Option<Arc<Batch>>) -> Sink {
        match guard.segment().staging().cloned() {
            None => Sink::Memory { guard, addr, batch },
            Some(device) => Sink::Staged(Box::new(Staged {
                guard,
                addr,
                batch,
                device,
                buf: None,
                filled: 0,
                start: 0,
                deferred: false,
                landed: 0,
                error: None,
            })),
        }
    }

    /// A payload for staged GPU memory at `addr` that goes into `buf` after the `filled`
    /// bytes already there and stays there when the frame ends: the caller lands many frames
    /// with one device copy ([`Sink::take_deferred`]). The payload must fit.
    pub(crate) fn deferred(
        guard: SegmentGuard,
        addr: u64,
        device: Arc<dyn DeviceCopy>,
        buf: Bounce,
        filled: usize,
    ) -> Sink {
        Sink::Staged(Box::new(Staged {
            guard,
            addr,
            batch: None,
            device,
            buf: Some(buf),
            filled,
            start: filled,
            deferred: true,
            landed: 0,
            error: None,
        }))
    }

    /// Takes back what a [`deferred`](Self::deferred) sink holds after its frame: the bounce
    /// buffer, the bytes filled (the frame's payload at `[start, filled)`), the frame's pin
    /// and its first failure. Any other sink comes back as `Err`.
    pub(crate) fn take_deferred(self) -> Result<DeferredFrame, Sink> {
        match self {
            Sink::Staged(st) if st.deferred => {
                let st = *st;
                Ok(DeferredFrame {
                    buf: st.buf.expect("a deferred sink starts with its buffer"),
                    start: st.start,
                    filled: st.filled,
                    guard: st.guard,
                    error: st.error,
                })
            }
            other => Err(other),
        }
    }

    /// The [`CORRUPT_WRITES`] fault point, for a write frame that just completed: one load
    /// of an atomic while it is not armed.
    pub(crate) fn maybe_corrupt(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if CORRUPT_WRITES.load(Relaxed) == 0 {
            return;
        }
        if let Sink::Memory { guard, addr, .. } = self
            && guard.segment().info.kind == crate::memory::MemoryKind::Host
            && CORRUPT_WRITES
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok()
        {
            raw::flip_byte(guard, *addr);
        }
    }

    /// Finishes a completely read frame: a staged payload's last bytes go to the device.
    /// `Err` says why a staged payload did not (fully) land.
    pub(crate) fn land(self) -> Result<(), String> {
        match self {
            Sink::Staged(mut st) => {
                debug_assert!(!st.deferred, "deferred frames are taken back, not landed");
                st.flush();
                if let Some(b) = st.buf.take() {
                    st.device.recycle(b);
                }
                match st.error.take() {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

/// A frame read into a shared bounce buffer, waiting to land (see [`Sink::deferred`]).
pub(crate) struct DeferredFrame {
    pub(crate) buf: Bounce,
    /// Where the frame's payload starts in `buf`.
    pub(crate) start: usize,
    /// Bytes in `buf`, this frame's included.
    pub(crate) filled: usize,
    pub(crate) guard: SegmentGuard,
    pub(crate) error: Option<String>,
}

/// A payload on its way to GPU memory through a bounce buffer.
pub(crate) struct Staged {
    guard: SegmentGuard,
    /// Device address the frame's payload starts at.
    addr: u64,
    batch: Option<Arc<Batch>>,
    device: Arc<dyn DeviceCopy>,
    buf: Option<Bounce>,
    /// Bytes waiting in `buf`.
    filled: usize,
    /// Where this frame's payload starts in `buf` (non-zero only when deferred).
    start: usize,
    /// The buffer is shared with earlier frames and lands later, all at once: no copy here.
    deferred: bool,
    /// Payload bytes already copied to the device.
    landed: u64,
    /// The first failure; later bytes are dropped.
    error: Option<String>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("segment", &self.guard.segment().info.id)
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("landed", &self.landed)
            .finish()
    }
}

impl Staged {
    /// The free part of the bounce buffer (allocated on first use); `None` after a failure.
    fn space(&mut self) -> Option<&mut [u8]> {
        if self.error.is_some() {
            return None;
        }
        if self.buf.is_none() {
            match self.device.bounce() {
                Ok(b) => self.buf = Some(b),
                Err(e) => {
                    self.error = Some(format!("no staging buffer: {e}"));
                    return None;
                }
            }
        }
        let filled = self.filled;
        self.buf.as_mut().map(|b| &mut b[filled..])
    }

    /// Accounts `n` new bytes in the buffer; copies it to the device when full.
    fn filled(&mut self, n: usize) {
        self.filled += n;
        if !self.deferred && self.buf.as_ref().is_some_and(|b| self.filled == b.len()) {
            self.flush();
        }
    }

    fn push(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let Some(space) = self.space() else { return };
            let n = space.len().min(chunk.len());
            space[..n].copy_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            self.filled(n);
        }
    }

    /// Copies what the buffer holds to the device (under the batch's copy permit).
    fn flush(&mut self) {
        if self.deferred {
            return;
        }
        let n = std::mem::take(&mut self.filled);
        if n == 0 || self.error.is_some() {
            return;
        }
        let Some(buf) = &self.buf else { return };
        let permit = self.batch.as_ref().map(|b| b.copy_permit());
        if matches!(permit, Some(None)) {
            // The batch failed: nothing more may land.
            self.error = Some("batch failed".into());
            return;
        }
        let dst = self.addr + self.landed;
        let seg = &self.guard.segment().info;
        if dst + n as u64 > seg.base + seg.len {
            self.error = Some(format!("staged payload runs past segment {}", seg.id));
            return;
        }
        match self.device.to_device(dst, &buf[..n]) {
            Ok(()) => self.landed += n as u64,
            Err(e) => self.error = Some(format!("staging copy to the GPU failed: {e}")),
        }
    }
}

/// Decides what to do with frames as the reader decodes them.
pub(crate) trait FrameHandler {
    /// A header arrived. Returns where its payload (if any) goes.
    fn on_header(&mut self, hdr: &FrameHeader) -> io::Result<Sink>;
    /// The frame, payload included, has been read completely.
    fn on_frame(&mut self, hdr: &FrameHeader, sink: Sink) -> io::Result<()>;
    /// Checked after each frame: true stops [`FrameReader::drain`] there (frames already
    /// read stay buffered for the next call).
    fn pause(&self) -> bool {
        false
    }
}

struct Current {
    hdr: FrameHeader,
    done: u64,
    sink: Sink,
}

/// Payloads at least this large bypass the receive buffer and are read straight into place.
const DIRECT_MIN: u64 = 16 << 10;

/// Reads frames from a non-blocking socket, resumably: [`drain`](Self::drain) returns when the
/// socket has nothing more and picks up mid-frame next time.
pub(crate) struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    cur: Option<Current>,
    header_only: bool,
}

impl FrameReader {
    pub(crate) fn new() -> Self {
        FrameReader {
            buf: vec![0u8; 256 << 10].into_boxed_slice(),
            start: 0,
            end: 0,
            cur: None,
            header_only: false,
        }
    }

    /// Forgets a half-read frame (after the connection failed).
    pub(crate) fn reset(&mut self) {
        self.cur = None;
        self.start = 0;
        self.end = 0;
    }

    /// Processes every frame the socket has, or until the handler pauses; returns how many
    /// frames completed. `Err` on EOF, socket error or a protocol violation: the connection
    /// is then unusable.
    pub(crate) fn drain(&mut self, s: &TcpStream, h: &mut impl FrameHandler) -> io::Result<usize> {
        let mut frames = 0;
        loop {
            if self.cur.is_none() {
                // After a large frame, read just the next header: its payload is probably large
                // too and is better read straight into place than through the buffer.
                let have = self.end - self.start;
                let max = if self.header_only {
                    FRAME_HEADER_LEN.saturating_sub(have)
                } else {
                    usize::MAX
                };
                if have < FRAME_HEADER_LEN && !self.fill(s, max)? {
                    return Ok(frames);
                }
                if self.end - self.start < FRAME_HEADER_LEN {
                    continue;
                }
                let mut raw_hdr = [0u8; FRAME_HEADER_LEN];
                raw_hdr.copy_from_slice(&self.buf[self.start..self.start + FRAME_HEADER_LEN]);
                self.start += FRAME_HEADER_LEN;
                let hdr = FrameHeader::decode(&raw_hdr)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let sink = h.on_header(&hdr)?;
                self.cur = Some(Current { hdr, done: 0, sink });
            }
            if !self.payload(s)? {
                return Ok(frames);
            }
            let cur = self.cur.take().expect("current frame");
            self.header_only = cur.hdr.payload_len() >= DIRECT_MIN;
            h.on_frame(&cur.hdr, cur.sink)?;
            frames += 1;
            if h.pause() {
                return Ok(frames);
            }
        }
    }

    /// Refills the buffer; false when the socket would block.
    fn fill(&mut self, mut s: &TcpStream, max: usize) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            let stop = self.buf.len().min(self.end.saturating_add(max));
            match s.read(&mut self.buf[self.end..stop]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by peer",
                    ));
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves payload bytes of the current frame to its sink; true when the payload is complete.
    fn payload(&mut self, s: &TcpStream) -> io::Result<bool> {
        loop {
            let cur = self.cur.as_mut().expect("current frame");
            let total = cur.hdr.payload_len();
            if cur.done >= total {
                return Ok(true);
            }
            let want = total - cur.done;
            let buffered = (self.end - self.start) as u64;
            if buffered > 0 {
                let n = want.min(buffered) as usize;
                deliver(
                    &mut cur.sink,
                    cur.done,
                    &self.buf[self.start..self.start + n],
                );
                self.start += n;
                cur.done += n as u64;
                continue;
            }
            if want >= DIRECT_MIN {
                // The buffer is empty: the bytes after this payload (the next header) land at
                // its start, so a stream of large frames costs one read per frame.
                self.start = 0;
                self.end = 0;
                match read_direct(s, cur, want as usize, &mut self.buf[..FRAME_HEADER_LEN])? {
                    Direct::Read { payload, tail } => {
                        cur.done += payload as u64;
                        self.end = tail;
                        continue;
                    }
                    Direct::WouldBlock => return Ok(false),
                    Direct::NotMemory => {}
                }
            }
            if !self.fill(s, usize::MAX)? {
                return Ok(false);
            }
        }
    }
}

enum Direct {
    /// Payload bytes read, and bytes of what follows read into the tail.
    Read {
        payload: usize,
        tail: usize,
    },
    WouldBlock,
    NotMemory,
}

/// Reads up to `want` payload bytes straight into the sink's memory, bypassing the buffer.
fn read_direct(
    s: &TcpStream,
    cur: &mut Current,
    want: usize,
    tail: &mut [u8],
) -> io::Result<Direct> {
    if let Sink::Staged(st) = &mut cur.sink {
        return read_staged(s, st, want, tail);
    }
    let Sink::Memory { guard, addr, batch } = &cur.sink else {
        return Ok(Direct::NotMemory);
    };
    let permit = batch.as_ref().map(|b| b.copy_permit());
    if matches!(permit, Some(None)) {
        drop(permit);
        // The batch failed: nothing more may land; the rest is read into the buffer and dropped.
        cur.sink = Sink::Discard;
        return Ok(Direct::NotMemory);
    }
    loop {
        let r = raw::read_into_then(guard, addr + cur.done, want, tail, s);
        if let Some(outcome) = read_outcome(r, want) {
            return outcome;
        }
    }
}

/// What one payload read amounts to, `want` bytes of it being payload and the rest tail;
/// `None` when it was interrupted and must be retried.
fn read_outcome(r: io::Result<usize>, want: usize) -> Option<io::Result<Direct>> {
    match r {
        Ok(0) => Some(Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed by peer mid-frame",
        ))),
        Ok(n) => {
            let payload = n.min(want);
            Some(Ok(Direct::Read {
                payload,
                tail: n - payload,
            }))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(Ok(Direct::WouldBlock)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
        Err(e) => Some(Err(e)),
    }
}

/// Reads payload bytes straight into a staged sink's bounce buffer (and, when the rest of the
/// payload fits, the start of the next frame into `tail`).
fn read_staged(
    mut s: &TcpStream,
    st: &mut Staged,
    want: usize,
    tail: &mut [u8],
) -> io::Result<Direct> {
    let Some(space) = st.space() else {
        return Ok(Direct::NotMemory);
    };
    let piece = space.len().min(want);
    let tail: &mut [u8] = if piece == want { tail } else { &mut [] };
    loop {
        let r = s.read_vectored(&mut [
            std::io::IoSliceMut::new(&mut space[..piece]),
            std::io::IoSliceMut::new(&mut *tail),
        ]);
        match read_outcome(r, piece) {
            Some(Ok(Direct::Read { payload, tail })) => {
                st.filled(payload);
                return Ok(Direct::Read { payload, tail });
            }
            Some(outcome) => return outcome,
            None => {}
        }
    }
}

fn deliver(sink: &mut Sink, at: u64, chunk: &[u8]) {
    match sink {
        Sink::Staged(st) => {
            debug_assert_eq!(at, st.landed + (st.filled - st.start) as u64);
            st.push(chunk);
            return;
        }
        Sink::Memory { guard, addr, batch } => {
            let permit = batch.as_ref().map(|b| b.copy_permit());
            if !matches!(permit, Some(None)) {
                raw::copy_in(guard, *addr + at, chunk);
                return;
            }
        }
        Sink::Discard => return,
        Sink::Collect(v) => {
            v.extend_from_slice(chunk);
            return;
        }
    }
    // The batch failed: discard this and every later chunk of the frame.
    *sink = Sink::Discard;
}

#[cfg(test)]
mod tests {
    use std::net::{Shutdown, TcpListener, TcpStream};

    use nix::sys::signal::{SigSet, Signal, raise};

    use super::{Out, send_all};

    /// A socket shut down for writing answers `EPIPE` and raises no SIGPIPE. The signal is
    /// blocked on this thread so that, if raised, it stays pending (Linux keeps blocked signals
    /// even when ignored); SIGTERM, raised after as a marker and numbered higher, tells us
    /// that nothing lower was pending.
    #[test]
    fn a_write_to_a_closed_socket_fails_without_sigpipe() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _peer = listener.accept().unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut set = SigSet::empty();
        set.add(Signal::SIGPIPE);
        set.add(Signal::SIGTERM);
        set.thread_block().unwrap();
        let e = send_all(&s, b"frame").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        let e = Out::of(&[b"a", b"b"]).send(&s).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        raise(Signal::SIGTERM).unwrap();
        let first = set.wait().unwrap();
        if first == Signal::SIGPIPE {
            // Consume the marker before failing, so no SIGTERM is left behind.
            let _ = set.wait();
        }
        set.thread_unblock().unwrap();
        assert_eq!(first, Signal::SIGTERM, "a write raised SIGPIPE");
    }
}
