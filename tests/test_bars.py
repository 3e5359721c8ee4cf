"""OHLCV bars: the live builder's boundaries, lateness and clock close, and live == history."""

from __future__ import annotations

import gc
import tracemalloc
from datetime import UTC, datetime, timezone

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_relay.bars import INTERVALS, Bar, BarBuilder, bars_from_trades
from trio_relay.model import Update

T0 = 1_710_165_600_000  # 2024-03-11T14:00:00Z: on every interval's boundary


def trade(ts: int, price: float, size: float | None = 1.0, symbol: str = "AAPL") -> Update:
    return Update(symbol, "T", ts, last_price=price, last_size=size)


def feed(builder: BarBuilder, *updates: Update) -> list[Bar]:
    return [bar for u in updates for bar in builder.add(u)]


def test_first_trade_opens_and_last_trade_closes_the_interval() -> None:
    b = BarBuilder(["1s"])
    assert (
        feed(b, trade(T0, 10.0, 5), trade(T0 + 400, 12.0, 1), trade(T0 + 700, 9.0, 2), trade(T0 + 999, 11.0, 2)) == []
    )
    assert b.current("AAPL", "1s") == Bar(
        symbol="AAPL",
        interval="1s",
        start_ms=T0,
        open=10.0,
        high=12.0,
        low=9.0,
        close=11.0,
        volume=10.0,
        trades=4,
        vwap=(50 + 12 + 18 + 22) / 10,
        complete=False,
    )
    [bar] = b.add(trade(T0 + 1500, 13.0))
    assert (bar.start_ms, bar.open, bar.high, bar.low, bar.close, bar.trades, bar.complete) == (
        T0,
        10.0,
        12.0,
        9.0,
        11.0,
        4,
        True,
    )


def test_a_trade_exactly_on_the_boundary_opens_the_next_bar() -> None:
    b = BarBuilder(["1s", "1m"])
    b.add(trade(T0 + 999, 10.0))
    [closed] = b.add(trade(T0 + 1000, 20.0))
    assert (closed.interval, closed.start_ms, closed.close, closed.trades) == ("1s", T0, 10.0, 1)
    now = b.current("AAPL", "1s")
    assert now is not None and (now.start_ms, now.open, now.trades) == (T0 + 1000, 20.0, 1)
    minute = b.current("AAPL", "1m")
    assert minute is not None and (minute.start_ms, minute.open, minute.close, minute.trades) == (T0, 10.0, 20.0, 2)
    [m] = b.add(trade(T0 + 60_000, 30.0))[1:]  # the 1s bar of T0+1000 closes first
    assert (m.interval, m.start_ms, m.close, m.trades) == ("1m", T0, 20.0, 2)


def test_an_interval_without_trades_has_no_bar() -> None:
    b = BarBuilder(["1s"])
    b.add(trade(T0 + 100, 10.0))
    closed = b.add(trade(T0 + 5_100, 11.0))  # 1s..4s had no trade
    assert [bar.start_ms for bar in closed] == [T0]
    assert [bar.start_ms for bar in b.flush(T0 + 60_000)] == [T0 + 5_000]
    assert b.flush(T0 + 120_000) == []  # nothing carried forward
    assert [
        bar.start_ms for bar in bars_from_trades([trade(T0 + 100, 10.0), trade(T0 + 5_100, 11.0)], "1s", T0, T0 + 6_000)
    ] == [
        T0,
        T0 + 5_000,
    ]


def test_out_of_order_trade_inside_the_open_bar_updates_it() -> None:
    b = BarBuilder(["1s"])
    feed(b, trade(T0 + 500, 10.0, 1), trade(T0 + 800, 12.0, 1))
    assert b.add(trade(T0 + 200, 8.0, 2)) == ()  # earlier than the bar's first trade: the new open
    assert b.add(trade(T0 + 600, 20.0, 1)) == ()  # between: a new high, not the close
    bar = b.current("AAPL", "1s")
    assert bar is not None
    assert (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.trades) == (8.0, 20.0, 8.0, 12.0, 5.0, 4)
    assert b.late == 0


