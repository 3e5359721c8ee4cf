"""The embedded simulator: deterministic per seed, plausible prices, and its pacing in virtual time."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from trio_relay.model import Update
from trio_relay.providers.instruments import AssetClass, instrument
from trio_relay.providers.sim import MAX_WALKS, SimConfig, SimMarket, SimProvider, SimSession

TS = 1_700_000_000_000


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def path(market: SimMarket, symbol: str, steps: int) -> list[Update]:
    return [market.next(symbol, TS + i) for i in range(steps)]


def same_quote(a: Update, b: Update) -> bool:
    """Equal but for the (wall-clock) timestamp."""
    return (a.symbol, a.kind, a.bid_price, a.bid_size, a.ask_price, a.ask_size) == (
        b.symbol,
        b.kind,
        b.bid_price,
        b.bid_size,
        b.ask_price,
        b.ask_size,
    )


# --------------------------------------------------------------------------- SimMarket


def test_same_seed_same_sequence_per_symbol() -> None:
    a, b = SimMarket(seed=7), SimMarket(seed=7)
    assert path(a, "AAPL", 500) == path(b, "AAPL", 500)
    assert a.quote("MSFT", TS) == b.quote("MSFT", TS)


def test_a_symbols_path_does_not_depend_on_other_symbols() -> None:
    alone, mixed = SimMarket(seed=7), SimMarket(seed=7)
    expected = path(alone, "AAPL", 200)
    got = []
    for i in range(200):
        mixed.next("MSFT", TS)
        got.append(mixed.next("AAPL", TS + i))
        mixed.next("IBM", TS)
    assert got == expected


def test_different_seed_or_symbol_different_sequence() -> None:
    base = path(SimMarket(seed=7), "AAPL", 100)
    assert path(SimMarket(seed=8), "AAPL", 100) != base
    other = path(SimMarket(seed=7), "MSFT", 100)
    assert [u.last_price or u.bid_price for u in other] != [u.last_price or u.bid_price for u in base]


def test_forget_restarts_the_path() -> None:
    market = SimMarket(seed=3)
    first = path(market, "AAPL", 50)
    market.forget("AAPL")
    assert path(market, "AAPL", 50) == first


@pytest.mark.parametrize("seed", [1, 42, 2024])
def test_prices_and_sizes_are_plausible_over_many_steps(seed: int) -> None:
    market = SimMarket(seed=seed, trade_ratio=0.4)
    symbols = ["AAPL", "MSFT", "BRK.B", "PENNY", "BTC/USD", "EURUSD", "DOGEUSD"]
    kinds = {"T": 0, "Q": 0}
    book: dict[str, tuple[float, float]] = {}
    for symbol in symbols:
        q = market.quote(symbol, TS)
        assert q.bid_price is not None and q.ask_price is not None
        book[symbol] = (q.bid_price, q.ask_price)
    for step in range(4000):
        for symbol in symbols:
            u = market.next(symbol, TS + step)
            assert u.symbol == symbol and u.timestamp == TS + step
            kinds[u.kind] += 1
            tick = instrument(symbol).tick
            if u.kind == "T":
                assert u.last_price is not None and u.last_size is not None and u.last_size > 0
                assert u.bid_price is None and u.ask_price is None
                bid, ask = book[symbol]
                assert bid <= u.last_price <= ask, f"{symbol}: trade {u.last_price} outside {bid}-{ask}"
                assert on_tick(u.last_price, tick)
            else:
                assert u.kind == "Q"
                assert u.bid_price is not None and u.ask_price is not None
                assert 0 < u.bid_price < u.ask_price
                assert on_tick(u.bid_price, tick) and on_tick(u.ask_price, tick)
                # A tight spread: a few basis points at most (a cent is more on a cheap stock).
                assert u.ask_price - u.bid_price <= max(3 * tick, u.bid_price * 3e-4)
                assert u.bid_size is not None and u.ask_size is not None
                assert u.bid_size > 0 and u.ask_size > 0
                assert u.last_price is None
                book[symbol] = (u.bid_price, u.ask_price)
    total = kinds["T"] + kinds["Q"]
    assert 0.35 < kinds["T"] / total < 0.45  # trade_ratio 0.4


def on_tick(price: float, tick: float) -> bool:
    return abs(price / tick - round(price / tick)) < 1e-6


# Where these traded in late 2025 (what the simulator's reference table says, give or take).
KNOWN = {"AAPL": 278.0, "MSFT": 485.0, "NVDA": 182.0, "BTCUSD": 92_400.0, "EURUSD": 1.165, "^GSPC": 6_840.0}


@pytest.mark.parametrize("seed", range(20))
def test_well_known_symbols_open_near_their_real_levels(seed: int) -> None:
    market = SimMarket(seed=seed)
    for symbol, level in KNOWN.items():
        close = market.previous_close(symbol)
        first = market.quote(symbol, TS)
        price = first.last_price if first.last_price is not None else first.bid_price
        assert price is not None
        vol = instrument(symbol).daily_vol
        assert abs(math.log(close / level)) < 4 * vol, (symbol, close)
        assert abs(math.log(price / close)) < 4 * vol, (symbol, price, close)  # the day's change so far


def test_instrument_profiles() -> None:
    assert instrument("AAPL").asset is AssetClass.EQUITY and instrument("AAPL").tick == 0.01
    assert instrument("EURUSD").tick == 0.00001 and instrument("USDJPY").tick == 0.001
    assert instrument("EUR/USD") == instrument("EURUSD") == instrument("EURUSD=X")
    assert instrument("BTC/USD") == instrument("BTCUSD") == instrument("BTC-USD")
    assert instrument("EURGBP").level == pytest.approx(1.165 / 1.332, rel=1e-3)  # a cross from USD values
    assert instrument("^GSPC").asset is AssetClass.INDEX
    assert instrument("^SOMETHING").asset is AssetClass.INDEX and 1_000 <= instrument("^SOMETHING").level <= 20_000
    unknown = instrument("ZZZQ")
    assert unknown.asset is AssetClass.EQUITY and 8 <= unknown.level <= 400
    assert instrument("ZZZQ") == unknown  # from the name alone: the same on every run


def test_an_index_prints_values_only() -> None:
    market = SimMarket(seed=3)
    updates = [market.quote("^GSPC", TS)] + [market.next("^GSPC", TS) for _ in range(200)]
    assert {u.kind for u in updates} == {"T"}
    assert all(u.last_size is None and u.bid_price is None for u in updates)


def test_without_a_seed_each_start_walks_a_new_path() -> None:
    a, b = SimMarket(seed=None), SimMarket(seed=None)
    assert a.seed != b.seed
    assert path(a, "AAPL", 50) != path(b, "AAPL", 50)
    # A new path, not a new market: both open within a day's move of the reference level.
    assert abs(math.log(a.previous_close("AAPL") / b.previous_close("AAPL"))) < 8 * instrument("AAPL").daily_vol


def test_the_walk_is_intraday_not_wild() -> None:
    market = SimMarket(seed=5)
    prices = [u.last_price or u.bid_price for u in path(market, "AAPL", 2400)]  # ten minutes at 4/s
    first = market.previous_close("AAPL")
    assert all(p is not None and abs(p / first - 1) < 0.05 for p in prices)  # no +5 % in ten minutes


def test_the_number_of_walks_is_bounded() -> None:
    market = SimMarket(seed=1)
    for i in range(MAX_WALKS + 10):
        market.quote(f"S{i}", TS)
    assert len(market._walks) == MAX_WALKS


def test_trade_ratio_bounds() -> None:
    only_quotes = SimMarket(seed=1, trade_ratio=0.0)
    assert {only_quotes.next("AAPL", TS).kind for _ in range(300)} == {"Q"}
    only_trades = SimMarket(seed=1, trade_ratio=1.0)
    assert {only_trades.next("AAPL", TS).kind for _ in range(300)} == {"T"}


def test_quote_has_wall_clock_timestamp_when_none_given() -> None:
    import time

    before = time.time_ns() // 1_000_000
    u = SimMarket().quote("AAPL")
    after = time.time_ns() // 1_000_000
    assert before <= u.timestamp <= after


# --------------------------------------------------------------------------- SimSession


async def test_fresh_symbol_gets_a_quote_immediately(autojump_clock: trio.testing.MockClock) -> None:
    session = SimSession(SimConfig(rate=1.0, seed=5))
    start = trio.current_time()
    await session.subscribe(["AAPL", "MSFT"])
    batch = await session.receive()
    assert trio.current_time() == start
    assert [(u.symbol, u.kind) for u in batch] == [("AAPL", "Q"), ("MSFT", "Q")]
    reference = SimMarket(seed=5)
    assert same_quote(batch[0], reference.quote("AAPL"))
    assert same_quote(batch[1], reference.quote("MSFT"))
    assert session.symbols == ["AAPL", "MSFT"]


async def test_subscribe_wakes_a_waiting_receive(autojump_clock: trio.testing.MockClock) -> None:
    session = SimSession(SimConfig(rate=0.01, seed=5))  # one update per 100 s per symbol
    await session.subscribe(["AAPL"])
    assert [u.symbol for u in await session.receive()] == ["AAPL"]
    got: list[list[Update]] = []

    async def reader() -> None:
        got.append(await session.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await session.subscribe(["IBM"])
    assert trio.current_time() == start  # served at once, not at AAPL's next tick
    assert [(u.symbol, u.kind) for u in got[0]] == [("IBM", "Q")]
    # It is the symbol's opening quote, not a step of the walk that happened to pick IBM.
    assert same_quote(got[0][0], SimMarket(seed=5).quote("IBM"))


async def test_no_symbols_waits_without_busy_looping(autojump_clock: trio.testing.MockClock) -> None:
    session = SimSession(SimConfig(rate=10.0))
    with trio.move_on_after(3600) as scope:
        await session.receive()
    assert scope.cancelled_caught  # nothing to emit for an hour of virtual time


@pytest.mark.parametrize(
    "rate, symbols, seconds",
    [(10.0, 3, 10.0), (4.0, 1, 30.0), (50.0, 5, 4.0), (400.0, 2, 2.0)],
)
async def test_session_emits_rate_times_symbols_per_second(
    autojump_clock: trio.testing.MockClock, rate: float, symbols: int, seconds: float
) -> None:
    names = [f"SYM{i}" for i in range(symbols)]
    session = SimSession(SimConfig(rate=rate, seed=11))
    await session.subscribe(names)
    fresh = await session.receive()
    assert sorted(u.symbol for u in fresh) == names
    counts = dict.fromkeys(names, 0)
    start = trio.current_time()
    with trio.move_on_after(seconds):
        while True:
            for u in await session.receive():
                counts[u.symbol] += 1
    assert trio.current_time() - start == pytest.approx(seconds)
    expected = rate * symbols * seconds
    assert abs(sum(counts.values()) - expected) <= max(2, 0.02 * expected)
    # Spread over every symbol (random choice, so only roughly even).
    for name in names:
        assert counts[name] > 0.5 * expected / symbols


async def test_unsubscribe_stops_a_symbol(autojump_clock: trio.testing.MockClock) -> None:
    session = SimSession(SimConfig(rate=20.0, seed=1))
    await session.subscribe(["AAPL", "MSFT"])
    await session.receive()
    await session.unsubscribe(["AAPL"])
    assert session.symbols == ["MSFT"]
    seen: set[str] = set()
    with trio.move_on_after(5):
        while True:
            seen.update(u.symbol for u in await session.receive())
    assert seen == {"MSFT"}


async def test_a_symbol_subscribed_again_continues_its_path(autojump_clock: trio.testing.MockClock) -> None:
    """No fake jump on a resubscribe (it used to restart the path and fire move alerts)."""
    session = SimSession(SimConfig(rate=50.0, seed=1, trade_ratio=0.0))
    await session.subscribe(["AAPL"])
    last = None
    with trio.move_on_after(20):
        while True:
            last = (await session.receive())[-1].bid_price
    await session.unsubscribe(["AAPL"])
    await session.subscribe(["AAPL"])
    again = (await session.receive())[0]
    assert last is not None and again.bid_price is not None
    assert abs(again.bid_price / last - 1) < 0.002
    assert not same_quote(again, SimMarket(seed=1).quote("AAPL"))  # not the opening quote again


async def test_provider_session_is_a_sim_session() -> None:
    provider = SimProvider(SimConfig(rate=3.0, seed=9))
    assert provider.name == "sim" and not provider.detects_stale
    assert "seed 9" in provider.describe()
    async with provider.session() as session:
        assert isinstance(session, SimSession)
        await session.subscribe(["AAPL"])
        assert [u.symbol for u in await session.receive()] == ["AAPL"]
    assert provider.market.previous_close("AAPL") == SimMarket(seed=9).previous_close("AAPL")
    # Without a seed the provider draws one at start, and every session of this start shares it.
    fresh = SimProvider(SimConfig())
    assert f"seed {fresh.market.seed}" in fresh.describe()


def test_prices_move_with_time_not_with_the_number_of_updates() -> None:
    """A symbol updated 50 times a second wanders no faster than one updated 4 times."""

    def spread_after(rate: float, seconds: float) -> float:
        moves = []
        for seed in range(150):
            market = SimMarket(seed=seed, trade_ratio=0.0)
            start = market.quote("AAPL", TS).bid_price
            steps = int(rate * seconds)
            last = None
            for i in range(1, steps + 1):
                last = market.next("AAPL", TS + int(i * 1000 / rate)).bid_price
            assert start is not None and last is not None
            moves.append(math.log(last / start))
        return math.sqrt(sum(m * m for m in moves) / len(moves))

    slow, fast = spread_after(4, 60), spread_after(50, 60)
    assert 0.75 < fast / slow < 1.33
    # About what the daily volatility says for a minute: 1.5 % x sqrt(60 s / 6.5 h) ~ 0.076 %.
    assert 0.0005 < slow < 0.0011
