"""kvtransfer: KV-cache transfer between prefill and decode servers (ctypes bindings).

The shared library is found through `KVTRANSFER_LIB`, next to this package, or in the
`target/release` / `target/debug` folder of a kvtransfer checkout above the working directory.
"""

from ._lib import lib
from .engine import TransferEngine
from .errors import KVTransferError
from .kv import DisaggregationMode, KVArgs, KVManager, KVPoll, KVReceiver, KVSender, as_pages

__all__ = [
    "DisaggregationMode",
    "KVArgs",
    "KVManager",
    "KVPoll",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "TransferEngine",
    "as_pages",
    "lib",
]
