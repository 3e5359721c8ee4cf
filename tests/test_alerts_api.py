"""Alerts through the real relay: rules over REST and WebSocket, firing to the owner, webhooks, restarts."""

from __future__ import annotations

import json
from typing import Any

import trio
from conftest import api, fmp_sections, make_config

from trio_relay.alerts import AlertStore
from trio_relay.appstore import AppStore
from trio_relay.daemon import Relay, run_relay


def sections(fake: Any, tmp_path: Any) -> dict[str, dict[str, Any]]:
    out = fmp_sections(fake)
    out["alerts"] = {
        "enabled": True,
        "data_dir": str(tmp_path / "data"),
        "webhook_attempts": 2,
        "webhook_trusted_networks": ["127.0.0.0/8"],  # the test's receiver is on loopback
    }
    return out


def trade(symbol: str, price: float, t: int) -> str:
    return f'{{"s":"{symbol.lower()}","t":{t},"type":"T","lp":{price},"ls":10}}'


async def wait_price(relay: Relay, symbol: str, price: float) -> None:
    """Wait (on a hub callback, not a timer) until ``symbol``'s cached last price is ``price``."""
    arrived = trio.Event()

    def check(_: Any) -> None:
        state = relay.hub.cache.get(symbol)
        if state is not None and state.last_price == price:
            arrived.set()

    unregister = relay.hub.add_callback(check)
    try:
        check(None)
        await arrived.wait()
    finally:
        unregister()


