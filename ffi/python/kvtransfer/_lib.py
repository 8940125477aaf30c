"""Loads the kvtransfer shared library and declares the C ABI (include/kvtransfer.h)."""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, c_bool, c_char_p, c_int32, c_int64, c_size_t, c_uint32, c_uint64, c_void_p
from pathlib import Path

LIB_NAME = "libkvtransfer.so"
ABI_VERSION = 1


class EngineConfig(ctypes.Structure):
    """`kvt_engine_config`."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("listen", c_char_p),
        ("transport", c_uint32),
        ("connections_per_peer", c_uint32),
        ("batch_timeout_ms", c_uint64),
        ("devices", c_char_p),
    ]


class Request(ctypes.Structure):
    """`kvt_request`."""

    _fields_ = [
        ("op", c_uint32),
        ("remote_segment", c_uint32),
        ("local_addr", c_uint64),
        ("len", c_uint64),
        ("remote_offset", c_uint64),
    ]


class KvBuffer(ctypes.Structure):
    """`kvt_kv_buffer`."""

    _fields_ = [("addr", c_uint64), ("len", c_uint64), ("item_len", c_uint64)]


class KvConfig(ctypes.Structure):
    """`kvt_kv_config`."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("role", c_uint32),
        ("room_timeout_ms", c_uint64),
        ("buffers", POINTER(KvBuffer)),
        ("num_buffers", c_size_t),
        ("aux", POINTER(KvBuffer)),
        ("num_aux", c_size_t),
    ]


class RoomMetrics(ctypes.Structure):
    """`kvt_room_metrics`."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("bytes", c_uint64),
        ("slices", c_uint64),
        ("queued_to_first_write_ns", c_uint64),
        ("transfer_span_ns", c_uint64),
    ]


_P = c_void_p
_PROTOTYPES = {
    "kvt_abi_version": (c_uint32, []),
    "kvt_last_error_message": (c_char_p, []),
    "kvt_engine_create": (c_int32, [POINTER(EngineConfig), POINTER(_P)]),
    "kvt_engine_destroy": (c_int32, [_P]),
    "kvt_engine_local_addr": (c_int32, [_P, c_char_p, c_size_t]),
    "kvt_engine_transport": (c_int32, [_P, c_char_p, c_size_t]),
    "kvt_engine_register": (c_int32, [_P, c_uint64, c_uint64, POINTER(c_uint32)]),
    "kvt_engine_unregister": (c_int32, [_P, c_uint32]),
    "kvt_engine_connect": (c_int32, [_P, c_char_p, POINTER(c_uint64)]),
    "kvt_engine_resolve_remote": (
        c_int32,
        [_P, c_uint64, c_uint64, c_uint64, POINTER(c_uint32), POINTER(c_uint64)],
    ),
    "kvt_batch_submit": (c_int32, [_P, c_uint64, POINTER(Request), c_size_t, c_uint64, POINTER(c_uint64)]),
    "kvt_batch_poll": (c_int32, [_P, c_uint64, POINTER(c_int32)]),
    "kvt_batch_wait": (c_int32, [_P, c_uint64]),
    "kvt_batch_release": (c_int32, [_P, c_uint64]),
    "kvt_transfer_sync_write": (
        c_int32,
        [_P, c_uint64, POINTER(c_uint64), POINTER(c_uint64), POINTER(c_uint64), c_size_t],
    ),
    "kvt_transfer_submit_write": (
        c_int32,
        [_P, c_uint64, POINTER(c_uint64), POINTER(c_uint64), POINTER(c_uint64), c_size_t, POINTER(c_uint64)],
    ),
    "kvt_kv_manager_create": (c_int32, [POINTER(EngineConfig), POINTER(KvConfig), POINTER(_P)]),
    "kvt_kv_manager_destroy": (c_int32, [_P]),
    "kvt_kv_manager_bootstrap_addr": (c_int32, [_P, c_char_p, c_size_t]),
    "kvt_kv_sender_create": (c_int32, [_P, c_uint64, POINTER(_P)]),
    "kvt_kv_sender_init": (c_int32, [_P, c_uint64, c_int64]),
    "kvt_kv_sender_send": (c_int32, [_P, POINTER(c_int32), c_size_t, c_bool]),
    "kvt_kv_sender_poll": (c_int32, [_P, POINTER(c_int32)]),
    "kvt_kv_sender_failure_reason": (c_int32, [_P, c_char_p, c_size_t]),
    "kvt_kv_sender_abort": (c_int32, [_P]),
    "kvt_kv_sender_metrics": (c_int32, [_P, POINTER(RoomMetrics)]),
    "kvt_kv_sender_destroy": (c_int32, [_P]),
    "kvt_kv_receiver_create": (c_int32, [_P, c_char_p, c_uint64, POINTER(_P)]),
    "kvt_kv_receiver_init": (c_int32, [_P, POINTER(c_int32), c_size_t, c_int64]),
    "kvt_kv_receiver_poll": (c_int32, [_P, POINTER(c_int32)]),
    "kvt_kv_receiver_failure_reason": (c_int32, [_P, c_char_p, c_size_t]),
    "kvt_kv_receiver_abort": (c_int32, [_P]),
    "kvt_kv_receiver_metrics": (c_int32, [_P, POINTER(RoomMetrics)]),
    "kvt_kv_receiver_destroy": (c_int32, [_P]),
}


def candidates() -> list[Path]:
    """Where the library is looked for, in order."""
    found: list[Path] = []
    env = os.environ.get("KVTRANSFER_LIB")
    if env:
        found.append(Path(env))
    here = Path(__file__).resolve().parent
    found.append(here / LIB_NAME)
    starts = [Path.cwd().resolve(), here]
    for start in starts:
        for d in [start, *start.parents]:
            if (d / "Cargo.toml").is_file() and (d / "target").is_dir():
                for profile in ("release", "debug"):
                    found.append(d / "target" / profile / LIB_NAME)
    seen: set[Path] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def load() -> ctypes.CDLL:
    """Loads the first library found and checks its ABI version."""
    tried = []
    for path in candidates():
        if not path.is_file():
            tried.append(f"{path} (missing)")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            tried.append(f"{path} ({e})")
            continue
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        version = lib.kvt_abi_version()
        if version != ABI_VERSION:
            raise ImportError(f"{path} speaks C ABI {version}, this package needs {ABI_VERSION}")
        lib.kvtransfer_path = str(path)
        return lib
    raise ImportError(
        f"cannot find {LIB_NAME}: set KVTRANSFER_LIB, or build it with `cargo build --release --lib`. Tried: "
        + "; ".join(tried)
    )


lib = load()
