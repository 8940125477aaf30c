"""Paged-KV hand-off in rooms, shaped like SGLang's ``disaggregation.base.conn``.

A :class:`KVManager` per process owns an engine, a role and the KV layout (:class:`KVArgs`).
Each request's hand-off is a room (``bootstrap_room``): the decode side creates a
:class:`KVReceiver` against the prefill manager's ``bootstrap_addr`` and names its destination
pages; the prefill side creates a :class:`KVSender` for the same room and sends source pages
in one or more chunks. Both poll the room through :class:`KVPoll`.
"""

from __future__ import annotations

import ctypes
import enum
import operator
from ctypes import byref, c_int32, c_void_p
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _lib
from ._util import Handle, as_pages, closed_error, engine_config, read_metrics, read_string, read_text
from .errors import ErrorCode, FailureKind, KVTransferError, check


class KVPoll(IntEnum):
    """A room's state (SGLang's values)."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class DisaggregationMode(enum.Enum):
    """Like SGLang's ``DisaggregationMode``; :class:`KVManager` takes it, a string or a role."""

    NULL = "null"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class KVArgs:
    """The KV layout, as SGLang's ``KVArgs``: buffer ``i`` is ``kv_data_lens[i]`` bytes at
    ``kv_data_ptrs[i]``, made of pages of ``kv_item_lens[i]`` bytes (MLA: one buffer per
    layer; MHA/GQA: a K and a V buffer per layer, in the same order on both sides). Aux
    buffers likewise, made of slots of ``aux_item_lens[i]`` bytes.

    ``ib_device`` (``"mlx5_0,mlx5_3"``) restricts RDMA devices; ``engine_rank`` and ``gpu_id``
    are carried for SGLang code and not used."""

    kv_data_ptrs: List[int] = field(default_factory=list)
    kv_data_lens: List[int] = field(default_factory=list)
    kv_item_lens: List[int] = field(default_factory=list)
    aux_data_ptrs: List[int] = field(default_factory=list)
    aux_data_lens: List[int] = field(default_factory=list)
    aux_item_lens: List[int] = field(default_factory=list)
    ib_device: Optional[str] = None
    engine_rank: int = 0
    gpu_id: int = 0


@dataclass
class KVTransferMetric:
    """SGLang's ``KVTransferMetric``: what :meth:`KVSender.get_transfer_metric` reports."""

    transfer_latency_s: Optional[float] = None
    alloc_latency_s: Optional[float] = None
    transfer_total_bytes: Optional[int] = None


@dataclass(frozen=True)
class RoomMetrics:
    """What a room moved: bytes (pages and aux), slices (sender: writes after page expansion;
    receiver: chunks notified) and two spans in ns (None: not yet)."""

    bytes: int
    slices: int
    queued_to_first_write_ns: Optional[int]
    transfer_span_ns: Optional[int]


Role = Union[str, int, enum.Enum]


def role_code(role: Role) -> int:
    """``KVT_ROLE_PREFILL``/``_DECODE`` from "prefill"/"decode", an enum with such a name or
    value (SGLang's ``DisaggregationMode``), or the number itself."""
    if isinstance(role, enum.Enum):
        for v in (role.name, role.value):
            if isinstance(v, str) and v.lower() in ("prefill", "decode"):
                return _lib.ROLE_PREFILL if v.lower() == "prefill" else _lib.ROLE_DECODE
    elif isinstance(role, str):
        r = role.strip().lower()
        if r in ("prefill", "decode"):
            return _lib.ROLE_PREFILL if r == "prefill" else _lib.ROLE_DECODE
    elif isinstance(role, int) and not isinstance(role, bool) and role in (_lib.ROLE_PREFILL, _lib.ROLE_DECODE):
        return role
    raise ValueError(f"role must be 'prefill' or 'decode', not {role!r}")


