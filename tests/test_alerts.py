"""Alerts core: rule semantics (crossings, gaps, re-arming), validation, limits, the store, and
webhooks delivered to real loopback HTTP receivers (backoff in virtual time)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import h11
import msgspec
import pytest
import trio
import trio.testing

from trio_relay.alerts import AlertEngine, AlertStore, FiredAlert, RuleError, WebhookSender
from trio_relay.appstore import AppStore
from trio_relay.config import AlertsConfig
from trio_relay.model import PriceState, Update

T0 = 1_700_000_000_000  # event time of the first update, epoch ms


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Feed:
    """One symbol's updates, merged into its cache entry as the hub does, through the engine."""

    def __init__(self, engine: AlertEngine, symbol: str = "AAPL") -> None:
        self.engine = engine
        self.symbol = symbol
        self.state = PriceState(symbol=symbol)
        self.ts = T0

    @property
    def cache(self) -> dict[str, PriceState]:
        return {self.symbol: self.state}

    def _push(self, update: Update) -> list[FiredAlert]:
        if update.kind != "B":
            self.state.apply(update, "")
        return self.engine.on_update(update, self.state)

    def trade(self, price: float, *, after: float = 1.0) -> list[FiredAlert]:
        self.ts += int(after * 1000)
        return self._push(Update(self.symbol, "T", self.ts, last_price=price, last_size=100))

    def quote(self, bid: float, ask: float, *, after: float = 1.0) -> list[FiredAlert]:
        self.ts += int(after * 1000)
        return self._push(Update(self.symbol, "Q", self.ts, bid_price=bid, bid_size=1, ask_price=ask, ask_size=1))

    def trades(self, *prices: float, after: float = 1.0) -> list[list[FiredAlert]]:
        """The alerts of each trade, one list per trade."""
        return [self.trade(p, after=after) for p in prices]


def fired_at(results: list[list[FiredAlert]]) -> list[int]:
    """Indexes of the updates that fired something."""
    return [i for i, alerts in enumerate(results) if alerts]


def engine(**config: Any) -> AlertEngine:
    return AlertEngine(AlertsConfig(**config), clock=lambda: T0)


# ------------------------------------------------------------------------------ above / below
async def test_above_fires_once_at_the_crossing_tick() -> None:
    e = engine()
    feed = Feed(e)
    feed.trade(189.0)
    rule = e.create("ann", {"type": "above", "symbol": "aapl", "level": 190}, cache=feed.cache)
    assert rule.symbol == "AAPL" and rule.state == "active" and rule.one_shot
    results = feed.trades(189.5, 189.99, 190.05, 191.0, 192.0, 185.0, 195.0)
    assert fired_at(results) == [2]
    (alert,) = results[2]
    assert alert.message == "AAPL last crossed above 190.00 at 190.05"
    assert (alert.type, alert.rule_id, alert.owner, alert.symbol) == ("alert", rule.id, "ann", "AAPL")
    assert alert.rule == {"type": "above", "level": 190.0, "field": "last"}
    assert alert.price == 190.05 and alert.timestamp == feed.ts - 4000
    assert rule.state == "fired" and rule.fire_count == 1
    wire = json.loads(msgspec.json.encode(alert))
    assert list(wire) == [
        "type",
        "id",
        "rule_id",
        "owner",
        "symbol",
        "name",
        "rule",
        "price",
        "value",
        "fired_at",
        "timestamp",
        "message",
    ]


async def test_below_fires_on_a_gap_that_jumps_over_the_level() -> None:
    e = engine()
    feed = Feed(e, "X")
    feed.trade(101.0)
    e.create("ann", {"type": "below", "symbol": "X", "level": 100}, cache=feed.cache)
    results = feed.trades(100.5, 95.0, 94.0, 99.0, 101.0)
    assert fired_at(results) == [1]
    assert results[1][0].message == "X last crossed below 100.00 at 95.00"


async def test_the_level_itself_counts_as_crossed() -> None:
    e = engine()
    feed = Feed(e)
    e.create("ann", {"type": "above", "symbol": "AAPL", "level": 190})
    assert fired_at(feed.trades(189.0, 190.0)) == [1]


async def test_created_beyond_the_level_waits_for_a_crossing() -> None:
    e = engine()
    feed = Feed(e)
    feed.trade(195.0)
    rule = e.create("ann", {"type": "above", "symbol": "AAPL", "level": 190}, cache=feed.cache)
    assert rule.state == "armed"
    results = feed.trades(196.0, 191.0, 190.0, 189.0, 189.5, 190.5)
    assert fired_at(results) == [5]  # only after the price went below the level and came back


