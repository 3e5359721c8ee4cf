"""Builds the demo recording: 60 s of simulated ticks for ten symbols.

    python -m trio_relay.demo.make [OUT]   (default: sim-demo.jsonl.gz next to this file)

Deterministic: the :class:`~trio_relay.providers.sim.SimMarket` with a fixed seed, a fixed start
time, a seeded schedule and a gzip header without name or time, so a rebuild gives the same
lines (and, with the same zlib, the same bytes). The shape is what ``trio-relay record`` writes
from the sim provider: an opening quote per symbol, then every 100 ms a batch with an update for
each symbol that ticks (about 3 per second per symbol), received 2-30 ms after its event time.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from ..model import Update
from ..providers.sim import SimMarket
from ..recording import DEMO_RESOURCE, RecordingHeader, RecordingWriter

__all__ = ["SYMBOLS", "build"]

SYMBOLS = ("AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "META", "SPY", "BTCUSD", "EURUSD")
SEED = 42
START_MS = 1_736_173_800_000  # 2025-01-06 14:30:00 UTC, a Monday's US open
SECONDS = 60
TICK_MS = 100
RATE = 3.0  # updates per second per symbol, on average


def build(path: str | Path) -> int:
    """Write the demo recording to ``path`` (replacing it); the number of updates written."""
    market = SimMarket(seed=SEED)
    rng = random.Random(SEED)
    header = RecordingHeader.new("sim", SYMBOLS, START_MS)
    with RecordingWriter(path, header, overwrite=True) as writer:
        t = START_MS + 3
        writer.write_updates([market.quote(s, START_MS) for s in SYMBOLS], t)
        p = RATE * TICK_MS / 1000
        for tick in range(1, SECONDS * 1000 // TICK_MS):
            t = START_MS + tick * TICK_MS + rng.randint(0, 40)  # the receive time
            batch: list[Update] = [market.next(s, t - rng.randint(2, 30)) for s in SYMBOLS if rng.random() < p]
            writer.write_updates(batch, t)
        return writer.updates


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).with_name(DEMO_RESOURCE)
    n = build(out)
    print(f"{out}: {n} updates, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
