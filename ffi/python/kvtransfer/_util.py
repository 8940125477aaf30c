"""Conversions shared by the engine and KV bindings."""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char, c_int32, c_uint64, create_string_buffer
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from . import _lib
from .errors import ErrorCode, KVTransferError, check

_TRANSPORTS = {"auto": _lib.TRANSPORT_AUTO, "tcp": _lib.TRANSPORT_TCP, "rdma": _lib.TRANSPORT_RDMA}
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def transport_code(transport: Union[str, int, None]) -> int:
    if transport is None:
        return _lib.TRANSPORT_AUTO
    if isinstance(transport, str):
        try:
            return _TRANSPORTS[transport.strip().lower()]
        except KeyError:
            raise ValueError(f"transport must be 'auto', 'tcp' or 'rdma', not {transport!r}") from None
    if int(transport) in _TRANSPORTS.values():
        return int(transport)
    raise ValueError(f"transport must be 'auto', 'tcp' or 'rdma', not {transport!r}")


def engine_config(
    listen: Optional[str] = None,
    transport: Union[str, int, None] = "auto",
    connections_per_peer: int = 0,
    batch_timeout_ms: int = 0,
    devices: Union[str, list, tuple, None] = None,
    secret: Union[str, bytes, None] = None,
    secret_file: Optional[str] = None,
) -> _lib.EngineConfig:
    """A ``kvt_engine_config``; zero/None fields take the library's defaults (and KVT_* env).
    ``secret`` (at least 16 bytes) or ``secret_file`` is the cluster secret peers must share."""
    if devices is not None and not isinstance(devices, str):
        devices = ",".join(devices)
    if connections_per_peer < 0 or batch_timeout_ms < 0:
        raise ValueError("connections_per_peer and batch_timeout_ms must be >= 0")
    cfg = _lib.EngineConfig()
    cfg.struct_size = ctypes.sizeof(_lib.EngineConfig)
    # ctypes keeps the encoded bytes alive as long as the struct.
    cfg.listen = listen.encode() if listen else None
    cfg.transport = transport_code(transport)
    cfg.connections_per_peer = connections_per_peer
    cfg.batch_timeout_ms = batch_timeout_ms
    cfg.devices = devices.encode() if devices else None
    if isinstance(secret, str):
        secret = secret.encode()
    if secret is not None and b"\0" in secret:
        raise ValueError("secret must not contain NUL bytes")
    cfg.secret = secret or None
    cfg.secret_file = secret_file.encode() if secret_file else None
    return cfg


def read_string(fn: Callable[..., int], handle: Any, cap: int = 64, room: Optional[int] = None) -> str:
    """Calls ``fn(handle, buf, cap)``, growing ``buf`` while the library says it is too small."""
    while True:
        buf = create_string_buffer(cap)
        status = fn(handle, ctypes.cast(buf, POINTER(c_char)), cap)
        if status == -ErrorCode.InvalidArgument and cap < (1 << 20):
            cap *= 4
            continue
        check(status, room)
        return buf.value.decode("utf-8", errors="replace")


def read_metrics(fn: Callable[..., int], handle: Any) -> Dict[str, int]:
    """Calls ``fn(handle, &kvt_metrics)``: the totals as a dict (``struct_size`` and
    ``reserved`` left out)."""
    m = _lib.MetricsC()
    m.struct_size = ctypes.sizeof(_lib.MetricsC)
    check(fn(handle, ctypes.byref(m)))
    return {name: getattr(m, name) for name, _ in _lib.MetricsC._fields_ if name not in ("struct_size", "reserved")}


def read_text(fn: Callable[..., int], handle: Any) -> str:
    """Calls ``fn(handle, buf, cap, &len)``: asks the size first, then reads with room to
    spare (series may appear in between), again if that was not enough."""
    need = ctypes.c_size_t()
    check(fn(handle, None, 0, ctypes.byref(need)))
    cap = need.value + 4096
    while True:
        buf = create_string_buffer(cap)
        status = fn(handle, ctypes.cast(buf, POINTER(c_char)), cap, ctypes.byref(need))
        if status == -ErrorCode.InvalidArgument and cap < (64 << 20):
            cap *= 2
            continue
        check(status)
        return buf.raw[: need.value].decode("utf-8", errors="replace")


