#!/usr/bin/env python3
"""Ingest and cache figures, in one process, no sockets: the relay's own per-update cost.

    .venv/bin/python bench/ingest.py [--symbols 500] [--frames 400000] [--cache-symbols 10000]
                                     [--resume-history 128] [--history-symbols 1000]

1. ingest: FMP frames (one JSON object each, as the upstream sends them) go through the same
   code the relay runs for every upstream frame: ``FmpSession``-style decoding
   (``decode_frame``: parse + normalise) and ``Hub.publish`` (merge into the cache, per-symbol
   seq, encode the price_update once, route). No client is subscribed, so routing is a lookup.
   Printed as upstream messages/s on one core, and µs per message.
2. cache: bytes of Python heap per cached symbol (tracemalloc, after one trade and one quote per
   symbol), i.e. what ``hub.cache`` costs per symbol including the cached_at string.
3. resume history: bytes per symbol once its history ring is full (``clients.resume_history``
   frames kept for clients that reconnect and resume).

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc

import trio

from trio_relay.config import ClientsConfig
from trio_relay.hub import Demand, Hub, Stats
from trio_relay.providers.fmp import SymbolMemo, decode_frame


def frames(symbols: list[str], count: int) -> list[bytes]:
    out = []
    t = time.time_ns()
    for i in range(count):
        s = symbols[i % len(symbols)].lower()
        if i % 3:
            out.append(
                b'{"s":"%s","t":%d,"type":"Q","ap":%.2f,"as":300,"bp":%.2f,"bs":200,"lp":null,"ls":null}'
                % (s.encode(), t + i, 100 + i % 50 * 0.01, 99.9 + i % 50 * 0.01)
            )
        else:
            out.append(
                b'{"s":"%s","t":%d,"type":"T","lp":%.2f,"ls":%d,"ap":null,"as":null,"bp":null,"bs":null}'
                % (s.encode(), t + i, 100 + i % 50 * 0.01, 100 + i % 7)
            )
    return out


async def measure(args: argparse.Namespace) -> dict[str, float]:
    symbols = [f"SYM{i:04d}" for i in range(args.symbols)]
    raw = frames(symbols, args.frames)
    clients = ClientsConfig(resume_history=args.resume_history)
    async with Hub.open(clients, Demand(0, symbols), Stats()) as hub:
        publish = hub.publish
        memo = SymbolMemo()  # as a session keeps it
        gc.collect()
        start = time.perf_counter()
        now = time.time_ns() // 1_000_000
        for r in raw:
            _frame, update = decode_frame(r, now, memo)
            if update is not None:
                publish(update)
        elapsed = time.perf_counter() - start
        assert hub.stats.updates_in == args.frames

    cache_symbols = [f"C{i:05d}" for i in range(args.cache_symbols)]
    updates = [decode_frame(r, 0)[1] for r in frames(cache_symbols, 2 * args.cache_symbols)]
    async with Hub.open(ClientsConfig(resume_history=0), Demand(0, cache_symbols), Stats()) as hub:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for u in updates:
            hub.publish(u)  # type: ignore[arg-type]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(hub.cache) == args.cache_symbols
    cache_bytes = (after - before) / args.cache_symbols

    history_bytes = 0.0
    if args.resume_history:
        hist_symbols = [f"H{i:05d}" for i in range(args.history_symbols)]
        fill = [decode_frame(r, 0)[1] for r in frames(hist_symbols, args.resume_history * args.history_symbols)]
        async with Hub.open(clients, Demand(0, hist_symbols), Stats()) as hub:
            for u in fill[: args.history_symbols * 2]:
                hub.publish(u)  # type: ignore[arg-type]  # cache entries first: not counted below
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for u in fill[args.history_symbols * 2 :]:
                hub.publish(u)  # type: ignore[arg-type]
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
        history_bytes = (after - before) / args.history_symbols
    return {
        "history_bytes_per_symbol": history_bytes,
        "ingest_msgs_per_s": args.frames / elapsed,
        "ingest_us_per_msg": elapsed / args.frames * 1e6,
        "cache_bytes_per_symbol": cache_bytes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--symbols", type=int, default=500)
    p.add_argument("--frames", type=int, default=400_000)
    p.add_argument("--cache-symbols", type=int, default=10_000)
    p.add_argument("--resume-history", type=int, default=ClientsConfig().resume_history)
    p.add_argument("--history-symbols", type=int, default=1_000)
    args = p.parse_args()
    result = trio.run(measure, args)
    print(
        f"ingest (parse + normalise + cache + seq + encode + route, no clients): "
        f"{result['ingest_msgs_per_s']:,.0f} msgs/s on one core ({result['ingest_us_per_msg']:.2f} µs/msg), "
        f"resume history {args.resume_history}"
    )
    print(f"cache: {result['cache_bytes_per_symbol']:.0f} bytes per symbol ({args.cache_symbols:,} symbols)")
    print(
        f"resume history ({args.resume_history} updates kept per symbol): "
        f"{result['history_bytes_per_symbol']:,.0f} bytes per symbol when full"
    )
    print(json.dumps({"bench": "ingest", **{k: round(v, 2) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
