//! Registered memory: host and GPU registration, unregistration, and `HostBuffer`.

use super::*;

impl TransferEngine {
    /// Registers caller-owned memory `[addr, addr + len)` so transfers may use it.
    ///
    /// The address is classified first ([`cuda::classify`]): host memory is registered as
    /// is (over RDMA on every rail, striped over its NUMA node's); GPU memory is registered in
    /// the mode [`EngineConfig::gpu_mode`] asks for — over RDMA dmabuf, then peermem, then
    /// staging (the first that works, each failure logged with its reason), or the forced one,
    /// whose failure is this call's error; over TCP always through host staging. Over RDMA,
    /// batches touching staged memory go through the peer's TCP control connection.
    /// [`segment_info`](Self::segment_info) reports the mode chosen. Where CUDA is absent every
    /// address is host memory, so a device pointer cannot be told apart (see
    /// [`register_device_memory`](Self::register_device_memory) for a call that insists).
    ///
    /// # Safety
    /// The range must be valid, mapped memory for as long as it stays registered, and the
    /// caller must not read or write a part of it while a transfer that writes that part is in
    /// flight (as with RDMA, the engine writes it from other threads).
    pub unsafe fn register_memory(&self, addr: *mut u8, len: usize) -> Result<SegmentInfo> {
        let info = self.inner.register(addr as usize as u64, len as u64)?;
        tracing::debug!(
            segment = info.id.0,
            addr = format_args!("{:#x}", info.base),
            len,
            mode = self
                .inner
                .segments
                .details(info.id)
                .map(|d| d.mode.as_str())
                .unwrap_or("?"),
            "registered"
        );
        Ok(info)
    }

    /// Registers GPU device memory, as [`register_memory`](Self::register_memory) does, but
    /// fails with [`Error::CudaUnavailable`] where CUDA is absent and with
    /// [`Error::InvalidArgument`] when the range is not device memory, instead of treating it
    /// as host memory.
    ///
    /// # Safety
    /// As for [`register_memory`](Self::register_memory): the device range stays allocated
    /// while registered and is not touched while a transfer that writes it is in flight.
    pub unsafe fn register_device_memory(&self, addr: u64, len: usize) -> Result<SegmentInfo> {
        cuda::available()?;
        let placement = cuda::classify(addr, len as u64)?;
        if !placement.is_device() {
            return Err(Error::InvalidArgument(format!(
                "[{addr:#x}, +{len}) is {placement} memory, not GPU memory"
            )));
        }
        self.inner.register_device(addr, len as u64, placement)
    }

    /// Placement, registration mode and rails of local segment `id`.
    pub fn segment_info(&self, id: SegmentId) -> Result<SegmentDetails> {
        let mut d = self.inner.segments.details(id)?;
        if let Some(r) = &self.inner.rdma {
            d.rails = r.keys(id.0).iter().map(|k| k.rail).collect();
        }
        Ok(d)
    }

    /// Registers host memory like [`register_memory`](Self::register_memory), but on the
    /// given rails only (indices into [`rails`](Self::rails)); batches touching it are striped
    /// over the lanes of those rails. `InvalidArgument` on an engine without RDMA, for an
    /// empty list or a rail that does not exist.
    ///
    /// # Safety
    /// As for [`register_memory`](Self::register_memory).
    pub unsafe fn register_memory_on_rails(
        &self,
        addr: *mut u8,
        len: usize,
        rails: &[usize],
    ) -> Result<SegmentInfo> {
        self.inner.register_host_on(addr as u64, len as u64, rails)
    }

