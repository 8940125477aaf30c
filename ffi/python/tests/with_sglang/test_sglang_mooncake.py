"""SGLang 0.5.23's real PD code, CPU only, over TCP, with each test run on two backends:

- ``mooncake``: SGLang's own MooncakeKVManager / MooncakeKVSender / MooncakeKVReceiver /
  MooncakeKVBootstrapServer (sglang/srt/disaggregation/mooncake/conn.py on common/conn.py)
  with ``mooncake.engine.TransferEngine`` being kvtransfer's drop-in
  (``kvtransfer.mooncake.install()``; ``KVT_SGLANG_MOONCAKE`` picks another, see
  harness.install_mooncake_engine);
- ``kvtransfer``: the native backend (``--disaggregation-transfer-backend kvtransfer``,
  registered as its plugin does), one paged library call per chunk.

They move host-memory KV between a prefill and a decode "server" with 2 ranks each. Every
byte that should arrive is compared, and every byte that should not is checked unchanged.
"""

import json
import os
import selectors
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("sglang")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness, also under --import-mode=importlib
import harness as h  # noqa: E402  (imports SGLang)
from harness import KVPoll  # noqa: E402

TP = 2
PAGES = 20  # pages in the request
CHUNKS = (8, 8, 4)  # chunked prefill: pages per send, the last one carries the aux
SRC_AUX, DST_AUX = 3, 5  # metadata slots on prefill and decode

MLA = h.Layout()  # DeepSeek-like MLA: 4 layers, 4-token pages of 1152 B/token (4.5 KiB)
MHA = h.Layout(mla=False, token_bytes=512)  # K and V buffers per layer, 2 heads x 128 x bf16 per rank


@pytest.fixture(scope="module")
def mooncake_engine():
    """The ``mooncake.engine`` SGLang runs on: kvtransfer's drop-in unless
    KVT_SGLANG_MOONCAKE says otherwise."""
    which = h.install_mooncake_engine()
    yield which
    h.uninstall_mooncake_engine(which)


@pytest.fixture
def sglang_env(monkeypatch):
    """SGLang's environment for these tests; returns a setter for more variables
    (SGLang reads them when a manager is built)."""
    for name, value in h.SGLANG_ENV.items():
        monkeypatch.setenv(name, value)
    return lambda name, value: monkeypatch.setenv(name, str(value))


@pytest.fixture(params=["mooncake", "kvtransfer"])
def backend(request):
    """``--disaggregation-transfer-backend``: SGLang's Mooncake backend (on the Mooncake
    engine above), or kvtransfer's native backend (its plugin's classes, paged calls)."""
    return request.param


@pytest.fixture
def servers(mooncake_engine, sglang_env, backend):
    """``make(mode, layout, **kw)`` -> harness.Server; all closed at the end."""
    made = []

    def make(mode, layout, **kw):
        server = h.Server(mode, TP, layout, seed=kw.pop("seed", 7), backend=backend, **kw)
        made.append(server)
        return server

    yield make
    for server in reversed(made):
        server.close()
    h.reset_receiver_sockets()
    h.reset_process_context()


def chunks(pages):
    out, at = [], 0
    for n in CHUNKS:
        out.append(pages[at : at + n])
        at += n
    assert at == len(pages)
    return out


def open_room(prefill, decode, room, src, dst):
    """Both sides up to the point where the prefill may send: decode receivers
    initialised and metadata sent, prefill senders WaitingForInput and init()ed."""
    p = h.PrefillRoom(prefill, room)
    assert p.poll() == KVPoll.Bootstrapping, p.describe()
    d = h.DecodeRoom(decode, prefill.bootstrap_addr, room)
    assert d.poll() == KVPoll.WaitingForInput, d.describe()
    d.send_metadata(dst, DST_AUX)
    p.wait(KVPoll.WaitingForInput, 10)
    p.init(len(src), SRC_AUX)
    p.set_aux(SRC_AUX)
    return p, d


def wait_landed(prefill, decode, src, dst, what):
    """Bounded poll until every decode rank holds its prefill rank's ``src`` pages at ``dst``."""
    for pr, dr in zip(prefill.ranks, decode.ranks):
        expected = h.expected_pages(pr.kv, src)
        h.wait_until(f"{what} on decode rank {dr.rank}", lambda: np.array_equal(dr.pages(dst), expected), 10)


