"""Conformance of kvtransfer.mooncake with Mooncake's Python TransferEngine conventions: every
method's return values, bad input (unknown peer, unregistered address, length mismatch, zero
length), bytes verified, over TCP loopback."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

import kvtransfer.mooncake as mc

MiB = 1 << 20


def new_engine(host: str = "127.0.0.1") -> mc.TransferEngine:
    e = mc.TransferEngine()
    assert e.initialize(host, "P2PHANDSHAKE", "tcp", "") == 0, e.last_error
    return e


@pytest.fixture
def two():
    """Two initialized engines with 1 MiB registered each (a: source, b: target)."""
    a, b = new_engine(), new_engine()
    src = np.random.default_rng(7).integers(0, 256, MiB, dtype=np.uint8)
    dst = np.zeros(MiB, dtype=np.uint8)
    assert a.register_memory(src.ctypes.data, src.nbytes) == 0
    assert b.register_memory(dst.ctypes.data, dst.nbytes) == 0
    yield a, b, src, dst, f"127.0.0.1:{b.get_rpc_port()}"
    a.close()
    b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_install_makes_mooncake_engine_this_module():
    mc.uninstall()
    assert "mooncake.engine" not in sys.modules
    mc.install()
    try:
        from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode  # type: ignore

        assert TransferEngine is mc.TransferEngine and TransferNotify is mc.TransferNotify
        assert TransferOpcode.Read == 0 and TransferOpcode.Write == 1
        assert TransferEngine.TransferOpcode is TransferOpcode
        import mooncake.engine as me  # type: ignore

        assert me is mc and me.SUPPORT_CUDA is True and me.SUPPORT_EFA is False
        mc.install()  # idempotent
        assert mc.installed()
    finally:
        mc.uninstall()
    assert not mc.installed() and "mooncake" not in sys.modules


def test_plugin_installs_only_with_the_switch(monkeypatch):
    mc.uninstall()
    monkeypatch.delenv(mc.COMPAT_ENV, raising=False)
    mc.plugin()
    assert not mc.installed()
    monkeypatch.setenv(mc.COMPAT_ENV, "1")
    mc.plugin()
    assert mc.installed()
    mc.uninstall()


def test_initialize_conventions(monkeypatch):
    e = mc.TransferEngine()
    assert e.get_rpc_port() == -1
    assert e.initialize("127.0.0.1", "etcd://10.0.0.1:2379", "tcp", "") == -1
    assert "peer-to-peer" in e.last_error and "P2PHANDSHAKE" in e.last_error
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "nvlink", "") == -1
    assert "nvlink" in e.last_error
    port = free_port()
    assert e.initialize_ext(f"127.0.0.1:{port}", "P2PHANDSHAKE", "tcp", "", "p2p") == 0
    assert e.get_rpc_port() == port
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == -1  # twice
    e.close()

    if not Path("/sys/class/infiniband_verbs").is_dir():
        # No RDMA here: "rdma" fails as Mooncake's does, and MC_FORCE_TCP=1 gives TCP.
        e = mc.TransferEngine()
        assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "mlx5_0") == -1
        monkeypatch.setenv("MC_FORCE_TCP", "1")
        e = mc.TransferEngine()
        assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "mlx5_0") == 0, e.last_error
        assert e._engine.transport == "tcp"
        e.close()


def test_registration_conventions():
    e = new_engine()
    buf = np.zeros(3 * 4096, dtype=np.uint8)
    base = buf.ctypes.data
    assert e.register_memory(base, 4096) == 0
    assert e.register_memory(base, 4096) == -1  # overlaps
    assert e.register_memory(base + 8192, 0) == -1  # zero length
    assert e.unregister_memory(base) == 0
    assert e.unregister_memory(base) == -1  # no longer registered
    assert e.batch_register_memory([base, base + 4096], [4096]) == -1  # length mismatch
    # All or nothing: the second overlaps the first, so neither stays registered.
    assert e.batch_register_memory([base, base + 100], [4096, 4096]) == -1
    assert e.register_memory(base, 4096) == 0
    assert e.batch_register_memory([base + 4096, base + 8192], [4096, 4096], "cpu:0") == 0
    assert e.batch_unregister_memory([base, base + 4096, base + 8192]) == 0
    assert e.batch_unregister_memory([base]) == -1
    e.close()


def test_sync_writes_and_reads_move_the_bytes(two):
    a, b, src, dst, target = two
    s, d = src.ctypes.data, dst.ctypes.data
    assert a.transfer_sync_write(target, s, d, 4096) == 0
    assert np.array_equal(dst[:4096], src[:4096])
    # A scattered batch: 64 blocks of 4 KiB in reverse order.
    n = 64
    offs = [i * 4096 for i in range(n)]
    assert a.batch_transfer_sync_write(target, [s + o for o in offs], [d + (n - 1) * 4096 - o for o in offs], [4096] * n) == 0
    for i in range(n):
        assert np.array_equal(dst[(n - 1 - i) * 4096 : (n - i) * 4096], src[i * 4096 : (i + 1) * 4096])
    # Reads back into a fresh region of a's memory.
    src[MiB // 2 :] = 0
    assert a.batch_transfer_sync_read(target, [s + MiB // 2], [d], [MiB // 2]) == 0
    assert np.array_equal(src[MiB // 2 :], dst[: MiB // 2])
    assert a.transfer_sync_read(target, s + MiB - 16, d + 16, 16) == 0
    assert np.array_equal(src[MiB - 16 :], dst[16:32])
    # The opcode forms.
    dst[:] = 0
    assert a.transfer_sync(target, s, d, 100, mc.TransferOpcode.Write) == 0
    assert a.batch_transfer_sync(target, [s + 100], [d + 100], [100], mc.TransferOpcode.Write) == 0
    assert np.array_equal(dst[:200], src[:200])
    assert a.transfer_sync(target, s + 4096, d, 200, mc.TransferOpcode.Read) == 0
    assert np.array_equal(src[4096 : 4096 + 200], dst[:200])
    assert a.batch_transfer_sync(target, [], [], [], mc.TransferOpcode.Write) == 0


def test_bad_transfers_return_minus_one_and_write_nothing(two):
    a, b, src, dst, target = two
    s, d = src.ctypes.data, dst.ctypes.data
    cases = {
        "length mismatch": lambda: a.batch_transfer_sync_write(target, [s, s], [d], [16, 16]),
        "unknown peer": lambda: a.transfer_sync_write(f"127.0.0.1:{free_port()}", s, d, 16),
        "unregistered local": lambda: a.transfer_sync_write(target, s + 2 * MiB, d, 16),
        "unregistered remote": lambda: a.transfer_sync_write(target, s, d + MiB - 8, 16),
        "zero length": lambda: a.batch_transfer_sync_write(target, [s, s], [d, d + 64], [16, 0]),
        "notify": lambda: a.transfer_sync(target, s, d, 16, mc.TransferOpcode.Write, mc.TransferNotify("n", "m")),
    }
    for what, call in cases.items():
        assert call() == -1, what
        assert a.last_error, what
        assert not dst.any(), f"{what} wrote bytes"
    # A refused async submission is batch id 0.
    assert a.batch_transfer_async_write(target, [s], [d], [16, 16]) == 0
    assert a.transfer_submit_write(f"127.0.0.1:{free_port()}", s, d, 16) == 0
    assert not dst.any()
    # The session still works after bad input.
    assert a.transfer_sync_write(target, s, d, 16) == 0
    assert np.array_equal(dst[:16], src[:16])


def test_async_batches_and_status_conventions(two):
    a, b, src, dst, target = two
    s, d = src.ctypes.data, dst.ctypes.data
    ids = [
        a.batch_transfer_async_write(target, [s + i * 4096], [d + i * 4096], [4096]) for i in range(4)
    ]
    assert all(i != 0 for i in ids) and len(set(ids)) == 4
    assert a.get_batch_transfer_status(ids) == 0  # blocks until all are final
    assert np.array_equal(dst[: 4 * 4096], src[: 4 * 4096])
    assert a.get_batch_transfer_status(ids) == -1  # freed: unknown now
    rid = a.batch_transfer_async_read(target, [s + MiB - 4096], [d], [4096])
    assert rid != 0 and a.get_batch_transfer_status([rid]) == 0
    assert np.array_equal(src[MiB - 4096 :], dst[:4096])
    oid = a.batch_transfer_async(target, [s], [d + 8192], [64], mc.TransferOpcode.Write)
    assert oid != 0 and a.get_batch_transfer_status([oid]) == 0

    bid = a.transfer_submit_write(target, s + 8192, d + 65536, 8192)
    assert bid != 0
    seen = set()
    for _ in range(100_000):
        st = a.transfer_check_status(bid)
        seen.add(st)
        if st != 0:
            break
    assert st == 1 and seen <= {0, 1}
    assert np.array_equal(dst[65536 : 65536 + 8192], src[8192 : 16384])
    assert a.transfer_check_status(bid) == -1  # freed once done


def test_managed_buffers_bytes_helpers_and_first_buffer(two):
    a, b, src, dst, target = two
    # The local segment's first buffer is the first registered one; a peer's likewise.
    assert a.get_first_buffer_address(f"127.0.0.1:{a.get_rpc_port()}") == src.ctypes.data
    assert a.get_first_buffer_address(target) == dst.ctypes.data
    assert a.get_first_buffer_address(f"127.0.0.1:{free_port()}") == 0

    addr = b.allocate_managed_buffer(64 * 1024)
    assert addr != 0 and addr % 4096 == 0
    assert b.write_bytes_to_buffer(addr, b"hello kv", 8) == 0
    assert b.write_bytes_to_buffer(addr, b"short", 6) == -1
    assert b.read_bytes_from_buffer(addr, 8) == b"hello kv"
    # The managed buffer is registered: a peer can write into it.
    assert a.transfer_sync_write(target, src.ctypes.data, addr + 8, 8) == 0
    assert b.read_bytes_from_buffer(addr + 8, 8) == src[:8].tobytes()
    assert b.free_managed_buffer(addr, 64 * 1024) == 0
    assert b.free_managed_buffer(addr, 64 * 1024) == -1
    assert b.allocate_managed_buffer(0) == 0


def test_send_probe_is_a_real_probe_without_a_session(two):
    a, b, src, dst, target = two
    assert a.send_probe(target) == 0
    assert target not in a._sessions  # no session was opened
    assert a.send_probe(f"127.0.0.1:{free_port()}") == -1
    assert a.send_probe("not-an-address") == -1
    # Something that is not an engine does not pass either.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        import threading

        def junk():
            c, _ = srv.accept()
            c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)
            c.close()

        t = threading.Thread(target=junk)
        t.start()
        assert a.send_probe(f"127.0.0.1:{port}") == -1
        t.join()


def test_a_restarted_peer_is_reached_by_a_later_call(two):
    a, b, src, dst, target = two
    s = src.ctypes.data
    assert a.transfer_sync_write(target, s, dst.ctypes.data, 64) == 0
    port = b.get_rpc_port()
    b.close()
    assert a.transfer_sync_write(target, s, dst.ctypes.data, 64) == -1
    # A new process on the same port, with new memory.
    b2 = mc.TransferEngine()
    assert b2.initialize(f"127.0.0.1:{port}", "P2PHANDSHAKE", "tcp", "") == 0, b2.last_error
    dst2 = np.zeros(4096, dtype=np.uint8)
    assert b2.register_memory(dst2.ctypes.data, dst2.nbytes) == 0
    results = [a.transfer_sync_write(target, s, dst2.ctypes.data, 4096) for _ in range(2)]
    assert results[-1] == 0, a.last_error
    assert np.array_equal(dst2, src[:4096])
    b2.close()


def test_local_topology_is_json_and_notifies_are_empty():
    e = mc.TransferEngine()
    topo = json.loads(e.get_local_topology())
    assert isinstance(topo, dict)
    for location, (preferred, others) in topo.items():
        assert location.split(":")[0] in ("cpu", "cuda") and isinstance(preferred, list)
    if not Path("/sys/class/infiniband_verbs").is_dir():
        assert topo == {}
    assert e.get_notifies() == []
    assert e.warmup_efa_segment("x") == 0
    with pytest.raises(NotImplementedError):
        e.get_engine()


def test_engine_level_additions(two):
    a, b, src, dst, target = two
    eng = a._engine
    peer = eng.connect(target)
    segs = eng.remote_segments(peer)
    assert [(s.kind, s.base, s.len) for s in segs] == [("host", dst.ctypes.data, MiB)]
    more = np.zeros(8192, dtype=np.uint8)
    assert b.register_memory(more.ctypes.data, more.nbytes) == 0
    assert len(eng.remote_segments(peer)) == 1  # as last learned
    assert [s.base for s in eng.remote_segments(peer, refresh=True)] == [dst.ctypes.data, more.ctypes.data]
    engine_id, epoch = eng.probe(target)
    assert engine_id != 0 and epoch != 0
    eng.disconnect(peer)
    with pytest.raises(Exception):
        eng.remote_segments(peer)


def test_sync_calls_report_what_the_library_moved(two):
    """kvtransfer's ``on_done``: each done batch's own bytes and latency, from the library."""
    a, b, src, dst, target = two
    s, d = src.ctypes.data, dst.ctypes.data
    seen = []
    assert a.batch_transfer_sync_write(target, [s, s + 8192], [d + 4096, d], [3000, 5000], on_done=seen.append) == 0
    table = a._engine.page_buffers([s], [d], [4096])
    assert a.transfer_sync_pages(target, table, [1, 2, 3], [10, 11, 40], on_done=seen.append) == 0
    assert [(m.bytes_written, m.bytes_read) for m in seen] == [(8000, 0), (3 * 4096, 0)]
    assert all(m.latency_s is not None and m.latency_s > 0 for m in seen)
    assert np.array_equal(dst[40 * 4096 : 41 * 4096], src[3 * 4096 : 4 * 4096])
    # A failed batch reports nothing.
    assert a.batch_transfer_sync_write(target, [s], [d + MiB], [16], on_done=seen.append) == -1
    assert len(seen) == 2
