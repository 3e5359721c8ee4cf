"""The relay on the FMP provider, against the fake FMP server, over real loopback sockets."""

from __future__ import annotations

import json
import logging

import pytest
import trio
from conftest import FMP_KEY, api, fmp_sections, wait_state


async def test_upstream_subscription_follows_demand(start_relay, fake_fmp, ws_connect):
    relay = await start_relay(**fmp_sections(fake_fmp))
    a = await ws_connect(relay)
    b = await ws_connect(relay)
    with trio.fail_after(10):
        await a.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL", "MSFT"})
        await b.request({"action": "subscribe", "symbols": ["MSFT", "TSLA"]}, "subscribed")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL", "MSFT", "TSLA"})
        # MSFT is still wanted by b: only AAPL goes.
        await a.request({"action": "unsubscribe", "symbols": ["AAPL", "MSFT"]}, "unsubscribed")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"MSFT", "TSLA"})
        # A client that disconnects releases its symbols.
        await b.ws.aclose()
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == set())
    # Tickers went upstream in lower case, once each.
    assert ("subscribe", ("AAPL", "MSFT")) in fake_fmp.history
    assert [h for h in fake_fmp.history if h[0] == "subscribe" and "MSFT" in h[1]] == [("subscribe", ("AAPL", "MSFT"))]


async def test_fmp_frames_are_normalised_for_clients(start_relay, fake_fmp, ws_connect):
    relay = await start_relay(**fmp_sections(fake_fmp))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)
        await fake_fmp.inject(
            '{"s":"aapl","t":1699564800123456789,"type":"T","lp":189.45,"ls":1000,"ap":null,"as":null,"bp":null,"bs":null}'
        )
        msg, _ = await client.recv_until(lambda m: m.get("last_price") == 189.45)
    assert msg["symbol"] == "AAPL" and msg["timestamp"] == 1699564800123 and msg["data_type"] == "T"
    assert msg["last_size"] == 1000


async def test_drop_mid_stream_reconnects_and_resubscribes(start_relay, fake_fmp, ws_connect, http):
    relay = await start_relay(**fmp_sections(fake_fmp, backoff_initial=0.05, backoff_max=0.2, pinned=["IBM"]))
    client = await ws_connect(relay)
    with trio.fail_after(15):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        before, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL", "IBM"})
        assert await fake_fmp.drop_all() == 1
        await fake_fmp.wait_until(lambda: fake_fmp.logins == 2 and fake_fmp.subscriptions == {"AAPL", "IBM"})
        # The same client connection keeps receiving, with seq continuing upwards.
        after, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > before["seq"] + 5)
        status = (await http.get(api(relay, "/status"))).json()
    assert after["type"] == "price_update"
    assert status["upstream"]["reconnects"] == 1 and status["upstream"]["state"] == "connected"
    assert fake_fmp.connections_total == 2


async def test_wrong_key_reports_auth_failed_and_never_logs_the_key(start_relay, fake_fmp, http, all_logs):
    sections = fmp_sections(fake_fmp)
    sections["fmp"]["api_key"] = "wrong-key-8c1d2e3f4a5b"
    relay = await start_relay(**sections)
    with trio.fail_after(10):
        await fake_fmp.wait_until(lambda: fake_fmp.failed_logins >= 1)
        await wait_state(relay, "auth_failed")
        health = await http.get(api(relay, "/health"))
        status = await http.get(api(relay, "/status"))
    assert health.status_code == 503
    body = health.json()
    assert body["state"] == "auth_failed" and body["status"] == "unavailable"
    assert "auth_failed" in body["reason"] and "Unauthorized" in body["reason"]
    # The relay did send the key upstream...
    assert fake_fmp.received_keys == ["wrong-key-8c1d2e3f4a5b"]
    # ...and it appears nowhere else.
    for text in [health.text, status.text, *[r.getMessage() for r in all_logs.records], all_logs.text]:
        assert "wrong-key-8c1d2e3f4a5b" not in text
    assert any("[AUTH]" in r.getMessage() and r.levelno == logging.ERROR for r in all_logs.records)


async def test_malformed_upstream_frames_are_counted_not_fatal(start_relay, fake_fmp, ws_connect, http):
    relay = await start_relay(**fmp_sections(fake_fmp))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)
        fake_fmp.send_malformed(6)
        first, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
        while relay.hub.stats.malformed < 6:
            await client.recv()
        later, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > first["seq"])
        status = (await http.get(api(relay, "/status"))).json()
    assert status["messages"]["malformed"] == 6
    assert status["upstream"]["reconnects"] == 0 and fake_fmp.connections_total == 1


