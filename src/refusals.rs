//! Log lines for refused input, rate-limited: a flood of hostile connections or messages
//! costs at most [`PER_SECOND`] lines a second, and the next line that gets through says
//! how many were left out.

use std::time::Instant;

use parking_lot::Mutex;

/// Most refusal lines logged per second by one [`Refusals`].
pub(crate) const PER_SECOND: u32 = 10;

/// One rate limit over a family of refusal lines.
#[derive(Debug, Default)]
pub(crate) struct Refusals(Mutex<Window>);

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    dropped: u64,
    total: u64,
}

impl Refusals {
    /// Counts one refusal; logs it (a warning, with its reason) unless this second's share of
    /// lines is spent.
    pub(crate) fn refuse(&self, what: &str, reason: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut w = self.0.lock();
        w.total += 1;
        if w.start.is_none_or(|s| now.duration_since(s).as_secs() >= 1) {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged >= PER_SECOND {
            w.dropped += 1;
            return;
        }
        w.logged += 1;
        let dropped = std::mem::take(&mut w.dropped);
        drop(w);
        if dropped > 0 {
            tracing::warn!("refused {what}: {reason} ({dropped} more refusals not logged)");
        } else {
            tracing::warn!("refused {what}: {reason}");
        }
    }

    /// Refusals counted so far.
    pub(crate) fn total(&self) -> u64 {
        self.0.lock().total
    }
}
