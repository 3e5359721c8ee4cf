"""/metrics, parsed with prometheus_client's own parser, moves with the traffic."""

from __future__ import annotations

import trio
from conftest import FMP_KEY
from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_show_counters_moving_under_load(start_relay, ws_connect, http):
    relay = await start_relay(sim={"rate": 200.0})
    first = _samples((await http.get(f"{relay.http_url}/metrics")).text)
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
        for _ in range(100):
            await client.recv()
        response = await http.get(f"{relay.http_url}/metrics")
    # Exactly one media type and one charset: strict scrapers refuse "charset=utf-8; charset=utf-8".
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    now = _samples(response.text)
    assert now[("trio_relay_updates_in_total", ())] > first[("trio_relay_updates_in_total", ())]
    assert now[("trio_relay_messages_out_total", ())] >= 100
    assert now[("trio_relay_clients", ())] == 1
    assert now[("trio_relay_upstream_up", ())] == 1
    assert now[("trio_relay_upstream_state", (("state", "connected"),))] == 1
    assert now[("trio_relay_upstream_state", (("state", "auth_failed"),))] == 0
    assert now[("trio_relay_build_info", (("provider", "sim"), ("version", "0.1.0")))] == 1
    assert now[("trio_relay_client_queue_depth_count", ())] == 1
    assert now[("trio_relay_bars_late_total", ())] == 0  # no bar subscription: no bars built
    delivered = now[("trio_relay_delivery_latency_seconds_count", ())]
    assert delivered > 0 and now[("trio_relay_delivery_latency_seconds_bucket", (("le", "+Inf"),))] == delivered
    # Bounded labels: nothing per client or per symbol.
    # Bounded label sets only ("reason" and "status" of the edge: a handful of values each).
    assert not any(
        dict(labels).keys() - {"state", "le", "version", "provider", "reason", "status"} for _name, labels in now
    )
    assert FMP_KEY not in response.text
