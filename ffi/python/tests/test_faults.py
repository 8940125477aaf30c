"""KV rooms over TCP under network faults, between two processes in two network namespaces.

scripts/faults.sh runs this file as root: it creates the namespaces, joined by a veth pair
with 10.x addresses, and names them in KVT_FAULTS_* variables; without them every test here
is skipped. A decode process (faults_peer.py) runs in one namespace and a prefill process in
the other; the faults are made in the decode namespace with iptables (drops: a partition, 1 %
random loss) and a user-space delay stage on NFQUEUE (faults_delay.py; our kernels have no
netem). Every room that succeeds is checked byte for byte: a digest of its pages in every
layer and its aux slot, taken in each process, must match.
"""

from __future__ import annotations

import json
import os
import re
import select
import statistics
import subprocess
import sys
import time
import warnings

import pytest

from conftest import scattered

ENV = {
    "decode_ns": "KVT_FAULTS_NS_DECODE",
    "prefill_ns": "KVT_FAULTS_NS_PREFILL",
    "decode_ip": "KVT_FAULTS_IP_DECODE",
    "prefill_ip": "KVT_FAULTS_IP_PREFILL",
    "decode_if": "KVT_FAULTS_IF_DECODE",
}
pytestmark = pytest.mark.skipif(
    not all(os.environ.get(v) for v in ENV.values()),
    reason="needs the network namespaces scripts/faults.sh sets up (run it as root)",
)

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS, ITEM, ROOM_PAGES, SLOTS = 2, 64 << 10, 16, 10  # 2 MiB per room, 10 rooms' pages
POOL = ROOM_PAGES * SLOTS
AUX_SLOTS = 64


def pool_slots(seed: int) -> list:
    """The pool cut into SLOTS slots of ROOM_PAGES scattered, partly contiguous pages."""
    pages = scattered(POOL, POOL, seed)
    return [pages[k * ROOM_PAGES:(k + 1) * ROOM_PAGES] for k in range(SLOTS)]


DST_SLOTS, SRC_SLOTS = pool_slots(5), pool_slots(9)  # different pages at each end
DELAY_MS = 5
LOSS = 0.01
# Engines that listen beyond loopback share a cluster secret, as a deployment's would: every
# connection, reconnections after the partition included, starts with its proof.
SECRET = "kvt-faults-" + os.urandom(8).hex()


class Net:
    """The namespaces scripts/faults.sh made, and the rules the test adds to the decode one."""

    def __init__(self):
        for attr, var in ENV.items():
            setattr(self, attr, os.environ[var])
        self.iptables = os.environ.get("KVT_FAULTS_IPTABLES", "iptables")
        self.loss_with = os.environ.get("KVT_FAULTS_LOSS", "iptables")  # or "nft"
        self.delay_with = os.environ.get("KVT_FAULTS_DELAY", "nfqueue")  # or "none"
        self.added: list = []  # commands that undo what was added, newest last

    def run(self, ns: str, *cmd: str) -> str:
        done = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
        if done.returncode:
            raise AssertionError(f"{' '.join(cmd)} in {ns}: {done.stderr.strip()}")
        return done.stdout

    def rule(self, chain: str, *spec: str, at: int = 0) -> None:
        """Adds an iptables rule on the decode side's veth (INPUT: arriving, OUTPUT: leaving)."""
        iface = ("-i" if chain == "INPUT" else "-o", self.decode_if)
        where = ("-I", chain, str(at)) if at else ("-A", chain)
        self.run(self.decode_ns, self.iptables, "-w", *where, *iface, *spec)
        self.added.append((self.iptables, "-w", "-D", chain, *iface, *spec))

    def unrule(self, chain: str, *spec: str) -> None:
        iface = ("-i" if chain == "INPUT" else "-o", self.decode_if)
        undo = (self.iptables, "-w", "-D", chain, *iface, *spec)
        self.added.remove(undo)
        self.run(self.decode_ns, *undo)

    def counters(self, chain: str) -> list:
        """(packets, bytes, target and match text) of each rule of ``chain``."""
        out = self.run(self.decode_ns, self.iptables, "-w", "-nvxL", chain)
        rows = []
        for line in out.splitlines()[2:]:
            f = line.split(None, 2)
            rows.append((int(f[0]), int(f[1]), f[2]))
        return rows

    def loss(self, probability: float) -> None:
        """Random loss in both directions on the decode side's veth, ahead of any other rule."""
        if self.loss_with == "iptables":
            for chain in ("INPUT", "OUTPUT"):
                self.rule(chain, "-m", "statistic", "--mode", "random", "--probability", str(probability), "-j", "DROP", at=1)
            return
        # nftables fallback (no xt_statistic): numgen, in a table that runs before iptables'.
        per = round(probability * 10000)
        script = (
            "table ip kvtfaults {\n"
            f" chain inp {{ type filter hook input priority -10; iifname \"{self.decode_if}\" numgen random mod 10000 < {per} counter drop; }}\n"
            f" chain out {{ type filter hook output priority -10; oifname \"{self.decode_if}\" numgen random mod 10000 < {per} counter drop; }}\n"
            "}\n"
        )
        subprocess.run(["ip", "netns", "exec", self.decode_ns, "nft", "-f", "-"], input=script, text=True, check=True)
        self.added.append(("nft", "delete", "table", "ip", "kvtfaults"))

    def lost(self) -> int:
        """Packets the loss rules dropped so far."""
        if self.loss_with == "iptables":
            return sum(p for chain in ("INPUT", "OUTPUT") for p, _, what in self.counters(chain) if "statistic" in what)
        out = self.run(self.decode_ns, "nft", "list", "table", "ip", "kvtfaults")
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))

    def retransmitted(self) -> int:
        """TCP segments retransmitted in the prefill namespace so far (RetransSegs)."""
        lines = [l.split() for l in self.run(self.prefill_ns, "cat", "/proc/net/snmp").splitlines() if l.startswith("Tcp:")]
        return int(lines[1][lines[0].index("RetransSegs")])

    def undo_all(self) -> None:
        while self.added:
            self.run(self.decode_ns, *self.added.pop())