def assert_not_written(decode, dst_pages):
    for dr in decode.ranks:
        assert np.array_equal(dr.pages(dst_pages), dr.kv_before[:, dst_pages]), f"decode rank {dr.rank}: written"
        for i, (a, before) in enumerate(zip(dr.aux, dr.aux_before)):
            assert np.array_equal(a, before), f"decode rank {dr.rank}: aux buffer {i} written"


@pytest.mark.parametrize("layout", [MLA, MHA], ids=["mla", "mha"])
def test_two_ranks_chunked_scattered_pages_and_aux(servers, layout):
    prefill = servers("prefill", layout)
    decode = servers("decode", layout)
    room = 0x5EED_0000_0001
    src = h.scattered_pages(PAGES, layout.prefill_pages, seed=11)
    dst = h.scattered_pages(PAGES, layout.decode_pages, seed=12)
    assert len(set(dst.tolist())) == PAGES and not np.array_equal(np.diff(dst), np.ones(PAGES - 1))
    p, d = open_room(prefill, decode, room, src, dst)
    (src1, src2, src3), (dst1, dst2, dst3) = chunks(src), chunks(dst)

    p.send(src1)
    wait_landed(prefill, decode, src1, dst1, "chunk 1")
    # Not the last chunk: neither side concludes, later pages and the aux are not written.
    assert p.polls() == [KVPoll.WaitingForInput] * TP, p.describe()
    assert d.polls() == [KVPoll.WaitingForInput] * TP, d.describe()
    assert_not_written(decode, np.concatenate([dst2, dst3]))

    p.send(src2)
    p.send(src3)
    p.wait(KVPoll.Success, 15)
    d.wait(KVPoll.Success, 15)

    for pr, dr in zip(prefill.ranks, decode.ranks):
        # Decode rank r holds prefill rank r's pages (the ranks' data differ), page for page.
        h.assert_pages(dr, dst, h.expected_pages(pr.kv, src), "whole request")
        h.assert_untouched_except(dr, dst, DST_AUX)
        assert h.aux_matches(dr, DST_AUX, pr.aux, SRC_AUX), f"decode rank {dr.rank}: aux slot differs"
        # What decode's metadata gate reads before committing the request.
        assert int(dr.meta.get_buf(DST_AUX)[-1][0]) == room
        # Nothing wrote into the source.
        assert np.array_equal(pr.kv, pr.kv_before), f"prefill rank {pr.rank}: source pages changed"
    other = prefill.ranks[1].kv[:, src]
    assert not np.array_equal(decode.ranks[0].pages(dst), other), "the two prefill ranks' data must differ"

    bytes_per_page = layout.buffers * layout.item_len
    for rank, sender in zip(prefill.ranks, p.parts):
        metric = sender.get_transfer_metric()
        if prefill.backend.value == "kvtransfer":
            # Each chunk went as one paged library call, none through address lists.
            assert (rank.mgr.paged_chunks, rank.mgr.fallback_chunks) == (len(CHUNKS), 0)
            # The library's numbers for the room: the KV pages and the aux slot, which is
            # every byte this rank's engine wrote (its only room).
            aux_bytes = sum(rank.mgr.kv_args.aux_item_lens)
            assert metric.transfer_total_bytes == PAGES * bytes_per_page + aux_bytes
            assert metric.transfer_total_bytes == rank.mgr.engine.metrics()["bytes_written"]
            assert metric.transfer_latency_s is not None and metric.transfer_latency_s > 0
        else:
            # SGLang's count: KV pages only.
            assert metric.transfer_total_bytes == PAGES * bytes_per_page

    # The schedulers clear both sides after Success; nothing of the room is left.
    p.clear()
    d.clear()
    for rank in prefill.ranks + decode.ranks:
        assert room not in rank.mgr.request_status
    for rank in prefill.ranks:
        assert room not in rank.mgr.transfer_infos


