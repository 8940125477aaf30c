"""One side of the network-fault tests (test_faults.py), run inside a network namespace:
``faults_peer.py ROLE CONFIG_JSON``.

CONFIG_JSON holds ``layers``, ``pages`` (the pool), ``item`` (page bytes), ``aux_slots`` and
``manager`` (keywords for :class:`kvtransfer.KVManager`: ``listen``, timeouts...). The process
prints its manager's bootstrap address, then answers each JSON command line on stdin with one
JSON line: ``{"ok": ...}`` or ``{"error": "..."}``. Exits at the end of stdin.

Commands (``op``): ``fill`` (a pattern that differs per ``salt``), ``zero`` / ``zeroed``
(pages), ``sender`` / ``receiver`` (create and init rooms), ``send`` (a chunk of a sender's
pages), ``wait`` (rooms reach a state), ``final`` (rooms are final: state, failure kind, the
state they failed in and the CLOCK_MONOTONIC time they were first seen final, which the test
compares with its own clock), ``digest`` (BLAKE2b of a room's pages in every layer and its aux
slot: equal digests at both ends mean every byte landed), ``close``, ``listen`` / ``rtt``
(a bare TCP listener, and timed TCP connects to one, to measure the path's round trip).
"""
from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time

import numpy as np

from kvtransfer import KVArgs, KVManager, KVPoll, KVReceiver, KVSender, KVTransferError

AUX_ITEM = 128
FINAL = (KVPoll.Failed, KVPoll.Success)


