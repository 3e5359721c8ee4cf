#!/usr/bin/env python3
"""Calibrate the instrument: how many updates/s can bench/loadgen.py receive on one core?

    .venv/bin/python bench/loadgen_selftest.py                 # 1000 clients, 50k..200k updates/s
    .venv/bin/python bench/loadgen_selftest.py --rates 100000 --batch

Runs a stand-in for the relay (``--serve``, this same file, pinned to CPU 0) that speaks the
relay's client protocol (subscribe → ``subscribed`` ack, then ``price_update`` messages shaped
and sized like the relay's, ``last_size`` = send time in µs, per-(client, symbol) ``seq``), and
pushes a fixed total rate of updates spread over all clients' symbols, one frame per update or,
with ``--batch``, one JSON array per client per tick. The load generator runs on CPU 1 against it
at each rate in ``--rates``; the table shows what it received, its own CPU and the latency it
measured. Where the load generator reaches ~100% CPU or stops receiving everything, that is
the ceiling of the instrument: relay figures near it are limited by the load generator.
(The stand-in is Python too: if IT saturates, its own achieved rate drops below the target; the
table shows both.)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_PATH = "/api/v2/realtime/ws/prices"


def header(n: int) -> bytes:
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big")
    return bytes((0x81, 127)) + n.to_bytes(8, "big")


class FakeClient:
    __slots__ = ("sock", "fd", "state", "inbuf", "out", "batch", "symbols", "turn", "seqs", "credit")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = "http"
        self.inbuf = b""
        self.out = b""
        self.batch = False
        self.symbols: list[bytes] = []
        self.turn = 0
        self.seqs: list[int] = []
        self.credit = 0.0


def serve(args: argparse.Namespace) -> None:
    """The relay stand-in: total ``--rate`` updates/s, ticks of ``--tick`` s."""
    rate = args.rate
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", args.port))
    ls.listen(1024)
    ls.setblocking(False)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    ep.register(0, select.EPOLLIN)  # stdin: "rate N" / EOF
    clients: dict[int, FakeClient] = {}
    subs = 0
    sent = 0
    credit = 0.0
    last = time.monotonic()
    print(json.dumps({"event": "listening", "port": ls.getsockname()[1]}), flush=True)
    next_stats = last + 0.5
    stdin_buf = b""
    while True:
        for fd, _ev in ep.poll(args.tick):
            if fd == ls.fileno():
                while True:
                    try:
                        s, _ = ls.accept()
                    except BlockingIOError:
                        break
                    s.setblocking(False)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    c = FakeClient(s)
                    clients[c.fd] = c
                    ep.register(c.fd, select.EPOLLIN)
                continue
            if fd == 0:
                data = os.read(0, 4096)
                if not data:
                    return
                stdin_buf += data
                while b"\n" in stdin_buf:
                    cmd, stdin_buf = stdin_buf.split(b"\n", 1)
                    w = cmd.split()
                    if len(w) == 2 and w[0] == b"rate":
                        rate = float(w[1])
                continue
            c = clients.get(fd)
            if c is None:
                continue
            try:
                data = c.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                c.sock.close()
                subs -= len(c.symbols)
                del clients[fd]
                continue
            c.inbuf += data
            if c.state == "http":
                end = c.inbuf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head, c.inbuf = c.inbuf[:end].decode("latin-1"), c.inbuf[end + 4 :]
                key = ""
                for hline in head.split("\r\n"):
                    name, _, v = hline.partition(":")
                    if name.strip().lower() == "sec-websocket-key":
                        key = v.strip()
                c.batch = "batch=1" in head.split("\r\n", 1)[0]
                acc = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
                c.sock.send(
                    f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {acc}\r\n\r\n".encode()
                )
                c.state = "ws"
            buf = c.inbuf
            while len(buf) >= 6:
                ln = buf[1] & 0x7F
                hl = 2
                if ln == 126:
                    ln, hl = int.from_bytes(buf[2:4], "big"), 4
                elif ln == 127:
                    ln, hl = int.from_bytes(buf[2:10], "big"), 10
                if len(buf) < hl + 4 + ln:
                    break
                mask = (buf[hl : hl + 4] * (ln // 4 + 1))[:ln]
                payload = bytes(a ^ b for a, b in zip(buf[hl + 4 : hl + 4 + ln], mask))
                op = buf[0] & 0x0F
                buf = buf[hl + 4 + ln :]
                if op != 1:
                    continue
                msg = json.loads(payload)
                if msg.get("action") == "subscribe":
                    wanted = [str(s).upper() for s in msg.get("symbols", [])]
                    c.symbols += [s.encode() for s in wanted]
                    c.seqs += [0] * len(wanted)
                    subs += len(wanted)
                    body = json.dumps({"type": "subscribed", "symbols": wanted}).encode()
                    c.out += header(len(body)) + body
            c.inbuf = buf
        now = time.monotonic()
        if subs:
            credit += rate * (now - last)
            credit = min(credit, rate * 0.1)
        last = now
        n_total = int(credit)
        if n_total and subs:
            credit -= n_total
            t_us = time.time_ns() // 1000
            ts = t_us // 1000
            per_sub = n_total / subs
            mid = b'","timestamp":%d,"data_type":"T","last_price":101.25,"last_size":%d,"ask_price":null,' % (ts, t_us)
            mid += b'"ask_size":null,"bid_price":null,"bid_size":null,"cached_at":"2024-11-10T12:00:00.123Z","seq":'
            for c in clients.values():
                if not c.symbols:
                    continue
                c.credit += per_sub * len(c.symbols)
                count = int(c.credit)
                c.credit -= count
                if not count:
                    continue
                syms, seqs = c.symbols, c.seqs
                m = len(syms)
                msgs = []
                for _ in range(count):
                    i = c.turn % m
                    c.turn += 1
                    seqs[i] += 1
                    msgs.append(b'{"type":"price_update","symbol":"' + syms[i] + mid + b"%d}" % seqs[i])
                if c.batch:
                    body = b"[" + b",".join(msgs) + b"]"
                    c.out += header(len(body)) + body
                else:
                    c.out += b"".join(header(len(b)) + b for b in msgs)
                sent += count
        for c in clients.values():
            if c.out:
                try:
                    n = c.sock.send(c.out)
                except BlockingIOError:
                    n = 0
                except OSError:
                    n = len(c.out)
                c.out = c.out[n:]
                if len(c.out) > 1 << 22:
                    c.out = b""  # the reader is hopelessly behind; drop (counted as not received)
        if now >= next_stats:
            print(
                json.dumps({"event": "stats", "t": time.time(), "sent": sent, "cpu_s": time.process_time()}), flush=True
            )
            next_stats += 0.5


LAUNCH = "import os,sys;os.sched_setaffinity(0,{int(sys.argv[1])});os.execv(sys.argv[2],sys.argv[2:])"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate", type=float, default=50000, help=argparse.SUPPRESS)
    p.add_argument("--tick", type=float, default=0.005, help="stand-in's send period (s)")
    p.add_argument("--rates", default="50000,100000,150000,200000", help="total updates/s to try")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--symbols-per-client", type=int, default=10)
    p.add_argument("--symbols", type=int, default=500)
    p.add_argument("--batch", action="store_true")
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--warmup", type=float, default=1.5)
    args = p.parse_args()
    if args.serve:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve(args)
        return 0
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        srv = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCH,
                "0",
                sys.executable,
                __file__,
                "--serve",
                "--rate",
                str(rate),
                "--tick",
                str(args.tick),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            port = json.loads(srv.stdout.readline())["port"]
            lg = subprocess.run(
                [
                    sys.executable,
                    str(BENCH / "loadgen.py"),
                    "--cpu",
                    "1",
                    "--url",
                    f"ws://127.0.0.1:{port}{WS_PATH}",
                    "--clients",
                    str(args.clients),
                    "--symbols-per-client",
                    str(args.symbols_per_client),
                    "--symbols",
                    str(args.symbols),
                    "--warmup",
                    str(args.warmup),
                    "--seconds",
                    str(args.seconds),
                ]
                + (["--batch"] if args.batch else []),
                capture_output=True,
                text=True,
                timeout=300,
            )
            result = None
            starts = ends = None
            for line in lg.stdout.splitlines():
                obj = json.loads(line)
                if obj.get("event") == "result":
                    result = obj
                elif obj.get("event") == "window_start":
                    starts = obj["t"]
                elif obj.get("event") == "window_end":
                    ends = obj["t"]
        finally:
            srv.stdin.close()
            try:
                srv.wait(5)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
        stats = [json.loads(x) for x in srv.stdout.read().splitlines() if x.strip()]
        srv.stdout.close()
        if result is None:
            print(f"rate {rate:,.0f}: load generator failed:\n{lg.stderr[-2000:]}", file=sys.stderr)
            return 1
        inwin = [s for s in stats if starts <= s["t"] <= ends]
        src_rate = src_cpu = None
        if len(inwin) >= 2:
            span = inwin[-1]["t"] - inwin[0]["t"]
            src_rate = (inwin[-1]["sent"] - inwin[0]["sent"]) / span
            src_cpu = 100 * (inwin[-1]["cpu_s"] - inwin[0]["cpu_s"]) / span
        rows.append((rate, src_rate, src_cpu, result))
        lat = result["latency_ms"]
        q = result["receive_wait_ms"]
        print(
            f"target {rate:>9,.0f}/s  sent {src_rate or 0:>9,.0f}/s (stand-in CPU {src_cpu or 0:5.1f}%)  "
            f"received {result['updates_per_s']:>9,.0f}/s in {result['frames_per_s']:>8,.0f} frames/s  "
            f"loadgen CPU {result['loadgen_cpu_pct']:5.1f}%  latency ms p50 {lat['p50']} p99 {lat['p99']}  "
            f"(receive wait after that: p50 {q['p50']} p99 {q['p99']})",
            flush=True,
        )
    print(
        json.dumps(
            {
                "event": "selftest",
                "mode": "batch" if args.batch else "frame",
                "clients": args.clients,
                "rows": [
                    {
                        "target": r,
                        "sent": s,
                        "stand_in_cpu_pct": c,
                        "received": res["updates_per_s"],
                        "frames_per_s": res["frames_per_s"],
                        "loadgen_cpu_pct": res["loadgen_cpu_pct"],
                        "latency_ms": res["latency_ms"],
                    }
                    for r, s, c, res in rows
                ],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
