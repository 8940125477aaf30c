//! Peers: connecting (the handshake, carrying the RDMA bootstrap's offer and answer), the
//! peer table, probes and segment-list refreshes.

use super::*;

impl TransferEngine {
    /// Connects to the engine listening at `addr`: opens the data connections, exchanges
    /// handshakes, and learns the peer's segments. Each call makes a new peer handle.
    pub fn connect(&self, addr: impl ToSocketAddrs) -> Result<PeerId> {
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| Error::InvalidArgument(format!("peer address: {e}")))?
            .next()
            .ok_or_else(|| Error::InvalidArgument("peer address resolves to nothing".into()))?;
        self.inner.connect(addr, 0)
    }

    /// What is known about `peer`.
    pub fn peer_info(&self, peer: PeerId) -> Result<PeerInfo> {
        Ok(self.inner.peer(peer)?.info.clone())
    }

    /// Every peer this engine has connected to and not disconnected, by id.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .inner
            .peers
            .read()
            .values()
            .map(|p| p.info.clone())
            .collect();
        v.sort_by_key(|p| p.id.0);
        v
    }

    /// The peer's segments as last learned (handshake or refresh).
    pub fn remote_segments(&self, peer: PeerId) -> Result<Vec<SegmentInfo>> {
        let p = self.inner.peer(peer)?;
        let mut v: Vec<_> = p.segments.read().values().map(|d| d.info.clone()).collect();
        v.sort_by_key(|s| s.id);
        Ok(v)
    }

    /// Maps `len` bytes at the peer's address `addr` to (segment, offset), refreshing the peer's
    /// segment list once when no known segment covers them; `RemoteUnregistered` when none
    /// does.
    pub fn resolve_remote(&self, peer: PeerId, addr: u64, len: u64) -> Result<(SegmentId, u64)> {
        let p = self.inner.peer(peer)?;
        let find = |p: &Peer| {
            p.segments
                .read()
                .values()
                .find(|d| {
                    addr >= d.info.base
                        && addr
                            .checked_add(len)
                            .is_some_and(|end| end <= d.info.base + d.info.len)
                })
                .map(|d| (d.info.id, addr - d.info.base))
        };
        if let Some(found) = find(&p) {
            return Ok(found);
        }
        self.inner.refresh(&p)?;
        find(&p).ok_or(Error::RemoteUnregistered { addr, len })
    }

    /// Asks the peer for its current segment list.
    pub fn refresh_segments(&self, peer: PeerId) -> Result<Vec<SegmentInfo>> {
        let p = self.inner.peer(peer)?;
        self.inner.refresh(&p)?;
        self.remote_segments(peer)
    }

    /// Closes the connections to `peer`; its batches in flight fail.
    pub fn disconnect(&self, peer: PeerId) -> Result<()> {
        let p = self
            .inner
            .peers
            .write()
            .remove(&peer.0)
            .ok_or(Error::UnknownPeer { peer: peer.0 })?;
        p.link.close();
        p.counters.remove();
        Ok(())
    }

    /// Checks that an engine answers at `addr` (`"ip:port"`), within `timeout` (None: the
    /// configured connect timeout): one connection, one handshake that reveals no segments
    /// and opens no peer on either side, then it closes. Returns the engine's id and epoch
    /// (a restarted engine has a new epoch).
    pub fn probe(&self, addr: impl ToSocketAddrs, timeout: Option<Duration>) -> Result<ProbeReply> {
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| Error::InvalidArgument(format!("peer address: {e}")))?
            .next()
            .ok_or_else(|| Error::InvalidArgument("peer address resolves to nothing".into()))?;
        let timeout = timeout.unwrap_or(self.inner.config.connect_timeout);
        let hello = self.inner.hello(ConnPurpose::Probe, 0, None);
        let (theirs, _stream) =
            tcp::connect_one(addr, timeout, &hello, self.inner.config.secret.as_ref())?;
        if theirs.purpose != ConnPurpose::Probe {
            return Err(Error::Handshake {
                peer: addr.to_string(),
                reason: format!("a probe was answered as {:?}", theirs.purpose),
            });
        }
        Ok(ProbeReply {
            engine_id: theirs.engine_id,
            epoch: theirs.epoch,
        })
    }
}

impl Engine {
    pub(super) fn hello(
        &self,
        purpose: ConnPurpose,
        conn_index: u16,
        extra: Option<&Endpoint>,
    ) -> Hello {
        // Every engine speaks TCP; another transport adds its endpoint (an RDMA offer or
        // answer).
        let mut endpoints = vec![Endpoint {
            transport: TransportId::Tcp,
            data: Vec::new(),
        }];
        endpoints.extend(extra.cloned());
        // A probe learns only that this engine is alive and which run it is.
        let segments = if purpose == ConnPurpose::Probe {
            endpoints.clear();
            Vec::new()
        } else {
            Self::describe_segments(&self.segments, self.rdma.as_deref())
        };
        Hello {
            engine_id: self.engine_id,
            epoch: self.epoch,
            purpose,
            conn_index,
            token: 0,
            segments,
            endpoints,
        }
    }