def _buffers(ptrs: Sequence[int], lens: Sequence[int], items: Sequence[int], what: str):
    ptrs, lens, items = list(ptrs), list(lens), list(items)
    if not len(ptrs) == len(lens) == len(items):
        raise ValueError(
            f"{what}: data_ptrs, data_lens and item_lens differ in length ({len(ptrs)}, {len(lens)}, {len(items)})"
        )
    arr = (_lib.KvBuffer * max(len(ptrs), 1))()
    for i, (p, n, it) in enumerate(zip(ptrs, lens, items)):
        arr[i] = _lib.KvBuffer(int(p), int(n), int(it))
    return arr, len(ptrs)


def _check_room(room: Any) -> int:
    if isinstance(room, bool):
        raise TypeError("bootstrap_room must be an int, not bool")
    try:
        room = operator.index(room)
    except TypeError:
        raise TypeError(f"bootstrap_room must be an int, not {type(room).__name__}") from None
    if not 0 <= room < 2**64:
        raise ValueError(f"bootstrap_room {room} is not a 64-bit unsigned value")
    return room


class KVManager(Handle):
    """Serves rooms in one role over an engine of its own, with every buffer of ``args``
    registered.

    The memory ``args`` points to must stay valid until the manager and every sender and
    receiver made from it are closed; pass its owners (tensors, arrays) as ``keepalive`` to
    have the manager reference them. ``server_args`` and ``is_mla_backend`` are accepted for
    SGLang's constructor shape and ignored. ``integrity=True`` (decode) checks every chunk
    against a digest of what the sender posted before a room succeeds (host memory only; a
    mismatch fails the room with ``FailureKind.Integrity``).
    """

    def __init__(
        self,
        args: KVArgs,
        disaggregation_mode: Role,
        server_args: Any = None,
        is_mla_backend: bool = False,
        *,
        listen: Optional[str] = None,
        transport: Union[str, int] = "auto",
        room_timeout_ms: int = 0,
        abort_timeout_ms: int = 0,
        connect_timeout_ms: int = 0,
        heartbeat_timeout_ms: int = 0,
        integrity: bool = False,
        connections_per_peer: int = 0,
        batch_timeout_ms: int = 0,
        devices: Union[str, Sequence[str], None] = None,
        secret: Union[str, bytes, None] = None,
        secret_file: Optional[str] = None,
        keepalive: Any = None,
    ):
        self._handle: Optional[c_void_p] = None
        self._lib = _lib.lib()
        self.args = args
        role = disaggregation_mode
        self.role = "prefill" if role_code(role) == _lib.ROLE_PREFILL else "decode"
        self._keepalive = keepalive
        timeouts = (room_timeout_ms, abort_timeout_ms, connect_timeout_ms, heartbeat_timeout_ms)
        if min(timeouts) < 0:
            raise ValueError("timeouts must be >= 0 (0: the default)")
        bufs, nbufs = _buffers(args.kv_data_ptrs, args.kv_data_lens, args.kv_item_lens, "kv")
        aux, naux = _buffers(args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens, "aux")
        kv = _lib.KvConfig()
        kv.struct_size = ctypes.sizeof(_lib.KvConfig)
        kv.role = role_code(role)
        kv.room_timeout_ms = room_timeout_ms
        kv.abort_timeout_ms = abort_timeout_ms
        kv.connect_timeout_ms = connect_timeout_ms
        kv.heartbeat_timeout_ms = heartbeat_timeout_ms
        kv.integrity = 1 if integrity else 0
        kv.buffers = ctypes.cast(bufs, ctypes.POINTER(_lib.KvBuffer))
        kv.num_buffers = nbufs
        kv.aux = ctypes.cast(aux, ctypes.POINTER(_lib.KvBuffer)) if naux else None
        kv.num_aux = naux
        eng = engine_config(
            listen,
            transport,
            connections_per_peer,
            batch_timeout_ms,
            devices or args.ib_device,
            secret,
            secret_file,
        )
        out = c_void_p()
        check(self._lib.kvt_kv_manager_create(byref(eng), byref(kv), byref(out)))
        self._handle = out
        self._bootstrap_addr: Optional[str] = None

    def _h(self) -> c_void_p:
        if self._handle is None:
            raise closed_error("KVManager")
        return self._handle

    @property
    def bootstrap_addr(self) -> str:
        """The address the other side uses for this manager (``"ip:port"``); a decode side
        passes the prefill manager's to :class:`KVReceiver`."""
        h = self._h()
        if self._bootstrap_addr is None:
            self._bootstrap_addr = read_string(self._lib.kvt_kv_manager_bootstrap_addr, h)
        return self._bootstrap_addr

    def metrics(self) -> Dict[str, int]:
        """The manager's engine metric totals (its rooms included): batches and bytes by
        outcome, rails, rooms started/succeeded/failed, latency counts and sums in ns."""
        return read_metrics(self._lib.kvt_kv_manager_metrics, self._h())

    def metrics_text(self) -> str:
        """Every metric series in the Prometheus text format (OpenMetrics, ``# EOF`` last)."""
        return read_text(self._lib.kvt_kv_manager_metrics_text, self._h())

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Stops the manager. Close its senders and receivers first: they keep its engine
        alive (and their ``mgr`` reference keeps this object, and ``keepalive``, alive)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            check(self._lib.kvt_kv_manager_destroy(handle))


    def __repr__(self) -> str:
        state = "closed" if self._handle is None else self.bootstrap_addr
        return f"<KVManager {self.role} {state}>"


