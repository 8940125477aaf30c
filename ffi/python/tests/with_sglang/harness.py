"""SGLang 0.5.23's real PD-disaggregation code (Mooncake backend), driven on a CPU.

A prefill "server" and a decode "server" live in one process (the killed-peer test
runs the prefill one in a child process, see ``prefill_peer.py``). Each server has
``tp`` scheduler ranks, and every rank gets what SGLang's scheduler would give it:

- its own runtime context (``runtime_context.create_context`` of the server's
  ``ServerArgs`` with the rank's ``SpawnRanks``), made active with ``use_context``
  around every SGLang call the rank's scheduler would make;
- its own Mooncake engine (SGLang's ``MooncakeTransferEngine`` wrapper over whatever
  ``mooncake.engine.TransferEngine`` is installed, see ``install_mooncake_engine``);
- its own host-memory KV pool (numpy) and SGLang's real ``MetadataBuffers`` (aux);
- its own ``MooncakeKVManager``, obtained through ``get_kv_class`` as the schedulers do.

The prefill server also runs SGLang's ``MooncakeKVBootstrapServer``. Rooms are
driven by polling with deadlines only; a rank group's state is the MIN of its
ranks' polls, as SGLang's ``poll_and_all_reduce`` computes it over the TP group.

This module imports SGLang at the top: import it only after
``pytest.importorskip("sglang")``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import requests
import torch
from sglang.srt import runtime_context as rc
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.common.conn import KVTransferError
from sglang.srt.disaggregation.utils import (
    DisaggregationMode,
    KVClassType,
    MetadataBuffers,
    TransferBackend,
    get_kv_class,
)
from sglang.srt.distributed.device_communicators import mooncake_transfer_engine as mte
from sglang.srt.server_args import ServerArgs

HOST = "127.0.0.1"

# Which ``mooncake.engine`` SGLang gets: "kvtransfer" (kvtransfer.mooncake.install()),
# "mooncake" (a real Mooncake wheel that is installed), or a directory that holds a
# stand-in ``mooncake`` package.
ENGINE_ENV = "KVT_SGLANG_MOONCAKE"
DEFAULT_ENGINE = "kvtransfer"

# Environment SGLang reads (os.environ, at manager construction unless noted).
SGLANG_ENV = {
    # get_local_ip_auto(): every ZMQ socket, the bootstrap registration and the
    # Mooncake hostname use it.
    "SGLANG_HOST_IP": HOST,
    # MooncakeTransferEngine.initialize(): protocol passed to TransferEngine.initialize.
    "MOONCAKE_PROTOCOL": "tcp",
    # Decode heartbeat to the prefill bootstrap server's /health. SGLang clamps the
    # interval to >= 2 s and the failure count to >= 1 (common/conn.py).
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "2",
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "1",
}

POLL_NAMES = {
    KVPoll.Failed: "Failed",
    KVPoll.Bootstrapping: "Bootstrapping",
    KVPoll.WaitingForInput: "WaitingForInput",
    KVPoll.Transferring: "Transferring",
    KVPoll.Success: "Success",
}


def install_mooncake_engine(which: Optional[str] = None) -> str:
    """Makes ``from mooncake.engine import TransferEngine`` resolve to the chosen engine.

    Must run before the first ``MooncakeTransferEngine`` is built (that is where
    SGLang imports ``mooncake.engine``). Returns the choice, to hand to child processes.
    """
    which = which or os.environ.get(ENGINE_ENV) or DEFAULT_ENGINE
    if which == "kvtransfer":
        import kvtransfer.mooncake

        kvtransfer.mooncake.install()
    elif which == "mooncake":
        import mooncake.engine  # noqa: F401  (the real wheel)
    else:
        if not os.path.isdir(os.path.join(which, "mooncake")):
            raise RuntimeError(f"{ENGINE_ENV}={which!r}: no mooncake package in that directory")
        for name in [m for m in sys.modules if m == "mooncake" or m.startswith("mooncake.")]:
            del sys.modules[name]
        sys.path.insert(0, which)
        import mooncake.engine  # noqa: F401
    from mooncake.engine import TransferEngine  # noqa: F401  (fails loudly if install() did not work)

    return which


def uninstall_mooncake_engine(which: str) -> None:
    """Undoes ``install_mooncake_engine(which)`` for modules imported later (SGLang's
    engines already built keep the class they were built with)."""
    if which == "kvtransfer":
        import kvtransfer.mooncake

        kvtransfer.mooncake.uninstall()
    elif which != "mooncake":
        for name in [m for m in sys.modules if m == "mooncake" or m.startswith("mooncake.")]:
            del sys.modules[name]
        if which in sys.path:
            sys.path.remove(which)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def poll_name(state: int) -> str:
    return POLL_NAMES.get(state, str(state))


def wait_until(what: str, pred: Callable[[], bool], timeout: float) -> float:
    """Polls ``pred`` until true; returns the seconds it took, fails after ``timeout``."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------