def test_equal_timestamps_first_to_arrive_opens_last_closes() -> None:
    b = BarBuilder(["1s", "1m"])
    feed(b, trade(T0 + 100, 10.0), trade(T0 + 900, 12.0), trade(T0 + 100, 9.0), trade(T0 + 900, 11.0))
    feed(b, trade(T0 + 1_100, 13.0), trade(T0 + 1_100, 14.0), trade(T0 + 100, 8.0))  # the last: late for 1s only
    [second] = b.add(trade(T0 + 2_000, 15.0))
    minute = b.current("AAPL", "1m")
    assert second.start_ms == T0 + 1_000 and (second.open, second.close) == (13.0, 14.0)
    assert minute is not None and (minute.open, minute.close, minute.low, minute.trades) == (10.0, 15.0, 8.0, 8)
    history = bars_from_trades(
        [trade(T0 + 100, 10.0), trade(T0 + 900, 12.0), trade(T0 + 100, 9.0), trade(T0 + 900, 11.0)],
        "1s",
        T0,
        T0 + 1_000,
    )
    assert [(x.open, x.close) for x in history] == [(10.0, 11.0)]


def test_out_of_order_trade_into_a_closed_interval_is_late_and_dropped() -> None:
    b = BarBuilder(["1s", "1m"])
    feed(b, trade(T0 + 500, 10.0), trade(T0 + 1_500, 11.0))  # closes the 1s bar of T0
    assert b.add(trade(T0 + 900, 99.0)) == ()
    assert b.late == 1
    second = b.current("AAPL", "1s")
    assert second is not None and (second.start_ms, second.trades, second.high) == (T0 + 1_000, 1, 11.0)
    # Still inside the open minute: that bar takes it (and it is its earliest trade after all).
    minute = b.current("AAPL", "1m")
    assert minute is not None and (minute.trades, minute.high, minute.close) == (3, 99.0, 11.0)

    # An empty interval before the open bar is closed too: its bar would come out of order.
    b.add(trade(T0 + 5_000, 12.0))
    b.add(trade(T0 + 3_000, 12.0))
    assert b.late == 2


def test_a_trade_for_an_interval_closed_by_flush_is_late() -> None:
    b = BarBuilder(["1s"])
    b.add(trade(T0 + 1_200, 10.0))
    assert len(b.flush(T0 + 2_000)) == 1
    assert b.add(trade(T0 + 1_999, 10.0)) == ()
    assert b.late == 1 and b.current("AAPL", "1s") is None
    assert b.add(trade(T0 + 2_000, 11.0)) == ()  # the next interval opens normally
    assert b.late == 1 and b.current("AAPL", "1s") is not None
    # flush closed [T0+1000, T0+2000) for every symbol, including one not seen before.
    assert b.add(trade(T0 + 1_500, 300.0, symbol="MSFT")) == ()
    assert b.late == 2 and b.current("MSFT", "1s") is None


def test_breaks_and_quotes_are_ignored() -> None:
    b = BarBuilder(["1s"])
    quote = Update("AAPL", "Q", T0 + 1, bid_price=9.9, ask_price=10.1, last_price=10.0, last_size=5)
    brk = Update("AAPL", "B", T0 + 2, last_price=10.0, last_size=5)
    assert b.add(quote) == () and b.add(brk) == ()
    assert b.current("AAPL", "1s") is None
    b.add(trade(T0 + 10, 10.0, 1))
    # A break of a huge print, then quotes in the next interval: nothing moves, nothing closes.
    assert b.add(Update("AAPL", "B", T0 + 20, last_price=1000.0, last_size=1e6)) == ()
    assert b.add(Update("AAPL", "Q", T0 + 5_000, bid_price=1.0, ask_price=2.0)) == ()
    assert b.add(Update("AAPL", "T", T0 + 30, last_size=7)) == ()  # a trade without a price
    bar = b.current("AAPL", "1s")
    assert bar is not None and (bar.high, bar.volume, bar.trades) == (10.0, 1.0, 1)
    assert b.late == 0
    history = [quote, brk, trade(T0 + 10, 10.0, 1), Update("AAPL", "B", T0 + 20, last_price=1000.0, last_size=1e6)]
    assert [(x.trades, x.high) for x in bars_from_trades(history, "1s", T0, T0 + 1_000)] == [(1, 10.0)]