async def test_no_known_price_at_creation_means_armed() -> None:
    e = engine()
    feed = Feed(e)
    rule = e.create("ann", {"type": "above", "symbol": "AAPL", "level": 190})
    assert rule.state == "armed"
    assert fired_at(feed.trades(195.0, 196.0, 185.0, 191.0)) == [3]


async def test_rearming_rule_waits_for_cooldown_and_the_near_side() -> None:
    e = engine()
    feed = Feed(e)
    feed.trade(99.0)
    rule = e.create(
        "ann", {"type": "above", "symbol": "AAPL", "level": 100, "one_shot": False, "cooldown_s": 60}, cache=feed.cache
    )
    # t=+1 fires; ticks beyond never fire again; a crossing during the cooldown (+20 s down,
    # +30 s up) is swallowed; at +70 s the price is beyond: armed until it comes back.
    assert fired_at(feed.trades(101.0, 102.0, after=1)) == [0]
    assert rule.state == "cooling"
    assert feed.trade(98.0, after=18) == []
    assert feed.trade(101.0, after=10) == []
    assert feed.trade(102.0, after=40) == []  # cooldown over, but the price never came back
    assert rule.state == "armed"
    assert feed.trade(99.0) == [] and rule.state == "active"
    (again,) = feed.trade(100.5)
    assert again.price == 100.5 and rule.fire_count == 2


async def test_price_back_during_cooldown_rearms_at_its_end() -> None:
    e = engine()
    feed = Feed(e)
    feed.trade(99.0)
    rule = e.create(
        "ann", {"type": "above", "symbol": "AAPL", "level": 100, "one_shot": False, "cooldown_s": 60}, cache=feed.cache
    )
    assert feed.trade(101.0)
    assert feed.trade(98.0, after=10) == []  # back on the near side during the cooldown
    # The cooldown is over at the next update; the price before it was below: that update is a crossing.
    (alert,) = feed.trade(130.0, after=100)
    assert alert.price == 130.0 and rule.fire_count == 2


async def test_rearming_below_with_zero_cooldown_fires_once_per_crossing() -> None:
    e = engine()
    feed = Feed(e)
    feed.trade(10.0)
    e.create("ann", {"type": "below", "symbol": "AAPL", "level": 5, "one_shot": False}, cache=feed.cache)
    results = feed.trades(4, 3, 2, 6, 7, 5, 5, 4, 12, 1)
    assert fired_at(results) == [0, 5, 9]


@pytest.mark.parametrize(
    ("field", "level", "quotes", "expected"),
    [
        ("bid", 100.0, [(99.0, 99.2), (99.9, 100.1), (100.0, 100.2)], [2]),
        ("ask", 100.0, [(99.0, 99.2), (99.9, 100.1), (100.0, 100.2)], [1]),
        ("mid", 100.0, [(99.0, 99.2), (99.9, 100.0), (99.9, 100.1)], [2]),
    ],
)
async def test_quote_fields(field: str, level: float, quotes: list[tuple[float, float]], expected: list[int]) -> None:
    e = engine()
    feed = Feed(e)
    e.create("ann", {"type": "above", "symbol": "AAPL", "level": level, "field": field})
    results = [feed.quote(b, a) for b, a in quotes]
    assert fired_at(results) == expected
    assert results[expected[0]][0].message.startswith(f"AAPL {field} crossed above 100.00 at ")


async def test_trades_do_not_move_a_quote_rule_and_breaks_are_ignored() -> None:
    e = engine()
    feed = Feed(e, "MSFT")
    e.create("ann", {"type": "above", "symbol": "MSFT", "level": 100, "field": "bid"})
    e.create("ann", {"type": "above", "symbol": "MSFT", "level": 100})
    feed.quote(99.0, 99.1)
    feed.trade(99.0)
    assert [a.rule["field"] for a in feed.trade(150.0)] == ["last"]  # the bid is still 99
    brk = Update("MSFT", "B", feed.ts + 1, last_price=50.0, last_size=1)  # a break: the state keeps 150
    assert e.on_update(brk, feed.state) == []
    assert [a.rule["field"] for a in feed.quote(100.0, 100.1)] == ["bid"]


async def test_a_cooldown_that_ends_between_quotes_is_applied_at_the_next_quote() -> None:
    # Trades do not evaluate a bid rule; its cooldown ends during them, and the next quote, a
    # crossing from the bid before it, fires.
    e = engine()
    feed = Feed(e)
    e.create(
        "ann", {"type": "above", "symbol": "AAPL", "level": 100, "field": "bid", "one_shot": False, "cooldown_s": 10}
    )
    assert feed.quote(99.0, 99.1) == [] and feed.quote(100.0, 100.1)
    assert feed.quote(99.5, 99.6) == []
    for _ in range(20):
        assert feed.trade(101.0) == []
    assert feed.quote(100.5, 100.6)


