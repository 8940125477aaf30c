//! The verbs layer: the only code that touches sideway (and so libibverbs, loaded at run time
//! by rdma-mummy-sys). Safe types own their verbs resources and free them on drop; nothing
//! above this module sees a verbs pointer.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{BasicCompletionQueue, PollCompletionQueueError};
use sideway::ibverbs::device::{DeviceInfo, DeviceList, GetDeviceListErrorKind};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState, QueuePairType,
    SetScatterGatherEntry, WorkRequestFlags,
};

use crate::error::{Error, Result};
use crate::wire::RailInfo;

/// Turns any verbs failure into `Error::Verbs` with the call's name.
fn verbs<E: std::error::Error>(call: &'static str) -> impl FnOnce(E) -> Error {
    move |e| {
        let mut source: &dyn std::error::Error = &e;
        while let Some(s) = source.source() {
            source = s;
        }
        Error::Verbs {
            call,
            source: io::Error::other(format!("{e}: {source}")),
        }
    }
}

/// Opens the verbs library's device list, telling apart the reasons it can be unusable.
pub(crate) fn device_list() -> Result<DeviceList> {
    DeviceList::new().map_err(|e| {
        // The io::Error is held directly: the transparent kind forwards `source()` past it.
        let errno = match &e.0 {
            GetDeviceListErrorKind::Ibverbs(io) => io.raw_os_error(),
            _ => None,
        };
        match errno {
            // rdma-mummy-sys answers EOPNOTSUPP when it could not dlopen libibverbs.so.1.
            Some(95) => Error::RdmaCoreMissing,
            // libibverbs answers ENOSYS when the kernel has no uverbs.
            Some(38) => Error::RdmaKernelMissing,
            _ => verbs("ibv_get_device_list")(e),
        }
    })
}

/// One open HCA port with its protection domain and completion queues.
pub(crate) struct Rail {
    pub(crate) info: RailInfo,
    pub(crate) device: String,
    pub(crate) gid_index: u8,
    _ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    /// Entries of each of the two CQs.
    pub(crate) cq_depth: u32,
    /// Send completions of every QP on this rail.
    pub(crate) send_cq: Arc<BasicCompletionQueue>,
    /// Receive completions (write-with-immediate notifications).
    pub(crate) recv_cq: Arc<BasicCompletionQueue>,
}

impl std::fmt::Debug for Rail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rail({} {}:{})",
            self.info.index, self.device, self.info.port
        )
    }
}

/// Entries asked for each rail CQ (less where the device allows less). Flushed work
/// requests complete even when unsignaled, so a CQ must hold every request its QPs may have
/// posted: the rail worker keeps the send queues' total within the send CQ's depth, and
/// accepting peers stops at the receive CQ's.
const CQ_WANT: u32 = 32768;

impl Rail {
    /// Opens `device` port `port` as rail `index`, using GID `gid_index`.
    pub(crate) fn open(
        list: &DeviceList,
        index: u16,
        device: &str,
        port: u8,
        gid_index: u8,
    ) -> Result<Rail> {
        let dev = list
            .iter()
            .find(|d| d.name() == device)
            .ok_or_else(|| Error::NoRdmaDevice {
                reason: format!("{device} is not in the verbs device list"),
            })?;
        let ctx = dev.open().map_err(verbs("ibv_open_device"))?;
        let attr = ctx.query_port(port).map_err(verbs("ibv_query_port"))?;
        let state = format!("{:?}", attr.port_state());
        if !state.eq_ignore_ascii_case("active") {
            return Err(Error::PortDown {
                device: device.to_string(),
                port,
                state,
            });
        }
        let gid = ctx
            .query_gid(port, gid_index as u32)
            .map_err(verbs("ibv_query_gid"))?;
        let mtu = match attr.active_mtu() {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        };
        let pd = ctx.alloc_pd().map_err(verbs("ibv_alloc_pd"))?;
        let max_cqe = ctx
            .query_device()
            .map_err(verbs("ibv_query_device"))?
            .max_cqe();
        let cq_depth = CQ_WANT.min(u32::try_from(max_cqe).unwrap_or(0)).max(256);
        set_async_nonblocking(&ctx)?;
        let cq = |what| {
            ctx.create_cq_builder()
                .setup_cqe(cq_depth)
                .build()
                .map_err(verbs(what))
        };
        let send_cq = cq("ibv_create_cq")?;
        let recv_cq = cq("ibv_create_cq")?;
        Ok(Rail {
            info: RailInfo {
                index,
                port,
                mtu,
                lid: attr.lid(),
                gid: gid.raw,
            },
            device: device.to_string(),
            gid_index,
            _ctx: ctx,
            pd,
            cq_depth,
            send_cq,
            recv_cq,
        })
    }

