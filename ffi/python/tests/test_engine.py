"""TransferEngine: registered numpy / ctypes memory, Mooncake-style writes and reads over TCP."""

from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest

import kvtransfer
from kvtransfer import BATCH_DONE, BATCH_FAILED, BATCH_PENDING, ErrorCode, KVTransferError, TransferEngine

MiB = 1 << 20


@pytest.fixture
def pair():
    """(initiator, target) engines over TCP, closed after the test."""
    target = TransferEngine(transport="tcp")
    initiator = TransferEngine(transport="tcp", connections_per_peer=2)
    yield initiator, target
    initiator.close()
    target.close()


def pattern(n: int, salt: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.uint64) * 2654435761 + salt) >> 7).astype(np.uint8)


def test_properties(pair):
    initiator, target = pair
    host, port = target.local_addr.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0 and target.get_rpc_port() == int(port)
    assert initiator.local_addr != target.local_addr
    assert target.transport == "tcp"
    assert "tcp" in repr(target)


def test_write_then_read_back(pair):
    initiator, target = pair
    dst = np.zeros(4 * MiB, dtype=np.uint8)  # target memory (numpy)
    src = pattern(4 * MiB, 1)  # initiator memory (numpy)
    back = ctypes.create_string_buffer(2 * MiB)  # initiator memory (ctypes)
    target.register(dst)
    initiator.register(src)
    initiator.register_memory(back)
    peer = initiator.connect(target.local_addr)

    # Scattered blocks of different sizes, one of them larger than a slice (1 MiB default).
    blocks = [(0, 2 * MiB + 8, 1536 * 1024), (4096, 0, 100), (2 * MiB, 100_000, 65536 + 3)]
    srcs = [src.ctypes.data + s for s, _, _ in blocks]
    dsts = [dst.ctypes.data + d for _, d, _ in blocks]
    lens = [n for _, _, n in blocks]
    assert initiator.batch_transfer_sync_write(peer, srcs, dsts, lens) == 0, initiator.last_error
    assert initiator.last_error == ""

    expect = np.zeros_like(dst)
    for s, d, n in blocks:
        expect[d : d + n] = src[s : s + n]
    assert np.array_equal(dst, expect), "every block landed, nothing else was written"

    # Read the target's blocks back into the ctypes buffer, packed one after another.
    at, locals_ = 0, []
    for _, _, n in blocks:
        locals_.append(ctypes.addressof(back) + at)
        at += n
    assert initiator.batch_transfer_sync_read(peer, locals_, dsts, lens) == 0, initiator.last_error
    got = np.frombuffer(back, dtype=np.uint8)
    at = 0
    for s, _, n in blocks:
        assert np.array_equal(got[at : at + n], src[s : s + n])
        at += n
    assert not got[at:].any(), "nothing read past the blocks"

    # The single-transfer forms, with the peer named by its address (connects once).
    assert initiator.transfer_sync_write(target.local_addr, src.ctypes.data + 7, dst.ctypes.data + 9, 11) == 0
    assert np.array_equal(dst[9:20], src[7:18])
    assert initiator.transfer_sync_read(target.local_addr, ctypes.addressof(back), dst.ctypes.data + 9, 11) == 0
    assert back.raw[:11] == src[7:18].tobytes()


def test_async_write_status_wait_and_release(pair):
    initiator, target = pair
    dst = np.zeros(8 * MiB, dtype=np.uint8)
    src = pattern(8 * MiB, 2)
    target.register(dst)
    initiator.register(src)
    peer = initiator.connect(target.local_addr)

    n = 64
    size = 8 * MiB // n
    # Reversed placement: block i goes to slot n-1-i, so nothing coalesces.
    srcs = np.array([src.ctypes.data + i * size for i in range(n)], dtype=np.uint64)
    dsts = np.array([dst.ctypes.data + (n - 1 - i) * size for i in range(n)], dtype=np.uint64)
    lens = np.full(n, size, dtype=np.uint64)
    batch = initiator.batch_transfer_async_write(peer, srcs, dsts, lens)
    seen = set()
    deadline = time.monotonic() + 20
    while (status := initiator.get_batch_transfer_status(batch)) == BATCH_PENDING:
        seen.add(status)
        assert time.monotonic() < deadline, "batch never finished"
    assert status == BATCH_DONE, initiator.last_error
    assert initiator.get_batch_transfer_status(batch) == BATCH_DONE, "a final status stays readable"
    for i in range(n):
        assert np.array_equal(dst[(n - 1 - i) * size : (n - i) * size], src[i * size : (i + 1) * size])
    initiator.release(batch)
    with pytest.raises(KVTransferError) as e:
        initiator.get_batch_transfer_status(batch)
    assert e.value.code == ErrorCode.UnknownBatch
    initiator.release(batch)  # releasing twice is a no-op

    # wait(): blocks, then releases for us.
    dst[:] = 0
    batch = initiator.batch_transfer_async_write(peer, srcs[:4], dsts[:4], lens[:4])
    initiator.wait(batch)
    assert np.array_equal(dst[(n - 1) * size :], src[:size])
    with pytest.raises(KVTransferError) as e:
        initiator.get_batch_transfer_status(batch)
    assert e.value.code == ErrorCode.UnknownBatch