async def test_a_merged_update_evaluates_every_signal() -> None:
    e = engine()
    state = PriceState(symbol="AAPL", last_price=99.0, bid_price=98.0, ask_price=98.1)
    e.create("ann", {"type": "above", "symbol": "AAPL", "level": 100}, cache={"AAPL": state})
    e.create("ann", {"type": "above", "symbol": "AAPL", "level": 100, "field": "bid"}, cache={"AAPL": state})
    snapshot = Update(
        "AAPL",
        "T",
        T0,
        last_price=101.0,
        last_size=1,
        bid_price=100.5,
        bid_size=1,
        ask_price=100.6,
        ask_size=1,
        merged=True,
    )
    state.apply(snapshot, "")
    assert sorted(a.rule["field"] for a in e.on_update(snapshot, state)) == ["bid", "last"]


async def test_no_rules_for_a_symbol_costs_one_lookup_and_returns_nothing() -> None:
    e = engine()
    e.create("ann", {"type": "above", "symbol": "AAPL", "level": 1})
    other = Feed(e, "MSFT")
    assert other.trade(5.0) == [] and "MSFT" not in e.symbols and "AAPL" in e.symbols


# ------------------------------------------------------------------------------ move
async def test_move_up_over_a_window() -> None:
    e = engine()
    feed = Feed(e)
    rule = e.create("ann", {"type": "move", "symbol": "AAPL", "pct": 2.0, "window_s": 300})
    feed.trade(100.0)
    assert rule.state == "active"
    results = feed.trades(100.5, 101.0, 101.9, 102.0, 103.0, 99.0, 104.0, after=30)
    assert fired_at(results) == [3]  # exactly +2.0% from the window's low (100) at the 4th trade
    (alert,) = results[3]
    assert alert.value == pytest.approx(2.0)
    assert alert.message == "AAPL last rose 2.00% within 5m (from 100.00 to 102.00)"
    assert rule.state == "fired"


async def test_move_fires_once_on_a_gap() -> None:
    e = engine()
    feed = Feed(e)
    e.create("ann", {"type": "move", "symbol": "AAPL", "pct": 2.0, "window_s": 60, "one_shot": False})
    results = feed.trades(100.0, 100.2, 110.0, 111.0, 112.0, 109.0)
    assert fired_at(results) == [2] and results[2][0].value == pytest.approx(10.0)


async def test_move_only_counts_prices_inside_the_window() -> None:
    e = engine()
    feed = Feed(e)
    e.create("ann", {"type": "move", "symbol": "AAPL", "pct": 2.0, "window_s": 300})
    feed.trade(100.0)
    # 100 leaves the window; the low is now 101.5 (+0.49% at 102), nothing fires.
    assert feed.trade(101.5, after=200) == []
    assert feed.trade(102.0, after=200) == []
    # A new low, and 2% above it within the window: fires.
    assert feed.trade(101.0, after=10) == []
    assert fired_at(feed.trades(102.0, 103.1, after=10)) == [1]


async def test_move_down_and_rearming_after_cooldown() -> None:
    e = engine()
    feed = Feed(e)
    rule = e.create(
        "ann", {"type": "move", "symbol": "AAPL", "pct": -5.0, "window_s": 60, "one_shot": False, "cooldown_s": 30}
    )
    feed.trade(200.0)
    results = feed.trades(195.0, 189.0, 185.0, 180.0, after=5)
    assert fired_at(results) == [1]  # -5.5% from the high of 200
    assert results[1][0].message == "AAPL last fell 5.50% within 1m (from 200.00 to 189.00)"
    # The high ages out of the window (the move shrinks to within 5%), then a new drop from a new high.
    assert feed.trade(180.0, after=120) == [] and rule.state == "active"
    assert fired_at(feed.trades(181.0, 171.0, after=5)) == [1]
    assert rule.fire_count == 2


async def test_move_window_memory_is_bounded() -> None:
    e = engine()
    feed = Feed(e)
    e.create("ann", {"type": "move", "symbol": "AAPL", "pct": 50.0, "window_s": 300})
    for i in range(20_000):  # strictly rising: the worst case for the lows
        feed.trade(100.0 + i * 0.001, after=0.01)
    (signal,) = e._watches["AAPL"].signals.values()
    assert len(signal.lows) <= 258 and len(signal.highs) <= 258  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ spread
