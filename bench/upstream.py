#!/usr/bin/env python3
"""A standalone high-rate FMP-protocol WebSocket server for benchmarks.

    .venv/bin/python bench/upstream.py --port 8765 --rate 10000

Speaks the part of Financial Modeling Prep's WebSocket protocol the relay uses:

- login ``{"event":"login","data":{"apiKey":K}}`` (any key) → ``{"event":"login","status":200,...}``
- ``{"event":"subscribe"|"unsubscribe","data":{"ticker":[...]}}`` → tracked per connection, acked
- ``{"event":"heartbeat","timestamp":...}`` every ``--heartbeat`` seconds

and streams trade frames at a fixed TOTAL rate (``--rate`` frames/s per connection, normally the
relay's single connection), round-robin over the symbols that connection subscribed::

    {"s":"sym001","t":<ns>,"type":"T","lp":<price>,"ls":<send time, integer µs since the epoch>,
     "ap":null,"as":null,"bp":null,"bs":null}

``ls`` (last_size) is the wall-clock send time in µs; the relay passes it through unchanged into
each client's ``price_update``, so a client computes its latency as receive time − last_size.

Design: one thread, raw non-blocking sockets + epoll, hand-written WebSocket framing (no
library on the hot path). Every ``--tick`` seconds (1 ms) it generates the frames owed since the
last tick (a credit accumulator driven by the real elapsed time, so the rate is exact whatever
the scheduling jitter), all stamped with the same send time, and writes them in one ``send``.

Honesty rules, reported in the stats:

- ``lag_skipped``: credit above ``--max-burst`` seconds' worth (this process was descheduled
  for that long) is discarded rather than sent as a burst;
- ``bp_skipped``: frames NOT generated because the relay does not read fast enough (our user-space
  buffer holds more than ``--max-buffer`` bytes after the kernel's socket buffers filled up).
  Frames are stamped when generated, so time they spend queued in kernel buffers counts in the
  client-side latency, as it would with a real provider.

Stats: a JSON line on stdout every ``--stats-interval`` seconds (cumulative counters plus the rate
since the previous line), for the orchestrator; a human line on stderr every ``--print-every``
seconds. Commands on stdin (one per line): ``rate N`` changes the rate; ``stats [TAG]`` prints
a stats line now (with ``"tag":TAG``); ``quit`` exits. When run
with a pipe as stdin (the orchestrator), EOF on stdin means the parent is gone: exit.
"""

from __future__ import annotations

import argparse
import base64
import errno
import gc
import hashlib
import json
import os
import select
import signal
import socket
import sys
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_CLIENT_FRAME = 1 << 20


def ws_header(opcode: int, n: int) -> bytes:
    """Header of an unmasked, final server frame carrying ``n`` payload bytes."""
    b0 = 0x80 | opcode
    if n < 126:
        return bytes((b0, n))
    if n < 65536:
        return bytes((b0, 126)) + n.to_bytes(2, "big")
    return bytes((b0, 127)) + n.to_bytes(8, "big")


def ws_text(payload: str | bytes) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return ws_header(1, len(data)) + data


def unmask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


class Conn:
    __slots__ = (
        "sock",
        "fd",
        "peer",
        "state",
        "inbuf",
        "out",
        "frag",
        "frag_op",
        "logged_in",
        "symbols",
        "order",
        "turn",
        "credit",
        "generated",
        "last_tick",
        "writing",
        "closing",
    )

    def __init__(self, sock: socket.socket, peer: tuple) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.state = "http"
        self.inbuf = bytearray()
        self.out = bytearray()
        self.frag = bytearray()
        self.frag_op = 0
        self.logged_in = False
        self.symbols: set[str] = set()
        self.order: list[bytes] = []  # the subscribed symbols' JSON prefixes, round-robin order
        self.turn = 0
        self.credit = 0.0
        self.generated = 0
        self.last_tick = 0.0
        self.writing = False
        self.closing = False


