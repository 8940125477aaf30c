"""KV rooms shaped like SGLang's `sglang.srt.disaggregation.base.conn` classes."""

from __future__ import annotations

import ctypes
import enum
from ctypes import byref, c_int32, c_void_p
from dataclasses import dataclass, field
from typing import List, Optional, Union

import numpy as np

from ._lib import KvBuffer, KvConfig, RoomMetrics, lib
from .engine import engine_config, read_string
from .errors import KVTransferError, ROOM_FAILED, check


class KVPoll(enum.IntEnum):
    """SGLang's room states."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class DisaggregationMode(enum.Enum):
    """Which side a manager is (SGLang's names)."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class KVArgs:
    """Where the KV cache lives: one entry per buffer (layer, or K/V of a layer), like SGLang's."""

    kv_data_ptrs: List[int] = field(default_factory=list)
    kv_data_lens: List[int] = field(default_factory=list)
    kv_item_lens: List[int] = field(default_factory=list)
    aux_data_ptrs: List[int] = field(default_factory=list)
    aux_data_lens: List[int] = field(default_factory=list)
    aux_item_lens: List[int] = field(default_factory=list)


def _buffers(ptrs, lens, items, what: str):
    if not (len(ptrs) == len(lens) == len(items)):
        raise ValueError(f"{what}: ptrs, lens and item lens must have the same length")
    arr = (KvBuffer * max(len(ptrs), 1))()
    for i, (p, n, it) in enumerate(zip(ptrs, lens, items)):
        arr[i] = KvBuffer(int(p), int(n), int(it))
    return arr, len(ptrs)


def as_pages(indices) -> np.ndarray:
    """Page indices as a C-contiguous int32 array; an int32 contiguous array is used as it is
    (no copy)."""
    if isinstance(indices, np.ndarray) and indices.dtype == np.int32 and indices.flags["C_CONTIGUOUS"]:
        return indices
    a = np.asarray(indices)
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise OverflowError("page index does not fit in int32")
    return np.ascontiguousarray(a, dtype=np.int32)


def _pages_arg(indices):
    a = as_pages(indices)
    return a, a.ctypes.data_as(ctypes.POINTER(c_int32)), a.size


def _aux(aux_index: Optional[int]) -> int:
    return -1 if aux_index is None else int(aux_index)


class KVManager:
    """One per process and role: an engine with the KV layout registered."""

    def __init__(
        self,
        args: KVArgs,
        role: Union[str, DisaggregationMode],
        listen: Optional[str] = None,
        transport: str = "auto",
        room_timeout_ms: int = 0,
        devices: Optional[str] = None,
    ):
        role = role.value if isinstance(role, DisaggregationMode) else str(role).lower()
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, not {role!r}")
        self.role = role
        self.args = args
        bufs, nbufs = _buffers(args.kv_data_ptrs, args.kv_data_lens, args.kv_item_lens, "kv")
        aux, naux = _buffers(args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens, "aux")
        cfg = KvConfig()
        cfg.struct_size = ctypes.sizeof(KvConfig)
        cfg.role = 0 if role == "prefill" else 1
        cfg.room_timeout_ms = room_timeout_ms
        cfg.buffers = ctypes.cast(bufs, ctypes.POINTER(KvBuffer))
        cfg.num_buffers = nbufs
        cfg.aux = ctypes.cast(aux, ctypes.POINTER(KvBuffer))
        cfg.num_aux = naux
        ecfg = engine_config(listen=listen, transport=transport, devices=devices)
        h = c_void_p()
        check(lib.kvt_kv_manager_create(byref(ecfg), byref(cfg), byref(h)))
        self._h = h

    @property
    def handle(self) -> c_void_p:
        if self._h is None:
            raise ValueError("manager is closed")
        return self._h

    @property
    def bootstrap_addr(self) -> str:
        """`ip:port` that receivers pass to reach this (prefill) manager."""
        return read_string(lib.kvt_kv_manager_bootstrap_addr, self.handle)

    def close(self) -> None:
        """Destroys the manager (its rooms keep it alive until they are closed)."""
        if getattr(self, "_h", None) is not None:
            lib.kvt_kv_manager_destroy(self._h)
            self._h = None

    def __del__(self):
        self.close()


class _Room:
    _destroy = None
    _poll = None
    _reason = None
    _abort = None
    _metrics = None

    def poll(self) -> KVPoll:
        """The room's state (never blocks)."""
        st = c_int32()
        check(type(self)._poll(self._h, byref(st)))
        return KVPoll(st.value)

    def failure_reason(self) -> str:
        """Why the room failed ("" while it has not)."""
        return read_string(type(self)._reason, self._h)

    def failure_exception(self):
        """Raises `KVTransferError` with the failure reason (SGLang calls this on Failed)."""
        raise KVTransferError(ROOM_FAILED, f"room {self.bootstrap_room} failed: {self.failure_reason()}")

    def abort(self) -> None:
        """Fails the room; returns once none of its writes can land any more."""
        check(type(self)._abort(self._h))

    def metrics(self) -> dict:
        """bytes, slices, queued_to_first_write_ns, transfer_span_ns (0 = not yet)."""
        m = RoomMetrics()
        m.struct_size = ctypes.sizeof(RoomMetrics)
        check(type(self)._metrics(self._h, byref(m)))
        return {k: getattr(m, k) for k in ("bytes", "slices", "queued_to_first_write_ns", "transfer_span_ns")}

    def close(self) -> None:
        """Destroys the room (aborting it if it has not finished)."""
        if getattr(self, "_h", None) is not None:
            type(self)._destroy(self._h)
            self._h = None

    def __del__(self):
        self.close()


class KVSender(_Room):
    """Prefill side of a room."""

    _destroy = lib.kvt_kv_sender_destroy
    _poll = lib.kvt_kv_sender_poll
    _reason = lib.kvt_kv_sender_failure_reason
    _abort = lib.kvt_kv_sender_abort
    _metrics = lib.kvt_kv_sender_metrics

    def __init__(self, mgr: KVManager, bootstrap_addr: Optional[str], bootstrap_room: int, *_, **__):
        self.mgr = mgr  # keeps the manager alive while the room lives
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_room = int(bootstrap_room)
        self.num_kv_indices: Optional[int] = None
        self.sent = 0
        h = c_void_p()
        check(lib.kvt_kv_sender_create(mgr.handle, self.bootstrap_room, byref(h)))
        self._h = h

    def init(self, num_kv_indices: int, aux_index: Optional[int] = None) -> None:
        """The room carries `num_kv_indices` pages, and aux slot `aux_index`."""
        check(lib.kvt_kv_sender_init(self._h, int(num_kv_indices), _aux(aux_index)))
        self.num_kv_indices = int(num_kv_indices)

    def send(self, kv_indices, is_last: Optional[bool] = None) -> None:
        """Sends the next pages (source page indices). `is_last` defaults to "this chunk
        completes the count given to `init`"."""
        arr, ptr, n = _pages_arg(kv_indices)
        if is_last is None:
            is_last = self.num_kv_indices is not None and self.sent + n == self.num_kv_indices
        check(lib.kvt_kv_sender_send(self._h, ptr, n, bool(is_last)))
        self.sent += n


class KVReceiver(_Room):
    """Decode side of a room."""

    _destroy = lib.kvt_kv_receiver_destroy
    _poll = lib.kvt_kv_receiver_poll
    _reason = lib.kvt_kv_receiver_failure_reason
    _abort = lib.kvt_kv_receiver_abort
    _metrics = lib.kvt_kv_receiver_metrics

    def __init__(self, mgr: KVManager, bootstrap_addr: str, bootstrap_room: int, *_, **__):
        self.mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_room = int(bootstrap_room)
        h = c_void_p()
        check(lib.kvt_kv_receiver_create(mgr.handle, bootstrap_addr.encode(), self.bootstrap_room, byref(h)))
        self._h = h

    def init(self, kv_indices, aux_index: Optional[int] = None) -> None:
        """Names the destination pages (in room order) and the aux slot."""
        arr, ptr, n = _pages_arg(kv_indices)
        check(lib.kvt_kv_receiver_init(self._h, ptr, n, _aux(aux_index)))
