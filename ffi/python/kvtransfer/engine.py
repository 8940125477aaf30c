"""``TransferEngine``: registered memory, peers and batches of one-sided writes and reads.

The Mooncake-style calls name the remote side by its virtual address; the library finds the
peer segment holding it. ``batch_transfer_sync_write``/``_read`` return 0 or a negative error
code and never raise for a failed transfer (the reason is in ``engine.last_error``).
"""

from __future__ import annotations

import ctypes
from ctypes import byref, c_int32, c_size_t, c_uint32, c_uint64, c_void_p
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _lib
from ._util import Handle, address_of, as_pages, closed_error, engine_config, read_metrics, read_string, read_text, u64_array, u64_ptr
from .errors import ErrorCode, KVTransferError, check, last_error_message

#: ``get_batch_transfer_status`` values.
BATCH_PENDING = _lib.BATCH_PENDING
BATCH_DONE = _lib.BATCH_DONE
BATCH_FAILED = _lib.BATCH_FAILED

Peer = Union[int, str]

#: ``TransferEngine.submit`` operations.
OP_WRITE = _lib.OP_WRITE
OP_READ = _lib.OP_READ


class SegmentInfo(NamedTuple):
    """A registered segment as its owner announced it."""

    id: int
    kind: str  #: ``"host"`` or ``"gpu"``
    base: int
    len: int


class BatchMetrics(NamedTuple):
    """What one batch moved and how long it took (:meth:`TransferEngine.batch_metrics`)."""

    bytes_written: int
    bytes_read: int
    #: Submit until the batch became final, in seconds; None while it is pending.
    latency_s: Optional[float]

    @staticmethod
    def _from(m: "_lib.BatchMetricsC") -> "BatchMetrics":
        return BatchMetrics(m.bytes_written, m.bytes_read, m.latency_ns / 1e9 if m.latency_ns else None)


def _batch_metrics_out() -> "_lib.BatchMetricsC":
    m = _lib.BatchMetricsC()
    m.struct_size = ctypes.sizeof(_lib.BatchMetricsC)
    return m


