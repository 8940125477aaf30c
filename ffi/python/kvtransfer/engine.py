"""The low-level engine: registered memory, peers, batches of one-sided writes."""

from __future__ import annotations

import ctypes
from ctypes import byref, c_int32, c_uint32, c_uint64, c_void_p
from typing import Optional, Sequence

import numpy as np

from ._lib import EngineConfig, lib
from .errors import check

TRANSPORTS = {"auto": 0, "tcp": 1, "rdma": 2}
BATCH_PENDING, BATCH_DONE, BATCH_FAILED = 0, 1, 2


def engine_config(
    listen: Optional[str] = None,
    transport: str = "auto",
    connections_per_peer: int = 0,
    batch_timeout_ms: int = 0,
    devices: Optional[str] = None,
) -> EngineConfig:
    """A `kvt_engine_config` (0 / None fields take the library's defaults and KVT_* overrides)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {sorted(TRANSPORTS)}, not {transport!r}")
    cfg = EngineConfig()
    cfg.struct_size = ctypes.sizeof(EngineConfig)
    cfg.listen = listen.encode() if listen else None
    cfg.transport = TRANSPORTS[transport]
    cfg.connections_per_peer = connections_per_peer
    cfg.batch_timeout_ms = batch_timeout_ms
    cfg.devices = devices.encode() if devices else None
    return cfg


def read_string(fn, handle) -> str:
    """Calls a `(handle, buf, cap)` string getter."""
    buf = ctypes.create_string_buffer(512)
    check(fn(handle, buf, len(buf)))
    return buf.value.decode()


def _u64_array(values: Sequence[int]):
    a = np.ascontiguousarray(values, dtype=np.uint64)
    return a, a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))


class TransferEngine:
    """One engine: registers memory, connects to peers, moves batches of writes.

    Shaped like Mooncake's Python engine: remote memory is named by address.
    """

    def __init__(
        self,
        listen: Optional[str] = None,
        transport: str = "auto",
        connections_per_peer: int = 0,
        batch_timeout_ms: int = 0,
        devices: Optional[str] = None,
    ):
        cfg = engine_config(listen, transport, connections_per_peer, batch_timeout_ms, devices)
        h = c_void_p()
        check(lib.kvt_engine_create(byref(cfg), byref(h)))
        self._h = h

    @property
    def handle(self) -> c_void_p:
        if self._h is None:
            raise ValueError("engine is closed")
        return self._h

    @property
    def local_addr(self) -> str:
        """The bootstrap address peers connect to (`ip:port`)."""
        return read_string(lib.kvt_engine_local_addr, self.handle)

    @property
    def transport(self) -> str:
        """`tcp` or `rdma`."""
        return read_string(lib.kvt_engine_transport, self.handle)

    def register(self, addr: int, length: int) -> int:
        """Registers `length` bytes at `addr` (keep them alive while registered); returns the segment id."""
        seg = c_uint32()
        check(lib.kvt_engine_register(self.handle, addr, length, byref(seg)))
        return seg.value

    register_memory = register

    def unregister(self, segment: int) -> None:
        """Unregisters a segment (refused while transfers use it)."""
        check(lib.kvt_engine_unregister(self.handle, segment))

    unregister_memory = unregister

    def connect(self, addr: str) -> int:
        """Connects to the engine at `addr`; returns the peer id."""
        peer = c_uint64()
        check(lib.kvt_engine_connect(self.handle, addr.encode(), byref(peer)))
        return peer.value

    def batch_transfer_sync_write(self, peer: int, srcs, dsts, lens) -> int:
        """Writes `lens[i]` bytes from local `srcs[i]` to the peer's address `dsts[i]`, waits.

        Returns 0 on success and the negative error code on failure (like Mooncake), never raises
        for a failed transfer.
        """
        n = len(srcs)
        if not (len(dsts) == n == len(lens)):
            raise ValueError("srcs, dsts and lens must have the same length")
        (a, pa), (b, pb), (c, pc) = _u64_array(srcs), _u64_array(dsts), _u64_array(lens)
        return lib.kvt_transfer_sync_write(self.handle, peer, pa, pb, pc, n)

    def batch_transfer_async_write(self, peer: int, srcs, dsts, lens) -> int:
        """Starts the same writes; returns a batch id for `get_batch_transfer_status`."""
        n = len(srcs)
        if not (len(dsts) == n == len(lens)):
            raise ValueError("srcs, dsts and lens must have the same length")
        (a, pa), (b, pb), (c, pc) = _u64_array(srcs), _u64_array(dsts), _u64_array(lens)
        batch = c_uint64()
        check(lib.kvt_transfer_submit_write(self.handle, peer, pa, pb, pc, n, byref(batch)))
        return batch.value

    def get_batch_transfer_status(self, batch: int) -> int:
        """0 pending, 1 done, 2 failed (never blocks; the failure reason is then in
        `kvtransfer.errors.last_message()`). Final states stay readable until `release`."""
        st = c_int32()
        check(lib.kvt_batch_poll(self.handle, batch, byref(st)))
        return st.value

    def wait(self, batch: int) -> None:
        """Blocks until the batch is final and releases it; raises `KVTransferError` if it
        failed."""
        check(lib.kvt_batch_wait(self.handle, batch))

    def release(self, batch: int) -> None:
        """Forgets a finished batch."""
        check(lib.kvt_batch_release(self.handle, batch))

    def close(self) -> None:
        """Stops the engine (idempotent)."""
        if getattr(self, "_h", None) is not None:
            lib.kvt_engine_destroy(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
