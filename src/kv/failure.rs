//! Why a room failed, as a kind a program can switch on and a text a person can read (pure).

use super::KvPoll;

/// The kind of a room's failure. The numeric values are stable (the C ABI's
/// `KVT_FAILURE_*`, Python's `KvRoomFailed.kind`) and never reused.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The peer's manager went away: its channel closed, could not be opened, or fell silent
    /// past the heartbeat timeout. Retrying against a live peer may work.
    PeerLost = 1,
    /// The peer restarted (a new engine epoch) while the room was on its previous life.
    PeerRestarted = 2,
    /// The room did not finish within its deadline (or its channel did not open within the
    /// connect timeout); [`Failure::state`] says where it was stuck.
    Timeout = 3,
    /// This side's caller aborted it.
    Aborted = 4,
    /// The peer's caller aborted it.
    AbortedByPeer = 5,
    /// The two managers' KV layouts do not pair: a configuration error, retrying will not help.
    LayoutMismatch = 6,
    /// Page indices or counts were refused (out of range, or the two sides' counts differ).
    InvalidPages = 7,
    /// The peer refused the room (e.g. a room with this id is live there already).
    Rejected = 8,
    /// Moving the data failed (a write or its completion reported an error).
    Transport = 9,
    /// The data failed an integrity check.
    Integrity = 10,
    /// The manager is shutting down.
    Shutdown = 11,
}

impl FailureKind {
    /// Every kind, in code order.
    pub const ALL: [FailureKind; 11] = [
        FailureKind::PeerLost,
        FailureKind::PeerRestarted,
        FailureKind::Timeout,
        FailureKind::Aborted,
        FailureKind::AbortedByPeer,
        FailureKind::LayoutMismatch,
        FailureKind::InvalidPages,
        FailureKind::Rejected,
        FailureKind::Transport,
        FailureKind::Integrity,
        FailureKind::Shutdown,
    ];

    /// The kind's stable code.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The kind for its code.
    pub fn from_code(code: i32) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// A short snake_case name (`peer_lost`, `timeout`, ...), as Python shows it.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::PeerLost => "peer_lost",
            FailureKind::PeerRestarted => "peer_restarted",
            FailureKind::Timeout => "timeout",
            FailureKind::Aborted => "aborted",
            FailureKind::AbortedByPeer => "aborted_by_peer",
            FailureKind::LayoutMismatch => "layout_mismatch",
            FailureKind::InvalidPages => "invalid_pages",
            FailureKind::Rejected => "rejected",
            FailureKind::Transport => "transport",
            FailureKind::Integrity => "integrity",
            FailureKind::Shutdown => "shutdown",
        }
    }

    /// The kind the *other* side of a room records when told of a failure of this kind:
    /// an abort becomes an abort by the peer, everything else keeps its kind (a layout
    /// mismatch is one on both sides).
    pub fn as_seen_by_peer(self) -> FailureKind {
        match self {
            FailureKind::Aborted => FailureKind::AbortedByPeer,
            FailureKind::Shutdown => FailureKind::PeerLost,
            k => k,
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A room's failure: its kind, the state the room was in when it failed, and a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The state the room was in when it failed (for a timeout: where it was stuck).
    pub state: KvPoll,
    /// A sentence for logs and people.
    pub text: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (while {}): {}",
            self.kind,
            self.state.as_str(),
            self.text
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_dense_and_round_trip() {
        for (i, k) in FailureKind::ALL.iter().enumerate() {
            assert_eq!(k.code(), i as i32 + 1);
            assert_eq!(FailureKind::from_code(k.code()), Some(*k));
        }
        assert_eq!(FailureKind::from_code(0), None);
        assert_eq!(FailureKind::from_code(12), None);
        assert_eq!(FailureKind::Timeout.code(), 3);
        assert_eq!(FailureKind::LayoutMismatch.code(), 6);
    }

    #[test]
    fn the_peer_sees_an_abort_as_its_peers() {
        assert_eq!(
            FailureKind::Aborted.as_seen_by_peer(),
            FailureKind::AbortedByPeer
        );
        assert_eq!(
            FailureKind::LayoutMismatch.as_seen_by_peer(),
            FailureKind::LayoutMismatch
        );
    }
}
