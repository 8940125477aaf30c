//! Submission: validating a batch, planning it onto the peer's lanes (rails, staging,
//! near rails), handing lanes their work, and polling or waiting for completion.

use super::*;

impl TransferEngine {
    /// Submits one batch that moves pages of several buffers between this engine and `peer`
    /// (a paged KV cache moved outside the room protocol, as an engine's own backend does):
    /// page `local_pages[i]` of every buffer here and page `remote_pages[i]` of the same
    /// buffer at the peer, for every `i`, in direction `op`. Pages are grouped into runs
    /// contiguous on both sides, one request per run per buffer, and the batch is planned,
    /// coalesced and spread over the lanes like any other. Each buffer's peer address is
    /// resolved once. `timeout`: the batch deadline (None: the default).
    ///
    /// Errors: `InvalidArgument` for lists of different lengths, a negative page, no
    /// buffer, a zero `item_len` or an offset that overflows; then whatever `submit` refuses
    /// (a page outside the registered memory on either side), with nothing sent.
    pub fn submit_pages(
        &self,
        peer: PeerId,
        op: Op,
        buffers: &[PageBuffer],
        local_pages: &[i32],
        remote_pages: &[i32],
        timeout: Option<Duration>,
    ) -> Result<BatchId> {
        if local_pages.len() != remote_pages.len() {
            return Err(Error::InvalidArgument(format!(
                "{} local pages but {} remote pages",
                local_pages.len(),
                remote_pages.len()
            )));
        }
        if buffers.is_empty() || buffers.iter().any(|b| b.item_len == 0) {
            return Err(Error::InvalidArgument(
                "a paged transfer needs buffers with a non-zero item_len".into(),
            ));
        }
        for (pages, what) in [(local_pages, "local"), (remote_pages, "remote")] {
            crate::kv::pages::check_pages(pages, i32::MAX as u64, what)
                .map_err(Error::InvalidArgument)?;
        }
        let paged = buffers
            .iter()
            .map(|b| {
                let (segment, offset) = self.resolve_remote(peer, b.remote, b.item_len)?;
                Ok(crate::kv::pages::PagedBuffer {
                    local: b.local,
                    remote: crate::kv::pages::RemoteBuffer {
                        segment,
                        offset,
                        item_len: b.item_len,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut runs = Vec::new();
        crate::kv::pages::runs(local_pages, remote_pages, &mut runs);
        let mut requests = Vec::new();
        crate::kv::pages::expand_paged(&runs, &paged, op, &mut requests).ok_or_else(|| {
            Error::InvalidArgument("a page's byte offset overflows 64 bits".into())
        })?;
        let timeout = timeout.unwrap_or(self.inner.config.batch_timeout);
        self.inner.submit(peer, &requests, timeout, None)
    }

    /// Submits a batch with the default deadline; returns at once.
    ///
    /// Every request is checked first (local range registered, remote segment known and range
    /// inside it, non-zero length); if one fails nothing is sent and its error is returned.
    pub fn submit(&self, peer: PeerId, requests: &[Request]) -> Result<BatchId> {
        self.submit_with_timeout(peer, requests, self.inner.config.batch_timeout)
    }

    /// Submits a batch that fails if not complete within `timeout`.
    pub fn submit_with_timeout(
        &self,
        peer: PeerId,
        requests: &[Request],
        timeout: Duration,
    ) -> Result<BatchId> {
        self.inner.submit(peer, requests, timeout, None)
    }

    /// Submits a batch that also tells the peer engine, in band, when its data has landed:
    /// each lane's data is followed by a notification part (RDMA WRITE_WITH_IMM, or a frame
    /// on TCP), and the peer's [`notifications`](Self::notifications) reports `tag` once every
    /// part arrived, hence after all the batch's bytes. `tag` keeps its low 24 bits.
    pub fn submit_with_notify(
        &self,
        peer: PeerId,
        requests: &[Request],
        tag: u32,
    ) -> Result<BatchId> {
        self.inner
            .submit(peer, requests, self.inner.config.batch_timeout, Some(tag))
    }

    /// Takes the notifications that completed since the last call (never blocks).
    pub fn notifications(&self) -> Vec<Notification> {
        self.inner.notifier.take()
    }

    /// Status of a batch; never blocks. Drives progress on the batch's connections when no
    /// other thread is doing so. Final statuses stay readable until [`release`](Self::release).
    pub fn poll(&self, batch: BatchId) -> Result<BatchStatus> {
        let b = self.inner.batch(batch)?;
        if !b.is_final() {
            self.inner.progress(&b);
            b.check_deadline(Instant::now());
        }
        Ok(b.status())
    }

    /// Blocks until the batch is done (Ok) or failed (`Error::BatchFailed`), then releases it.
    pub fn wait(&self, batch: BatchId) -> Result<()> {
        self.wait_metrics(batch).map(|_| ())
    }

    /// What the batch moves and, once it is final, how long it took; never blocks. Readable
    /// until [`release`](Self::release).
    pub fn batch_metrics(&self, batch: BatchId) -> Result<BatchMetrics> {
        Ok(self.inner.batch(batch)?.metrics())
    }

    /// [`wait`](Self::wait), returning what the done batch moved and its latency (submit to
    /// done).
    pub fn wait_metrics(&self, batch: BatchId) -> Result<BatchMetrics> {
        let b = self.inner.batch(batch)?;
        self.inner.wait(&b);
        self.release(batch);
        match b.status() {
            BatchStatus::Done => Ok(b.metrics()),
            BatchStatus::Failed(reason) => Err(Error::BatchFailed {
                batch: batch.0,
                reason,
            }),
            BatchStatus::Pending => unreachable!("wait returns only final batches"),
        }
    }

    /// Forgets a batch id (its status can no longer be polled).
    pub fn release(&self, batch: BatchId) {
        self.inner.batches.lock().remove(&batch.0);
    }

    /// Submits and waits.
    pub fn transfer_sync(&self, peer: PeerId, requests: &[Request]) -> Result<()> {
        let id = self.submit(peer, requests)?;
        self.wait(id)
    }
}

impl Engine {
    pub(super) fn batch(&self, id: BatchId) -> Result<Arc<Batch>> {
        self.batches
            .lock()
            .get(&id.0)
            .cloned()
            .ok_or(Error::UnknownBatch { batch: id.0 })
    }

    /// Checks every request and pins the local segments they use (deduplicated).
    pub(super) fn validate(&self, p: &Peer, requests: &[Request]) -> Result<Vec<SegmentGuard>> {
        let mut guards: Vec<SegmentGuard> = Vec::new();
        let mut refreshed = false;
        let mut remote = p.segments.read();
        let mut last_remote: Option<SegmentInfo> = None;
        for r in requests {
            if r.len == 0 {
                return Err(Error::ZeroLength { what: "request" });
            }
            let covered = guards.iter().any(|g| {
                let s = &g.segment().info;
                r.local_addr >= s.base
                    && r.local_addr
                        .checked_add(r.len)
                        .is_some_and(|e| e <= s.base + s.len)
            });
            if !covered {
                guards.push(self.segments.pin_local(r.local_addr, r.len)?);
            }
            if last_remote
                .as_ref()
                .is_none_or(|s| s.id != r.remote_segment)
            {
                let mut found = remote.get(&r.remote_segment.0).map(|d| d.info.clone());
                if found.is_none() && !refreshed {
                    // The peer may have registered it after the handshake.
                    drop(remote);
                    self.refresh(p)?;
                    refreshed = true;
                    remote = p.segments.read();
                    found = remote.get(&r.remote_segment.0).map(|d| d.info.clone());
                }
                last_remote = Some(found.ok_or(Error::UnknownSegment {
                    segment: r.remote_segment.0,
                })?);
            }
            last_remote
                .as_ref()
                .expect("set above")
                .check_range(r.remote_offset, r.len)?;
        }
        Ok(guards)
    }

    pub(super) fn submit(
        &self,
        peer: PeerId,
        requests: &[Request],
        timeout: Duration,
        notify: Option<u32>,
    ) -> Result<BatchId> {
        let started = Instant::now();
        if self.shutdown.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        let p = self.peer(peer)?;
        p.check_alive()?;
        self.maybe_rejoin(&p);
        if requests.is_empty() {
            return Err(Error::InvalidArgument(
                "a batch needs at least one request".into(),
            ));
        }
        let guards: Arc<[SegmentGuard]> = self.validate(&p, requests)?.into();
        // The lanes whose rails carry every segment of the batch (all lanes unless a segment
        // was registered on some rails only), or on RDMA the staging lane alone when a
        // segment of either side is staged; the planner numbers them 0..lanes.
        let allowed = self.allowed_lanes(&p, &guards, requests)?;
        let lanes = allowed.len();
        let total: u64 = requests.iter().map(|r| r.len).sum();
        let first_lane = if total <= self.config.min_stripe_bytes {
            // A small batch goes to the idlest lane (ties: the lowest), so one stream of small
            // transfers stays on one hot connection while concurrent submitters spread out.
            (0..lanes)
                .min_by_key(|&i| p.link.outstanding(allowed[i]))
                .unwrap_or(0)
        } else {
            self.lane_rotation.fetch_add(1, Ordering::Relaxed) % lanes
        };
        let params = PlanParams {
            max_slice: self.config.slice_size,
            lanes,
            min_stripe_bytes: self.config.min_stripe_bytes,
            first_lane,
        };
        let planned = plan(requests, &params);
        let units: u32 = planned
            .lanes
            .iter()
            .enumerate()
            .map(|(i, l)| p.link.units_of(allowed[i], l))
            .sum();
        let used: Vec<u16> = (0..lanes)
            .filter(|i| !planned.lanes[*i].is_empty())
            .map(|i| allowed[i] as u16)
            .collect();
        let notify = notify.map(|tag| notify::imm_encode(tag, used.len() as u32));
        let id = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let written: u64 = requests
            .iter()
            .filter(|r| r.op == Op::Write)
            .map(|r| r.len)
            .sum();
        let batch = Arc::new(
            Batch::new(id, peer.0, timeout, units, used, guards.to_vec()).recorded(
                crate::batch::Record {
                    peer: p.counters.clone(),
                    started,
                    written,
                    read: total - written,
                },
            ),
        );
        self.batches.lock().insert(id, batch.clone());
        let inline = planned.total_bytes <= self.config.inline_bytes;
        let remote_segments = p.segments.read();
        let remote = |seg: u32, rail: u16| {
            remote_segments.get(&seg).and_then(|d| {
                d.keys
                    .iter()
                    .find(|k| k.rail == rail)
                    .map(|k| (d.info.base, k.rkey))
            })
        };
        for (lane, slices) in planned.lanes.into_iter().enumerate() {
            if !slices.is_empty() {
                let work = Work {
                    batch: batch.clone(),
                    slices,
                    guards: guards.clone(),
                    notify,
                };
                p.link.post(allowed[lane], work, inline, &remote);
            }
        }
        Ok(BatchId(id))
    }

    /// Lanes of `p` whose local rail carries every local segment of the batch and whose
    /// remote rail carries every remote one; on RDMA the staging lane alone when the batch
    /// touches GPU memory reached through staging (a local segment with device copies, or a
    /// remote one no rail of the peer can reach: no memory key).
    pub(super) fn allowed_lanes(
        &self,
        p: &Peer,
        guards: &[SegmentGuard],
        requests: &[Request],
    ) -> Result<Vec<usize>> {
        let (Some(rails), Some(r)) = (p.link.lane_rails(), &self.rdma) else {
            return Ok((0..p.link.lanes()).collect());
        };
        let locals: Vec<u32> = guards.iter().map(|g| g.segment().info.id.0).collect();
        let mut remotes: Vec<u32> = requests.iter().map(|q| q.remote_segment.0).collect();
        remotes.sort_unstable();
        remotes.dedup();
        let segments = p.segments.read();
        let staged = guards.iter().any(|g| g.segment().staging().is_some())
            || remotes
                .iter()
                .any(|s| segments.get(s).is_some_and(|d| d.keys.is_empty()));
        if let (true, Some(lane)) = (staged, p.link.staging_lane()) {
            return Ok(vec![lane]);
        }
        let ok: Vec<usize> = rails
            .iter()
            .enumerate()
            .filter(|(_, (local, remote))| {
                locals.iter().all(|&s| r.lkey(s, *local).is_some())
                    && remotes.iter().all(|s| {
                        segments
                            .get(s)
                            .is_some_and(|d| d.keys.iter().any(|k| k.rail == *remote))
                    })
            })
            .map(|(i, _)| i)
            .collect();
        // Lanes of failed rails take no new work while another one can (what lands on one
        // anyway moves: `transport::rdma::failover`).
        let ok = match ok
            .iter()
            .copied()
            .filter(|&l| p.link.lane_usable(l))
            .collect::<Vec<_>>()
        {
            live if live.is_empty() => ok,
            live => live,
        };
        let near: Vec<Vec<usize>> = locals.iter().filter_map(|&s| r.near(s)).collect();
        let ok = prefer_near(ok, &rails, &near);
        if ok.is_empty() {
            return Err(Error::TransportUnavailable {
                transport: "rdma",
                reason: format!(
                    "no lane to {} joins a rail of local segment(s) {locals:?} to a rail of \
                     remote segment(s) {remotes:?}",
                    p.info.addr
                ),
            });
        }
        Ok(ok)
    }

    pub(super) fn lanes_of<'a>(&self, b: &'a Batch) -> Option<(Arc<Peer>, &'a [u16])> {
        let p = self.peers.read().get(&b.peer).cloned()?;
        Some((p, &b.lanes))
    }

    pub(super) fn progress(&self, b: &Batch) {
        if let Some((p, lanes)) = self.lanes_of(b) {
            for &l in lanes {
                p.link.progress(l as usize);
            }
        }
    }

    pub(super) fn wait(&self, b: &Batch) {
        let spin_until = Instant::now() + self.config.busy_poll.max(Duration::from_micros(20));
        if let Some((p, lanes)) = self.lanes_of(b) {
            // Spin first, reading the connections ourselves: waking a sleeping thread costs
            // more than a small transfer takes.
            lanes.iter().for_each(|&l| p.link.start_driving(l as usize));
            while !b.is_final() && Instant::now() < spin_until {
                for &l in lanes {
                    p.link.progress(l as usize);
                }
                if b.is_final() || b.check_deadline(Instant::now()) {
                    break;
                }
                thread::yield_now();
            }
            let sleeping = !b.is_final();
            lanes
                .iter()
                .for_each(|&l| p.link.stop_driving(l as usize, sleeping));
        }
        while !b.is_final() {
            let now = Instant::now();
            if b.check_deadline(now) {
                break;
            }
            b.sleep_until((now + Duration::from_millis(5)).min(b.deadline.max(now)));
        }
    }
}

/// Of the lanes `ok` (indices into `rails`, each lane's (local rail, remote rail)), those
/// whose local rail is near every segment in `near` (each a list of preferred rails), when
/// there is one; else `ok` unchanged: reaching the peer beats staying near.
pub(super) fn prefer_near(
    ok: Vec<usize>,
    rails: &[(usize, u16)],
    near: &[Vec<usize>],
) -> Vec<usize> {
    if near.is_empty() {
        return ok;
    }
    let preferred: Vec<usize> = ok
        .iter()
        .copied()
        .filter(|&l| near.iter().all(|n| n.contains(&rails[l].0)))
        .collect();
    if preferred.is_empty() { ok } else { preferred }
}

#[cfg(test)]
mod lane_tests {
    use super::prefer_near;

    /// Four lanes: local rails 0, 1, 2, 3 to the peer's same rails.
    const RAILS: [(usize, u16); 4] = [(0, 0), (1, 1), (2, 2), (3, 3)];

    #[test]
    fn near_rails_narrow_the_lanes() {
        assert_eq!(prefer_near(vec![0, 1, 2, 3], &RAILS, &[vec![2, 3]]), [2, 3]);
        // Two local segments: only lanes near both.
        assert_eq!(
            prefer_near(vec![0, 1, 2, 3], &RAILS, &[vec![1, 2, 3], vec![0, 1, 2]]),
            [1, 2]
        );
    }

    #[test]
    fn reaching_the_peer_beats_staying_near() {
        // The peer's segment sits on rails 0 and 1 only, the local one is near 2 and 3.
        assert_eq!(prefer_near(vec![0, 1], &RAILS, &[vec![2, 3]]), [0, 1]);
        assert_eq!(prefer_near(vec![0, 1, 2, 3], &RAILS, &[]), [0, 1, 2, 3]);
        assert_eq!(prefer_near(vec![], &RAILS, &[vec![0]]), Vec::<usize>::new());
    }
}