    /// Registers `[addr, addr + len)` for local and remote read/write access.
    pub(crate) fn register(&self, addr: u64, len: u64) -> Result<Arc<MemoryRegion>> {
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead;
        // SAFETY: the range is a segment the engine just accepted under the registration
        // contract (valid and mapped until unregistered); the MR is dropped before the segment
        // is reported unregistered.
        unsafe { self.pd.reg_mr(addr as usize, len as usize, access) }.map_err(verbs("ibv_reg_mr"))
    }

    /// Registers `len` bytes of the dma-buf `fd` from `offset`, addressed by peers as `iova`
    /// (the device address, so remote offsets work as for `ibv_reg_mr`).
    pub(crate) fn register_dmabuf(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: u64,
        iova: u64,
    ) -> Result<Arc<MemoryRegion>> {
        use std::os::fd::AsRawFd;
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead;
        // SAFETY: `fd` is a live dma-buf exported by the CUDA driver for a device segment the
        // engine just accepted; the MR is dropped before the segment is reported unregistered.
        unsafe {
            self.pd
                .reg_dmabuf_mr(offset, len as usize, iova, fd.as_raw_fd(), access)
        }
        .map_err(verbs("ibv_reg_dmabuf_mr"))
    }

    /// Creates an RC QP on this rail (in RESET).
    pub(crate) fn create_qp(
        self: &Arc<Self>,
        max_send_wr: u32,
        max_recv_wr: u32,
        max_sge: u32,
    ) -> Result<Qp> {
        let qp = self
            .pd
            .create_qp_builder()
            .setup_qp_type(QueuePairType::ReliableConnection)
            .setup_max_send_wr(max_send_wr)
            .setup_max_recv_wr(max_recv_wr)
            .setup_max_send_sge(max_sge)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(0)
            .setup_send_cq(self.send_cq.clone())
            .setup_recv_cq(self.recv_cq.clone())
            .build()
            .map_err(verbs("ibv_create_qp"))?;
        let qpn = qp.qp_number();
        Ok(Qp {
            qp: Mutex::new(qp),
            rail: self.clone(),
            qpn,
            psn: rand::random::<u32>() & 0x00ff_ffff,
        })
    }
}

/// Operation of one work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WrOp {
    Write,
    Read,
    /// RDMA WRITE carrying a 32-bit immediate that the target sees as a receive completion.
    WriteImm(u32),
}

/// One work request of a chain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wr {
    pub(crate) op: WrOp,
    pub(crate) wr_id: u64,
    pub(crate) signaled: bool,
    pub(crate) lkey: u32,
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) rkey: u32,
    pub(crate) remote_addr: u64,
}

/// An RC queue pair.
pub(crate) struct Qp {
    qp: Mutex<BasicQueuePair>,
    pub(crate) rail: Arc<Rail>,
    pub(crate) qpn: u32,
    pub(crate) psn: u32,
}