def test_volume_counts_a_missing_size_as_zero() -> None:
    b = BarBuilder(["1m"])
    feed(b, trade(T0, 10.0, None), trade(T0 + 1, 11.0, 100), trade(T0 + 2, 12.0, None))
    bar = b.current("AAPL", "1m")
    assert bar is not None
    assert (bar.volume, bar.trades, bar.vwap, bar.open, bar.close, bar.high) == (100.0, 3, 11.0, 10.0, 12.0, 12.0)

    b2 = BarBuilder(["1m"])
    feed(b2, trade(T0, 10.0, None), trade(T0 + 1, 11.0, 0))
    bar = b2.current("AAPL", "1m")
    assert bar is not None and (bar.volume, bar.trades, bar.vwap) == (0.0, 2, None)


def test_vwap() -> None:
    b = BarBuilder(["5m"])
    feed(b, trade(T0, 10.0, 100), trade(T0 + 10, 11.0, 300), trade(T0 + 20, 13.0, 0))
    bar = b.current("AAPL", "5m")
    assert bar is not None and bar.vwap == pytest.approx((10 * 100 + 11 * 300) / 400)
    assert bar.volume == 400.0


def test_flush_closes_the_bars_of_a_quiet_symbol() -> None:
    b = BarBuilder(["1s", "1m"])
    b.add(trade(T0 + 100, 10.0))
    assert b.flush(T0 + 999) == []
    [second] = b.flush(T0 + 1_000)  # the interval [T0, T0+1000) is over
    assert (second.interval, second.start_ms, second.complete) == ("1s", T0, True)
    assert b.current("AAPL", "1s") is None and b.current("AAPL", "1m") is not None
    assert b.flush(T0 + 1_000) == []  # closed once
    [minute] = b.flush(T0 + 60_000)
    assert (minute.interval, minute.complete, minute.trades) == ("1m", True, 1)
    assert b.add(trade(T0 + 70_000, 11.0)) == ()  # nothing left open to close


def test_bars_align_to_utc_boundaries() -> None:
    when = datetime(2024, 3, 10, 14, 37, 12, 345_000, tzinfo=UTC)
    ts = int(when.timestamp() * 1000)
    b = BarBuilder(["1s", "1m", "5m", "1h"])
    b.add(trade(ts, 10.0))

    def start(interval: str) -> datetime:
        bar = b.current("AAPL", interval)
        assert bar is not None
        return datetime.fromtimestamp(bar.start_ms / 1000, tz=UTC)

    assert start("1h") == when.replace(minute=0, second=0, microsecond=0)
    assert start("5m") == when.replace(minute=35, second=0, microsecond=0)
    assert start("1m") == when.replace(second=0, microsecond=0)
    assert start("1s") == when.replace(microsecond=0)
    [hour] = b.add(trade(int(datetime(2024, 3, 10, 15, tzinfo=UTC).timestamp() * 1000), 11.0))[3:]
    assert (hour.interval, hour.start_ms % 3_600_000, hour.close) == ("1h", 0, 10.0)


def test_symbols_are_independent() -> None:
    b = BarBuilder(["1s"])
    b.add(trade(T0 + 100, 10.0, symbol="AAPL"))
    assert b.add(trade(T0 + 5_000, 300.0, symbol="MSFT")) == ()  # MSFT's later trade closes nothing of AAPL's
    assert b.add(trade(T0 + 200, 11.0, symbol="AAPL")) == ()  # not late: AAPL's own bar is still open
    assert b.add(trade(T0 + 300, 301.0, symbol="MSFT")) == ()  # late for MSFT only
    assert b.late == 1
    aapl, msft = b.current("AAPL", "1s"), b.current("MSFT", "1s")
    assert aapl is not None and (aapl.trades, aapl.close) == (2, 11.0)
    assert msft is not None and (msft.trades, msft.start_ms) == (1, T0 + 5_000)
    assert sorted(bar.symbol for bar in b.flush(T0 + 10_000)) == ["AAPL", "MSFT"]

    b.add(trade(T0 + 10_500, 12.0, symbol="AAPL"))
    b.forget("AAPL")
    assert b.current("AAPL", "1s") is None and b.flush(T0 + 20_000) == []


