"""Finds, loads and declares the kvtransfer C library (``libkvtransfer.so``) through ctypes.

Discovery order (the first file that exists and loads wins):

1. ``KVTRANSFER_LIB``: a path to the library file. When set, it is the only candidate, so a
   wrong path is reported instead of silently loading some other build.
2. Next to this package's own files: the library a wheel carries
   (``libkvtransfer.cpython-<ver>-<platform>.so``, built by ``pip install ./ffi/python``),
   or a plain ``libkvtransfer.so`` put there by hand.
3. ``target/release`` then ``target/debug`` of a kvtransfer checkout (a directory whose
   ``Cargo.toml`` names the ``kvtransfer`` package), found by walking up from the current
   working directory, then from this file.

The library is loaded on first use (:func:`lib`), not at ``import kvtransfer``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from ctypes import (
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int32,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Iterable, List, Optional

#: The C ABI version these bindings were written for (``KVT_ABI_VERSION`` in kvtransfer.h).
ABI_VERSION = 1

ENV_VAR = "KVTRANSFER_LIB"

if sys.platform == "darwin":
    LIB_NAME = "libkvtransfer.dylib"
elif sys.platform == "win32":
    LIB_NAME = "kvtransfer.dll"
else:
    LIB_NAME = "libkvtransfer.so"


class LibraryNotFoundError(ImportError):
    """The C library could not be found or loaded; ``.tried`` lists every place tried."""

    def __init__(self, message: str, tried: List[str]):
        super().__init__(message)
        self.tried = tried


# ---- C structs (layouts of include/kvtransfer.h; ctypes applies the C alignment rules) ----


class EngineConfig(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("listen", c_char_p),
        ("transport", c_uint32),
        ("connections_per_peer", c_uint32),
        ("batch_timeout_ms", c_uint64),
        ("devices", c_char_p),
        ("secret", c_char_p),
        ("secret_file", c_char_p),
    ]


class Request(Structure):
    _fields_ = [
        ("op", c_uint32),
        ("remote_segment", c_uint32),
        ("local_addr", c_uint64),
        ("len", c_uint64),
        ("remote_offset", c_uint64),
    ]


class PageBuffer(Structure):
    _fields_ = [("local_addr", c_uint64), ("remote_addr", c_uint64), ("item_len", c_uint64)]


class Segment(Structure):
    _fields_ = [("id", c_uint32), ("kind", c_uint32), ("base", c_uint64), ("len", c_uint64)]


class KvBuffer(Structure):
    _fields_ = [("addr", c_uint64), ("len", c_uint64), ("item_len", c_uint64)]


class KvConfig(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("role", c_uint32),
        ("room_timeout_ms", c_uint64),
        ("buffers", POINTER(KvBuffer)),
        ("num_buffers", c_size_t),
        ("aux", POINTER(KvBuffer)),
        ("num_aux", c_size_t),
        ("abort_timeout_ms", c_uint64),
        ("connect_timeout_ms", c_uint64),
        ("heartbeat_timeout_ms", c_uint64),
        ("integrity", c_uint32),
    ]


class RoomMetricsC(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("bytes", c_uint64),
        ("slices", c_uint64),
        ("queued_to_first_write_ns", c_uint64),
        ("transfer_span_ns", c_uint64),
    ]


class BatchMetricsC(Structure):
    """``kvt_batch_metrics``: what one batch moved, and its latency (0: pending)."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("bytes_written", c_uint64),
        ("bytes_read", c_uint64),
        ("latency_ns", c_uint64),
    ]


