"""Errors raised by the bindings: the library's stable codes with its messages."""

from __future__ import annotations

from ._lib import lib


class KVTransferError(Exception):
    """A failed call: `code` is the library's stable error code (positive), see README."""

    def __init__(self, code: int, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


#: Stable codes a caller may want to branch on.
INVALID_ARGUMENT = 2
BATCH_FAILED = 13
UNKNOWN_ROOM = 26
DUPLICATE_ROOM = 27
INVALID_PAGES = 28
LAYOUT_MISMATCH = 29
ROOM_FAILED = 30
ROOM_STATE = 31
CUDA_UNAVAILABLE = 32
CUDA = 33


def last_message() -> str:
    """The calling thread's last error message from the library."""
    m = lib.kvt_last_error_message()
    return m.decode("utf-8", "replace") if m else ""


def check(status: int) -> int:
    """Raises `KVTransferError` for a negative status; returns it otherwise."""
    if status < 0:
        raise KVTransferError(-status, last_message())
    return status
