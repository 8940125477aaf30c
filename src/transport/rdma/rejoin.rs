//! Putting a failed rail back into a live peer. When a lane dies with its path (`failover`),
//! its work moves to the other rails and new batches avoid it; the link stays degraded until
//! the rail is probed and put back:
//!
//! 1. On a submit to the peer, [`RdmaLink::rails_to_rejoin`] names the lanes whose path
//!    failed and whose local port is ACTIVE again (sysfs), at most once per probe interval.
//! 2. The engine opens one more control connection to the peer on a background thread,
//!    offering a fresh QP for each of those lanes ([`Offer::on_rails`](super::Offer::on_rails));
//!    the peer answers and connects QPs of its own, as at the first handshake, bound to the
//!    same engine, epoch and link token.
//! 3. [`RdmaLink::put_back`] connects the new QPs and swaps them into the dead lanes' places:
//!    new batches plan onto the rail again.
//!
//! An attempt that fails (the peer refuses, the remote port is down and the new lanes die
//! again) waits twice as long before the next, up to [`MAX_BACKOFF`]; a probe that finds every
//! lane alive resets the wait. The extra control connection lives as long as one of its
//! lanes: losing it fails those lanes with their path (the peer is still reached by the
//! others); the next put-back closes the connections whose lanes are all dead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::failover::Cause;
use super::link::{Lane, RdmaLink};
use super::worker::Cmd;
use super::{Answered, port_down};
use crate::error::{Error, Result};
use crate::transport::PeerLink;

/// The first wait between probes of a failed rail, and between attempts to put it back.
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between attempts to put a rail back that keeps failing.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A link's state of putting rails back.
pub(crate) struct Rejoin {
    /// Set when the link closes: nothing is put back afterwards.
    closed: bool,
    /// Control connections opened to put rails back, each with the lanes it set up.
    extras: Vec<Extra>,
    /// No probe before this.
    next_try: Option<Instant>,
    /// The wait after the next attempt.
    backoff: Duration,
}

impl Default for Rejoin {
    fn default() -> Self {
        Rejoin {
            closed: false,
            extras: Vec::new(),
            next_try: None,
            backoff: MIN_BACKOFF,
        }
    }
}

/// A control connection that put lanes back, and those lanes.
struct Extra {
    control: Box<dyn PeerLink>,
    lanes: Vec<Arc<Lane>>,
}

impl RdmaLink {
    /// The lanes (by index) to put back now: those whose path failed and whose local port is
    /// ACTIVE again, unless the last probe or attempt was too recent. `Some` counts as an
    /// attempt: the next waits longer, until a probe finds every lane alive.
    pub(crate) fn rails_to_rejoin(&self, now: Instant) -> Option<Vec<usize>> {
        let lanes = self.current();
        let dead: Vec<usize> = (0..lanes.len())
            .filter(|&i| lanes[i].cause() == Cause::Path)
            .collect();
        // Another submitter is probing or a rail is being put back: nothing to do here.
        let mut rj = self.rejoin.try_lock()?;
        if dead.is_empty() {
            rj.backoff = MIN_BACKOFF;
            return None;
        }
        if rj.closed || rj.next_try.is_some_and(|t| now < t) {
            return None;
        }
        let back: Vec<usize> = dead
            .into_iter()
            .filter(|&i| port_down(&self.transport.rails[lanes[i].rail()]).is_none())
            .collect();
        if back.is_empty() {
            // Its port is still down: look again soon, without counting an attempt.
            rj.next_try = Some(now + MIN_BACKOFF);
            return None;
        }
        rj.next_try = Some(now + rj.backoff);
        rj.backoff = (rj.backoff * 2).min(MAX_BACKOFF);
        Some(back)
    }

    /// The local rail of each lane in `lanes`, to offer a QP on.
    pub(crate) fn rails_of(&self, lanes: &[usize]) -> Vec<usize> {
        let current = self.current();
        lanes.iter().map(|&i| current[i].rail()).collect()
    }

    /// Connects the QPs the peer answered over `control` (a new control connection whose
    /// handshake carried the offer for `replace`) and puts them in place of the lanes
    /// `replace`, whose path failed. `Err(Shutdown)` when the link closed meanwhile (the new
    /// QPs and connection go).
    pub(crate) fn put_back(
        &self,
        replace: &[usize],
        answered: Answered,
        control: Box<dyn PeerLink>,
    ) -> Result<()> {
        let fresh = answered.into_lanes()?;
        let doomed = fresh.clone();
        control.on_lost(Arc::new(move |reason: &str| {
            for l in &doomed {
                l.fail_as(
                    Cause::Path,
                    format!("the control connection of a rail put back was lost: {reason}"),
                );
            }
        }));
        let mut rj = self.rejoin.lock();
        if rj.closed {
            drop(rj);
            for l in fresh {
                self.transport.workers[l.rail()].control(Cmd::Detach(l));
            }
            control.close();
            control.join(Duration::from_secs(1));
            return Err(Error::Shutdown);
        }
        {
            let mut lanes = self.lanes.write();
            let mut next = lanes.to_vec();
            for (&i, l) in replace.iter().zip(&fresh) {
                self.transport.stats[l.rail()].rejoins.inc();
                let old = std::mem::replace(&mut next[i], l.clone());
                debug_assert_eq!(old.cause(), Cause::Path);
                self.transport.workers[old.rail()].control(Cmd::Detach(old));
            }
            *lanes = next.into();
        }
        let (keep, stale): (Vec<Extra>, Vec<Extra>) = std::mem::take(&mut rj.extras)
            .into_iter()
            .partition(|e| e.lanes.iter().any(|l| l.check().is_ok()));
        rj.extras = keep;
        rj.extras.push(Extra {
            control,
            lanes: fresh,
        });
        drop(rj);
        for e in stale {
            e.control.close();
            e.control.join(Duration::from_secs(1));
        }
        Ok(())
    }

    /// Closes the control connections that put rails back, and stops putting any back.
    pub(super) fn close_rejoined(&self) {
        let mut rj = self.rejoin.lock();
        rj.closed = true;
        for e in &rj.extras {
            e.control.close();
        }
    }

    /// Waits for the closed control connections' threads (see [`PeerLink::join`]).
    pub(super) fn join_rejoined(&self, limit: Duration) {
        let extras = std::mem::take(&mut self.rejoin.lock().extras);
        for e in extras {
            e.control.join(limit);
        }
    }
}
