//! Notifications: a tag a peer attaches to a batch, delivered to the target once every lane's
//! part has arrived after that lane's data. Both transports carry the parts (TCP as Notify
//! frames, RDMA as WRITE_WITH_IMM immediates); this module is what they share.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

/// A notification delivered to the target: `tag` from the peer `(engine_id, epoch)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Notification {
    /// The sending engine's id.
    pub engine_id: u64,
    /// The sending engine's epoch.
    pub epoch: u64,
    /// The link token the sender's connection presented in its handshake (0: none).
    pub link: u64,
    /// The tag given to `submit_with_notify` (24 bits).
    pub tag: u32,
}

/// Collects notifications: each arrives as one part per lane the batch used, and is delivered
/// once all parts are in (each part follows its lane's data, so all data has landed).
#[derive(Default)]
pub(crate) struct Notifier {
    parts: Mutex<HashMap<(u64, u64, u64, u32), u32>>,
    ready: Mutex<Vec<Notification>>,
    /// Sees each complete notification first; `true` = consumed (KV rooms).
    hook: RwLock<Option<NotifyHook>>,
}

/// A consumer of complete notifications (returns `true` when it took one).
pub(crate) type NotifyHook = Arc<dyn Fn(&Notification) -> bool + Send + Sync>;

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("ready", &self.ready.lock().len())
            .finish()
    }
}

impl Notifier {
    /// Records one part of `tag`'s notification, of `total` parts, from a connection of engine
    /// `(engine_id, epoch)` that presented `link`.
    pub(crate) fn part(&self, engine_id: u64, epoch: u64, link: u64, tag: u32, total: u32) {
        let mut parts = self.parts.lock();
        let n = parts.entry((engine_id, epoch, link, tag)).or_insert(0);
        *n += 1;
        if *n >= total {
            parts.remove(&(engine_id, epoch, link, tag));
            drop(parts);
            let n = Notification {
                engine_id,
                epoch,
                link,
                tag,
            };
            let hook = self.hook.read().clone();
            if !hook.is_some_and(|h| h(&n)) {
                self.ready.lock().push(n);
            }
        }
    }

    /// Forgets the parts of notifications for room slot `slot` (`tag >> ROOM_SLOT_SHIFT`)
    /// still waiting for the rest: the slot starts a new room, and a late duplicate part of
    /// its previous one (a unit posted again after a rail failed, whose first notification
    /// had arrived after all) must not count towards the new room's.
    pub(crate) fn forget_slot(&self, slot: u32) {
        let shift = crate::transport::fence::ROOM_SLOT_SHIFT;
        self.parts.lock().retain(|k, _| k.3 >> shift != slot);
    }

    /// Installs (or removes) the consumer that sees notifications first.
    pub(crate) fn set_hook(&self, hook: Option<NotifyHook>) {
        *self.hook.write() = hook;
    }

    /// Takes every complete notification.
    pub(crate) fn take(&self) -> Vec<Notification> {
        std::mem::take(&mut *self.ready.lock())
    }
}

/// Encodes a notification part: 24-bit tag and the number of parts.
pub(crate) fn imm_encode(tag: u32, parts: u32) -> u32 {
    (tag & 0x00ff_ffff) << 8 | (parts & 0xff)
}

/// Decodes [`imm_encode`].
pub(crate) fn imm_decode(imm: u32) -> (u32, u32) {
    (imm >> 8, (imm & 0xff).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_part_does_not_count_for_the_next_room_of_its_slot() {
        let n = Notifier::default();
        let slot = 7u32;
        let tag = slot << crate::transport::fence::ROOM_SLOT_SHIFT | 3;
        // A duplicate part of an old room's two-part notification, late.
        n.part(1, 1, 9, tag, 2);
        assert!(n.take().is_empty());
        // The slot starts a new room: the stale part is forgotten, so the new room's
        // notification needs both of its own parts.
        n.forget_slot(slot);
        n.part(1, 1, 9, tag, 2);
        assert!(n.take().is_empty(), "one part of two is not a notification");
        n.part(1, 1, 9, tag, 2);
        assert_eq!(n.take().len(), 1);
        // Other slots are kept.
        n.part(1, 1, 9, tag + (1 << 9), 2);
        n.forget_slot(slot);
        n.part(1, 1, 9, tag + (1 << 9), 2);
        assert_eq!(n.take().len(), 1);
    }
}
