#!/usr/bin/env python3
"""Load generator: N real WebSocket clients of the relay in ONE process, on one core.

    .venv/bin/python bench/loadgen.py --url ws://127.0.0.1:8000/api/v2/realtime/ws/prices \
        --clients 1000 --symbols-per-client 10 --symbols 500 --warmup 3 --seconds 10 [--batch]

Each client subscribes to K of M symbols ``SYM001..SYM<M>``, spread evenly (client i takes K
consecutive symbols starting at i*K mod M, so every symbol has N*K/M subscribers when N*K is a
multiple of M). With ``--batch`` the URL gets ``?batch=1`` and every frame is a JSON array.
``--url`` may be given several times (several relays, e.g. a fleet): the clients are split into
contiguous blocks, one per URL, so with N·K a multiple of M per block every relay's clients
cover the whole symbol set (as a load balancer spreading clients at random would); the result
has each URL's share (``per_url``).

Built for throughput: raw non-blocking sockets and one level-triggered epoll loop; a hand-written
HTTP upgrade (the ``Sec-WebSocket-Accept`` is checked) and a hand-written parser for unmasked
server frames (text/binary, 7/16/64-bit lengths, fragments, ping → pong, close → counted);
``msgspec`` decodes only the fields we need.

What it measures, over the window that follows the warm-up (all clients connected and every
subscription acknowledged before the warm-up starts):

- delivered ``price_update`` messages/s and frames/s (all clients together);
- latency of EVERY delivered update: receive time − ``last_size`` (the upstream's send time in
  µs, see bench/upstream.py): p50/p90/p99/p99.9/max. By default (``--clock kernel``) the receive
  time is the kernel's stamp of the last segment a ``recvmsg`` returned (SO_TIMESTAMPNS). Over
  loopback, Linux stamps a segment when the SENDER hands it to the loopback device
  (net.core.netdev_tstamp_prequeue=1), so this latency ends when the relay's write reached the
  kernel. What follows is reported per recv as ``receive_wait_ms``: loopback delivery (softirq
  work done on the relay's core, late when that core is saturated) plus this process's own
  queueing. With ``--clock app`` the receive time is our own ``recv`` time (both included).
  When one recv returns several segments, its earlier frames get the later stamp; the error is
  bounded by the time those segments waited, i.e. by ``receive_wait_ms``.
- staleness (age of a client's view): every ``--stale-every`` s, for a fixed sample of up to
  ``--stale-clients`` clients and each of their symbols, now − send time of the newest update of
  that symbol the client holds. Its floor, even with zero latency and every update delivered, is
  the upstream's per-symbol period (uniform on [0, period]): compare with the floor the
  orchestrator prints. Sampled on our clock, so it includes ``receive_wait_ms``.
- seq gaps (updates the relay conflated away for a client) and seq regressions (must be 0);
- clients disconnected by the server (EOF or close frame) and their close codes;
- this process's own CPU use: near 100% means the load generator, not the relay, may be the
  bottleneck (the result says so).

Output: human lines on stderr; JSON lines on stdout: progress events (``connected``,
``subscribed``, ``window_start``, ``window_end``) and a final ``{"event":"result",...}``.
"""

from __future__ import annotations

import argparse
import array
import base64
import gc
import hashlib
import json
import math
import os
import resource
import select
import socket
import struct
import sys
import time
from urllib.parse import urlsplit

import msgspec

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
RECV = 1 << 18
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not export it
CMSG_LEN = socket.CMSG_SPACE(16)
TIMESPEC = struct.Struct("qq")
MAX_PER_REQUEST = 50  # the relay's default clients.max_symbols_per_request


class Msg(msgspec.Struct, gc=False):
    type: str = ""
    symbol: str = ""
    last_size: int | float | None = None
    seq: int = 0


