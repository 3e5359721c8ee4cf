"""A relay fed by another relay: the seam worker processes (and later other hosts) use."""

from __future__ import annotations

import trio
from conftest import fmp_sections


async def test_downstream_relay_follows_demand_over_one_upstream_connection(start_relay, fake_fmp, ws_connect):
    feeder = await start_relay(**fmp_sections(fake_fmp))
    worker_a = await start_relay(
        upstream={"provider": "relay", "unsubscribe_linger": 0.0}, relay={"url": feeder.ws_url}
    )
    worker_b = await start_relay(
        upstream={"provider": "relay", "unsubscribe_linger": 0.0}, relay={"url": feeder.ws_url}
    )
    a = await ws_connect(worker_a)
    b = await ws_connect(worker_b)
    with trio.fail_after(10):
        await a.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await b.request({"action": "subscribe", "symbols": ["MSFT"]}, "subscribed")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL", "MSFT"})
        got_a, _ = await a.recv_until(lambda m: m.get("symbol") == "AAPL" and m.get("data_type") == "T")
        got_b, _ = await b.recv_until(lambda m: m.get("symbol") == "MSFT")
        # The worker's cache holds the whole state it was sent (trade and book alike).
        await a.recv_until(
            lambda m: m.get("symbol") == "AAPL" and m["bid_price"] is not None and m["last_price"] is not None
        )
        await b.ws.aclose()
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL"})
    assert fake_fmp.connections_total == 1, "workers must not open their own provider connections"
    assert got_a["last_price"] is not None and got_b["symbol"] == "MSFT"
    assert worker_a.upstream.state == "connected" and worker_a.upstream.provider.name == "relay"
