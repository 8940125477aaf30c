//! RDMA verbs transport: rails (HCA ports), memory regions per segment and rail, RC queue
//! pairs per (peer, rail), work-request chains with selective signalling, one worker per
//! rail that posts and polls (`worker`), and write-with-immediate notifications.
//!
//! Bootstrap (`bootstrap`) rides on the engine's TCP listener: the initiator opens one
//! *control* connection whose handshake carries its rails and one fresh QP per lane; the
//! target pairs initiator rail i with its rail `i % rails`, connects a QP to each and answers
//! with its own. The control connection stays open (segment refreshes, liveness); when it
//! closes, the target moves that peer's QPs to ERROR so nothing more of it can land.

mod bootstrap;
pub(crate) mod cost;
mod failover;
mod link;
mod outstanding;
mod rejoin;
pub(crate) mod verbs;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use sideway::ibverbs::memory_region::MemoryRegion;

use crate::transport::notify::{Notifier, imm_decode};
pub(crate) use crate::wire::{QpInfo, RailInfo, RdmaEndpoint};
pub(crate) use bootstrap::{Answered, Offer, answer};
pub(crate) use link::RdmaLink;
use verbs::{Completion, Qp, Rail};

use crate::error::{Error, Result};
use crate::memory::SegmentInfo;
use crate::metrics::{Metrics, RailCounters};
use crate::wire::RailKey;

/// Receive WRs kept posted on each target QP for write-with-immediate notifications.
const RECV_DEPTH: u32 = 128;

/// What the rails of this engine are and how they were chosen.
#[derive(Debug, Clone)]
pub(crate) struct RailChoice {
    pub(crate) device: String,
    pub(crate) port: u8,
    pub(crate) gid_index: u8,
}

struct TargetQp {
    qp: Arc<Qp>,
    engine_id: u64,
    epoch: u64,
    /// The link token the peer presented when these QPs were set up.
    token: u64,
}

/// The engine's RDMA state.
pub(crate) struct RdmaTransport {
    pub(crate) rails: Vec<Arc<Rail>>,
    /// Memory regions per segment, per rail (`None`: not registered on that rail).
    mrs: RwLock<HashMap<u32, Vec<Option<Arc<MemoryRegion>>>>>,
    /// Rails a segment's batches prefer (host memory: its NUMA node's), where they are fewer
    /// than the rails it is registered on.
    near: RwLock<HashMap<u32, Vec<usize>>>,
    /// The PCI topology of this host, read once on first use (`None`: unreadable).
    pci: std::sync::OnceLock<Option<crate::topology::PciTopology>>,
    /// One worker per rail, in rail order.
    pub(crate) workers: Vec<worker::RailWorker>,
    /// What each rail carried, in rail order.
    pub(crate) stats: Vec<Arc<RailCounters>>,
    target_qps: Mutex<HashMap<u64, TargetQp>>,
    next_qp_key: AtomicU64,
    pub(crate) notifier: Arc<Notifier>,
    shutdown: Arc<AtomicBool>,
}