def test_failed_transfers_return_negative_codes_and_write_nothing(pair):
    initiator, target = pair
    dst = np.zeros(MiB, dtype=np.uint8)
    src = pattern(MiB, 3)
    elsewhere = np.zeros(MiB, dtype=np.uint8)  # registered nowhere
    target.register(dst)
    initiator.register(src)
    peer = initiator.connect(target.local_addr)

    def write(srcs, dsts, lens) -> int:
        initiator.last_error = ""
        return initiator.batch_transfer_sync_write(peer, srcs, dsts, lens)

    # Destination not registered at the peer: refused, nothing moves (not even the good one).
    rc = write([src.ctypes.data, src.ctypes.data], [dst.ctypes.data, elsewhere.ctypes.data], [4096, 4096])
    assert rc == -ErrorCode.RemoteUnregistered, (rc, initiator.last_error)
    assert hex(elsewhere.ctypes.data) in initiator.last_error
    # Destination running past the end of the peer's segment.
    rc = write([src.ctypes.data], [dst.ctypes.data + MiB - 8], [16])
    assert rc == -ErrorCode.RemoteUnregistered, (rc, initiator.last_error)
    # Source not registered here.
    rc = write([elsewhere.ctypes.data], [dst.ctypes.data], [16])
    assert rc == -ErrorCode.UnregisteredAddress, (rc, initiator.last_error)
    assert initiator.last_error
    # Zero length, empty batch, unknown peer id.
    assert write([src.ctypes.data], [dst.ctypes.data], [0]) == -ErrorCode.ZeroLength
    assert write([], [], []) == -ErrorCode.InvalidArgument
    assert initiator.batch_transfer_sync_write(peer + 1000, [src.ctypes.data], [dst.ctypes.data], [8]) == -ErrorCode.UnknownPeer
    assert initiator.batch_transfer_sync_read(peer, [src.ctypes.data], [elsewhere.ctypes.data], [8]) == -ErrorCode.RemoteUnregistered
    # Nobody listening at that address: a negative code, no exception.
    assert initiator.batch_transfer_sync_write("127.0.0.1:1", [src.ctypes.data], [dst.ctypes.data], [8]) < 0
    assert initiator.last_error
    assert not dst.any() and not elsewhere.any(), "nothing was written"

    # A refused async submission raises (nothing was submitted, there is no batch id).
    with pytest.raises(KVTransferError) as e:
        initiator.batch_transfer_async_write(peer, [src.ctypes.data], [elsewhere.ctypes.data], [8])
    assert e.value.code == ErrorCode.RemoteUnregistered and e.value.message

    # Usage errors are exceptions, not codes.
    with pytest.raises(ValueError):
        write([src.ctypes.data], [dst.ctypes.data, dst.ctypes.data], [8])
    with pytest.raises(ValueError):
        write([-1], [dst.ctypes.data], [8])


def test_peer_that_went_away_fails_the_batch(pair):
    initiator, target = pair
    dst = np.zeros(MiB, dtype=np.uint8)
    src = pattern(MiB, 4)
    target.register(dst)
    initiator.register(src)
    peer = initiator.connect(target.local_addr)
    assert initiator.batch_transfer_sync_write(peer, [src.ctypes.data], [dst.ctypes.data], [MiB]) == 0
    target.close()
    rc = initiator.batch_transfer_sync_write(peer, [src.ctypes.data], [dst.ctypes.data], [MiB])
    assert rc < 0 and initiator.last_error, rc
    # The async form: submission may be refused, or the batch fails; never "done".
    try:
        batch = initiator.batch_transfer_async_write(peer, [src.ctypes.data], [dst.ctypes.data], [4096])
    except KVTransferError as e:
        assert e.code in (ErrorCode.PeerLost, ErrorCode.UnknownPeer, ErrorCode.BatchFailed), e
    else:
        deadline = time.monotonic() + 20
        while (status := initiator.get_batch_transfer_status(batch)) == BATCH_PENDING:
            assert time.monotonic() < deadline
        assert status == BATCH_FAILED and initiator.last_error
        initiator.release(batch)