# Layout and data


@dataclass(frozen=True)
class Layout:
    """One rank's KV pool, shrunk from a real model.

    MLA (DeepSeek-like): one buffer per layer, a page of ``page_size`` tokens of
    (kv_lora_rank 512 + rope 64) bf16 = 1152 bytes per token (DeepSeek-V3: 61
    layers, 36 KiB pages at page_size 32; here 4 layers, 4.5 KiB pages).
    MHA: K buffers of every layer then V buffers, each ``token_bytes`` per token
    (this rank's heads x head_dim x dtype).
    """

    mla: bool = True
    layers: int = 4
    page_size: int = 4
    token_bytes: int = 1152
    prefill_pages: int = 48
    decode_pages: int = 64
    aux_slots: int = 8
    hidden_size: int = 64
    kv_cache_dtype: str = "bfloat16"

    @property
    def item_len(self) -> int:
        return self.page_size * self.token_bytes

    @property
    def buffers(self) -> int:
        return self.layers if self.mla else 2 * self.layers


def pattern(seed: int, rank: int, shape: Sequence[int]) -> np.ndarray:
    """Deterministic random bytes (also computable in another process)."""
    return np.random.default_rng([seed, rank]).integers(0, 256, size=tuple(shape), dtype=np.uint8)


def pool_contents(layout: Layout, mode: str, seed: int, rank: int) -> np.ndarray:
    """A rank's KV pool at start, (buffers, pages, item_len) bytes. Prefill pools hold
    the rank's own data (distinct per rank, so a decode rank's bytes also prove which
    prefill rank it was paired with); decode pools a canary that must survive
    wherever nothing is supposed to be written."""
    pages = layout.prefill_pages if mode == "prefill" else layout.decode_pages
    salt = 1 if mode == "prefill" else 2
    return pattern(seed * 10 + salt, rank, (layout.buffers, pages, layout.item_len))


def prefill_aux_contents(seed: int, rank: int, shapes: Sequence[Sequence[int]]) -> List[np.ndarray]:
    """A prefill rank's aux (MetadataBuffers) bytes at start, one (slots, item_len) array
    per buffer."""
    return [pattern(seed * 10 + 3 + i, rank, shape) for i, shape in enumerate(shapes)]


def scattered_pages(n: int, pool: int, seed: int) -> np.ndarray:
    """``n`` distinct pages of ``pool``: runs of 1..4 consecutive pages in shuffled places,
    so SGLang's contiguous-run grouping sees both runs and single pages."""
    rng = np.random.default_rng(seed)
    used = np.zeros(pool, dtype=bool)
    out: List[int] = []
    while len(out) < n:
        start, run = int(rng.integers(pool)), int(rng.integers(1, 5))
        for p in range(start, min(start + run, pool)):
            if len(out) < n and not used[p]:
                used[p] = True
                out.append(p)
    return np.asarray(out, dtype=np.int64)


