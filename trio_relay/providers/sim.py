"""The embedded simulated market: no key, no network.

A symbol's profile (asset class, reference level, tick, daily volatility) comes from
:mod:`.instruments`: AAPL near 278, EURUSD near 1.165, BTCUSD near 92,400, ^GSPC near 6,840, a
plausible level for anything else. From it each symbol gets a previous close (the reference level
moved by one day's noise) and an opening price (the previous close moved by part of a day), then
a random walk at an intraday pace. What a caller may rely on:

- quotes: ``0 < bid < ask`` on the instrument's tick (cents for stocks, a tenth of a pip for
  forex, four significant figures or cents for crypto), a spread of one to a few cents
  (stocks: under a basis point), fractions of a basis point (big coins) or about a pip (forex); sizes in round lots
  (stocks), coin amounts worth $200-$100k (crypto), 1-10 million units (forex);
- trades print inside or at the last published spread (at the bid or the ask most of the time),
  with odd lots and round lots (stocks), fractions of a coin (crypto), 10k-5M units (forex);
- indices (``^GSPC``) print values only: trades without a size, never a quote;
- with a ``seed``, every symbol's path is the same on every run and does not depend on which other
  symbols are simulated; without one (the provider's default) each start draws a fresh seed.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from ..model import QUOTE, TRADE, Update, wall_ms
from ..settings import non_negative, positive
from .base import ProviderEntry
from .instruments import AssetClass, Instrument, instrument

__all__ = ["SimConfig", "ENTRY", "SimMarket", "SimProvider", "SimSession"]

# The walk moves with the time between two updates (their timestamps), not with their number:
# a symbol updated 50 times a second moves no faster than one updated 4 times. A trading day
# is 6.5 hours; the walk moves as the instrument's daily volatility says (AAPL: about 0.6 % an hour).
_DAY_S = 6.5 * 3600
_LIVELINESS = 1.0
_MIN_STEP_S = 0.001  # updates stamped alike (one batch) still move a little
_MAX_STEP_S = 60.0  # a symbol not updated for a long while does not jump
# How much of a day has passed at the opening quote (the day's change so far).
_OPEN_FRACTION = 0.3
MAX_WALKS = 4096  # symbols remembered by one market (an outsider chooses the symbols)


@attrs.frozen
class SimConfig:
    # Updates per second per subscribed symbol.
    rate: float = attrs.field(default=4.0, validator=positive)
    # None: a fresh random path on every start; a number: the same paths on every run.
    seed: int | None = None
    # Share of updates that are trades (the rest are quotes).
    trade_ratio: float = attrs.field(default=0.4, validator=non_negative)


def _round_to(price: float, tick: float) -> float:
    digits = max(0, -math.floor(math.log10(tick) + 1e-9))
    return round(round(price / tick) * tick, digits)


class _Walk:
    """One symbol's path: a latent mid that wanders, and the book last published from it."""

    __slots__ = ("rng", "inst", "prev_close", "mid", "second_vol", "bid", "ask", "last_ts")

    def __init__(self, seed: int, symbol: str) -> None:
        # Seeding with a str hashes it with SHA-512: stable across runs (unlike hash()).
        self.rng = random.Random(f"{seed}:{symbol}")
        self.inst: Instrument = instrument(symbol)
        vol = self.inst.daily_vol
        self.prev_close = _round_to(self.inst.level * math.exp(self.rng.gauss(0.0, vol)), self.inst.tick)
        self.mid = self.prev_close * math.exp(self.rng.gauss(0.0, vol * math.sqrt(_OPEN_FRACTION)))
        self.second_vol = _LIVELINESS * vol / math.sqrt(_DAY_S)  # per square root of a second
        self.bid, self.ask = self._book()
        self.last_ts: int | None = None

    def step(self, ts_ms: int) -> None:
        """Move the mid by the time since the previous step (a Brownian walk in wall time)."""
        seconds = _MIN_STEP_S if self.last_ts is None else (ts_ms - self.last_ts) / 1000
        self.last_ts = ts_ms
        vol = self.second_vol * math.sqrt(min(_MAX_STEP_S, max(_MIN_STEP_S, seconds)))
        self.mid = max(self.inst.tick * 2, self.mid * math.exp(self.rng.gauss(0.0, vol)))

    def _book(self) -> tuple[float, float]:
        """A bid and ask around the mid, on the tick, at least one tick apart."""
        tick, rng = self.inst.tick, self.rng
        bps = {
            AssetClass.EQUITY: rng.uniform(0.1, 0.9),
            AssetClass.CRYPTO: rng.uniform(0.1, 1.0),
            AssetClass.FOREX: rng.uniform(0.4, 1.2),
            AssetClass.INDEX: 0.0,
        }[self.inst.asset]
        ticks = max(1, round(self.mid * bps / 10_000 / tick))
        bid = _round_to(self.mid - ticks * tick / 2, tick)
        if bid <= 0:
            bid = tick
        return bid, _round_to(bid + ticks * tick, tick)

    def publish_book(self) -> tuple[float, float]:
        self.bid, self.ask = self._book()
        return self.bid, self.ask

    def trade_price(self) -> float:
        """At the bid or the ask mostly, sometimes inside: never outside the published spread."""
        if self.inst.asset is AssetClass.INDEX:
            return _round_to(self.mid, self.inst.tick)
        r = self.rng.random()
        if r < 0.45:
            return self.bid
        if r < 0.9:
            return self.ask
        inside = self.bid + self.rng.random() * (self.ask - self.bid)
        return min(self.ask, max(self.bid, _round_to(inside, self.inst.tick)))

    def quote_size(self) -> float:
        rng, asset = self.rng, self.inst.asset
        if asset is AssetClass.FOREX:
            return 1_000_000 * rng.randint(1, 10)
        if asset is AssetClass.CRYPTO:
            return _coins(math.exp(rng.uniform(math.log(2_000), math.log(100_000))) / self.mid)
        return 100 * rng.choice((1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20))

    def trade_size(self) -> float | None:
        rng, asset = self.rng, self.inst.asset
        if asset is AssetClass.INDEX:
            return None
        if asset is AssetClass.FOREX:
            return rng.choice((10_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_000_000, 5_000_000))
        if asset is AssetClass.CRYPTO:
            return _coins(math.exp(rng.uniform(math.log(200), math.log(100_000))) / self.mid)
        return rng.choice((1, 3, 5, 10, 12, 25, 40, 50, 75, 100, 100, 100, 100, 200, 200, 300, 500, 1000))


