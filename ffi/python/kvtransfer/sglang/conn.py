"""The classes behind ``--disaggregation-transfer-backend kvtransfer``.

They are SGLang's Mooncake backend classes (themselves built on SGLang's ``Common*`` classes)
with kvtransfer as the engine and a paged data path, so SGLang's bootstrap server, ZMQ
registration, rank mapping, heartbeats, failed-session probing, aborts with deferred release
and timeouts all keep working as SGLang ships them. What changes:

- **The engine** is a kvtransfer engine per manager (:class:`KvtEngine`), created from the
  manager's own context (local IP, ``ib_device``), over ``KVT_TRANSPORT`` (``auto``: RDMA where
  both ends have it, else TCP), and stopped by ``teardown()``.
- **One paged call per chunk.** Mooncake's backend expands each chunk into a Python list of
  (source, destination, length) triples, one per run of pages per layer buffer: 10^4-10^5
  tuples for a long prompt. Here each chunk is one library call with the page indices and a
  per-peer buffer table (local base, peer base, item_len per layer or K/V buffer) built once
  per peer; the library groups pages into runs, expands them over the buffers, coalesces and
  stripes them over the lanes.
- Layouts the paged call does not cover (device-side destination pages, custom memory pools,
  unified memory, bounded index batches) fall back to the Mooncake code path over the same
  engine, which speaks Mooncake's API.
- **Transfer metrics from the library.** Every batch the engine waits for on a transfer
  worker (or on a thread it handed the chunk's work to) is metered for the chunk's room from
  the library's own per-batch report: bytes moved, and submit-to-done time.
  :meth:`KvtKVSender.get_transfer_metric` reports the room's bytes (KV pages, aux and state
  alike) and the span from its first batch's submit to its last batch's end.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from sglang.srt.disaggregation.base.conn import KVArgs
from sglang.srt.disaggregation.mooncake import conn as mc
from sglang.srt.disaggregation.utils import build_transfer_entry_pairs, is_elided_entry

from .. import mooncake as kvt_mooncake
from ..engine import BatchMetrics
from ..engine import TransferEngine as _Engine

log = logging.getLogger("kvtransfer.sglang")


class RoomMeter:
    """What the library reported for each room's batches: bytes moved, and the span from the
    first batch's submit to the last batch's end. Keeps the newest ``cap`` rooms, so a room
    whose metric is never read cannot make it grow."""

    def __init__(self, cap: int = 4096):
        self._lock = threading.Lock()
        self._rooms: "OrderedDict[int, List[float]]" = OrderedDict()  # room -> [bytes, start, end]
        self._cap = cap

    def add(self, room: int, m: BatchMetrics) -> None:
        """Counts one done batch of ``room``."""
        end = time.perf_counter()
        start = end - (m.latency_s or 0.0)
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                self._rooms[room] = r = [0, start, end]
                while len(self._rooms) > self._cap:
                    self._rooms.popitem(last=False)
            r[0] += m.bytes_written + m.bytes_read
            r[1] = min(r[1], start)
            r[2] = max(r[2], end)

    def take(self, room: int) -> Optional[Tuple[int, float]]:
        """(bytes, span in seconds) of ``room``, forgotten here; None if nothing was metered."""
        with self._lock:
            r = self._rooms.pop(room, None)
        return None if r is None else (int(r[0]), r[2] - r[1])


class _RoomQueue:
    """A transfer worker's queue that notes, for its thread, the room of the chunk it hands out."""

    def __init__(self, queue, current: threading.local):
        self._queue = queue
        self._current = current

    def get(self, *args, **kwargs):
        chunk = self._queue.get(*args, **kwargs)
        self._current.room = getattr(chunk, "room", None)
        return chunk

    def __getattr__(self, name):
        return getattr(self._queue, name)


class _RoomExecutor:
    """A transfer worker's executor whose tasks run under the room of the chunk that submitted
    them."""

    def __init__(self, executor, current: threading.local):
        self._executor = executor
        self._current = current

    def submit(self, fn, *args, **kwargs):
        room = getattr(self._current, "room", None)

        def under_room():
            self._current.room = room
            try:
                return fn(*args, **kwargs)
            finally:
                self._current.room = None

        return self._executor.submit(under_room)

    def __getattr__(self, name):
        return getattr(self._executor, name)


