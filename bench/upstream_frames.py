#!/usr/bin/env python3
"""The upstream frame path, in one process, no sockets: µs per WebSocket frame (issue 25).

    .venv/bin/python bench/upstream_frames.py [--frames 40000] [--runs 5] [--checkout PATH]

What it times, for two shapes of upstream frame (one FMP tick per frame, as FMP sends them; a
Finnhub ``trade`` frame holding ``--trades`` trades):

- ``WsClient``: the relay's upstream client (``trio_relay.providers.wsclient``) parsing the
  frames of a whole feed, ``receive_batch()`` after ``receive_batch()``, each read handing it one
  256 KiB chunk of the byte stream (cut anywhere, as TCP does). Only the socket is left out: the
  client's transport is replaced by one that replays the server's handshake reply and the
  chunks, so the same code runs as in production from the handshake on. ``--checkout PATH``
  times the ``trio_relay`` of another checkout (e.g. one on the commit before issue 25's port,
  for the wsproto client): same frames, same method.
- ``wsproto`` and ``websockets``: each library's own parser alone (``Connection(CLIENT)``
  ``receive_data`` + ``events()``; ``Protocol(CLIENT, state=OPEN)`` ``receive_data`` +
  ``events_received()``), fed the same chunks: what the client adds on top of its parser.

Each figure: the median and range over ``--runs`` runs (one discarded warm-up before them), in
µs per frame. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import trio
import websockets.protocol
import wsproto
import wsproto.events as wse
from wsproto.connection import Connection, ConnectionState, ConnectionType

CHUNK = 1 << 18  # what one read of the client brings at most (wsclient.RECEIVE_BYTES)


def fmp_frames(count: int, symbols: int = 500) -> list[str]:
    """One tick per frame, FMP's shape (as bench/ingest.py and the fake FMP server send them)."""
    t = time.time_ns()
    out = []
    for i in range(count):
        s = f"sym{i % symbols:04d}"
        if i % 3:
            out.append(
                '{"s":"%s","t":%d,"type":"Q","ap":%.2f,"as":300,"bp":%.2f,"bs":200,"lp":null,"ls":null}'
                % (s, t + i, 100 + i % 50 * 0.01, 99.9 + i % 50 * 0.01)
            )
        else:
            out.append(
                '{"s":"%s","t":%d,"type":"T","lp":%.2f,"ls":%d,"ap":null,"as":null,"bp":null,"bs":null}'
                % (s, t + i, 100 + i % 50 * 0.01, 100 + i % 7)
            )
    return out


def finnhub_frames(count: int, trades: int, symbols: int = 500) -> list[str]:
    """``{"type":"trade","data":[...]}`` frames of ``trades`` trades each (the fake Finnhub's encoding)."""
    enc = msgspec.json.Encoder()
    t = time.time_ns() // 1_000_000
    out = []
    for i in range(count):
        data = [
            {"s": f"SYM{(i * trades + j) % symbols:04d}", "p": 100 + j * 0.01, "t": t + i, "v": 100 + j, "c": []}
            for j in range(trades)
        ]
        out.append(enc.encode({"type": "trade", "data": data}).decode())
    return out


def server_stream(messages: list[str]) -> bytes:
    """The bytes a server sends for ``messages``, one unfragmented text frame each."""
    server = Connection(ConnectionType.SERVER)
    return b"".join(server.send(wse.Message(data=m)) for m in messages)


def chunks(stream: bytes) -> list[bytes]:
    return [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]


