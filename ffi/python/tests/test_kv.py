import time

import numpy as np
import pytest

import kvtransfer.kv as kvmod
from kvtransfer import KVManager, KVPoll, KVReceiver, KVSender, KVTransferError
from kvtransfer.errors import DUPLICATE_ROOM, INVALID_PAGES, ROOM_STATE

from conftest import Side, scattered, wait_for, wait_state


def test_deepseek_room_in_four_chunks_is_whole_at_success():
    layers, pool, item, n = 61, 300, 36 << 10, 256
    p = Side("prefill", layers, pool, item)
    d = Side("decode", layers, pool, item)
    p.fill(7)
    src = scattered(n, pool, 11)
    dst = scattered(n, pool, 23)
    assert (np.diff(src) == 1).any() and (np.diff(src) != 1).any()
    rx = KVReceiver(d.mgr, p.mgr.bootstrap_addr, 1001)
    rx.init(dst, aux_index=2)
    tx = KVSender(p.mgr, p.mgr.bootstrap_addr, 1001)
    wait_state(tx, KVPoll.WaitingForInput)
    tx.init(n, aux_index=6)
    start = time.monotonic()
    for chunk in np.array_split(src, 4):
        tx.send(chunk)  # is_last follows from the count given to init
    until = time.monotonic() + 60
    while True:
        s = rx.poll()
        if s == KVPoll.Success:
            break
        if s == KVPoll.Failed:
            rx.failure_exception()
        assert time.monotonic() < until
    took = time.monotonic() - start
    # At the first Success every page and the aux slot are in place.
    assert np.array_equal(d.kv[:, dst], p.kv[:, src])
    assert np.array_equal(d.aux[2], p.aux[6])
    others = np.setdiff1d(np.arange(pool), dst)
    assert not d.kv[:, others].any()
    wait_state(tx, KVPoll.Success)
    m = tx.metrics()
    assert m["bytes"] == layers * n * item + 64
    assert m["transfer_span_ns"] > 0
    assert rx.metrics()["slices"] == 4
    print(f"python room: {layers * n * item / took / 1e9:.2f} GB/s")
    tx.close()
    rx.close()


def test_int32_page_arrays_are_passed_without_copying(monkeypatch):
    a = np.arange(10, dtype=np.int32)
    assert kvmod.as_pages(a) is a
    b = kvmod.as_pages([1, 2, 3])
    assert b.dtype == np.int32 and b.flags["C_CONTIGUOUS"]
    strided = np.arange(20, dtype=np.int32)[::2]
    assert kvmod.as_pages(strided) is not strided
    assert kvmod.as_pages(np.arange(4, dtype=np.int64)).dtype == np.int32
    with pytest.raises(OverflowError):
        kvmod.as_pages([2**40])
    seen = []
    real = kvmod._pages_arg

    def spy(indices):
        out = real(indices)
        seen.append((out[0].ctypes.data, indices))
        return out

    monkeypatch.setattr(kvmod, "_pages_arg", spy)
    p = Side("prefill", 1, 16, 4096)
    d = Side("decode", 1, 16, 4096)
    pages = np.array([3, 4, 5], dtype=np.int32)
    rx = KVReceiver(d.mgr, p.mgr.bootstrap_addr, 1)
    rx.init(pages)
    assert seen[-1][0] == pages.ctypes.data, "the array's own buffer went to the library"
    rx.close()


def test_bad_input_is_refused_with_codes_and_nothing_written(pair):
    p, d = pair
    rx = KVReceiver(d.mgr, p.mgr.bootstrap_addr, 5)
    for bad in ([0, -1], [32], [3, 3]):
        with pytest.raises(KVTransferError) as e:
            rx.init(np.array(bad, dtype=np.int32))
        assert e.value.code == INVALID_PAGES, e.value
    with pytest.raises(KVTransferError) as e:
        KVReceiver(d.mgr, p.mgr.bootstrap_addr, 5)
    assert e.value.code == DUPLICATE_ROOM
    rx.init([1, 2, 3])
    tx = KVSender(p.mgr, None, 5)
    with pytest.raises(KVTransferError) as e:
        KVSender(p.mgr, None, 5)
    assert e.value.code == DUPLICATE_ROOM
    wait_state(tx, KVPoll.WaitingForInput)
    with pytest.raises(KVTransferError) as e:
        tx.send([1])
    assert e.value.code == ROOM_STATE  # before init
    tx.init(3)
    for bad in ([-1], [99], [1, 2, 3, 4]):
        with pytest.raises(KVTransferError) as e:
            tx.send(bad, is_last=False)
        assert e.value.code == INVALID_PAGES
    assert tx.poll() == KVPoll.WaitingForInput
    time.sleep(0.05)
    assert not d.kv.any() and not d.aux.any()
    tx.close()
    rx.close()


def test_mismatched_page_counts_fail_both_sides(pair):
    p, d = pair
    rx = KVReceiver(d.mgr, p.mgr.bootstrap_addr, 6)
    rx.init([1, 2])
    tx = KVSender(p.mgr, None, 6)
    wait_state(tx, KVPoll.WaitingForInput)
    with pytest.raises(KVTransferError) as e:
        tx.init(5)
    assert e.value.code == INVALID_PAGES
    assert tx.poll() == KVPoll.Failed
    wait_state(rx, KVPoll.Failed)
    with pytest.raises(KVTransferError, match="page count mismatch"):
        tx.failure_exception()
    assert not d.kv.any()


@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_abort_on_either_side_freezes_the_destination(side):
    p = Side("prefill", 8, 512, 32 << 10)
    d = Side("decode", 8, 512, 32 << 10)
    p.fill(3)
    rx = KVReceiver(d.mgr, p.mgr.bootstrap_addr, 77)
    rx.init(np.arange(512, dtype=np.int32)[::-1].copy())
    tx = KVSender(p.mgr, None, 77)
    tx.init(512)
    wait_state(tx, KVPoll.WaitingForInput)
    for chunk in np.array_split(np.arange(512, dtype=np.int32), 8):
        tx.send(chunk)
    wait_state(rx, KVPoll.Transferring)
    (tx if side == "sender" else rx).abort()
    frozen = d.kv.copy()
    time.sleep(0.3)
    assert np.array_equal(frozen, d.kv), "a write landed after abort() returned"
    aborted, other = (tx, rx) if side == "sender" else (rx, tx)
    assert aborted.poll() == KVPoll.Failed
    assert f"aborted by the {side}" in aborted.failure_reason()
    wait_for(lambda: other.poll() in (KVPoll.Failed, KVPoll.Success), 10, "the other side to end")
    tx.close()
    rx.close()


def test_room_timeout_fails_with_a_reason():
    p = Side("prefill", 1, 8, 4096, room_timeout_ms=300)
    tx = KVSender(p.mgr, None, 9)
    wait_state(tx, KVPoll.Failed, timeout=5)
    assert "deadline of 300 ms exceeded while Bootstrapping" in tx.failure_reason()
    with pytest.raises(KVTransferError):
        tx.failure_exception()
    tx.close()


def test_managers_check_their_arguments():
    with pytest.raises(ValueError):
        KVManager(kvmod.KVArgs([1], [2], []), "prefill")
    with pytest.raises(ValueError):
        KVManager(kvmod.KVArgs(), "sideways")
    with pytest.raises(KVTransferError) as e:
        KVManager(kvmod.KVArgs(), kvmod.DisaggregationMode.DECODE)
    assert e.value.code == 2  # no page buffer: InvalidArgument
