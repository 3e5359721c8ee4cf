"""Live bars over the client WebSocket ("channel": "bars"), at the hub and through the real relay."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trio_relay.config import ClientsConfig
from trio_relay.hub import Client, Demand, Hub, Stats
from trio_relay.model import Update, ws_payload

SECOND = 1_000


@asynccontextmanager
async def open_hub(**clients: Any) -> AsyncIterator[Hub]:
    async with Hub.open(ClientsConfig(**clients), Demand(linger=0.0), Stats()) as hub:
        yield hub


def trade(ts: int, price: float, size: float = 10, symbol: str = "AAPL") -> Update:
    return Update(symbol, "T", ts, last_price=price, last_size=size)


async def pending(client: Client) -> list[dict[str, Any]]:
    if not len(client.outbox):
        return []
    with trio.fail_after(1):
        return [json.loads(ws_payload(m)) for m in await client.outbox.get()]


def future_second() -> int:
    """A whole second a little ahead of the wall clock (so the clock-based close leaves it open)."""
    return (time.time_ns() // 1_000_000 // SECOND + 30) * SECOND


def arrive(hub: Hub, update: Update, recv_ms: int) -> None:
    """``update`` published as if the hub had received it at wall-clock ``recv_ms``."""
    hub.received_ms = recv_ms
    hub.publish(update)


async def test_completed_bars_reach_bar_subscribers_only() -> None:
    async with open_hub() as hub:
        bars_client, ticks_client = hub.connect(), hub.connect()
        hub.bars.subscribe(bars_client, ["AAPL"], "1s")
        hub.subscribe(ticks_client, ["AAPL"])
        assert hub.demand.wanted == {"AAPL"}
        ack = await pending(bars_client)
        await pending(ticks_client)
        t0 = future_second()
        for update in (
            trade(t0 - 300, 99.0),  # first trade seen: its second may have missed trades
            trade(t0, 100.0, 5),  # opens the first whole bar
            trade(t0 + 400, 103.0, 10),
            trade(t0 + 600, 98.0, 5),
            Update("AAPL", "Q", t0 + 700, bid_price=1.0, ask_price=2.0),  # no effect on bars
            trade(t0 + 999, 101.0, 20),
            trade(t0 + 1000, 102.0, 1),  # closes [t0, t0+1s): not complete before t0 + 4 s
        ):
            arrive(hub, update, update.timestamp)
        got = await pending(bars_client)
        ticks = await pending(ticks_client)
    assert ack == [{"type": "subscribed", "symbols": ["AAPL"], "channel": "bars", "interval": "1s"}]
    assert got == [
        {
            "type": "bar",
            "symbol": "AAPL",
            "interval": "1s",
            "start_ms": t0,
            "open": 100.0,
            "high": 103.0,
            "low": 98.0,
            "close": 101.0,
            "volume": 40.0,
            "trades": 4,
            "vwap": (100 * 5 + 103 * 10 + 98 * 5 + 101 * 20) / 40,
            "complete": False,
        }
    ]  # the partial bar of the first trade's second was never sent
    assert all(m["type"] != "bar" for m in ticks) and len(ticks) == 7


async def test_late_trades_within_the_lateness_are_sent_as_amendments_never_conflated() -> None:
    """Issue 22, case 1, live: the late trade reaches the bar (and /bars counts it the same way)."""
    async with open_hub(outbox_size=2) as hub:
        client = hub.connect()
        hub.bars.subscribe(client, ["AAPL"], "1s")
        await pending(client)
        t0 = future_second()
        arrive(hub, trade(t0, 100.0, 5), t0)
        arrive(hub, trade(t0 + 1_200, 101.0, 5), t0 + 1_200)  # closes [t0, t0+1s)
        # Stamped inside the closed bar, arriving before its end + grace (2 s) + lateness (1 s).
        arrive(hub, trade(t0 + 500, 97.0, 10), t0 + 3_500)
        arrive(hub, trade(t0 + 600, 96.0, 10), t0 + 3_999)
        arrive(hub, trade(t0 + 700, 1.0, 10), t0 + 4_000)  # too late: in no 1s bar
        got = await pending(client)
        late = hub.bars.late
    assert [(m["start_ms"], m["low"], m["trades"], m["complete"], m.get("amended", False)) for m in got] == [
        (t0, 100.0, 1, False, False),
        (t0, 97.0, 2, False, True),
        (t0, 96.0, 3, False, True),
    ]  # more than the outbox holds: bars are never conflated
    assert late == 1


async def test_the_open_bar_is_sent_once_a_second_while_it_changes(autojump_clock) -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.bars.subscribe(client, ["AAPL"], "1m")
        await pending(client)
        t0 = (future_second() // 60_000 + 1) * 60_000
        hub.bars.clock = lambda: t0 + int(trio.current_time() * 1000)  # virtual wall clock
        arrive(hub, trade(t0 - 1, 1.0), t0 - 1)
        arrive(hub, trade(t0, 50.0), t0)
        await trio.sleep(1.5)  # virtual time (MockClock): half a beat off the channel's 1 s rounds
        first = await pending(client)
        await trio.sleep(1.0)  # virtual time (MockClock): nothing changed, nothing sent
        unchanged = await pending(client)
        arrive(hub, trade(t0 + 5_000, 51.0), t0 + 3_000)
        await trio.sleep(1.0)  # virtual time (MockClock)
        second = await pending(client)
    assert [(m["complete"], m["close"], m["trades"]) for m in first] == [(False, 50.0, 1)]
    assert unchanged == []
    assert [(m["complete"], m["close"], m["trades"]) for m in second] == [(False, 51.0, 2)]


async def test_the_clock_closes_a_quiet_bar_then_completes_it_after_its_lateness(autojump_clock) -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.bars.subscribe(client, ["AAPL"], "1s")
        await pending(client)
        t0 = future_second()
        hub.bars.clock = lambda: t0 + int(trio.current_time() * 1000)  # virtual wall clock
        arrive(hub, trade(t0 - 1, 1.0), t0 - 1)
        arrive(hub, trade(t0 + 100, 50.0), t0 + 100)
        seen: list[tuple[int, bool]] = []  # (clock when it was read, complete)
        for _ in range(16):
            await trio.sleep(0.5)  # virtual time (MockClock)
            seen += [(hub.bars.clock(), m["complete"]) for m in await pending(client)]
    # Closed by the clock once past its end + grace (t0+1 s + 2 s), within the channel's 1 s beat;
    # complete once past the 1 s of lateness too, and nothing after.
    [(open_at, still_open), (closed_at, closed), (final_at, final)] = seen
    assert not still_open and open_at < t0 + 3_000  # the bar in progress, at the channel's beat
    assert not closed and t0 + 3_000 <= closed_at < t0 + 4_000
    assert final and t0 + 4_000 <= final_at < t0 + 5_000
    assert not closed and t0 + 3_000 <= closed_at < t0 + 4_000
    assert final and t0 + 4_000 <= final_at < t0 + 5_000


async def test_unsubscribing_bars_releases_the_symbol() -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.bars.subscribe(client, ["AAPL", "MSFT"], "1m")
        hub.bars.subscribe(client, ["AAPL"], "5m")
        assert client.bars == {("AAPL", "1m"), ("MSFT", "1m"), ("AAPL", "5m")}
        hub.bars.unsubscribe(client, ["AAPL"], None)  # every interval
        assert client.bars == {("MSFT", "1m")} and hub.demand.wanted == {"MSFT"}
        assert "AAPL" not in hub.bars.symbols
        hub.disconnect(client)
        assert hub.demand.wanted == set() and hub.bars.symbols == {} and hub.bars.subs == {}


async def test_bars_count_towards_the_symbol_limit() -> None:
    from trio_relay.hub import SubscriptionError

    async with open_hub(max_symbols_per_client=3) as hub:
        client = hub.connect()
        hub.subscribe(client, ["A", "B"])
        hub.bars.subscribe(client, ["A"], "1m")
        try:
            hub.bars.subscribe(client, ["B"], "1m")
        except SubscriptionError as exc:
            assert exc.code == "symbol_limit"
        else:
            raise AssertionError("the 4th subscription should exceed the limit of 3")


async def test_bars_channel_through_the_relay(start_relay, ws_connect):
    relay = await start_relay(sim={"rate": 400.0, "trade_ratio": 1.0})
    client = await ws_connect(relay)
    with trio.fail_after(15):
        ack = await client.request(
            {"action": "subscribe", "symbols": ["AAPL"], "channel": "bars", "interval": "1s"}, "subscribed"
        )
        bar, before = await client.recv_until(lambda m: m.get("type") == "bar" and m["complete"])
        listing = await client.request({"action": "list"}, "subscriptions")
        bad = await client.request(
            {"action": "subscribe", "symbols": ["AAPL"], "channel": "bars", "interval": "2m"}, "subscribed"
        )
        other = await client.request({"action": "subscribe", "symbols": ["AAPL"], "channel": "candles"}, "subscribed")
        gone = await client.request({"action": "unsubscribe", "symbols": ["AAPL"], "channel": "bars"}, "unsubscribed")
    assert ack == {"type": "subscribed", "symbols": ["AAPL"], "channel": "bars", "interval": "1s"}
    assert bar["symbol"] == "AAPL" and bar["start_ms"] % 1000 == 0 and bar["trades"] > 0
    assert bar["low"] <= bar["open"] <= bar["high"] and bar["low"] <= bar["close"] <= bar["high"]
    assert all(m.get("type") != "price_update" for m in before)  # ticks were not asked for
    assert listing == {"type": "subscriptions", "symbols": [], "bars": {"1s": ["AAPL"]}}
    assert bad["code"] == "invalid_interval" and other["code"] == "invalid_channel"
    assert gone["channel"] == "bars" and relay.hub.demand.wanted == set()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_an_interval_subscribed_later_starts_with_its_own_first_trade() -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.bars.subscribe(client, ["AAPL"], "1s")
        await pending(client)
        t0 = (future_second() // 60_000 + 1) * 60_000
        arrive(hub, trade(t0 + 100, 10.0), t0 + 100)
        hub.bars.subscribe(client, ["AAPL"], "1m")  # the 1m builder has not seen t0+100
        await pending(client)
        arrive(hub, trade(t0 + 1_100, 11.0), t0 + 1_100)
        arrive(hub, trade(t0 + 60_100, 12.0), t0 + 60_100)
        got = [(m["interval"], m["start_ms"] - t0, m["trades"]) for m in await pending(client)]
    # Whole bars only: for 1s from t0+1 s (the second of t0+100 ms began before it), and the
    # minute t0 lacks the trade at t0+100 ms for 1m bars: closed by t0+60.1 s, never sent.
    assert got == [("1s", 1_000, 1)]