class Receiver:
    """A loopback HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.port = 0
        self._got = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        async with stream:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += await stream.receive_some(65536)
            self.bodies.append(json.loads(body))
            self._got.set()
            await stream.send_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    async def wait(self, n: int) -> None:
        while len(self.bodies) < n:
            self._got = trio.Event()
            await self._got.wait()


async def test_a_rule_fires_once_at_the_crossing_to_its_owner_and_its_webhook(
    start_relay, fake_fmp, ws_connect, http, tmp_path, nursery
):
    fake_fmp.rate = 0.0
    receiver = Receiver()
    listeners = await nursery.start(trio.serve_tcp, receiver.handle, 0)
    receiver.port = listeners[0].socket.getsockname()[1]
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    owner = await ws_connect(relay)
    with trio.fail_after(10):
        created = await owner.request(
            {
                "action": "alert_create",
                "rule": {
                    "type": "above",
                    "symbol": "aapl",
                    "level": 190,
                    "webhook": f"http://127.0.0.1:{receiver.port}/hook",
                },
            },
            "alert_created",
        )
        await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)  # a rule's symbol is wanted upstream
        for i, price in enumerate([185.0, 189.99, 192.5, 195.0, 188.0, 191.0]):  # a gap jumps over 190
            await fake_fmp.inject(trade("AAPL", price, 1_700_000_000_000 + i * 1000))
        alert, seen = await owner.recv_until(lambda m: m.get("type") == "alert")
        listed = await owner.request({"action": "alerts"}, "alerts")
        await receiver.wait(1)
        rest = (await http.get(api(relay, "/alerts"))).json()
    rule = created["rule"]
    assert rule["type"] == "above" and rule["symbol"] == "AAPL" and rule["id"]
    assert alert["rule_id"] == rule["id"] and alert["price"] == 192.5 and alert["symbol"] == "AAPL"
    assert receiver.bodies[0]["id"] == alert["id"] and receiver.bodies[0]["price"] == 192.5
    assert [r["id"] for r in listed["rules"]] == [rule["id"]]
    assert [f["id"] for f in rest["fired"]] == [alert["id"]]


async def test_rules_over_rest_validation_and_restart(start_relay, fake_fmp, http, tmp_path):
    fake_fmp.rate = 0.0
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    with trio.fail_after(10):
        bad = await http.post(api(relay, "/alerts"), json={"type": "sideways", "symbol": "AAPL"})
        missing = await http.post(api(relay, "/alerts"), json={"type": "below", "symbol": "AAPL"})
        ok = await http.post(api(relay, "/alerts"), json={"type": "below", "symbol": "MSFT", "level": 300})
        rule_id = ok.json()["id"]
        relay.shutdown()
        again = await start_relay(**sections(fake_fmp, tmp_path))
        listed = (await http.get(api(again, "/alerts"))).json()
        deleted = await http.delete(api(again, f"/alerts/{rule_id}"))
        gone = await http.delete(api(again, f"/alerts/{rule_id}"))
    assert bad.status_code == 422 and bad.json()["error"] == "unknown_type"
    assert missing.status_code == 422 and missing.json()["error"] == "missing_field"
    assert ok.status_code == 200
    assert [r["id"] for r in listed["rules"]] == [rule_id]  # survived the restart
    assert deleted.status_code == 200 and gone.status_code == 404


async def test_a_crossing_that_spans_a_restart_fires_once(fake_fmp, ws_connect, http, tmp_path):
    """Issue 22, case 3: a rule waiting to cross keeps that state across a clean restart.

    ``above 110`` created while the price is 109 is active at once; ``above 120`` created at 125
    is armed, and becomes active (saved) when the price falls to 109. After the restart, 111 fires
    the first exactly once, 121 the second, and nothing fires again.
    """
    fake_fmp.rate = 0.0
    t = 1_700_000_000_000
    with trio.fail_after(20):
        async with trio.open_nursery() as first:
            relay = await first.start(run_relay, make_config(**sections(fake_fmp, tmp_path)))
            near = (
                await http.post(api(relay, "/alerts"), json={"type": "above", "symbol": "AAPL", "level": 120})
            ).json()
            await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)
            await fake_fmp.inject(trade("AAPL", 125.0, t))
            await wait_price(relay, "AAPL", 125.0)
            await fake_fmp.inject(trade("AAPL", 109.0, t + 1_000))
            await wait_price(relay, "AAPL", 109.0)
            waiting = (
                await http.post(api(relay, "/alerts"), json={"type": "above", "symbol": "AAPL", "level": 110})
            ).json()
            before = {r["id"]: r["state"] for r in (await http.get(api(relay, "/alerts"))).json()["rules"]}
            relay.shutdown()  # the nursery waits for the whole shutdown: every store write done
        async with trio.open_nursery() as second:
            relay = await second.start(run_relay, make_config(**sections(fake_fmp, tmp_path)))
            after = {r["id"]: r["state"] for r in (await http.get(api(relay, "/alerts"))).json()["rules"]}
            owner = await ws_connect(relay)
            await owner.request({"action": "alerts"}, "alerts")  # connected as the owner before any price
            await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)
            for i, price in enumerate([111.0, 112.0, 121.0, 122.0]):
                await fake_fmp.inject(trade("AAPL", price, t + 10_000 + i * 1_000))
            fired = []
            while len(fired) < 2:
                alert, _ = await owner.recv_until(lambda m: m.get("type") == "alert")
                fired.append((alert["rule_id"], alert["price"]))
            relay.shutdown()  # every fired alert is stored by the end of it
    app = AppStore(tmp_path / "data")
    stored = await AlertStore(app).fired(near["owner"])
    await app.aclose()
    assert before == {near["id"]: "active", waiting["id"]: "active"}
    assert after == before  # not "armed": the state that decides the next crossing survived
    assert fired == [(waiting["id"], 111.0), (near["id"], 121.0)]
    assert sorted((a.rule_id, a.price) for a in stored) == sorted(fired)  # each fired once, not again at 112 or 122


async def test_with_auth_off_each_browser_has_its_own_alerts(start_relay, fake_fmp, ws_connect, http, tmp_path):
    """Two browsers (their own ids) and an old client (none): each sees and is told of its own rules only."""
    fake_fmp.rate = 0.0
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    ids = {"a": "browser-a-0123456789abcdef", "b": "browser-b-0123456789abcdef"}
    a = await ws_connect(relay, f"?browser={ids['a']}")
    b = await ws_connect(relay, f"?browser={ids['b']}")
    plain = await ws_connect(relay)
    rule = {"type": "above", "symbol": "AAPL", "level": 280}
    with trio.fail_after(10):
        made = await a.request({"action": "alert_create", "rule": rule}, "alert_created")
        b_made = await b.request({"action": "alert_create", "rule": {**rule, "level": 300}}, "alert_created")
        me = await a.request({"action": "auth", "token": "x"}, "authenticated")
        await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)
        for i, price in enumerate([279.0, 281.0]):
            await fake_fmp.inject(trade("AAPL", price, 1_700_000_000_000 + i * 1000))
        alert, _ = await a.recv_until(lambda m: m.get("type") == "alert")
        lists = [(await c.request({"action": "alerts"}, "alerts"))["rules"] for c in (a, b, plain)]
        # REST: the same owners through the header.
        rest_a = (await http.get(api(relay, "/alerts"), headers={"X-Relay-Browser": ids["a"]})).json()
        rest_plain = (await http.get(api(relay, "/alerts"))).json()
        bad_rest = await http.get(api(relay, "/alerts"), headers={"X-Relay-Browser": "short"})
        # b's socket got no alert of a's: its next message is the reply to a ping.
        await b.send({"action": "ping"})
        pong, _ = await b.recv_until(lambda m: m.get("type") in ("pong", "alert"))
    assert alert["rule_id"] == made["rule"]["id"]
    assert me["subject"].startswith("browser:") and ids["a"] not in me["subject"]  # a hash, never the id
    assert [r["id"] for r in lists[0]] == [made["rule"]["id"]]
    assert [r["id"] for r in lists[1]] == [b_made["rule"]["id"]]
    assert lists[2] == []  # "anonymous" sees neither
    assert [r["id"] for r in rest_a["rules"]] == [made["rule"]["id"]] and rest_plain["rules"] == []
    assert [f["rule_id"] for f in rest_a["fired"]] == [made["rule"]["id"]]
    assert bad_rest.status_code == 400 and bad_rest.json()["error"] == "invalid_browser"
    assert pong["type"] == "pong"


async def test_a_bad_browser_id_is_refused_at_the_handshake(start_relay, http):
    relay = await start_relay()
    url = relay.http_url + "/api/v2/realtime/ws/prices?browser=no!"
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
    headers["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
    with trio.fail_after(10):
        response = await http.get(url, headers=headers)
    assert response.status_code == 400 and response.json()["error"] == "invalid_browser"