async def test_health_is_503_while_upstream_is_down(start_relay, http):
    # Nothing listens on this port: the relay keeps retrying and says so.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    relay = await start_relay(
        upstream={"provider": "fmp", "backoff_initial": 0.05, "backoff_max": 0.1},
        fmp={"api_key": FMP_KEY, "url": f"ws://127.0.0.1:{port}"},
    )
    with trio.fail_after(10):
        while relay.upstream.reconnects < 2:
            await trio.testing.wait_all_tasks_blocked()
        health = await http.get(api(relay, "/health"))
    assert health.status_code == 503
    assert health.json()["state"] in ("backoff", "connecting")
    assert "reason" in health.json()


async def test_live_and_ready_follow_the_upstream(start_relay, fake_fmp, http):
    sections = fmp_sections(fake_fmp)
    sections["fmp"]["api_key"] = "wrong-key-1234567890"
    relay = await start_relay(**sections)
    with trio.fail_after(10):
        await fake_fmp.wait_until(lambda: fake_fmp.failed_logins >= 1)
        await wait_state(relay, "auth_failed")
        live = await http.get(api(relay, "/health/live"))
        ready = await http.get(api(relay, "/health/ready"))
    assert live.status_code == 200 and live.json()["status"] == "ok"
    assert ready.status_code == 503
    assert ready.json()["code"] == "auth_failed" and "Unauthorized" in ready.json()["reason"]
    good = await start_relay(**fmp_sections(fake_fmp))
    with trio.fail_after(10):
        await wait_state(good, "connected")
        ok = await http.get(api(good, "/health/ready"))
    assert ok.status_code == 200 and "code" not in ok.json()


async def test_connected_from_another_location_is_fatal_with_a_long_cooldown(start_relay, fake_fmp, ws_connect, http):
    """FMP kicks the session (same key used elsewhere): auth_failed, subscriptions cleared, no quick retry."""
    relay = await start_relay(**fmp_sections(fake_fmp, auth_retry_delay=300.0, backoff_initial=0.01))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL"})
        await fake_fmp.inject('{"event":"login","status":401,"message":"Connected from another location"}')
        await wait_state(relay, "auth_failed")
        await fake_fmp.wait_until(lambda: not fake_fmp.connections)
        health = (await http.get(api(relay, "/health"))).json()
    upstream = relay.upstream
    assert upstream.subscribed == set()  # the session's state is gone; the next one subscribes afresh
    assert "Connected from another location" in upstream.last_error
    assert health["code"] == "auth_failed" and "Connected from another location" in health["reason"]
    # The next attempt waits auth_retry_delay (±10% jitter), not the 10 ms backoff.
    assert upstream.next_attempt_at is not None
    assert 270.0 <= upstream.next_attempt_at - trio.current_time() <= 330.0
    assert fake_fmp.connections_total == 1
    # The client is still connected and still subscribed, waiting for data to resume.
    assert relay.hub.demand.wanted == {"AAPL"} and len(relay.hub.clients) == 1


@pytest.mark.parametrize(
    "endpoint, symbol, frame",
    [
        (
            "crypto",
            "BTCUSD",
            '{"s":"btcusd","t":1699564800123,"e":"binance","type":"Q","ap":37010.5,"as":0.25,"bp":37010.1,"bs":1.5}',
        ),
        (
            "forex",
            "EURUSD",
            '{"s":"eurusd","t":1699564800123,"type":"Q","ap":1.0712,"as":1000000,"bp":1.0711,"bs":2000000}',
        ),
    ],
)
async def test_crypto_and_forex_endpoints(start_relay, fake_fmp, ws_connect, endpoint, symbol, frame):
    sections = fmp_sections(fake_fmp)
    sections["fmp"]["endpoint"] = endpoint  # the URL override still points at the fake
    relay = await start_relay(**sections)
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": [symbol]}, "subscribed")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {symbol})
        await fake_fmp.inject(frame)
        msg, _ = await client.recv_until(lambda m: m.get("timestamp") == 1699564800123)
    assert ("subscribe", (symbol,)) in fake_fmp.history  # sent as FMP spells it: lower case
    sent = json.loads(frame)
    assert msg["symbol"] == symbol and msg["data_type"] == "Q" and msg["provider"] == "fmp"
    assert (msg["ask_price"], msg["ask_size"], msg["bid_price"], msg["bid_size"]) == (
        sent["ap"],
        sent["as"],
        sent["bp"],
        sent["bs"],
    )