def test_prefill_abort(servers, sglang_env):
    """Prefill aborts mid-room (AbortReq on the prefill server).

    SGLang's sender.abort() only marks the room Failed locally: the prefill does not
    tell decode, so decode keeps WaitingForInput until its waiting timeout
    (SGLANG_DISAGGREGATION_WAITING_TIMEOUT, counted from send_metadata), then fails
    the room and sends ABORT, which the prefill acknowledges.
    """
    waiting_timeout = 5
    sglang_env("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", waiting_timeout)
    prefill = servers("prefill", MLA)
    decode = servers("decode", MLA)
    room = 0x5EED_0000_0002
    src = h.scattered_pages(PAGES, MLA.prefill_pages, seed=21)
    dst = h.scattered_pages(PAGES, MLA.decode_pages, seed=22)
    before_metadata = time.monotonic()
    p, d = open_room(prefill, decode, room, src, dst)
    (src1, src2, src3), (dst1, dst2, dst3) = chunks(src), chunks(dst)
    p.send(src1)
    wait_landed(prefill, decode, src1, dst1, "chunk 1")

    p.abort()
    assert p.polls() == [KVPoll.Failed] * TP
    errors = p.failure_exceptions()
    assert [(e.bootstrap_room, e.failure_reason, e.is_from_another_rank) for e in errors] == [
        (room, "Aborted by AbortReq.", False)
    ] * TP
    # An aborted prefill sends nothing more, even if the scheduler still tries.
    p.send(src2)
    p.send(src3)

    assert d.polls() == [KVPoll.WaitingForInput] * TP, d.describe()
    d.wait(KVPoll.Failed, waiting_timeout + 10)
    assert time.monotonic() - before_metadata >= waiting_timeout
    for why in d.failure_reasons():
        assert why is not None and f"Request {room} timed out after" in why and "KVPoll.WaitingForInput" in why, why
    # The timeout sent ABORT to the prefill ranks; they have nothing in flight and ACK.
    h.wait_until("the prefill ranks' ABORT_ACKs", lambda: all(d.abort_release_safe()), 10)
    reasons = d.failure_reasons()
    errors = d.failure_exceptions()
    assert [(e.failure_reason, e.is_from_another_rank) for e in errors] == [(why, False) for why in reasons]

    for pr, dr in zip(prefill.ranks, decode.ranks):
        h.assert_pages(dr, dst1, h.expected_pages(pr.kv, src1), "chunk 1")
        h.assert_untouched_except(dr, dst1, None)


def test_decode_abort(servers):
    """Decode aborts mid-room (AbortReq on the decode server).

    receiver.abort() fails the room at once and sends ABORT to its prefill rank;
    the prefill marks the room Failed without a reason of its own (so the sender's
    failure_exception() reports "Failed due to an unknown reason from another rank")
    and, once nothing is in flight, ACKs, which is what lets decode free the pages.
    """
    prefill = servers("prefill", MLA)
    decode = servers("decode", MLA)
    room = 0x5EED_0000_0003
    src = h.scattered_pages(PAGES, MLA.prefill_pages, seed=31)
    dst = h.scattered_pages(PAGES, MLA.decode_pages, seed=32)
    p, d = open_room(prefill, decode, room, src, dst)
    (src1, src2, src3), (dst1, dst2, dst3) = chunks(src), chunks(dst)
    p.send(src1)
    wait_landed(prefill, decode, src1, dst1, "chunk 1")

    d.abort()
    assert d.polls() == [KVPoll.Failed] * TP
    assert d.failure_reasons() == ["Aborted by AbortReq."] * TP

    # The prefill managers learn it from the ABORT message...
    h.wait_until(
        "the prefill managers to mark the room Failed",
        lambda: all(r.mgr.check_status(room) == KVPoll.Failed for r in prefill.ranks),
        10,
    )
    # ...so a chunk the prefill scheduler sends before it polls is dropped...
    p.send(src2)
    # ...and its next poll fails the room.
    assert p.polls() == [KVPoll.Failed] * TP
    h.wait_until("the prefill ranks' ABORT_ACKs", lambda: all(d.abort_release_safe()), 10)
    errors = p.failure_exceptions()
    assert [(e.failure_reason, e.is_from_another_rank) for e in errors] == [
        ("Failed due to an unknown reason from another rank", True)
    ] * TP
    errors = d.failure_exceptions()
    assert [(e.failure_reason, e.is_from_another_rank) for e in errors] == [("Aborted by AbortReq.", False)] * TP

    # Acknowledged means drained: nothing was written after chunk 1.
    for pr, dr in zip(prefill.ranks, decode.ranks):
        h.assert_pages(dr, dst1, h.expected_pages(pr.kv, src1), "chunk 1")
        h.assert_untouched_except(dr, dst1, None)