def test_registration_rules(pair):
    _, engine = pair
    a = np.zeros(MiB, dtype=np.uint8)
    seg = engine.register(a)
    with pytest.raises(KVTransferError) as e:
        engine.register(a[4096:])  # overlaps
    assert e.value.code == ErrorCode.OverlappingRegistration and e.value.name == "OverlappingRegistration"
    with pytest.raises(KVTransferError) as e:
        engine.register(a.ctypes.data, 0)
    assert e.value.code == ErrorCode.ZeroLength
    with pytest.raises(KVTransferError) as e:
        engine.unregister(seg + 12345)
    assert e.value.code == ErrorCode.UnknownSegment
    with pytest.raises(TypeError):
        engine.register(a.ctypes.data)  # an int address needs a length
    with pytest.raises(ValueError):
        engine.register(a, 2 * MiB)  # longer than the array
    with pytest.raises(ValueError):
        engine.register(np.zeros((64, 64), dtype=np.uint8)[:, ::2])  # not contiguous

    engine.unregister_memory(a.ctypes.data)
    seg2 = engine.register(a)  # free again after unregistering
    assert seg2 != seg, "segment ids are never reused"
    buf = bytearray(8192)
    engine.register(buf)
    with pytest.raises(BufferError):
        buf.extend(b"x")  # registered memory is pinned: the bytearray cannot move
    with pytest.raises(KVTransferError) as e:
        engine.unregister_memory(12345)
    assert e.value.code == ErrorCode.UnregisteredAddress


def test_close_is_idempotent_and_later_calls_raise():
    with TransferEngine(transport="tcp") as engine:
        addr = engine.local_addr
        assert not engine.closed
    assert engine.closed and addr
    engine.close()
    with pytest.raises(KVTransferError) as e:
        engine.register(np.zeros(16, dtype=np.uint8))
    assert e.value.code == ErrorCode.Shutdown
    with pytest.raises(KVTransferError):
        engine.local_addr
    assert repr(engine) == "<TransferEngine closed>"
    # __del__ of an engine never closed, and of one whose constructor failed, is quiet.
    TransferEngine(transport="tcp").__del__()
    with pytest.raises(ValueError):
        TransferEngine(transport="carrier-pigeon")


def test_bad_config_and_rdma_where_unusable():
    with pytest.raises(KVTransferError) as e:
        TransferEngine(listen="not an address")
    assert e.value.code == ErrorCode.InvalidConfig, e.value
    try:
        engine = TransferEngine(transport="rdma")
    except KVTransferError as e:
        # A host without a usable RDMA port says why, with a specific code.
        assert e.code in (
            ErrorCode.TransportUnavailable,
            ErrorCode.RdmaCoreMissing,
            ErrorCode.RdmaKernelMissing,
            ErrorCode.NoRdmaDevice,
            ErrorCode.PortDown,
        ), e
        assert "RDMA" in e.message or "rdma" in e.message
    else:
        assert engine.transport == "rdma"
        engine.close()


def test_last_error_message_is_per_thread():
    import threading

    engine = TransferEngine(transport="tcp")
    try:
        with pytest.raises(KVTransferError):
            engine.unregister(999)
        seen = []
        t = threading.Thread(target=lambda: seen.append(kvtransfer.last_error_message()))
        t.start()
        t.join()
        assert seen == [""], "another thread's message is its own"
        assert "999" in kvtransfer.last_error_message()
        assert engine.local_addr  # a successful call clears it
        engine._local_addr = None
        engine.local_addr
        assert kvtransfer.last_error_message() == ""
    finally:
        engine.close()


def test_device_registration_without_cuda_is_a_clear_error():
    import os

    if os.environ.get("KVT_TEST_GPU") == "1":
        pytest.skip("a GPU host: CUDA is present")
    with TransferEngine(transport="tcp") as engine:
        buf = np.zeros(4096, dtype=np.uint8)
        with pytest.raises(KVTransferError) as e:
            engine.register_device(buf.ctypes.data, buf.nbytes)
        assert e.value.code == ErrorCode.CudaUnavailable
        assert "CUDA unavailable" in e.value.message