class PeerProcess:
    """faults_peer.py in a namespace, driven one JSON command at a time over its stdin."""

    def __init__(self, net: Net, role: str, **manager):
        ns, ip = (net.decode_ns, net.decode_ip) if role == "decode" else (net.prefill_ns, net.prefill_ip)
        self.role, self.ip = role, ip
        cfg = {"layers": LAYERS, "pages": POOL, "item": ITEM, "aux_slots": AUX_SLOTS,
               "manager": {"listen": f"{ip}:0", "secret": SECRET, **manager}}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, os.path.join(HERE, "faults_peer.py"), role, json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.addr = self._line(30)
        assert self.addr.startswith(ip + ":"), f"{role} manager at {self.addr}, not on {ip}"

    def _line(self, timeout: float) -> str:
        # One request at a time, so at most one line is ever pending: select on the pipe is exact.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"{self.role} process silent for {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"{self.role} process exited with {self.proc.wait()}")
        return line.strip()

    def request(self, op: str, **args) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 30):
        got = json.loads(self._line(timeout))
        if "error" in got:
            raise AssertionError(f"{self.role} process: {got['error']}")
        return got["ok"]

    def call(self, op: str, **args):
        """One command and its reply (waited for as long as the command's own timeout + 30 s)."""
        self.request(op, **args)
        return self.reply(args.get("timeout", 0) + 30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def net():
    n = Net()
    yield n
    n.undo_all()


@pytest.fixture
def peers(net):
    """``start(**manager_kwargs)`` -> (decode, prefill) processes; stopped at the end."""
    made: list = []

    def start(**manager):
        decode = PeerProcess(net, "decode", **manager)
        made.append(decode)
        prefill = PeerProcess(net, "prefill", **manager)
        made.append(prefill)
        return decode, prefill

    yield start
    for p in made:
        p.close()


def both(decode: PeerProcess, prefill: PeerProcess, op: str, **args):
    """The same command to both processes at once; their replies."""
    decode.request(op, **args)
    prefill.request(op, **args)
    return decode.reply(args.get("timeout", 0) + 30), prefill.reply(args.get("timeout", 0) + 30)


def open_rooms(decode, prefill, rooms: dict) -> None:
    """Receivers and senders for ``rooms`` (room id -> pool slot), destination pages zeroed."""
    for room, slot in rooms.items():
        decode.call("zero", pages=DST_SLOTS[slot])
        decode.call("receiver", room=room, prefill=prefill.addr, pages=DST_SLOTS[slot], aux=slot)
        prefill.call("sender", room=room, pages=SRC_SLOTS[slot], aux=slot)


def verified_rooms(decode, prefill, rooms: dict, salt: int, timeout: float) -> float:
    """Runs ``rooms`` to Success in two chunks each, checks every byte, closes them; returns the
    seconds from the first send to the last Success."""
    prefill.call("fill", salt=salt)  # new bytes each time: nothing stale can pass for them
    open_rooms(decode, prefill, rooms)
    ids = list(rooms)
    prefill.call("wait", rooms=ids, state="WaitingForInput", timeout=timeout)
    started = time.monotonic()
    for room in ids:
        prefill.call("send", room=room, lo=0, hi=ROOM_PAGES // 2, last=False)
        prefill.call("send", room=room, lo=ROOM_PAGES // 2, hi=ROOM_PAGES, last=True)
    ends = both(decode, prefill, "final", rooms=ids, timeout=timeout)
    for side, end in zip(("decode", "prefill"), ends):
        failed = {r: e for r, e in end.items() if e["state"] != "Success"}
        assert not failed, f"{side} rooms failed: {failed}"
    took = max(e["t"] for end in ends for e in end.values()) - started
    for room in ids:
        got, sent = decode.call("digest", room=room), prefill.call("digest", room=room)
        assert got == sent, f"room {room}: the decode side holds other bytes than were sent"
    decode.call("close", rooms=ids)
    prefill.call("close", rooms=ids)
    return took


HEARTBEAT_MS, ROOM_MS, CONNECT_MS = 1500, 6000, 2000
PEER_GONE = ("PeerLost", "Timeout")


def test_a_partition_fails_rooms_within_their_deadlines_and_later_rooms_work_without_restarts(net, peers):
    decode, prefill = peers(
        heartbeat_timeout_ms=HEARTBEAT_MS, room_timeout_ms=ROOM_MS,
        connect_timeout_ms=CONNECT_MS, abort_timeout_ms=1000,
    )
    hb, room_s = HEARTBEAT_MS / 1e3, ROOM_MS / 1e3
    verified_rooms(decode, prefill, {1: 0, 2: 1}, salt=1, timeout=20)  # channel and data path up

    # Rooms in each live state when the link goes: 10 Transferring (its first chunk landed),
    # 11 WaitingForInput, 12 WaitingForInput and then its one chunk sent into the partition.
    prefill.call("fill", salt=2)
    open_rooms(decode, prefill, {10: 2, 11: 3, 12: 4})
    prefill.call("wait", rooms=[10, 11, 12], state="WaitingForInput", timeout=10)
    prefill.call("send", room=10, lo=0, hi=ROOM_PAGES // 2, last=False)
    decode.call("wait", rooms=[10], state="Transferring", timeout=10)
    decode.call("wait", rooms=[11, 12], state="WaitingForInput", timeout=10)

    net.rule("INPUT", "-j", "DROP", at=1)
    net.rule("OUTPUT", "-j", "DROP", at=1)
    cut = time.monotonic()
    prefill.call("send", room=12, lo=0, hi=ROOM_PAGES, last=True)
    # 13 is made during the partition: the decode side's RoomInit cannot arrive, so its sender
    # waits Bootstrapping for a destination until the room deadline.
    open_rooms(decode, prefill, {13: 5})
    made13 = time.monotonic()

    ends = both(decode, prefill, "final", rooms=[10, 11, 12], timeout=hb + 5)
    for side, end in zip(("decode", "prefill"), ends):
        for room, e in end.items():
            after = e["t"] - cut
            assert e["state"] == "Failed" and e["kind"] in PEER_GONE, f"{side} room {room}: {e}"
            # Silence is noticed by the heartbeat: after the last heartbeat before the cut (they
            # come every fifth of the timeout) plus the timeout, never before.
            assert hb * 0.8 - 0.05 <= after <= hb + 1.0, f"{side} room {room} failed {after:.2f} s after the cut: {e}"
    latency = {f"{s} {r}": round(e["t"] - cut, 3) for s, end in zip(("decode", "prefill"), ends) for r, e in end.items()}
    print(f"\npartition: rooms 10-12 failed after (s): {latency}; kinds/states: "
          + "; ".join(f"{r} {e['kind']} in {e['failed_in']}" for end in ends for r, e in end.items()))
    d13 = decode.call("final", rooms=[13], timeout=hb + CONNECT_MS / 1e3 + 5)["13"]
    assert d13["state"] == "Failed" and d13["kind"] in PEER_GONE, d13
    assert d13["t"] - cut <= hb + CONNECT_MS / 1e3 + 1.0, f"decode room 13 failed {d13['t'] - cut:.2f} s after the cut"
    p13 = prefill.call("final", rooms=[13], timeout=room_s + 5)["13"]
    assert p13["state"] == "Failed" and p13["kind"] == "Timeout" and p13["failed_in"] == "Bootstrapping", p13
    assert room_s - 0.05 <= p13["t"] - made13 <= room_s + 1.0, f"prefill room 13 failed {p13['t'] - made13:.2f} s after it was made"
    print(f"partition: room 13 decode {d13['kind']} after {d13['t'] - cut:.2f} s, prefill {p13['kind']} after {p13['t'] - made13:.2f} s (room timeout {room_s} s)")

    net.unrule("OUTPUT", "-j", "DROP")
    net.unrule("INPUT", "-j", "DROP")
    healed = time.monotonic()
    took = verified_rooms(decode, prefill, {20: 6, 21: 7, 22: 8, 23: 9}, salt=3, timeout=30)
    print(f"healed: 4 new rooms between the same processes verified, {time.monotonic() - healed:.2f} s after the heal (transfer {took:.2f} s)")
    # What never was sent, or was sent into the partition, never lands, even after the heal.
    assert decode.call("zeroed", pages=DST_SLOTS[2][ROOM_PAGES // 2:]), "room 10's unsent half was written"
    assert not decode.call("zeroed", pages=DST_SLOTS[2][:ROOM_PAGES // 2]), "room 10's first chunk never landed"
    for room, slot in ((11, 3), (12, 4), (13, 5)):
        assert decode.call("zeroed", pages=DST_SLOTS[slot]), f"room {room}'s pages were written"


def test_fifty_rooms_complete_verified_under_one_percent_loss_and_5ms_delay(net, peers):
    decode, prefill = peers(room_timeout_ms=60_000)
    port = decode.call("listen")
    before = statistics.median(prefill.call("rtt", host=decode.ip, port=port, n=20))

    delay = None
    if net.delay_with == "nfqueue":
        delay = subprocess.Popen(
            ["ip", "netns", "exec", net.decode_ns, sys.executable, os.path.join(HERE, "faults_delay.py"), "0", str(DELAY_MS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
    else:
        warnings.warn(f"no delay stage ({net.delay_with}): the 50 rooms run with loss only")
    try:
        if delay is not None:
            assert delay.stdout.readline().strip() == "ready", "the delay stage did not start"
            for chain in ("INPUT", "OUTPUT"):
                net.rule(chain, "-j", "NFQUEUE", "--queue-num", "0")
            after = statistics.median(prefill.call("rtt", host=decode.ip, port=port, n=20))
            # Each direction is held DELAY_MS, so a round trip grows by twice that.
            assert after - before >= 2 * DELAY_MS - 0.5, f"TCP connect took {before:.3f} ms, then {after:.3f} ms"
            print(f"\ndelay: TCP connect (one round trip) {before:.3f} ms -> {after:.3f} ms")
        net.loss(LOSS)

        resent = net.retransmitted()
        took = []
        for wave in range(5):  # 5 x 10 rooms in flight together, new bytes each wave
            rooms = {100 + 10 * wave + k: k for k in range(SLOTS)}
            took.append(verified_rooms(decode, prefill, rooms, salt=10 + wave, timeout=60))
        lost = net.lost()
        resent = net.retransmitted() - resent
        passed = [(p, b) for chain in ("INPUT", "OUTPUT") for p, b, what in net.counters(chain) if "NFQUEUE" in what]
        packets, octets = sum(p for p, _ in passed), sum(b for _, b in passed)
        # queue_dropped and user_dropped (fields 6 and 7): packets the delay stage itself lost.
        queue = net.run(net.decode_ns, "cat", "/proc/net/netfilter/nfnetlink_queue").split() if delay else []
    finally:
        net.undo_all()
        if delay is not None:
            delay.stdin.close()
            stats = json.loads(delay.stdout.readline() or "{}")
            delay.wait(10)
    print(f"loss: {lost} packets dropped" + (f" of {lost + packets} ({lost / (lost + packets):.2%})" if delay else ""))
    print(f"50 rooms x {LAYERS * ROOM_PAGES * ITEM >> 20} MiB verified; waves took {', '.join(f'{t:.2f}' for t in took)} s")
    print(f"TCP in the prefill namespace retransmitted {resent} segments")
    assert lost > 0, "the loss rules dropped nothing"
    assert resent > 0, "the prefill side's TCP never retransmitted: the loss did not reach the rooms' data"
    if delay is not None:
        print(f"delay stage: {stats}")
        assert stats, "the delay stage ended without its statistics"
        # Held DELAY_MS at least; the median shows the stage keeps up (it lags under bursts).
        assert stats["min_ms"] >= DELAY_MS and stats["median_ms"] <= 3 * DELAY_MS, stats
        assert 0.004 <= lost / (lost + packets) <= 0.025, f"{lost} of {lost + packets} packets lost"
        # MTU-sized packets (faults.sh caps GSO on the veth), so the loss is per wire packet.
        assert octets / packets <= 1500, f"{octets / packets:.0f} bytes per packet"
        assert stats["packets"] >= packets, f"{packets} packets queued, {stats['packets']} held"
        assert queue[5] == queue[6] == "0", f"the delay stage lost packets; nfnetlink_queue: {queue}"
