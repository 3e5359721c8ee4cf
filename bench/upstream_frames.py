#!/usr/bin/env python3
"""The upstream frame path, in one process, no sockets: µs per WebSocket frame (issue 25).

    .venv/bin/python bench/upstream_frames.py [--frames 40000] [--runs 5] [--before FILE]

What it times, for two shapes of upstream frame (one FMP tick per frame, as FMP sends them; a
Finnhub ``trade`` frame holding ``--trades`` trades):

- ``wsclient``: the relay's upstream client (``trio_relay.providers.wsclient``) parsing the
  frames of a whole feed, ``receive_batch()`` after ``receive_batch()``, each read handing it one
  256 KiB chunk of the byte stream (cut anywhere, as TCP does). Only the socket is left out: the
  client's transport is replaced by one that replays the server's handshake reply and the
  chunks, so the same code runs as in production from the handshake on.
- ``before`` (with ``--before FILE``): the same for the ``wsclient.py`` of another revision, loaded
  beside the current one, e.g. the wsproto client from before issue 25::

      git show aa419d3:trio_relay/providers/wsclient.py > /tmp/wsclient_wsproto.py
      .venv/bin/python bench/upstream_frames.py --before /tmp/wsclient_wsproto.py
- ``wsproto`` and ``websockets``: each library's own parser alone (``Connection(CLIENT)``
  ``receive_data`` + ``events()``; ``Protocol(CLIENT, state=OPEN)`` ``receive_data`` +
  ``events_received()``), fed the same chunks: what the client adds on top of its parser.

Each figure: the median and range over ``--runs`` runs (one discarded warm-up before them), in
µs per frame. The paths take turns run by run, so a machine that gets busier half-way through
disturbs them alike. Prints a table and, last, one JSON line (every run's figure included).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
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


def load_wsclient(path: Path) -> Any:
    """``path`` (a wsclient.py) imported as a sibling module of the current one, so its relative
    imports (``.base``) resolve to this checkout's package."""
    spec = importlib.util.spec_from_file_location("trio_relay.providers._wsclient_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=40_000, help="frames per run and shape (default 40,000)")
    p.add_argument("--trades", type=int, default=10, help="trades per Finnhub frame (default 10)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--before", type=Path, help="also time the WsClient of this wsclient.py (another revision's)")
    args = p.parse_args()
    wsclient = importlib.import_module("trio_relay.providers.wsclient")
    timers: dict[str, Callable[[list[bytes], int], float]] = {}
    libs = {"wsclient": "wsproto" if hasattr(wsclient, "wsproto") else "websockets"}
    timers["wsclient"] = lambda pieces, n: time_wsclient(wsclient, pieces, n)
    if args.before is not None:
        before = load_wsclient(args.before)
        libs["before"] = "wsproto" if hasattr(before, "wsproto") else "websockets"
        timers["before"] = lambda pieces, n: time_wsclient(before, pieces, n)
    timers["wsproto"] = time_wsproto
    timers["websockets"] = time_websockets

    shapes = {
        "fmp": fmp_frames(args.frames),
        f"finnhub{args.trades}": finnhub_frames(args.frames, args.trades),
    }
    results: dict[str, dict[str, dict[str, Any]]] = {}
    on = ", ".join(f"{name} on {lib}" for name, lib in libs.items())
    print(f"{on}; {args.frames:,} frames per run, {args.runs} runs, µs/frame")
    print(f"{'shape':<12} {'bytes/frame':>11} {'path':<11} {'median':>8} {'range':>18}")
    for shape, messages in shapes.items():
        stream = server_stream(messages)
        pieces = chunks(stream)
        samples: dict[str, list[float]] = {name: [] for name in timers}
        for timer in timers.values():
            timer(pieces, len(messages))  # warm-up
        for _ in range(args.runs):
            for name, timer in timers.items():
                samples[name].append(timer(pieces, len(messages)))
        for name in timers:
            s = results.setdefault(shape, {})[name] = summary(samples[name], len(messages))
            print(
                f"{shape:<12} {len(stream) / len(messages):>11.0f} {name:<11} {s['median']:>8.2f} "
                f"{'[' + format(s['min'], '.2f') + '..' + format(s['max'], '.2f') + ']':>18}"
            )
    print(
        json.dumps(
            {
                "bench": "upstream_frames",
                "libraries": libs,
                "frames": args.frames,
                "trades_per_finnhub_frame": args.trades,
                "runs": args.runs,
                "us_per_frame": results,
            }
        )
    )


if __name__ == "__main__":
    main()