class KvtEngine:
    """The per-process engine, with the interface SGLang's Mooncake backend calls on its
    engine wrapper (``batch_register``, ``batch_transfer_sync``, ``get_session_id``,
    ``send_probe``, ...) plus :meth:`transfer_pages`."""

    def __init__(self, hostname: str, ib_device: Optional[str] = None):
        self.te = kvt_mooncake.TransferEngine()
        protocol = os.environ.get("KVT_TRANSPORT", "auto") or "auto"
        if self.te.initialize(hostname, "P2PHANDSHAKE", protocol, ib_device or "") != 0:
            raise RuntimeError(f"kvtransfer engine initialization failed: {self.te.last_error}")
        self.hostname = hostname
        self.ib_device = ib_device
        self.session_id = f"{hostname}:{self.te.get_rpc_port()}"
        #: Per room: what the library reported for its batches.
        self.meter = RoomMeter()
        #: The room the calling thread works for (set by the manager's transfer workers).
        self.current = threading.local()

    def _on_done(self) -> Optional[Callable[[BatchMetrics], None]]:
        room = getattr(self.current, "room", None)
        return None if room is None else functools.partial(self.meter.add, room)

    def get_session_id(self) -> str:
        return self.session_id

    def get_ib_device(self) -> Optional[str]:
        return self.ib_device

    def register(self, ptr: int, length: int) -> None:
        if self.te.register_memory(ptr, length) != 0:
            raise RuntimeError(f"kvtransfer memory registration failed: {self.te.last_error}")

    def deregister(self, ptr: int) -> None:
        if self.te.unregister_memory(ptr) != 0:
            raise RuntimeError(f"kvtransfer memory deregistration failed: {self.te.last_error}")

    def batch_register(self, ptrs: List[int], lengths: List[int]) -> int:
        ret = self.te.batch_register_memory(ptrs, lengths)
        if ret != 0:
            raise RuntimeError(f"kvtransfer memory registration failed: {self.te.last_error}")
        return ret

    def batch_deregister(self, ptrs: List[int]) -> int:
        return self.te.batch_unregister_memory(ptrs)

    def transfer_sync(self, session_id: str, buffer: int, peer_buffer_address: int, length: int) -> int:
        return self.batch_transfer_sync(session_id, [buffer], [peer_buffer_address], [length])

    def batch_transfer_sync(self, session_id: str, buffers, peer_buffer_addresses, lengths) -> int:
        return self.te.batch_transfer_sync_write(
            session_id, buffers, peer_buffer_addresses, lengths, on_done=self._on_done()
        )

    def transfer_pages(self, session_id: str, table: np.ndarray, local_pages, remote_pages) -> int:
        """One paged write (see :meth:`kvtransfer.mooncake.TransferEngine.transfer_sync_pages`)."""
        return self.te.transfer_sync_pages(session_id, table, local_pages, remote_pages, on_done=self._on_done())

    def metrics(self) -> Dict[str, int]:
        """The engine's metric totals (:meth:`kvtransfer.TransferEngine.metrics`)."""
        return self.te._e().metrics()

    def send_probe(self, peer_session_id: str) -> int:
        return self.te.send_probe(peer_session_id)

    def get_engine(self):
        raise NotImplementedError("kvtransfer has no Mooncake C++ engine object to share")

    def close(self) -> None:
        """Stops the engine: its listener, peers and registrations."""
        self.te.close()