def address_of(obj: Any, length: Optional[int] = None) -> Tuple[int, int, Any]:
    """``(address, length, owner)`` of memory: an int address (``length`` required), a numpy
    array (C-contiguous), a ctypes object, or a writable buffer (bytearray, memoryview).
    ``owner`` is what must stay referenced for the memory to stay valid."""
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        if length is None:
            raise TypeError("an int address needs a length")
        return int(obj), int(length), None
    if hasattr(obj, "__array_interface__"):
        arr = np.asarray(obj)
        if not arr.flags.c_contiguous:
            raise ValueError("array memory must be C-contiguous")
        addr, size = arr.__array_interface__["data"][0], arr.nbytes
        owner: Any = obj
    elif isinstance(obj, ctypes._SimpleCData) or isinstance(obj, (ctypes.Array, ctypes.Structure, ctypes.Union)):
        addr, size, owner = ctypes.addressof(obj), ctypes.sizeof(obj), obj
    else:
        # Any writable buffer; the c_char array holds the buffer export (so a bytearray
        # cannot be resized while we keep it).
        view = memoryview(obj)
        if view.readonly or not view.c_contiguous:
            raise TypeError("memory must be writable and contiguous")
        size = view.nbytes
        owner = (c_char * size).from_buffer(obj) if size else obj
        addr = ctypes.addressof(owner) if size else 0
    if length is None:
        length = size
    elif length > size:
        raise ValueError(f"length {length} is larger than the object ({size} bytes)")
    return addr, int(length), owner


def u64_array(values: Any, what: str) -> np.ndarray:
    """A C-contiguous uint64 array of ``values`` (ints >= 0), with no silent wrap-around."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        if values.ndim != 1:
            raise ValueError(f"{what} must be one-dimensional")
        if values.dtype.kind == "i" and values.size and values.min() < 0:
            raise ValueError(f"{what} must not be negative")
        return np.ascontiguousarray(values, dtype=np.uint64)
    out = []
    for v in values:
        v = int(v)
        if not 0 <= v < 2**64:
            raise ValueError(f"{what}: {v} is not a 64-bit unsigned value")
        out.append(v)
    return np.array(out, dtype=np.uint64)


def u64_ptr(arr: np.ndarray):
    return arr.ctypes.data_as(POINTER(c_uint64))


def as_pages(indices: Any) -> Tuple[Any, int, np.ndarray]:
    """``(int32 pointer, count, array)`` for page indices.

    A 1-D, C-contiguous, aligned numpy int32 array is passed as it is (no copy); anything
    else (lists, other integer dtypes, strided views) is converted to one. The array must stay
    referenced until the C call returns (the library copies the indices it needs)."""
    if not (
        isinstance(indices, np.ndarray)
        and indices.dtype == np.int32
        and indices.ndim == 1
        and indices.flags.c_contiguous
        and indices.flags.aligned
    ):
        a = np.asarray(indices)
        if a.ndim != 1:
            raise ValueError(f"page indices must be one-dimensional, not of shape {a.shape}")
        if a.size == 0:
            a = np.empty(0, dtype=np.int32)
        elif a.dtype.kind not in "iu":
            raise TypeError(f"page indices must be integers, not {a.dtype}")
        else:
            lo, hi = int(a.min()), int(a.max())
            if lo < _I32_MIN or hi > _I32_MAX:
                bad = lo if lo < _I32_MIN else hi
                raise KVTransferError(ErrorCode.InvalidPages, f"page index {bad} does not fit in int32")
        indices = np.ascontiguousarray(a, dtype=np.int32)
    return indices.ctypes.data_as(POINTER(c_int32)), int(indices.shape[0]), indices


def closed_error(what: str) -> KVTransferError:
    return KVTransferError(ErrorCode.Shutdown, f"{what} is closed")



class Handle:
    """Base of the classes that own a library handle in ``self._handle``: context manager
    (``with`` closes it) and a best-effort ``close()`` at garbage collection."""

    _handle: Any = None

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_handle", None) is not None:
                self.close()
        except Exception:
            pass
