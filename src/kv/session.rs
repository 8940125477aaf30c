//! The KV room state machines, pure: events in, state and decisions out. No I/O, no clock.
//!
//! States only move forward (Bootstrapping → WaitingForInput → Transferring → Success), any
//! state but Success may fall to Failed, and Failed and Success are final.

use super::{KvPoll, MAX_CHUNKS};

/// Why a call on a room was refused; the room itself is unchanged unless documented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The call does not fit the state: `(state, what was attempted)`.
    State(KvPoll, &'static str),
    /// Page counts or indices are wrong.
    Pages(String),
}

impl Refusal {
    /// The library error for this refusal of a call on room `room`.
    pub fn into_error(self, room: u64) -> crate::error::Error {
        use crate::error::Error;
        match self {
            Refusal::State(state, op) => Error::RoomState {
                room,
                state: state.as_str(),
                op,
            },
            Refusal::Pages(reason) => Error::InvalidPages { room, reason },
        }
    }
}

/// One chunk the sender is about to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Position of its first page in the room (index into the destination pages).
    pub offset: u64,
    /// Pages it carries (0 only for an empty last chunk, which re-sends nothing but must still
    /// carry aux and the final notification).
    pub pages: u64,
    /// Its sequence number in the room.
    pub seq: u32,
    /// Whether it ends the room.
    pub last: bool,
}

fn fail_into(state: &mut KvPoll, reason: &mut Option<String>, why: String) -> bool {
    if state.is_final() {
        return false;
    }
    *state = KvPoll::Failed;
    *reason = Some(why);
    true
}

/// The prefill side of a room.
#[derive(Debug, Clone)]
pub struct SenderSession {
    state: KvPoll,
    reason: Option<String>,
    num_pages: Option<u64>,
    aux_index: Option<u32>,
    dst_pages: Option<u64>,
    sent: u64,
    chunks: u32,
    last_queued: bool,
    outstanding: u32,
}

impl Default for SenderSession {
    fn default() -> Self {
        Self::new()
    }
}

impl SenderSession {
    /// A room waiting for its receiver.
    pub fn new() -> Self {
        SenderSession {
            state: KvPoll::Bootstrapping,
            reason: None,
            num_pages: None,
            aux_index: None,
            dst_pages: None,
            sent: 0,
            chunks: 0,
            last_queued: false,
            outstanding: 0,
        }
    }

    /// Current state.
    pub fn state(&self) -> KvPoll {
        self.state
    }

    /// Why it failed.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The aux slot given to `init`.
    pub fn aux_index(&self) -> Option<u32> {
        self.aux_index
    }

    /// Pages sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The caller will send `num_pages` pages in total. Refused twice, for 0 pages, or for a
    /// count that differs from the receiver's (which also fails the room).
    pub fn init(&mut self, num_pages: u64, aux_index: Option<u32>) -> Result<(), Refusal> {
        if self.state.is_final() || self.num_pages.is_some() {
            return Err(Refusal::State(self.state, "init (once, before it ends)"));
        }
        if num_pages == 0 {
            return Err(Refusal::Pages("a room needs at least one page".into()));
        }
        if let Some(d) = self.dst_pages
            && d != num_pages
        {
            let why = format!("page count mismatch: sender has {num_pages}, receiver {d}");
            self.fail(why.clone());
            return Err(Refusal::Pages(why));
        }
        self.num_pages = Some(num_pages);
        self.aux_index = aux_index;
        Ok(())
    }

    /// The receiver's destination (`dst_pages` pages) arrived. `Err` (and Failed) when the
    /// counts differ.
    pub fn peer_ready(&mut self, dst_pages: u64) -> Result<(), String> {
        if self.state != KvPoll::Bootstrapping {
            return Err(format!("destination arrived while {}", self.state.as_str()));
        }
        if let Some(n) = self.num_pages
            && n != dst_pages
        {
            let why = format!("page count mismatch: sender has {n}, receiver {dst_pages}");
            self.fail(why.clone());
            return Err(why);
        }
        self.dst_pages = Some(dst_pages);
        self.state = KvPoll::WaitingForInput;
        Ok(())
    }