impl Qp {
    /// RESET → INIT → RTR → RTS against the remote QP `(qpn, psn)` on `remote` rail.
    pub(crate) fn connect(
        &self,
        remote: &RailInfo,
        remote_qpn: u32,
        remote_psn: u32,
    ) -> Result<()> {
        let mut qp = self.qp.lock();
        let port = self.rail.info.port;
        let mut init = QueuePairAttribute::new();
        init.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(port)
            .setup_access_flags(
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            );
        qp.modify(&init).map_err(verbs("ibv_modify_qp(INIT)"))?;

        let mtu = match self.rail.info.mtu.min(remote.mtu) {
            256 => Mtu::Mtu256,
            512 => Mtu::Mtu512,
            1024 => Mtu::Mtu1024,
            2048 => Mtu::Mtu2048,
            _ => Mtu::Mtu4096,
        };
        let mut ah = AddressHandleAttribute::new();
        ah.setup_port(port)
            .setup_dest_lid(remote.lid)
            .setup_service_level(0);
        if remote.gid.iter().any(|b| *b != 0) {
            ah.setup_grh_dest_gid(&Gid { raw: remote.gid })
                .setup_grh_src_gid_index(self.rail.gid_index)
                .setup_grh_hop_limit(64);
        }
        let mut rtr = QueuePairAttribute::new();
        rtr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu)
            .setup_dest_qp_num(remote_qpn)
            .setup_rq_psn(remote_psn)
            .setup_max_dest_read_atomic(16)
            .setup_min_rnr_timer(12)
            .setup_address_vector(&ah);
        qp.modify(&rtr).map_err(verbs("ibv_modify_qp(RTR)"))?;

        let mut rts = QueuePairAttribute::new();
        rts.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(16);
        qp.modify(&rts).map_err(verbs("ibv_modify_qp(RTS)"))
    }

    /// Moves the QP to ERROR: outstanding work requests complete with a flush status and the
    /// NIC touches none of their memory afterwards.
    pub(crate) fn set_error(&self) {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        if let Err(e) = self.qp.lock().modify(&attr) {
            tracing::warn!("cannot move QP {} to ERROR: {e}", self.qpn);
        }
    }

    /// Posts `wrs` as one chain (one doorbell).
    pub(crate) fn post_chain(&self, wrs: &[Wr]) -> Result<()> {
        let mut qp = self.qp.lock();
        let mut guard = qp.start_post_send();
        for w in wrs {
            let flags = if w.signaled {
                WorkRequestFlags::Signaled
            } else {
                WorkRequestFlags::none()
            };
            let h = guard.construct_wr(w.wr_id, flags);
            let h = match w.op {
                WrOp::Write => h.setup_write(w.rkey, w.remote_addr),
                WrOp::Read => h.setup_read(w.rkey, w.remote_addr),
                WrOp::WriteImm(imm) => h.setup_write_imm(w.rkey, w.remote_addr, imm.to_be()),
            };
            if w.len > 0 {
                // SAFETY: `addr..addr+len` lies in a segment registered under `lkey` and pinned by
                // the batch that owns this work request until its completion is polled.
                unsafe { h.setup_sge(w.lkey, w.addr, w.len) };
            }
        }
        guard.post().map_err(verbs("ibv_post_send"))
    }

    /// Posts `n` receive work requests without buffers (for write-with-immediate).
    pub(crate) fn post_recvs(&self, n: u32, wr_id: u64) -> Result<()> {
        let mut qp = self.qp.lock();
        let mut guard = qp.start_post_recv();
        for _ in 0..n {
            let _ = guard.construct_wr(wr_id);
        }
        guard.post().map_err(verbs("ibv_post_recv"))
    }
}

/// One polled work completion.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub(crate) wr_id: u64,
    pub(crate) status: u32,
    /// The device's own error code (`vendor_err`), meaningful only with an error status.
    pub(crate) vendor_err: u32,
    pub(crate) imm: Option<u32>,
}

