import time

import numpy as np
import pytest

from kvtransfer import KVArgs, KVManager, KVPoll


def wait_for(cond, timeout=30.0, what="condition"):
    until = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > until:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.0002)


def wait_state(room, state, timeout=30.0):
    wait_for(lambda: room.poll() == state, timeout, f"{type(room).__name__} {state.name} (now {room.poll().name})")


class Side:
    """A manager and the numpy memory its layout points into: `kv[layer, page]` is one page."""

    def __init__(self, role, layers, pages, item, aux_slots=8, aux_item=64, room_timeout_ms=30000):
        self.kv = np.zeros((layers, pages, item), dtype=np.uint8)
        self.aux = np.zeros((aux_slots, aux_item), dtype=np.uint8)
        base = self.kv.ctypes.data
        args = KVArgs(
            kv_data_ptrs=[base + l * pages * item for l in range(layers)],
            kv_data_lens=[pages * item] * layers,
            kv_item_lens=[item] * layers,
            aux_data_ptrs=[self.aux.ctypes.data],
            aux_data_lens=[self.aux.nbytes],
            aux_item_lens=[aux_item],
        )
        self.mgr = KVManager(args, role, transport="tcp", room_timeout_ms=room_timeout_ms)

    def fill(self, seed=1):
        rng = np.random.default_rng(seed)
        self.kv[...] = rng.integers(1, 256, size=self.kv.shape, dtype=np.uint8)
        self.aux[...] = rng.integers(1, 256, size=self.aux.shape, dtype=np.uint8)


@pytest.fixture
def pair():
    """A prefill and a decode side (small layout)."""
    p = Side("prefill", 2, 32, 4096)
    d = Side("decode", 2, 32, 4096)
    p.fill()
    yield p, d
    d.mgr.close()
    p.mgr.close()


def scattered(n, pool, seed):
    """n distinct pages out of pool, in runs of 1..5 at random places."""
    rng = np.random.default_rng(seed)
    used = np.zeros(pool, dtype=bool)
    out = []
    while len(out) < n:
        run = int(rng.integers(1, 6))
        start = int(rng.integers(0, pool))
        for p in range(start, min(start + run, pool)):
            if len(out) < n and not used[p]:
                used[p] = True
                out.append(p)
    return np.array(out, dtype=np.int32)


__all__ = ["Side", "KVPoll", "scattered", "wait_for", "wait_state"]