class Upstream:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rate = float(args.rate)
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((args.host, args.port))
        self.lsock.listen(128)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.ep.register(self.lsock.fileno(), select.EPOLLIN)
        self.stdin_fd = -1
        if args.stdin_control:
            self.stdin_fd = sys.stdin.fileno()
            os.set_blocking(self.stdin_fd, False)
            self.ep.register(self.stdin_fd, select.EPOLLIN)
        self.stdin_buf = b""
        self.running = True
        # counters (cumulative over all connections)
        self.generated = 0
        self.bp_skipped = 0
        self.lag_skipped = 0
        self.bytes_written = 0
        self.logins = 0
        self.connections_total = 0
        self.price_seq = 0
        self.max_outbuf = 0

    # ------------------------------------------------------------------ output
    def emit(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def log(self, msg: str) -> None:
        sys.stderr.write(f"[upstream] {msg}\n")
        sys.stderr.flush()

    # ------------------------------------------------------------------ sockets
    def accept(self) -> None:
        while True:
            try:
                sock, peer = self.lsock.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock, peer)
            self.conns[conn.fd] = conn
            self.connections_total += 1
            self.ep.register(conn.fd, select.EPOLLIN)
            self.log(f"connection from {peer[0]}:{peer[1]}")

    def drop(self, conn: Conn, why: str) -> None:
        if conn.fd not in self.conns:
            return
        del self.conns[conn.fd]
        try:
            self.ep.unregister(conn.fd)
        except OSError:
            pass
        conn.sock.close()
        self.log(f"connection {conn.peer[0]}:{conn.peer[1]} closed: {why}")

    def queue(self, conn: Conn, data: bytes) -> None:
        conn.out += data
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        out = conn.out
        if out:
            try:
                n = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self.drop(conn, f"send failed: {exc.strerror or exc}")
                return
            if n:
                self.bytes_written += n
                del out[:n]
        if len(out) > self.max_outbuf:
            self.max_outbuf = len(out)
        want_write = bool(out)
        if want_write != conn.writing:
            conn.writing = want_write
            self.ep.modify(conn.fd, select.EPOLLIN | (select.EPOLLOUT if want_write else 0))
        if not out and conn.closing:
            self.drop(conn, "closed")

    def readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.drop(conn, f"recv failed: {exc.strerror or exc}")
            return
        if not data:
            self.drop(conn, "peer closed")
            return
        conn.inbuf += data
        if conn.state == "http":
            end = conn.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.inbuf) > 16384:
                    self.drop(conn, "oversized HTTP request")
                return
            head = bytes(conn.inbuf[:end]).decode("latin-1")
            del conn.inbuf[: end + 4]
            key = None
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "sec-websocket-key":
                    key = value.strip()
            if not key:
                conn.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.drop(conn, "not a WebSocket upgrade")
                return
            accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
            self.queue(
                conn,
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
                ).encode(),
            )
            conn.state = "ws"
        self.parse_frames(conn)

    def parse_frames(self, conn: Conn) -> None:
        buf = conn.inbuf
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if ln > MAX_CLIENT_FRAME:
                self.drop(conn, "client frame too big")
                return
            masked = b1 & 0x80
            if masked:
                hl += 4
            end = pos + hl + ln
            if end > n:
                break
            payload = bytes(buf[pos + hl : end])
            if masked:
                payload = unmask(payload, bytes(buf[pos + hl - 4 : pos + hl]))
            pos = end
            op = b0 & 0x0F
            fin = b0 & 0x80
            if op == 0:  # continuation
                conn.frag += payload
                if fin:
                    self.message(conn, conn.frag_op, bytes(conn.frag))
                    conn.frag = bytearray()
            elif op in (1, 2):
                if fin:
                    self.message(conn, op, payload)
                else:
                    conn.frag_op = op
                    conn.frag = bytearray(payload)
            elif op == 8:  # close: echo it, then close once flushed
                self.queue(conn, ws_header(8, len(payload[:2])) + payload[:2])
                conn.closing = True
                self.flush(conn)
                return
            elif op == 9:  # ping
                self.queue(conn, ws_header(10, len(payload)) + payload)
            # op 10 (pong): ignore
            if conn.fd not in self.conns:
                return
        del buf[:pos]

    def message(self, conn: Conn, op: int, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
            event = msg.get("event")
        except (ValueError, AttributeError):
            self.queue(conn, ws_text('{"event":"error","message":"invalid message"}'))
            return
        if event == "login":
            conn.logged_in = True
            self.logins += 1
            self.queue(conn, ws_text('{"event":"login","status":200,"message":"Authenticated"}'))
            self.log(f"login from {conn.peer[0]}:{conn.peer[1]}")
            return
        if event in ("subscribe", "unsubscribe"):
            try:
                tickers = msg["data"]["ticker"]
            except (KeyError, TypeError):
                self.queue(conn, ws_text('{"event":"error","message":"missing data.ticker"}'))
                return
            if isinstance(tickers, str):
                tickers = [tickers]
            tickers = [str(t).lower() for t in tickers]
            before = len(conn.symbols)
            if event == "subscribe":
                conn.symbols.update(tickers)
            else:
                conn.symbols.difference_update(tickers)
            conn.order = [f'{{"s":"{s}","t":'.encode() for s in sorted(conn.symbols)]
            conn.turn = 0
            if before == 0 and conn.symbols:
                conn.credit = 0.0
                conn.last_tick = time.monotonic()
            self.queue(
                conn,
                ws_text(
                    json.dumps(
                        {"event": event, "status": 200, "message": f"{event}d {len(tickers)} ticker(s)"},
                        separators=(",", ":"),
                    )
                ),
            )
            self.log(f"{event} {len(tickers)} ticker(s); now {len(conn.symbols)} subscribed")
            return
        self.queue(conn, ws_text(json.dumps({"event": "error", "message": f"unknown event {event!r}"})))

    # ------------------------------------------------------------------ streaming
    def tick(self, now: float) -> None:
        max_burst = self.args.max_burst
        max_buffer = self.args.max_buffer
        rate = self.rate
        for conn in list(self.conns.values()):
            if not conn.logged_in or not conn.order or conn.closing:
                continue
            dt = now - conn.last_tick
            conn.last_tick = now
            credit = conn.credit + rate * dt
            cap = rate * max_burst
            if credit > cap:
                self.lag_skipped += int(credit - cap)
                credit = cap
            count = int(credit)
            conn.credit = credit - count
            if not count:
                continue
            if len(conn.out) > max_buffer:
                self.bp_skipped += count
                continue
            order = conn.order
            m = len(order)
            turn = conn.turn
            t_ns = time.time_ns()
            tail = f'{t_ns},"type":"T","lp":'.encode()
            ls = f',"ls":{t_ns // 1000},"ap":null,"as":null,"bp":null,"bs":null}}'.encode()
            seq = self.price_seq
            parts = []
            for _ in range(count):
                seq += 1
                body = order[turn] + tail + b"%d.%02d" % (100 + seq % 900, seq % 100) + ls
                parts.append(bytes((0x81, len(body))) if len(body) < 126 else ws_header(1, len(body)))
                parts.append(body)
                turn += 1
                if turn == m:
                    turn = 0
            conn.turn = turn
            self.price_seq = seq
            conn.generated += count
            self.generated += count
            conn.out += b"".join(parts)
            self.flush(conn)

    def heartbeat(self) -> None:
        frame = ws_text(f'{{"event":"heartbeat","timestamp":{time.time_ns() // 1_000_000}}}')
        for conn in list(self.conns.values()):
            if conn.state == "ws" and not conn.closing:
                self.queue(conn, frame)

    def stdin_command(self) -> None:
        try:
            data = os.read(self.stdin_fd, 4096)
        except BlockingIOError:
            return
        if not data:
            self.log("stdin closed: exiting")
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            words = line.decode(errors="replace").split()
            if not words:
                continue
            if words[0] == "rate" and len(words) == 2:
                self.rate = float(words[1])
                self.log(f"rate set to {self.rate:g} frames/s")
                self.emit({"event": "rate", "rate": self.rate, "t": time.time()})
            elif words[0] == "stats":  # a snapshot now, tagged (the orchestrator marks its window)
                snap = self.stats()
                if len(words) > 1:
                    snap["tag"] = words[1]
                self.emit(snap)
            elif words[0] == "quit":
                self.running = False
            else:
                self.log(f"unknown command {line!r}")

    def stats(self) -> dict:
        peers = [c.peer[1] for c in self.conns.values() if c.logged_in]
        return {
            "event": "stats",
            "t": time.time(),
            "rate_target": self.rate,
            "generated": self.generated,
            "bp_skipped": self.bp_skipped,
            "lag_skipped": self.lag_skipped,
            "bytes": self.bytes_written,
            "conns": len(self.conns),
            "symbols": max((len(c.symbols) for c in self.conns.values()), default=0),
            "outbuf": sum(len(c.out) for c in self.conns.values()),
            "max_outbuf": self.max_outbuf,
            "peer_ports": peers,
            "cpu_s": time.process_time(),
        }

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        args = self.args
        tick = args.tick
        self.emit({"event": "listening", "port": self.port, "pid": os.getpid(), "rate": self.rate, "t": time.time()})
        self.log(f"listening on ws://{args.host}:{self.port}, {self.rate:g} frames/s, tick {tick * 1000:g} ms")
        now = time.monotonic()
        next_tick = now + tick
        next_hb = now + args.heartbeat
        next_stats = now + args.stats_interval
        next_print = now + args.print_every
        last_print = (now, 0)
        poll = self.ep.poll
        conns = self.conns
        lfd = self.lsock.fileno()
        while self.running:
            timeout = next_tick - time.monotonic()
            events = poll(timeout if timeout > 0 else 0)
            for fd, ev in events:
                if fd == lfd:
                    self.accept()
                elif fd == self.stdin_fd:
                    self.stdin_command()
                else:
                    conn = conns.get(fd)
                    if conn is None:
                        continue
                    if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self.readable(conn)
                    if ev & select.EPOLLOUT and fd in conns:
                        self.flush(conn)
            now = time.monotonic()
            if now >= next_tick:
                self.tick(now)
                next_tick += tick
                if next_tick < now:
                    next_tick = now + tick
                if now >= next_hb:
                    self.heartbeat()
                    next_hb = now + args.heartbeat
                if now >= next_stats:
                    self.emit(self.stats())
                    next_stats += args.stats_interval
                if now >= next_print:
                    elapsed = now - last_print[0]
                    achieved = (self.generated - last_print[1]) / elapsed if elapsed > 0 else 0.0
                    self.log(
                        f"achieved {achieved:,.0f} frames/s (target {self.rate:,.0f}), "
                        f"{len(conns)} conn(s), bp_skipped {self.bp_skipped}, lag_skipped {self.lag_skipped}, "
                        f"outbuf {sum(len(c.out) for c in conns.values())} B"
                    )
                    last_print = (now, self.generated)
                    next_print = now + args.print_every
        self.emit(self.stats())
        for conn in list(conns.values()):
            self.drop(conn, "server exiting")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 = any free port (announced in the first stdout line)")
    p.add_argument(
        "--rate", type=float, default=10000.0, help="total trade frames per second per connection (default 10000)"
    )
    p.add_argument("--tick", type=float, default=0.001, help="generation period in seconds (default 0.001)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="heartbeat interval in seconds")
    p.add_argument(
        "--max-burst",
        type=float,
        default=0.1,
        help="credit cap in seconds of rate; beyond it ticks are skipped (lag_skipped)",
    )
    p.add_argument(
        "--max-buffer",
        type=int,
        default=256 * 1024,
        help="user-space send buffer beyond which frames are not generated (bp_skipped)",
    )
    p.add_argument("--stats-interval", type=float, default=0.5, help="seconds between JSON stats lines on stdout")
    p.add_argument("--print-every", type=float, default=5.0, help="seconds between human rate lines on stderr")
    p.add_argument("--stdin-control", action="store_true", help="read commands (rate N, quit) from stdin; exit on EOF")
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = p.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    gc.disable()
    server = Upstream(args)

    def stop(signum: int, _frame: object) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.run()
    except OSError as exc:
        if exc.errno != errno.EINTR:
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