DECODE = msgspec.json.Decoder(Msg | list[Msg]).decode


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (always masked, as RFC 6455 requires)."""
    n = len(payload)
    head = bytes((0x80 | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if n:
        k = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")
    return head + key + payload


def percentiles(values: array.array, ps=(50, 90, 99, 99.9), limit: int = 2_000_000) -> dict:
    """Nearest-rank percentiles; min/max/mean exact, percentiles over a systematic sample of at
    most ``limit`` values (sorting 10M Python ints would take seconds and GBs)."""
    n = len(values)
    if not n:
        return {f"p{p:g}": None for p in ps} | {"max": None, "min": None, "mean": None, "n": 0}
    step = -(-n // limit)
    s = sorted(values[::step] if step > 1 else values)
    m = len(s)
    out = {f"p{p:g}": s[min(m - 1, max(0, math.ceil(p / 100 * m) - 1))] for p in ps}
    out["max"] = max(values)
    out["min"] = min(values)
    out["mean"] = sum(values) / n
    out["n"] = n
    return out


class Client:
    __slots__ = (
        "idx",
        "sock",
        "fd",
        "state",
        "buf",
        "frag",
        "out",
        "symbols",
        "acked",
        "t_connect",
        "tracked",
        "last",
        "seqs",
        "close_code",
        "writing",
        "target",
    )

    def __init__(self, idx: int, symbols: list[str], target: int = 0) -> None:
        self.idx = idx
        self.target = target  # index of the URL this client connects to
        self.sock: socket.socket | None = None
        self.fd = -1
        self.state = "new"
        self.buf = b""
        self.frag: bytearray | None = None
        self.out = b""
        self.symbols = symbols
        self.acked = 0  # symbols acknowledged by "subscribed" replies
        self.t_connect = 0.0
        self.tracked = False  # in the staleness sample
        self.last: dict[str, int] = {}  # symbol → send time (µs) of the newest update held
        self.seqs: dict[str, int] = {}  # symbol → last seq seen
        self.close_code: int | None = None
        self.writing = False


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.urls: list[str] = args.url
        self.targets: list[tuple[str, int, str]] = []  # (host, port, path) per URL
        for url in self.urls:
            u = urlsplit(url)
            path = u.path or "/"
            query = u.query
            if args.batch:
                query = (query + "&" if query else "") + "batch=1"
            self.targets.append((u.hostname or "127.0.0.1", u.port or 80, path + ("?" + query if query else "")))
        self.ep = select.epoll()
        self.by_fd: dict[int, Client] = {}
        m, k = args.symbols, args.symbols_per_client
        width = max(3, len(str(m)))
        names = [f"SYM{i:0{width}d}" for i in range(1, m + 1)]
        self.clients = []
        for i in range(args.clients):
            start = (i * k) % m if m else 0
            syms = [names[(start + j) % m] for j in range(min(k, m))]
            self.clients.append(Client(i, syms, i * len(self.targets) // args.clients))
        subs: dict[str, int] = {}
        for c in self.clients:
            for s in c.symbols:
                subs[s] = subs.get(s, 0) + 1
        self.subs_per_symbol = subs
        n_track = min(args.stale_clients, args.clients)
        if n_track:
            step = args.clients / n_track
            for j in range(n_track):
                self.clients[int(j * step)].tracked = True
        # counters
        self.connected = 0
        self.in_flight = 0
        self.subs_done = 0
        self.failures: dict[str, int] = {}
        self.disconnected = 0
        self.close_codes: dict[str, int] = {}
        self.measuring = False
        self.updates = 0
        self.updates_by_target = [0] * len(self.targets)
        self.frames = 0
        self.bytes = 0
        self.controls = 0
        self.gaps = 0
        self.regressions = 0
        self.negative = 0
        self.lat = array.array("q")  # µs
        self.queue = array.array("q")  # µs, per recv: our recv time − the kernel's stamp
        self.kernel_clock = args.clock == "kernel"
        # One preallocated receive buffer: recv(256K) would allocate (and mmap) 256 KiB per call,
        # which costs more than the syscall itself.
        self.rbuf = bytearray(RECV)
        self.rview = memoryview(self.rbuf)
        self.stale = array.array("q")  # µs
        self.errors: dict[str, int] = {}
        self.pings = 0

    # ------------------------------------------------------------------ output
    def emit(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def log(self, msg: str) -> None:
        sys.stderr.write(f"[loadgen] {msg}\n")
        sys.stderr.flush()

    def fail(self, c: Client, why: str) -> None:
        """A connection attempt failed (before the WebSocket opened)."""
        self.failures[why] = self.failures.get(why, 0) + 1
        self.in_flight -= 1
        self.close(c)

    def close(self, c: Client) -> None:
        if c.sock is not None:
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
            self.by_fd.pop(c.fd, None)
            c.sock.close()
            c.sock = None
        c.state = "closed"

    # ------------------------------------------------------------------ connect
    def start_connect(self, c: Client) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.kernel_clock:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        c.sock = s
        c.fd = s.fileno()
        c.t_connect = time.monotonic()
        self.in_flight += 1
        host, port, _path = self.targets[c.target]
        err = s.connect_ex((host, port))
        if err not in (0, 115):  # EINPROGRESS
            self.fail(c, f"connect: {os.strerror(err)}")
            return
        c.state = "connecting"
        self.by_fd[c.fd] = c
        self.ep.register(c.fd, EPOLLOUT)

    def on_connected(self, c: Client) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(c, f"connect: {os.strerror(err)}")
            return
        key = base64.b64encode(os.urandom(16))
        c.buf = base64.b64encode(hashlib.sha1(key + GUID).digest())  # expected accept, kept until 101
        host, port, path = self.targets[c.target]
        req = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        c.sock.send(req)  # tiny, into an empty socket buffer
        c.state = "handshake"
        c.out = b""
        self.ep.modify(c.fd, EPOLLIN)
        c.frag = bytearray()  # holds the HTTP response until complete

    def on_handshake_data(self, c: Client, data: bytes) -> None:
        c.frag += data
        end = c.frag.find(b"\r\n\r\n")
        if end < 0:
            if len(c.frag) > 16384:
                self.fail(c, "oversized HTTP response")
            return
        head = bytes(c.frag[:end]).decode("latin-1")
        rest = bytes(c.frag[end + 4 :])
        status = head.split("\r\n", 1)[0]
        if " 101 " not in status + " ":
            self.fail(c, f"handshake: {status[:60]}")
            return
        accept = None
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-accept":
                accept = value.strip().encode()
        if accept != c.buf:
            self.fail(c, "handshake: bad Sec-WebSocket-Accept")
            return
        c.state = "open"
        c.frag = None
        c.buf = b""
        self.connected += 1
        self.in_flight -= 1
        syms = c.symbols
        out = b""
        for i in range(0, len(syms), MAX_PER_REQUEST):
            chunk = syms[i : i + MAX_PER_REQUEST]
            out += masked_frame(1, json.dumps({"action": "subscribe", "symbols": chunk}).encode())
        if out:
            self.send(c, out)
        if rest:
            self.on_data(c, rest, time.time_ns() // 1000)

    def send(self, c: Client, data: bytes) -> None:
        if c.sock is None:
            return
        data = c.out + data if c.out else data
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.server_closed(c, f"send: {exc.strerror}")
            return
        c.out = data[n:]
        if c.out and not c.writing:
            c.writing = True
            self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)
        elif not c.out and c.writing:
            c.writing = False
            self.ep.modify(c.fd, EPOLLIN)

    def server_closed(self, c: Client, why: str) -> None:
        if c.state == "open":
            self.disconnected += 1
            key = why if c.close_code is None else f"close {c.close_code}"
            self.close_codes[key] = self.close_codes.get(key, 0) + 1
        self.close(c)

    # ------------------------------------------------------------------ receive
    def on_data(self, c: Client, data: bytes, now_us: int) -> None:
        """Parse every complete frame in c.buf + data; keep the partial tail."""
        if c.buf:
            data = c.buf + data
        n = len(data)
        pos = 0
        payloads = []
        frames = 0
        while n - pos >= 2:
            b1 = data[pos + 1]
            ln = b1 & 0x7F
            if ln < 126:
                hl = 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                hl = 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hl = 10
            if b1 & 0x80:
                self.server_closed(c, "protocol: masked server frame")
                return
            end = pos + hl + ln
            if end > n:
                break
            b0 = data[pos]
            op = b0 & 0x0F
            if op == 1 or op == 2:
                if b0 & 0x80:
                    payloads.append(data[pos + hl : end])
                    frames += 1
                else:
                    c.frag = bytearray(data[pos + hl : end])
            elif op == 0:
                if c.frag is not None:
                    c.frag += data[pos + hl : end]
                    if b0 & 0x80:
                        payloads.append(bytes(c.frag))
                        frames += 1
                        c.frag = None
            elif op == 8:
                body = data[pos + hl : end]
                c.close_code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
                self.server_closed(c, "close frame")
                return
            elif op == 9:
                self.pings += 1
                self.send(c, masked_frame(10, data[pos + hl : end]))
            pos = end
        c.buf = data[pos:] if pos < n else b""
        if not payloads:
            return
        if not self.measuring:
            # warm-up / set-up: only track acks and keep the views current
            for p in payloads:
                self.handle_untimed(c, p)
            return
        self.frames += frames
        self.bytes += n - len(c.buf)
        lat = self.lat
        tracked = c.tracked
        last = c.last
        seqs = c.seqs
        updates = 0
        for p in payloads:
            try:
                m = DECODE(p)
            except msgspec.DecodeError as exc:
                key = f"decode: {str(exc)[:60]}"
                self.errors[key] = self.errors.get(key, 0) + 1
                continue
            for msg in m if type(m) is list else (m,):
                if msg.type != "price_update":
                    self.controls += 1
                    continue
                ls = msg.last_size
                if ls is None:
                    self.errors["price_update without last_size"] = (
                        self.errors.get("price_update without last_size", 0) + 1
                    )
                    continue
                ls = int(ls)
                updates += 1
                d = now_us - ls
                if d < 0:
                    self.negative += 1
                lat.append(d)
                sym = msg.symbol
                prev = seqs.get(sym)
                seq = msg.seq
                if prev is not None:
                    if seq > prev + 1:
                        self.gaps += seq - prev - 1
                    elif seq <= prev:
                        self.regressions += 1
                seqs[sym] = seq
                if tracked:
                    last[sym] = ls
        self.updates += updates
        self.updates_by_target[c.target] += updates

    def handle_untimed(self, c: Client, p: bytes) -> None:
        try:
            m = DECODE(p)
        except msgspec.DecodeError:
            return
        for msg in m if type(m) is list else (m,):
            if msg.type == "price_update":
                if msg.last_size is not None:
                    c.last[msg.symbol] = int(msg.last_size)
                    c.seqs[msg.symbol] = msg.seq
            elif msg.type == "subscribed":
                c.acked += 1
                if c.acked == (len(c.symbols) + MAX_PER_REQUEST - 1) // MAX_PER_REQUEST:
                    self.subs_done += 1
            elif msg.type == "error":
                self.errors["relay error reply"] = self.errors.get("relay error reply", 0) + 1

    # ------------------------------------------------------------------ loop
    def poll_once(self, timeout: float) -> None:
        events = self.ep.poll(timeout, 4096)
        by_fd = self.by_fd
        tns = time.time_ns
        kernel = self.kernel_clock and self.measuring
        unpack = TIMESPEC.unpack
        rbufs = [self.rbuf]
        rview = self.rview
        for fd, ev in events:
            c = by_fd.get(fd)
            if c is None:
                continue
            st = c.state
            if st == "open":
                if ev & EPOLLOUT and c.out:
                    self.send(c, b"")
                if ev & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    try:
                        if kernel:
                            n, anc, _flags, _addr = c.sock.recvmsg_into(rbufs, CMSG_LEN)
                        else:
                            n = c.sock.recv_into(rview)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        self.server_closed(c, f"recv: {exc.strerror}")
                        continue
                    if not n:
                        self.server_closed(c, "eof")
                        continue
                    data = bytes(rview[:n])
                    now_us = tns() // 1000
                    if kernel and anc:
                        sec, nsec = unpack(anc[0][2])
                        arrived = sec * 1_000_000 + nsec // 1000
                        self.queue.append(now_us - arrived)
                        now_us = arrived
                    self.on_data(c, data, now_us)
            elif st == "connecting":
                self.on_connected(c)
            elif st == "handshake":
                try:
                    data = c.sock.recv(RECV)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self.fail(c, f"handshake recv: {exc.strerror}")
                    continue
                if not data:
                    self.fail(c, "handshake: eof")
                    continue
                self.on_handshake_data(c, data)

    def run(self) -> dict:
        args = self.args
        t_begin = time.monotonic()
        pending = list(reversed(self.clients))
        last_report = t_begin
        deadline = t_begin + args.connect_timeout
        # ---- connect everyone (bounded concurrency: the relay's listen backlog is small)
        while pending or self.in_flight:
            while pending and self.in_flight < args.concurrency:
                self.start_connect(pending.pop())
            self.poll_once(0.05)
            now = time.monotonic()
            if now - last_report > 2:
                self.log(f"connecting: {self.connected}/{args.clients} open, {self.in_flight} in flight")
                last_report = now
            if now > deadline:
                for c in list(self.by_fd.values()):
                    if c.state in ("connecting", "handshake"):
                        self.fail(c, "connect/handshake timeout")
                break
        t_connected = time.monotonic()
        connect_s = t_connected - t_begin
        self.log(
            f"{self.connected}/{args.clients} clients connected in {connect_s:.1f}s"
            + (f"; failures: {self.failures}" if self.failures else "")
        )
        self.emit({"event": "connected", "clients": self.connected, "seconds": round(connect_s, 3), "t": time.time()})
        # ---- wait for every subscription to be acknowledged
        want = sum(1 for c in self.clients if c.symbols and c.state == "open")
        if want:
            deadline = time.monotonic() + args.connect_timeout
            while time.monotonic() < deadline and self.subs_done < want:
                self.poll_once(0.05)
            self.log(f"{self.subs_done}/{want} clients' subscriptions acknowledged")
        self.emit({"event": "subscribed", "t": time.time()})
        # ---- warm-up, then the measurement window
        t_w0 = time.monotonic() + args.warmup
        while time.monotonic() < t_w0:
            self.poll_once(0.05)
        self.emit({"event": "window_start", "t": time.time()})
        self.log(f"measuring for {args.seconds:g}s")
        cpu0 = time.process_time()
        wall0 = time.monotonic()
        self.measuring = True
        t_end = wall0 + args.seconds
        next_stale = wall0
        stale_every = args.stale_every
        tracked = [c for c in self.clients if c.tracked]
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            if now >= next_stale:
                now_us = time.time_ns() // 1000
                st = self.stale
                for c in tracked:
                    if c.state != "open":
                        continue
                    last = c.last
                    for s in c.symbols:
                        t = last.get(s)
                        if t is not None:
                            st.append(now_us - t)
                next_stale += stale_every
            self.poll_once(min(t_end, next_stale) - now)
        wall = time.monotonic() - wall0
        cpu = time.process_time() - cpu0
        self.measuring = False
        self.emit({"event": "window_end", "t": time.time()})
        still_open = sum(1 for c in self.clients if c.state == "open")
        open_by_target = [
            sum(1 for c in self.clients if c.target == t and c.state == "open") for t in range(len(self.urls))
        ]
        # ---- close every client (a close frame, then the socket)
        bye = masked_frame(8, (1000).to_bytes(2, "big"))
        for c in self.clients:
            if c.sock is not None and c.state == "open":
                try:
                    c.sock.send(bye)
                except OSError:
                    pass
            self.close(c)
        ms = lambda v: None if v is None else round(v / 1000, 3)  # noqa: E731
        lat = percentiles(self.lat)
        stale = percentiles(self.stale)
        queue = percentiles(self.queue)
        total_subs = sum(len(c.symbols) for c in self.clients)
        distinct = len(self.subs_per_symbol)
        cpu_pct = 100 * cpu / wall if wall else 0.0
        result = {
            "event": "result",
            "clients": args.clients,
            "symbols_per_client": args.symbols_per_client,
            "symbols": args.symbols,
            "distinct_symbols": distinct,
            "subscribers_per_symbol": round(total_subs / distinct, 3) if distinct else 0,
            "mode": "batch" if args.batch else "frame",
            "connected": self.connected,
            "connect_seconds": round(connect_s, 3),
            "connect_failures": self.failures,
            "still_open": still_open,
            "disconnected": self.disconnected,
            "close_codes": self.close_codes,
            "window_s": round(wall, 3),
            "updates": self.updates,
            "updates_per_s": round(self.updates / wall, 1) if wall else 0,
            "frames": self.frames,
            "frames_per_s": round(self.frames / wall, 1) if wall else 0,
            "bytes_per_s": round(self.bytes / wall, 1) if wall else 0,
            "updates_per_frame": round(self.updates / self.frames, 2) if self.frames else None,
            "latency_ms": {k: (ms(v) if k != "n" else v) for k, v in lat.items()},
            "latency_clock": "kernel" if self.kernel_clock and len(self.queue) else "app",
            "receive_wait_ms": {k: (ms(v) if k != "n" else v) for k, v in queue.items()},
            "staleness_ms": {k: (ms(v) if k != "n" else v) for k, v in stale.items()},
            "stale_clients": len(tracked),
            "seq_gaps": self.gaps,
            "seq_regressions": self.regressions,
            "negative_latencies": self.negative,
            "controls_in_window": self.controls,
            "pings": self.pings,
            "errors": self.errors,
            "loadgen_cpu_pct": round(cpu_pct, 1),
            "loadgen_saturated": cpu_pct > 90,
            "per_url": [
                {
                    "url": url,
                    "clients": sum(1 for c in self.clients if c.target == t),
                    "still_open": open_by_target[t],
                    "updates_per_s": round(self.updates_by_target[t] / wall, 1) if wall else 0,
                }
                for t, url in enumerate(self.urls)
            ],
        }
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--url",
        action="append",
        help="the relay's price WebSocket (default ws://127.0.0.1:8000/api/v2/realtime/ws/prices); "
        "repeat it to spread the clients over several relays in contiguous blocks",
    )
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--symbols-per-client", type=int, default=10, help="K: symbols each client subscribes to (0 = idle)")
    p.add_argument("--symbols", type=int, default=500, help="M: size of the symbol universe SYM001..SYM<M>")
    p.add_argument("--batch", action="store_true", help="connect with ?batch=1 (one JSON array per frame)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    p.add_argument("--concurrency", type=int, default=64, help="connections in handshake at once")
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p.add_argument("--stale-clients", type=int, default=200, help="clients sampled for staleness")
    p.add_argument("--stale-every", type=float, default=0.1, help="staleness sampling period (s)")
    p.add_argument(
        "--clock",
        choices=["kernel", "app"],
        default="kernel",
        help="receive time of a frame: the kernel's arrival stamp of its last byte (SO_TIMESTAMPNS, "
        "default; over loopback: when the relay's write reached the kernel) or our recv() time",
    )
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = p.parse_args(argv)
    args.url = args.url or ["ws://127.0.0.1:8000/api/v2/realtime/ws/prices"]
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.clients + 64
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < need:
            sys.stderr.write(f"[loadgen] warning: RLIMIT_NOFILE hard limit {hard} < {need} needed\n")
    gc.disable()
    gen = LoadGen(args)
    result = gen.run()
    gen.emit(result)
    lat = result["latency_ms"]
    gen.log(
        f"{result['updates_per_s']:,.0f} updates/s in {result['frames_per_s']:,.0f} frames/s; latency ms "
        f"p50 {lat['p50']} p99 {lat['p99']} max {lat['max']}; disconnected {result['disconnected']}; "
        f"loadgen CPU {result['loadgen_cpu_pct']}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
