"""OHLCV bars: aggregation, the one lateness rule and ``complete``, and live == history (Hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_relay.bars import INTERVALS, Bar, BarBuilder, Lateness, bars_from_trades
from trio_relay.bars.builder import bars_from_sorted_trades
from trio_relay.model import Update

T0 = 1_710_165_600_000  # 2024-03-11T14:00:00Z: on every interval's boundary
# The rule of most tests: 1 s of grace, 1 s of lateness for 1s bars, 5 s for 1m bars.
RULE = Lateness({"1s": 1_000, "1m": 5_000, "5m": 5_000, "1h": 5_000}, grace_ms=1_000)


def trade(ts: int, price: float, size: float | None = 1.0, symbol: str = "AAPL") -> Update:
    return Update(symbol, "T", ts, last_price=price, last_size=size)


def on_time(builder: BarBuilder, *updates: Update) -> list[Bar]:
    """Each update arriving exactly when it was stamped."""
    return [bar for u in updates for bar in builder.add(u, u.timestamp)]


def ohlc(bar: Bar) -> tuple[float, float, float, float, float, int]:
    return bar.open, bar.high, bar.low, bar.close, bar.volume, bar.trades


def test_first_trade_opens_and_last_trade_closes_the_interval() -> None:
    b = BarBuilder(["1s"], RULE)
    assert (
        on_time(b, trade(T0, 10.0, 5), trade(T0 + 400, 12.0, 1), trade(T0 + 700, 9.0, 2), trade(T0 + 999, 11.0, 2))
        == []
    )
    [closed] = on_time(b, trade(T0 + 1_000, 10.5))  # a later interval traded: closed, not yet complete
    assert (closed.start_ms, ohlc(closed), closed.complete, closed.amended) == (
        T0,
        (10.0, 12.0, 9.0, 11.0, 10.0, 4),
        False,
        False,
    )
    assert closed.vwap == pytest.approx((10 * 5 + 12 + 9 * 2 + 11 * 2) / 10)
    # Complete once its lateness window has passed: end + grace + lateness = T0 + 3 s.
    assert b.flush(T0 + 2_999) == []  # the open bar [T0+1s, T0+2s) is not over by the clock yet
    [final] = [x for x in b.flush(T0 + 3_000) if x.start_ms == T0]
    assert final == msgspec.structs.replace(closed, complete=True)


def test_a_trade_exactly_on_the_boundary_opens_the_next_bar() -> None:
    b = BarBuilder(["1s", "1m"], RULE)
    on_time(b, trade(T0 + 500, 10.0))
    [closed] = on_time(b, trade(T0 + 1_000, 11.0))
    assert (closed.interval, closed.start_ms, closed.close) == ("1s", T0, 10.0)
    now = b.current("AAPL", "1s")
    assert now is not None and (now.start_ms, now.open, now.complete) == (T0 + 1_000, 11.0, False)


def test_an_interval_without_trades_has_no_bar() -> None:
    assert [
        bar.start_ms for bar in bars_from_trades([trade(T0 + 100, 10.0), trade(T0 + 5_100, 11.0)], "1s", T0, T0 + 6_000)
    ] == [T0, T0 + 5_000]


def test_out_of_order_trade_inside_the_open_bar_updates_it() -> None:
    b = BarBuilder(["1s"], RULE)
    b.add(trade(T0 + 500, 10.0), T0 + 500)
    assert b.add(trade(T0 + 100, 8.0), T0 + 600) == ()  # older, same bar: it becomes the open
    bar = b.current("AAPL", "1s")
    assert bar is not None and ohlc(bar) == (8.0, 10.0, 8.0, 10.0, 2.0, 2)


def test_equal_timestamps_first_to_arrive_opens_last_closes() -> None:
    b = BarBuilder(["1s", "1m"], RULE)
    trades = [trade(T0 + 7, 1.0), trade(T0 + 7, 2.0), trade(T0 + 3, 3.0), trade(T0 + 3, 4.0)]
    for t in trades:
        b.add(t, T0 + 10)
    live = b.current("AAPL", "1s")
    assert live is not None and (live.open, live.close) == (3.0, 2.0)
    # History reads by (timestamp, arrival): the same bar.
    rows = [("AAPL", t.timestamp, t.last_price, t.last_size, T0 + 10) for t in trades]
    rows.sort(key=lambda r: r[1])
    [stored] = bars_from_sorted_trades([rows], "1s", T0, T0 + 1_000, 10, lateness=RULE, now_ms=T0).bars
    assert stored == live


def test_a_late_trade_within_the_lateness_amends_its_closed_bar_live_and_in_history() -> None:
    """Issue 22, case 1: a trade stamped in a bar already closed is no longer dropped live only."""
    b = BarBuilder(["1s", "1m"], RULE)
    b.add(trade(T0 + 100, 10.0, 5), T0 + 100)
    [closed] = b.add(trade(T0 + 1_200, 11.0, 5), T0 + 1_200)
    assert (closed.start_ms, closed.low, closed.volume, closed.complete) == (T0, 10.0, 5.0, False)
    # Stamped in [T0, T0+1s), arrives at T0+2.9 s: before end + grace + lateness (T0+3 s).
    [amended] = b.add(trade(T0 + 900, 9.0, 2), T0 + 2_900)
    assert (amended.start_ms, amended.low, amended.volume, amended.trades) == (T0, 9.0, 7.0, 2)
    assert amended.amended and not amended.complete and b.late == 0
    # The same trade one millisecond later is late for the 1s bar, not for the 1m one.
    assert b.add(trade(T0 + 950, 1.0, 100), T0 + 3_000) == ()
    assert b.late == 1
    minute = b.current("AAPL", "1m")
    assert minute is not None and (minute.low, minute.trades) == (1.0, 4)
    live = [x for x in b.flush(T0 + 120_000) if x.complete]
    history = [
        ("AAPL", T0 + 100, 10.0, 5.0, T0 + 100),
        ("AAPL", T0 + 900, 9.0, 2.0, T0 + 2_900),
        ("AAPL", T0 + 950, 1.0, 100.0, T0 + 3_000),
        ("AAPL", T0 + 1_200, 11.0, 5.0, T0 + 1_200),
    ]
    for interval in ("1s", "1m"):
        stored = bars_from_sorted_trades([history], interval, T0, T0 + 60_000, 10, lateness=RULE, now_ms=T0 + 120_000)
        assert stored.bars == [x for x in live if x.interval == interval]
        assert stored.late == (1 if interval == "1s" else 0)
    assert [ohlc(x) for x in live if x.interval == "1s"] == [
        (10.0, 10.0, 9.0, 9.0, 7.0, 2),
        (11.0, 11.0, 11.0, 11.0, 5.0, 1),
    ]


def test_a_late_trade_may_add_a_bar_behind_those_sent() -> None:
    b = BarBuilder(["1s"], RULE)
    b.add(trade(T0 + 100, 10.0), T0 + 100)
    b.add(trade(T0 + 2_100, 12.0), T0 + 2_100)  # [T0+1s, T0+2s) had no trade
    [added] = b.add(trade(T0 + 1_500, 11.0), T0 + 2_200)
    assert (added.start_ms, added.amended, added.complete) == (T0 + 1_000, True, False)


def test_a_trade_stamped_ahead_of_the_clock_beyond_the_grace_is_late() -> None:
    b = BarBuilder(["1s"], RULE)
    assert b.add(trade(T0 + 5_000, 10.0), T0 + 3_999) == () and b.late == 1
    assert b.add(trade(T0 + 5_000, 10.0), T0 + 4_000) == () and b.late == 1
    assert b.current("AAPL", "1s") is not None
    assert (
        bars_from_sorted_trades(
            [[("AAPL", T0 + 5_000, 10.0, 1.0, T0 + 3_999)]], "1s", T0, T0 + 9_000, 9, lateness=RULE
        ).late
        == 1
    )


def test_flush_closes_by_the_clock_then_completes_after_the_lateness() -> None:
    b = BarBuilder(["1s", "1m"], RULE)
    b.add(trade(T0 + 100, 10.0), T0 + 100)
    assert b.flush(T0 + 1_999) == []  # the end is T0+1s, plus a second of grace
    [closed] = b.flush(T0 + 2_000)
    assert (closed.interval, closed.start_ms, closed.complete) == ("1s", T0, False)
    assert b.current("AAPL", "1s") is None and b.current("AAPL", "1m") is not None
    assert b.flush(T0 + 2_999) == []  # sent once
    [final] = b.flush(T0 + 3_000)
    assert final == msgspec.structs.replace(closed, complete=True)
    [minute] = b.flush(T0 + 61_000)
    assert (minute.interval, minute.complete) == ("1m", False)
    [minute] = b.flush(T0 + 66_000)
    assert (minute.interval, minute.complete, minute.trades) == ("1m", True, 1)
    assert b.pending() == 0
    # A trade of a bar already complete: late, in no bar.
    assert b.add(trade(T0 + 200, 1.0), T0 + 66_000) == () and b.late == 1


def test_without_lateness_a_bar_closed_by_the_clock_is_complete_at_once() -> None:
    b = BarBuilder(["1s"], Lateness({"1s": 0}, grace_ms=0))
    b.add(trade(T0 + 100, 10.0), T0 + 100)
    [bar] = b.flush(T0 + 1_000)
    assert bar.complete and b.pending() == 0
    b.add(trade(T0 + 2_100, 11.0), T0 + 2_100)
    [closed] = b.add(trade(T0 + 3_100, 12.0), T0 + 3_100)  # its window passed: complete when closed
    assert (closed.start_ms, closed.complete) == (T0 + 2_000, True)


def test_bars_align_to_utc_boundaries() -> None:
    when = datetime(2024, 3, 10, 14, 37, 12, 345_000, tzinfo=UTC)
    ts = int(when.timestamp() * 1000)
    b = BarBuilder(["1s", "1m", "5m", "1h"], RULE)
    b.add(trade(ts, 10.0), ts)

    def start(interval: str) -> datetime:
        bar = b.current("AAPL", interval)
        assert bar is not None
        return datetime.fromtimestamp(bar.start_ms / 1000, tz=UTC)

    assert start("1h") == when.replace(minute=0, second=0, microsecond=0)
    assert start("5m") == when.replace(minute=35, second=0, microsecond=0)
    assert start("1m") == when.replace(second=0, microsecond=0)
    assert start("1s") == when.replace(microsecond=0)


def test_symbols_are_independent() -> None:
    b = BarBuilder(["1s"], RULE)
    b.add(trade(T0 + 100, 10.0, symbol="AAPL"), T0 + 100)
    assert b.add(trade(T0 + 1_500, 300.0, symbol="MSFT"), T0 + 1_500) == ()  # closes nothing of AAPL's
    assert b.add(trade(T0 + 200, 11.0, symbol="AAPL"), T0 + 1_500) == ()  # AAPL's own bar is still open
    aapl = b.current("AAPL", "1s")
    assert aapl is not None and (aapl.trades, aapl.close) == (2, 11.0)
    b.forget("AAPL")
    assert b.current("AAPL", "1s") is None and [x.symbol for x in b.flush(T0 + 10_000)] == ["MSFT"]


def test_state_stays_bounded_with_the_clock() -> None:
    b = BarBuilder(list(INTERVALS), RULE)
    for i in range(20_000):  # 2,000 s of trades, 20 symbols, with the channel's flush every second
        ts = T0 + i * 100
        b.add(trade(ts - i % 3 * 700, 10.0 + i % 13, float(i % 5), f"S{i % 20}"), ts)
        if i % 10 == 0:
            b.flush(ts)
            # Per symbol: 1s bars within grace + lateness of the clock, one of each coarser interval (two
            # while a closed one waits out its lateness).
            assert b.pending() <= 20 * (4 + 2 + 2 + 2)
    inside = trade(T0 + 2_000_000, 10.0)
    b.add(inside, inside.timestamp)
    assert b.add(inside, inside.timestamp) is b.add(Update("S0", "Q", T0, bid_price=1.0), T0)  # the shared ()


def test_bar_wire_format() -> None:
    b = BarBuilder(["1m"], RULE)
    b.add(trade(T0, 10.5, 3.0), T0)
    bar = b.current("AAPL", "1m")
    raw = msgspec.json.encode(bar)
    assert raw == (
        b'{"type":"bar","symbol":"AAPL","interval":"1m","start_ms":1710165600000,"open":10.5,"high":10.5,'
        b'"low":10.5,"close":10.5,"volume":3.0,"trades":1,"vwap":10.5,"complete":false}'
    )
    assert bar is not None and bar.type == "bar" and msgspec.json.decode(raw, type=Bar) == bar
    assert msgspec.json.encode(msgspec.structs.replace(bar, amended=True)).endswith(b'"complete":false,"amended":true}')
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
    with pytest.raises(ValueError, match="'1d'"):
        Lateness({"1d": 0})


# -- complete ---------------------------------------------------------------------------------


def test_complete_is_inside_the_window_ended_and_past_its_lateness() -> None:
    """Issue 22, case 2: the window's edges."""
    assert RULE.final_at("1m", T0) == T0 + 60_000 + 1_000 + 5_000
    assert RULE.complete("1m", T0, T0 + 66_000, (T0, T0 + 60_000))
    assert not RULE.complete("1m", T0, T0 + 65_999, (T0, T0 + 60_000))  # within its lateness
    assert not RULE.complete("1m", T0, T0 + 99_000, (T0 + 1, T0 + 60_000))  # starts before the window
    assert not RULE.complete("1m", T0, T0 + 99_000, (T0, T0 + 59_999))  # ends after it
    rows = [
        ("AAPL", T0 + 100, 10.0, 2.0, T0 + 100),
        ("AAPL", T0 + 30_000, 11.0, None, T0 + 30_000),
        ("MSFT", T0 + 5, 300.0, 1.0, T0 + 5),
        ("AAPL", T0 + 61_000, 12.0, 1.0, T0 + 61_000),
        ("AAPL", T0 + 130_000, 13.0, 1.0, T0 + 130_000),
    ]
    far = T0 + 10**9
    bars = bars_from_trades(rows, "1m", T0, T0 + 120_000, lateness=RULE, now_ms=far)  # the last row is outside
    assert [(b.symbol, b.start_ms, b.open, b.close, b.trades, b.complete) for b in bars] == [
        ("AAPL", T0, 10.0, 11.0, 2, True),
        ("AAPL", T0 + 60_000, 12.0, 12.0, 1, True),
        ("MSFT", T0, 300.0, 300.0, 1, True),
    ]
    # A start inside an interval: that first bar is not complete (nor is one cut by the end).
    bars = bars_from_trades(rows, "1m", T0 + 50, T0 + 90_000, lateness=RULE, now_ms=far)
    assert [(b.symbol, b.start_ms, b.trades, b.complete) for b in bars] == [
        ("AAPL", T0, 2, False),  # [T0, T0+50) is outside the window: not complete
        ("AAPL", T0 + 60_000, 1, False),
    ]
    # An end in the future: the running bar, and the one still in its lateness, are not complete.
    bars = bars_from_trades(rows, "1m", T0, T0 + 3_600_000, lateness=RULE, now_ms=T0 + 125_000)
    assert [(b.symbol, b.start_ms, b.complete) for b in bars] == [
        ("AAPL", T0, True),
        ("AAPL", T0 + 60_000, False),  # ended at T0+120 s: complete from T0+126 s
        ("AAPL", T0 + 120_000, False),  # still running
        ("MSFT", T0, True),
    ]


