"""Duplicate trades: dropped by trade id (bounded per symbol), counted in /metrics, over real feeds."""

from __future__ import annotations

import trio
from conftest import api

from trio_relay.model import Update
from trio_relay.providers.dedup import MAX_SYMBOLS, WINDOW, TradeIds
from trio_relay.testing.fake_polygon import FakePolygonServer


def test_a_repeat_within_the_window_is_seen_per_symbol() -> None:
    ids = TradeIds()
    assert not ids.seen("AAPL", "4:1")
    assert ids.seen("AAPL", "4:1")
    assert not ids.seen("MSFT", "4:1")  # ids are per symbol
    assert not ids.seen("AAPL", "5:1")  # ...and per exchange (Polygon's x:i)


def test_the_memory_is_bounded() -> None:
    ids = TradeIds()
    for i in range(WINDOW + 1):
        assert not ids.seen("AAPL", str(i))
    assert not ids.seen("AAPL", "0")  # pushed out of the window: no longer remembered
    assert ids.seen("AAPL", str(WINDOW))
    ids.forget("AAPL")
    assert not ids.seen("AAPL", str(WINDOW)) and len(ids) == 1
    ids.clear()
    for i in range(MAX_SYMBOLS):
        ids.seen(f"S{i}", "1")
    assert len(ids) == MAX_SYMBOLS
    ids.seen("ONE-MORE", "1")
    assert len(ids) == 1  # past the cap everything is forgotten, never more held


async def test_polygon_duplicates_in_a_frame_reach_nobody_and_are_counted(start_relay, ws_connect, http) -> None:
    async with FakePolygonServer.open(api_keys=["k"], rate=50.0, duplicate_trades=True) as fake:
        relay = await start_relay(
            upstream={"provider": "polygon", "unsubscribe_linger": 0.0},
            polygon={"api_key": "k", "url": fake.url, "market": "stocks"},
        )
        seen: list[Update] = []
        relay.hub.add_callback(seen.append)
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
            while relay.hub.stats.duplicate_trades < 5:
                await client.recv()
            metrics = (await http.get(f"{relay.http_url}/metrics")).text
            status = (await http.get(api(relay, "/status"))).json()
    trade_ids = [u.trade_id for u in seen if u.kind == "T"]
    assert trade_ids and len(trade_ids) == len(set(trade_ids))  # every trade once, never twice
    counted = relay.hub.stats.duplicate_trades
    assert 5 <= counted <= fake.duplicates_sent
    value = next(line for line in metrics.splitlines() if line.startswith("trio_relay_duplicate_trades_total"))
    assert float(value.split()[1]) >= 5
    assert status["messages"]["duplicate_trades"] >= 5