    /// The caller sends `pages` more pages, ending the room if `is_last`. Returns the chunk to
    /// write, or `None` for an empty chunk that is not the last (nothing to do). The caller
    /// then reports [`SenderSession::chunk_settled`] (or fails the room).
    pub fn begin_chunk(&mut self, pages: u64, is_last: bool) -> Result<Option<Chunk>, Refusal> {
        if !matches!(self.state, KvPoll::WaitingForInput | KvPoll::Transferring) {
            return Err(Refusal::State(self.state, "send"));
        }
        let Some(total) = self.num_pages else {
            return Err(Refusal::State(self.state, "send before init"));
        };
        if self.last_queued {
            return Err(Refusal::State(self.state, "send after the last chunk"));
        }
        let after = self.sent + pages;
        if after > total {
            return Err(Refusal::Pages(format!(
                "{after} pages sent but the room has {total}"
            )));
        }
        if is_last && after != total {
            return Err(Refusal::Pages(format!(
                "last chunk ends at page {after} of {total}"
            )));
        }
        if pages == 0 && !is_last {
            return Ok(None);
        }
        if self.chunks >= MAX_CHUNKS {
            return Err(Refusal::Pages(format!(
                "more than {MAX_CHUNKS} chunks in one room"
            )));
        }
        let chunk = Chunk {
            offset: self.sent,
            pages,
            seq: self.chunks,
            last: is_last,
        };
        self.sent = after;
        self.chunks += 1;
        self.last_queued = is_last;
        self.outstanding += 1;
        self.state = KvPoll::Transferring;
        Ok(Some(chunk))
    }

    /// A chunk's writes all completed (`Ok`) or failed.
    pub fn chunk_settled(&mut self, result: Result<(), String>) {
        self.outstanding = self.outstanding.saturating_sub(1);
        match result {
            Err(why) => {
                self.fail(why);
            }
            Ok(()) if self.last_queued && self.outstanding == 0 && !self.state.is_final() => {
                self.state = KvPoll::Success;
            }
            Ok(()) => {}
        }
    }

    /// Fails the room (no-op once final). Returns true if it changed the state.
    pub fn fail(&mut self, reason: String) -> bool {
        fail_into(&mut self.state, &mut self.reason, reason)
    }
}

/// The decode side of a room.
#[derive(Debug, Clone)]
pub struct ReceiverSession {
    state: KvPoll,
    reason: Option<String>,
    dst_pages: Option<u64>,
    seen: [u64; (MAX_CHUNKS / 64) as usize],
    chunks: Option<u32>,
}

