import numpy as np
import pytest

import kvtransfer
from kvtransfer import KVTransferError, TransferEngine
from kvtransfer import _lib

from conftest import wait_for


@pytest.fixture
def engines():
    a = TransferEngine(transport="tcp")
    b = TransferEngine(transport="tcp")
    yield a, b
    a.close()
    b.close()


def test_the_library_is_found_and_speaks_abi_1():
    assert kvtransfer.lib.kvt_abi_version() == 1
    assert kvtransfer.lib.kvtransfer_path.endswith("libkvtransfer.so")


def test_sync_write_lands_every_byte(engines):
    a, b = engines
    assert a.transport == "tcp"
    host, port = b.local_addr.rsplit(":", 1)
    assert int(port) > 0
    src = np.random.default_rng(3).integers(0, 256, size=1 << 20, dtype=np.uint8)
    dst = np.zeros(1 << 20, dtype=np.uint8)
    a.register(src.ctypes.data, src.nbytes)
    b.register_memory(dst.ctypes.data, dst.nbytes)
    peer = a.connect(b.local_addr)
    # Three blocks, scattered: 4 KiB, 64 KiB and the last 1 KiB.
    srcs = [src.ctypes.data, src.ctypes.data + 8192, src.ctypes.data + (1 << 20) - 1024]
    dsts = [dst.ctypes.data + 65536, dst.ctypes.data, dst.ctypes.data + (1 << 20) - 1024]
    lens = [4096, 65536, 1024]
    assert a.batch_transfer_sync_write(peer, srcs, dsts, lens) == 0
    assert np.array_equal(dst[65536 : 65536 + 4096], src[:4096])
    assert np.array_equal(dst[:65536], src[8192 : 8192 + 65536])
    assert np.array_equal(dst[-1024:], src[-1024:])


def test_async_write_reports_status(engines):
    a, b = engines
    src = np.full(256 << 10, 7, dtype=np.uint8)
    dst = np.zeros(256 << 10, dtype=np.uint8)
    a.register(src.ctypes.data, src.nbytes)
    b.register(dst.ctypes.data, dst.nbytes)
    peer = a.connect(b.local_addr)
    batch = a.batch_transfer_async_write(peer, [src.ctypes.data], [dst.ctypes.data], [src.nbytes])
    wait_for(lambda: a.get_batch_transfer_status(batch) != 0, what="batch to finish")
    assert a.get_batch_transfer_status(batch) == 1, "final state stays readable"
    a.release(batch)
    assert (dst == 7).all()
    with pytest.raises(KVTransferError) as e:
        a.get_batch_transfer_status(batch)
    assert e.value.code == 10  # UnknownBatch after release
    # A destination the peer never registered is refused at submission.
    other = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(KVTransferError):
        a.batch_transfer_async_write(peer, [src.ctypes.data], [other.ctypes.data], [4096])


def test_failed_transfer_returns_a_negative_code_and_writes_nothing(engines):
    a, b = engines
    src = np.full(4096, 1, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    other = np.zeros(4096, dtype=np.uint8)
    a.register(src.ctypes.data, src.nbytes)
    b.register(dst.ctypes.data, dst.nbytes)
    peer = a.connect(b.local_addr)
    # The destination address is not registered at the peer.
    rc = a.batch_transfer_sync_write(peer, [src.ctypes.data], [other.ctypes.data], [4096])
    assert rc < 0
    # Past the end of the registered range.
    rc2 = a.batch_transfer_sync_write(peer, [src.ctypes.data], [dst.ctypes.data + 1024], [4096])
    assert rc2 < 0
    assert not dst.any() and not other.any()


def test_errors_carry_code_and_message(engines):
    a, _ = engines
    with pytest.raises(KVTransferError) as e:
        a.connect("127.0.0.1:1")
    assert e.value.code > 0 and e.value.message
    with pytest.raises(KVTransferError) as e:
        a.unregister(12345)
    assert e.value.code == 6  # UnknownSegment


def test_library_is_found_through_kvtransfer_lib(tmp_path):
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "custom-libkvtransfer.so"
    shutil.copy(kvtransfer.lib.kvtransfer_path, copy)
    env = dict(__import__("os").environ, KVTRANSFER_LIB=str(copy))
    out = subprocess.run(
        [sys.executable, "-c", "import kvtransfer; print(kvtransfer.lib.kvtransfer_path)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == str(copy)
    assert _lib.candidates()[0] != copy  # only the child saw the variable
