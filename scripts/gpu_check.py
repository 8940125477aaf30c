"""The Python half of scripts/gpu-check.sh: the kvtransfer package with torch CUDA tensors.

Prints one ``CHECK <name> | PASS|FAIL|SKIP | <detail>`` line per check; exits 1 if any
failed. Needs torch with CUDA; the package is found on PYTHONPATH (the script sets it).
"""

from __future__ import annotations

import os
import sys
import time
import traceback

failed = False


def check(name):
    def run(fn):
        global failed
        try:
            detail = fn()
            print(f"CHECK {name} | PASS | {detail}", flush=True)
        except Exception as e:  # every failure is reported, the next check still runs
            failed = True
            last = traceback.extract_tb(e.__traceback__)[-1]
            print(f"CHECK {name} | FAIL | {type(e).__name__}: {e} (line {last.lineno})", flush=True)
        return fn

    return run


try:
    import torch
except ImportError as e:
    print(f"CHECK python torch | SKIP | {e}")
    sys.exit(0)
# KVT_GPU_CHECK_DEVICE=cpu runs the same code on host tensors: a dry run of this script on a
# machine without a GPU (the classification check then fails, as it should).
dev = torch.device(os.environ.get("KVT_GPU_CHECK_DEVICE", "cuda:0"))
if dev.type == "cuda" and not torch.cuda.is_available():
    print("CHECK python torch cuda | SKIP | torch.cuda.is_available() is False")
    sys.exit(0)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

import numpy as np

import kvtransfer
import kvtransfer.mooncake as mc
from kvtransfer import KVArgs, KVManager, KVPoll, TransferEngine

LAYERS, PAGES, ITEM = 8, 256, 36 * 1024


def gb_s(nbytes: int, secs: float) -> str:
    return f"{nbytes / secs / 1e9:.2f} GB/s"


@check("python library")
def _():
    return f"{kvtransfer.library_path()} (ABI {kvtransfer.abi_version()})"


@check("classify torch tensors")
def _():
    a, b = TransferEngine(transport="tcp"), TransferEngine(transport="tcp")
    cuda_t = torch.zeros(1 << 20, dtype=torch.uint8, device=dev)
    pinned = torch.zeros(1 << 20, dtype=torch.uint8).pin_memory()
    a.register(cuda_t.data_ptr(), cuda_t.numel())
    a.register(pinned.data_ptr(), pinned.numel())
    kinds = {s.base: s.kind for s in b.remote_segments(b.connect(a.local_addr))}
    assert kinds[cuda_t.data_ptr()] == "gpu", kinds
    assert kinds[pinned.data_ptr()] == "host", kinds
    b.close()
    a.close()
    return "cuda tensor -> gpu, pinned tensor -> host (as a peer sees them)"