/// Polls up to what `cq` has; appends to `out`. Returns false on a CQ error.
pub(crate) fn poll_cq(cq: &BasicCompletionQueue, out: &mut Vec<Completion>) -> Result<()> {
    match cq.start_poll() {
        Ok(poller) => {
            for wc in poller {
                // IBV_WC_RECV_RDMA_WITH_IMM = 129 (1 << 7 | 1).
                let imm = (wc.opcode() == 129).then(|| u32::from_be(wc.imm_data()));
                out.push(Completion {
                    wr_id: wc.wr_id(),
                    status: wc.status(),
                    vendor_err: wc.vendor_err(),
                    imm,
                });
            }
            Ok(())
        }
        Err(PollCompletionQueueError::CompletionQueueEmpty) => Ok(()),
        Err(e) => Err(verbs("ibv_poll_cq")(e)),
    }
}

/// The `ibv_wc_status` name of a completion status (verbs.h order).
pub(crate) fn wc_status_name(status: u32) -> &'static str {
    const NAMES: [&str; 22] = [
        "IBV_WC_SUCCESS",
        "IBV_WC_LOC_LEN_ERR",
        "IBV_WC_LOC_QP_OP_ERR",
        "IBV_WC_LOC_EEC_OP_ERR",
        "IBV_WC_LOC_PROT_ERR",
        "IBV_WC_WR_FLUSH_ERR",
        "IBV_WC_MW_BIND_ERR",
        "IBV_WC_BAD_RESP_ERR",
        "IBV_WC_LOC_ACCESS_ERR",
        "IBV_WC_REM_INV_REQ_ERR",
        "IBV_WC_REM_ACCESS_ERR",
        "IBV_WC_REM_OP_ERR",
        "IBV_WC_RETRY_EXC_ERR",
        "IBV_WC_RNR_RETRY_EXC_ERR",
        "IBV_WC_LOC_RDD_VIOL_ERR",
        "IBV_WC_REM_INV_RD_REQ_ERR",
        "IBV_WC_REM_ABORT_ERR",
        "IBV_WC_INV_EECN_ERR",
        "IBV_WC_INV_EEC_STATE_ERR",
        "IBV_WC_FATAL_ERR",
        "IBV_WC_RESP_TIMEOUT_ERR",
        "IBV_WC_GENERAL_ERR",
    ];
    NAMES
        .get(status as usize)
        .copied()
        .unwrap_or("IBV_WC_UNKNOWN")
}

/// Status of a flushed work request: its QP was already in ERROR.
pub(crate) const WC_WR_FLUSH_ERR: u32 = 5;

/// Makes the context's async-event fd non-blocking, so [`Rail::async_events`] never waits.
fn set_async_nonblocking(ctx: &DeviceContext) -> Result<()> {
    // SAFETY: `ctx` is open for the whole call; `context()` points at its live ibv_context,
    // whose `async_fd` is an fd the context owns. Changing its O_NONBLOCK flag only changes
    // how ibv_get_async_event waits (it then returns -1 with EAGAIN when no event is queued).
    let fd = unsafe { ctx.context().as_ref().async_fd };
    // SAFETY: `fd` is open (above); F_GETFL/F_SETFL read and set only its status flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Verbs {
            call: "fcntl(async_fd, O_NONBLOCK)",
            source: io::Error::last_os_error(),
        })
    }
}

/// One asynchronous event of a device (`ibv_get_async_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AsyncEvent {
    /// The `ibv_event_type` value.
    pub(crate) kind: u32,
    /// The QP number, for QP events.
    pub(crate) qpn: Option<u32>,
    /// The port, for port events.
    pub(crate) port: Option<u8>,
}

/// `ibv_async_event` as libibverbs lays it out: a union of pointers and an int, then the
/// event type. Ours, so an event type newer than our bindings is a number, not an invalid enum.
#[repr(C)]
struct RawAsyncEvent {
    element: usize,
    event_type: u32,
}

impl AsyncEvent {
    /// Event types whose element is a QP.
    const QP_EVENTS: [u32; 6] = [1, 2, 3, 4, 5, 16];
    /// Event types whose element is a port number.
    const PORT_EVENTS: [u32; 7] = [9, 10, 11, 12, 13, 17, 18];

