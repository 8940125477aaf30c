"""One server (prefill or decode, ``tp`` ranks) in its own process, for the killed-peer tests.

Run as ``python peer.py '<json>'`` by test_sglang_mooncake.py; it prints one line per
step on stdout and, after the last, blocks on stdin until the test SIGKILLs it.

- prefill: starts SGLang's bootstrap server and the prefill ranks (READY), opens the
  room, waits for the decode side's metadata, sends the first chunk (SENT).
- decode: starts the decode ranks (READY), opens the room on the given prefill and
  sends its metadata (METADATA), waits until the first chunk's pages hold the prefill
  ranks' bytes (LANDED).
"""

import json
import sys

import numpy as np

import harness as h


def main() -> None:
    cfg = json.loads(sys.argv[1])
    h.install_mooncake_engine(cfg["engine"])
    layout = h.Layout(**cfg["layout"])
    src = np.asarray(cfg["src_pages"], dtype=np.int64)
    dst = np.asarray(cfg["dst_pages"], dtype=np.int64)
    first = cfg["first_chunk"]
    if cfg["role"] == "prefill":
        server = h.Server(
            "prefill", cfg["tp"], layout, seed=cfg["seed"], bootstrap_port=cfg["bootstrap_port"], backend=cfg["backend"]
        )
        print("READY", flush=True)
        room = h.PrefillRoom(server, cfg["room"])
        room.wait(h.KVPoll.WaitingForInput, cfg["timeout"])
        room.init(len(src), cfg["aux_index"])
        room.set_aux(cfg["aux_index"])
        room.send(src[:first])
        print("SENT", flush=True)
    else:
        server = h.Server("decode", cfg["tp"], layout, seed=cfg["seed"], backend=cfg["backend"])
        print("READY", flush=True)
        room = h.DecodeRoom(server, cfg["prefill_addr"], cfg["room"], timeout=cfg["timeout"])
        room.send_metadata(dst, cfg["aux_index"])
        print("METADATA", flush=True)
        for rank in server.ranks:
            expected = h.expected_pages(h.pool_contents(layout, "prefill", cfg["seed"], rank.rank), src[:first])
            h.wait_until(
                f"chunk 1 on decode rank {rank.rank}",
                lambda: np.array_equal(rank.pages(dst[:first]), expected),
                cfg["timeout"],
            )
        print("LANDED", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