def test_paged_transfers_expand_pages_in_the_library(pair):
    """One call per chunk: page indices and a buffer table, no address lists."""
    initiator, target = pair
    layers, pages, item = 3, 16, 4096
    src = [pattern(pages * item, salt=l + 1) for l in range(layers)]
    dst = [np.zeros(pages * item, dtype=np.uint8) for _ in range(layers)]
    for a in src:
        initiator.register(a)
    for a in dst:
        target.register(a)
    addr = target.local_addr
    table = TransferEngine.page_buffers([a.ctypes.data for a in src], [a.ctypes.data for a in dst], [item] * layers)
    local = np.array([0, 1, 2, 7, 3], dtype=np.int32)
    remote = np.array([9, 10, 11, 0, 15], dtype=np.int32)  # runs of 3, 1 and 1 pages
    batch = initiator.submit_pages(addr, kvtransfer.OP_WRITE, table, local, remote)
    # The library's own account of the batch: every page of every layer, once.
    assert initiator.batch_metrics(batch)[:2] == (layers * len(local) * item, 0)
    moved = initiator.wait_metrics(batch)
    assert isinstance(moved, kvtransfer.BatchMetrics)
    assert (moved.bytes_written, moved.bytes_read) == (layers * len(local) * item, 0)
    assert moved.latency_s is not None and moved.latency_s > 0
    with pytest.raises(KVTransferError) as e:
        initiator.batch_metrics(batch)
    assert e.value.code == ErrorCode.UnknownBatch
    for l in range(layers):
        for s, d in zip(local, remote):
            assert np.array_equal(dst[l][d * item : (d + 1) * item], src[l][s * item : (s + 1) * item])
        written = set(int(d) for d in remote)
        for p in set(range(pages)) - written:
            assert not dst[l][p * item : (p + 1) * item].any(), f"layer {l} page {p} touched"
    # Read pages back into other local pages.
    for a in src:
        a[12 * item :] = 0
    initiator.wait(initiator.submit_pages(addr, kvtransfer.OP_READ, table, [12, 13], [0, 15]))
    for l in range(layers):
        assert np.array_equal(src[l][12 * item : 13 * item], dst[l][0:item])
        assert np.array_equal(src[l][13 * item : 14 * item], dst[l][15 * item : 16 * item])
    # Bad input is refused with its code and nothing moves.
    before = [d.copy() for d in dst]
    bad = {
        ErrorCode.InvalidArgument: ([0, -1], [1, 2]),
        ErrorCode.RemoteOutOfRange: ([0], [16]),
        ErrorCode.UnregisteredAddress: ([16], [0]),
    }
    for code, (lp, rp) in bad.items():
        with pytest.raises(KVTransferError) as e:
            initiator.submit_pages(addr, kvtransfer.OP_WRITE, table, lp, rp)
        assert e.value.code == code, e.value
    with pytest.raises(ValueError):
        initiator.submit_pages(addr, kvtransfer.OP_WRITE, table, [0, 1], [0])
    assert all(np.array_equal(a, b) for a, b in zip(dst, before))


def test_cluster_secret_is_proven_or_the_connection_is_refused(tmp_path):
    secret = "the cluster secret, 32 bytes...."
    path = tmp_path / "secret"
    path.write_text(secret + "\n")
    target = TransferEngine(transport="tcp", secret=secret)
    same = TransferEngine(transport="tcp", secret_file=str(path))
    other = TransferEngine(transport="tcp", secret=b"another secret of 32 bytes......")
    none = TransferEngine(transport="tcp")
    try:
        dst = np.zeros(MiB, dtype=np.uint8)
        src = pattern(MiB, 3)
        target.register(dst)
        same.register(src)
        assert same.transfer_sync_write(target.local_addr, src.ctypes.data, dst.ctypes.data, MiB) == 0
        assert np.array_equal(dst, src)
        for stranger in (other, none):
            with pytest.raises(KVTransferError) as e:
                stranger.connect(target.local_addr)
            assert e.value.code == ErrorCode.Unauthenticated, e.value
        with pytest.raises(KVTransferError) as e:
            TransferEngine(transport="tcp", secret="short")
        assert e.value.code == ErrorCode.InvalidConfig and "16 bytes" in str(e.value)
    finally:
        for e in (target, same, other, none):
            e.close()
