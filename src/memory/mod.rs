//! Registered memory: segments, address → segment lookup, and in-flight accounting.
//!
//! A segment is a caller-owned memory range the engine may read and write on behalf of
//! transfers. Peers address it by [`SegmentId`] + offset. Ids are never reused within an
//! engine, so a stale id held by a peer can never reach memory registered later.

pub(crate) mod raw;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::cuda::{DeviceCopy, Placement};
use crate::error::{Error, Result};

/// Numeric id of a segment, unique within its engine for the engine's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId(pub u32);

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a segment's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemoryKind {
    /// Ordinary (pageable or pinned) host memory.
    Host = 0,
    /// GPU device memory.
    Gpu = 1,
}

/// How a segment's memory was made reachable by the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RegMode {
    /// Host memory: registered as is (`ibv_reg_mr`, or read and written in place on TCP).
    Host = 0,
    /// GPU memory exported as a dma-buf (`cuMemGetHandleForAddressRange`) and registered with
    /// `ibv_reg_dmabuf_mr`, one fd shared by every rail.
    Dmabuf = 1,
    /// GPU memory registered with `ibv_reg_mr` on the device pointer (nvidia-peermem).
    Peermem = 2,
    /// GPU memory moved through pinned host bounce buffers with device copies (no GPUDirect).
    Staging = 3,
}

impl RegMode {
    /// Lower-case name (`host`, `dmabuf`, `peermem`, `staging`).
    pub fn as_str(self) -> &'static str {
        match self {
            RegMode::Host => "host",
            RegMode::Dmabuf => "dmabuf",
            RegMode::Peermem => "peermem",
            RegMode::Staging => "staging",
        }
    }

    fn from_u8(v: u8) -> RegMode {
        match v {
            1 => RegMode::Dmabuf,
            2 => RegMode::Peermem,
            3 => RegMode::Staging,
            _ => RegMode::Host,
        }
    }
}

impl std::fmt::Display for RegMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the engine knows about one of its own segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentDetails {
    /// What peers see.
    pub info: SegmentInfo,
    /// Where the memory lives, as CUDA reported it at registration.
    pub placement: Placement,
    /// How it was registered.
    pub mode: RegMode,
    /// RDMA rails it is registered on (empty on TCP).
    pub rails: Vec<u16>,
}

/// Where a new segment lives and how the transport reaches it.
#[derive(Debug, Clone)]
pub(crate) struct Placed {
    pub(crate) placement: Placement,
    pub(crate) mode: RegMode,
    /// Device copies for staging mode.
    pub(crate) staging: Option<Arc<dyn DeviceCopy>>,
}

impl Placed {
    /// Plain host memory.
    pub(crate) fn host() -> Self {
        Placed {
            placement: Placement::Host,
            mode: RegMode::Host,
            staging: None,
        }
    }
}

/// Public description of a registered segment, local or remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The segment's id.
    pub id: SegmentId,
    /// Start address in its owner's address space.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host or GPU.
    pub kind: MemoryKind,
}

impl SegmentInfo {
    /// Checks that `[offset, offset + len)` lies inside this segment.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::ZeroLength { what: "request" });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::RemoteOutOfRange {
                segment: self.id.0,
                offset,
                len,
                segment_len: self.len,
            }),
        }
    }
}

/// A registered local segment with its in-flight counter.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) info: SegmentInfo,
    in_flight: AtomicU64,
    placement: Placement,
    mode: AtomicU8,
    staging: Option<Arc<dyn DeviceCopy>>,
}

impl Segment {
    pub(crate) fn addr(&self) -> u64 {
        self.info.base
    }

    /// Device copies when the segment is GPU memory reached through staging; `None` means its
    /// bytes are host memory, read and written in place.
    pub(crate) fn staging(&self) -> Option<&Arc<dyn DeviceCopy>> {
        self.staging.as_ref()
    }

    /// How the segment is registered.
    pub(crate) fn mode(&self) -> RegMode {
        RegMode::from_u8(self.mode.load(Ordering::Acquire))
    }
}

/// Keeps a segment from being unregistered while a transfer uses it. Dropping releases it.
#[derive(Debug)]
pub(crate) struct SegmentGuard {
    segment: Arc<Segment>,
}

impl SegmentGuard {
    fn new(segment: Arc<Segment>) -> Self {
        segment.in_flight.fetch_add(1, Ordering::AcqRel);
        SegmentGuard { segment }
    }

    /// The guarded segment.
    pub(crate) fn segment(&self) -> &Segment {
        &self.segment
    }
}

impl Clone for SegmentGuard {
    fn clone(&self) -> Self {
        SegmentGuard::new(self.segment.clone())
    }
}