class Peer:
    def __init__(self, role: str, cfg: dict):
        self.role = role
        layers, pages, item = cfg["layers"], cfg["pages"], cfg["item"]
        self.mem = np.zeros((layers, pages, item), dtype=np.uint8)
        self.aux = np.zeros((cfg["aux_slots"], AUX_ITEM), dtype=np.uint8)
        base = self.mem.ctypes.data
        args = KVArgs(
            kv_data_ptrs=[base + l * pages * item for l in range(layers)],
            kv_data_lens=[pages * item] * layers,
            kv_item_lens=[item] * layers,
            aux_data_ptrs=[self.aux.ctypes.data],
            aux_data_lens=[self.aux.nbytes],
            aux_item_lens=[AUX_ITEM],
        )
        self.mgr = KVManager(args, role, transport="tcp", keepalive=(self.mem, self.aux), **cfg["manager"])
        self.rooms: dict = {}  # room id -> (handle, pages, aux slot)
        self.listener = None

    # --- memory -------------------------------------------------------------------------------
    def fill(self, salt: int) -> None:
        words = self.mem.shape[1] * self.mem.shape[2] // 8
        for l in range(self.mem.shape[0]):
            layer = self.mem[l].reshape(-1).view(np.uint64)
            layer[:] = np.arange(words, dtype=np.uint64) + np.uint64((l + 1) * salt) * np.uint64(1 << 40)
            layer *= np.uint64(0x9E3779B97F4A7C15)
        self.aux.reshape(-1)[:] = (np.arange(self.aux.size) * 7 + salt) % 251 + 1

    def zero(self, pages) -> None:
        self.mem[:, pages] = 0

    def zeroed(self, pages) -> bool:
        return not self.mem[:, pages].any()

    def digest(self, room: int) -> str:
        _, pages, aux = self.rooms[room]
        h = hashlib.blake2b(digest_size=16)
        for l in range(self.mem.shape[0]):
            h.update(self.mem[l, pages].tobytes())
        h.update(self.aux[aux].tobytes())
        return h.hexdigest()

    # --- rooms --------------------------------------------------------------------------------
    def sender(self, room: int, pages, aux: int) -> None:
        s = KVSender(self.mgr, None, room)
        self.rooms[room] = (s, pages, aux)
        s.init(len(pages), aux)

    def receiver(self, room: int, prefill: str, pages, aux: int) -> None:
        r = KVReceiver(self.mgr, prefill, room)
        self.rooms[room] = (r, pages, aux)
        r.init(np.array(pages, dtype=np.int32), aux)

    def send(self, room: int, lo: int, hi: int, last: bool) -> None:
        s, pages, _ = self.rooms[room]
        s.send(np.array(pages[lo:hi], dtype=np.int32), is_last=last)

    def wait(self, rooms, state: str, timeout: float) -> dict:
        want = KVPoll[state]
        until = time.monotonic() + timeout
        while True:
            states = {r: self.rooms[r][0].poll() for r in rooms}
            wrong = {r: s for r, s in states.items() if s in FINAL and s != want}
            if wrong:
                raise AssertionError(f"rooms ended early (wanted {state}): {self._describe(wrong)}")
            if all(s == want for s in states.values()):
                return {str(r): s.name for r, s in states.items()}
            if time.monotonic() > until:
                raise AssertionError(f"after {timeout} s rooms are {self._describe(states)}, not {state}")
            time.sleep(0.0005)

    def final(self, rooms, timeout: float) -> dict:
        """Polls until every room is final; reports when each was first seen final."""
        seen: dict = {}
        until = time.monotonic() + timeout
        while len(seen) < len(rooms):
            now = time.monotonic()
            for r in rooms:
                if r not in seen and self.rooms[r][0].poll() in FINAL:
                    seen[r] = now
            if len(seen) < len(rooms):
                if now > until:
                    left = {r: self.rooms[r][0].poll() for r in rooms if r not in seen}
                    raise AssertionError(f"after {timeout} s rooms are still {self._describe(left)}")
                time.sleep(0.0005)
        out = {}
        for r in rooms:
            room = self.rooms[r][0]
            state = room.poll()
            entry = {"state": state.name, "t": seen[r]}
            if state == KVPoll.Failed:
                try:
                    room.failure_exception()
                except KVTransferError as e:
                    entry["kind"] = getattr(e.kind, "name", e.kind)
                    entry["failed_in"] = None if e.failed_in is None else KVPoll(e.failed_in).name
                    entry["reason"] = e.message
            out[str(r)] = entry
        return out

    def _describe(self, states: dict) -> str:
        return ", ".join(
            f"{r}: {s.name}" + (f" ({self.rooms[r][0].failure_reason()})" if s == KVPoll.Failed else "")
            for r, s in states.items()
        )

    def close(self, rooms) -> None:
        for r in rooms:
            self.rooms.pop(r)[0].close()

    # --- the path's round trip ----------------------------------------------------------------
    def listen(self) -> int:
        """A bare TCP listener on the manager's address; a thread accepts and closes."""
        host = self.mgr.bootstrap_addr.rsplit(":", 1)[0]
        self.listener = socket.create_server((host, 0), backlog=64)

        def serve(sock):
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                conn.close()

        threading.Thread(target=serve, args=(self.listener,), daemon=True).start()
        return self.listener.getsockname()[1]

    @staticmethod
    def rtt(host: str, port: int, n: int) -> list:
        """``n`` TCP connects, each timed from connect() to its return (one round trip)."""
        took = []
        for _ in range(n):
            with socket.socket() as s:
                s.settimeout(5)
                t = time.monotonic()
                s.connect((host, port))
                took.append((time.monotonic() - t) * 1e3)
        return took

    def shutdown(self) -> None:
        self.close(list(self.rooms))
        self.mgr.close()
        if self.listener is not None:
            self.listener.close()


def main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    peer = Peer(role, cfg)
    print(peer.mgr.bootstrap_addr, flush=True)
    ops = {
        "fill": peer.fill, "zero": peer.zero, "zeroed": peer.zeroed, "digest": peer.digest,
        "sender": peer.sender, "receiver": peer.receiver, "send": peer.send, "wait": peer.wait,
        "final": peer.final, "close": peer.close, "listen": peer.listen, "rtt": peer.rtt,
    }
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = {"ok": ops[cmd.pop("op")](**cmd)}
        except Exception as e:  # reported to the test, which fails with it
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    peer.shutdown()


if __name__ == "__main__":
    main()