def test_state_stays_bounded_and_a_quiet_add_allocates_nothing() -> None:
    b = BarBuilder(list(INTERVALS))
    symbols = [f"S{i}" for i in range(20)]
    updates = [trade(T0 + i * 37, 10.0 + i % 13, float(i % 5), symbols[i % 20]) for i in range(40_000)]
    for u in updates[:2_000]:
        b.add(u)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for u in updates[2_000:]:  # 25 minutes of trades: 1s, 1m and 5m bars roll over and over
            b.add(u)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 10_000, grown  # a few floats' worth, not per trade or per bar
    inside = trade(T0 + 40_000 * 37 + 1, 10.0, 1.0, "S0")
    b.add(inside)
    assert b.add(inside) is b.add(Update("S0", "Q", T0, bid_price=1.0))  # the same empty tuple, not a new list
    assert b.add(inside) == ()


def test_bar_wire_format() -> None:
    b = BarBuilder(["1m"])
    b.add(trade(T0, 10.5, 3.0))
    bar = b.current("AAPL", "1m")
    raw = msgspec.json.encode(bar)
    assert raw == (
        b'{"type":"bar","symbol":"AAPL","interval":"1m","start_ms":1710165600000,"open":10.5,"high":10.5,'
        b'"low":10.5,"close":10.5,"volume":3.0,"trades":1,"vwap":10.5,"complete":false}'
    )
    assert bar is not None and bar.type == "bar" and msgspec.json.decode(raw, type=Bar) == bar
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(raw.replace(b'"bar"', b'"price_update"', 1), type=Bar)


def test_unknown_intervals_are_refused() -> None:
    assert dict(INTERVALS) == {"1s": 1_000, "1m": 60_000, "5m": 300_000, "1h": 3_600_000}
    with pytest.raises(ValueError, match="'2m'"):
        BarBuilder(["1m", "2m"])
    with pytest.raises(ValueError, match="not built"):
        BarBuilder(["1m"]).current("AAPL", "1s")
    with pytest.raises(ValueError, match="'1d'"):
        bars_from_trades([], "1d", 0, 1)


def test_history_takes_rows_in_any_order_and_marks_partial_bars() -> None:
    rows = [
        ("AAPL", T0 + 61_000, 12.0, 1.0),
        ("AAPL", T0 + 100, 10.0, 2.0),
        ("AAPL", T0 + 30_000, 11.0, None),
        ("MSFT", T0 + 5, 300.0, 1.0),
        ("AAPL", T0 + 130_000, 13.0, 1.0),
    ]
    bars = bars_from_trades(rows, "1m", T0, T0 + 120_000)  # the last row is outside the window
    assert [(b.symbol, b.start_ms, b.open, b.close, b.trades, b.complete) for b in bars] == [
        ("AAPL", T0, 10.0, 11.0, 2, True),
        ("AAPL", T0 + 60_000, 12.0, 12.0, 1, True),
        ("MSFT", T0, 300.0, 300.0, 1, True),
    ]
    # Window bounds inside intervals: the bars cut by them are not complete.
    bars = bars_from_trades(rows, "1m", T0 + 50, T0 + 90_000)
    assert [(b.symbol, b.start_ms, b.trades, b.complete) for b in bars] == [
        ("AAPL", T0, 2, False),
        ("AAPL", T0 + 60_000, 1, False),
    ]


# -- properties -------------------------------------------------------------------------------

_events = st.lists(
    st.tuples(
        st.sampled_from(["AAA", "BBB", "CCC"]),
        st.one_of(
            st.sampled_from([0, 1, 999, 1_000, 1_001, 59_999, 60_000, 300_000, 3_600_000]), st.integers(0, 3_000)
        ),
        st.sampled_from(["T", "T", "T", "Q", "B"]),
        st.one_of(st.sampled_from([10.0, 10.5, 11.0]), st.floats(0.01, 1e5), st.none()),
        st.one_of(st.none(), st.sampled_from([0.0, 1.0, 100.0]), st.floats(0, 1e6)),
    ),
    max_size=60,
)


