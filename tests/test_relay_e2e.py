"""End to end over real sockets: Hypercorn serving the real app, real WebSocket clients."""

from __future__ import annotations

import trio

from conftest import api, wait_cached

PRICE_FIELDS = {
    "type", "symbol", "timestamp", "data_type", "last_price", "last_size",
    "ask_price", "ask_size", "bid_price", "bid_size", "cached_at", "seq",
}


async def test_subscribe_ack_snapshot_then_live_updates(start_relay, ws_connect):
    relay = await start_relay(upstream={"pinned": ["AAPL"]})
    # Wait until the pinned symbol has a cached price, so the client must get a snapshot.
    with trio.fail_after(5):
        await wait_cached(relay, "AAPL")
    client = await ws_connect(relay)
    with trio.fail_after(5):
        await client.send({"action": "subscribe", "symbols": ["aapl"]})
        ack = await client.recv()
        assert ack == {"type": "subscribed", "symbols": ["AAPL"]}
        snapshot = await client.recv()
        assert snapshot["type"] == "price_update" and snapshot["symbol"] == "AAPL"
        assert set(snapshot) == PRICE_FIELDS
        live = await client.recv()
        assert live["symbol"] == "AAPL" and live["seq"] > snapshot["seq"]
        assert live["data_type"] in ("T", "Q")
        assert live["bid_price"] < live["ask_price"]
