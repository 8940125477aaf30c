"""Shared helpers: KV sides backed by numpy memory, page lists, waiting on room states."""

from __future__ import annotations

import random
import time
from typing import Callable, List

import numpy as np
import pytest

import kvtransfer
from kvtransfer import KVArgs, KVManager, KVPoll

AUX_ITEMS = (64, 512)  # two aux buffers (e.g. output ids, hidden states), 8 slots each
AUX_SLOTS = 8


def wait_for(what: str, pred: Callable[[], bool], timeout: float = 10.0) -> None:
    until = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > until:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.0005)


def wait_state(room, want: KVPoll, timeout: float = 10.0) -> None:
    """Waits until ``room.poll() == want``; fails at once on an unexpected final state."""

    def reached() -> bool:
        s = room.poll()
        if s == want:
            return True
        if s in (KVPoll.Failed, KVPoll.Success):
            raise AssertionError(f"room {room.bootstrap_room} is {s.name} ({room.failure_reason()}), wanted {want.name}")
        return False

    wait_for(f"room {room.bootstrap_room} {want.name}", reached, timeout)


def wait_final(room, timeout: float = 10.0) -> KVPoll:
    wait_for(f"room {room.bootstrap_room} final", lambda: room.poll() in (KVPoll.Failed, KVPoll.Success), timeout)
    return room.poll()


def scattered(n: int, pool: int, seed: int) -> List[int]:
    """``n`` distinct pages of ``pool``: runs of 1..5 consecutive pages at shuffled places."""
    rng = random.Random(seed)
    used = [False] * pool
    out: List[int] = []
    while len(out) < n:
        run, start = rng.randint(1, 5), rng.randrange(pool)
        for p in range(start, min(start + run, pool)):
            if len(out) < n and not used[p]:
                used[p] = True
                out.append(p)
    return out


class Side:
    """One KV manager over numpy memory: ``mem[layer, page]`` is one page (MLA: one buffer
    per layer), plus ``AUX_ITEMS`` aux buffers of ``AUX_SLOTS`` slots."""

    def __init__(self, role, layers: int, pages: int, item: int, **mgr_kwargs):
        self.layers, self.pages, self.item = layers, pages, item
        self.mem = np.zeros((layers, pages, item), dtype=np.uint8)
        self.aux = [np.zeros((AUX_SLOTS, n), dtype=np.uint8) for n in AUX_ITEMS]
        base = self.mem.ctypes.data
        args = KVArgs(
            kv_data_ptrs=[base + l * pages * item for l in range(layers)],
            kv_data_lens=[pages * item] * layers,
            kv_item_lens=[item] * layers,
            aux_data_ptrs=[a.ctypes.data for a in self.aux],
            aux_data_lens=[a.nbytes for a in self.aux],
            aux_item_lens=list(AUX_ITEMS),
        )
        mgr_kwargs.setdefault("transport", "tcp")
        self.mgr = KVManager(args, role, keepalive=(self.mem, self.aux), **mgr_kwargs)
        self.rooms: list = []

    def fill(self, salt: int = 1) -> None:
        """A distinct pattern per (layer, page, offset) and per aux byte."""
        words = self.pages * self.item // 8
        for l in range(self.layers):
            layer = self.mem[l].reshape(-1).view(np.uint64)
            layer[:] = np.arange(words, dtype=np.uint64) + np.uint64((l + 1) * salt) * np.uint64(1 << 40)
            layer *= np.uint64(0x9E3779B97F4A7C15)
        for i, a in enumerate(self.aux):
            a.reshape(-1)[:] = (np.arange(a.size) * (7 + i) + salt) % 251 + 1

    def untouched(self) -> bool:
        return not self.mem.any() and not any(a.any() for a in self.aux)

    def sender(self, room: int) -> kvtransfer.KVSender:
        s = kvtransfer.KVSender(self.mgr, self.mgr.bootstrap_addr, room)
        self.rooms.append(s)
        return s

    def receiver(self, prefill: "Side", room: int) -> kvtransfer.KVReceiver:
        r = kvtransfer.KVReceiver(self.mgr, prefill.mgr.bootstrap_addr, room)
        self.rooms.append(r)
        return r

    def close(self) -> None:
        # Rooms first, then the manager; the memory goes after both (it is ours).
        for r in self.rooms:
            r.close()
        self.mgr.close()


@pytest.fixture
def sides():
    """``make(role, layers, pages, item, **kw)`` -> Side; all closed at the end of the test."""
    made: List[Side] = []

    def make(role, layers, pages, item, **kw) -> Side:
        s = Side(role, layers, pages, item, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