def _updates(offset: int, events: list[tuple[str, int, str, float | None, float | None]]) -> list[Update]:
    ts = T0 + offset
    out = []
    for symbol, delta, kind, price, size in events:
        ts += delta
        out.append(Update(symbol, kind, ts, last_price=price, last_size=size))
    return out


def _bar(symbol: str, interval: str, start: int, trades: list[Update], complete: bool) -> Bar:
    """The definition, written out the slow way: a plain running sum, arrival order for ties."""
    first = min(trades, key=lambda u: u.timestamp)  # min/max keep the first of equal keys
    last = max(reversed(trades), key=lambda u: u.timestamp)
    prices = [u.last_price or 0.0 for u in trades]
    volume = pv = 0.0
    for u in trades:
        size = u.last_size or 0.0
        volume += size
        pv += (u.last_price or 0.0) * size
    return Bar(
        symbol,
        interval,
        start,
        first.last_price or 0.0,
        max(prices),
        min(prices),
        last.last_price or 0.0,
        volume,
        len(trades),
        pv / volume if volume > 0 else None,
        complete,
    )


def _reference(updates: list[Update], interval: str, end_ms: int) -> list[Bar]:
    """Bars of in-order trades by grouping them."""
    ms = INTERVALS[interval]
    groups: dict[tuple[str, int], list[Update]] = {}
    for u in updates:
        if u.kind == "T" and u.last_price is not None and u.timestamp < end_ms:
            groups.setdefault((u.symbol, u.timestamp - u.timestamp % ms), []).append(u)
    return [_bar(symbol, interval, start, us, start + ms <= end_ms) for (symbol, start), us in sorted(groups.items())]


class _FlatBuilder:
    """The builder's contract, each interval on its own and every bar kept as its list of trades."""

    def __init__(self, intervals: list[str]) -> None:
        self.intervals = intervals
        self.floors = dict.fromkeys(intervals, -(1 << 62))
        self.state: dict[tuple[str, str], tuple[int, int, list[Update]]] = {}  # (start, end, trades)
        self.late = 0

    def add(self, u: Update) -> list[Bar]:
        if u.kind != "T" or u.last_price is None:
            return []
        out, late, ts = [], False, u.timestamp
        for iv in self.intervals:
            ms = INTERVALS[iv]
            floor = self.floors[iv]
            start, end, trades = self.state.get((u.symbol, iv), (floor, floor, []))
            if ts >= end:
                if trades:
                    out.append(_bar(u.symbol, iv, start, trades, True))
                self.state[u.symbol, iv] = (ts - ts % ms, ts - ts % ms + ms, [u])
            elif ts >= start:
                trades.append(u)
            else:
                late = True
        self.late += late
        return out

    def flush(self, now: int) -> list[Bar]:
        out = []
        for iv in self.intervals:
            self.floors[iv] = max(self.floors[iv], now - now % INTERVALS[iv])
        for (symbol, iv), (start, end, trades) in self.state.items():
            if trades and end <= now:
                out.append(_bar(symbol, iv, start, trades, True))
                start, trades = end, []
            if not trades:
                start = end = max(end, self.floors[iv])
            self.state[symbol, iv] = (start, end, trades)
        return out

    def current(self, symbol: str, iv: str) -> Bar | None:
        start, _, trades = self.state.get((symbol, iv), (0, 0, []))
        return _bar(symbol, iv, start, trades, False) if trades else None


def _same(a: list[Bar], b: list[Bar]) -> bool:
    """Equal, but for the last bits of the sums (a coarse bar sums its finer bars' sums)."""
    key = lambda x: (x.symbol, x.interval, x.start_ms)  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    exact = [msgspec.structs.replace(x, volume=0.0, vwap=None) for x in a] == [
        msgspec.structs.replace(x, volume=0.0, vwap=None) for x in b
    ]
    return exact and all(
        x.volume == pytest.approx(y.volume)
        and (x.vwap is None) == (y.vwap is None)
        and (x.vwap is None or x.vwap == pytest.approx(y.vwap))
        for x, y in zip(a, b)
    )