async def test_trade_break_reaches_clients_as_a_correction(start_relay, fake_fmp, ws_connect):
    """A B frame is data_type B naming the broken trade; a broken last trade gives way to the one before."""
    fake_fmp.rate = 0.0  # only the frames injected here
    relay = await start_relay(**fmp_sections(fake_fmp))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["IBM"]}, "subscribed")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"IBM"})
        await fake_fmp.inject('{"s":"ibm","t":1699564800100,"type":"T","lp":150.0,"ls":100}')
        await fake_fmp.inject('{"s":"ibm","t":1699564800200,"type":"B","lp":149.0,"ls":7}')
        trade, _ = await client.recv_until(lambda m: m.get("data_type") == "T")
        unknown, _ = await client.recv_until(lambda m: m.get("data_type") == "B")
        await fake_fmp.inject('{"s":"ibm","t":1699564800300,"type":"T","lp":151.0,"ls":50}')
        await fake_fmp.inject('{"s":"ibm","t":1699564800400,"type":"B","lp":151.0,"ls":50}')
        await client.recv_until(lambda m: m.get("last_price") == 151.0)
        last, _ = await client.recv_until(lambda m: m.get("data_type") == "B")
    assert (trade["last_price"], trade["last_size"]) == (150.0, 100)
    # A break of a trade the relay never saw changes nothing but names what was broken.
    assert unknown["amends"] == {
        "action": "break", "trade_id": None, "price": 149.0, "size": 7, "corrected_id": None,
        "corrected_price": None, "corrected_size": None, "matched": "unknown",
    }  # fmt: skip
    assert (unknown["last_price"], unknown["last_size"], unknown["timestamp"]) == (150.0, 100, 1699564800200)
    assert unknown["seq"] == trade["seq"] + 1
    # The last trade broken (matched by price and size: FMP has no ids): the one before is back.
    assert last["amends"]["matched"] == "last" and (last["last_price"], last["last_size"]) == (150.0, 100)
    cached = relay.hub.snapshot("IBM")
    assert cached is not None and cached.last_price == 150.0 and cached.data_type == "B"


async def test_a_stalled_feed_is_503_and_stale_everywhere_until_data_flows(start_relay, fake_fmp, ws_connect, http):
    """Connection up, logins answered, no data: never "connected", however often it reconnects.

    /health, /status, /metrics and the clients' status messages all say stale from the first
    stale_after to the first tick after the stall; then everything says up again.
    """
    relay = await start_relay(**fmp_sections(fake_fmp, stale_after=1.0, backoff_initial=0.05, backoff_max=0.1))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await client.recv_until(lambda m: m.get("type") == "price_update")
        assert (await http.get(api(relay, "/health"))).status_code == 200
        fake_fmp.stall()
        logins = fake_fmp.logins
        status, _ = await client.recv_until(lambda m: m.get("type") == "status" and m.get("scope") == "upstream")
        assert status["state"] == "stale"
        # Three reconnects into the stall: each logs in again, and each stays stale.
        for n in range(1, 4):
            await fake_fmp.wait_until(lambda: fake_fmp.logins >= logins + n)
            await wait_state(relay, "stale")
            health = await http.get(api(relay, "/health"))
            assert health.status_code == 503, health.text
            assert health.json()["code"] == "stale" and health.json()["state"] == "stale"
            status_body = (await http.get(api(relay, "/status"))).json()
            assert status_body["upstream"]["state"] == "stale"
            metrics = (await http.get(f"{relay.http_url}/metrics")).text
            assert "trio_relay_upstream_up 0.0" in metrics
            assert 'trio_relay_upstream_state{state="stale"} 1.0' in metrics
        fake_fmp.resume()
        back, between = await client.recv_until(
            lambda m: m.get("type") == "status" and m.get("scope") == "upstream" and m.get("state") == "up"
        )
        # Nothing in between told the client the upstream was up.
        assert not [m for m in between if m.get("type") == "status" and m.get("state") == "up"]
        await client.recv_until(lambda m: m.get("type") == "price_update")
        await wait_state(relay, "connected")
        assert (await http.get(api(relay, "/health"))).status_code == 200


async def test_the_ack_has_a_previous_close_only_where_the_provider_knows_one(start_relay, fake_fmp, ws_connect):
    """The simulated market knows each symbol's previous close and the ack says it; FMP's stream does not."""
    fmp = await start_relay(**fmp_sections(fake_fmp))
    sim = await start_relay(upstream={"provider": "sim"}, sim={"seed": 7})
    with trio.fail_after(10):
        from_fmp = await (await ws_connect(fmp)).request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        from_sim = await (await ws_connect(sim)).request(
            {"action": "subscribe", "symbols": ["AAPL", "EURUSD"]}, "subscribed"
        )
    assert "prev_close" not in from_fmp
    closes = from_sim["prev_close"]
    assert set(closes) == {"AAPL", "EURUSD"}
    assert 150 < closes["AAPL"] < 450 and 0.9 < closes["EURUSD"] < 1.5  # the instruments' levels