impl RdmaTransport {
    /// Opens the chosen rails and starts one worker per rail.
    pub(crate) fn open(
        choice: &[RailChoice],
        notifier: Arc<Notifier>,
        shutdown: Arc<AtomicBool>,
        busy_poll: Duration,
        metrics: &Metrics,
    ) -> Result<Arc<Self>> {
        if choice.is_empty() {
            return Err(Error::NoRdmaDevice {
                reason: "no active RDMA port selected".into(),
            });
        }
        let list = verbs::device_list()?;
        let rails = choice
            .iter()
            .enumerate()
            .map(|(i, c)| Rail::open(&list, i as u16, &c.device, c.port, c.gid_index).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let stats: Vec<Arc<RailCounters>> = rails
            .iter()
            .enumerate()
            .map(|(i, r)| Arc::new(metrics.rail(i, &format!("{}:{}", r.device, r.info.port))))
            .collect();
        let mut failed = None;
        let (ready, ready_rx) = crossbeam_channel::bounded(rails.len());
        let t = Arc::new_cyclic(|weak| RdmaTransport {
            workers: rails
                .iter()
                .enumerate()
                .map_while(|(i, r)| {
                    let w = worker::RailWorker::start(
                        weak.clone(),
                        r.clone(),
                        i,
                        stats[i].clone(),
                        shutdown.clone(),
                        busy_poll,
                        ready_rx.clone(),
                    );
                    w.map_err(|e| failed = Some(e)).ok()
                })
                .collect(),
            stats,
            rails,
            mrs: RwLock::new(HashMap::new()),
            near: RwLock::new(HashMap::new()),
            pci: std::sync::OnceLock::new(),
            target_qps: Mutex::new(HashMap::new()),
            next_qp_key: AtomicU64::new(1),
            notifier,
            shutdown: shutdown.clone(),
        });
        if let Some(e) = failed {
            // The workers already started see `ready` close and exit.
            return Err(e);
        }
        // The transport exists now: let the workers look at it.
        for _ in &t.workers {
            let _ = ready.send(());
        }
        for r in &t.rails {
            tracing::info!(rail = r.info.index, device = %r.device, port = r.info.port, gid_index = r.gid_index,
                mtu = r.info.mtu, "rdma rail open");
        }
        Ok(t)
    }

    /// This engine's rails as peers see them.
    pub(crate) fn rail_infos(&self) -> Vec<RailInfo> {
        self.rails.iter().map(|r| r.info).collect()
    }

    /// Registers a segment on every rail; returns its keys.
    pub(crate) fn register(&self, seg: &SegmentInfo) -> Result<Vec<RailKey>> {
        self.register_from(seg, None, None)
    }

    /// `InvalidArgument` unless `rails` names at least one rail, each of this engine.
    pub(crate) fn check_rails(&self, rails: &[usize]) -> Result<()> {
        if rails.is_empty() {
            return Err(Error::InvalidArgument(
                "a segment needs at least one rail".into(),
            ));
        }
        match rails.iter().find(|&&i| i >= self.rails.len()) {
            Some(bad) => Err(Error::InvalidArgument(format!(
                "rail {bad} does not exist (this engine has {})",
                self.rails.len()
            ))),
            None => Ok(()),
        }
    }

    /// Registers `seg` on `rails` (rail indices; every rail when `None`), from a dma-buf
    /// `(fd, offset)` when given.
    pub(crate) fn register_from(
        &self,
        seg: &SegmentInfo,
        dmabuf: Option<(std::os::fd::BorrowedFd<'_>, u64)>,
        rails: Option<&[usize]>,
    ) -> Result<Vec<RailKey>> {
        if let Some(l) = rails {
            self.check_rails(l)?;
        }
        let mrs = self
            .rails
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if rails.is_some_and(|l| !l.contains(&i)) {
                    return Ok(None);
                }
                match dmabuf {
                    None => r.register(seg.base, seg.len),
                    Some((fd, offset)) => r.register_dmabuf(fd, offset, seg.len, seg.base),
                }
                .map(Some)
            })
            .collect::<Result<Vec<_>>>()?;
        self.mrs.write().insert(seg.id.0, mrs);
        Ok(self.keys(seg.id.0))
    }

    /// Deregisters a segment's memory regions.
    pub(crate) fn unregister(&self, segment: u32) {
        self.mrs.write().remove(&segment);
        self.near.write().remove(&segment);
    }

    /// Makes `rails` the ones `segment`'s batches prefer.
    pub(crate) fn set_near(&self, segment: u32, rails: Vec<usize>) {
        self.near.write().insert(segment, rails);
    }

    /// The rails `segment`'s batches prefer, if fewer than it is registered on.
    pub(crate) fn near(&self, segment: u32) -> Option<Vec<usize>> {
        self.near.read().get(&segment).cloned()
    }

    /// This host's PCI topology (GPUs, HCAs, NUMA nodes), read from sysfs on first use.
    pub(crate) fn pci(&self) -> Option<&crate::topology::PciTopology> {
        self.pci
            .get_or_init(|| {
                crate::topology::discover_pci(std::path::Path::new(crate::topology::SYSFS_ROOT))
                    .map_err(|e| tracing::warn!("PCI topology unreadable, every rail is near: {e}"))
                    .ok()
            })
            .as_ref()
    }

    /// Rail device names, in rail order.
    pub(crate) fn rail_names(&self) -> Vec<&str> {
        self.rails.iter().map(|x| x.device.as_str()).collect()
    }