async def test_spread_absolute() -> None:
    e = engine()
    feed = Feed(e)
    feed.quote(100.00, 100.05)
    rule = e.create("ann", {"type": "spread", "symbol": "AAPL", "max_spread": 0.10}, cache=feed.cache)
    assert rule.state == "active"
    results = [feed.quote(100.00, 100.10), feed.quote(100.00, 100.12), feed.quote(100.00, 100.50)]
    assert fired_at(results) == [1]  # 0.10 is not wider than 0.10
    assert results[1][0].message == "AAPL spread 0.12 is wider than 0.10 (bid 100.00, ask 100.12)"
    assert results[1][0].value == pytest.approx(0.12) and results[1][0].price == pytest.approx(100.06)


async def test_spread_bps_and_a_crossed_book() -> None:
    e = engine()
    feed = Feed(e)
    e.create("ann", {"type": "spread", "symbol": "AAPL", "max_spread_bps": 10, "one_shot": False})
    results = [
        feed.quote(99.95, 100.05),  # 10 bps: not wider
        feed.quote(100.10, 99.90),  # crossed: negative
        feed.quote(99.94, 100.06),  # 12 bps: fires
        feed.quote(99.90, 100.10),  # still wide: no
        feed.quote(99.99, 100.01),  # 2 bps
        feed.quote(99.00, 101.00),  # 200 bps: fires again
    ]
    assert fired_at(results) == [2, 5]
    assert results[2][0].message == "AAPL spread 12.0 bps is wider than 10 bps (bid 99.94, ask 100.06)"


# ------------------------------------------------------------------------------ stale
async def test_stale_fires_once_per_silence_and_rearms_after_an_update() -> None:
    now = [T0]
    e = AlertEngine(AlertsConfig(), clock=lambda: now[0])
    feed = Feed(e)
    rule = e.create("ann", {"type": "stale", "symbol": "AAPL", "seconds": 60, "one_shot": False, "cooldown_s": 300})
    one = e.create("bob", {"type": "stale", "symbol": "AAPL", "seconds": 60})
    assert e.check_stale(T0 + 59_999) == []
    fired = e.check_stale(T0 + 60_000)
    assert sorted(a.owner for a in fired) == ["ann", "bob"]
    assert fired[0].message == "AAPL had no update for 60s (limit 60s)" and fired[0].price is None
    assert e.check_stale(T0 + 200_000) == []  # still silent: same silence
    now[0] = T0 + 250_000
    feed.trade(10.0)  # an update; but the cooldown (until T0 + 360 s) is not over
    assert e.check_stale(T0 + 340_000) == []
    (again,) = e.check_stale(T0 + 360_000)  # 110 s without an update, cooldown over
    assert again.rule_id == rule.id and again.price == 10.0 and again.timestamp == feed.ts
    assert one.state == "fired" and rule.fire_count == 2