impl Drop for SegmentGuard {
    fn drop(&mut self) {
        self.segment.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The engine's registered segments, indexed by base address and by id.
#[derive(Debug, Default)]
pub(crate) struct SegmentTable {
    inner: RwLock<TableInner>,
}

#[derive(Debug, Default)]
struct TableInner {
    by_base: BTreeMap<u64, Arc<Segment>>,
    by_id: BTreeMap<u32, Arc<Segment>>,
    next_id: u32,
}

impl SegmentTable {
    /// Registers `[addr, addr + len)`; rejects zero length, wrap-around and overlap.
    #[cfg(test)]
    pub(crate) fn register(&self, addr: u64, len: u64, kind: MemoryKind) -> Result<SegmentInfo> {
        self.register_placed(addr, len, kind, Placed::host())
    }

    /// Registers `[addr, addr + len)` with its placement and mode; rejects zero length,
    /// wrap-around and overlap.
    pub(crate) fn register_placed(
        &self,
        addr: u64,
        len: u64,
        kind: MemoryKind,
        placed: Placed,
    ) -> Result<SegmentInfo> {
        if len == 0 {
            return Err(Error::ZeroLength {
                what: "registration",
            });
        }
        let end = addr.checked_add(len).ok_or_else(|| {
            Error::InvalidArgument(format!("range {addr:#x} + {len} wraps around"))
        })?;
        let mut t = self.inner.write();
        // The nearest segment starting below `end` is the only one that can overlap.
        if let Some((_, s)) = t.by_base.range(..end).next_back()
            && s.info.base + s.info.len > addr
        {
            return Err(Error::OverlappingRegistration {
                addr,
                len,
                existing: s.info.id.0,
                existing_addr: s.info.base,
                existing_len: s.info.len,
            });
        }
        let id = t.next_id;
        t.next_id = t
            .next_id
            .checked_add(1)
            .ok_or_else(|| Error::InvalidArgument("segment ids exhausted".into()))?;
        let info = SegmentInfo {
            id: SegmentId(id),
            base: addr,
            len,
            kind,
        };
        let seg = Arc::new(Segment {
            info: info.clone(),
            in_flight: AtomicU64::new(0),
            placement: placed.placement,
            mode: AtomicU8::new(placed.mode as u8),
            staging: placed.staging,
        });
        t.by_base.insert(addr, seg.clone());
        t.by_id.insert(id, seg);
        Ok(info)
    }

    /// Unregisters a segment; refused while transfers hold it.
    pub(crate) fn unregister(&self, id: SegmentId) -> Result<()> {
        let mut t = self.inner.write();
        let seg = t
            .by_id
            .get(&id.0)
            .ok_or(Error::UnknownSegment { segment: id.0 })?;
        // Guards are only created under the read lock, so holding the write lock means no new
        // guard can appear between this check and the removal.
        let in_flight = seg.in_flight.load(Ordering::Acquire);
        if in_flight > 0 {
            return Err(Error::SegmentBusy {
                segment: id.0,
                in_flight,
            });
        }
        let base = seg.info.base;
        t.by_id.remove(&id.0);
        t.by_base.remove(&base);
        Ok(())
    }

    /// Finds the segment holding all of `[addr, addr + len)` and pins it.
    pub(crate) fn pin_local(&self, addr: u64, len: u64) -> Result<SegmentGuard> {
        if len == 0 {
            return Err(Error::ZeroLength { what: "request" });
        }
        let t = self.inner.read();
        let seg = t
            .by_base
            .range(..=addr)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| {
                addr.checked_add(len)
                    .is_some_and(|end| end <= s.info.base + s.info.len)
            })
            .ok_or(Error::UnregisteredAddress { addr, len })?;
        Ok(SegmentGuard::new(seg.clone()))
    }

    /// Pins segment `id` after checking that `[offset, offset + len)` is inside it.
    pub(crate) fn pin_range(&self, id: SegmentId, offset: u64, len: u64) -> Result<SegmentGuard> {
        let t = self.inner.read();
        let seg = t
            .by_id
            .get(&id.0)
            .ok_or(Error::UnknownSegment { segment: id.0 })?;
        seg.info.check_range(offset, len)?;
        Ok(SegmentGuard::new(seg.clone()))
    }

    /// Records the mode a segment ended up registered with.
    pub(crate) fn set_mode(&self, id: SegmentId, mode: RegMode) {
        if let Some(s) = self.inner.read().by_id.get(&id.0) {
            s.mode.store(mode as u8, Ordering::Release);
        }
    }

    /// Placement and mode of segment `id` (rails are the transport's to add).
    pub(crate) fn details(&self, id: SegmentId) -> Result<SegmentDetails> {
        let t = self.inner.read();
        let s = t
            .by_id
            .get(&id.0)
            .ok_or(Error::UnknownSegment { segment: id.0 })?;
        Ok(SegmentDetails {
            info: s.info.clone(),
            placement: s.placement.clone(),
            mode: s.mode(),
            rails: Vec::new(),
        })
    }

    /// The GPUs of the segments a NIC writes directly (registered by dma-buf or peermem),
    /// each once.
    pub(crate) fn direct_gpus(&self) -> Vec<u32> {
        let mut gpus: Vec<u32> = self
            .inner
            .read()
            .by_id
            .values()
            .filter(|s| matches!(s.mode(), RegMode::Dmabuf | RegMode::Peermem))
            .filter_map(|s| match s.placement {
                Placement::Device { ordinal, .. } => Some(ordinal),
                _ => None,
            })
            .collect();
        gpus.sort_unstable();
        gpus.dedup();
        gpus
    }

    /// Describes every registered segment, in id order.
    pub(crate) fn list(&self) -> Vec<SegmentInfo> {
        self.inner
            .read()
            .by_id
            .values()
            .map(|s| s.info.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_lookup_unregister() {
        let t = SegmentTable::default();
        let a = t.register(0x1000, 0x1000, MemoryKind::Host).unwrap();
        let b = t.register(0x3000, 0x100, MemoryKind::Host).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(t.pin_local(0x1800, 0x800).unwrap().segment().info.id, a.id);
        assert_eq!(t.pin_local(0x3000, 0x100).unwrap().segment().info.id, b.id);
        assert!(matches!(
            t.pin_local(0x1800, 0x801),
            Err(Error::UnregisteredAddress { .. })
        ));
        assert!(matches!(
            t.pin_local(0x2000, 1),
            Err(Error::UnregisteredAddress { .. })
        ));
        assert!(matches!(
            t.pin_local(0x0fff, 2),
            Err(Error::UnregisteredAddress { .. })
        ));
        t.unregister(a.id).unwrap();
        assert!(matches!(
            t.pin_local(0x1800, 1),
            Err(Error::UnregisteredAddress { .. })
        ));
        assert!(matches!(
            t.unregister(a.id),
            Err(Error::UnknownSegment { .. })
        ));
        // Ids are not reused.
        let c = t.register(0x1000, 0x1000, MemoryKind::Host).unwrap();
        assert!(c.id.0 > b.id.0);
    }

    #[test]
    fn overlap_and_zero_length_rejected() {
        let t = SegmentTable::default();
        t.register(0x1000, 0x1000, MemoryKind::Host).unwrap();
        for (addr, len) in [(0x1000, 1), (0x0800, 0x801), (0x1fff, 10), (0x0, 0x10000)] {
            assert!(
                matches!(
                    t.register(addr, len, MemoryKind::Host),
                    Err(Error::OverlappingRegistration { .. })
                ),
                "{addr:#x}+{len:#x}"
            );
        }
        t.register(0x2000, 0x10, MemoryKind::Host).unwrap();
        t.register(0x0800, 0x800, MemoryKind::Host).unwrap();
        assert!(matches!(
            t.register(0x9000, 0, MemoryKind::Host),
            Err(Error::ZeroLength { .. })
        ));
        assert!(t.register(u64::MAX - 1, 4, MemoryKind::Host).is_err());
    }

    #[test]
    fn busy_segment_cannot_be_unregistered() {
        let t = SegmentTable::default();
        let a = t.register(0x1000, 0x1000, MemoryKind::Host).unwrap();
        let g = t.pin_range(a.id, 0, 16).unwrap();
        let g2 = g.clone();
        drop(g);
        assert!(matches!(
            t.unregister(a.id),
            Err(Error::SegmentBusy { in_flight: 1, .. })
        ));
        drop(g2);
        t.unregister(a.id).unwrap();
    }

    #[test]
    fn range_checks() {
        let t = SegmentTable::default();
        let a = t.register(0x1000, 100, MemoryKind::Host).unwrap();
        assert!(t.pin_range(a.id, 99, 1).is_ok());
        assert!(matches!(
            t.pin_range(a.id, 99, 2),
            Err(Error::RemoteOutOfRange { .. })
        ));
        assert!(matches!(
            t.pin_range(a.id, u64::MAX, 2),
            Err(Error::RemoteOutOfRange { .. })
        ));
        assert!(matches!(
            t.pin_range(a.id, 0, 0),
            Err(Error::ZeroLength { .. })
        ));
        assert!(matches!(
            t.pin_range(SegmentId(77), 0, 1),
            Err(Error::UnknownSegment { segment: 77 })
        ));
    }
}
