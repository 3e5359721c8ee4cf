#!/usr/bin/env python3
"""Alert evaluation cost: µs per update through ``AlertEngine.on_update``, in one process.

    .venv/bin/python bench/alerts.py [--updates 200000] [--seed 1]

The engine is fed what the hub gives its sync callback: each update and its symbol's merged
cache entry (prepared beforehand: the merge itself is the hub's cost, see bench/ingest.py).
Prices random-walk around 100 (steps of ±0.02 %), one trade then two quotes, 10 ms apart.

Rules are a mix, their thresholds spread over ±10 % of the price so that some fire: 40 % above
and 40 % below (last, bid, ask or mid; half of them re-arming with a 60 s cooldown), 10 % move
(±1..5 % over 60, 300 or 900 s), 10 % spread (5..50 bps). Scenarios:

- 0, 1, 10, 1000 rules on the updated symbol (the engine also holds 10,000 rules on other
  symbols, so "0" is the cost for a symbol without rules in a busy engine);
- 10,000 rules over 500 symbols (20 each), updates round-robin over the 500.

Each scenario runs ``--repeat`` times on a fresh engine (same seed, same updates); the best
run is reported (this is a shared machine's noise filter, not a warm-up). Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from typing import Any

import msgspec

from trio_relay.alerts import AlertEngine
from trio_relay.config import AlertsConfig
from trio_relay.model import PriceState, Update

FIELDS = ("last", "bid", "ask", "mid")


def rule(rng: random.Random, symbol: str) -> dict[str, Any]:
    kind = rng.random()
    rearm: dict[str, Any] = {"one_shot": False, "cooldown_s": 60} if rng.random() < 0.5 else {}
    if kind < 0.8:
        return {
            "type": "above" if kind < 0.4 else "below",
            "symbol": symbol,
            "level": round(rng.uniform(90, 110), 2),
            "field": rng.choice(FIELDS),
            **rearm,
        }
    if kind < 0.9:
        return {
            "type": "move",
            "symbol": symbol,
            "pct": rng.choice((1, 2, 5, -1, -2, -5)),
            "window_s": rng.choice((60, 300, 900)),
            **rearm,
        }
    return {"type": "spread", "symbol": symbol, "max_spread_bps": rng.choice((5, 10, 25, 50)), **rearm}


def feed(rng: random.Random, symbols: list[str], count: int) -> list[tuple[Update, PriceState]]:
    """``count`` updates round-robin over ``symbols``, each with its symbol's state after it."""
    states = {s: PriceState(symbol=s) for s in symbols}
    prices = dict.fromkeys(symbols, 100.0)
    out = []
    ts = 1_700_000_000_000
    for i in range(count):
        s = symbols[i % len(symbols)]
        n = i // len(symbols)
        ts += 10
        p = prices[s] = max(1.0, prices[s] * (1 + rng.uniform(-0.0002, 0.0002)))
        if n % 3 == 0:
            u = Update(s, "T", ts, last_price=round(p, 2), last_size=100)
        else:
            half = p * rng.choice((0.0001, 0.0002, 0.0005, 0.003)) / 2
            u = Update(s, "Q", ts, bid_price=round(p - half, 2), bid_size=1, ask_price=round(p + half, 2), ask_size=1)
        states[s].apply(u, "")
        out.append((u, msgspec.structs.replace(states[s])))
    return out


def measure(rules_on_symbol: int, *, symbols: int, updates: int, seed: int, others: int) -> dict[str, float]:
    rng = random.Random(seed)
    config = AlertsConfig(max_rules_per_user=1_000_000)
    engine = AlertEngine(config)
    names = [f"S{i:03d}" for i in range(symbols)]
    for s in names:
        for _ in range(rules_on_symbol):
            engine.create(f"u{rng.randrange(100)}", rule(rng, s))
    for i in range(others):  # rules on symbols that get no update here
        engine.create(f"u{rng.randrange(100)}", rule(rng, f"O{i % 500:03d}"))
    data = feed(rng, names, updates)
    on_update = engine.on_update
    gc.collect()
    gc.freeze()  # the prepared updates are not the engine's: keep them out of the collections
    start = time.perf_counter()
    fired = 0
    for u, state in data:
        alerts = on_update(u, state)
        if alerts:
            fired += len(alerts)
    elapsed = time.perf_counter() - start
    gc.unfreeze()
    return {"us": elapsed / updates * 1e6, "fired": fired, "rules": len(engine)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--repeat", type=int, default=3, help="runs per scenario (a fresh engine each); the best is reported"
    )
    args = p.parse_args()
    scenarios = [
        ("0 rules on the symbol", "rules_0", dict(rules_on_symbol=0, symbols=1, others=10_000)),
        ("1 rule on the symbol", "rules_1", dict(rules_on_symbol=1, symbols=1, others=10_000)),
        ("10 rules on the symbol", "rules_10", dict(rules_on_symbol=10, symbols=1, others=10_000)),
        ("1000 rules on the symbol", "rules_1000", dict(rules_on_symbol=1000, symbols=1, others=10_000)),
        ("10,000 rules over 500 symbols", "rules_10000_over_500", dict(rules_on_symbol=20, symbols=500, others=0)),
    ]
    result: dict[str, float] = {}
    print(f"{'scenario':<32} {'rules':>7} {'µs/update':>10} {'updates/s':>12} {'fired':>7}")
    for label, key, kw in scenarios:
        runs = [measure(updates=args.updates, seed=args.seed, **kw) for _ in range(args.repeat)]  # type: ignore[arg-type]
        r = min(runs, key=lambda run: run["us"])
        result[f"us_per_update_{key}"] = round(r["us"], 3)
        result[f"fired_{key}"] = r["fired"]
        print(f"{label:<32} {r['rules']:>7,.0f} {r['us']:>10.3f} {1e6 / r['us']:>12,.0f} {r['fired']:>7,.0f}")
    print(f"({args.updates:,} updates per scenario: 1 trade, 2 quotes, 10 ms apart; python {sys.version.split()[0]})")
    print(json.dumps({"bench": "alerts", **result}))


if __name__ == "__main__":
    main()