async def test_stale_checks_run_on_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    e = AlertEngine(AlertsConfig(), clock=lambda: int(trio.current_time() * 1000))
    feed = Feed(e)
    e.create("ann", {"type": "stale", "symbol": "AAPL", "seconds": 30})
    got: list[tuple[float, FiredAlert]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(e.run_stale_checks, lambda alerts: got.extend((trio.current_time(), a) for a in alerts))
        for _ in range(5):
            await trio.sleep(20)  # virtual time (MockClock)
            feed.trade(1.0)
        await trio.sleep(100)  # virtual time (MockClock): silent from t=100
        nursery.cancel_scope.cancel()
    assert [t for t, _ in got] == [130.0]


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        ("[1]", "invalid_json", "a rule must be a JSON object"),
        ({"symbol": "AAPL"}, "missing_field", "'type' is required (one of: above, below, move, spread, stale)"),
        (
            {"type": "sideways", "symbol": "AAPL"},
            "unknown_type",
            "unknown rule type 'sideways' (expected one of: above, below, move, spread, stale)",
        ),
        ({"type": "above", "symbol": "AAPL"}, "missing_field", "an 'above' rule needs 'level' (the price to cross)"),
        ({"type": "above", "level": 1}, "missing_field", "an 'above' rule needs 'symbol'"),
        ({"type": "above", "symbol": "AAPL", "level": "high"}, "invalid_value", "level must be a number, got 'high'"),
        (
            {"type": "above", "symbol": "AAPL", "level": -3},
            "invalid_value",
            "level must be a positive price below 1e+12, got -3",
        ),
        (
            {"type": "above", "symbol": "AAPL", "level": 1e15},
            "invalid_value",
            "level must be a positive price below 1e+12, got 1e+15",
        ),
        (
            {"type": "above", "symbol": "AAPL", "level": 1, "levle": 2},
            "unknown_field",
            "unknown field 'levle' for an 'above' rule (allowed: cooldown_s, field, level, name, one_shot, symbol, webhook)",
        ),
        (
            {"type": "above", "symbol": "AAPL", "level": 1, "id": "x"},
            "unknown_field",
            "'id' is set by the relay, not by the client",
        ),
        (
            {"type": "above", "symbol": "AAPL", "level": 1, "field": "close"},
            "invalid_value",
            "field must be one of last, bid, ask, mid, got 'close'",
        ),
        ({"type": "above", "symbol": "AA PL", "level": 1}, "invalid_symbol", "invalid symbol 'AA PL'"),
        ({"type": "above", "symbol": 42, "level": 1}, "invalid_symbol", "invalid symbol 42"),
        (
            {"type": "move", "symbol": "AAPL", "pct": 2, "window_s": -5},
            "invalid_value",
            "window_s must be between 1 and 86400 seconds, got -5",
        ),
        (
            {"type": "move", "symbol": "AAPL", "pct": 0, "window_s": 60},
            "invalid_value",
            "pct must be non-zero, above -100 and at most 1000 (2.0: a rise of 2% or more, -2.0: a fall of 2% or more), got 0",
        ),
        (
            {"type": "move", "symbol": "AAPL", "pct": -100, "window_s": 60},
            "invalid_value",
            "pct must be non-zero, above -100 and at most 1000 (2.0: a rise of 2% or more, -2.0: a fall of 2% or more), got -100",
        ),
        (
            {"type": "spread", "symbol": "AAPL"},
            "missing_field",
            "a 'spread' rule needs 'max_spread' (absolute) or 'max_spread_bps' (basis points of mid)",
        ),
        (
            {"type": "spread", "symbol": "AAPL", "max_spread": 1, "max_spread_bps": 5},
            "invalid_value",
            "give either 'max_spread' or 'max_spread_bps', not both",
        ),
        (
            {"type": "stale", "symbol": "AAPL", "seconds": 0.5},
            "invalid_value",
            "seconds must be between 1 and 604800, got 0.5",
        ),
        (
            {"type": "stale", "symbol": "AAPL", "seconds": 10, "cooldown_s": 5},
            "invalid_value",
            "cooldown_s applies to re-arming rules: set one_shot to false",
        ),
        (
            {"type": "stale", "symbol": "AAPL", "seconds": 10, "one_shot": "no"},
            "invalid_value",
            "one_shot must be true or false, got 'no'",
        ),
        (
            {"type": "stale", "symbol": "AAPL", "seconds": 10, "name": 7},
            "invalid_value",
            "name must be a string of at most 100 characters",
        ),
        (
            {"type": "above", "symbol": "AAPL", "level": 1, "webhook": "ftp://x.example/h"},
            "invalid_webhook",
            "webhook must be an http:// or https:// URL with a host, got 'ftp://x.example/h'",
        ),
        (
            {"type": "above", "symbol": "AAPL", "level": 1, "webhook": "http://x.example:99999/h"},
            "invalid_webhook",
            "webhook 'http://x.example:99999/h' is not a valid URL",
        ),
        (
            {"type": "above", "symbol": "AAPL", "level": 1, "webhook": "https://evil.example/h"},
            "webhook_host_not_allowed",
            "webhook host 'evil.example' is not allowed (allowed: hooks.example.com)",
        ),
    ],
)
async def test_validation_errors(payload: Any, code: str, message: str) -> None:
    e = engine(webhook_allowed_hosts=["hooks.example.com"])
    with pytest.raises(RuleError) as info:
        e.create("ann", payload)
    assert (info.value.code, info.value.message) == (code, message)
    assert len(e) == 0


async def test_valid_json_bytes_and_an_allowed_webhook() -> None:
    e = engine(webhook_allowed_hosts=["Hooks.Example.com"])
    rule = e.create(
        "ann",
        b'{"type":"move","symbol":" brk.b ","pct":-2,"window_s":300,"name":"dip",'
        b'"one_shot":false,"cooldown_s":60,"webhook":"https://hooks.example.com/a?k=s"}',
    )
    assert (rule.symbol, rule.pct, rule.window_s, rule.name, rule.cooldown_s) == ("BRK.B", -2.0, 300.0, "dip", 60.0)  # type: ignore[union-attr]
    assert rule.created_at == T0 and len(rule.id) == 10 and e.get(rule.id) is rule