    /// Connects to the engine at `addr`, presenting the link `token` on every connection.
    pub(super) fn connect(&self, addr: SocketAddr, token: u64) -> Result<PeerId> {
        let peer = addr.to_string();
        let timeout = self.config.connect_timeout;
        let stall = self.config.batch_timeout;
        let offer = match &self.rdma {
            Some(r) => Some(Offer::new(r, self.config.qps_per_rail)?),
            None => None,
        };
        let offered = offer.is_some();
        let purpose = if offered {
            ConnPurpose::Control
        } else {
            ConnPurpose::TcpData
        };
        let hello = Hello {
            token,
            ..self.hello(purpose, 0, offer.as_ref().map(|o| o.endpoint()))
        };
        let (theirs, first) = tcp::connect_one(addr, timeout, &hello, self.config.secret.as_ref())?;
        let answered = match offer {
            Some(o) => o.answered(&theirs)?,
            None => None,
        };
        let link: Box<dyn PeerLink> = match answered {
            Some(answered) => {
                let control =
                    TcpLink::start(vec![first], &peer, theirs.epoch, &self.tcp_io, stall)?;
                Box::new(answered.finish(Box::new(control))?)
            }
            None => {
                if offered && self.config.transport == TransportKind::Rdma {
                    return Err(Error::TransportUnavailable {
                        transport: "rdma",
                        reason: format!("peer {peer} offers no RDMA endpoint"),
                    });
                }
                let mut streams = vec![first];
                for i in 1..self.config.connections_per_peer {
                    let (h, s) = tcp::connect_one(
                        addr,
                        timeout,
                        &Hello {
                            token,
                            ..self.hello(ConnPurpose::TcpData, i as u16, None)
                        },
                        self.config.secret.as_ref(),
                    )?;
                    if (h.engine_id, h.epoch) != (theirs.engine_id, theirs.epoch) {
                        return Err(Error::Handshake {
                            peer,
                            reason: "peer restarted while connections were being opened".into(),
                        });
                    }
                    streams.push(s);
                }
                Box::new(TcpLink::start(
                    streams,
                    &peer,
                    theirs.epoch,
                    &self.tcp_io,
                    stall,
                )?)
            }
        };
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let info = PeerInfo {
            id: PeerId(id),
            addr,
            engine_id: theirs.engine_id,
            epoch: theirs.epoch,
            transport: link.name(),
            lanes: link.lanes(),
        };
        let segments = theirs
            .segments
            .into_iter()
            .map(|d| (d.info.id.0, d))
            .collect();
        tracing::info!(peer = %addr, epoch = format_args!("{:#x}", info.epoch), lanes = info.lanes,
            transport = info.transport, "connected");
        self.peers.write().insert(
            id,
            Arc::new(Peer {
                counters: self.metrics.peer(addr, id),
                info,
                segments: RwLock::new(segments),
                link,
                token,
            }),
        );
        Ok(PeerId(id))
    }

    pub(super) fn peer(&self, id: PeerId) -> Result<Arc<Peer>> {
        self.peers
            .read()
            .get(&id.0)
            .cloned()
            .ok_or(Error::UnknownPeer { peer: id.0 })
    }

    pub(super) fn refresh(&self, p: &Peer) -> Result<()> {
        let bytes = p.link.fetch_segments(self.config.connect_timeout)?;
        let list = decode_segments(&bytes)?;
        *p.segments.write() = list.into_iter().map(|d| (d.info.id.0, d)).collect();
        Ok(())
    }
}

impl Engine {
    /// Starts putting `p`'s failed rails back on a background thread when some came back
    /// (`transport::rdma::rejoin`); never blocks. One such thread at a time per engine.
    pub(super) fn maybe_rejoin(&self, p: &Arc<Peer>) {
        let Some(link) = p.link.rdma() else { return };
        let Some(replace) = link.rails_to_rejoin(Instant::now()) else {
            return;
        };
        let mut slot = self.rejoin.lock();
        if slot.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        if let Some(t) = slot.take() {
            let _ = t.join();
        }
        let (Some(me), false) = (self.me.upgrade(), self.shutdown.load(Ordering::Acquire)) else {
            return;
        };
        let p = p.clone();
        let spawned = thread::Builder::new()
            .name("kvt-rejoin".into())
            .spawn(move || match me.rejoin(&p, &replace) {
                Ok(()) => {
                    tracing::info!(peer = %p.info.addr, lanes = ?replace, "rdma rail put back")
                }
                Err(e) => tracing::warn!(peer = %p.info.addr, lanes = ?replace,
                    "cannot put the rdma rail back yet: {e}"),
            });
        match spawned {
            Ok(t) => *slot = Some(t),
            Err(e) => tracing::warn!("cannot start putting an rdma rail back: {e}"),
        }
    }

    /// Opens one more control connection to `p` offering fresh QPs for the lanes `replace`
    /// and puts them in those lanes' places.
    fn rejoin(&self, p: &Peer, replace: &[usize]) -> Result<()> {
        let (Some(r), Some(link)) = (&self.rdma, p.link.rdma()) else {
            return Ok(());
        };
        let offer = Offer::on_rails(r, &link.rails_of(replace))?;
        let hello = Hello {
            token: p.token,
            ..self.hello(ConnPurpose::Control, 0, Some(offer.endpoint()))
        };
        let peer = p.info.addr.to_string();
        let (theirs, first) = tcp::connect_one(
            p.info.addr,
            self.config.connect_timeout,
            &hello,
            self.config.secret.as_ref(),
        )?;
        if (theirs.engine_id, theirs.epoch) != (p.info.engine_id, p.info.epoch) {
            return Err(Error::Handshake {
                peer,
                reason: "the peer restarted: its rails are not put back into the old link".into(),
            });
        }
        let answered = offer.answered(&theirs)?.ok_or_else(|| Error::Handshake {
            peer: peer.clone(),
            reason: "the peer answered no RDMA endpoint".into(),
        })?;
        let control = TcpLink::start(
            vec![first],
            &peer,
            theirs.epoch,
            &self.tcp_io,
            self.config.batch_timeout,
        )?;
        link.put_back(replace, answered, Box::new(control))
    }
}
