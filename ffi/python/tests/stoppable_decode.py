"""A decode process for the back-pressure test: ``stoppable_decode.py ROOMS PAGES PAGE_BYTES``.

Prints its bootstrap address; on a line ``recv FIRST_ROOM PREFILL_ADDR`` it creates ROOMS
receivers (room ids from FIRST_ROOM on), each over PAGES pages of its own, and prints
``ready``. Exits at the end of stdin.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import Side  # noqa: E402
from kvtransfer import KVReceiver  # noqa: E402


def main() -> None:
    rooms, pages, item = (int(a) for a in sys.argv[1:4])
    side = Side("decode", 1, rooms * pages, item)
    print(side.mgr.bootstrap_addr, flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["recv"]:
            for k in range(rooms):
                r = KVReceiver(side.mgr, words[2], int(words[1]) + k)
                r.init(list(range(k * pages, (k + 1) * pages)))
                side.rooms.append(r)
            print("ready", flush=True)
    side.close()


if __name__ == "__main__":
    main()