async def test_per_user_rule_limit() -> None:
    e = engine(max_rules_per_user=3)
    rules = [e.create("ann", {"type": "above", "symbol": "AAPL", "level": 100 + i}) for i in range(3)]
    with pytest.raises(RuleError) as info:
        e.create("ann", {"type": "above", "symbol": "AAPL", "level": 1})
    assert info.value.code == "rule_limit"
    assert info.value.message == "at most 3 alert rules per user: delete one first"
    e.create("bob", {"type": "above", "symbol": "AAPL", "level": 1})  # another user's own limit
    assert e.remove("bob", rules[0].id) is None  # not bob's
    assert e.remove("ann", rules[0].id) is rules[0]
    e.create("ann", {"type": "below", "symbol": "MSFT", "level": 1})
    assert [r.symbol for r in e.rules("ann")] == ["AAPL", "AAPL", "MSFT"]


async def test_removed_rules_do_not_fire_and_symbols_follow() -> None:
    e = engine()
    feed = Feed(e)
    feed.trade(99.0)
    keep = e.create("ann", {"type": "above", "symbol": "AAPL", "level": 100, "one_shot": False}, cache=feed.cache)
    drop = e.create("ann", {"type": "above", "symbol": "AAPL", "level": 100}, cache=feed.cache)
    e.remove("ann", drop.id)
    assert [a.rule_id for a in feed.trade(101.0)] == [keep.id]
    e.remove("ann", keep.id)  # while cooling
    assert "AAPL" not in e.symbols and len(e) == 0
    assert feed.trade(99.0) == [] and feed.trade(101.0) == []


async def test_watched_symbols_follow_live_rules() -> None:
    events: list[tuple[str, bool]] = []
    now = [T0]
    e = AlertEngine(AlertsConfig(), clock=lambda: now[0], on_watch=lambda s, on: events.append((s, on)))
    feed = Feed(e)
    feed.trade(99.0)
    one = e.create("ann", {"type": "above", "symbol": "AAPL", "level": 100}, cache=feed.cache, pins=True)
    e.create("ann", {"type": "stale", "symbol": "MSFT", "seconds": 5}, pins=True)
    e.create("bob", {"type": "above", "symbol": "AAPL", "level": 200}, cache=feed.cache, pins=True)
    e.create("cid", {"type": "above", "symbol": "AMD", "level": 200}, cache=feed.cache)  # a non-admin's: no pin
    assert events == [("AAPL", True), ("MSFT", True)] and "AMD" in e.symbols
    assert feed.trade(150.0) and set(e.symbols) == {"AAPL", "MSFT", "AMD"}
    assert e.check_stale(T0 + 5_000)
    assert events[-1] == ("MSFT", False) and set(e.symbols) == {"AAPL", "AMD"}  # its only rule fired (one-shot)
    assert feed.trade(210.0)
    assert events[-1] == ("AAPL", False) and set(e.symbols) == {"AMD"} and feed.trade(300.0) == []
    assert [r.state for r in e.rules("ann")] == ["fired", "fired"] and len(e) == 4  # still listed
    assert e.remove("ann", one.id) is one and len(events) == 4


# ------------------------------------------------------------------------------ store
async def test_store_round_trip_and_fired_state_survives_a_restart(tmp_path: Any) -> None:
    e = engine()
    feed = Feed(e)
    feed.trade(99.0)
    app = AppStore(tmp_path)
    store = AlertStore(app, keep_fired=3)
    once = e.create(
        "ann", {"type": "above", "symbol": "AAPL", "level": 100, "webhook": "http://h.example/x"}, cache=feed.cache
    )
    again = e.create(
        "ann",
        {"type": "above", "symbol": "AAPL", "level": 100, "one_shot": False, "cooldown_s": 3600},
        cache=feed.cache,
    )
    gone = e.create("bob", {"type": "spread", "symbol": "MSFT", "max_spread_bps": 25})
    for rule in (once, again, gone):
        await store.save_rule(rule)
    assert await store.delete_rule(gone.id) and not await store.delete_rule(gone.id)
    alerts = feed.trade(100.0)
    assert len(alerts) == 2
    for alert in alerts:
        await store.record_fired(alert, e.get(alert.rule_id))
    await app.aclose()

    # A new process: a new AppStore and AlertStore on the same file.
    app2 = AppStore(tmp_path)
    store2 = AlertStore(app2)
    loaded = await store2.load()
    assert [(r.id, r.state, r.fire_count) for r in loaded] == [(once.id, "fired", 1), (again.id, "cooling", 1)]
    assert loaded[0] == once and loaded[0].webhook == "http://h.example/x"
    e2 = engine()
    e2.load(loaded)
    feed2 = Feed(e2)
    feed2.ts = feed.ts
    # The one-shot rule stays fired; the re-arming one is cooling for an hour (event time).
    assert feed2.trades(99.0, 101.0, 99.0) == [[], [], []]
    (alert,) = feed2.trade(101.0, after=3600)
    assert alert.rule_id == again.id
    history = await store2.fired("ann")
    assert [a.rule_id for a in history] == [alerts[1].rule_id, alerts[0].rule_id]  # newest first
    assert history[0] == alerts[1]
    await app2.aclose()