    /// The `ibv_event_type` name.
    pub(crate) fn name(&self) -> &'static str {
        const NAMES: [&str; 21] = [
            "IBV_EVENT_CQ_ERR",
            "IBV_EVENT_QP_FATAL",
            "IBV_EVENT_QP_REQ_ERR",
            "IBV_EVENT_QP_ACCESS_ERR",
            "IBV_EVENT_COMM_EST",
            "IBV_EVENT_SQ_DRAINED",
            "IBV_EVENT_PATH_MIG",
            "IBV_EVENT_PATH_MIG_ERR",
            "IBV_EVENT_DEVICE_FATAL",
            "IBV_EVENT_PORT_ACTIVE",
            "IBV_EVENT_PORT_ERR",
            "IBV_EVENT_LID_CHANGE",
            "IBV_EVENT_PKEY_CHANGE",
            "IBV_EVENT_SM_CHANGE",
            "IBV_EVENT_SRQ_ERR",
            "IBV_EVENT_SRQ_LIMIT_REACHED",
            "IBV_EVENT_QP_LAST_WQE_REACHED",
            "IBV_EVENT_CLIENT_REREGISTER",
            "IBV_EVENT_GID_CHANGE",
            "IBV_EVENT_WQ_FATAL",
            "IBV_EVENT_DEVICE_SPEED_CHANGE",
        ];
        NAMES
            .get(self.kind as usize)
            .copied()
            .unwrap_or("IBV_EVENT_UNKNOWN")
    }

    /// What the event means for the rail's work: `Qp` fails that QP's lane, `Rail` every lane
    /// of the rail, `None` nothing (informational).
    pub(crate) fn scope(&self) -> EventScope {
        match self.kind {
            // CQ error (overrun), device fatal, port error: the whole rail.
            0 | 8 | 10 => EventScope::Rail,
            // QP fatal, request error, access error.
            1..=3 => EventScope::Qp,
            _ => EventScope::None,
        }
    }
}

/// What an [`AsyncEvent`] affects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventScope {
    Rail,
    Qp,
    None,
}

impl Rail {
    /// Appends the device's queued asynchronous events to `out` without waiting (the fd is
    /// non-blocking). The events come from the whole device; port events for other ports are
    /// left out.
    pub(crate) fn async_events(&self, out: &mut Vec<AsyncEvent>) {
        loop {
            let mut raw = RawAsyncEvent {
                element: 0,
                event_type: 0,
            };
            // SAFETY: the context is open while `self` lives; `raw` has ibv_async_event's
            // layout (a pointer-sized union, then a 32-bit enum), so the library writes within
            // it. The fd is non-blocking: with nothing queued the call returns -1 at once.
            let rc = unsafe {
                rdma_mummy_sys::ibv_get_async_event(
                    self._ctx.context().as_ptr(),
                    (&raw mut raw).cast(),
                )
            };
            if rc != 0 {
                return;
            }
            let mut ev = AsyncEvent {
                kind: raw.event_type,
                qpn: None,
                port: None,
            };
            if AsyncEvent::QP_EVENTS.contains(&ev.kind) && raw.element != 0 {
                // SAFETY: for QP events the element is the `ibv_qp *` the event is about,
                // valid until the event is acknowledged below.
                ev.qpn = Some(unsafe { (*(raw.element as *const rdma_mummy_sys::ibv_qp)).qp_num });
            } else if AsyncEvent::PORT_EVENTS.contains(&ev.kind) {
                // The union's int member shares the first bytes (little-endian x86_64/arm64).
                ev.port = Some(raw.element as u32 as u8);
            }
            // SAFETY: `raw` is the event just returned by ibv_get_async_event, acknowledged
            // once; nothing reads its element afterwards.
            unsafe { rdma_mummy_sys::ibv_ack_async_event((&raw mut raw).cast()) };
            if ev.port.is_some_and(|p| p != self.info.port) {
                continue;
            }
            out.push(ev);
        }
    }
}
