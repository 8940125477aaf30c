//! Target-side fences for KV rooms on TCP.
//!
//! Writes of a batch submitted with a notification tag carry that tag in their frames. The
//! room slot in the tag (`tag >> ROOM_SLOT_SHIFT`) names the receiving room, so the target can
//! refuse a room's writes once it was aborted, and an abort can wait until the writes already
//! being copied into memory have finished: after [`RoomFences::fence`] returns, no byte of that
//! room lands.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Bits of a notification tag below the room slot (chunk sequence and last flag).
pub(crate) const ROOM_SLOT_SHIFT: u32 = 9;

/// A room as the target knows it: the sending engine and the receiving room's slot.
pub(crate) type RoomKey = (u64, u64, u32);

#[derive(Default)]
struct Gate {
    fenced: bool,
    active: u32,
}

/// Fenced rooms and the writes of each room in progress.
#[derive(Default)]
pub(crate) struct RoomFences {
    gates: Mutex<HashMap<RoomKey, Gate>>,
    idle: Condvar,
}

/// Held while one write frame of a room is copied into memory.
pub(crate) struct RoomHold {
    fences: Arc<RoomFences>,
    key: RoomKey,
}

impl Drop for RoomHold {
    fn drop(&mut self) {
        let mut gates = self.fences.gates.lock();
        if let Some(g) = gates.get_mut(&self.key) {
            g.active -= 1;
            if g.active == 0 {
                if g.fenced {
                    self.fences.idle.notify_all();
                } else {
                    gates.remove(&self.key);
                }
            }
        }
    }
}

impl RoomFences {
    /// Starts a write of room `key`; `None` once the room is fenced (the write must be
    /// dropped).
    pub(crate) fn enter(self: &Arc<Self>, key: RoomKey) -> Option<RoomHold> {
        let mut gates = self.gates.lock();
        let g = gates.entry(key).or_default();
        if g.fenced {
            return None;
        }
        g.active += 1;
        Some(RoomHold {
            fences: self.clone(),
            key,
        })
    }

    /// Fences room `key` and waits (up to `timeout`) until none of its writes is in progress.
    /// Returns false if writes were still in progress when the time ran out.
    pub(crate) fn fence(&self, key: RoomKey, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut gates = self.gates.lock();
        gates.entry(key).or_default().fenced = true;
        while gates.get(&key).is_some_and(|g| g.active > 0) {
            if self.idle.wait_until(&mut gates, until).timed_out() {
                return gates.get(&key).is_none_or(|g| g.active == 0);
            }
        }
        true
    }

    /// Forgets every fence on `slot` (the slot is being given to a new room).
    pub(crate) fn clear_slot(&self, slot: u32) {
        self.gates.lock().retain(|k, g| k.2 != slot || g.active > 0);
    }

    /// Number of rooms with a gate (fenced or with writes in progress).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.gates.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pass_until_fenced_and_gates_do_not_pile_up() {
        let f = Arc::new(RoomFences::default());
        let key = (1, 2, 3);
        let h = f.enter(key).expect("open");
        drop(h);
        assert_eq!(f.len(), 0, "an idle unfenced room keeps no gate");
        assert!(f.fence(key, Duration::ZERO));
        assert!(f.enter(key).is_none());
        assert!(f.enter((1, 2, 4)).is_some(), "other rooms are not fenced");
        assert!(
            f.enter((1, 3, 3)).is_some(),
            "another epoch is another room"
        );
        f.clear_slot(3);
        assert!(f.enter(key).is_some(), "a reused slot starts open");
    }

    #[test]
    fn fence_waits_for_writes_in_progress() {
        let f = Arc::new(RoomFences::default());
        let key = (1, 1, 1);
        let hold = f.enter(key).unwrap();
        assert!(
            !f.fence(key, Duration::from_millis(20)),
            "times out while a write is in progress"
        );
        let f2 = f.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(hold);
        });
        let start = Instant::now();
        assert!(f2.fence(key, Duration::from_secs(5)));
        assert!(start.elapsed() >= Duration::from_millis(20));
        t.join().unwrap();
    }
}