    /// This engine's RDMA rails as `device:port`, in rail order (empty over TCP).
    pub fn rails(&self) -> Vec<String> {
        self.inner
            .rdma
            .as_ref()
            .map(|r| {
                r.rails
                    .iter()
                    .map(|x| format!("{}:{}", x.device, x.info.port))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Unregisters a segment. Refused with [`Error::SegmentBusy`] while transfers use it.
    pub fn unregister_memory(&self, segment: SegmentId) -> Result<()> {
        self.inner.unregister(segment)
    }

    /// Allocates and registers `len` zeroed, page-aligned bytes owned by the returned buffer.
    pub fn alloc(&self, len: usize) -> Result<HostBuffer> {
        if len == 0 {
            return Err(Error::ZeroLength {
                what: "registration",
            });
        }
        let mem = RawAlloc::zeroed(len).map_err(|e| Error::io("alloc", e))?;
        let info = self
            .inner
            .register_host(mem.addr(), len as u64, Placement::Host)?;
        Ok(HostBuffer {
            mem: Some(mem),
            info,
            engine: self.inner.clone(),
        })
    }

    /// Every local segment, in id order.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.inner.segments.list()
    }

    /// Whether `[addr, addr + len)` is registered host memory (which the CPU can read).
    pub(crate) fn is_host_memory(&self, addr: u64, len: u64) -> bool {
        self.inner
            .segments
            .pin_local(addr, len.max(1))
            .is_ok_and(|g| g.segment().info.kind == MemoryKind::Host)
    }

    /// 64-bit XXH3 of the bytes of `ranges` `(address, length)`, in order, each inside
    /// registered host memory of this engine (KV integrity digests). GPU memory is refused:
    /// the CPU cannot read it.
    pub(crate) fn digest_local(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut scratch = vec![0u8; 64 << 10];
        let mut guard: Option<crate::memory::SegmentGuard> = None;
        for &(addr, len) in ranges {
            if len == 0 {
                continue;
            }
            let inside = |g: &crate::memory::SegmentGuard| {
                let s = &g.segment().info;
                addr >= s.base && addr + len <= s.base + s.len
            };
            if !guard.as_ref().is_some_and(inside) {
                guard = Some(self.inner.segments.pin_local(addr, len)?);
            }
            let g = guard.as_ref().expect("pinned above");
            if g.segment().info.kind != MemoryKind::Host {
                return Err(Error::InvalidArgument(format!(
                    "{addr:#x}+{len} is GPU memory: digests cover host memory only"
                )));
            }
            crate::memory::raw::hash_range(g, addr, len as usize, &mut scratch, &mut hasher);
        }
        Ok(hasher.digest())
    }
}

impl Engine {
    /// Classifies `[addr, addr + len)` and registers it as host or device memory.
    pub(super) fn register(&self, addr: u64, len: u64) -> Result<SegmentInfo> {
        if len == 0 {
            return Err(Error::ZeroLength {
                what: "registration",
            });
        }
        let placement = cuda::classify(addr, len)?;
        if placement.is_device() {
            self.register_device(addr, len, placement)
        } else {
            self.register_host(addr, len, placement)
        }
    }

    /// Registers host memory on `rails` only (RDMA engines).
    pub(super) fn register_host_on(
        &self,
        addr: u64,
        len: u64,
        rails: &[usize],
    ) -> Result<SegmentInfo> {
        let Some(r) = &self.rdma else {
            return Err(Error::InvalidArgument(
                "rails apply to RDMA engines; this one runs over TCP".into(),
            ));
        };
        if len == 0 {
            return Err(Error::ZeroLength {
                what: "registration",
            });
        }
        r.check_rails(rails)?;
        let info = self
            .segments
            .register_placed(addr, len, MemoryKind::Host, Placed::host())?;
        if let Err(e) = r.register_from(&info, None, Some(rails)) {
            let _ = self.segments.unregister(info.id);
            return Err(e);
        }
        Ok(info)
    }

    /// Registers host memory in the table and, with RDMA, on every rail.
    pub(super) fn register_host(
        &self,
        addr: u64,
        len: u64,
        placement: Placement,
    ) -> Result<SegmentInfo> {
        let placed = Placed {
            placement,
            ..Placed::host()
        };
        let info = self
            .segments
            .register_placed(addr, len, MemoryKind::Host, placed)?;
        if let Some(r) = &self.rdma {
            if let Err(e) = r.register(&info) {
                let _ = self.segments.unregister(info.id);
                return Err(e);
            }
            // Registered on every rail, so any peer rail can be reached; batches prefer the
            // rails of the memory's NUMA node (its pages are resident now: registration
            // pinned them).
            let node = crate::topology::numa::node_of(addr, len);
            if let (Some(node), Some(topo)) = (node, r.pci()) {
                let names = r.rail_names();
                let at = crate::topology::Placement::Host {
                    numa_node: Some(node),
                };
                let near = crate::topology::rails_for(topo, &names, &at, 1);
                if near.len() < names.len() {
                    tracing::info!(segment = info.id.0, numa_node = node,
                        rails = ?near.iter().map(|&i| names[i]).collect::<Vec<_>>(),
                        "host memory striped over its NUMA node's rails");
                    r.set_near(info.id.0, near);
                }
            }
        }
        Ok(info)
    }

    /// Registers GPU memory: over TCP through staging; over RDMA in the configured mode, or
    /// dmabuf → peermem → staging for `auto`, logging each failure before falling back.
    pub(super) fn register_device(
        &self,
        addr: u64,
        len: u64,
        placement: Placement,
    ) -> Result<SegmentInfo> {
        let Placement::Device { ordinal, .. } = placement else {
            return self.register_host(addr, len, placement);
        };
        let Some(r) = &self.rdma else {
            if !matches!(self.config.gpu_mode, GpuMode::Auto | GpuMode::Staging) {
                tracing::info!(
                    gpu_mode = self.config.gpu_mode.as_str(),
                    "TCP moves GPU memory through host staging; gpu_mode applies to RDMA only"
                );
            }
            let placed = Placed {
                placement: placement.clone(),
                mode: RegMode::Staging,
                staging: Some(cuda::staging(ordinal)?),
            };
            let info = self
                .segments
                .register_placed(addr, len, MemoryKind::Gpu, placed)?;
            tracing::info!(segment = info.id.0, %placement, mode = "staging", "GPU memory registered");
            return Ok(info);
        };
        let order: &[RegMode] = match self.config.gpu_mode {
            GpuMode::Auto => &[RegMode::Dmabuf, RegMode::Peermem, RegMode::Staging],
            GpuMode::Dmabuf => &[RegMode::Dmabuf],
            GpuMode::Peermem => &[RegMode::Peermem],
            GpuMode::Staging => &[RegMode::Staging],
        };
        let placed = Placed {
            placement: placement.clone(),
            mode: order[0],
            staging: None,
        };
        let info = self
            .segments
            .register_placed(addr, len, MemoryKind::Gpu, placed)?;
        let rails = gpu_rails(r, &placement, self.config.rails_per_gpu);
        let mut last = None;
        for (i, &mode) in order.iter().enumerate() {
            let attempt = match mode {
                RegMode::Dmabuf => cuda::export_dmabuf(ordinal, addr, len).and_then(|x| {
                    use std::os::fd::AsFd;
                    // The MRs keep the dma-buf referenced; the fd closes when `x` drops.
                    r.register_from(&info, Some((x.fd.as_fd(), x.offset)), rails.as_deref())
                        .map(|_| info.clone())
                }),
                RegMode::Peermem => r
                    .register_from(&info, None, rails.as_deref())
                    .map(|_| info.clone()),
                // No memory region: batches that touch this segment go over the peer's TCP
                // control connection, through pinned bounce buffers. The placeholder entry
                // gives way to one that carries the device copies.
                RegMode::Staging | RegMode::Host => cuda::staging(ordinal).and_then(|copier| {
                    self.segments.unregister(info.id)?;
                    let placed = Placed {
                        placement: placement.clone(),
                        mode: RegMode::Staging,
                        staging: Some(copier),
                    };
                    self.segments
                        .register_placed(addr, len, MemoryKind::Gpu, placed)
                }),
            };
            match attempt {
                Ok(done) => {
                    if done.id == info.id {
                        self.segments.set_mode(info.id, mode);
                    }
                    tracing::info!(segment = done.id.0, %placement, %mode, "GPU memory registered");
                    return Ok(done);
                }
                Err(e) => {
                    if let Some(next) = order.get(i + 1) {
                        tracing::warn!(segment = info.id.0, %placement,
                            "GPU registration mode {mode} failed, falling back to {next}: {e}");
                    } else {
                        tracing::warn!(segment = info.id.0, %placement,
                            "GPU registration mode {mode} failed: {e}");
                    }
                    last = Some(e);
                }
            }
        }
        let _ = self.segments.unregister(info.id);
        Err(last.expect("at least one mode was tried"))
    }

    /// Registers host memory as if it were GPU memory reached through staging, with `copier`
    /// standing in for the device copies: drives the staging paths on hosts without a GPU.
    #[cfg(test)]
    pub(crate) fn register_emulated_device(
        &self,
        addr: u64,
        len: u64,
        copier: Arc<dyn crate::cuda::DeviceCopy>,
    ) -> Result<SegmentInfo> {
        let placed = Placed {
            placement: Placement::Device {
                ordinal: 0,
                pci_bus_id: "emulated".into(),
            },
            mode: RegMode::Staging,
            staging: Some(copier),
        };
        self.segments
            .register_placed(addr, len, MemoryKind::Gpu, placed)
    }

    pub(super) fn unregister(&self, id: SegmentId) -> Result<()> {
        self.segments.unregister(id)?;
        if let Some(r) = &self.rdma {
            r.unregister(id.0);
        }
        Ok(())
    }

    /// Every segment with its per-rail keys, as peers see them.
    pub(super) fn describe_segments(
        segments: &SegmentTable,
        rdma: Option<&RdmaTransport>,
    ) -> Vec<SegmentDesc> {
        segments
            .list()
            .into_iter()
            .map(|info| SegmentDesc {
                keys: rdma.map(|r| r.keys(info.id.0)).unwrap_or_default(),
                info,
            })
            .collect()
    }
}

/// The rails GPU memory at `placement` is registered on and striped over: the
/// `rails_per_gpu` nearest to the GPU by PCIe distance (`topology::rails_for`); `None` (every
/// rail) when the PCI topology cannot be read.
pub(super) fn gpu_rails(
    r: &RdmaTransport,
    placement: &Placement,
    rails_per_gpu: usize,
) -> Option<Vec<usize>> {
    let Placement::Device { pci_bus_id, .. } = placement else {
        return None;
    };
    let topo = r.pci()?;
    let names = r.rail_names();
    let at = crate::topology::Placement::Gpu {
        pci: pci_bus_id.clone(),
    };
    let rails = crate::topology::rails_for(topo, &names, &at, rails_per_gpu);
    tracing::info!(gpu = %pci_bus_id, rails = ?rails.iter().map(|&i| names[i]).collect::<Vec<_>>(),
        "GPU memory registered on its nearest rails");
    Some(rails)
}

/// Page-aligned host memory allocated and registered by an engine; unregistered on drop.
///
/// Its bytes are reached only through [`read`](Self::read) and [`write`](Self::write),
/// which copy through raw pointers: the buffer never lends a `&[u8]` into memory that a
/// peer, a NIC or the engine's threads may write at any moment.
///
/// The contract is the one a NIC imposes on registered memory: do not `read` a range while a
/// transfer that writes it is in flight (you would see some mix of old and new bytes), and
/// do not `write` a range while a transfer reads or writes it. Once the batch has completed
/// (or failed, or the engine has been dropped) the range is yours again.
pub struct HostBuffer {
    mem: Option<RawAlloc>,
    info: SegmentInfo,
    engine: Arc<Engine>,
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("segment", &self.info.id)
            .field("addr", &self.info.base)
            .field("len", &self.info.len)
            .finish()
    }
}

impl HostBuffer {
    /// Start address (for [`Request::local_addr`]).
    pub fn addr(&self) -> u64 {
        self.info.base
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.info.len as usize
    }
    /// Always false: buffers have at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The segment id peers address it by.
    pub fn segment(&self) -> SegmentId {
        self.info.id
    }
    /// Copies bytes out, starting at `offset` (see the type's contract). Panics when the
    /// range exceeds the buffer.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        self.mem.as_ref().expect("allocated").read_at(offset, dst)
    }
    /// Copies bytes in, starting at `offset` (see the type's contract). Panics when the
    /// range exceeds the buffer.
    pub fn write(&self, offset: usize, src: &[u8]) {
        self.mem.as_ref().expect("allocated").write_at(offset, src)
    }
    /// A copy of the whole buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        self.read(0, &mut v);
        v
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if let Err(e) = self.engine.unregister(self.info.id)
            && !matches!(e, Error::UnknownSegment { .. })
        {
            // A transfer may still touch it: leaking is the only safe choice.
            tracing::error!("leaking buffer of segment {}: {e}", self.info.id);
            std::mem::forget(self.mem.take());
        }
    }
}