class _Room(Handle):
    """What senders and receivers share: a handle, its manager, polling and aborting."""

    _prefix = ""
    _kind = ""

    def __init__(self, mgr: KVManager, bootstrap_room: int):
        self._handle: Optional[c_void_p] = None
        if not isinstance(mgr, KVManager):
            raise TypeError(f"mgr must be a KVManager, not {type(mgr).__name__}")
        self.kv_mgr = mgr  # keeps the manager (and its memory) alive as long as the room
        self._lib = mgr._lib
        self.bootstrap_room = _check_room(bootstrap_room)

    def _fn(self, name: str):
        return getattr(self._lib, self._prefix + name)

    def _h(self) -> c_void_p:
        if self._handle is None:
            raise closed_error(f"{self._kind} of room {self.bootstrap_room}")
        return self._handle

    def _check(self, status: int) -> None:
        check(status, self.bootstrap_room)

    def _pages(self, kv_indices: Any):
        try:
            return as_pages(kv_indices)
        except KVTransferError as e:
            e.room = self.bootstrap_room
            raise

    def poll(self) -> KVPoll:
        """The room's state; never blocks."""
        state = c_int32()
        self._check(self._fn("poll")(self._h(), byref(state)))
        return KVPoll(state.value)

    def failure_reason(self) -> Optional[str]:
        """Why the room failed, or None if it has not."""
        why = read_string(self._fn("failure_reason"), self._h(), 256, self.bootstrap_room)
        return why or None

    def failure_kind(self) -> Optional[FailureKind]:
        """The room's :class:`FailureKind`, or None if it has not failed."""
        kind, state = c_int32(), c_int32()
        self._check(self._fn("failure")(self._h(), byref(kind), byref(state)))
        return KVTransferError(0, "", kind=kind.value).kind

    def failure_exception(self) -> None:
        """Raises :class:`KVTransferError` (``RoomFailed``) with the reason. Like SGLang, a
        room that has not failed yet is failed first (aborted), since the caller gave up on it."""
        state = self.poll()
        if state not in (KVPoll.Failed, KVPoll.Success):
            self.abort()
            state = self.poll()
        why = self.failure_reason()
        if why is None:
            why = f"room {self.bootstrap_room} did not fail (it is {state.name})"
        kind, failed_in = c_int32(), c_int32()
        self._check(self._fn("failure")(self._h(), byref(kind), byref(failed_in)))
        raise KVTransferError(
            ErrorCode.RoomFailed,
            why,
            self.bootstrap_room,
            kind=kind.value,
            failed_in=failed_in.value if kind.value else None,
        )

    def abort(self) -> None:
        """Fails the room (unless it succeeded); returns once none of its writes can land
        any more. May block up to the abort timeout."""
        self._check(self._fn("abort")(self._h()))

    def get_transfer_metric(self) -> KVTransferMetric:
        """SGLang's metric, from the library's own counts: bytes moved and first write to
        last completion (None until known)."""
        m = self.metrics()
        span = m.transfer_span_ns
        return KVTransferMetric(
            transfer_latency_s=None if span is None else span / 1e9,
            transfer_total_bytes=m.bytes or None,
        )

    def metrics(self) -> RoomMetrics:
        m = _lib.RoomMetricsC()
        m.struct_size = ctypes.sizeof(_lib.RoomMetricsC)
        self._check(self._fn("metrics")(self._h(), byref(m)))
        return RoomMetrics(
            m.bytes, m.slices, m.queued_to_first_write_ns or None, m.transfer_span_ns or None
        )

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Frees the handle; a room that is not final is aborted first (may block up to the
        abort timeout). Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._check(self._fn("destroy")(handle))

    def clear(self) -> None:
        """SGLang's name for releasing a finished room: same as :meth:`close`."""
        self.close()


    def __repr__(self) -> str:
        state = "closed" if self._handle is None else self.poll().name
        return f"<{type(self).__name__} room {self.bootstrap_room} {state}>"