def kv_pools(fill: bool):
    pool = [torch.zeros(PAGES * ITEM, dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
    if fill:
        for i, t in enumerate(pool):
            t.copy_(torch.randint(0, 256, (PAGES * ITEM,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)).to(dev))
    return pool


def scattered(n: int, seed: int):
    return np.random.default_rng(seed).permutation(PAGES)[:n].astype(np.int32)


@check("paged GPU->TCP->GPU (36 KiB pages)")
def _():
    src, dst = kv_pools(True), kv_pools(False)
    a, b = TransferEngine(transport="tcp"), TransferEngine(transport="tcp")
    for t in src:
        a.register(t.data_ptr(), t.numel())
    for t in dst:
        b.register(t.data_ptr(), t.numel())
    table = TransferEngine.page_buffers([t.data_ptr() for t in src], [t.data_ptr() for t in dst], [ITEM] * LAYERS)
    local = np.arange(PAGES, dtype=np.int32)
    remote = scattered(PAGES, 1)
    a.wait(a.submit_pages(b.local_addr, kvtransfer.OP_WRITE, table, local, remote))  # warm-up
    start = time.perf_counter()
    rounds = 3
    for _ in range(rounds):
        a.wait(a.submit_pages(b.local_addr, kvtransfer.OP_WRITE, table, local, remote))
    secs = time.perf_counter() - start
    sync()
    idx_l, idx_r = torch.tensor(local, device=dev).long(), torch.tensor(remote, device=dev).long()
    for s, d in zip(src, dst):
        assert torch.equal(s.view(PAGES, ITEM)[idx_l], d.view(PAGES, ITEM)[idx_r])
    a.close()
    b.close()
    return f"{LAYERS} layers x {PAGES} pages verified, {gb_s(rounds * LAYERS * PAGES * ITEM, secs)}"


@check("mooncake drop-in with CUDA pointers")
def _():
    src, dst = kv_pools(True)[:2], kv_pools(False)[:2]
    a, b = mc.TransferEngine(), mc.TransferEngine()
    assert a.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0, a.last_error
    assert b.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0, b.last_error
    assert a.batch_register_memory([t.data_ptr() for t in src], [t.numel() for t in src]) == 0, a.last_error
    assert b.batch_register_memory([t.data_ptr() for t in dst], [t.numel() for t in dst]) == 0, b.last_error
    target = f"127.0.0.1:{b.get_rpc_port()}"
    pages = scattered(64, 2)
    srcs = [src[0].data_ptr() + i * ITEM for i in range(64)]
    dsts = [dst[0].data_ptr() + int(p) * ITEM for p in pages]
    start = time.perf_counter()
    assert a.batch_transfer_sync_write(target, srcs, dsts, [ITEM] * 64) == 0, a.last_error
    secs = time.perf_counter() - start
    sync()
    got = dst[0].view(PAGES, ITEM)[torch.tensor(pages, device=dev).long()]
    assert torch.equal(got, src[0].view(PAGES, ITEM)[:64])
    # Read back into the second source pool.
    src[1].zero_()
    sync()
    assert a.batch_transfer_sync_read(target, [src[1].data_ptr()], [dst[0].data_ptr()], [PAGES * ITEM]) == 0, a.last_error
    sync()
    assert torch.equal(src[1], dst[0])
    a.close()
    b.close()
    return f"64 x 36 KiB scattered writes verified ({gb_s(64 * ITEM, secs)}), a pool read back"


@check("KV room with CUDA KV buffers")
def _():
    src, dst = kv_pools(True), kv_pools(False)
    aux_p, aux_d = np.arange(64, dtype=np.uint8), np.zeros(64, dtype=np.uint8)

    def args(pool, aux):
        a = KVArgs()
        a.kv_data_ptrs = [t.data_ptr() for t in pool]
        a.kv_data_lens = [t.numel() for t in pool]
        a.kv_item_lens = [ITEM] * LAYERS
        a.aux_data_ptrs, a.aux_data_lens, a.aux_item_lens = [aux.ctypes.data], [aux.nbytes], [8]
        return a

    prefill = KVManager(args(src, aux_p), "prefill", transport="tcp", keepalive=(src, aux_p))
    decode = KVManager(args(dst, aux_d), "decode", transport="tcp", keepalive=(dst, aux_d))
    local, remote = np.arange(PAGES, dtype=np.int32), scattered(PAGES, 3)
    rx = kvtransfer.KVReceiver(decode, prefill.bootstrap_addr, 7)
    rx.init(remote, 2)
    tx = kvtransfer.KVSender(prefill, None, 7)
    tx.init(PAGES, 1)
    deadline = time.time() + 60
    while tx.poll() == KVPoll.Bootstrapping and time.time() < deadline:
        time.sleep(0.001)
    start = time.perf_counter()
    tx.send(local[: PAGES // 2], is_last=False)
    tx.send(local[PAGES // 2 :], is_last=True)
    while rx.poll() not in (KVPoll.Success, KVPoll.Failed) and time.time() < deadline:
        time.sleep(0.0005)
    secs = time.perf_counter() - start
    assert rx.poll() == KVPoll.Success, rx.failure_reason()
    sync()
    il, ir = torch.tensor(local, device=dev).long(), torch.tensor(remote, device=dev).long()
    for s, d in zip(src, dst):
        assert torch.equal(s.view(PAGES, ITEM)[il], d.view(PAGES, ITEM)[ir])
    assert np.array_equal(aux_d[16:24], aux_p[8:16])
    for room in (tx, rx):
        room.close()
    prefill.close()
    decode.close()
    return f"{LAYERS} x {PAGES} x 36 KiB in 2 chunks + aux verified, {gb_s(LAYERS * PAGES * ITEM, secs)}"


sys.exit(1 if failed else 0)