class _Replay:
    """Stands in for ``wsclient._Transport``: answers the upgrade, then hands out one chunk per read."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        self._pending: list[bytes] = []
        self._pieces: Iterator[bytes] = iter(pieces)

    async def send_all(self, data: bytes) -> None:
        if self._server.state is ConnectionState.CONNECTING:
            self._server.receive_data(data)
            for event in self._server.events():
                if isinstance(event, wse.Request):
                    self._pending.append(self._server.send(wse.AcceptConnection()))

    async def receive(self) -> bytes:
        if self._pending:
            return self._pending.pop(0)
        return next(self._pieces, b"")

    def close(self) -> None:
        pass


def time_wsclient(wsclient: Any, pieces: list[bytes], count: int) -> float:
    """Seconds for ``WsClient.receive_batch`` to hand out ``count`` messages fed as ``pieces``."""
    replay = _Replay(pieces)

    async def connect(cls: Any, host: str, port: int, tls: Any) -> _Replay:
        return replay

    wsclient._Transport.connect = classmethod(connect)

    async def run() -> float:
        ws = await wsclient.WsClient.connect("ws://127.0.0.1:9/bench", max_message=1 << 22)
        got = 0
        gc.collect()
        start = time.perf_counter()
        while got < count:
            got += len(await ws.receive_batch())
        elapsed = time.perf_counter() - start
        assert got == count, got
        return elapsed

    return trio.run(run)


def time_wsproto(pieces: list[bytes], count: int) -> float:
    conn = Connection(ConnectionType.CLIENT)  # a frame-level connection: already open
    got = 0
    gc.collect()
    start = time.perf_counter()
    for piece in pieces:
        conn.receive_data(piece)
        for event in conn.events():
            if isinstance(event, wse.TextMessage) and event.message_finished:
                got += 1
    elapsed = time.perf_counter() - start
    assert got == count, got
    return elapsed


def time_websockets(pieces: list[bytes], count: int) -> float:
    proto = websockets.protocol.Protocol(
        websockets.protocol.Side.CLIENT, state=websockets.protocol.State.OPEN, max_size=1 << 22
    )
    text = websockets.frames.Opcode.TEXT
    got = 0
    gc.collect()
    start = time.perf_counter()
    for piece in pieces:
        proto.receive_data(piece)
        for frame in proto.events_received():
            if frame.opcode is text:  # type: ignore[union-attr]
                frame.data.decode()  # type: ignore[union-attr]
                got += 1
    elapsed = time.perf_counter() - start
    assert got == count, got
    return elapsed


def summary(samples: list[float], count: int) -> dict[str, Any]:
    per = [s / count * 1e6 for s in samples]
    return {
        "median": round(statistics.median(per), 3),
        "min": round(min(per), 3),
        "max": round(max(per), 3),
        "runs": [round(x, 3) for x in per],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=40_000, help="frames per run and shape (default 40,000)")
    p.add_argument("--trades", type=int, default=10, help="trades per Finnhub frame (default 10)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--checkout", type=Path, help="time the trio_relay package of this checkout instead")
    p.add_argument("--only", choices=["wsclient", "parsers"], help="time only the client, or only the parsers")
    args = p.parse_args()
    if args.checkout is not None:
        sys.path.insert(0, str(args.checkout.resolve()))
    wsclient = importlib.import_module("trio_relay.providers.wsclient")
    origin = Path(wsclient.__file__).resolve().parents[2]
    client_lib = "wsproto" if hasattr(wsclient, "wsproto") else "websockets"

    shapes = {
        "fmp": fmp_frames(args.frames),
        f"finnhub{args.trades}": finnhub_frames(args.frames, args.trades),
    }
    timers: dict[str, Callable[[list[bytes], int], float]] = {}
    if args.only != "parsers":
        timers["wsclient"] = lambda pieces, n: time_wsclient(wsclient, pieces, n)
    if args.only != "wsclient":
        timers["wsproto"] = time_wsproto
        timers["websockets"] = time_websockets

    results: dict[str, dict[str, dict[str, Any]]] = {}
    print(f"WsClient of {origin} (on {client_lib}); {args.frames:,} frames per run, {args.runs} runs, µs/frame")
    print(f"{'shape':<12} {'bytes/frame':>11} {'path':<11} {'median':>8} {'range':>18}")
    for shape, messages in shapes.items():
        stream = server_stream(messages)
        pieces = chunks(stream)
        for name, timer in timers.items():
            timer(pieces, len(messages))  # warm-up
            s = summary([timer(pieces, len(messages)) for _ in range(args.runs)], len(messages))
            results.setdefault(shape, {})[name] = s
            print(
                f"{shape:<12} {len(stream) / len(messages):>11.0f} {name:<11} {s['median']:>8.2f} "
                f"{'[' + format(s['min'], '.2f') + '..' + format(s['max'], '.2f') + ']':>18}"
            )
    print(
        json.dumps(
            {
                "bench": "upstream_frames",
                "checkout": str(origin),
                "wsclient_on": client_lib,
                "frames": args.frames,
                "runs": args.runs,
                "us_per_frame": results,
            }
        )
    )


if __name__ == "__main__":
    main()
