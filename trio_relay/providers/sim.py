"""The embedded simulated market: no key, no network.

Any valid symbol gets a plausible random walk: a start price derived from the seed and the symbol,
log-normal steps, a bid/ask spread of a few basis points on a 0.01 tick (bid < ask always),
round-lot quote sizes and odd-lot trade sizes, wall-clock timestamps. For a given seed each
symbol's path is the same on every run.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from ..model import QUOTE, TRADE, Update, wall_ms
from ..settings import non_negative, positive
from .base import ProviderEntry

__all__ = ["SimConfig", "ENTRY", "SimMarket", "SimProvider", "SimSession"]


@attrs.frozen
class SimConfig:
    # Updates per second per subscribed symbol.
    rate: float = attrs.field(default=4.0, validator=positive)
    seed: int = 42
    # Share of updates that are trades (the rest are quotes).
    trade_ratio: float = attrs.field(default=0.4, validator=non_negative)


class _Walk:
    __slots__ = ("rng", "mid", "vol", "tick")

    def __init__(self, seed: int, symbol: str) -> None:
        # Seeding with a str hashes it with SHA-512: stable across runs (unlike hash()).
        self.rng = random.Random(f"{seed}:{symbol}")
        self.mid = round(math.exp(self.rng.uniform(math.log(5), math.log(800))), 2)
        self.vol = self.rng.uniform(0.0002, 0.0012)  # per-step log-return deviation
        self.tick = 0.01 if self.mid >= 1 else 0.0001


class SimMarket:
    """Deterministic-per-seed quotes and trades for any symbol."""

    def __init__(self, seed: int = 42, trade_ratio: float = 0.4) -> None:
        self.seed = seed
        self.trade_ratio = trade_ratio
        self._walks: dict[str, _Walk] = {}

    def _walk(self, symbol: str) -> _Walk:
        walk = self._walks.get(symbol)
        if walk is None:
            walk = self._walks[symbol] = _Walk(self.seed, symbol)
        return walk

    def forget(self, symbol: str) -> None:
        self._walks.pop(symbol, None)

    def quote(self, symbol: str, ts_ms: int | None = None) -> Update:
        w = self._walk(symbol)
        spread_ticks = max(1, round(w.mid * w.rng.uniform(0.0001, 0.0006) / w.tick))
        bid = round(round(w.mid / w.tick) * w.tick - (spread_ticks // 2) * w.tick, 4)
        ask = round(bid + spread_ticks * w.tick, 4)
        if bid <= 0:
            bid, ask = w.tick, 2 * w.tick
        return Update(
            symbol=symbol,
            kind=QUOTE,
            timestamp=ts_ms if ts_ms is not None else wall_ms(),
            bid_price=bid,
            bid_size=100 * w.rng.randint(1, 50),
            ask_price=ask,
            ask_size=100 * w.rng.randint(1, 50),
        )

    def next(self, symbol: str, ts_ms: int | None = None) -> Update:
        """Advance the symbol's walk one step and return a trade or a quote."""
        w = self._walk(symbol)
        w.mid = max(w.tick, w.mid * math.exp(w.rng.gauss(0.0, w.vol)))
        if w.rng.random() < self.trade_ratio:
            return Update(
                symbol=symbol,
                kind=TRADE,
                timestamp=ts_ms if ts_ms is not None else wall_ms(),
                last_price=round(round(w.mid / w.tick) * w.tick, 4),
                last_size=w.rng.choice((1, 5, 10, 25, 50, 100, 100, 100, 200, 300, 500, 1000)),
            )
        return self.quote(symbol, ts_ms)


class SimSession:
    """Emits ``rate`` updates per second per subscribed symbol, in small batches."""

    MIN_INTERVAL = 0.005  # never wake more often than this; emit several updates per wake instead

    def __init__(self, config: SimConfig) -> None:
        self._market = SimMarket(config.seed, config.trade_ratio)
        self._rate = config.rate
        self._pick = random.Random(config.seed)
        self._symbols: list[str] = []
        self._fresh: list[str] = []  # just subscribed: they get a quote at once
        self._wake = trio.Event()
        self._next = trio.current_time()
        self._owed = 0.0

    @property
    def symbols(self) -> list[str]:
        return list(self._symbols)

    async def subscribe(self, symbols: Sequence[str]) -> None:
        for s in symbols:
            if s not in self._symbols:
                self._symbols.append(s)
                self._fresh.append(s)
        self._wake.set()

    async def unsubscribe(self, symbols: Sequence[str]) -> None:
        gone = set(symbols)
        self._symbols = [s for s in self._symbols if s not in gone]
        self._fresh = [s for s in self._fresh if s not in gone]
        for s in gone:
            self._market.forget(s)

    async def receive(self) -> list[Update]:
        while True:
            if self._fresh:
                fresh, self._fresh = self._fresh, []
                return [self._market.quote(s) for s in fresh]
            if not self._symbols:
                self._wake = trio.Event()
                await self._wake.wait()
                self._next = trio.current_time()
                continue
            n = len(self._symbols)
            interval = max(1.0 / (self._rate * n), self.MIN_INTERVAL)
            now = trio.current_time()
            # If we fell far behind (a busy hub), skip ahead instead of bursting.
            self._next = max(self._next + interval, now - 1.0)
            if self._next > now:
                with trio.move_on_at(self._next):
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue  # a subscribe arrived: serve the fresh symbols first
            symbols = self._symbols
            if not symbols:
                continue  # everything was unsubscribed while we waited
            self._owed += self._rate * len(symbols) * interval
            count = int(self._owed)
            self._owed -= count
            if count == 0:
                continue
            ts = wall_ms()
            pick = self._pick.choice
            return [self._market.next(pick(symbols), ts) for _ in range(count)]


class SimProvider:
    name = "sim"
    detects_stale = False  # it cannot go silent by accident

    def __init__(self, config: SimConfig) -> None:
        self.config = config

    def describe(self) -> str:
        return f"simulated market (seed {self.config.seed}, {self.config.rate:g} updates/s per symbol)"

    @asynccontextmanager
    async def session(self, on_malformed: object = None) -> AsyncIterator[SimSession]:
        yield SimSession(self.config)


def _check(settings: SimConfig) -> str | None:
    return "trade_ratio: must be between 0 and 1" if settings.trade_ratio > 1 else None


ENTRY = ProviderEntry(
    name="sim", settings=SimConfig, build=lambda settings, _upstream: SimProvider(settings), network=False, check=_check
)