class Peer:
    """A server in a child process (peer.py), read line by line with deadlines."""

    def __init__(self, cfg, tmp_path):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.stderr_path = tmp_path / f"{cfg['role']}_peer.stderr"
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer.py")
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, script, json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
            )
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def expect(self, want, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sel.select(timeout=0.1):
                line = self.proc.stdout.readline()
                if line:
                    assert line.strip() == want, f"peer said {line.strip()!r}, expected {want!r}"
                    return
            if self.proc.poll() is not None:
                break
        with open(self.stderr_path) as f:
            tail = f.read()[-4000:]
        raise AssertionError(f"peer: no {want!r} within {timeout} s (exit {self.proc.poll()}):\n{tail}")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.sel.close()
        self.proc.stdout.close()
        self.proc.stdin.close()


def peer_config(role, engine, backend, layout, seed, room, src, dst, **kw):
    return dict(
        role=role,
        engine=engine,
        backend=backend,
        layout={f: getattr(layout, f) for f in layout.__dataclass_fields__},
        tp=TP,
        seed=seed,
        room=room,
        src_pages=src.tolist(),
        dst_pages=dst.tolist(),
        first_chunk=CHUNKS[0],
        timeout=60,
        **kw,
    )


def test_prefill_process_killed_mid_room(servers, mooncake_engine, backend, tmp_path):
    """The prefill server's process is SIGKILLed after decode sent its metadata and the
    first chunk arrived. Decode's heartbeat to the prefill bootstrap server
    (SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL 2 s, the minimum SGLang allows,
    HEARTBEAT_MAX_FAILURE 1) fails the room with "Lost connection with prefill instance".
    """
    layout, seed, room = MLA, 9, 0x5EED_0000_0004
    src = h.scattered_pages(PAGES, layout.prefill_pages, seed=41)
    dst = h.scattered_pages(PAGES, layout.decode_pages, seed=42)
    bootstrap_port = h.free_port()
    first_src, first_dst = src[: CHUNKS[0]], dst[: CHUNKS[0]]
    peer = Peer(
        peer_config("prefill", mooncake_engine, backend, layout, seed, room, src, dst,
                    bootstrap_port=bootstrap_port, aux_index=SRC_AUX),
        tmp_path,
    )
    try:
        decode = servers("decode", layout, seed=seed)
        peer.expect("READY", 60)
        d = h.DecodeRoom(decode, f"{h.HOST}:{bootstrap_port}", room)
        d.send_metadata(dst, DST_AUX)
        peer.expect("SENT", 30)
        for dr in decode.ranks:
            expected = h.expected_pages(h.pool_contents(layout, "prefill", seed, dr.rank), first_src)
            h.wait_until(
                f"chunk 1 on decode rank {dr.rank}", lambda: np.array_equal(dr.pages(first_dst), expected), 10
            )
        assert d.polls() == [KVPoll.WaitingForInput] * TP, d.describe()

        killed_at = time.monotonic()
        peer.kill()
        d.wait(KVPoll.Failed, 15)
        took = time.monotonic() - killed_at
    finally:
        peer.close()

    print(f"decode failed the room {took:.2f} s after the kill")
    # heartbeat interval 2 s, one miss is enough
    assert took < 10, f"decode needed {took:.1f} s to notice"
    lost = f"Lost connection with prefill instance (bootstrap_addr: {h.HOST}:{bootstrap_port})"
    assert d.failure_reasons() == [lost] * TP
    errors = d.failure_exceptions()
    assert [(e.failure_reason, e.is_from_another_rank) for e in errors] == [(lost, False)] * TP
    for dr in decode.ranks:
        expected = h.expected_pages(h.pool_contents(layout, "prefill", seed, dr.rank), first_src)
        h.assert_pages(dr, first_dst, expected, "chunk 1")
        h.assert_untouched_except(dr, first_dst, None)


def test_decode_process_killed_mid_room(servers, sglang_env, mooncake_engine, backend, tmp_path):
    """The decode server's process is SIGKILLed after the first chunk landed in it.

    The prefill's next chunk fails in the engine (batch_transfer_sync_write to a dead
    peer must return < 0, promptly): SGLang fails the room with "Failed to send kv
    chunk of <room> to <decode>" and blacklists the decode's Mooncake session; its
    failed-session probe loop (SGLANG_FAILED_SESSION_PROBE_INTERVAL_S) then calls
    send_probe, which must keep failing for a dead peer (a 0 would un-blacklist it).
    """
    sglang_env("SGLANG_FAILED_SESSION_PROBE_INTERVAL_S", 0.2)
    sglang_env("SGLANG_FAILED_SESSION_PROBE_MAX_INTERVAL_S", 1.6)
    layout, seed, room = MLA, 10, 0x5EED_0000_0005
    src = h.scattered_pages(PAGES, layout.prefill_pages, seed=51)
    dst = h.scattered_pages(PAGES, layout.decode_pages, seed=52)
    prefill = servers("prefill", layout, seed=seed)
    p = h.PrefillRoom(prefill, room)
    peer = Peer(
        peer_config("decode", mooncake_engine, backend, layout, seed, room, src, dst,
                    prefill_addr=prefill.bootstrap_addr, aux_index=DST_AUX),
        tmp_path,
    )
    try:
        peer.expect("READY", 60)
        peer.expect("METADATA", 30)
        p.wait(KVPoll.WaitingForInput, 10)
        p.init(len(src), SRC_AUX)
        p.set_aux(SRC_AUX)
        src1, src2, src3 = chunks(src)
        p.send(src1)
        peer.expect("LANDED", 30)
        assert p.polls() == [KVPoll.WaitingForInput] * TP, p.describe()
        sessions = [next(iter(r.mgr.transfer_infos[room].values())).mooncake_session_id for r in prefill.ranks]

        killed_at = time.monotonic()
        peer.kill()
        p.send(src2)
        p.wait(KVPoll.Failed, 15)
        took = time.monotonic() - killed_at
    finally:
        peer.close()

    print(f"prefill failed the room {took:.2f} s after the kill")
    assert took < 10, f"prefill needed {took:.1f} s to fail the room"
    for why in p.failure_reasons():
        assert why is not None and why.startswith(f"Failed to send kv chunk of {room} to {h.HOST}:"), why
    # Blacklisted, and the probe loop's send_probe keeps failing: each failed probe
    # doubles the session's probe interval (a successful one would drop the entry).
    for rank, session in zip(prefill.ranks, sessions):
        h.wait_until(
            f"two failed probes of {session} (prefill rank {rank.rank})",
            lambda: session in rank.mgr.failed_sessions
            and getattr(rank.mgr.failed_session_probes.get(session), "interval", 0) >= 0.8,
            10,
        )
        assert session in rank.mgr.failed_sessions
    errors = p.failure_exceptions()
    assert [e.is_from_another_rank for e in errors] == [False] * TP
    assert all(e.failure_reason.startswith(f"Failed to send kv chunk of {room}") for e in errors)


def test_room_meter_sums_a_rooms_batches_and_keeps_only_the_newest_rooms():
    from kvtransfer import BatchMetrics
    from kvtransfer.sglang.conn import RoomMeter

    meter = RoomMeter(cap=2)
    meter.add(1, BatchMetrics(100, 0, 0.5))
    meter.add(1, BatchMetrics(20, 3, 0.001))
    moved, span = meter.take(1)
    assert moved == 123 and 0.5 <= span < 5
    assert meter.take(1) is None, "taken once"
    for room in (2, 3, 4):
        meter.add(room, BatchMetrics(room, 0, None))
    assert meter.take(2) is None, "the oldest room went at the cap"
    assert [meter.take(r)[0] for r in (3, 4)] == [3, 4]