class KVSender(_Room):
    """The prefill side of room ``bootstrap_room`` in the prefill manager ``mgr``.

    ``bootstrap_addr`` is accepted for SGLang's constructor shape (the room lives in ``mgr``;
    receivers find it through ``mgr.bootstrap_addr``). ``DuplicateRoom`` (27) if the room is
    live in ``mgr``."""

    _prefix = "kvt_kv_sender_"
    _kind = "KVSender"

    def __init__(
        self,
        mgr: KVManager,
        bootstrap_addr: Optional[str],
        bootstrap_room: int,
        req_has_disagg_prefill_dp_rank: bool = False,
    ):
        super().__init__(mgr, bootstrap_room)
        self.bootstrap_addr = bootstrap_addr
        self.num_kv_indices: Optional[int] = None
        self.sent = 0
        out = c_void_p()
        self._check(self._lib.kvt_kv_sender_create(mgr._h(), self.bootstrap_room, byref(out)))
        self._handle = out

    def init(self, num_kv_indices: int, aux_index: Optional[int] = None) -> None:
        """Declares the room's page count (the receiver names as many pages) and the aux
        slot to copy with the last chunk (None: no aux)."""
        if num_kv_indices < 0:
            raise ValueError("num_kv_indices must be >= 0")
        aux = -1 if aux_index is None else int(aux_index)
        if aux_index is not None and aux < 0:
            raise ValueError("aux_index must be >= 0 (or None)")
        self._check(self._lib.kvt_kv_sender_init(self._h(), int(num_kv_indices), aux))
        self.num_kv_indices = int(num_kv_indices)

    def send(
        self,
        kv_indices: Any,
        state_indices: Optional[Sequence] = None,
        num_kv_tokens: Optional[int] = None,
        *,
        is_last: Optional[bool] = None,
    ) -> None:
        """Sends the next chunk (SGLang's signature): local page indices that land in the
        receiver's pages at the same positions of the room. ``is_last`` None means "this
        chunk completes the page count given to :meth:`init`", as SGLang decides it. A
        C-contiguous numpy int32 array is passed without a copy. Returns once queued; poll for
        completion. Refused chunks (``InvalidPages``, ``RoomState``) leave the room as it was.
        ``num_kv_tokens`` is accepted and unused; state buffers (``state_indices``, hybrid
        models) are not moved by rooms, so non-empty ones are refused."""
        if state_indices:
            raise NotImplementedError("kvtransfer rooms move KV pages and aux slots, not state buffers")
        ptr, n, keep = self._pages(kv_indices)
        if is_last is None:
            is_last = self.num_kv_indices is not None and self.sent + n >= self.num_kv_indices
        self._check(self._lib.kvt_kv_sender_send(self._h(), ptr, n, bool(is_last)))
        del keep  # referenced until the call returned; the library copied what it needs
        self.sent += n


    def pop_decode_prefix_len(self) -> int:
        """SGLang's hook: no decode-side prefix is reused (0)."""
        return 0

    def get_max_transfer_tokens(self) -> Optional[int]:
        """SGLang's hook: no limit per chunk (None)."""
        return None

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        """SGLang's hook: a chunk with pages, or the last one (an empty last chunk finishes
        the room and carries the aux slot)."""
        return num_pages > 0 or last_chunk


