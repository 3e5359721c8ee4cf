#!/usr/bin/env python3
"""Per-subscription delivery options: bytes per update, and the hub's cost, in one process.

    .venv/bin/python bench/delivery.py [--symbols 100] [--updates 200000] [--clients 1000]

A simulated market (trades and quotes alternating, prices on a random walk, as the sim provider
makes them) goes through the real ``Hub.publish`` with ``--clients`` clients subscribed to every
symbol, all with the same delivery options, once per option set. For each set it prints:

- bytes per update: the mean size of the messages a client gets (the WebSocket payload; what a
  browser downloads and parses), and the messages it gets per upstream update (``max_rate``);
- µs per update in the hub: encode + route to every client (one feed per option set, so it is
  paid once for all the clients, plus one outbox append per client);
- distinct frames: how many different byte strings the clients got for the same update
  (1 = encoded once and shared).

Every client's outbox is drained after each 100 updates, as the clients' senders do between
two turns of the hub.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import trio

from trio_relay.config import ClientsConfig
from trio_relay.hub import Demand, Hub, Stats
from trio_relay.hub.delivery import DeliveryOptions
from trio_relay.model import Update, ws_payload

OPTION_SETS: dict[str, DeliveryOptions | None] = {
    "default": None,
    "fields=last_price": DeliveryOptions(fields=("last_price",)),
    "fields=last,bid,ask": DeliveryOptions(fields=("last_price", "bid_price", "ask_price")),
    "delta": DeliveryOptions(delta=True),
    "fields=last,bid,ask + delta": DeliveryOptions(fields=("last_price", "bid_price", "ask_price"), delta=True),
}


def market(symbols: list[str], count: int) -> list[Update]:
    rng = random.Random(7)
    price = {s: 100.0 + 10 * i for i, s in enumerate(symbols)}
    out = []
    ts = 1_733_400_000_000
    for i in range(count):
        s = symbols[i % len(symbols)]
        price[s] = round(price[s] * (1 + rng.gauss(0, 0.0004)), 2)
        ts += 1
        if i % 3 == 0:
            out.append(Update(s, "T", ts, last_price=price[s], last_size=float(rng.randint(1, 50) * 100)))
        else:
            bid = round(price[s] - 0.01 * rng.randint(1, 3), 2)
            out.append(Update(s, "Q", ts, bid_price=bid, bid_size=100.0, ask_price=bid + 0.02, ask_size=200.0))
    return out


async def measure(name: str, options: DeliveryOptions | None, args: argparse.Namespace) -> dict[str, Any]:
    symbols = [f"SYM{i:03d}" for i in range(args.symbols)]
    updates = market(symbols, args.updates)
    config = ClientsConfig(outbox_size=4096, max_symbols_per_client=args.symbols)
    async with Hub.open(config, Demand(linger=0.0), Stats()) as hub:
        clients = [hub.connect() for _ in range(args.clients)]
        for client in clients:
            for start in range(0, len(symbols), 50):
                hub.subscribe(client, symbols[start : start + 50], options=options)
        for client in clients:
            await client.outbox.get()  # acks and snapshots are not what we measure
        elapsed = 0.0
        prices: list[bytes] = []
        distinct = 0
        # As in the relay, every client's sender takes what is pending between hub turns.
        for start in range(0, len(updates), 100):
            began = time.perf_counter()
            for update in updates[start : start + 100]:
                hub.publish(update)
            elapsed += time.perf_counter() - began
            taken = [await c.outbox.get() for c in clients]
            prices += [ws_payload(f) for f in taken[0]]
            distinct = max(distinct, len({id(frames[-1]) for frames in taken}))
    sizes = [len(p) for p in prices]
    return {
        "options": name,
        "messages_per_update": round(len(prices) / len(updates), 3),
        "bytes_per_message": round(sum(sizes) / len(sizes), 1),
        "bytes_per_update": round(sum(sizes) / len(updates), 1),
        "hub_us_per_update": round(elapsed / len(updates) * 1e6, 2),
        "distinct_frames_per_update": distinct,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = [await measure(name, options, args) for name, options in OPTION_SETS.items()]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--updates", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=200, help="clients subscribed to every symbol")
    args = parser.parse_args()
    results = trio.run(main_async, args)
    default = results[0]["bytes_per_update"]
    print(
        f"{'options':32} {'msgs/update':>11} {'bytes/msg':>10} {'bytes/update':>12} {'vs default':>10} {'hub µs/update':>14} {'distinct':>8}"
    )
    for r in results:
        print(
            f"{r['options']:32} {r['messages_per_update']:>11} {r['bytes_per_message']:>10} {r['bytes_per_update']:>12} "
            f"{r['bytes_per_update'] / default:>9.0%} {r['hub_us_per_update']:>14} {r['distinct_frames_per_update']:>8}"
        )
    print(json.dumps({"clients": args.clients, "symbols": args.symbols, "updates": args.updates, "results": results}))


if __name__ == "__main__":
    main()