    /// Keys of a registered segment.
    pub(crate) fn keys(&self, segment: u32) -> Vec<RailKey> {
        self.mrs
            .read()
            .get(&segment)
            .map(|m| {
                m.iter()
                    .zip(&self.rails)
                    .filter_map(|(m, r)| {
                        m.as_ref().map(|m| RailKey {
                            rail: r.info.index,
                            rkey: m.rkey(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The local key of `segment` on `rail`.
    pub(crate) fn lkey(&self, segment: u32, rail: usize) -> Option<u32> {
        self.mrs
            .read()
            .get(&segment)
            .and_then(|m| m.get(rail))
            .and_then(|m| m.as_ref().map(|m| m.lkey()))
    }

    /// Target side of the bootstrap: connects one QP to each of the initiator's, returns the
    /// answer to send and a handle that tears the QPs down when dropped.
    pub(crate) fn accept(
        self: &Arc<Self>,
        theirs: &RdmaEndpoint,
        engine_id: u64,
        epoch: u64,
        token: u64,
    ) -> Result<(RdmaEndpoint, AcceptedQps)> {
        let mut answer = RdmaEndpoint {
            rails: self.rail_infos(),
            qps: Vec::with_capacity(theirs.qps.len()),
        };
        let mut keys = Vec::new();
        let accepted = |keys: Vec<u64>| AcceptedQps {
            transport: self.clone(),
            keys,
        };
        for q in &theirs.qps {
            let remote_rail = theirs
                .rails
                .iter()
                .find(|r| r.index == q.rail)
                .expect("validated by the decoder");
            let rail = &self.rails[q.rail as usize % self.rails.len()];
            if let Err(e) = self.check_recv_room(rail) {
                drop(accepted(keys));
                return Err(e);
            }
            let qp = match rail.create_qp(16, RECV_DEPTH, 1) {
                Ok(qp) => Arc::new(qp),
                Err(e) => {
                    drop(accepted(keys));
                    return Err(e);
                }
            };
            let key = self.next_qp_key.fetch_add(1, Ordering::Relaxed);
            let setup = qp
                .connect(remote_rail, q.qpn, q.psn)
                .and_then(|()| qp.post_recvs(RECV_DEPTH, key));
            self.target_qps.lock().insert(
                key,
                TargetQp {
                    qp: qp.clone(),
                    engine_id,
                    epoch,
                    token,
                },
            );
            keys.push(key);
            if let Err(e) = setup {
                drop(accepted(keys));
                return Err(e);
            }
            answer.qps.push(QpInfo {
                rail: rail.info.index,
                qpn: qp.qpn,
                psn: qp.psn,
                peer_rail: q.rail,
            });
        }
        Ok((answer, accepted(keys)))
    }

    /// `Err` when one more accepted QP on `rail` could overrun its receive CQ if all its
    /// receive requests were flushed at once.
    fn check_recv_room(&self, rail: &Arc<Rail>) -> Result<()> {
        let on_rail = self
            .target_qps
            .lock()
            .values()
            .filter(|t| Arc::ptr_eq(&t.qp.rail, rail))
            .count() as u64;
        if (on_rail + 1) * u64::from(RECV_DEPTH) > u64::from(rail.cq_depth) {
            return Err(Error::Verbs {
                call: "ibv_create_qp",
                source: std::io::Error::other(format!(
                    "rail {} ({}) serves {on_rail} peer QPs already: its receive CQ ({} entries) holds no more",
                    rail.info.index, rail.device, rail.cq_depth
                )),
            });
        }
        Ok(())
    }

    /// Moves every QP the peer `(engine_id, epoch)` writes into to ERROR: from the moment this
    /// returns, none of its RDMA writes can land here. Returns how many QPs were stopped.
    pub(crate) fn stop_inbound(&self, engine_id: u64, epoch: u64) -> usize {
        let map = self.target_qps.lock();
        let mut n = 0;
        for t in map.values() {
            if (t.engine_id, t.epoch) == (engine_id, epoch) {
                t.qp.set_error();
                n += 1;
            }
        }
        n
    }

    /// Receive completions of one poll: notification parts, each replenished.
    fn on_recvs(&self, batch: &[Completion]) {
        if batch.is_empty() {
            return;
        }
        let mut parts = Vec::with_capacity(batch.len());
        {
            let map = self.target_qps.lock();
            for c in batch {
                let Some(t) = map.get(&c.wr_id) else { continue };
                if c.status != 0 {
                    tracing::debug!(
                        status = verbs::wc_status_name(c.status),
                        "receive completion with error"
                    );
                    continue;
                }
                parts.push((
                    t.qp.clone(),
                    (t.engine_id, t.epoch, t.token),
                    c.wr_id,
                    c.imm,
                ));
            }
        }
        for (qp, who, key, imm) in parts {
            if let Some(imm) = imm {
                let (tag, n) = imm_decode(imm);
                self.notifier.part(who.0, who.1, who.2, tag, n);
            }
            if let Err(e) = qp.post_recvs(1, key) {
                tracing::warn!("cannot replenish receive WR: {e}");
            }
        }
    }

    /// Stops the rail workers and waits for them: lanes still open fail, and no work
    /// request of this engine is posted or polled afterwards. Then deregisters every memory
    /// region: with the QPs stopped, the NIC has no more use for them, and the caller may
    /// free the memory (a `HostBuffer` that outlives its engine keeps its bytes, not its MR).
    pub(crate) fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        for w in &self.workers {
            w.join();
        }
        self.target_qps.lock().clear();
        self.mrs.write().clear();
        self.near.write().clear();
    }
}

/// QPs accepted for one peer; moved to ERROR and destroyed when the peer's control connection
/// ends.
pub(crate) struct AcceptedQps {
    transport: Arc<RdmaTransport>,
    keys: Vec<u64>,
}

impl Drop for AcceptedQps {
    fn drop(&mut self) {
        let mut map = self.transport.target_qps.lock();
        for k in &self.keys {
            if let Some(t) = map.remove(k) {
                t.qp.set_error();
            }
        }
    }
}

/// The port's logical state from sysfs, `None` while it is ACTIVE (or cannot be read: the
/// completions then decide).
pub(super) fn port_down(r: &Rail) -> Option<String> {
    let path = format!(
        "{}/class/infiniband/{}/ports/{}/state",
        crate::topology::SYSFS_ROOT,
        r.device,
        r.info.port
    );
    let text = std::fs::read_to_string(path).ok()?;
    let state = crate::topology::PortState::parse(&text);
    (!state.is_active()).then(|| state.to_string())
}
