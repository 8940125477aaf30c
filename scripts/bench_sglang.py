"""A DeepSeek-V3 request through SGLang 0.5.23's real PD code path, on several backends, in
one run with interleaved rounds (run by scripts/bench-sglang.sh, which sets up the venv).

Each round of each configuration is a fresh process holding a prefill and a decode server
(TP 1, SGLang's real managers, senders, receivers and bootstrap server; host-memory KV over
TCP loopback). A request is 61 layers x 256 pages x 36 KiB (page size 32, MLA) into scattered
destination pages of a 320-page decode pool, plus the aux slot, sent in 4 chunks. After one
untimed warm-up request, ``--rooms`` requests are timed one after another: from the first
``send`` to Success on both sides. CPU seconds are the process's (both sides, every thread).
The first and last timed requests are verified page by page.

Configurations (``--configs``, comma-separated):
- ``mooncake-on-kvtransfer``: SGLang's Mooncake backend over ``kvtransfer.mooncake``;
- ``kvtransfer``: the native backend (``--disaggregation-transfer-backend kvtransfer``);
- ``mooncake``: SGLang's Mooncake backend over the real Mooncake engine (MC_FORCE_TCP=1, and
  its per-peer TCP queue bounds raised to 65535 as deployments do: at the default 1024 a
  DeepSeek-V3 chunk is rejected), when ``mooncake.engine`` is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "..", "ffi", "python", "tests", "with_sglang")
PAGES, DECODE_POOL, CHUNKS = 256, 320, 4

CONFIGS = {
    # name: (SGLang backend, mooncake.engine provider)
    "mooncake-on-kvtransfer": ("mooncake", "kvtransfer"),
    "kvtransfer": ("kvtransfer", "kvtransfer"),
    "mooncake": ("mooncake", "mooncake"),
}


def run_one(config: str, rooms: int) -> dict:
    """One round of one configuration, in this process."""
    backend, engine = CONFIGS[config]
    sys.path.insert(0, HARNESS)
    import harness as h
    import numpy as np

    os.environ.update(h.SGLANG_ENV)
    if engine == "mooncake":
        os.environ["MC_FORCE_TCP"] = "1"
        # Mooncake's TCP transport rejects transfers beyond 1024 queued per peer, which a
        # DeepSeek-V3 chunk exceeds; deployments raise the bounds as here.
        os.environ.setdefault("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "65535")
        os.environ.setdefault("MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER", "65535")
        os.environ.setdefault("MC_TCP_ADMISSION_TIMEOUT_MS", "120000")
    h.install_mooncake_engine(engine)
    layout = h.Layout(layers=61, page_size=32, token_bytes=1152, prefill_pages=PAGES, decode_pages=DECODE_POOL)
    prefill = h.Server("prefill", 1, layout, seed=1, backend=backend)
    decode = h.Server("decode", 1, layout, seed=1, backend=backend)
    src = np.arange(PAGES, dtype=np.int64)
    per_chunk = PAGES // CHUNKS
    wall, cpu = [], []
    try:
        for i in range(rooms + 1):
            room = 0xBE7C_0000 + i
            dst = h.scattered_pages(PAGES, DECODE_POOL, seed=100 + i)
            p = h.PrefillRoom(prefill, room)
            d = h.DecodeRoom(decode, prefill.bootstrap_addr, room)
            d.send_metadata(dst, 1)
            p.wait(h.KVPoll.WaitingForInput, 30)
            p.init(PAGES, 2)
            p.set_aux(2)
            t0, c0 = time.perf_counter(), time.process_time()
            for c in range(CHUNKS):
                p.send(src[c * per_chunk : (c + 1) * per_chunk])
            d.wait(h.KVPoll.Success, 120)
            p.wait(h.KVPoll.Success, 120)
            t1, c1 = time.perf_counter(), time.process_time()
            if i > 0:
                wall.append(t1 - t0)
                cpu.append(c1 - c0)
            if i in (1, rooms):
                h.assert_pages(decode.ranks[0], dst, h.expected_pages(prefill.ranks[0].kv, src), f"request {i}")
            p.clear()
            d.clear()
    finally:
        prefill.close()
        decode.close()
    return {
        "config": config,
        "bytes": PAGES * layout.buffers * layout.item_len,
        "wall_s": wall,
        "cpu_s": cpu,
    }


def mooncake_available() -> bool:
    code = "import mooncake.engine"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="mooncake-on-kvtransfer,kvtransfer,mooncake")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rooms", type=int, default=5, help="timed requests per round")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one round of this config
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.rooms)), flush=True)
        return 0

    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r} (known: {', '.join(CONFIGS)})")
    if "mooncake" in configs and not mooncake_available():
        print("bench-sglang: the real Mooncake engine is not importable here; leaving it out", file=sys.stderr)
        configs.remove("mooncake")
    results = {c: {"wall_s": [], "cpu_s": [], "bytes": 0} for c in configs}
    for r in range(a.rounds):
        for c in configs:  # interleaved: every configuration once per round
            out = subprocess.run(
                [sys.executable, "-W", "ignore", __file__, "--one", c, "--rooms", str(a.rooms)],
                capture_output=True, text=True, timeout=1200,
            )
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"bench-sglang: {c} failed in round {r + 1}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            results[c]["wall_s"] += got["wall_s"]
            results[c]["cpu_s"] += got["cpu_s"]
            results[c]["bytes"] = got["bytes"]
            print(f"round {r + 1} {c}: median {1e3 * statistics.median(got['wall_s']):.1f} ms", file=sys.stderr)

    rows = []
    for c in configs:
        w, cpu, nbytes = results[c]["wall_s"], results[c]["cpu_s"], results[c]["bytes"]
        ms = 1e3 * statistics.median(w)
        rows.append(dict(config=c, requests=len(w), ms=ms, gbps=nbytes / (ms / 1e3) / 1e9,
                         cpu_s=statistics.median(cpu), bytes=nbytes))
    base = next((r for r in rows if r["config"] == "mooncake"), None)
    print(f"\nDeepSeek-V3 request ({PAGES} pages x 61 layers x 36 KiB = {rows[0]['bytes'] / 1e6:.1f} MB, "
          f"{CHUNKS} chunks), SGLang 0.5.23, TCP loopback; medians of {a.rounds} rounds x {a.rooms} requests\n")
    print("| configuration | GB/s | ms per request | CPU s per request | vs Mooncake's engine |")
    print("|---|---|---|---|---|")
    for r in rows:
        vs = f"{base['ms'] / r['ms']:.2f}x" if base else "n/a"
        print(f"| {r['config']} | {r['gbps']:.2f} | {r['ms']:.1f} | {r['cpu_s']:.3f} | {vs} |")
    if a.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
