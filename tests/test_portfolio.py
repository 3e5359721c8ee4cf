"""Portfolios: validation, the SQLite store, exact valuation numbers, day open, throttled streaming."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timezone
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from trio_relay.appstore import AppStore
from trio_relay.config import PortfolioConfig
from trio_relay.model import PriceState
from trio_relay.portfolio import (
    DayOpen,
    Portfolio,
    PortfolioError,
    PortfolioStore,
    PortfolioStreamer,
    Position,
    Valuation,
    check_name,
    make_position,
    valuate,
)


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp() * 1000)


def trade(symbol: str, price: float, at: int = 1_700_000_000_000) -> PriceState:
    return PriceState(symbol=symbol, timestamp=at, data_type="T", last_price=price)


def quote(symbol: str, bid: float | None, ask: float | None, at: int = 1_700_000_000_000) -> PriceState:
    return PriceState(symbol=symbol, timestamp=at, bid_price=bid, ask_price=ask)


AAPL_100 = Position("AAPL", 100.0, 150.0)


# ----------------------------------------------------------------------------- validation
def test_make_position_normalizes() -> None:
    assert make_position(" brk.b ", 3, 410) == Position("BRK.B", 3.0, 410.0)
    assert make_position("TSLA", -50, 200.5) == Position("TSLA", -50.0, 200.5)
    assert make_position("AAPL", 0, 0) == Position("AAPL", 0.0, 0.0)  # 0: "remove" for put_position
    p = make_position("AAPL", -0.0, -0.0)
    assert math.copysign(1, p.quantity) == 1 and math.copysign(1, p.cost_basis) == 1


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("aa pl", 1, 1), "invalid_symbols", "invalid symbol 'aa pl': a symbol is 1-20 of A-Z 0-9"),
        ((None, 1, 1), "invalid_symbols", "symbol must be a string (got None)"),
        (("AAPL", math.nan, 1), "invalid_quantity", "quantity of AAPL must be a number between -1e12 and 1e12"),
        (("AAPL", math.inf, 1), "invalid_quantity", "(got inf)"),
        (("AAPL", 1e12 + 1, 1), "invalid_quantity", "(negative: short; 0: remove)"),
        (("AAPL", -(10**400), 1), "invalid_quantity", "quantity of AAPL"),
        (("AAPL", True, 1), "invalid_quantity", "(got True)"),
        (("AAPL", "10", 1), "invalid_quantity", "(got '10')"),
        (("AAPL", 1, -0.01), "invalid_cost_basis", "cost_basis of AAPL must be the price paid per unit"),
        (("AAPL", 1, math.nan), "invalid_cost_basis", "(got nan)"),
        (("AAPL", 1, None), "invalid_cost_basis", "(got None)"),
    ],
)
def test_make_position_rejects(args: tuple[object, object, object], code: str, message: str) -> None:
    with pytest.raises(PortfolioError) as info:
        make_position(*args)
    assert info.value.code == code
    assert message in info.value.message
    assert info.value.status == 422


def test_names() -> None:
    assert check_name("Long-term_2") == "Long-term_2"
    assert check_name("x" * 40) == "x" * 40
    for bad in ("", "x" * 41, "my portfolio", "é", "a/b", None, 7):
        with pytest.raises(PortfolioError) as info:
            check_name(bad)
        assert info.value.code == "invalid_name"
        assert info.value.message.startswith("a portfolio name is 1-40 characters of A-Z a-z 0-9 _ - (got ")


# ----------------------------------------------------------------------------- store
@pytest.fixture
async def app(tmp_path: Path):
    store = AppStore(tmp_path)
    yield store
    await store.aclose()


async def open_store(app: AppStore, **limits: int) -> PortfolioStore:
    store = PortfolioStore(app, PortfolioConfig(**limits))
    await store.migrate()
    return store


async def test_store_round_trip_and_persistence(app: AppStore, tmp_path: Path) -> None:
    store = await open_store(app)
    created = await store.create(
        "alice", "main", [Position("MSFT", 10.0, 300.0), make_position("aapl", 100, 150), Position("TSLA", 0.0, 1.0)]
    )
    assert created == Portfolio("alice", "main", (AAPL_100, Position("MSFT", 10.0, 300.0)))  # sorted, zero dropped
    await store.create("alice", "short", [Position("TSLA", -50.0, 200.0)])
    await store.create("bob", "main")
    assert await store.get("alice", "main") == created
    assert await store.get("bob", "main") == Portfolio("bob", "main", ())
    assert await store.get("carol", "main") is None

    # put: insert, replace, remove with quantity 0 (and 0 on a symbol not held is a no-op)
    after = await store.put_position("alice", "main", Position("NVDA", 2.5, 0.1 + 0.2))
    assert after.position("NVDA") == Position("NVDA", 2.5, 0.1 + 0.2)  # REAL keeps every bit
    after = await store.put_position("alice", "main", Position("AAPL", 120.0, 151.25))
    assert after.position("AAPL") == Position("AAPL", 120.0, 151.25)
    after = await store.put_position("alice", "main", Position("MSFT", 0.0, 0.0))
    assert after.symbols == {"AAPL", "NVDA"}
    assert (await store.put_position("alice", "main", Position("GOOG", 0.0, 0.0))).symbols == {"AAPL", "NVDA"}
    after = await store.delete_position("alice", "main", "nvda")
    assert after == Portfolio("alice", "main", (Position("AAPL", 120.0, 151.25),))

    assert [p.name for p in await store.list_portfolios("alice")] == ["main", "short"]
    assert await store.list_portfolios("nobody") == []
    assert await store.delete("alice", "short") is True
    assert await store.delete("alice", "short") is False
    everything = await store.load_all()
    await app.aclose()

    # A new AppStore on the same file: the same portfolios.
    again = AppStore(tmp_path)
    try:
        store2 = await open_store(again)  # migrate is idempotent
        assert (
            await store2.load_all()
            == everything
            == [
                Portfolio("alice", "main", (Position("AAPL", 120.0, 151.25),)),
                Portfolio("bob", "main", ()),
            ]
        )
        # The deleted portfolio's positions went with it: re-creating it starts empty.
        assert (await store2.create("alice", "short")).positions == ()
    finally:
        await again.aclose()


async def test_store_errors(app: AppStore) -> None:
    store = await open_store(app)
    await store.create("alice", "main", [AAPL_100])

    async def code_of(coro) -> tuple[str, str, int]:  # type: ignore[no-untyped-def]
        with pytest.raises(PortfolioError) as info:
            await coro
        return info.value.code, info.value.message, info.value.status

    assert await code_of(store.create("alice", "main")) == (
        "portfolio_exists",
        "a portfolio named 'main' already exists",
        409,
    )
    assert (await code_of(store.create("alice", "bad name")))[0] == "invalid_name"
    assert await code_of(store.create("alice", "dup", [AAPL_100, Position("AAPL", 1.0, 1.0)])) == (
        "invalid_symbols",
        "AAPL is listed twice",
        422,
    )
    # A Position built by hand is checked again by the store.
    assert (await code_of(store.create("alice", "x", [Position("AAPL", math.inf, 1.0)])))[0] == "invalid_quantity"
    assert (await code_of(store.put_position("alice", "main", Position("AAPL", 1.0, -5.0))))[0] == "invalid_cost_basis"
    assert await code_of(store.put_position("alice", "nope", AAPL_100)) == (
        "not_found",
        "no portfolio named 'nope'",
        404,
    )
    assert await code_of(store.delete_position("alice", "main", "MSFT")) == (
        "not_found",
        "portfolio 'main' holds no MSFT",
        404,
    )
    assert (await code_of(store.delete_position("alice", "nope", "AAPL")))[0] == "not_found"
    assert (await code_of(store.delete_position("alice", "main", "a b")))[0] == "invalid_symbols"
    # Nothing was changed by any of that.
    assert await store.load_all() == [Portfolio("alice", "main", (AAPL_100,))]


async def test_limits(app: AppStore) -> None:
    store = await open_store(app, max_portfolios_per_user=2, max_positions_per_portfolio=2)
    await store.create("alice", "a", [AAPL_100])
    await store.create("alice", "b")
    with pytest.raises(PortfolioError) as info:
        await store.create("alice", "c")
    assert (info.value.code, info.value.message) == ("portfolio_limit", "at most 2 portfolios per user")
    await store.create("bob", "a")  # per user
    with pytest.raises(PortfolioError) as info:
        await store.create("bob", "b", [Position(s, 1.0, 1.0) for s in ("A", "B", "C")])
    assert (info.value.code, info.value.message) == ("position_limit", "at most 2 positions per portfolio (got 3)")

    await store.put_position("alice", "a", Position("MSFT", 1.0, 1.0))
    with pytest.raises(PortfolioError) as info:
        await store.put_position("alice", "a", Position("TSLA", 1.0, 1.0))
    assert (info.value.code, info.value.message) == ("position_limit", "at most 2 positions per portfolio")
    await store.put_position("alice", "a", Position("MSFT", 5.0, 2.0))  # changing a held one: allowed
    await store.put_position("alice", "a", Position("MSFT", 0.0, 0.0))  # removing frees a slot
    await store.put_position("alice", "a", Position("TSLA", 1.0, 1.0))

    # Deleting a portfolio frees a slot; a lowered limit keeps what exists and refuses more.
    assert await store.delete("alice", "b")
    await store.create("alice", "c")
    store.config = PortfolioConfig(max_portfolios_per_user=1)
    assert len(await store.list_portfolios("alice")) == 2
    with pytest.raises(PortfolioError, match="at most 1 portfolios per user"):
        await store.create("alice", "d")


async def test_limit_holds_under_concurrent_creates_from_two_connections(app: AppStore, tmp_path: Path) -> None:
    # Two AppStores on one file: what two worker processes do. The limit is checked in the write
    # transaction, so racing creates cannot overshoot it.
    other = AppStore(tmp_path)
    stores = [await open_store(app, max_portfolios_per_user=3), await open_store(other, max_portfolios_per_user=3)]
    outcomes: list[str] = []

    async def create(i: int) -> None:
        try:
            await stores[i % 2].create("alice", f"p{i}")
            outcomes.append("ok")
        except PortfolioError as exc:
            outcomes.append(exc.code)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(create, i)
    finally:
        await other.aclose()
    assert sorted(outcomes) == ["ok"] * 3 + ["portfolio_limit"] * 5
    assert len(await stores[0].list_portfolios("alice")) == 3


# ----------------------------------------------------------------------------- valuation
def test_valuation_of_a_price_path() -> None:
    portfolio = Portfolio("alice", "main", (AAPL_100,))
    expected = {150.0: (15000.0, 0.0, 0.0), 155.5: (15550.0, 550.0, 3.666667), 149.25: (14925.0, -75.0, -0.5)}
    for price, (value, pnl, pct) in expected.items():
        v = valuate(portfolio, {"AAPL": trade("AAPL", price)}, {}, as_of=1)
        (row,) = v.positions
        assert (row.price, row.price_source, row.market_value, row.cost) == (price, "last", value, 15000.0)
        assert (row.unrealised_pnl, row.unrealised_pnl_pct) == (pnl, pct)
        assert (row.day_open, row.day_change, row.day_change_pct) == (None, None, None)
        t = v.totals
        assert (t.market_value, t.cost, t.unrealised_pnl, t.unrealised_pnl_pct, t.day_change, t.unpriced) == (
            value,
            15000.0,
            pnl,
            pct,
            None,
            0,
        )


def test_valuation_short_mid_unpriced_and_totals() -> None:
    portfolio = Portfolio(
        "alice",
        "mixed",
        (
            AAPL_100,
            Position("MSFT", 10.0, 300.0),  # no price at all
            Position("SPY", 4.0, 500.0),  # quotes only: the mid
            Position("TSLA", -50.0, 200.0),  # short
            Position("XOM", 7.0, 100.0),  # one-sided quote: no price
        ),
    )
    prices = {
        "AAPL": trade("AAPL", 155.5, at=1_700_000_000_123),
        "SPY": quote("SPY", 499.5, 500.5),
        "TSLA": trade("TSLA", 190.0),
        "XOM": quote("XOM", 101.0, None),
        "GOOG": trade("GOOG", 1.0),  # not held
    }
    v = valuate(portfolio, prices, {"TSLA": 195.0, "MSFT": 310.0}, as_of=1_700_000_000_999)
    rows = {r.symbol: r for r in v.positions}
    assert [r.symbol for r in v.positions] == ["AAPL", "MSFT", "SPY", "TSLA", "XOM"]
    assert rows["AAPL"].price_time == 1_700_000_000_123

    tsla = rows["TSLA"]
    assert (tsla.market_value, tsla.cost, tsla.unrealised_pnl, tsla.unrealised_pnl_pct) == (
        -9500.0,
        -10000.0,
        500.0,
        5.0,
    )
    assert (tsla.day_open, tsla.day_change, tsla.day_change_pct) == (195.0, 250.0, -2.564103)  # short gains as it falls

    spy = rows["SPY"]
    assert (spy.price, spy.price_source, spy.market_value, spy.unrealised_pnl, spy.unrealised_pnl_pct) == (
        500.0,
        "mid",
        2000.0,
        0.0,
        0.0,
    )
    for symbol in ("MSFT", "XOM"):
        row = rows[symbol]
        assert (row.price, row.price_source, row.price_time, row.market_value) == (None, None, None, None)
        assert (row.unrealised_pnl, row.unrealised_pnl_pct, row.day_change, row.day_change_pct) == (None,) * 4
    assert rows["MSFT"].cost == 3000.0 and rows["MSFT"].day_open == 310.0  # known without a price

    # Totals over AAPL, SPY, TSLA: value 15550 + 2000 - 9500, cost 15000 + 2000 - 10000,
    # P&L 1050 over the gross cost 27000, day change only TSLA's.
    t = v.totals
    assert (t.market_value, t.cost, t.unrealised_pnl, t.unrealised_pnl_pct, t.day_change, t.unpriced) == (
        8050.0,
        7000.0,
        1050.0,
        3.888889,
        250.0,
        2,
    )
    assert msgspec.json.decode(msgspec.json.encode(v))["totals"] == {
        "market_value": 8050.0,
        "cost": 7000.0,
        "unrealised_pnl": 1050.0,
        "unrealised_pnl_pct": 3.888889,
        "day_change": 250.0,
        "unpriced": 2,
    }


def test_valuation_message_and_rounding() -> None:
    portfolio = Portfolio("bob", "fx", (Position("EURUSD=X", 3.0, 0.1), Position("BTC/USD", 0.1, 0.0)))
    prices = {"EURUSD=X": trade("EURUSD=X", 0.2), "BTC/USD": trade("BTC/USD", 0.3)}
    v = valuate(portfolio, prices, {"EURUSD=X": 0.1}, as_of=42)
    msg = msgspec.json.decode(msgspec.json.encode(v))
    assert list(msg) == ["type", "name", "positions", "totals", "as_of"]
    assert (msg["type"], msg["name"], msg["as_of"]) == ("portfolio", "fx", 42)
    eur, btc = msg["positions"]
    assert eur == {
        "symbol": "EURUSD=X",
        "quantity": 3.0,
        "cost_basis": 0.1,
        "price": 0.2,
        "price_source": "last",
        "price_time": 1_700_000_000_000,
        "market_value": 0.6,  # 3 * 0.2 is 0.6000000000000001 before rounding
        "cost": 0.3,  # 3 * 0.1 is 0.30000000000000004
        "unrealised_pnl": 0.3,
        "unrealised_pnl_pct": 100.0,
        "day_open": 0.1,
        "day_change": 0.3,
        "day_change_pct": 100.0,
        "entitled": True,
    }
    assert (btc["cost"], btc["unrealised_pnl"], btc["unrealised_pnl_pct"]) == (0.0, 0.03, None)  # free: no %
    assert msg["totals"]["unrealised_pnl_pct"] == 110.0  # 0.33 over the gross cost 0.3

    empty = valuate(Portfolio("bob", "empty"), prices, {}, as_of=1)
    assert msgspec.structs.asdict(empty.totals) == dict.fromkeys(
        ["market_value", "cost", "unrealised_pnl", "unrealised_pnl_pct", "day_change"]
    ) | {"unpriced": 0}
    flat = valuate(Portfolio("bob", "flat", (Position("AAPL", 1.0, 150.0),)), {"AAPL": trade("AAPL", 150.0)}, {})
    assert math.copysign(1, flat.positions[0].unrealised_pnl or 0.0) == 1  # never -0.0
    assert abs(flat.as_of - datetime.now(UTC).timestamp() * 1000) < 60_000  # wall clock by default


def test_day_change_across_utc_midnight() -> None:
    day_open = DayOpen()
    state = PriceState(symbol="AAPL")
    portfolio = Portfolio("alice", "main", (AAPL_100,))

    def tick(iso: str, price: float) -> Valuation:
        state.timestamp, state.last_price = ms(iso), price
        day_open.observe(state)
        return valuate(portfolio, {"AAPL": state}, day_open, as_of=state.timestamp)

    first = tick("2024-11-11T23:58:00", 150.0)
    assert (first.positions[0].day_open, first.totals.day_change) == (150.0, 0.0)
    before = tick("2024-11-11T23:59:59.999", 152.0)
    assert (before.positions[0].day_open, before.totals.day_change, before.positions[0].day_change_pct) == (
        150.0,
        200.0,
        1.333333,
    )
    assert day_open.day == ms("2024-11-11T00:00:00") // 86_400_000

    # A late event of the old day is ignored; the first of the new day is its open.
    after = tick("2024-11-12T00:00:00.500", 153.0)
    assert (after.positions[0].day_open, after.totals.day_change) == (153.0, 0.0)
    state.timestamp, state.last_price = ms("2024-11-11T23:59:59"), 1.0
    day_open.observe(state)
    later = tick("2024-11-12T00:05:00", 155.5)
    assert (later.positions[0].day_open, later.totals.day_change, later.totals.unrealised_pnl) == (153.0, 250.0, 550.0)
    assert dict(day_open) == {"AAPL": 153.0}


def test_day_open_sources_and_roll() -> None:
    day_open = DayOpen()
    at = ms("2024-11-12T10:00:00")
    day_open.observe(quote("SPY", 499.0, None, at=at))  # no price yet: not an open
    day_open.observe(quote("SPY", 499.0, 501.0, at=at))  # the mid
    day_open.observe(quote("SPY", 510.0, 512.0, at=at + 1))
    day_open.observe(PriceState(symbol="OLD", last_price=5.0))  # timestamp 0: unknown, ignored
    day_open.record("ZERO", 0.0, at)  # not a price
    assert dict(day_open) == {"SPY": 500.0}
    day_open.roll(ms("2024-11-12T23:00:00"))  # same day: nothing forgotten
    assert len(day_open) == 1
    day_open.roll(ms("2024-11-13T00:00:01"))  # a new day by the wall clock: nothing known yet
    assert dict(day_open) == {} and "SPY" not in day_open


# ----------------------------------------------------------------------------- streaming
@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[float, Valuation]] = []

    async def __call__(self, valuation: Valuation) -> None:
        self.sent.append((trio.current_time(), valuation))

    @property
    def times(self) -> list[float]:
        return [t for t, _ in self.sent]


def make_streamer(record: Recorder, prices: dict[str, PriceState], interval: float = 0.5) -> PortfolioStreamer:
    portfolio = Portfolio("alice", "main", (AAPL_100, Position("TSLA", -50.0, 200.0)))
    return PortfolioStreamer(portfolio, record, prices=prices, day_open={}, interval=interval)


async def test_many_changes_within_an_interval_give_one_valuation(autojump_clock, nursery: trio.Nursery) -> None:
    prices = {"AAPL": trade("AAPL", 150.0)}
    record = Recorder()
    streamer = make_streamer(record, prices)
    start = trio.current_time()
    await nursery.start(streamer.run)
    assert record.times == [start]  # the first valuation at once
    assert record.sent[0][1].totals.market_value == 15000.0

    for i in range(1, 41):  # 40 changes within 0.2 s
        prices["AAPL"] = trade("AAPL", 150.0 + i / 8)
        streamer.notify("AAPL")
        streamer.notify("GOOG")  # not held: ignored
        await trio.sleep(0.005)  # virtual time (MockClock)
    await trio.sleep(5)  # virtual time (MockClock)
    assert record.times == pytest.approx([start, start + 0.5])  # one, an interval after the first change
    assert record.sent[1][1].positions[0].price == 155.0  # the latest price
    assert streamer.sent == 2

    # Nothing held changes: nothing is sent.
    streamer.notify("GOOG")
    await trio.sleep(5)  # virtual time (MockClock)
    assert streamer.sent == 2


async def test_spread_out_changes_give_one_valuation_per_interval(autojump_clock, nursery: trio.Nursery) -> None:
    prices = {"AAPL": trade("AAPL", 150.0), "TSLA": trade("TSLA", 200.0)}
    record = Recorder()
    streamer = make_streamer(record, prices)
    start = trio.current_time()
    await nursery.start(streamer.run)

    # A change every 0.2 s for 3 s: windows open at 0, 0.6, 1.2, 1.8, 2.4 and close 0.5 s later.
    for k in range(15):
        streamer.notify("TSLA" if k % 2 else "AAPL")
        await trio.sleep(0.2)  # virtual time (MockClock)
    await trio.sleep(5)  # virtual time (MockClock)
    offsets = [t - start for t in record.times]
    assert offsets == pytest.approx([0.0, 0.5, 1.1, 1.7, 2.3, 2.9])
    assert all(b - a >= 0.5 - 1e-9 for a, b in zip(offsets, offsets[1:]))

    # Changes further apart than the interval: each gets its own valuation, an interval later.
    base = trio.current_time()
    for _ in range(3):
        streamer.notify("AAPL")
        await trio.sleep(2)  # virtual time (MockClock)
    assert [t - base for t in record.times[6:]] == pytest.approx([0.5, 2.5, 4.5])


async def test_streamer_follows_portfolio_edits_and_a_slow_client(autojump_clock, nursery: trio.Nursery) -> None:
    prices = {"AAPL": trade("AAPL", 150.0), "MSFT": trade("MSFT", 400.0)}
    sent: list[tuple[float, Valuation]] = []

    async def slow_send(valuation: Valuation) -> None:
        sent.append((trio.current_time(), valuation))
        await trio.sleep(2)  # virtual time (MockClock): a client that takes 2 s per message

    streamer = PortfolioStreamer(
        Portfolio("alice", "main", (AAPL_100,)), slow_send, prices=prices, day_open={}, interval=0.5
    )
    start = trio.current_time()
    await nursery.start(streamer.run)  # returns once the first valuation went out
    assert trio.current_time() == start + 2
    assert streamer.symbols == {"AAPL"}
    streamer.notify("MSFT")
    await trio.sleep(1)  # virtual time (MockClock)
    assert len(sent) == 1

    streamer.set_portfolio(Portfolio("alice", "main", (AAPL_100, Position("MSFT", 1.0, 300.0))))
    assert streamer.symbols == {"AAPL", "MSFT"}
    await trio.sleep(0.6)  # virtual time (MockClock)
    assert len(sent) == 2 and sent[1][1].totals.market_value == 15400.0
    # Changes while the client is slow coalesce: one more valuation, not one per change.
    for _ in range(10):
        streamer.notify("MSFT")
        await trio.sleep(0.1)  # virtual time (MockClock)
    await trio.sleep(10)  # virtual time (MockClock)
    assert len(sent) == 3


@pytest.mark.parametrize(
    "bid, ask, mid",
    [
        (40.1, 40.2, "40.15"),
        (0.1, 0.2, "0.15"),
        (189.44, 189.46, "189.45"),
        (0.00001, 0.00002, "1.5e-05"),
        (7.0, 7.0, "7.0"),
    ],
)
def test_a_mid_price_is_shown_as_the_decimal_it_is(bid: float, ask: float, mid: str) -> None:
    """Issue 22, case 4: (40.1 + 40.2) / 2 is 40.150000000000006 in binary floating point."""
    v = valuate(Portfolio("alice", "p", (Position("X", 3.0, 40.0),)), {"X": quote("X", bid, ask)}, {}, as_of=0)
    [row] = v.positions
    assert row.price_source == "mid" and repr(row.price) == mid
    encoded = msgspec.json.encode(v)
    assert b'"price":' + msgspec.json.encode(float(mid)) + b"," in encoded
    # Nothing in the message carries a float artefact: every number is at most 6 decimals long.
    numbers = [x for x in msgspec.json.decode(encoded)["positions"][0].values() if isinstance(x, float)]
    assert all(len(repr(x).split(".")[-1]) <= 6 or "e" in repr(x) for x in numbers), numbers
    day_open = DayOpen()
    day_open.observe(quote("X", bid, ask, at=1_700_000_000_000))
    assert repr(day_open["X"]) == mid