def _coins(amount: float) -> float:
    """A coin amount as an exchange shows it: four significant figures, whole coins when many."""
    if amount >= 1000:
        return float(round(amount))
    return float(f"{amount:.4g}")


class SimMarket:
    """Quotes and trades for any symbol; the same per symbol for a given seed.

    ``seed=None`` draws a fresh seed (from the OS), kept in ``self.seed``. At most
    :data:`MAX_WALKS` symbols are remembered: past that the least recently used is forgotten
    (its next update starts a new path).
    """

    def __init__(self, seed: int | None = 42, trade_ratio: float = 0.4) -> None:
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.trade_ratio = trade_ratio
        self._walks: OrderedDict[str, _Walk] = OrderedDict()

    def _walk(self, symbol: str) -> _Walk:
        walk = self._walks.get(symbol)
        if walk is None:
            walk = self._walks[symbol] = _Walk(self.seed, symbol)
            if len(self._walks) > MAX_WALKS:
                self._walks.popitem(last=False)
        else:
            self._walks.move_to_end(symbol)
        return walk

    def forget(self, symbol: str) -> None:
        self._walks.pop(symbol, None)

    def previous_close(self, symbol: str) -> float:
        """The close before this simulated day: what "change on the day" is measured from."""
        return self._walk(symbol).prev_close

    def quote(self, symbol: str, ts_ms: int | None = None) -> Update:
        """The symbol's current book (an index: its current value, as a trade)."""
        w = self._walk(symbol)
        ts = ts_ms if ts_ms is not None else wall_ms()
        if w.inst.asset is AssetClass.INDEX:
            return Update(symbol=symbol, kind=TRADE, timestamp=ts, last_price=w.trade_price())
        bid, ask = w.publish_book()
        return Update(
            symbol=symbol,
            kind=QUOTE,
            timestamp=ts,
            bid_price=bid,
            bid_size=w.quote_size(),
            ask_price=ask,
            ask_size=w.quote_size(),
        )

    def next(self, symbol: str, ts_ms: int | None = None) -> Update:
        """Advance the symbol's walk one step and return a trade or a quote."""
        w = self._walk(symbol)
        ts = ts_ms if ts_ms is not None else wall_ms()
        w.step(ts)
        if self.trade_ratio >= 1:
            w.publish_book()  # no quote is ever sent: the book follows the mid unseen
        if w.inst.asset is AssetClass.INDEX or w.rng.random() < self.trade_ratio:
            return Update(
                symbol=symbol,
                kind=TRADE,
                timestamp=ts,
                last_price=w.trade_price(),
                last_size=w.trade_size(),
            )
        return self.quote(symbol, ts)


class SimSession:
    """Emits ``rate`` updates per second per subscribed symbol, in small batches."""

    MIN_INTERVAL = 0.005  # never wake more often than this; emit several updates per wake instead

    def __init__(self, config: SimConfig, market: SimMarket | None = None) -> None:
        self._market = market if market is not None else SimMarket(config.seed, config.trade_ratio)
        self._rate = config.rate
        self._pick = random.Random(self._market.seed)
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
        # The walks are kept: a symbol subscribed again continues where it was (no fake jump).

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
        # One market per provider (per start): a new session continues the same paths.
        self.market = SimMarket(config.seed, config.trade_ratio)

    def describe(self) -> str:
        return f"simulated market (seed {self.market.seed}, {self.config.rate:g} updates/s per symbol)"

    def previous_close(self, symbol: str) -> float | None:
        """The symbol's previous close in this market (base.PreviousCloses)."""
        return self.market.previous_close(symbol)

    @asynccontextmanager
    async def session(self, on_malformed: object = None, on_refused: object = None) -> AsyncIterator[SimSession]:
        yield SimSession(self.config, self.market)


def _check(settings: SimConfig) -> str | None:
    return "trade_ratio: must be between 0 and 1" if settings.trade_ratio > 1 else None


ENTRY = ProviderEntry(
    name="sim", settings=SimConfig, build=lambda settings, _upstream: SimProvider(settings), network=False, check=_check
)