impl Default for ReceiverSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ReceiverSession {
    /// A room that has not told the sender its destination yet.
    pub fn new() -> Self {
        ReceiverSession {
            state: KvPoll::Bootstrapping,
            reason: None,
            dst_pages: None,
            seen: [0; (MAX_CHUNKS / 64) as usize],
            chunks: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> KvPoll {
        self.state
    }

    /// Why it failed.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The destination has `dst_pages` pages. Refused twice or for 0 pages.
    pub fn init(&mut self, dst_pages: u64) -> Result<(), Refusal> {
        if self.state.is_final() || self.dst_pages.is_some() {
            return Err(Refusal::State(self.state, "init (once, before it ends)"));
        }
        if dst_pages == 0 {
            return Err(Refusal::Pages("a room needs at least one page".into()));
        }
        self.dst_pages = Some(dst_pages);
        Ok(())
    }

    /// Whether `init` was called.
    pub fn initialized(&self) -> bool {
        self.dst_pages.is_some()
    }

    /// The sender accepted the room.
    pub fn accepted(&mut self) {
        if self.state == KvPoll::Bootstrapping {
            self.state = KvPoll::WaitingForInput;
        }
    }

    /// Chunk `seq` (the last one if `last`) was notified: all its data has landed. Returns
    /// true when this completes the room.
    pub fn notified(&mut self, seq: u32, last: bool) -> bool {
        if self.state.is_final() || seq >= MAX_CHUNKS || self.dst_pages.is_none() {
            return false;
        }
        if last {
            match self.chunks {
                Some(n) if n != seq + 1 => {
                    self.fail(format!("two last chunks ({} and {})", n - 1, seq));
                    return false;
                }
                _ => self.chunks = Some(seq + 1),
            }
        }
        self.seen[(seq / 64) as usize] |= 1 << (seq % 64);
        self.state = KvPoll::Transferring;
        let complete = self
            .chunks
            .is_some_and(|n| (0..n).all(|s| self.seen[(s / 64) as usize] & (1 << (s % 64)) != 0));
        if complete {
            self.state = KvPoll::Success;
        }
        complete
    }

    /// Fails the room (no-op once final). Returns true if it changed the state.
    pub fn fail(&mut self, reason: String) -> bool {
        fail_into(&mut self.state, &mut self.reason, reason)
    }

    /// Every chunk arrived but the bytes cannot be trusted to be visible where they landed
    /// (a GPU flush failed) before the Success was published: the room fails instead.
    /// Returns true if it changed the state (false unless it is Success).
    pub fn revoke_success(&mut self, reason: String) -> bool {
        if self.state != KvPoll::Success {
            return false;
        }
        self.state = KvPoll::Failed;
        self.reason = Some(reason);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_walks_the_states_in_order() {
        let mut s = SenderSession::new();
        assert_eq!(s.state(), KvPoll::Bootstrapping);
        assert_eq!(
            s.begin_chunk(1, false),
            Err(Refusal::State(KvPoll::Bootstrapping, "send"))
        );
        s.init(10, Some(3)).unwrap();
        s.peer_ready(10).unwrap();
        assert_eq!(s.state(), KvPoll::WaitingForInput);
        let c = s.begin_chunk(4, false).unwrap().unwrap();
        assert_eq!((c.offset, c.pages, c.seq, c.last), (0, 4, 0, false));
        assert_eq!(s.state(), KvPoll::Transferring);
        assert_eq!(s.begin_chunk(0, false), Ok(None));
        let c = s.begin_chunk(6, true).unwrap().unwrap();
        assert_eq!((c.offset, c.pages, c.seq, c.last), (4, 6, 1, true));
        s.chunk_settled(Ok(()));
        assert_eq!(s.state(), KvPoll::Transferring, "one chunk still out");
        s.chunk_settled(Ok(()));
        assert_eq!(s.state(), KvPoll::Success);
        assert!(!s.fail("late".into()), "Success is final");
        assert_eq!(s.state(), KvPoll::Success);
    }

    #[test]
    fn sender_refuses_bad_counts_without_moving() {
        let mut s = SenderSession::new();
        assert!(matches!(s.init(0, None), Err(Refusal::Pages(_))));
        s.init(5, None).unwrap();
        assert!(matches!(s.init(5, None), Err(Refusal::State(..))));
        s.peer_ready(5).unwrap();
        assert!(matches!(s.begin_chunk(6, false), Err(Refusal::Pages(_))));
        assert!(matches!(s.begin_chunk(4, true), Err(Refusal::Pages(_))));
        assert_eq!(s.state(), KvPoll::WaitingForInput);
        assert_eq!(s.sent(), 0);
        s.begin_chunk(5, true).unwrap();
        assert!(matches!(
            s.begin_chunk(0, true),
            Err(Refusal::State(_, "send after the last chunk"))
        ));
    }

    #[test]
    fn sender_page_count_mismatch_fails_the_room_either_way_round() {
        let mut s = SenderSession::new();
        s.init(5, None).unwrap();
        assert!(s.peer_ready(6).is_err());
        assert_eq!(s.state(), KvPoll::Failed);
        assert!(s.reason().unwrap().contains("sender has 5, receiver 6"));

        let mut s = SenderSession::new();
        s.peer_ready(6).unwrap();
        assert!(matches!(s.init(5, None), Err(Refusal::Pages(_))));
        assert_eq!(s.state(), KvPoll::Failed);
    }

    #[test]
    fn sender_empty_last_chunk_still_ends_the_room() {
        let mut s = SenderSession::new();
        s.init(2, None).unwrap();
        s.peer_ready(2).unwrap();
        s.begin_chunk(2, false).unwrap();
        let c = s.begin_chunk(0, true).unwrap().unwrap();
        assert_eq!((c.pages, c.last, c.seq), (0, true, 1));
    }

    #[test]
    fn sender_failure_is_sticky_and_first_reason_wins() {
        let mut s = SenderSession::new();
        s.init(2, None).unwrap();
        s.peer_ready(2).unwrap();
        s.begin_chunk(2, true).unwrap();
        s.chunk_settled(Err("lane died".into()));
        assert_eq!(s.state(), KvPoll::Failed);
        assert!(!s.fail("deadline".into()));
        assert_eq!(s.reason(), Some("lane died"));
        assert!(matches!(
            s.begin_chunk(0, true),
            Err(Refusal::State(KvPoll::Failed, _))
        ));
    }

    #[test]
    fn receiver_succeeds_once_every_chunk_up_to_the_last_is_in() {
        let mut r = ReceiverSession::new();
        assert!(!r.notified(0, true), "ignored before init");
        r.init(8).unwrap();
        r.accepted();
        assert_eq!(r.state(), KvPoll::WaitingForInput);
        assert!(
            !r.notified(2, true),
            "last arrives first: chunks 0 and 1 missing"
        );
        assert_eq!(r.state(), KvPoll::Transferring);
        assert!(!r.notified(0, false));
        assert!(r.notified(1, false));
        assert_eq!(r.state(), KvPoll::Success);
        assert!(!r.fail("late".into()));
    }

    #[test]
    fn receiver_notification_before_accept_moves_forward_only() {
        let mut r = ReceiverSession::new();
        r.init(1).unwrap();
        assert!(r.notified(0, true));
        r.accepted();
        assert_eq!(
            r.state(),
            KvPoll::Success,
            "accept after success does not go back"
        );
    }

    #[test]
    fn receiver_rejects_two_different_last_chunks() {
        let mut r = ReceiverSession::new();
        r.init(1).unwrap();
        r.notified(3, true);
        r.notified(1, true);
        assert_eq!(r.state(), KvPoll::Failed);
        assert!(matches!(r.init(1), Err(Refusal::State(KvPoll::Failed, _))));
    }
}
