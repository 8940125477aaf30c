"""Python bindings (ctypes) of kvtransfer: moves KV cache between prefill and decode servers
over RDMA or TCP.

- :class:`TransferEngine`: registered memory and Mooncake-style batched writes and reads.
- :class:`KVManager`, :class:`KVSender`, :class:`KVReceiver`, :class:`KVPoll`,
  :class:`KVArgs`: paged-KV rooms shaped like SGLang's ``disaggregation.base.conn``.

The C library ``libkvtransfer.so`` is found on first use: ``KVTRANSFER_LIB``, then next to
this package, then ``target/release`` / ``target/debug`` of a kvtransfer checkout above the
current directory or this package (see :mod:`kvtransfer._lib`).
"""

from ._lib import ABI_VERSION, LibraryNotFoundError
from ._lib import loaded_path as library_path
from ._util import address_of
from .engine import BATCH_DONE, BATCH_FAILED, BATCH_PENDING, OP_READ, OP_WRITE, BatchMetrics, SegmentInfo, TransferEngine, init_logging
from .errors import ErrorCode, FailureKind, KVTransferError, last_error_message
from .kv import (
    DisaggregationMode,
    KVArgs,
    KVManager,
    KVPoll,
    KVReceiver,
    KVSender,
    KVTransferMetric,
    RoomMetrics,
)

__version__ = "0.1.0"


def abi_version() -> int:
    """The C ABI version of the loaded library (loads it)."""
    from . import _lib

    return int(_lib.lib().kvt_abi_version())


__all__ = [
    "ABI_VERSION",
    "BATCH_DONE",
    "BATCH_FAILED",
    "BATCH_PENDING",
    "BatchMetrics",
    "DisaggregationMode",
    "ErrorCode",
    "FailureKind",
    "KVArgs",
    "KVManager",
    "KVPoll",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "KVTransferMetric",
    "LibraryNotFoundError",
    "OP_READ",
    "OP_WRITE",
    "SegmentInfo",
    "RoomMetrics",
    "TransferEngine",
    "abi_version",
    "address_of",
    "init_logging",
    "last_error_message",
    "library_path",
]
