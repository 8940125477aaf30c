"""A user-space delay stage for the network-fault tests: ``faults_delay.py QUEUE DELAY_MS``.

Our kernels have no netem, so packets that iptables sends to NFQUEUE number QUEUE are held
here DELAY_MS each and then accepted, in arrival order. It is a minimal nfnetlink_queue client
on a raw netlink socket (the standard library only): it binds the queue, asks for packet
metadata only (no payload copies), and releases every packet whose time has come with one
batch verdict (NFQNL_MSG_VERDICT_BATCH accepts every queued id up to the one given, and ids
grow in arrival order, so releasing the oldest first is exact).

Prints ``ready`` once the queue is bound, and at the end of stdin (after releasing what it
still holds) one JSON line: packets held, and the least, median, 99th percentile and largest hold in ms.
"""
from __future__ import annotations

import collections
import json
import os
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_ACCEPT = 1
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(msg: int, queue: int, attrs: bytes, flags: int = 0, seq: int = 0) -> bytes:
    # nfgenmsg: family (AF_UNSPEC), version (NFNETLINK_V0), res_id (the queue, big-endian).
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, NLM_F_REQUEST | flags, seq, 0) + body


class Queue:
    def __init__(self, queue: int):
        self.queue = queue
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        self.config(attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        self.config(attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self.config(attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536)))
        self.sock.setblocking(False)

    def config(self, attrs: bytes) -> None:
        """Sends one config message and waits for its acknowledgement."""
        self.seq += 1
        self.sock.send(message(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_ACK, self.seq))
        reply = self.sock.recv(4096)
        _, kind, _, seq, _ = struct.unpack_from("=IHHII", reply)
        if kind != NLMSG_ERROR or seq != self.seq:
            raise OSError(f"nfqueue config: unexpected reply type {kind} seq {seq}")
        (err,) = struct.unpack_from("=i", reply, 16)
        if err:
            raise OSError(-err, f"nfqueue config refused: {os.strerror(-err)}")

    def packet_ids(self, buf: memoryview, n: int):
        """The packet ids in ``buf[:n]`` (one or more netlink messages)."""
        off = 0
        while off + 16 <= n:
            length, kind, _, _, _ = struct.unpack_from("=IHHII", buf, off)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                a = off + 20
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", buf, a)
                    if alen < 4:
                        break
                    if atype & NLA_TYPE_MASK == NFQA_PACKET_HDR:
                        yield struct.unpack_from("!I", buf, a + 4)[0]
                        break
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3

    def accept_up_to(self, packet_id: int) -> None:
        verdict = attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        self.sock.send(message(NFQNL_MSG_VERDICT_BATCH, self.queue, verdict))


def main() -> None:
    queue, delay = int(sys.argv[1]), float(sys.argv[2]) / 1e3
    q = Queue(queue)
    print("ready", flush=True)
    held = collections.deque()  # (arrived, packet id), oldest first
    holds = []
    buf = memoryview(bytearray(1 << 16))
    stdin_open = True
    while stdin_open or held:
        timeout = max(0.0, held[0][0] + delay - time.monotonic()) if held else None
        watch = [q.sock] + ([sys.stdin] if stdin_open else [])
        readable, _, _ = select.select(watch, [], [], timeout)
        if sys.stdin in readable and not sys.stdin.readline():
            stdin_open = False
        if q.sock in readable:
            while True:
                try:
                    n = q.sock.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as e:  # ENOBUFS: the kernel counts what it could not deliver
                    print(f"faults_delay: {e}", file=sys.stderr)
                    continue
                now = time.monotonic()
                held.extend((now, i) for i in q.packet_ids(buf, n))
        now = time.monotonic()
        last = None
        # The same subtraction as the hold recorded below, so no packet leaves a rounding error early.
        while held and now - held[0][0] >= delay:
            arrived, last = held.popleft()
            holds.append(now - arrived)
        if last is not None:
            q.accept_up_to(last)
    ms = sorted(h * 1e3 for h in holds)
    stats = {"packets": len(ms)}
    if ms:
        stats.update(min_ms=ms[0], median_ms=ms[len(ms) // 2], p99_ms=ms[len(ms) * 99 // 100], max_ms=ms[-1])
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