@settings(max_examples=80, deadline=None)
@given(offset=st.integers(0, 3_600_000), events=_events, tail=st.integers(0, 4_000_000))
def test_live_equals_history_for_in_order_trades(
    offset: int, events: list[tuple[str, int, str, float | None, float | None]], tail: int
) -> None:
    updates = _updates(offset, events)
    end_ms = (updates[-1].timestamp if updates else T0) + 1 + tail
    b = BarBuilder(INTERVALS)
    live = [bar for u in updates for bar in b.add(u)]
    live += b.flush(end_ms)
    assert all(bar.complete for bar in live) and b.late == 0
    for symbol in ("AAA", "BBB", "CCC"):
        for interval in INTERVALS:
            bar = b.current(symbol, interval)
            if bar is not None:
                live.append(bar)
    rows = [
        (u.symbol, u.timestamp, u.last_price, u.last_size)
        for u in updates
        if u.kind == "T" and u.last_price is not None
    ]
    for interval in INTERVALS:
        mine = sorted((x for x in live if x.interval == interval), key=lambda x: (x.symbol, x.start_ms))
        assert mine == bars_from_trades(updates, interval, 0, end_ms)
        assert mine == bars_from_trades(rows, interval, 0, end_ms)
        assert _same(mine, _reference(updates, interval, end_ms))


@settings(max_examples=80, deadline=None)
@given(events=_events, order=st.randoms(use_true_random=False))
def test_out_of_order_trades_are_either_in_a_bar_or_late(
    events: list[tuple[str, int, str, float | None, float | None]], order: object
) -> None:
    updates = [u for u in _updates(0, events) if u.kind == "T" and u.last_price is not None]
    order.shuffle(updates)  # type: ignore[attr-defined]
    b = BarBuilder(["1s"])
    bars = [bar for u in updates for bar in b.add(u)] + b.flush(1 << 50)
    assert sum(bar.trades for bar in bars) + b.late == len(updates)
    for symbol in ("AAA", "BBB", "CCC"):
        starts = [bar.start_ms for bar in bars if bar.symbol == symbol]
        assert starts == sorted(set(starts))  # each interval once, in order
    for bar in bars:
        assert bar.low <= min(bar.open, bar.close) and bar.high >= max(bar.open, bar.close)


_traffic = st.lists(
    st.one_of(
        st.tuples(
            st.just("T"),
            st.sampled_from(["AAA", "BBB"]),
            st.one_of(
                st.sampled_from([0, 999, 1_000, 59_999, 60_000, 299_999, 300_000, 3_600_000]), st.integers(0, 4_000_000)
            ),
            st.sampled_from([10.0, 10.5, 11.0, 9.5]),
            st.one_of(st.none(), st.sampled_from([1.0, 100.0]), st.floats(0, 1e4)),
        ),
        st.tuples(st.just("flush"), st.just(""), st.integers(0, 4_000_000), st.just(0.0), st.none()),
    ),
    max_size=50,
)


@settings(max_examples=150, deadline=None)
@given(traffic=_traffic, intervals=st.lists(st.sampled_from(list(INTERVALS)), min_size=1, max_size=4, unique=True))
def test_any_arrival_order_matches_each_interval_on_its_own(
    traffic: list[tuple[str, str, int, float, float | None]], intervals: list[str]
) -> None:
    """Out of order, with flushes between: the chained builder == independent per-interval bars."""
    b, flat = BarBuilder(intervals), _FlatBuilder(intervals)
    mine: list[Bar] = []
    theirs: list[Bar] = []
    for what, symbol, offset, price, size in traffic:
        if what == "flush":
            mine += b.flush(T0 + offset)
            theirs += flat.flush(T0 + offset)
        else:
            mine += b.add(trade(T0 + offset, price, size, symbol))
            theirs += flat.add(trade(T0 + offset, price, size, symbol))
        assert b.late == flat.late
    assert _same(mine, theirs)
    for symbol in ("AAA", "BBB"):
        for interval in intervals:
            now, ref = b.current(symbol, interval), flat.current(symbol, interval)
            assert (now is None) == (ref is None)
            if now is not None and ref is not None:
                assert _same([now], [ref])