class KVReceiver(_Room):
    """The decode side of room ``bootstrap_room``, served by the prefill manager at
    ``bootstrap_addr`` (``"ip:port"``). An unreachable prefill fails the room (see
    :meth:`poll`), not this call. ``DuplicateRoom`` (27) if the room is live in ``mgr``."""

    _prefix = "kvt_kv_receiver_"
    _kind = "KVReceiver"

    def __init__(self, mgr: KVManager, bootstrap_addr: str, bootstrap_room: Optional[int] = None):
        if bootstrap_room is None:
            raise ValueError("a kvtransfer receiver needs its bootstrap_room")
        super().__init__(mgr, bootstrap_room)
        self.bootstrap_addr = bootstrap_addr
        self.prefill_dp_rank = 0
        out = c_void_p()
        self._check(
            self._lib.kvt_kv_receiver_create(mgr._h(), bootstrap_addr.encode(), self.bootstrap_room, byref(out))
        )
        self._handle = out

    def init(self, prefill_dp_rank: Any = 0, aux_index: Optional[int] = None) -> None:
        """SGLang's ``init(prefill_dp_rank)``: the prefill is already chosen by
        ``bootstrap_addr``, so an int rank is recorded and nothing else happens. Given page
        indices instead (kvtransfer's earlier form), it is :meth:`send_metadata`."""
        if isinstance(prefill_dp_rank, (int, np.integer)) and not isinstance(prefill_dp_rank, bool):
            if aux_index is not None:
                raise TypeError("init(prefill_dp_rank) takes no aux_index; name pages with send_metadata")
            self.prefill_dp_rank = int(prefill_dp_rank)
            return
        self.send_metadata(prefill_dp_rank, aux_index)

    def send_metadata(
        self,
        kv_indices: Any,
        aux_index: Optional[int] = None,
        state_indices: Optional[Sequence] = None,
        decode_prefix_len: Optional[int] = None,
        destination: Any = None,
    ) -> None:
        """Names the destination pages (in room order) and aux slot (None: no aux), SGLang's
        signature. A C-contiguous numpy int32 array is passed without a copy. Nothing is sent
        when the pages are wrong (``InvalidPages``). State buffers, a decode prefix and host
        destinations are not supported by rooms and are refused."""
        if state_indices or decode_prefix_len or (destination is not None and getattr(destination, "value", destination) != "device"):
            raise NotImplementedError("kvtransfer rooms take device/host KV pages and an aux slot only")
        ptr, n, keep = self._pages(kv_indices)
        aux = -1 if aux_index is None else int(aux_index)
        if aux_index is not None and aux < 0:
            raise ValueError("aux_index must be >= 0 (or None)")
        self._check(self._lib.kvt_kv_receiver_init(self._h(), ptr, n, aux))
        del keep


__all__ = [
    "DisaggregationMode",
    "KVArgs",
    "KVTransferMetric",
    "KVManager",
    "KVPoll",
    "KVReceiver",
    "KVSender",
    "RoomMetrics",
]