async def test_fired_history_is_newest_first_limited_and_pruned(tmp_path: Any) -> None:
    app = AppStore(tmp_path)
    store = AlertStore(app, keep_fired=5)
    e = engine()
    feed = Feed(e)
    rule = e.create("ann", {"type": "below", "symbol": "AAPL", "level": 5, "one_shot": False})
    await store.save_rule(rule)
    fired: list[FiredAlert] = []
    for price in (10, 4) * 8:
        for alert in feed.trade(price):
            fired.append(alert)
            await store.record_fired(alert, rule)
    assert len(fired) == 8  # every 4 (below 5 after 10)
    assert [a.id for a in await store.fired("ann", limit=3)] == [a.id for a in fired[::-1][:3]]
    assert [a.id for a in await store.fired("ann", limit=50)] == [a.id for a in fired[::-1][:5]]
    assert await store.fired("ann", rule_id="nope") == [] and await store.fired("bob") == []
    (stored,) = await store.load()
    assert stored.fire_count == 8 and stored.state == "cooling"
    await app.aclose()


# ------------------------------------------------------------------------------ webhooks
# The receivers are on loopback, which webhooks reach only when the operator trusts it.
LOOPBACK = ["127.0.0.0/8"]


class Receiver:
    """A tiny HTTP/1.1 server (h11 over trio.serve_tcp) that records requests and answers ``status``.

    ``status=None``: never answers (a hung receiver)."""

    def __init__(self, status: int | None = 200) -> None:
        self.status = status
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        self.got = trio.Event()
        self.url = ""

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        headers: dict[str, str] = {}
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    body = b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.requests.append((trio.current_time(), headers, body))
                    self.got.set()
                    if self.status is None:
                        await trio.sleep_forever()
                    reply = conn.send(h11.Response(status_code=self.status, headers=[("content-length", "0")]))
                    await stream.send_all(reply + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                else:  # ConnectionClosed
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return


@pytest.fixture
async def receivers(nursery: trio.Nursery) -> AsyncIterator[Any]:
    async def start(status: int | None = 200) -> Receiver:
        receiver = Receiver(status)
        listeners = await nursery.start(partial(trio.serve_tcp, receiver.handle, 0, host="127.0.0.1"))
        receiver.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/hook/secret-token"
        return receiver

    yield start


def an_alert(rule_id: str = "r1") -> FiredAlert:
    return FiredAlert(
        id=f"a-{rule_id}",
        rule_id=rule_id,
        owner="ann",
        symbol="AAPL",
        name="n",
        rule={"type": "above", "level": 190.0, "field": "last"},
        price=190.05,
        value=190.05,
        fired_at=T0 + 5,
        timestamp=T0,
        message="AAPL last crossed above 190.00 at 190.05",
    )


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


async def test_webhook_posts_the_alert_json(nursery: trio.Nursery, receivers: Any) -> None:
    good = await receivers()
    sender = WebhookSender(AlertsConfig(webhook_trusted_networks=LOOPBACK))
    await nursery.start(sender.run)
    alert = an_alert()
    assert sender.offer(alert, good.url)
    await sender.wait_idle()
    ((_, headers, body),) = good.requests
    assert json.loads(body) == json.loads(msgspec.json.encode(alert))
    assert json.loads(body)["type"] == "alert" and json.loads(body)["message"] == alert.message
    assert headers["content-type"] == "application/json" and headers["x-alert-id"] == alert.id
    assert sender.stats.as_dict() == {"delivered": 1, "failed": 0, "dropped": 0, "retries": 0, "refused": 0}


async def test_failing_receiver_is_retried_on_schedule_without_holding_up_others(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, receivers: Any, caplog: Any
) -> None:
    bad, good = await receivers(500), await receivers(200)
    sender = WebhookSender(
        AlertsConfig(webhook_trusted_networks=LOOPBACK, webhook_attempts=5, webhook_timeout=5),
        backoff=1.0,
        backoff_cap=4.0,
    )
    await nursery.start(sender.run)
    start = trio.current_time()
    assert sender.offer(an_alert("bad"), bad.url)
    await bad.got.wait()
    assert sender.offer(an_alert("good"), good.url)
    await good.got.wait()
    # The healthy receiver got its alert while the bad one was still being retried.
    assert len(bad.requests) < 5 and sender.stats.failed == 0 and sender.stats.delivered <= 1
    await sender.wait_idle()
    assert [t - start for t, _, _ in bad.requests] == [0, 1, 3, 7, 11]  # 1, 2, 4, then capped at 4
    assert sender.stats.as_dict() == {"delivered": 1, "failed": 1, "dropped": 0, "retries": 4, "refused": 0}
    given_up = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    origin = bad.url.rsplit("/hook", 1)[0]  # the log leaves out the URL's path (secrets live there)
    assert given_up == [f"[WEBHOOK] alert a-bad to {origin} given up after 5 attempts: HTTP 500"]


async def test_refused_connections_and_hung_receivers_give_up_after_all_attempts(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, receivers: Any
) -> None:
    hung, good = await receivers(None), await receivers(200)
    sender = WebhookSender(
        AlertsConfig(webhook_trusted_networks=LOOPBACK, webhook_attempts=3, webhook_timeout=10), backoff=2.0
    )
    await nursery.start(sender.run)
    start = trio.current_time()
    for i in range(4):  # more than per_host: they wait for each other, not for the good host
        sender.offer(an_alert(f"hung{i}"), hung.url)
    sender.offer(an_alert("refused"), closed_port_url())
    sender.offer(an_alert("good"), good.url)
    await good.got.wait()
    assert trio.current_time() == start and sender.stats.failed == 0
    await sender.wait_idle()
    assert sender.stats.as_dict() == {"delivered": 1, "failed": 5, "dropped": 0, "retries": 10, "refused": 0}
    # Two at a time to the hung host (per_host), each attempt cut at 10 s, then 2 s and 4 s of
    # backoff, waiting for the host's slots in turn.
    assert [t - start for t, _, _ in hung.requests] == [0, 0, 10, 10, 20, 20, 30, 30, 40, 40, 50, 50]


async def test_a_4xx_is_not_retried(nursery: trio.Nursery, receivers: Any) -> None:
    gone = await receivers(404)
    sender = WebhookSender(AlertsConfig(webhook_trusted_networks=LOOPBACK))
    await nursery.start(sender.run)
    sender.offer(an_alert(), gone.url)
    await sender.wait_idle()
    assert len(gone.requests) == 1 and sender.stats.failed == 1 and sender.stats.retries == 0


async def test_offer_never_blocks_full_queue_drops_and_hosts_are_checked() -> None:
    sender = WebhookSender(
        AlertsConfig(webhook_trusted_networks=LOOPBACK, webhook_queue=2, webhook_allowed_hosts=["127.0.0.1"])
    )
    assert sender.offer(an_alert("1"), "http://127.0.0.1:1/x")
    assert sender.offer(an_alert("2"), "http://127.0.0.1:1/x")
    assert not sender.offer(an_alert("3"), "http://127.0.0.1:1/x")  # not running: the queue is full
    assert not sender.offer(an_alert("4"), "http://elsewhere.example/x")
    assert (sender.pending, sender.stats.dropped, sender.stats.refused) == (2, 1, 1)


async def test_the_state_that_decides_the_next_crossing_is_saved_and_restored(tmp_path: Any) -> None:
    """Issue 22, case 3: armed -> active is saved as it happens; a stored active rule loads active."""
    e = engine()
    feed = Feed(e)
    feed.trade(125.0)
    app = AppStore(tmp_path)
    store = AlertStore(app)
    rule = e.create("ann", {"type": "above", "symbol": "AAPL", "level": 120}, cache=feed.cache)
    await store.save_rule(rule)
    assert rule.state == "armed" and e.take_changed() == []
    feed.trade(121.0)  # still beyond: nothing changes
    assert e.take_changed() == []
    feed.trade(109.0)  # the near side: active, to be saved
    assert [r.id for r in e.take_changed()] == [rule.id] and e.take_changed() == []
    await store.save_state(rule)
    gone = e.create("ann", {"type": "above", "symbol": "AAPL", "level": 130}, cache=feed.cache)
    assert e.remove("ann", gone.id) is gone
    await store.save_state(gone)  # a deleted rule is not brought back by a late state write
    await app.aclose()

    app2 = AppStore(tmp_path)
    loaded = await AlertStore(app2).load()
    await app2.aclose()
    assert [(r.id, r.state) for r in loaded] == [(rule.id, "active")]
    e2 = engine()
    e2.load(loaded)  # no price known yet: the stored state stands
    assert e2.get(rule.id) is not None and e2.get(rule.id).state == "active"  # type: ignore[union-attr]
    feed2 = Feed(e2)
    feed2.ts = feed.ts
    assert fired_at(feed2.trades(121.0, 122.0)) == [0]  # the crossing that spanned the restart, once
