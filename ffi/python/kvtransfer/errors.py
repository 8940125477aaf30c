"""The one exception type, with the library's stable error codes."""

from __future__ import annotations

from enum import IntEnum
from typing import Optional


class ErrorCode(IntEnum):
    """Stable error codes of kvtransfer (``Error::code()`` in Rust; ``-KVT_ERR_*`` in C)."""

    InvalidConfig = 1
    InvalidArgument = 2
    ZeroLength = 3
    OverlappingRegistration = 4
    UnregisteredAddress = 5
    UnknownSegment = 6
    RemoteOutOfRange = 7
    SegmentBusy = 8
    UnknownPeer = 9
    UnknownBatch = 10
    PeerLost = 11
    Timeout = 12
    BatchFailed = 13
    RemoteRejected = 14
    Protocol = 15
    Handshake = 16
    TransportUnavailable = 17
    Shutdown = 18
    Io = 19
    Panic = 20
    RdmaCoreMissing = 21
    RdmaKernelMissing = 22
    NoRdmaDevice = 23
    PortDown = 24
    Verbs = 25
    UnknownRoom = 26
    DuplicateRoom = 27
    InvalidPages = 28
    LayoutMismatch = 29
    RoomFailed = 30
    RoomState = 31
    CudaUnavailable = 32
    Cuda = 33
    RemoteUnregistered = 34
    Unauthenticated = 35


class FailureKind(IntEnum):
    """Why a room failed, machine-readable (the C ABI's ``KVT_FAILURE_*``)."""

    PeerLost = 1
    PeerRestarted = 2
    Timeout = 3
    Aborted = 4
    AbortedByPeer = 5
    LayoutMismatch = 6
    InvalidPages = 7
    Rejected = 8
    Transport = 9
    Integrity = 10
    Shutdown = 11


class KVTransferError(Exception):
    """A kvtransfer call failed.

    ``code`` is the positive stable code (compare with :class:`ErrorCode`), ``message`` the
    library's explanation (``kvt_last_error_message``), ``room`` the room id for room errors.
    For a failed room, ``kind`` is its :class:`FailureKind` (an int for a kind newer than this
    file) and ``failed_in`` the ``KVPoll`` value of the state it failed in; both are None
    otherwise.
    """

    def __init__(
        self,
        code: int,
        message: str,
        room: Optional[int] = None,
        kind: Optional[int] = None,
        failed_in: Optional[int] = None,
    ):
        self.code = int(code)
        self.message = message
        self.room = room
        self.kind = _kind(kind)
        self.failed_in = failed_in
        super().__init__(f"[{self.name}] {message}" if message else f"[{self.name}]")

    @property
    def name(self) -> str:
        """The code's name (``"InvalidPages"``), or ``"code N"`` for a code newer than this file."""
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"code {self.code}"

    def __reduce__(self):
        return (type(self), (self.code, self.message, self.room, self.kind, self.failed_in))


def _kind(kind: Optional[int]):
    if not kind:
        return None
    try:
        return FailureKind(kind)
    except ValueError:
        return int(kind)


def last_error_message() -> str:
    """The calling thread's last error message from the library ("" after a success)."""
    from . import _lib

    raw = _lib.lib().kvt_last_error_message()
    return raw.decode("utf-8", errors="replace") if raw else ""


def check(status: int, room: Optional[int] = None) -> None:
    """Raises :class:`KVTransferError` when ``status`` (a ``kvt_*`` return value) is negative.

    Must be called on the thread that made the call, before its next ``kvt_*`` call: the
    message is thread-local.
    """
    if status < 0:
        raise KVTransferError(-status, last_error_message(), room)