class TransferEngine(Handle):
    """One engine: a bootstrap listener, registered segments, peers and batches.

    ``listen`` is ``"ip:port"`` (None: ``KVT_LISTEN`` or ``127.0.0.1:0``), ``transport`` is
    ``"auto"``, ``"tcp"`` or ``"rdma"``; zero/None settings take the library's defaults,
    which honour the ``KVT_*`` environment variables. Registered memory must stay valid until
    it is unregistered or the engine is closed; objects passed to :meth:`register` (numpy
    arrays, ctypes buffers, bytearrays) are kept referenced until then.

    Any thread may use an engine, but :meth:`close` must not race another call on it.
    """

    def __init__(
        self,
        listen: Optional[str] = None,
        transport: Union[str, int] = "auto",
        connections_per_peer: int = 0,
        batch_timeout_ms: int = 0,
        devices: Union[str, Sequence[str], None] = None,
        secret: Union[str, bytes, None] = None,
        secret_file: Optional[str] = None,
    ):
        self._handle: Optional[c_void_p] = None
        self._lib = _lib.lib()
        cfg = engine_config(
            listen, transport, connections_per_peer, batch_timeout_ms, devices, secret, secret_file
        )
        out = c_void_p()
        check(self._lib.kvt_engine_create(byref(cfg), byref(out)))
        self._handle = out
        self._local_addr: Optional[str] = None
        self._transport: Optional[str] = None
        self._peers: Dict[str, int] = {}
        self._segments: Dict[int, Tuple[int, int, Any]] = {}
        #: The reason of the last failed transfer or status poll ("" if none).
        self.last_error = ""

    # ---- lifecycle -------------------------------------------------------------------------

    def _h(self) -> c_void_p:
        if self._handle is None:
            raise closed_error("TransferEngine")
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Stops the engine: peers are disconnected, batches in flight fail. Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            check(self._lib.kvt_engine_destroy(handle))
        # Registered memory may go only now that no peer can reach it.
        self._segments.clear()
        self._peers.clear()


    def __repr__(self) -> str:
        if self._handle is None:
            return "<TransferEngine closed>"
        return f"<TransferEngine {self.local_addr} {self.transport}>"

    # ---- properties ------------------------------------------------------------------------

    @property
    def local_addr(self) -> str:
        """The bootstrap address peers connect to, ``"ip:port"``."""
        h = self._h()
        if self._local_addr is None:
            self._local_addr = read_string(self._lib.kvt_engine_local_addr, h)
        return self._local_addr

    def metrics(self) -> Dict[str, int]:
        """The engine's metric totals as a dict: batches by outcome, bytes written and read,
        batch latency (count, sum in ns), refused input, rails, rooms (see ``kvt_metrics``)."""
        return read_metrics(self._lib.kvt_engine_metrics, self._h())

    def metrics_text(self) -> str:
        """Every metric series in the Prometheus text format (OpenMetrics, ``# EOF`` last):
        per peer, per rail, per failure kind, histogram buckets."""
        return read_text(self._lib.kvt_engine_metrics_text, self._h())

    def get_rpc_port(self) -> int:
        """The bootstrap port (Mooncake's name)."""
        return int(self.local_addr.rsplit(":", 1)[1])

    @property
    def transport(self) -> str:
        """``"tcp"`` or ``"rdma"``."""
        h = self._h()
        if self._transport is None:
            self._transport = read_string(self._lib.kvt_engine_transport, h)
        return self._transport

    # ---- memory ----------------------------------------------------------------------------

    def register(self, addr: Any, length: Optional[int] = None) -> int:
        """Registers memory and returns its segment id.

        ``addr`` is an int address (with ``length``), a C-contiguous numpy array, a ctypes
        object or a writable buffer; for objects ``length`` defaults to their size and the
        object is kept referenced while registered."""
        address, length, owner = address_of(addr, length)
        seg = c_uint32()
        check(self._lib.kvt_engine_register(self._h(), address, length, byref(seg)))
        self._segments[seg.value] = (address, length, owner)
        return seg.value

    register_memory = register

    def register_device(self, addr: int, length: int) -> int:
        """Registers GPU memory (a device pointer, e.g. ``tensor.data_ptr()``) and returns its
        segment id; ``CudaUnavailable`` (code 32) where there is no CUDA."""
        seg = c_uint32()
        check(self._lib.kvt_engine_register_device(self._h(), int(addr), int(length), byref(seg)))
        self._segments[seg.value] = (int(addr), int(length), None)
        return seg.value

    def unregister(self, segment: int) -> None:
        """Unregisters a segment (``SegmentBusy`` while transfers use it)."""
        check(self._lib.kvt_engine_unregister(self._h(), segment))
        self._segments.pop(segment, None)

    def unregister_memory(self, addr: int) -> None:
        """Unregisters the segment that was registered at address ``addr`` (Mooncake style)."""
        for seg, (a, _, _) in list(self._segments.items()):
            if a == addr:
                return self.unregister(seg)
        raise KVTransferError(ErrorCode.UnregisteredAddress, f"no segment registered at {addr:#x}")

    # ---- peers -----------------------------------------------------------------------------

    def connect(self, addr: str) -> int:
        """Connects to the engine at ``addr`` (``"ip:port"``) and returns a new peer id."""
        peer = c_uint64()
        check(self._lib.kvt_engine_connect(self._h(), addr.encode(), byref(peer)))
        self._peers.setdefault(addr, peer.value)
        return peer.value

    def _peer(self, target: Peer) -> int:
        if isinstance(target, str):
            peer = self._peers.get(target)
            return self.connect(target) if peer is None else peer
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            return int(target)
        raise TypeError(f"a peer is a peer id (int) or an address 'ip:port', not {type(target).__name__}")

    def disconnect(self, peer: Peer) -> None:
        """Closes the connections to ``peer`` (a peer id or the address it was connected
        by) and forgets it; its batches in flight fail. A later call by address reconnects."""
        if isinstance(peer, str):
            pid = self._peers.pop(peer, None)
            if pid is None:
                raise KVTransferError(ErrorCode.UnknownPeer, f"not connected to {peer}")
        else:
            pid = int(peer)
            for a, p in list(self._peers.items()):
                if p == pid:
                    del self._peers[a]
        check(self._lib.kvt_engine_disconnect(self._h(), pid))

    def remote_segments(self, peer: Peer, refresh: bool = False) -> List[SegmentInfo]:
        """The segments the peer registered, in id order (``refresh``: ask it first)."""
        h, pid = self._h(), self._peer(peer)
        count = c_size_t()
        check(self._lib.kvt_engine_remote_segments(h, pid, refresh, None, 0, byref(count)))
        while True:
            buf = (_lib.Segment * max(count.value, 1))()
            cap = count.value
            check(self._lib.kvt_engine_remote_segments(h, pid, False, buf, cap, byref(count)))
            if count.value <= cap:
                return [
                    SegmentInfo(s.id, "gpu" if s.kind == _lib.MEMORY_GPU else "host", s.base, s.len)
                    for s in buf[: count.value]
                ]

    def probe(self, addr: str, timeout_ms: int = 0) -> Tuple[int, int]:
        """Checks that an engine answers at ``addr`` (``"ip:port"``) without connecting a
        peer: returns its ``(engine_id, epoch)``; raises :class:`KVTransferError` when
        nothing (or something else) answers within ``timeout_ms`` (0: the connect timeout)."""
        engine_id, epoch = c_uint64(), c_uint64()
        check(self._lib.kvt_engine_probe(self._h(), addr.encode(), int(timeout_ms), byref(engine_id), byref(epoch)))
        return engine_id.value, epoch.value

    def resolve_remote(self, peer: Peer, addr: int, length: int) -> Tuple[int, int]:
        """``(segment, offset)`` of the peer's memory ``[addr, addr + length)``."""
        seg, off = c_uint32(), c_uint64()
        check(self._lib.kvt_engine_resolve_remote(self._h(), self._peer(peer), addr, length, byref(seg), byref(off)))
        return seg.value, off.value

    # ---- transfers -------------------------------------------------------------------------

    @staticmethod
    def _triples(srcs, dsts, lens):
        s, d, n = u64_array(srcs, "srcs"), u64_array(dsts, "dsts"), u64_array(lens, "lens")
        if not len(s) == len(d) == len(n):
            raise ValueError(f"srcs, dsts and lens differ in length ({len(s)}, {len(d)}, {len(n)})")
        return s, d, n

    def _status(self, status: int) -> int:
        self.last_error = last_error_message() if status < 0 else ""
        return status

    def batch_transfer_sync_write(self, target: Peer, buffers, peer_buffer_addresses, lengths) -> int:
        """Writes ``lengths[i]`` bytes from local ``buffers[i]`` to the peer's address
        ``peer_buffer_addresses[i]`` for every ``i``, as one batch, and waits.

        Returns 0 on success, or a negative error code (the reason in ``last_error``)."""
        h = self._h()
        try:
            peer = self._peer(target)
        except KVTransferError as e:
            self.last_error = e.message
            return -e.code
        s, d, n = self._triples(buffers, peer_buffer_addresses, lengths)
        return self._status(self._lib.kvt_transfer_sync_write(h, peer, u64_ptr(s), u64_ptr(d), u64_ptr(n), len(s)))

    def transfer_sync_write(self, target: Peer, buffer: int, peer_buffer_address: int, length: int) -> int:
        """One write; see :meth:`batch_transfer_sync_write`."""
        return self.batch_transfer_sync_write(target, [buffer], [peer_buffer_address], [length])

    def batch_transfer_async_write(self, target: Peer, buffers, peer_buffer_addresses, lengths) -> int:
        """Submits the writes as one batch and returns its id at once; poll it with
        :meth:`get_batch_transfer_status` (then :meth:`release`) or :meth:`wait`.

        Raises :class:`KVTransferError` if the batch is refused (nothing moves then)."""
        h = self._h()
        peer = self._peer(target)
        s, d, n = self._triples(buffers, peer_buffer_addresses, lengths)
        batch = c_uint64()
        check(self._lib.kvt_transfer_submit_write(h, peer, u64_ptr(s), u64_ptr(d), u64_ptr(n), len(s), byref(batch)))
        return batch.value

    def submit(self, target: Peer, op: int, buffers, peer_buffer_addresses, lengths, timeout_ms: int = 0) -> int:
        """Submits ``lengths[i]`` bytes between local ``buffers[i]`` and the peer's address
        ``peer_buffer_addresses[i]`` for every ``i`` (``op``: ``OP_WRITE`` local to peer,
        ``OP_READ`` peer to local) as one batch and returns its id at once; raises
        :class:`KVTransferError` if the batch is refused (nothing moves then)."""
        h, peer = self._h(), self._peer(target)
        s, d, n = self._triples(buffers, peer_buffer_addresses, lengths)
        batch = c_uint64()
        check(self._lib.kvt_transfer_submit(h, peer, int(op), u64_ptr(s), u64_ptr(d), u64_ptr(n), len(s), int(timeout_ms), byref(batch)))
        return batch.value

    @staticmethod
    def page_buffers(local_bases, remote_bases, item_lens) -> np.ndarray:
        """The buffer table of :meth:`submit_pages`: one ``(local base, peer base, item_len)``
        row per buffer (a layer, or a layer's K or V), as ``uint64``. Build it once per peer
        and pass it to every call."""
        s, d, n = TransferEngine._triples(local_bases, remote_bases, item_lens)
        return np.ascontiguousarray(np.stack([s, d, n], axis=1), dtype=np.uint64)

    def submit_pages(self, target: Peer, op: int, buffers: np.ndarray, local_pages, remote_pages, timeout_ms: int = 0) -> int:
        """Submits one batch moving page ``local_pages[i]`` of every buffer here and page
        ``remote_pages[i]`` of the same buffer at the peer, for every ``i``, in direction
        ``op``; the library groups pages into runs, so no address list is built in Python.
        ``buffers`` comes from :meth:`page_buffers`. Returns the batch id at once; raises
        :class:`KVTransferError` when refused (nothing moves then)."""
        h, peer = self._h(), self._peer(target)
        if not (isinstance(buffers, np.ndarray) and buffers.dtype == np.uint64 and buffers.ndim == 2 and buffers.shape[1] == 3 and buffers.flags.c_contiguous):
            buffers = self.page_buffers(*np.asarray(buffers, dtype=np.uint64).T)
        lp, ln, lkeep = as_pages(local_pages)
        rp, rn, rkeep = as_pages(remote_pages)
        if ln != rn:
            raise ValueError(f"{ln} local pages but {rn} remote pages")
        batch = c_uint64()
        check(self._lib.kvt_transfer_pages(h, peer, int(op), buffers.ctypes.data, buffers.shape[0], lp, rp, ln, int(timeout_ms), byref(batch)))
        return batch.value

    def batch_transfer_async_read(self, target: Peer, buffers, peer_buffer_addresses, lengths, timeout_ms: int = 0) -> int:
        """Reads ``lengths[i]`` bytes at the peer's ``peer_buffer_addresses[i]`` into local
        ``buffers[i]``, as one batch; returns its id (raises if refused)."""
        return self.submit(target, _lib.OP_READ, buffers, peer_buffer_addresses, lengths, timeout_ms)

    def batch_transfer_sync_read(self, target: Peer, buffers, peer_buffer_addresses, lengths) -> int:
        """Reads as :meth:`batch_transfer_async_read` does, and waits: 0 or a negative error
        code (the reason in ``last_error``)."""
        h = self._h()
        try:
            peer = self._peer(target)
        except KVTransferError as e:
            self.last_error = e.message
            return -e.code
        s, d, n = self._triples(buffers, peer_buffer_addresses, lengths)
        return self._status(self._lib.kvt_transfer_sync(h, peer, _lib.OP_READ, u64_ptr(s), u64_ptr(d), u64_ptr(n), len(s)))

    def transfer_sync_read(self, target: Peer, buffer: int, peer_buffer_address: int, length: int) -> int:
        """One read; see :meth:`batch_transfer_sync_read`."""
        return self.batch_transfer_sync_read(target, [buffer], [peer_buffer_address], [length])

    # ---- batches ---------------------------------------------------------------------------

    def get_batch_transfer_status(self, batch: int) -> int:
        """0 pending, 1 done, 2 failed (the reason in ``last_error``); never blocks.
        Final states stay readable until :meth:`release`."""
        status = c_int32()
        check(self._lib.kvt_batch_poll(self._h(), batch, byref(status)))
        if status.value == BATCH_FAILED:
            self.last_error = last_error_message()
        return status.value

    def wait(self, batch: int) -> None:
        """Blocks until the batch is final and releases it; raises
        :class:`KVTransferError` (``BatchFailed``) if it failed."""
        check(self._lib.kvt_batch_wait(self._h(), batch))

    def batch_metrics(self, batch: int) -> BatchMetrics:
        """What the batch moves and, once final, its latency; never blocks. Readable until
        :meth:`release`."""
        m = _batch_metrics_out()
        check(self._lib.kvt_batch_get_metrics(self._h(), batch, byref(m)))
        return BatchMetrics._from(m)

    def wait_metrics(self, batch: int) -> BatchMetrics:
        """:meth:`wait`, returning what the done batch moved and its latency."""
        m = _batch_metrics_out()
        check(self._lib.kvt_batch_wait_metrics(self._h(), batch, byref(m)))
        return BatchMetrics._from(m)

    def release(self, batch: int) -> None:
        """Forgets a final batch (an unknown or released id is a no-op)."""
        check(self._lib.kvt_batch_release(self._h(), batch))


def init_logging(filter: Optional[str] = None) -> None:
    """Sends the library's logs to stderr with a ``tracing`` filter (None: ``KVT_LOG``)."""
    check(_lib.lib().kvt_init_logging(filter.encode() if filter else None))


__all__ = [
    "TransferEngine",
    "SegmentInfo",
    "init_logging",
    "BATCH_PENDING",
    "BATCH_DONE",
    "BATCH_FAILED",
    "OP_WRITE",
    "OP_READ",
]
