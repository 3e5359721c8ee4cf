#!/usr/bin/env python3
"""OHLCV bar building cost, in one process: what ``BarBuilder.add`` adds to every trade.

    .venv/bin/python bench/bars.py [--symbols 500] [--trades 1000000] [--repeat 3]

A builder of all four intervals (1s, 1m, 5m, 1h) over ``--symbols`` symbols, fed prebuilt
``Update`` objects in timestamp order, each arriving when stamped, in three feeds:

- steady: 10,000 trades per second of event time, so each symbol trades ~20 times per 1s bar
  (most trades only update the open bars);
- rolling: each symbol trades once per second, so EVERY trade closes (and allocates) a 1s bar:
  the worst case for add();
- quotes: only quotes, which add() ignores (the price of being on the hub's path for them).

Also: the loop with a no-op method instead of add() (the floor of any per-update hook), flush()
over every open bar, and bytes of state per symbol (tracemalloc). Best of ``--repeat`` runs, in CPU
time of this process (``time.process_time``), which other load on the machine inflates less than
wall time.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc
from collections.abc import Callable, Sequence

from trio_relay.bars import DEFAULT_GRACE_MS, INTERVALS, BarBuilder
from trio_relay.model import Update

T0 = 1_710_165_600_000  # on every interval's boundary


def feed(symbols: list[str], count: int, kind: str, ms_per_trade: float) -> list[Update]:
    n = len(symbols)
    out = []
    for i in range(count):
        ts = T0 + int(i * ms_per_trade)
        price = 100 + (i * 7919 % 200) * 0.01
        size = None if i % 17 == 0 else float(100 + i % 7)
        if kind == "T":
            out.append(Update(symbols[i % n], "T", ts, last_price=price, last_size=size))
        else:
            out.append(
                Update(symbols[i % n], "Q", ts, bid_price=price, bid_size=200.0, ask_price=price + 0.01, ask_size=300.0)
            )
    return out


def best_rate(
    updates: list[Update], make: Callable[[], Callable[[Update, int], Sequence[object]]], repeat: int
) -> tuple[float, int]:
    """Updates per second through ``make()``'s callable (best run), and bars it returned."""
    best = 0.0
    closed = 0
    for _ in range(repeat):
        add = make()
        gc.collect()
        start = time.process_time()
        builder = getattr(add, "__self__", None)
        flush = builder.flush if isinstance(builder, BarBuilder) else (lambda now: [])
        tick = T0 + 1_000
        for u in updates:
            if u.timestamp >= tick:  # the channel's clock: a flush a second
                flush(tick)
                tick += 1_000
            add(u, u.timestamp)
        elapsed = time.process_time() - start
        best = max(best, len(updates) / elapsed)
        if isinstance(builder, BarBuilder):
            assert builder.late == 0
    # Count once, outside the timed loop.
    add = make()
    for u in updates:
        closed += len(add(u, u.timestamp))
    return best, closed


class _Noop:
    def add(self, update: Update, recv_ms: int) -> tuple[object, ...]:
        return ()


def measure(args: argparse.Namespace) -> dict[str, float]:
    symbols = [f"SYM{i:04d}" for i in range(args.symbols)]
    intervals = list(INTERVALS)
    result: dict[str, float] = {}
    feeds = {
        "steady": feed(symbols, args.trades, "T", 0.1),
        "rolling": feed(symbols, args.trades, "T", 1000 / len(symbols)),
        "quotes": feed(symbols, args.trades, "Q", 0.1),
    }
    rate, _ = best_rate(feeds["steady"], lambda: _Noop().add, args.repeat)
    result["noop_per_s"] = rate
    for name, updates in feeds.items():
        rate, closed = best_rate(updates, lambda: BarBuilder(intervals).add, args.repeat)
        result[f"{name}_per_s"] = rate
        result[f"{name}_bars_closed"] = closed

    # flush(): every symbol with an open bar in each interval; a flush that closes nothing (the
    # common case between boundaries), then one that closes every 1s bar.
    for n in (args.symbols, 10_000):
        first_trades = feed([f"F{i:05d}" for i in range(n)], n, "T", 0.01)
        idle = closing = float("inf")
        for _ in range(args.repeat):
            b = BarBuilder(intervals)
            for u in first_trades:
                b.add(u, u.timestamp)
            start = time.process_time()
            assert b.flush(T0 + 999 + DEFAULT_GRACE_MS) == []
            idle = min(idle, time.process_time() - start)
            start = time.process_time()
            assert len(b.flush(T0 + 1_000 + DEFAULT_GRACE_MS)) == n
            closing = min(closing, time.process_time() - start)
        result[f"flush_idle_ms_{n}"] = idle * 1e3
        result[f"flush_close_ms_{n}"] = closing * 1e3

    # State per symbol: four open bars (allocated at a symbol's first trade, then reused).
    n = 10_000
    first = feed([f"M{i:05d}" for i in range(n)], n, "T", 0.01)
    b = BarBuilder(intervals)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for u in first:
        b.add(u, u.timestamp)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    result["state_bytes_per_symbol"] = (after - before) / n
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--symbols", type=int, default=500)
    p.add_argument("--trades", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    r = measure(args)
    print(
        f"BarBuilder(1s, 1m, 5m, 1h), {args.symbols} symbols, {args.trades:,} updates, best of {args.repeat}, one core"
    )
    print(f"{'feed':<46} {'updates/s':>12} {'µs/update':>10} {'bars closed':>12}")
    rows = [
        ("no-op hook (loop + call floor)", r["noop_per_s"], None),
        ("trades, steady (~20/symbol/1s bar)", r["steady_per_s"], r["steady_bars_closed"]),
        ("trades, rolling (every trade closes a 1s bar)", r["rolling_per_s"], r["rolling_bars_closed"]),
        ("quotes (ignored)", r["quotes_per_s"], r["quotes_bars_closed"]),
    ]
    for label, rate, closed in rows:
        print(f"{label:<46} {rate:>12,.0f} {1e6 / rate:>10.3f} {'' if closed is None else f'{closed:,.0f}':>12}")
    for n in (args.symbols, 10_000):
        print(
            f"flush, {n:,} symbols x 4 open bars: {r[f'flush_idle_ms_{n}']:.2f} ms closing none, "
            f"{r[f'flush_close_ms_{n}']:.2f} ms closing {n:,} 1s bars"
        )
    print(f"state: {r['state_bytes_per_symbol']:,.0f} bytes per symbol (4 intervals)")
    print(json.dumps({"bench": "bars", **{k: round(v, 3) for k, v in r.items()}}))


if __name__ == "__main__":
    main()