def _bytes_at(ptr: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


# ---------------------------------------------------------------------------------
# Process-wide SGLang state


def backend_of(name: str) -> TransferBackend:
    """SGLang's ``TransferBackend`` for ``--disaggregation-transfer-backend name``;
    ``kvtransfer`` is registered first (as its ``sglang.srt.plugins`` entry point does)."""
    if name == "kvtransfer":
        import kvtransfer.sglang

        kvtransfer.sglang.register()
    return TransferBackend(name)


def make_server_args(mode: str, tp: int, bootstrap_port: int, layout: Layout, backend: str = "mooncake", **extra) -> ServerArgs:
    """The ServerArgs a ``--disaggregation-mode {mode} --tp {tp}`` server would get.

    ``enable_pd_role_switch``: SGLang then receives on its ZMQ control sockets with a
    500 ms poll instead of a blocking recv (``_make_worker_recv``), which is what
    lets ``MooncakeKVManager.teardown()`` stop its threads between tests; message
    handling is the same.
    """
    fields = dict(
        model_path="dummy",
        device="cpu",
        host=HOST,
        port=free_port(),
        tp_size=tp,
        page_size=layout.page_size,
        disaggregation_mode=mode,
        disaggregation_transfer_backend=backend,
        disaggregation_bootstrap_port=bootstrap_port,
        enable_pd_role_switch=True,
    )
    fields.update(extra)
    return ServerArgs(**fields)


def ensure_process_context(server_args: ServerArgs) -> None:
    """Publishes a process-wide context if none is.

    SGLang's worker threads (transfer workers, bootstrap/decode threads) read the
    process-wide context at transfer time (``get_memory()``, ``get_parallel()``...),
    which a scheduler process publishes at start. Those reads are the same for
    prefill and decode servers built here; per-rank values come from each rank's own
    context, active during every call its scheduler makes.
    """
    if rc.get_context()._server_args is None:
        rc.publish(server_args, role="scheduler")


def reset_process_context() -> None:
    rc.reset_context()
    mte._mooncake_transfer_engine = None


class _SingleRankGroup:
    """The PP group of a pp_size 1 server (the prefill manager stores it; SGLang uses
    it only when pp_size > 1). Stands in for the GroupCoordinator that
    ``initialize_model_parallel`` would build."""

    world_size = 1
    rank_in_group = 0
    is_first_rank = True
    is_last_rank = True


# ---------------------------------------------------------------------------------
# Servers and ranks


class Rank:
    """One scheduler rank: context, Mooncake engine, KV pool, aux buffers, manager."""

    def __init__(self, server: "Server", rank: int, seed: int):
        self.server, self.rank, self.layout = server, rank, server.layout
        lay = self.layout
        self.ctx = rc.create_context(server.server_args, role="scheduler", ranks=rc.SpawnRanks(world_rank=rank))
        if server.mode == DisaggregationMode.PREFILL:
            self.ctx.parallel.override_permanently(pp_group=_SingleRankGroup())
        pages = lay.prefill_pages if server.mode == DisaggregationMode.PREFILL else lay.decode_pages
        self.kv = pool_contents(lay, server.mode.value, seed, rank)
        self.kv_before = self.kv.copy()
        with self.active():
            self.meta = MetadataBuffers(
                size=lay.aux_slots,
                hidden_size=lay.hidden_size,
                hidden_states_dtype=torch.bfloat16,
                max_sampling_mask_tokens=16,
            )
        ptrs, lens, items = self.meta.get_buf_infos()
        self.aux = [_bytes_at(p, n).reshape(n // i, i) for p, n, i in zip(ptrs, lens, items)]
        if server.mode == DisaggregationMode.PREFILL:
            for a, contents in zip(self.aux, prefill_aux_contents(seed, rank, [a.shape for a in self.aux])):
                a[:] = contents
        self.aux_before = [a.copy() for a in self.aux]

        kv_args = KVArgs()
        kv_args.engine_rank = rank % server.tp
        kv_args.pp_rank = 0
        with self.active():
            kv_args.system_dp_rank = rc.get_parallel().dp_rank
            kv_args.ib_device = rc.get_disagg().disaggregation_ib_device
            kv_args.gpu_id = rc.get_device().gpu_id
        kv_args.rust_http_port = None
        kv_args.kv_cache_dtype_str = lay.kv_cache_dtype
        kv_args.kv_layout = None
        kv_args.prefill_start_layer = 0
        kv_args.prefill_end_layer = lay.layers
        base, per_buf = self.kv.ctypes.data, pages * lay.item_len
        kv_args.kv_data_ptrs = [base + b * per_buf for b in range(lay.buffers)]
        kv_args.kv_data_lens = [per_buf] * lay.buffers
        kv_args.kv_item_lens = [lay.item_len] * lay.buffers
        kv_args.num_draft_entries = 0
        kv_args.kv_layer_ids = []  # what build_kv_layer_ids gives a plain MLA/MHA pool
        if not lay.mla:
            kv_args.kv_head_num = 2
            kv_args.total_kv_head_num = 2 * server.tp
        kv_args.page_size = lay.page_size
        kv_args.aux_data_ptrs, kv_args.aux_data_lens, kv_args.aux_item_lens = ptrs, lens, items
        # setup_state_kv_args() for a pool without extra state:
        kv_args.state_types = []
        kv_args.state_data_ptrs = []
        kv_args.state_data_lens = []
        kv_args.state_item_lens = []
        kv_args.state_dim_per_tensor = []
        kv_args.state_slice_outer_counts = []
        kv_args.state_layer_ids = []
        kv_args.is_hybrid_mla_backend = False
        kv_args.state_conv_shard_groups = []
        kv_args.swa_kv_cache_layout = None
        kv_args.mla_compression_ratios = None
        self.kv_args = kv_args

        manager_cls = get_kv_class(server.backend, KVClassType.MANAGER)
        with self.active():
            if server.backend != TransferBackend.MOONCAKE:
                # kvtransfer's native backend: the manager makes its own engine.
                self.engine = None
                self.mgr = manager_cls(kv_args, server.mode, server.server_args, lay.mla)
                return
            # One engine per rank, as one scheduler process per rank would have:
            # SGLang keeps a process-wide engine (init_mooncake_transfer_engine) that
            # MooncakeKVManager.init_engine() picks up, so point it at this rank's.
            self.engine = mte.MooncakeTransferEngine(hostname=HOST, gpu_id=rank, ib_device=None)
            previous = mte._mooncake_transfer_engine
            mte._mooncake_transfer_engine = self.engine
            try:
                self.mgr = manager_cls(kv_args, server.mode, server.server_args, lay.mla)
            finally:
                mte._mooncake_transfer_engine = previous

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with rc.use_context(self.ctx):
            yield

    def pages(self, pages: Sequence[int]) -> np.ndarray:
        return self.kv[:, np.asarray(pages, dtype=np.int64), :]

    def close(self) -> None:
        mgr = getattr(self, "mgr", None)
        if mgr is not None:
            mgr.teardown()
            self.mgr = None
        engine = getattr(getattr(self, "engine", None), "engine", None)
        close = getattr(engine, "close", None)
        if close is not None:
            close()
        self.engine = None


class Server:
    """A prefill or decode server with ``tp`` ranks (attention TP = tp)."""

    def __init__(
        self,
        mode: str,
        tp: int,
        layout: Layout,
        *,
        seed: int,
        bootstrap_port: Optional[int] = None,
        backend: str = "mooncake",
    ):
        self.mode = DisaggregationMode(mode)
        self.tp, self.layout = tp, layout
        self.backend = backend_of(backend)
        self.bootstrap_port = bootstrap_port or free_port()
        self.server_args = make_server_args(mode, tp, self.bootstrap_port, layout, backend)
        self.server_args.resolve_once()
        ensure_process_context(self.server_args)
        self.bootstrap = None
        self.ranks: List[Rank] = []
        try:
            if self.mode == DisaggregationMode.PREFILL:
                # SGLang starts it in the prefill's main process (start_disagg_service)
                # before the schedulers register to it.
                server_cls = get_kv_class(self.backend, KVClassType.BOOTSTRAP_SERVER)
                self.bootstrap = server_cls(host=HOST, port=self.bootstrap_port)
                wait_until("the bootstrap server's /health", self._bootstrap_healthy, 10)
            for r in range(tp):
                self.ranks.append(Rank(self, r, seed))
        except BaseException:
            self.close()
            raise

    @property
    def bootstrap_addr(self) -> str:
        return f"{HOST}:{self.bootstrap_port}"

    def _bootstrap_healthy(self) -> bool:
        try:
            return requests.get(f"http://{self.bootstrap_addr}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        # Each teardown waits up to one 500 ms receive poll of its threads: in parallel.
        with concurrent.futures.ThreadPoolExecutor(max(1, len(self.ranks))) as pool:
            for f in [pool.submit(r.close) for r in self.ranks]:
                f.result()
        self.ranks = []
        if self.bootstrap is not None:
            # SGLang's close() stops the loop with its cleanup task still pending;
            # cancel it first so the loop's shutdown does not warn about it.
            loop = getattr(self.bootstrap, "_loop", None)
            if loop is not None and loop.is_running():
                for task in list(self.bootstrap._background_tasks):
                    loop.call_soon_threadsafe(task.cancel)
            self.bootstrap.close()
            self.bootstrap = None


# ---------------------------------------------------------------------------------
# Rooms


class _Room:
    def __init__(self, server: Server, room: int):
        self.server, self.room = server, room
        self.parts: list = []

    def polls(self) -> List[int]:
        out = []
        for rank, part in zip(self.server.ranks, self.parts):
            with rank.active():
                out.append(int(part.poll()))
        return out

    def poll(self) -> int:
        """The TP group's state: MIN over ranks (SGLang's poll_and_all_reduce)."""
        return min(self.polls())

    def failure_reasons(self) -> List[Optional[str]]:
        return [r.mgr.failure_records.get(self.room) for r in self.server.ranks]

    def describe(self) -> str:
        return ", ".join(
            f"rank {r}: {poll_name(p)}" + (f" ({why})" if why else "")
            for r, (p, why) in enumerate(zip(self.polls(), self.failure_reasons()))
        )

    def wait(self, want: int, timeout: float) -> float:
        """Waits until every rank polls ``want``; fails at once on another final state."""

        def reached() -> bool:
            polls = self.polls()
            if all(p == want for p in polls):
                return True
            final = {KVPoll.Success, KVPoll.Failed} - {want}
            if any(p in final for p in polls):
                raise AssertionError(f"room {self.room} wanted {poll_name(want)}: {self.describe()}")
            return False

        return wait_until(f"room {self.room} {poll_name(want)} ({type(self).__name__})", reached, timeout)

    def failure_exceptions(self) -> List[KVTransferError]:
        """What the scheduler does with a Failed room: failure_exception() (which clears
        the room and raises); returns the raised errors, one per rank."""
        errors = []
        for rank, part in zip(self.server.ranks, self.parts):
            with rank.active():
                try:
                    part.failure_exception()
                except KVTransferError as e:
                    errors.append(e)
                else:
                    raise AssertionError("failure_exception() did not raise")
        return errors

    def abort(self) -> None:
        for rank, part in zip(self.server.ranks, self.parts):
            with rank.active():
                part.abort()

    def clear(self) -> None:
        for rank, part in zip(self.server.ranks, self.parts):
            with rank.active():
                part.clear()


class PrefillRoom(_Room):
    """One request on the prefill server: a MooncakeKVSender per rank."""

    def __init__(self, server: Server, room: int):
        super().__init__(server, room)
        sender_cls = get_kv_class(server.backend, KVClassType.SENDER)
        for rank in server.ranks:
            with rank.active():
                self.parts.append(
                    sender_cls(mgr=rank.mgr, bootstrap_addr=server.bootstrap_addr, bootstrap_room=room)
                )

    def init(self, num_pages: int, aux_index: int) -> None:
        """PrefillBootstrapQueue.pop_bootstrapped, once WaitingForInput."""
        for rank, sender in zip(self.server.ranks, self.parts):
            with rank.active():
                sender.pop_decode_prefix_len()
                sender.init(num_pages, aux_index)

    def send(self, pages: Sequence[int]) -> None:
        """send_kv_chunk: page indices of one chunk (the last chunk carries the aux)."""
        page_size = self.server.layout.page_size
        for rank, sender in zip(self.server.ranks, self.parts):
            with rank.active():
                if sender.should_send_kv_chunk(len(pages), False):
                    sender.send(np.asarray(pages, dtype=np.int64), None, num_kv_tokens=len(pages) * page_size)

    def set_aux(self, aux_index: int) -> None:
        """MetadataBuffers.set_buf's part that decode checks: the room in its slot."""
        for rank in self.server.ranks:
            rank.meta.bootstrap_room[aux_index, 0] = self.room


class DecodeRoom(_Room):
    """One request on the decode server: a MooncakeKVReceiver per rank, initialised
    the way the decode scheduler does (receiver, try_ensure_parallel_info, init)."""

    def __init__(self, server: Server, prefill_addr: str, room: int, timeout: float = 20):
        super().__init__(server, room)
        receiver_cls = get_kv_class(server.backend, KVClassType.RECEIVER)
        for rank in server.ranks:
            with rank.active():
                self.parts.append(receiver_cls(mgr=rank.mgr, bootstrap_addr=prefill_addr, bootstrap_room=room))

        def ready(rank: Rank) -> bool:
            with rank.active():
                return rank.mgr.try_ensure_parallel_info(prefill_addr)

        for rank in server.ranks:
            wait_until(f"prefill {prefill_addr} registered (decode rank {rank.rank})", lambda: ready(rank), timeout)
        for rank, receiver in zip(server.ranks, self.parts):
            with rank.active():
                info = rank.mgr.prefill_info_table[prefill_addr]
                receiver.init(0 if info.dp_size == 1 else room % info.dp_size)

    def send_metadata(self, pages: Sequence[int], aux_index: int) -> None:
        """_send_kv_metadata: destination pages (int32, as from_zmq reads them) and slot."""
        for rank, receiver in zip(self.server.ranks, self.parts):
            with rank.active():
                receiver.send_metadata(np.asarray(pages, dtype=np.int32), aux_index, None, decode_prefix_len=0)

    def abort_release_safe(self) -> List[bool]:
        """The decode scheduler's deferred-release test: has every prefill rank that
        could still write this room's pages acknowledged the abort?"""
        return [
            rank.mgr.is_abort_release_safe(self.room, len(receiver.bootstrap_infos))
            for rank, receiver in zip(self.server.ranks, self.parts)
        ]


# ---------------------------------------------------------------------------------
# Byte checks


def expected_pages(prefill_rank_kv: np.ndarray, src_pages: Sequence[int]) -> np.ndarray:
    return prefill_rank_kv[:, np.asarray(src_pages, dtype=np.int64), :]


def assert_pages(decode: Rank, dst_pages: Sequence[int], expected: np.ndarray, what: str) -> None:
    got = decode.pages(dst_pages)
    if not np.array_equal(got, expected):
        bad = np.argwhere((got != expected).any(axis=2))
        raise AssertionError(
            f"{what}: decode rank {decode.rank}: {len(bad)} (buffer, page) pairs differ, "
            f"first: buffer {bad[0][0]} destination page {dst_pages[bad[0][1]]}"
        )


def assert_untouched_except(decode: Rank, written: Sequence[int], aux_written: Optional[int]) -> None:
    """Every decode page outside ``written`` and every aux slot but ``aux_written``
    still holds what it held before the room."""
    keep = np.ones(decode.kv.shape[1], dtype=bool)
    keep[np.asarray(written, dtype=np.int64)] = False
    if not np.array_equal(decode.kv[:, keep], decode.kv_before[:, keep]):
        pages = np.flatnonzero(keep & (decode.kv != decode.kv_before).any(axis=(0, 2)))
        raise AssertionError(f"decode rank {decode.rank}: pages outside the destination changed: {pages.tolist()}")
    for i, (a, before) in enumerate(zip(decode.aux, decode.aux_before)):
        rows = [s for s in range(a.shape[0]) if s != aux_written]
        if not np.array_equal(a[rows], before[rows]):
            raise AssertionError(f"decode rank {decode.rank}: aux buffer {i} changed outside slot {aux_written}")


def aux_matches(decode: Rank, dst_slot: int, prefill_aux: List[np.ndarray], src_slot: int) -> bool:
    return all(np.array_equal(d[dst_slot], p[src_slot]) for d, p in zip(decode.aux, prefill_aux))


def reset_receiver_sockets() -> None:
    """CommonKVReceiver caches PUSH sockets per prefill endpoint at class level."""
    from sglang.srt.disaggregation.common.conn import CommonKVReceiver

    CommonKVReceiver.close_all_sockets()


__all__ = [
    "DEFAULT_ENGINE",
    "ENGINE_ENV",
    "HOST",
    "KVPoll",
    "KVTransferError",
    "DecodeRoom",
    "Layout",
    "PrefillRoom",
    "Rank",
    "SGLANG_ENV",
    "Server",
    "assert_pages",
    "assert_untouched_except",
    "aux_matches",
    "expected_pages",
    "free_port",
    "backend_of",
    "install_mooncake_engine",
    "uninstall_mooncake_engine",
    "pattern",
    "pool_contents",
    "prefill_aux_contents",
    "poll_name",
    "reset_process_context",
    "reset_receiver_sockets",
    "scattered_pages",
    "wait_until",
]
