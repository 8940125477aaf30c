"""A drop-in for Mooncake's Python ``TransferEngine`` (``mooncake.engine``), run by kvtransfer.

Code written against Mooncake's transfer engine (SGLang's and vLLM's Mooncake backends,
LMCache's Mooncake channel, checkpoint-engine) runs on kvtransfer unchanged once
:func:`install` has made ``import mooncake.engine`` give this module::

    import kvtransfer.mooncake
    kvtransfer.mooncake.install()
    from mooncake.engine import TransferEngine   # kvtransfer's

or, with no code change at all, ``KVT_MOONCAKE_COMPAT=1`` in the environment of a program that
loads the ``sglang.srt.plugins`` or ``vllm.general_plugins`` entry points (SGLang and vLLM do).

Every method keeps Mooncake's signature and return convention (0 / -1 statuses, batch ids with
0 for failure, the blocking :meth:`TransferEngine.get_batch_transfer_status`); failures are
logged on the ``kvtransfer.mooncake`` logger and their reason kept in ``last_error``.
Differences, each deliberate:

- Peer-to-peer only: ``metadata_server`` must be ``"P2PHANDSHAKE"``; an etcd, redis or http
  URL fails ``initialize`` with a message saying so.
- ``protocol`` is ``"tcp"`` or ``"rdma"`` (``MC_FORCE_TCP=1`` forces TCP).
- :class:`TransferNotify` is refused (-1): kvtransfer's in-band notifications carry tags, not
  Mooncake's name/message strings, and dropping a notification silently would be worse.
- ``get_engine`` / ``get_engine_ptr`` raise: Mooncake Store and ``mooncake.pg`` need
  Mooncake's own C++ engine object.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import mmap
import os
import socket
import sys
import threading
import types
from ctypes import byref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import _lib
from .engine import BATCH_DONE, BATCH_FAILED, OP_READ, OP_WRITE, BatchMetrics, _batch_metrics_out
from .engine import TransferEngine as _Engine
from .errors import ErrorCode, KVTransferError

log = logging.getLogger("kvtransfer.mooncake")

#: Build flags Mooncake's module exports. CUDA memory is supported whenever a driver is
#: present (kvtransfer loads CUDA at run time); the rest are other vendors' fabrics.
SUPPORT_CUDA = True
SUPPORT_HIP = False
SUPPORT_MUSA = False
SUPPORT_EFA = False
SUPPORT_INTRA_NVLINK = False

#: The switch that makes the entry points install this module as ``mooncake.engine``.
COMPAT_ENV = "KVT_MOONCAKE_COMPAT"

# Errors that come from the caller's arguments: the session to the peer stays usable.
_CALLER_ERRORS = {
    ErrorCode.InvalidArgument,
    ErrorCode.ZeroLength,
    ErrorCode.UnregisteredAddress,
    ErrorCode.UnknownSegment,
    ErrorCode.RemoteOutOfRange,
    ErrorCode.RemoteUnregistered,
}


class TransferOpcode(enum.IntEnum):
    """Direction of a transfer, as Mooncake numbers it."""

    Read = 0
    Write = 1


class TransferNotify:
    """Mooncake's notification (name, message). Accepted in signatures; see the module docs."""

    def __init__(self, name: str = "", msg: str = ""):
        self.name = name
        self.msg = msg

    def __repr__(self) -> str:
        return f"TransferNotify(name={self.name!r}, msg={self.msg!r})"


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _split_host(hostname: str) -> Tuple[str, int]:
    """``(host, port)`` of ``"host"``, ``"host:port"`` or ``"[v6]:port"`` (port 0: any)."""
    h = hostname.strip()
    if h.startswith("["):
        host, _, rest = h[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 0
    if h.count(":") == 1:
        host, port = h.split(":")
        return host, int(port)
    return h, 0


class TransferEngine:
    """Mooncake's ``TransferEngine`` API over one kvtransfer engine.

    Thread-safe: SGLang's transfer workers call the sync transfers from several threads.
    Sessions (``"ip:port"`` of a peer's :meth:`get_rpc_port`) are opened on first use and
    reopened after the peer is lost, so a restarted peer is reached again by a later call.
    """

    TransferOpcode = TransferOpcode

    def __init__(self) -> None:
        self._engine: Optional[_Engine] = None
        self._session_name = ""
        self._lock = threading.RLock()
        self._sessions: Dict[str, int] = {}
        self._registered: Dict[int, int] = {}  # address -> segment, in registration order
        self._managed: Dict[int, Tuple[mmap.mmap, ctypes.Array]] = {}
        self._notifies: List[TransferNotify] = []
        seconds = int(os.environ.get("MC_TRANSFER_TIMEOUT", "30") or 30)
        self._timeout_ns = max(5, seconds) * 1_000_000_000
        #: The reason of the last failed call ("" if none).
        self.last_error = ""

    # ---- set-up ----------------------------------------------------------------------------

    def _fail(self, message: str, ret: int = -1) -> int:
        self.last_error = message
        log.error("%s", message)
        return ret

    def initialize(self, local_hostname: str, metadata_server: str, protocol: str, device_name: str) -> int:
        """Starts the engine listening on ``local_hostname`` (``"ip"`` or ``"ip:port"``);
        0 on success, -1 (the reason logged and in ``last_error``) otherwise."""
        if self._engine is not None:
            return self._fail("kvtransfer.mooncake: initialize called twice")
        if (metadata_server or "").strip().upper() != "P2PHANDSHAKE":
            return self._fail(
                f"kvtransfer.mooncake: metadata server {metadata_server!r} is not supported: kvtransfer is "
                "peer-to-peer and needs none; pass 'P2PHANDSHAKE' (sessions are then 'ip:port')"
            )
        proto = (protocol or "rdma").strip().lower()
        if _truthy(os.environ.get("MC_FORCE_TCP")):
            proto = "tcp"
        if proto not in ("tcp", "rdma", "auto"):
            return self._fail(
                f"kvtransfer.mooncake: protocol {protocol!r} is not supported (use 'tcp', 'rdma', "
                "or kvtransfer's 'auto': RDMA where both ends have it)"
            )
        try:
            host, port = _split_host(local_hostname or "127.0.0.1")
            ip = socket.gethostbyname(host) if host else "0.0.0.0"
            devices = [d.strip() for d in (device_name or "").split(",") if d.strip()] if proto != "tcp" else None
            self._engine = _Engine(
                listen=f"{ip}:{port}",
                transport=proto,
                devices=devices or None,
                batch_timeout_ms=self._timeout_ns // 1_000_000,
            )
        except (KVTransferError, OSError, ValueError) as e:
            return self._fail(f"kvtransfer.mooncake: initialize({local_hostname!r}, {proto!r}) failed: {e}")
        self._session_name = f"{host}:{self._engine.get_rpc_port()}"
        log.info("kvtransfer.mooncake: engine at %s over %s", self._session_name, self._engine.transport)
        return 0

    def initialize_ext(
        self, local_hostname: str, metadata_server: str, protocol: str, device_name: str, metadata_type: str = ""
    ) -> int:
        """:meth:`initialize` (``metadata_type`` only matters for metadata servers)."""
        return self.initialize(local_hostname, metadata_server, protocol, device_name)

    def get_rpc_port(self) -> int:
        """The handshake port; peers name this engine ``"ip:<port>"``. -1 before initialize."""
        return self._engine.get_rpc_port() if self._engine is not None else -1

    def _e(self) -> _Engine:
        if self._engine is None:
            raise KVTransferError(ErrorCode.InvalidArgument, "the engine is not initialized")
        return self._engine

    def close(self) -> None:
        """Stops the engine (kvtransfer's addition; Mooncake frees it with the object)."""
        with self._lock:
            engine, self._engine = self._engine, None
            self._sessions.clear()
            if engine is not None:
                engine.close()
            self._registered.clear()
            for addr in list(self._managed):
                self._drop_managed(addr)

    # ---- memory ----------------------------------------------------------------------------

    def register_memory(self, buffer_addr: int, capacity: int, location: str = "*") -> int:
        """Registers ``[buffer_addr, +capacity)``; host or GPU memory is told apart by the
        library (``location`` is accepted for compatibility). 0 or -1."""
        try:
            seg = self._e().register(int(buffer_addr), int(capacity))
        except (KVTransferError, ValueError, TypeError) as e:
            return self._fail(f"kvtransfer.mooncake: register_memory({int(buffer_addr):#x}, {capacity}): {e}")
        with self._lock:
            self._registered[int(buffer_addr)] = seg
        return 0

    def unregister_memory(self, buffer_addr: int) -> int:
        """Unregisters the memory registered at ``buffer_addr``. 0 or -1."""
        with self._lock:
            seg = self._registered.get(int(buffer_addr))
            if seg is None:
                return self._fail(f"kvtransfer.mooncake: nothing is registered at {int(buffer_addr):#x}")
            try:
                self._e().unregister(seg)
            except KVTransferError as e:
                return self._fail(f"kvtransfer.mooncake: unregister_memory({int(buffer_addr):#x}): {e}")
            del self._registered[int(buffer_addr)]
        return 0

    def batch_register_memory(self, buffer_addresses: Sequence[int], capacities: Sequence[int], location: str = "*") -> int:
        """Registers every ``(address, capacity)``; all or nothing. 0 or -1."""
        if len(buffer_addresses) != len(capacities):
            return self._fail("kvtransfer.mooncake: buffer_addresses and capacities differ in length")
        done: List[int] = []
        for addr, cap in zip(buffer_addresses, capacities):
            if self.register_memory(addr, cap, location) != 0:
                for a in done:
                    self.unregister_memory(a)
                return -1
            done.append(int(addr))
        return 0

    def batch_unregister_memory(self, buffer_addresses: Sequence[int]) -> int:
        """Unregisters each address; -1 if any failed (the others are still unregistered)."""
        ret = 0
        for addr in buffer_addresses:
            ret = -1 if self.unregister_memory(addr) != 0 else ret
        return ret

    def allocate_managed_buffer(self, length: int) -> int:
        """Allocates and registers ``length`` page-aligned zeroed bytes; their address, or 0."""
        try:
            m = mmap.mmap(-1, int(length))
            view = (ctypes.c_char * int(length)).from_buffer(m)
        except (OSError, ValueError, OverflowError) as e:
            return self._fail(f"kvtransfer.mooncake: allocate_managed_buffer({length}): {e}", 0)
        addr = ctypes.addressof(view)
        with self._lock:
            self._managed[addr] = (m, view)
        if self.register_memory(addr, int(length)) != 0:
            self._drop_managed(addr)
            return 0
        return addr

    def _drop_managed(self, addr: int) -> None:
        m, view = self._managed.pop(addr)
        del view  # the export must go before the map can close
        m.close()

    def free_managed_buffer(self, buffer_addr: int, length: int) -> int:
        """Unregisters and frees a buffer of :meth:`allocate_managed_buffer`. 0 or -1."""
        with self._lock:
            if int(buffer_addr) not in self._managed:
                return self._fail(f"kvtransfer.mooncake: {int(buffer_addr):#x} is no managed buffer")
            if self.unregister_memory(buffer_addr) != 0:
                return -1
            self._drop_managed(int(buffer_addr))
        return 0

    @staticmethod
    def write_bytes_to_buffer(dest_address: int, src: bytes, length: int) -> int:
        """Copies the first ``length`` bytes of ``src`` to ``dest_address``. 0, or -1 when
        ``src`` is shorter."""
        if length < 0 or length > len(src):
            return -1
        ctypes.memmove(int(dest_address), src, int(length))
        return 0

    @staticmethod
    def read_bytes_from_buffer(source_address: int, length: int) -> bytes:
        """``length`` bytes at ``source_address``."""
        return ctypes.string_at(int(source_address), int(length))

    # ---- sessions --------------------------------------------------------------------------

    def _session(self, target: str) -> int:
        with self._lock:
            peer = self._sessions.get(target)
            if peer is None:
                peer = self._e().connect(target)
                self._sessions[target] = peer
            return peer

    def _forget(self, target: str, peer: int) -> None:
        with self._lock:
            if self._sessions.get(target) == peer:
                del self._sessions[target]
                try:
                    self._e().disconnect(peer)
                except KVTransferError:
                    pass

    def _submit(self, target: str, op: int, buffers, peer_addresses, lengths) -> int:
        """Submits one batch (reconnecting once if the session was lost before anything
        moved) and returns its id; raises :class:`KVTransferError` when it is refused."""
        if not len(buffers) == len(peer_addresses) == len(lengths):
            raise KVTransferError(
                ErrorCode.InvalidArgument,
                f"buffers, peer_buffer_addresses and lengths differ in length "
                f"({len(buffers)}, {len(peer_addresses)}, {len(lengths)})",
            )
        timeout_ms = (self._timeout_ns + sum(int(n) for n in lengths)) // 1_000_000
        for attempt in (0, 1):
            peer = self._session(target)
            try:
                return self._e().submit(peer, op, buffers, peer_addresses, lengths, timeout_ms)
            except KVTransferError as e:
                if e.code in _CALLER_ERRORS:
                    raise
                self._forget(target, peer)
                if attempt == 1 or e.code != ErrorCode.PeerLost:
                    raise
        raise AssertionError("unreachable")

    def _wait(self, target: str, batch: int, on_done: Optional[Callable[[BatchMetrics], None]] = None) -> int:
        engine = self._e()
        if on_done is None:
            if engine._lib.kvt_batch_wait(engine._h(), batch) == 0:
                return 0
        else:
            m = _batch_metrics_out()
            if engine._lib.kvt_batch_wait_metrics(engine._h(), batch, byref(m)) == 0:
                on_done(BatchMetrics._from(m))
                return 0
        reason = _lib.lib().kvt_last_error_message().decode("utf-8", "replace")
        # The peer may be gone (a restart): the next call opens a fresh session.
        with self._lock:
            peer = self._sessions.get(target)
        if peer is not None:
            self._forget(target, peer)
        return self._fail(f"kvtransfer.mooncake: transfer to {target} failed: {reason}")

    # ---- transfers -------------------------------------------------------------------------

    def _sync(self, target: str, op: int, buffers, peer_addresses, lengths, notify=None, on_done=None) -> int:
        if notify is not None:
            return self._fail("kvtransfer.mooncake: TransferNotify is not supported (see the module docs)")
        try:
            if len(buffers) == 0 and len(buffers) == len(peer_addresses) == len(lengths):
                return 0
            batch = self._submit(target, op, buffers, peer_addresses, lengths)
        except (KVTransferError, ValueError, TypeError) as e:
            return self._fail(f"kvtransfer.mooncake: transfer to {target} refused: {e}")
        return self._wait(target, batch, on_done)

    def transfer_sync_write(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int, transport_hint: str = "") -> int:
        """Writes ``length`` bytes at local ``buffer`` to the peer's ``peer_buffer_address``
        and waits. 0 or -1."""
        return self._sync(target_hostname, OP_WRITE, [buffer], [peer_buffer_address], [length])

    def transfer_sync_read(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int, transport_hint: str = "") -> int:
        """Reads ``length`` bytes at the peer's ``peer_buffer_address`` into local ``buffer``
        and waits. 0 or -1."""
        return self._sync(target_hostname, OP_READ, [buffer], [peer_buffer_address], [length])

    def batch_transfer_sync_write(
        self,
        target_hostname: str,
        buffers,
        peer_buffer_addresses,
        lengths,
        transport_hint: str = "",
        *,
        on_done: Optional[Callable[[BatchMetrics], None]] = None,
    ) -> int:
        """Writes every ``(buffer, peer address, length)`` as one batch and waits. 0 or -1
        (-1 also when the three lists differ in length). ``on_done`` (kvtransfer's addition)
        is called with the batch's :class:`~kvtransfer.BatchMetrics` when it is done."""
        return self._sync(target_hostname, OP_WRITE, buffers, peer_buffer_addresses, lengths, on_done=on_done)

    def batch_transfer_sync_read(self, target_hostname: str, buffers, peer_buffer_addresses, lengths, transport_hint: str = "") -> int:
        """Reads every ``(buffer, peer address, length)`` as one batch and waits. 0 or -1."""
        return self._sync(target_hostname, OP_READ, buffers, peer_buffer_addresses, lengths)

    def transfer_sync(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int, opcode: TransferOpcode, notify: Optional[TransferNotify] = None, transport_hint: str = "") -> int:
        """One transfer in direction ``opcode``. 0 or -1."""
        op = OP_WRITE if int(opcode) == TransferOpcode.Write else OP_READ
        return self._sync(target_hostname, op, [buffer], [peer_buffer_address], [length], notify)

    def batch_transfer_sync(self, target_hostname: str, buffers, peer_buffer_addresses, lengths, opcode: TransferOpcode, notify: Optional[TransferNotify] = None, transport_hint: str = "") -> int:
        """A batch in direction ``opcode``. 0 or -1."""
        op = OP_WRITE if int(opcode) == TransferOpcode.Write else OP_READ
        return self._sync(target_hostname, op, buffers, peer_buffer_addresses, lengths, notify)

    def transfer_sync_pages(
        self,
        target_hostname: str,
        buffers,
        local_pages,
        remote_pages,
        opcode: TransferOpcode = TransferOpcode.Write,
        on_done: Optional[Callable[[BatchMetrics], None]] = None,
    ) -> int:
        """kvtransfer's addition: moves page ``local_pages[i]`` of every buffer here and page
        ``remote_pages[i]`` of the same buffer at the peer, for every ``i``, as one batch, and
        waits; ``buffers`` is a ``(local base, peer base, item_len)`` table
        (:meth:`kvtransfer.TransferEngine.page_buffers`). The library groups pages into runs,
        so no address list is built in Python. ``on_done`` is called with the batch's
        :class:`~kvtransfer.BatchMetrics` (bytes it moved, its latency) when it is done.
        0 or -1."""
        op = OP_WRITE if int(opcode) == TransferOpcode.Write else OP_READ
        if len(local_pages) == 0 and len(remote_pages) == 0:
            return 0
        try:
            peer = self._session(target_hostname)
            try:
                batch = self._e().submit_pages(peer, op, buffers, local_pages, remote_pages)
            except KVTransferError as e:
                if e.code in _CALLER_ERRORS:
                    raise
                self._forget(target_hostname, peer)
                if e.code != ErrorCode.PeerLost:
                    raise
                batch = self._e().submit_pages(self._session(target_hostname), op, buffers, local_pages, remote_pages)
        except (KVTransferError, ValueError, TypeError) as e:
            return self._fail(f"kvtransfer.mooncake: paged transfer to {target_hostname} refused: {e}")
        return self._wait(target_hostname, batch, on_done)

    def _async(self, target: str, op: int, buffers, peer_addresses, lengths) -> int:
        try:
            return self._submit(target, op, buffers, peer_addresses, lengths)
        except (KVTransferError, ValueError, TypeError) as e:
            return self._fail(f"kvtransfer.mooncake: transfer to {target} refused: {e}", 0)

    def batch_transfer_async_write(self, target_hostname: str, buffers, peer_buffer_addresses, lengths, transport_hint: str = "") -> int:
        """Submits the writes as one batch: its id (non-zero), or 0 when refused."""
        return self._async(target_hostname, OP_WRITE, buffers, peer_buffer_addresses, lengths)

    def batch_transfer_async_read(self, target_hostname: str, buffers, peer_buffer_addresses, lengths, transport_hint: str = "") -> int:
        """Submits the reads as one batch: its id (non-zero), or 0 when refused."""
        return self._async(target_hostname, OP_READ, buffers, peer_buffer_addresses, lengths)

    def batch_transfer_async(self, target_hostname: str, buffers, peer_buffer_addresses, lengths, opcode: TransferOpcode, transport_hint: str = "") -> int:
        """Submits a batch in direction ``opcode``: its id, or 0."""
        op = OP_WRITE if int(opcode) == TransferOpcode.Write else OP_READ
        return self._async(target_hostname, op, buffers, peer_buffer_addresses, lengths)

    def transfer_submit_write(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int, transport_hint: str = "") -> int:
        """Submits one write: its batch id, or 0."""
        return self._async(target_hostname, OP_WRITE, [buffer], [peer_buffer_address], [length])

    def get_batch_transfer_status(self, batch_ids: Sequence[int]) -> int:
        """BLOCKS until every batch is final, then frees them: 0 if all succeeded, -1 if any
        failed, timed out or is unknown (as Mooncake)."""
        ret = 0
        engine = self._e()
        for batch in batch_ids:
            if engine._lib.kvt_batch_wait(engine._h(), int(batch)) != 0:
                reason = _lib.lib().kvt_last_error_message().decode("utf-8", "replace")
                ret = self._fail(f"kvtransfer.mooncake: batch {int(batch)}: {reason}")
        return ret

    def transfer_check_status(self, batch_id: int) -> int:
        """Never blocks: 1 done, 0 in progress, -1 failed (or unknown), -2 timed out. A done or
        failed batch is freed; a timed-out one is freed too (kvtransfer has failed it)."""
        engine = self._e()
        try:
            status = engine.get_batch_transfer_status(int(batch_id))
        except KVTransferError as e:
            return self._fail(f"kvtransfer.mooncake: batch {int(batch_id)}: {e}")
        if status == BATCH_DONE:
            engine.release(int(batch_id))
            return 1
        if status == BATCH_FAILED:
            engine.release(int(batch_id))
            timed_out = "deadline" in engine.last_error
            return self._fail(f"kvtransfer.mooncake: batch {int(batch_id)}: {engine.last_error}", -2 if timed_out else -1)
        return 0

    # ---- peers and the host ----------------------------------------------------------------

    def send_probe(self, peer_server_name: str) -> int:
        """0 when an engine answers at ``peer_server_name`` (``"ip:port"``), -1 otherwise.
        Opens no session and changes nothing on either side."""
        try:
            self._e().probe(peer_server_name)
        except (KVTransferError, ValueError) as e:
            self.last_error = f"kvtransfer.mooncake: probe of {peer_server_name}: {e}"
            log.info("%s", self.last_error)
            return -1
        return 0

    def get_first_buffer_address(self, segment_name: str) -> int:
        """The address of the first buffer registered in segment ``segment_name``: this
        engine's own (its session name) or a peer's (``"ip:port"``, asked now). 0 if none."""
        if self._engine is None:
            return 0
        if segment_name in ("", self._session_name):
            with self._lock:
                return next(iter(self._registered), 0)
        try:
            segments = self._engine.remote_segments(self._session(segment_name), refresh=True)
        except KVTransferError as e:
            return self._fail(f"kvtransfer.mooncake: segments of {segment_name}: {e}", 0)
        return segments[0].base if segments else 0

    def get_local_topology(self, device_name: Optional[str] = None) -> str:
        """This host's topology matrix as JSON: ``{"cpu:<node>" | "cuda:<gpu>": [[preferred
        devices], [others]]}`` over the RDMA devices (``device_name`` a comma list narrows
        them); ``"{}"`` where there is no RDMA."""
        from ._util import read_string

        dll = _lib.lib()
        devices = (device_name or "").encode()
        return read_string(lambda _h, buf, cap: dll.kvt_local_topology(devices, buf, cap), None, 4096)

    def get_notifies(self) -> List[TransferNotify]:
        """Notifications received since the last call (always empty: see the module docs)."""
        out, self._notifies = self._notifies, []
        return out

    def warmup_efa_segment(self, segment_name: str) -> int:
        """0: there is nothing to warm up outside Mooncake's EFA builds."""
        return 0

    def get_engine(self):
        """Not available: Mooncake Store and ``mooncake.pg`` need Mooncake's own engine."""
        raise NotImplementedError("kvtransfer.mooncake has no Mooncake C++ engine object to share")

    get_engine_ptr = get_engine

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---- installing as mooncake.engine ---------------------------------------------------------


def install() -> types.ModuleType:
    """Makes ``import mooncake.engine`` (and ``from mooncake.engine import TransferEngine``)
    give this module, without a package named ``mooncake`` on disk. When Mooncake's own wheel
    is installed, only its ``engine`` module is replaced (Mooncake Store and the rest stay
    Mooncake's). Idempotent; returns this module."""
    this = sys.modules[__name__]
    pkg = sys.modules.get("mooncake")
    if pkg is None:
        try:
            import mooncake as pkg  # type: ignore[no-redef]  # Mooncake's wheel, if present
        except ImportError:
            pkg = types.ModuleType("mooncake", "kvtransfer's stand-in for Mooncake's package")
            pkg.__path__ = []  # a package, so `import mooncake.engine` looks in sys.modules
            sys.modules["mooncake"] = pkg
    sys.modules["mooncake.engine"] = this
    setattr(pkg, "engine", this)
    return this


def installed() -> bool:
    """Whether ``mooncake.engine`` is this module now."""
    return sys.modules.get("mooncake.engine") is sys.modules[__name__]


def uninstall() -> None:
    """Undoes :func:`install` (for tests): drops ``mooncake.engine``, and the stand-in
    package if :func:`install` made it."""
    if installed():
        del sys.modules["mooncake.engine"]
        pkg = sys.modules.get("mooncake")
        if pkg is not None:
            if getattr(pkg, "engine", None) is sys.modules[__name__]:
                delattr(pkg, "engine")
            if getattr(pkg, "__file__", None) is None and pkg.__path__ == []:
                del sys.modules["mooncake"]


def plugin() -> None:
    """Entry point of the ``sglang.srt.plugins`` and ``vllm.general_plugins`` groups:
    installs this module as ``mooncake.engine`` when ``KVT_MOONCAKE_COMPAT=1``; otherwise
    does nothing, so an installed Mooncake keeps working."""
    if _truthy(os.environ.get(COMPAT_ENV)):
        install()
        log.info("kvtransfer.mooncake: installed as mooncake.engine (%s=1)", COMPAT_ENV)


__all__ = [
    "SUPPORT_CUDA",
    "SUPPORT_EFA",
    "SUPPORT_HIP",
    "SUPPORT_INTRA_NVLINK",
    "SUPPORT_MUSA",
    "TransferEngine",
    "TransferNotify",
    "TransferOpcode",
    "install",
    "installed",
    "plugin",
    "uninstall",
]
