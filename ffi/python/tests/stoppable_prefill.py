"""A prefill process for the hung-peer tests: ``stoppable_prefill.py HEARTBEAT_MS ROOM...``.

Prints its bootstrap address, creates a sender per room (2 pages each, pages 2k and 2k+1 for
the k-th room), prints ``ready`` once every room is WaitingForInput, then sends every room
when a line ``send`` arrives on stdin and prints ``sent``. Exits at the end of stdin.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from conftest import Side, wait_state  # noqa: E402
from kvtransfer import KVPoll  # noqa: E402


def main() -> None:
    heartbeat_ms, rooms = int(sys.argv[1]), [int(r) for r in sys.argv[2:]]
    side = Side("prefill", 1, 2 * len(rooms), 4096, heartbeat_timeout_ms=heartbeat_ms)
    side.fill()
    print(side.mgr.bootstrap_addr, flush=True)
    senders = []
    for room in rooms:
        s = side.sender(room)
        s.init(2)
        senders.append(s)
    for s in senders:
        wait_state(s, KVPoll.WaitingForInput, 30)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "send":
            for k, s in enumerate(senders):
                s.send(np.array([2 * k, 2 * k + 1], dtype=np.int32))
            print("sent", flush=True)
    side.close()


if __name__ == "__main__":
    main()