class MetricsC(Structure):
    """``kvt_metrics``: an engine's metric totals."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("peers", c_uint32),
        ("batches_done", c_uint64),
        ("batches_failed", c_uint64),
        ("batches_timed_out", c_uint64),
        ("bytes_written", c_uint64),
        ("bytes_read", c_uint64),
        ("batch_latency_count", c_uint64),
        ("batch_latency_sum_ns", c_uint64),
        ("refused", c_uint64),
        ("rails", c_uint32),
        ("reserved", c_uint32),
        ("rail_posted_bytes", c_uint64),
        ("rail_work_requests", c_uint64),
        ("rail_errors", c_uint64),
        ("rail_moved_bytes", c_uint64),
        ("rail_rejoins", c_uint64),
        ("rooms_started", c_uint64),
        ("rooms_succeeded", c_uint64),
        ("rooms_failed", c_uint64),
        ("room_bytes", c_uint64),
        ("room_transfer_count", c_uint64),
        ("room_transfer_sum_ns", c_uint64),
    ]


# ---- constants -----------------------------------------------------------------------------

TRANSPORT_AUTO, TRANSPORT_TCP, TRANSPORT_RDMA = 0, 1, 2
OP_WRITE, OP_READ = 0, 1
MEMORY_HOST, MEMORY_GPU = 0, 1
BATCH_PENDING, BATCH_DONE, BATCH_FAILED = 0, 1, 2
ROLE_PREFILL, ROLE_DECODE = 0, 1

# Opaque handles travel as void pointers.
_H = c_void_p
_I32 = c_int32
_PU32 = POINTER(c_uint32)
_PU64 = POINTER(c_uint64)
_PI32 = POINTER(c_int32)
_PH = POINTER(c_void_p)

#: name -> (restype, argtypes), for every function of include/kvtransfer.h.
SIGNATURES = {
    "kvt_abi_version": (c_uint32, []),
    "kvt_last_error_message": (c_char_p, []),
    "kvt_init_logging": (_I32, [c_char_p]),
    # engine
    "kvt_engine_create": (_I32, [POINTER(EngineConfig), _PH]),
    "kvt_engine_destroy": (_I32, [_H]),
    "kvt_engine_local_addr": (_I32, [_H, POINTER(c_char), c_size_t]),
    "kvt_engine_transport": (_I32, [_H, POINTER(c_char), c_size_t]),
    "kvt_engine_register": (_I32, [_H, c_uint64, c_uint64, _PU32]),
    "kvt_engine_register_device": (_I32, [_H, c_uint64, c_uint64, _PU32]),
    "kvt_engine_unregister": (_I32, [_H, c_uint32]),
    "kvt_engine_connect": (_I32, [_H, c_char_p, _PU64]),
    "kvt_engine_disconnect": (_I32, [_H, c_uint64]),
    "kvt_engine_resolve_remote": (_I32, [_H, c_uint64, c_uint64, c_uint64, _PU32, _PU64]),
    "kvt_engine_remote_segments": (_I32, [_H, c_uint64, c_bool, POINTER(Segment), c_size_t, POINTER(c_size_t)]),
    "kvt_engine_probe": (_I32, [_H, c_char_p, c_uint64, _PU64, _PU64]),
    "kvt_local_topology": (_I32, [c_char_p, POINTER(c_char), c_size_t]),
    # batches
    "kvt_batch_submit": (_I32, [_H, c_uint64, POINTER(Request), c_size_t, c_uint64, _PU64]),
    "kvt_batch_poll": (_I32, [_H, c_uint64, _PI32]),
    "kvt_batch_wait": (_I32, [_H, c_uint64]),
    "kvt_batch_release": (_I32, [_H, c_uint64]),
    "kvt_batch_get_metrics": (_I32, [_H, c_uint64, POINTER(BatchMetricsC)]),
    "kvt_batch_wait_metrics": (_I32, [_H, c_uint64, POINTER(BatchMetricsC)]),
    "kvt_transfer_sync": (_I32, [_H, c_uint64, c_uint32, _PU64, _PU64, _PU64, c_size_t]),
    "kvt_transfer_submit": (_I32, [_H, c_uint64, c_uint32, _PU64, _PU64, _PU64, c_size_t, c_uint64, _PU64]),
    "kvt_transfer_pages": (_I32, [_H, c_uint64, c_uint32, c_void_p, c_size_t, _PI32, _PI32, c_size_t, c_uint64, _PU64]),
    "kvt_transfer_sync_write": (_I32, [_H, c_uint64, _PU64, _PU64, _PU64, c_size_t]),
    "kvt_transfer_submit_write": (_I32, [_H, c_uint64, _PU64, _PU64, _PU64, c_size_t, _PU64]),
    # KV manager
    "kvt_kv_manager_create": (_I32, [POINTER(EngineConfig), POINTER(KvConfig), _PH]),
    "kvt_kv_manager_destroy": (_I32, [_H]),
    "kvt_kv_manager_bootstrap_addr": (_I32, [_H, POINTER(c_char), c_size_t]),
    # KV sender
    "kvt_kv_sender_create": (_I32, [_H, c_uint64, _PH]),
    "kvt_kv_sender_init": (_I32, [_H, c_uint64, c_int64]),
    "kvt_kv_sender_send": (_I32, [_H, _PI32, c_size_t, c_bool]),
    "kvt_kv_sender_poll": (_I32, [_H, _PI32]),
    "kvt_kv_sender_failure_reason": (_I32, [_H, POINTER(c_char), c_size_t]),
    "kvt_kv_sender_failure": (_I32, [_H, _PI32, _PI32]),
    "kvt_kv_sender_abort": (_I32, [_H]),
    "kvt_kv_sender_metrics": (_I32, [_H, POINTER(RoomMetricsC)]),
    "kvt_kv_sender_destroy": (_I32, [_H]),
    # KV receiver
    "kvt_kv_receiver_create": (_I32, [_H, c_char_p, c_uint64, _PH]),
    "kvt_kv_receiver_init": (_I32, [_H, _PI32, c_size_t, c_int64]),
    "kvt_kv_receiver_poll": (_I32, [_H, _PI32]),
    "kvt_kv_receiver_failure_reason": (_I32, [_H, POINTER(c_char), c_size_t]),
    "kvt_kv_receiver_failure": (_I32, [_H, _PI32, _PI32]),
    "kvt_kv_receiver_abort": (_I32, [_H]),
    "kvt_kv_receiver_metrics": (_I32, [_H, POINTER(RoomMetricsC)]),
    "kvt_kv_receiver_destroy": (_I32, [_H]),
    # metrics
    "kvt_engine_metrics": (_I32, [_H, POINTER(MetricsC)]),
    "kvt_engine_metrics_text": (_I32, [_H, POINTER(c_char), c_size_t, POINTER(c_size_t)]),
    "kvt_kv_manager_metrics": (_I32, [_H, POINTER(MetricsC)]),
    "kvt_kv_manager_metrics_text": (_I32, [_H, POINTER(c_char), c_size_t, POINTER(c_size_t)]),
}


# ---- discovery -----------------------------------------------------------------------------


def _is_kvtransfer_checkout(d: Path) -> bool:
    toml = d / "Cargo.toml"
    try:
        text = toml.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    section = None
    for line in text.splitlines():
        s = line.split("#", 1)[0].strip()
        if s.startswith("["):
            section = s.replace(" ", "")
        elif section == "[package]" and s.replace(" ", "") in ('name="kvtransfer"', "name='kvtransfer'"):
            return True
    return False


def _checkouts_above(start: Path) -> Iterable[Path]:
    start = start.resolve()
    for d in [start, *start.parents]:
        if _is_kvtransfer_checkout(d):
            yield d


def candidates(
    env: Optional[dict] = None,
    cwd: Optional[Path] = None,
    package_dir: Optional[Path] = None,
) -> List[Path]:
    """Every path tried, in order (pure: the arguments default to this process's values)."""
    env = os.environ if env is None else env
    explicit = env.get(ENV_VAR)
    if explicit:
        return [Path(explicit)]
    cwd = Path.cwd() if cwd is None else Path(cwd)
    package_dir = Path(__file__).resolve().parent if package_dir is None else Path(package_dir)
    # A wheel carries the library as an extension-named file (setuptools-rust names it
    # libkvtransfer.cpython-<ver>-<platform>.so); a hand-made install may use the plain name.
    out: List[Path] = [package_dir / LIB_NAME]
    stem, suffix = LIB_NAME.rsplit(".", 1)
    out += sorted(p for p in package_dir.glob(f"{stem}.*.{suffix}") if p not in out)
    for start in (cwd, package_dir):
        for checkout in _checkouts_above(start):
            for profile in ("release", "debug"):
                p = checkout / "target" / profile / LIB_NAME
                if p not in out:
                    out.append(p)
    return out


def _declare(dll: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in SIGNATURES.items():
        f = getattr(dll, name)  # AttributeError: the library lacks a function of the ABI
        f.restype = restype
        f.argtypes = argtypes


def load(path: Optional[os.PathLike] = None) -> ctypes.CDLL:
    """Loads the library from ``path``, or from the first discovery candidate that loads."""
    tried: List[str] = []
    paths = [Path(path)] if path is not None else candidates()
    for p in paths:
        if not p.is_file():
            tried.append(f"{p} (not found)")
            continue
        try:
            dll = ctypes.CDLL(str(p))
        except OSError as e:
            tried.append(f"{p} ({e})")
            continue
        try:
            _declare(dll)
        except AttributeError as e:
            tried.append(f"{p} (not the kvtransfer C ABI: {e})")
            continue
        version = dll.kvt_abi_version()
        if version != ABI_VERSION:
            tried.append(f"{p} (C ABI version {version}, these bindings need {ABI_VERSION})")
            continue
        dll._kvtransfer_path = str(p)
        return dll
    how = (
        f"{ENV_VAR} is set, so only that path was tried"
        if path is None and os.environ.get(ENV_VAR)
        else f"set {ENV_VAR} to the library file, or build it with `cargo build --release --lib`"
    )
    raise LibraryNotFoundError(
        f"kvtransfer: cannot load {LIB_NAME} ({how}); tried:\n  " + "\n  ".join(tried),
        tried,
    )


_lock = threading.Lock()
_dll: Optional[ctypes.CDLL] = None


def lib() -> ctypes.CDLL:
    """The loaded library (loaded once, on first call)."""
    global _dll
    if _dll is None:
        with _lock:
            if _dll is None:
                _dll = load()
    return _dll


def loaded_path() -> str:
    """The file the library was loaded from (loads it if needed)."""
    return lib()._kvtransfer_path
