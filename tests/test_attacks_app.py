"""Attacks on the application, as an attacker's script would make them, over real sockets.

The relay runs for real (daemon, Hypercorn, the native WebSocket, a fake FMP upstream that speaks
FMP's protocol); each test tries one side door and asserts that it is shut and that nothing else
broke. Covered here: entitlement side doors (a token limited to ["AAPL"]), non-admin pins through
alerts, symbol budgets, absurd query numbers, deep JSON, masked provider errors, file modes.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import stat
from functools import partial
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trio.testing
from conftest import JsonWsClient, api, fmp_sections, wait_cached, wait_state
from test_alerts import an_alert, receivers  # noqa: F401  (a fixture)
from test_alerts_api import trade
from test_auth import auth_sections, connect, token

from trio_relay.alerts import WebhookPolicy, WebhookRefused, WebhookSender
from trio_relay.alerts.targets import refusal
from trio_relay.alerts.webhook import _Job
from trio_relay.config import AlertsConfig
from trio_relay.masking import mask_secrets
from trio_relay.private_files import open_private
from trio_relay.testing.fake_fmp import FakeFmpServer

ADMIN = "relay:admin"


def sections(fake: Any, tmp_path: Any, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {**fmp_sections(fake), **auth_sections()}
    out["alerts"] = {"enabled": True, "data_dir": str(tmp_path / "data")}
    out.update(extra)
    return out


def bearer(**claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(claims)}"}


async def authed(relay: Any, nursery: trio.Nursery, **claims: Any) -> JsonWsClient:
    client = await connect(relay, nursery)
    reply = await client.request({"action": "auth", "token": token(claims)}, "authenticated")
    assert reply["type"] == "authenticated", reply
    return client


# ------------------------------------------------------------------------- portfolios


async def test_a_portfolio_cannot_hold_a_symbol_the_token_does_not_allow(start_relay, fake_fmp, http, tmp_path):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    aapl_only = bearer(symbols=["AAPL"])
    with trio.fail_after(10):
        created = await http.post(
            api(relay, "/portfolios"),
            headers=aapl_only,
            json={"name": "main", "positions": [{"symbol": "MSFT", "quantity": 10, "cost_basis": 100}]},
        )
        ok = await http.post(
            api(relay, "/portfolios"),
            headers=aapl_only,
            json={"name": "mine", "positions": [{"symbol": "AAPL", "quantity": 10, "cost_basis": 100}]},
        )
        put = await http.put(
            api(relay, "/portfolios/mine/positions/MSFT"), headers=aapl_only, json={"quantity": 1, "cost_basis": 1}
        )
        listed = await http.get(api(relay, "/portfolios"), headers=aapl_only)
    assert (
        created.status_code == 403
        and created.json()["error"] == "forbidden_symbols"
        and "MSFT" in created.json()["message"]
    )
    assert put.status_code == 403 and put.json()["error"] == "forbidden_symbols"
    assert ok.status_code == 200
    assert [[p["symbol"] for p in f["positions"]] for f in listed.json()["portfolios"]] == [["AAPL"]]


async def test_a_portfolio_holding_a_refused_symbol_shows_no_price_over_rest_or_websocket(
    start_relay, fake_fmp, http, tmp_path, nursery
):
    fake_fmp.rate = 0.0
    relay = await start_relay(
        **sections(
            fake_fmp, tmp_path, upstream={"provider": "fmp", "unsubscribe_linger": 0.0, "pinned": ["MSFT", "AAPL"]}
        )
    )
    # Made while alice's token allowed MSFT; her token now allows AAPL only.
    wide, narrow = bearer(symbols=["AAPL", "MSFT"]), bearer(symbols=["AAPL"])
    with trio.fail_after(10):
        await fake_fmp.wait_until(lambda: {"AAPL", "MSFT"} <= fake_fmp.subscriptions)
        await fake_fmp.inject(trade("MSFT", 410.0, 1_700_000_000_000))
        await fake_fmp.inject(trade("AAPL", 190.0, 1_700_000_000_000))
        await wait_cached(relay, "MSFT")
        await wait_cached(relay, "AAPL")
        positions = [{"symbol": s, "quantity": 10, "cost_basis": 100} for s in ("AAPL", "MSFT", "NVDA")]
        made = await http.post(
            api(relay, "/portfolios"), headers=wide, json={"name": "main", "positions": positions[:2]}
        )
        assert made.status_code == 200, made.text
        seen_wide = (await http.get(api(relay, "/portfolios/main"), headers=wide)).json()
        seen_narrow = (await http.get(api(relay, "/portfolios/main"), headers=narrow)).json()

        client = await authed(relay, nursery, symbols=["AAPL"])
        streamed = await client.request(
            {"action": "subscribe", "channel": "portfolio", "portfolio": "main"}, "portfolio"
        )
    by_symbol = {p["symbol"]: p for p in seen_narrow["positions"]}
    assert by_symbol["MSFT"]["entitled"] is False and by_symbol["MSFT"]["price"] is None
    assert by_symbol["MSFT"]["market_value"] is None and by_symbol["MSFT"]["day_open"] is None
    assert by_symbol["AAPL"]["entitled"] is True and by_symbol["AAPL"]["price"] == 190.0
    assert seen_narrow["totals"]["unpriced"] == 1 and seen_narrow["totals"]["market_value"] == 1900.0
    assert {p["symbol"]: p["price"] for p in seen_wide["positions"]} == {"AAPL": 190.0, "MSFT": 410.0}
    streamed_by_symbol = {p["symbol"]: p for p in streamed["positions"]}
    assert streamed_by_symbol["MSFT"]["entitled"] is False and streamed_by_symbol["MSFT"]["price"] is None
    assert "410" not in json.dumps(streamed)


async def test_the_portfolio_channel_never_makes_the_relay_want_a_refused_symbol(
    start_relay, fake_fmp, http, tmp_path, nursery
):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    wide = bearer(symbols=["AAPL", "NVDA"])
    with trio.fail_after(10):
        positions = [{"symbol": s, "quantity": 1, "cost_basis": 1} for s in ("AAPL", "NVDA")]
        assert (
            await http.post(api(relay, "/portfolios"), headers=wide, json={"name": "p", "positions": positions})
        ).status_code == 200
        client = await authed(relay, nursery, symbols=["AAPL"])
        await client.request({"action": "subscribe", "channel": "portfolio", "portfolio": "p"}, "portfolio")
        await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)
    assert "AAPL" in relay.hub.demand.wanted and "NVDA" not in relay.hub.demand.wanted
    assert "NVDA" not in fake_fmp.subscriptions


# ------------------------------------------------------------------------- alerts


async def test_an_alert_on_a_refused_symbol_is_refused_over_rest_and_websocket(
    start_relay, fake_fmp, http, tmp_path, nursery
):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    with trio.fail_after(10):
        rest = await http.post(
            api(relay, "/alerts"), headers=bearer(symbols=["AAPL"]), json={"type": "above", "symbol": "AMD", "level": 1}
        )
        client = await authed(relay, nursery, symbols=["AAPL"])
        ws = await client.request(
            {"action": "alert_create", "rule": {"type": "above", "symbol": "amd", "level": 1}}, "alert_created"
        )
        rules = (await http.get(api(relay, "/alerts"), headers=bearer(symbols=["AAPL"]))).json()["rules"]
    assert rest.status_code == 403 and rest.json()["error"] == "forbidden_symbols"
    assert ws["type"] == "error" and ws["code"] == "forbidden_symbols" and ws["action"] == "alert_create"
    assert rules == [] and "AMD" not in relay.hub.demand.wanted and "AMD" not in fake_fmp.subscriptions


async def test_only_an_admins_alert_holds_its_symbol_upstream(start_relay, fake_fmp, http, tmp_path):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    with trio.fail_after(10):
        user = await http.post(
            api(relay, "/alerts"), headers=bearer(), json={"type": "above", "symbol": "TSLA", "level": 1}
        )
        admin = await http.post(
            api(relay, "/alerts"),
            headers=bearer(sub="root", scope=ADMIN),
            json={"type": "above", "symbol": "IBM", "level": 1},
        )
        await fake_fmp.wait_until(lambda: "IBM" in fake_fmp.subscriptions)
    assert user.status_code == 200 and user.json()["pins"] is False
    assert admin.status_code == 200 and admin.json()["pins"] is True
    assert "IBM" in relay.hub.demand.wanted and "TSLA" not in relay.hub.demand.wanted
    assert "TSLA" not in fake_fmp.subscriptions
    # A client may not set it for itself.
    forged = await http.post(
        api(relay, "/alerts"), headers=bearer(), json={"type": "above", "symbol": "TSLA", "level": 1, "pins": True}
    )
    assert forged.status_code == 422 and forged.json()["error"] == "unknown_field"


async def test_alerts_and_portfolios_count_against_one_symbol_budget(start_relay, fake_fmp, http, tmp_path, nursery):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    headers = bearer(max_symbols=3)

    def position(symbol: str) -> dict[str, Any]:
        return {"symbol": symbol, "quantity": 1, "cost_basis": 1}

    with trio.fail_after(10):
        codes = [
            (
                await http.post(api(relay, "/alerts"), headers=headers, json={"type": "above", "symbol": s, "level": 1})
            ).status_code
            for s in ("AAPL", "MSFT", "AAPL")
        ]
        made = await http.post(
            api(relay, "/portfolios"),
            headers=headers,
            json={"name": "p", "positions": [position("AAPL"), position("IBM")]},
        )
        over = await http.post(
            api(relay, "/portfolios"), headers=headers, json={"name": "q", "positions": [position("AMD")]}
        )
        put = await http.put(
            api(relay, "/portfolios/p/positions/AMD"), headers=headers, json={"quantity": 1, "cost_basis": 1}
        )
        rest = await http.post(
            api(relay, "/alerts"), headers=headers, json={"type": "above", "symbol": "AMD", "level": 1}
        )
        client = await authed(relay, nursery, max_symbols=3)
        ws = await client.request(
            {"action": "alert_create", "rule": {"type": "below", "symbol": "AMD", "level": 1}}, "alert_created"
        )
        held = await client.request(
            {"action": "alert_create", "rule": {"type": "below", "symbol": "IBM", "level": 1}}, "alert_created"
        )
    assert codes == [200, 200, 200]  # a second rule on a held symbol costs nothing
    assert made.status_code == 200  # AAPL (held by an alert) + IBM: 3 symbols in all
    for reply in (over, put, rest):
        assert reply.status_code == 422 and reply.json()["error"] == "symbol_budget", reply.text
    assert "at most 3" in rest.json()["message"]
    assert ws["type"] == "error" and ws["code"] == "symbol_budget"
    assert held["type"] == "alert_created"  # IBM is in a portfolio already


async def test_a_fired_alert_reaches_only_connections_whose_token_allows_its_symbol(
    start_relay, fake_fmp, http, tmp_path, nursery
):
    fake_fmp.rate = 0.0
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    with trio.fail_after(10):
        wide = await authed(relay, nursery, symbols=["AAPL", "MSFT"])
        narrow = await authed(relay, nursery, symbols=["AAPL"])  # the same user, a narrower token
        made = await wide.request(
            {"action": "alert_create", "rule": {"type": "above", "symbol": "MSFT", "level": 400}}, "alert_created"
        )
        assert made["type"] == "alert_created", made
        made = await wide.request(
            {"action": "alert_create", "rule": {"type": "above", "symbol": "AAPL", "level": 200}}, "alert_created"
        )
        await wide.request({"action": "subscribe", "symbols": ["MSFT", "AAPL"]}, "subscribed")
        await fake_fmp.wait_until(lambda: {"AAPL", "MSFT"} <= fake_fmp.subscriptions)
        for i, (symbol, price) in enumerate([("MSFT", 390.0), ("MSFT", 410.0), ("AAPL", 190.0), ("AAPL", 210.0)]):
            await fake_fmp.inject(trade(symbol, price, 1_700_000_000_000 + i * 1000))
        first, _ = await wide.recv_until(lambda m: m.get("type") == "alert")
        second, _ = await wide.recv_until(lambda m: m.get("type") == "alert")
        got, _ = await narrow.recv_until(lambda m: m.get("type") == "alert")
        await narrow.request({"action": "ping"}, "pong")  # anything the relay sent before is read
        while (
            len((await http.get(api(relay, "/alerts"), headers=bearer(symbols=["AAPL", "MSFT"]))).json()["fired"]) < 2
        ):
            await trio.testing.wait_all_tasks_blocked()  # the store writes in the background
        history = (await http.get(api(relay, "/alerts"), headers=bearer(symbols=["AAPL"]))).json()["fired"]
    assert [f["symbol"] for f in history] == ["AAPL"]  # the stored MSFT alert (and its price) is not shown
    assert (first["symbol"], second["symbol"]) == ("MSFT", "AAPL")
    assert got["symbol"] == "AAPL"  # the MSFT alert, sent before it, never reached this connection


# ------------------------------------------------------------------------- the other paths


async def test_cache_history_bars_and_pins_refuse_symbols_the_token_does_not_allow(
    start_relay, fake_fmp, http, tmp_path
):
    relay = await start_relay(
        **sections(fake_fmp, tmp_path), history={"backend": "sqlite", "data_dir": str(tmp_path / "h")}
    )
    narrow = bearer(symbols=["AAPL"])
    with trio.fail_after(10):
        replies = {
            path: await http.get(api(relay, path), headers=narrow)
            for path in ("/cache/MSFT", "/history/MSFT", "/bars/MSFT")
        }
        pin = await http.post(api(relay, "/subscribe"), headers=bearer(symbols=["AAPL"], scope=ADMIN), json=["MSFT"])
        user_pin = await http.post(api(relay, "/subscribe"), headers=narrow, json=["AAPL"])
    for path, reply in replies.items():
        assert reply.status_code == 403 and reply.json()["error"] == "forbidden_symbols", path
    assert pin.status_code == 403 and pin.json()["error"] == "forbidden_symbols"
    assert user_pin.status_code == 403 and user_pin.json()["error"] == "insufficient_scope"
    assert "MSFT" not in relay.hub.demand.wanted


# ------------------------------------------------------------------------- webhooks (SSRF)

REFUSED_TARGETS = [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("2130706433", "loopback"),  # 127.0.0.1 as one number: getaddrinfo accepts it
    ("0x7f.1", "loopback"),
    ("localhost", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("fd00::1", "private"),
    ("100.64.0.1", "shared"),
    ("169.254.169.254", "link-local"),  # the cloud metadata endpoint
    ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("240.0.0.1", "private"),  # reserved 240/4 (Python counts it private)
    ("255.255.255.255", "private"),
    ("192.0.2.1", "private"),  # documentation
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
    ("::ffff:169.254.169.254", "link-local"),
    ("::127.0.0.1", "loopback"),  # IPv4-compatible
    ("::10.0.0.1", "private"),
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
]


@pytest.mark.parametrize("host, why", REFUSED_TARGETS)
async def test_every_non_public_address_class_is_refused_through_the_resolver(host: str, why: str) -> None:
    policy = WebhookPolicy()
    with pytest.raises(WebhookRefused) as info:
        await policy.vet(host, 80)  # literal addresses and /etc/hosts names: nothing leaves the machine
    assert why in str(info.value)
    with pytest.raises(WebhookRefused):  # and at creation, without a resolver
        policy.check_url_host(host)


@pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
async def test_public_addresses_pass(host: str) -> None:
    assert [str(a) for a in await WebhookPolicy().vet(host, 443)]  # classified only: never connected to
    assert refusal(ipaddress.ip_address(host)) is None


async def test_trusted_networks_and_hosts_are_the_only_exceptions() -> None:
    policy = WebhookPolicy.build(["hooks.internal"], ["127.0.0.0/8"])
    assert [str(a) for a in await policy.vet("127.0.0.1", 80)] == ["127.0.0.1"]
    assert policy.address_refusal("hooks.internal", ipaddress.ip_address("10.0.0.1")) is None
    with pytest.raises(WebhookRefused):
        await policy.vet("169.254.169.254", 80)
    with pytest.raises(WebhookRefused):
        await policy.vet("::ffff:10.0.0.1", 80)


async def test_webhooks_to_internal_addresses_are_refused_at_creation_over_rest_and_websocket(
    start_relay, fake_fmp, http, tmp_path, nursery
):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    targets = [
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]:8080/",
        "http://localhost:6379/",
        "http://2130706433/",
        "https://10.0.0.1/hook",
    ]
    with trio.fail_after(10):
        rest = [
            await http.post(
                api(relay, "/alerts"),
                headers=bearer(),
                json={"type": "above", "symbol": "AAPL", "level": 1, "webhook": url},
            )
            for url in targets
        ]
        client = await authed(relay, nursery)
        ws = [
            await client.request(
                {"action": "alert_create", "rule": {"type": "above", "symbol": "AAPL", "level": 1, "webhook": url}},
                "alert_created",
            )
            for url in targets
        ]
        rules = (await http.get(api(relay, "/alerts"), headers=bearer())).json()["rules"]
    assert [(r.status_code, r.json()["error"]) for r in rest] == [(422, "webhook_refused")] * len(targets)
    assert [(m["type"], m["code"]) for m in ws] == [("error", "webhook_refused")] * len(targets)
    assert rules == []


async def test_a_stored_webhook_to_an_internal_address_is_refused_at_connect_time(nursery, tmp_path) -> None:
    """A rule stored before the policy (or a name that now resolves inside): the attempt is refused."""
    hits: list[bytes] = []

    async def receiver(stream: trio.SocketStream) -> None:
        hits.append(await stream.receive_some(65536))

    listeners = await nursery.start(partial(trio.serve_tcp, receiver, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    sender = WebhookSender(AlertsConfig())
    await nursery.start(sender.run)
    assert sender.offer(an_alert(), f"http://127.0.0.1:{port}/hook")
    assert sender.offer(an_alert("r2"), f"http://localhost:{port}/hook")
    with trio.fail_after(10):
        await sender.wait_idle()
    assert hits == [] and sender.stats.refused == 2 and sender.stats.failed == 2 and sender.stats.retries == 0


async def test_an_allow_listed_loopback_receiver_still_gets_the_webhook(
    start_relay, fake_fmp, http, tmp_path, nursery, receivers
):
    fake_fmp.rate = 0.0
    good = await receivers()
    alerts = {"enabled": True, "data_dir": str(tmp_path / "data"), "webhook_trusted_networks": ["127.0.0.1/32"]}
    relay = await start_relay(**sections(fake_fmp, tmp_path, alerts=alerts))
    with trio.fail_after(10):
        made = await http.post(
            api(relay, "/alerts"),
            headers=bearer(scope=ADMIN),
            json={"type": "above", "symbol": "AAPL", "level": 200, "webhook": good.url},
        )
        assert made.status_code == 200, made.text
        await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)
        for i, price in enumerate([190.0, 210.0]):
            await fake_fmp.inject(trade("AAPL", price, 1_700_000_000_000 + i * 1000))
        await good.got.wait()
    ((_, headers, body),) = good.requests
    assert json.loads(body)["symbol"] == "AAPL" and headers["host"] == good.url.split("/")[2]


# ------------------------------------------------------------------------- secrets and files

LEAKY_KEY = "leaky-key-d41d8cd98f00b204"


async def test_a_provider_error_quoting_the_key_is_masked_in_health_status_clients_and_logs(
    start_relay, http, ws_connect, all_logs
):
    async with FakeFmpServer.open(api_keys=["the-right-key"], echo_key=True) as fake:
        sections = fmp_sections(fake)
        sections["fmp"]["api_key"] = LEAKY_KEY
        relay = await start_relay(**sections)
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
            await fake.wait_until(lambda: fake.failed_logins >= 1)
            await wait_state(relay, "auth_failed")
            health = await http.get(api(relay, "/health"))
            status = await http.get(api(relay, "/status"))
            notice, _ = await client.recv_until(lambda m: m.get("type") == "status" and m.get("state") != "up")
    assert fake.received_keys == [LEAKY_KEY]  # the key went upstream, and FMP quoted it back...
    assert "***" in health.json()["reason"] and "Invalid API key" in health.json()["reason"]
    texts = [health.text, status.text, json.dumps(notice), all_logs.text, *[r.getMessage() for r in all_logs.records]]
    for text in texts:  # ...and it is nowhere else
        assert LEAKY_KEY not in text


def test_mask_secrets_masks_every_form() -> None:
    text = f"GET /x?apikey={LEAKY_KEY}&a=1 from http://u:hunter2-pw@h/ key {quote(LEAKY_KEY)} token=abc123"
    masked = mask_secrets(text, [LEAKY_KEY])
    assert LEAKY_KEY not in masked and "hunter2-pw" not in masked and "abc123" not in masked
    assert "a=1" in masked and "http://u:***@h/" in masked


async def test_data_files_are_0600_in_0700_folders(start_relay, fake_fmp, http, tmp_path):
    data, history = tmp_path / "app" / "data", tmp_path / "hist" / "data"
    sections = fmp_sections(fake_fmp, pinned=["AAPL"])
    relay = await start_relay(
        **sections,
        alerts={"enabled": True, "data_dir": str(data)},
        history={"backend": "sqlite", "data_dir": str(history), "flush_interval": 0.05},
    )
    with trio.fail_after(10):
        made = await http.post(api(relay, "/alerts"), json={"type": "above", "symbol": "AAPL", "level": 1})
        assert made.status_code == 200
        while relay.history_writer.written < 5:
            await relay.history_writer.changed()
    for folder in (data, data.parent, history, history.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    files = [p for p in (*data.iterdir(), *history.iterdir()) if p.is_file()]
    assert {p.name for p in files} >= {"app.sqlite3", "history.sqlite3"}
    for path in files:  # the databases and their -wal / -shm files
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_recording_is_created_0600(tmp_path) -> None:
    path = tmp_path / "rec" / "out.jsonl"
    with open_private(path, overwrite=False) as fh:
        fh.write(b"{}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700


# ------------------------------------------------------------------------- absurd input

HUGE = [
    {"end": "9" * 30},
    {"start": "1" * 5000},  # beyond Python's int-from-text limit
    {"end": "99999999999999999999"},  # beyond 64 bits
    {"start": "-9223372036854775809"},
    {"limit": "²"},  # a digit to str.isdigit, not to int()
    {"limit": "9" * 400},
    {"end": "9999-12-31T23:59:59-14:00"},
    {"start": "0001-01-01T00:00:00+14:00"},
]


@pytest.mark.parametrize("params", HUGE)
@pytest.mark.parametrize("path", ["/history/AAPL", "/bars/AAPL"])
async def test_absurd_numbers_in_query_parameters_get_400(start_relay, http, tmp_path, path, params):
    relay = await start_relay(history={"backend": "sqlite", "data_dir": str(tmp_path / "h")})
    with trio.fail_after(10):
        response = await http.get(api(relay, path), params=params)
        cursor = await http.get(api(relay, "/history/AAPL"), params={"cursor": "9" * 25 + ":1"})
        alerts = await http.get(api(relay, "/alerts"), params={"limit": "²"})  # alerts are off: 404, not 500
    assert response.status_code == 400, response.text
    assert response.json()["error"] in ("invalid_range", "invalid_cursor") and "Traceback" not in response.text
    assert alerts.status_code == 404
    assert cursor.status_code == 400 and cursor.json()["error"] == "invalid_cursor"


def deep(n: int) -> str:
    return "[" * n + "]" * n


async def test_deeply_nested_json_gets_a_clear_error_over_rest_and_websocket(
    start_relay, fake_fmp, http, ws_connect, tmp_path
):
    relay = await start_relay(**fmp_sections(fake_fmp), alerts={"enabled": True, "data_dir": str(tmp_path / "d")})
    bomb = '{"symbols":' + deep(20_000) + "}"  # 40 KB: under the body limit, 20,000 deep
    client = await ws_connect(relay)
    with trio.fail_after(10):
        replies = [
            await http.post(api(relay, path), content=bomb, headers={"content-type": "application/json"})
            for path in ("/subscribe", "/alerts", "/portfolios")
        ]
        put = await http.put(
            api(relay, "/portfolios/p/positions/AAPL"), content=bomb, headers={"content-type": "application/json"}
        )
        await client.send('{"action":"subscribe","symbols":' + deep(20_000) + "}")
        error = await client.recv()
        rule = await client.request(
            {"action": "alert_create", "rule": {"type": "above", "symbol": "AAPL", "level": 1, "name": [[[[1]]]]}},
            "alert_created",
        )
        alive = await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
    for reply in [*replies, put]:
        assert reply.status_code in (400, 422) and reply.json()["error"] == "json_too_deep", reply.text
    assert error["type"] == "error" and error["code"] == "json_too_deep"
    assert rule["type"] == "error" and rule["code"] == "invalid_value"
    assert alive["type"] == "subscribed"  # the connection lives on


async def test_a_delivery_connects_to_the_address_it_vetted_not_to_the_name_again() -> None:
    """The DNS-rebinding guard: the request is addressed to the checked IP; the name stays in Host."""
    sender = WebhookSender(AlertsConfig(webhook_trusted_hosts=["localhost"]))
    job_url = "http://localhost:8081/hook?k=1"
    async with httpx.AsyncClient() as client:
        request = await sender._vetted_request(client, _Job("a1", job_url, "http://localhost:8081", b"{}"))
    assert ipaddress.ip_address(request.url.host).is_loopback  # an address, not the name
    assert request.headers["host"] == "localhost:8081" and request.url.path == "/hook" and request.url.query == b"k=1"
    refusing = WebhookSender(AlertsConfig())
    async with httpx.AsyncClient() as client:
        with pytest.raises(WebhookRefused):
            await refusing._vetted_request(client, _Job("a2", job_url, "http://localhost:8081", b"{}"))


def _local_name() -> str | None:
    """A host name that the system resolver maps to a non-public address (this machine's own name)."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
    except OSError:
        return None
    if name.lower() == "localhost" or any(refusal(ipaddress.ip_address(i[4][0])) is None for i in infos):
        return None
    return name


async def test_a_name_that_resolves_inside_is_refused_at_creation_over_rest_and_websocket(
    start_relay, fake_fmp, http, tmp_path, nursery
):
    name = _local_name()
    if name is None:
        pytest.skip("this machine's name does not resolve to a non-public address")
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    rule = {"type": "above", "symbol": "AAPL", "level": 1, "webhook": f"http://{name}:8080/hook"}
    with trio.fail_after(10):
        rest = await http.post(api(relay, "/alerts"), headers=bearer(), json=rule)
        client = await authed(relay, nursery)
        ws = await client.request({"action": "alert_create", "rule": rule}, "alert_created")
        allowed = await client.request(
            {"action": "alert_create", "rule": {**rule, "webhook": "https://8.8.8.8/hook"}}, "alert_created"
        )
    assert (
        rest.status_code == 422
        and rest.json()["error"] == "webhook_refused"
        and "resolves to" in rest.json()["message"]
    )
    assert ws["type"] == "error" and ws["code"] == "webhook_refused" and ws["action"] == "alert_create"
    assert allowed["type"] == "alert_created"  # a public literal: checked, never connected to


# ------------------------------------------------------------------------- heavy queries


async def test_a_bars_request_over_the_budget_gets_a_truncated_page_or_422(start_relay, http, tmp_path):
    from test_history_budget import T0, N, fill

    from trio_relay.history import SqliteBackend

    data = tmp_path / "h"
    fill(SqliteBackend(data))  # 30,000 trades over one hour
    relay = await start_relay(
        history={"backend": "sqlite", "data_dir": str(data), "retention_days": 0, "query_max_rows": 4000}
    )
    window = {"start": T0, "end": T0 + N * 120}
    with trio.fail_after(10):
        minute = await http.get(api(relay, "/bars/AAPL"), params={"interval": "1m", **window})
        rest = await http.get(
            api(relay, "/bars/AAPL"), params={"interval": "1m", **window, "start": minute.json()["next_start"]}
        )
        hour = await http.get(api(relay, "/bars/AAPL"), params={"interval": "1h", **window})
    page = minute.json()
    assert minute.status_code == 200 and page["truncated"] is True and 6 <= page["count"] <= 9
    assert page["next_start"] == page["bars"][-1]["start_ms"] + 60_000
    assert rest.json()["bars"][0]["start_ms"] == page["next_start"]
    assert (
        hour.status_code == 422
        and hour.json()["error"] == "query_too_large"
        and "finer interval" in hour.json()["message"]
    )


async def test_a_refreshed_narrower_token_stops_what_it_no_longer_allows(start_relay, fake_fmp, tmp_path, nursery):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    with trio.fail_after(10):
        client = await authed(relay, nursery, symbols=["AAPL", "MSFT"])
        await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
        await client.request({"action": "auth", "token": token({"symbols": ["AAPL"]})}, "authenticated")
        listing = await client.request({"action": "list"}, "subscriptions")
    assert listing["symbols"] == ["AAPL"]
    assert "MSFT" not in relay.hub.demand.wanted or relay.hub.demand.refcount("MSFT") == 0