# -- live == history, over random arrival orders ------------------------------------------------

# (symbol, timestamp offset in ms, arrival delay after the previous event in ms, skew of the
# stamp from the arrival in ms: late trades are stamped well before they arrive, price, size)
_arrivals = st.lists(
    st.tuples(
        st.sampled_from(["AAA", "BBB"]),
        st.integers(0, 900),
        st.one_of(st.sampled_from([-1_001, -1_000, -999, 0, 1_000, 1_001]), st.integers(-9_000, 1_500)),
        st.one_of(st.sampled_from([10.0, 10.5, 11.0]), st.floats(0.01, 1e5)),
        st.one_of(st.none(), st.sampled_from([0.0, 1.0, 100.0]), st.floats(0, 1e6)),
        st.booleans(),  # flush (the channel's clock tick) before this trade
    ),
    max_size=80,
)


def _exact(trades: list[tuple[int, float, float]]) -> tuple[float, float | None]:
    """volume and vwap from exact rational sums, rounded once (the definition)."""
    volume = float(sum((Fraction(size) for _, _, size in trades), Fraction(0)))
    pv = float(sum((Fraction(price * size) for _, price, size in trades), Fraction(0)))
    return volume, (pv / volume if volume > 0 else None)


@settings(max_examples=200, deadline=None)
@given(arrivals=_arrivals, intervals=st.lists(st.sampled_from(list(INTERVALS)), min_size=1, max_size=4, unique=True))
def test_after_the_lateness_window_live_and_history_bars_are_identical(
    arrivals: list[tuple[str, int, int, float, float | None, bool]], intervals: list[str]
) -> None:
    b = BarBuilder(intervals, RULE)
    sent: list[Bar] = []
    rows: list[tuple[str, int, float, float | None, int]] = []  # what the history stores, in arrival order
    recv = T0
    for symbol, delay, skew, price, size, tick in arrivals:
        recv += delay
        if tick:
            sent += b.flush(recv)
        ts = recv + skew
        sent += b.add(trade(ts, price, size, symbol), recv)
        rows.append((symbol, ts, price, size, recv))
    sent += b.flush(recv + 10**8)  # every lateness window has passed
    assert b.pending() == 0
    # Live: the last message of each bar is complete, and nothing follows a complete one.
    final: dict[tuple[str, str, int], Bar] = {}
    for bar in sent:
        key = (bar.symbol, bar.interval, bar.start_ms)
        assert key not in final or not final[key].complete, f"{key} changed after complete"
        final[key] = bar
    assert all(bar.complete for bar in final.values())
    for interval in intervals:
        live = sorted((x for x in final.values() if x.interval == interval), key=lambda x: (x.symbol, x.start_ms))
        live = [msgspec.structs.replace(x, amended=False) for x in live]
        history = bars_from_trades(rows, interval, T0 - 10**7, T0 + 10**8, lateness=RULE, now_ms=recv + 10**8)
        assert live == history
        # And both are the definition: the trades the rule lets in, grouped, with exact sums.
        ms = INTERVALS[interval]
        groups: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
        for symbol, ts, price, size, arrived in rows:
            if RULE.counts(interval, ts, arrived):
                groups.setdefault((symbol, ts - ts % ms), []).append((ts, price, size or 0.0))
        assert [(x.symbol, x.start_ms, x.trades) for x in live] == [
            (s, t, len(g)) for (s, t), g in sorted(groups.items())
        ]
        for bar, (_, group) in zip(live, sorted(groups.items())):
            assert (bar.volume, bar.vwap) == _exact(group)
            assert (bar.high, bar.low) == (max(p for _, p, _ in group), min(p for _, p, _ in group))
            assert (
                bar.open == min(group, key=lambda t: t[0])[1]
                and bar.close == max(reversed(group), key=lambda t: t[0])[1]
            )
