#!/usr/bin/env python3
"""Tick history figures: how fast the real HistoryWriter writes, and how fast a day reads back.

    .venv/bin/python bench/storage.py [--backends sqlite,postgres] [--seconds 5] [--warmup 1]
                                      [--rate 50000] [--paced-seconds 15] [--dsn postgresql://postgres@127.0.0.1:5432/test]
                                      [--day-symbols 10] [--data-dir DIR]

1. write, saturated: one producer task offers updates (500 symbols, 1 trade : 2 quotes) to a real
   :class:`HistoryWriter` as fast as it can, yielding to Trio every 1,000 offers and for 1 ms
   whenever the buffer is full (a producer spinning on a full buffer would only measure the GIL).
   Measured: updates written per second over ``--seconds`` after ``--warmup``. Default writer
   settings (queue 200,000, batches of up to 10,000, flush 0.5 s).
2. write, paced: the same at a fixed ``--rate`` (the issue's target, 50,000/s), offered every
   10 ms, over ``--paced-seconds``: written/s, updates dropped and the most ever pending (the
   rate is sustained when nothing is dropped and pending stays far below the 200,000 bound).
   Both runs also give the process's CPU time (every thread: the producer, Trio, the writer's
   worker thread, SQLite's own work) per row written in the window: what the history costs the
   relay's core, which the writer shares with everything else when the relay is pinned.
3. a day of one symbol: 86,400 ticks (one a second, 1 trade : 2 quotes) of each of
   ``--day-symbols`` symbols, interleaved in time as they would arrive, written through a backend
   connection; then, through :class:`HistoryStore` (worker thread, Tick objects included): the
   whole day in one page, the first page of 1,000, the whole day walked in pages of 1,000, and the
   day's trades. Median of 5 runs each.

SQLite writes to a temporary directory (or ``--data-dir``); PostgreSQL to a table of its own,
dropped at the end. Prints a table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import trio

from trio_relay.history import HistoryBackend, HistoryStore, HistoryWriter, PostgresBackend, SqliteBackend
from trio_relay.model import Update

DAY_S = 86_400
DAY0_MS = 1_710_115_200_000  # 2024-03-11T00:00:00Z


def make_updates(count: int, symbols: int) -> list[Update]:
    t0 = time.time_ns() // 1_000_000
    out = []
    for i in range(count):
        s = f"SYM{i % symbols:04d}"
        if i % 3 == 0:
            out.append(Update(s, "T", t0 + i, last_price=100 + i % 50 * 0.01, last_size=float(100 + i % 7)))
        else:
            out.append(
                Update(
                    s,
                    "Q",
                    t0 + i,
                    ask_price=100.01 + i % 50 * 0.01,
                    ask_size=300.0,
                    bid_price=99.99 + i % 50 * 0.01,
                    bid_size=200.0,
                )
            )
    return out


async def write_rate(
    backend: HistoryBackend, updates: list[Update], args: argparse.Namespace, rate: float | None, seconds: float
) -> dict[str, float]:
    """Offer updates (as fast as possible, or at ``rate``/s) and measure written/s over ``seconds``."""
    writer = HistoryWriter(backend, retention_days=0, shutdown_timeout=1.0)
    n = len(updates)
    offered = 0  # calls of offer(), accepted or dropped
    max_pending = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        offer = writer.offer
        i = 0
        begin = trio.current_time()
        window_start = begin + args.warmup
        window_end = window_start + seconds
        written0 = dropped0 = 0
        cpu0 = 0.0
        measuring = False
        next_tick = begin
        while True:
            now = trio.current_time()
            if not measuring and now >= window_start:
                measuring, written0, dropped0, offered0 = True, writer.written, writer.dropped, offered
                cpu0 = time.process_time()
            if now >= window_end:
                break
            recv = time.time_ns() // 1_000_000
            if rate is None:  # saturated
                for _ in range(1000):
                    accepted = offer(updates[i], recv)
                    i = (i + 1) % n
                    offered += 1
                    if not accepted:
                        await trio.sleep(0.001)  # a full buffer: spinning on it would only measure the GIL
                        break
                else:
                    await trio.lowlevel.checkpoint()
            else:
                next_tick += 0.01
                for _ in range(round(rate / 100)):
                    offer(updates[i], recv)
                    i = (i + 1) % n
                    offered += 1
                await trio.sleep_until(next_tick)
            if measuring:
                max_pending = max(max_pending, writer.pending)
        written = writer.written - written0
        dropped = writer.dropped - dropped0
        elapsed = trio.current_time() - window_start
        cpu = time.process_time() - cpu0
        await writer.aclose()
    return {
        "written_per_s": written / elapsed,
        "offered_per_s": (offered - offered0) / elapsed,
        "accepted_per_s": (offered - offered0 - dropped) / elapsed,
        "dropped": float(dropped),
        "max_pending": float(max_pending),
        "cpu_us_per_row": cpu / max(written, 1) * 1e6,
    }


def day_rows(symbols: int) -> list[tuple[Update, int]]:
    rows = []
    for sec in range(DAY_S):
        ts = DAY0_MS + sec * 1000
        for k in range(symbols):
            s = f"DAY{k:02d}"
            if sec % 3 == 0:
                rows.append(
                    (Update(s, "T", ts + k, last_price=100 + sec % 100 * 0.01, last_size=100.0), ts + k + 5, None)
                )
            else:
                quote = Update(s, "Q", ts + k, ask_price=100.01, ask_size=300.0, bid_price=99.99, bid_size=200.0)
                rows.append((quote, ts + k + 5, None))
    return rows


def fill_day(backend: HistoryBackend, symbols: int) -> float:
    rows = day_rows(symbols)
    conn = backend.connect()
    start = time.perf_counter()
    for i in range(0, len(rows), 50_000):
        conn.write(rows[i : i + 50_000])
    elapsed = time.perf_counter() - start
    conn.close()
    return len(rows) / elapsed


async def median_ms(fn: Callable[[], Awaitable[Any]], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def day_queries(backend: HistoryBackend) -> dict[str, float]:
    symbol, start, end = "DAY00", DAY0_MS, DAY0_MS + DAY_S * 1000
    async with HistoryStore(backend) as store:
        rows, cursor = await store.ticks(symbol, start, end, 100_000)
        assert len(rows) == DAY_S and cursor is None, (len(rows), cursor)

        async def whole() -> None:
            await store.ticks(symbol, start, end, 100_000)

        async def first_page() -> None:
            await store.ticks(symbol, start, end, 1000)

        async def paged() -> None:
            got, cursor = await store.ticks(symbol, start, end, 1000)
            total = len(got)
            while cursor is not None:
                got, cursor = await store.ticks(symbol, start, end, 1000, after=cursor)
                total += len(got)
            assert total == DAY_S

        async def trades() -> None:
            assert len(await store.trades(symbol, start, end)) == DAY_S // 3

        return {
            "day_all_ms": await median_ms(whole),
            "day_page_ms": await median_ms(first_page),
            "day_paged_ms": await median_ms(paged),
            "day_trades_ms": await median_ms(trades),
        }


async def measure(args: argparse.Namespace) -> dict[str, float]:
    updates = make_updates(200_000, 500)
    results: dict[str, float] = {}
    tmp = tempfile.TemporaryDirectory(prefix="trio-relay-bench-", dir=args.data_dir)
    table = f"bench_ticks_{os.getpid()}"
    try:
        for name in args.backends.split(","):
            backends: Callable[[str], HistoryBackend]
            if name == "sqlite":
                backends = lambda sub: SqliteBackend(Path(tmp.name) / sub)  # noqa: E731
            elif name == "postgres":
                backends = lambda sub: PostgresBackend(args.dsn, table=f"{table}_{sub}")  # noqa: E731
            else:
                raise SystemExit(f"unknown backend {name!r}")
            print(f"{name}: saturated write ({args.warmup:g} s warm-up + {args.seconds:g} s)...", file=sys.stderr)
            sat = await write_rate(backends("sat"), updates, args, None, args.seconds)
            print(
                f"{name}: paced write at {args.rate:,.0f}/s ({args.warmup:g} s + {args.paced_seconds:g} s)...",
                file=sys.stderr,
            )
            paced = await write_rate(backends("paced"), updates, args, args.rate, args.paced_seconds)
            print(f"{name}: a day of {args.day_symbols} symbols...", file=sys.stderr)
            day = backends("day")
            fill = await trio.to_thread.run_sync(fill_day, day, args.day_symbols)
            if name == "postgres":
                with psycopg.connect(args.dsn, autocommit=True) as conn:
                    conn.execute(f'VACUUM ANALYZE "{table}_day"')  # as autovacuum would have by then
            queries = await day_queries(day)
            results |= {
                f"{name}_write_ticks_per_s": sat["written_per_s"],
                f"{name}_write_accepted_per_s": sat["accepted_per_s"],
                f"{name}_write_dropped": sat["dropped"],
                f"{name}_write_cpu_us_per_row": sat["cpu_us_per_row"],
                f"{name}_paced_rate": args.rate,
                f"{name}_paced_offered_per_s": paced["offered_per_s"],
                f"{name}_paced_written_per_s": paced["written_per_s"],
                f"{name}_paced_dropped": paced["dropped"],
                f"{name}_paced_max_pending": paced["max_pending"],
                f"{name}_paced_cpu_us_per_row": paced["cpu_us_per_row"],
                f"{name}_day_fill_rows_per_s": fill,
                **{f"{name}_{k}": v for k, v in queries.items()},
            }
    finally:
        tmp.cleanup()
        if "postgres" in args.backends:
            with psycopg.connect(args.dsn, autocommit=True) as conn:
                for sub in ("sat", "paced", "day"):
                    conn.execute(f'DROP TABLE IF EXISTS "{table}_{sub}"')
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=50_000.0, help="paced run: updates offered per second")
    p.add_argument(
        "--paced-seconds", type=float, default=15.0, help="paced run: the window (long enough for checkpoints)"
    )
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument(
        "--day-symbols", type=int, default=10, help="symbols with a full day each (the one queried among them)"
    )
    p.add_argument("--data-dir", default=None, help="where the SQLite files go (default: a temporary directory)")
    args = p.parse_args()
    # The saturated runs fill the buffer and stop with it full: the writer's warnings say so, expectedly.
    logging.getLogger("trio_relay.history").setLevel(logging.ERROR)
    r = trio.run(measure, args)
    names = [n for n in args.backends.split(",") if f"{n}_write_ticks_per_s" in r]
    print(f"{'':42}" + "".join(f"{n:>14}" for n in names))
    rows = [
        ("write, saturated: written ticks/s", "write_ticks_per_s", "{:,.0f}"),
        ("  accepted/s (waits 1 ms when full)", "write_accepted_per_s", "{:,.0f}"),
        ("  dropped (full buffer) in the window", "write_dropped", "{:,.0f}"),
        ("  CPU µs per written row (process)", "write_cpu_us_per_row", "{:,.2f}"),
        (f"write, paced at {args.rate:,.0f}/s: offered/s", "paced_offered_per_s", "{:,.0f}"),
        ("  written/s", "paced_written_per_s", "{:,.0f}"),
        ("  dropped", "paced_dropped", "{:,.0f}"),
        ("  most pending", "paced_max_pending", "{:,.0f}"),
        ("  CPU µs per written row (process)", "paced_cpu_us_per_row", "{:,.2f}"),
        (f"day fill ({args.day_symbols} × 86,400 rows), rows/s", "day_fill_rows_per_s", "{:,.0f}"),
        ("day of 1 symbol, one page of 86,400: ms", "day_all_ms", "{:,.1f}"),
        ("day, first page of 1,000: ms", "day_page_ms", "{:,.2f}"),
        ("day, all 87 pages of 1,000: ms", "day_paged_ms", "{:,.1f}"),
        ("day, trades (28,800): ms", "day_trades_ms", "{:,.1f}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:42}" + "".join(f"{fmt.format(r[f'{n}_{key}']):>14}" for n in names))
    print(json.dumps({"bench": "storage", **{k: round(v, 2) for k, v in r.items()}}))


if __name__ == "__main__":
    main()