class KvtKVManager(mc.MooncakeKVManager):
    """SGLang's Mooncake manager over a kvtransfer engine, with paged chunk transfers."""

    sender_trace_module = "kvtransfer"
    #: SGLang's sender then reports the transfer time (first send to Success).
    reports_transfer_latency = True

    def init_engine(self) -> None:
        # One engine per manager (a scheduler process has one manager per role); it stops
        # with teardown().
        self.engine = KvtEngine(self.local_ip, getattr(self.kv_args, "ib_device", None) or None)
        self._page_tables: Dict[Tuple, np.ndarray] = {}
        #: Chunks moved by one paged call, and by the Mooncake fallback path.
        self.paged_chunks = 0
        self.fallback_chunks = 0

    def teardown(self) -> None:
        super().teardown()
        self.engine.close()

    def transfer_worker(self, queue, executor, *args, **kwargs):
        # SGLang's worker, told which room each chunk (and the work it hands its executor)
        # belongs to, so the engine meters the room's batches.
        current = self.engine.current
        return super().transfer_worker(
            _RoomQueue(queue, current), _RoomExecutor(executor, current), *args, **kwargs
        )

    def room_transfer(self, room: int) -> Optional[Tuple[int, float]]:
        """(bytes, seconds) the library reported for ``room``'s batches, forgotten here; None
        when none was metered."""
        return self.engine.meter.take(room)

    def _layer_params(self, dst_kv_ptrs: List[int], dst_layer_ids) -> Optional[List[Tuple[int, int, int]]]:
        """(source base, destination base, item_len) per buffer, paired as SGLang's Mooncake
        backend pairs them; None for layouts left to it."""
        src_ptrs = self.kv_args.kv_data_ptrs
        item_lens = self.kv_args.kv_item_lens
        src_layer_ids = self.kv_args.kv_layer_ids
        has_layer_ids = bool(src_layer_ids or dst_layer_ids)
        flat = mc._uses_flat_entry_layout(
            mla_backend=self.is_mla_backend or self.is_hybrid_mla_backend,
            force_flat=False,
            has_layer_ids=has_layer_ids,
            state_type=None,
            num_src_entries=len(src_ptrs),
            num_dst_entries=len(dst_kv_ptrs),
        )
        if flat and has_layer_ids:
            pairs = build_transfer_entry_pairs(
                src_layer_ids,
                dst_layer_ids,
                len(src_ptrs),
                len(dst_kv_ptrs),
                allow_positional_fallback=self.pp_size == 1,
            )
            return [
                (src_ptrs[i], dst_kv_ptrs[j], item_lens[i])
                for i, j in pairs
                if not is_elided_entry(item_lens[i], None, j, allow_dst_elision=False)
            ]
        if flat:
            src, dst, layers = self.get_mla_kv_ptrs_with_pp(src_ptrs, dst_kv_ptrs)
            return [
                (src[l], dst[l], item_lens[l])
                for l in range(layers)
                if not is_elided_entry(item_lens[l], None, l, allow_dst_elision=False)
            ]
        src_k, src_v, dst_k, dst_v, layers = self.get_mha_kv_ptrs_with_pp(src_ptrs, dst_kv_ptrs)
        if layers > len(dst_k):
            return None
        return [(src_k[l], dst_k[l], item_lens[l]) for l in range(layers)] + [
            (src_v[l], dst_v[l], item_lens[layers + l]) for l in range(layers)
        ]

    def _page_table(self, session: str, dst_kv_ptrs: List[int], dst_layer_ids) -> Optional[np.ndarray]:
        key = (session, tuple(dst_kv_ptrs), tuple(dst_layer_ids or ()))
        table = self._page_tables.get(key)
        if table is None:
            params = self._layer_params(dst_kv_ptrs, dst_layer_ids)
            if params is None:
                return None
            table = _Engine.page_buffers(*zip(*params)) if params else np.zeros((0, 3), dtype=np.uint64)
            self._page_tables[key] = table
        return table

    def send_kvcache(
        self,
        mooncake_session_id: str,
        prefill_kv_indices,
        dst_kv_ptrs: List[int],
        dst_kv_indices,
        executor,
        dst_layer_ids=None,
        dst_device_kv_indices=None,
        dst_kv_item_len: Optional[int] = None,
        dst_attn_tp_size: Optional[int] = None,
    ):
        paged = (
            dst_device_kv_indices is None
            and not mc.get_memory().enable_unified_memory
            and not (self.enable_custom_mem_pool and self.custom_mem_pool_type != "INTRA_NODE_NVLINK")
            and (self.max_transfer_batch_indices <= 0 or len(prefill_kv_indices) <= self.max_transfer_batch_indices)
        )
        table = self._page_table(mooncake_session_id, dst_kv_ptrs, dst_layer_ids) if paged else None
        if table is None:
            self.fallback_chunks += 1
            return super().send_kvcache(
                mooncake_session_id,
                prefill_kv_indices,
                dst_kv_ptrs,
                dst_kv_indices,
                executor,
                dst_layer_ids=dst_layer_ids,
                dst_device_kv_indices=dst_device_kv_indices,
                dst_kv_item_len=dst_kv_item_len,
                dst_attn_tp_size=dst_attn_tp_size,
            )
        self.paged_chunks += 1
        if len(table) == 0:
            return 0
        return self.engine.transfer_pages(mooncake_session_id, table, prefill_kv_indices, dst_kv_indices)


class KvtKVSender(mc.MooncakeKVSender):
    """SGLang's Mooncake sender, over :class:`KvtKVManager`, whose transfer metric comes from
    the library."""

    _moved: Optional[Tuple[int, float]] = None

    def clear(self) -> None:
        # SGLang clears a room before it reads the metric: keep the room's numbers here.
        self._moved = self.kv_mgr.room_transfer(self.bootstrap_room) or self._moved
        super().clear()

    def get_transfer_metric(self):
        """SGLang's metric with the library's numbers for this room: bytes its batches moved
        (KV pages, aux and state) and the span from its first batch's submit to its last
        batch's end. Where nothing was metered (no batch ran), SGLang's own count stays."""
        metric = super().get_transfer_metric()
        self._moved = self.kv_mgr.room_transfer(self.bootstrap_room) or self._moved
        if self._moved is not None:
            metric.transfer_total_bytes, metric.transfer_latency_s = self._moved
        return metric


class KvtKVReceiver(mc.MooncakeKVReceiver):
    """SGLang's Mooncake receiver, over :class:`KvtKVManager`."""


class KvtKVBootstrapServer(mc.MooncakeKVBootstrapServer):
    """SGLang's bootstrap server (``CommonKVBootstrapServer``), unchanged."""


__all__ = ["KVArgs", "KvtEngine", "RoomMeter", "KvtKVBootstrapServer", "KvtKVManager", "KvtKVReceiver", "KvtKVSender"]
