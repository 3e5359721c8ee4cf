"""End to end over real sockets: Hypercorn serving the real app, real WebSocket clients."""

from __future__ import annotations

import trio
from conftest import api, wait_cached

PRICE_FIELDS = {
    "type",
    "symbol",
    "timestamp",
    "data_type",
    "last_price",
    "last_size",
    "ask_price",
    "ask_size",
    "bid_price",
    "bid_size",
    "cached_at",
    "seq",
    "provider",
    "epoch",
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
        assert ack == {"type": "subscribed", "symbols": ["AAPL"], "prev_close": {"AAPL": ack["prev_close"]["AAPL"]}}
        assert isinstance(ack["prev_close"]["AAPL"], float)  # the simulated market's previous close
        snapshot = await client.recv()
        assert snapshot["type"] == "price_update" and snapshot["symbol"] == "AAPL"
        assert set(snapshot) == PRICE_FIELDS
        live = await client.recv()
        assert live["symbol"] == "AAPL" and live["seq"] > snapshot["seq"]
        assert snapshot["provider"] == live["provider"] == "sim"
        assert live["data_type"] in ("T", "Q")
        assert live["bid_price"] < live["ask_price"]


def _prices(messages, symbol=None):
    return [m for m in messages if m.get("type") == "price_update" and (symbol is None or m["symbol"] == symbol)]


async def test_two_clients_get_only_their_own_symbols(start_relay, ws_connect):
    relay = await start_relay()
    a = await ws_connect(relay)
    b = await ws_connect(relay)
    with trio.fail_after(10):
        assert (await a.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed"))["symbols"] == ["AAPL"]
        assert (await b.request({"action": "subscribe", "symbols": ["MSFT", "IBM"]}, "subscribed"))["symbols"] == [
            "MSFT",
            "IBM",
        ]
        got_a = [await a.recv() for _ in range(30)]
        got_b = [await b.recv() for _ in range(30)]
    assert {m["symbol"] for m in got_a} == {"AAPL"}
    assert {m["symbol"] for m in got_b} == {"MSFT", "IBM"}


async def test_unsubscribe_stops_delivery(start_relay, ws_connect):
    relay = await start_relay()
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
        await client.recv_until(lambda m: m.get("symbol") == "AAPL")
        ack = await client.request({"action": "unsubscribe", "symbols": ["aapl"]}, "unsubscribed")
        assert ack == {"type": "unsubscribed", "symbols": ["AAPL"]}
        after = [await client.recv() for _ in range(40)]
    assert _prices(after, "MSFT") and not _prices(after, "AAPL")
    listed = await client.request({"action": "list"}, "subscriptions")
    assert listed == {"type": "subscriptions", "symbols": ["MSFT"]}


async def test_sequence_numbers_increase_per_symbol(start_relay, ws_connect):
    relay = await start_relay()
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT", "NVDA"]}, "subscribed")
        got = [await client.recv() for _ in range(60)]
    last: dict[str, int] = {}
    for msg in got:
        assert msg["seq"] > last.get(msg["symbol"], 0)
        last[msg["symbol"]] = msg["seq"]


BAD_INPUTS = [
    ("not json at all", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('"subscribe"', "invalid_message"),
    ('{"symbols": ["AAPL"]}', "missing_field"),
    ('{"action": "explode"}', "unknown_action"),
    ('{"action": 7}', "unknown_action"),
    ('{"action": "subscribe"}', "missing_field"),
    ('{"action": "subscribe", "symbols": "AAPL"}', "invalid_symbols"),
    ('{"action": "subscribe", "symbols": []}', "invalid_symbols"),
    ('{"action": "subscribe", "symbols": [1, 2]}', "invalid_symbols"),
    ('{"action": "subscribe", "symbols": ["AA PL"]}', "invalid_symbols"),
    ('{"action": "subscribe", "symbols": ["$$$"]}', "invalid_symbols"),
    ('{"action": "subscribe", "symbols": ["ABCDEFGHIJKLMNOPQRSTUVWXYZ"]}', "invalid_symbols"),
    ('{"action": "unsubscribe", "symbols": null}', "missing_field"),
]


async def test_bad_input_gets_error_frame_and_connection_stays_up(start_relay, ws_connect):
    relay = await start_relay()
    client = await ws_connect(relay)
    with trio.fail_after(10):
        for text, code in BAD_INPUTS:
            await client.send(text)
            reply = await client.recv()
            assert reply["type"] == "error", text
            assert reply["code"] == code, (text, reply)
            assert reply["message"]
        too_many = [f"S{i}" for i in range(51)]
        reply = await client.request({"action": "subscribe", "symbols": too_many}, "error")
        assert reply["code"] == "too_many_symbols" and "50" in reply["message"]
        # A binary frame that is not UTF-8.
        await client.ws.send_message(b"\xff\xfe\xfd")
        assert (await client.recv())["code"] == "invalid_json"
        # Still alive and nothing was subscribed by the bad requests.
        assert await client.request({"action": "ping"}, "pong") == {"type": "pong"}
        assert await client.request({"action": "list"}, "subscriptions") == {"type": "subscriptions", "symbols": []}
        assert (await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed"))["symbols"] == ["AAPL"]
    assert relay.hub.demand.wanted == {"AAPL"}


async def test_per_client_symbol_cap(start_relay, ws_connect):
    relay = await start_relay(clients={"max_symbols_per_client": 3})
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["A", "B"]}, "subscribed")
        reply = await client.request({"action": "subscribe", "symbols": ["C", "D"]}, "error")
        assert reply["code"] == "symbol_limit" and "3" in reply["message"]
        listed = await client.request({"action": "list"}, "subscriptions")
        assert listed["symbols"] == ["A", "B"]


async def test_oversized_client_frame_is_refused(start_relay, ws_connect):
    relay = await start_relay(clients={"max_message_size": 1024})
    client = await ws_connect(relay)
    await client.send("x" * 5000)
    with trio.fail_after(5):
        try:
            await client.recv()
        except Exception as exc:  # the server closes with 1009 (message too big)
            assert getattr(getattr(exc, "reason", None), "code", None) == 1009
        else:
            raise AssertionError("an oversized frame must close the connection")


async def test_batch_mode_sends_arrays(start_relay, ws_connect):
    relay = await start_relay(sim={"rate": 200.0})
    client = await ws_connect(relay, "?batch=1")
    with trio.fail_after(10):
        await client.send({"action": "subscribe", "symbols": ["AAPL", "MSFT"]})
        frames = [await client.recv() for _ in range(20)]
    assert all(isinstance(f, list) and f for f in frames)
    flat = [m for f in frames for m in f]
    assert flat[0]["type"] == "subscribed" and flat[0]["symbols"] == ["AAPL", "MSFT"]
    assert set(flat[0]["prev_close"]) == {"AAPL", "MSFT"}
    assert {m["symbol"] for m in _prices(flat)} == {"AAPL", "MSFT"}


async def test_batch_mode_can_be_asked_for_in_subscribe(start_relay, ws_connect):
    relay = await start_relay()
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.send({"action": "subscribe", "symbols": ["AAPL"], "batch": True})
        frames = [await client.recv() for _ in range(3)]
    assert all(isinstance(f, list) for f in frames)


# ----------------------------------------------------------------------------- REST


async def test_rest_health_and_status(start_relay, ws_connect, http):
    relay = await start_relay(upstream={"pinned": ["IBM"]})
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await client.recv_until(lambda m: m.get("symbol") == "AAPL")
        health = await http.get(api(relay, "/health"))
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok" and body["provider"] == "sim" and body["state"] == "connected"
        assert {"last_message_age_s", "reconnects"} <= set(body)
        status = (await http.get(api(relay, "/status"))).json()
    assert status["provider"] == "sim"
    up = status["upstream"]
    assert up["state"] == "connected" and up["connected_since"].endswith("Z") and up["reconnects"] == 0
    assert set(up["subscribed"]) == {"AAPL", "IBM"}
    assert status["pinned"] == ["IBM"]
    assert status["clients"]["count"] == 1
    assert status["clients"]["subscriptions"][0]["symbols"] == 1
    assert status["messages"]["in"] > 0 and status["messages"]["out"] > 0
    assert {"dropped", "conflated", "malformed"} <= set(status["messages"])


async def test_rest_subscribe_pins_and_unsubscribe_unpins(start_relay, http):
    relay = await start_relay()
    with trio.fail_after(10):
        r = await http.post(api(relay, "/subscribe"), json=["ibm", "MSFT"])
        assert r.status_code == 200
        assert r.json()["symbols"] == ["IBM", "MSFT"] and r.json()["pinned"] == ["IBM", "MSFT"]
        await wait_cached(relay, "IBM")
        cached = await http.get(api(relay, "/cache/ibm"))
        assert cached.status_code == 200 and cached.json()["symbol"] == "IBM"
        everything = (await http.get(api(relay, "/cache"))).json()
        assert everything["count"] >= 1 and "IBM" in everything["data"]
        r = await http.post(api(relay, "/unsubscribe"), json={"symbols": ["IBM", "TSLA"]})
        assert r.status_code == 200
        assert r.json()["symbols"] == ["IBM"] and r.json()["not_pinned"] == ["TSLA"]
        assert r.json()["pinned"] == ["MSFT"]
    assert "IBM" not in relay.hub.demand.wanted and "MSFT" in relay.hub.demand.wanted


async def test_rest_errors_are_json(start_relay, http):
    relay = await start_relay()
    with trio.fail_after(10):
        missing = await http.get(api(relay, "/cache/NOPE"))
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        cases = [
            (b"[1", 400, "invalid_json"),
            (b'"AAPL"', 422, "invalid_symbols"),
            (b"[]", 422, "invalid_symbols"),
            (b'["AA PL"]', 422, "invalid_symbols"),
            (b"", 422, "missing_field"),
            (b'{"nosymbols": 1}', 422, "missing_field"),
            (("[" + ",".join(f'"S{i}"' for i in range(51)) + "]").encode(), 422, "too_many_symbols"),
        ]
        for body, status, code in cases:
            r = await http.post(api(relay, "/subscribe"), content=body, headers={"Content-Type": "application/json"})
            assert (r.status_code, r.json()["error"]) == (status, code), body
            assert "Traceback" not in r.text
        unknown = await http.get(f"{relay.http_url}/no/such/route")
        assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
        wrong_method = await http.get(api(relay, "/subscribe"))
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()


async def test_a_reload_keeps_the_engine_until_a_restart(start_relay) -> None:
    import attrs

    relay = await start_relay()
    new = attrs.evolve(relay.config, engine=attrs.evolve(relay.config.engine, backend="redis"))
    changes = relay.reload(new)
    assert "engine settings need a restart: kept as they were" in changes
    assert relay.config.engine.backend == "memory"


async def test_a_reload_keeps_the_bars_lateness_until_a_restart(start_relay) -> None:
    import attrs

    relay = await start_relay()
    new = attrs.evolve(relay.config, bars=attrs.evolve(relay.config.bars, lateness_1m=60.0))
    changes = relay.reload(new)
    assert "bars settings need a restart: kept as they were" in changes
    assert relay.config.bars.lateness_1m == 5.0
    assert relay.hub.bars.builders["1m"].lateness.allowed("1m") == 5_000
