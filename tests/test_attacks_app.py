"""Attacks on the application, as an attacker's script would make them, over real sockets.

The relay runs for real (daemon, Hypercorn, the native WebSocket, a fake FMP upstream that speaks
FMP's protocol); each test tries one side door and asserts that it is shut and that nothing else
broke. Covered here: entitlement side doors (a token limited to ["AAPL"]), non-admin pins through
alerts, symbol budgets, absurd query numbers, deep JSON, masked provider errors, file modes.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from conftest import WsClient, api, fmp_sections, wait_cached
from test_alerts_api import trade
from test_auth import auth_sections, connect, token

ADMIN = "relay:admin"


def sections(fake: Any, tmp_path: Any, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {**fmp_sections(fake), **auth_sections()}
    out["alerts"] = {"enabled": True, "data_dir": str(tmp_path / "data")}
    out.update(extra)
    return out


def bearer(**claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(claims)}"}


async def authed(relay: Any, nursery: trio.Nursery, **claims: Any) -> WsClient:
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
        put = await http.put(api(relay, "/portfolios/mine/positions/MSFT"), headers=aapl_only, json={"quantity": 1, "cost_basis": 1})
        listed = await http.get(api(relay, "/portfolios"), headers=aapl_only)
    assert created.status_code == 403 and created.json()["error"] == "forbidden_symbols" and "MSFT" in created.json()["message"]
    assert put.status_code == 403 and put.json()["error"] == "forbidden_symbols"
    assert ok.status_code == 200
    assert [[p["symbol"] for p in f["positions"]] for f in listed.json()["portfolios"]] == [["AAPL"]]


async def test_a_portfolio_holding_a_refused_symbol_shows_no_price_over_rest_or_websocket(
    start_relay, fake_fmp, http, tmp_path, nursery
):
    fake_fmp.rate = 0.0
    relay = await start_relay(
        **sections(fake_fmp, tmp_path, upstream={"provider": "fmp", "unsubscribe_linger": 0.0, "pinned": ["MSFT", "AAPL"]})
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
        made = await http.post(api(relay, "/portfolios"), headers=wide, json={"name": "main", "positions": positions[:2]})
        assert made.status_code == 200, made.text
        seen_wide = (await http.get(api(relay, "/portfolios/main"), headers=wide)).json()
        seen_narrow = (await http.get(api(relay, "/portfolios/main"), headers=narrow)).json()

        client = await authed(relay, nursery, symbols=["AAPL"])
        streamed = await client.request({"action": "subscribe", "channel": "portfolio", "portfolio": "main"}, "portfolio")
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
        assert (await http.post(api(relay, "/portfolios"), headers=wide, json={"name": "p", "positions": positions})).status_code == 200
        client = await authed(relay, nursery, symbols=["AAPL"])
        await client.request({"action": "subscribe", "channel": "portfolio", "portfolio": "p"}, "portfolio")
        await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)
    assert "AAPL" in relay.hub.demand.wanted and "NVDA" not in relay.hub.demand.wanted
    assert "NVDA" not in fake_fmp.subscriptions


# ------------------------------------------------------------------------- alerts


async def test_an_alert_on_a_refused_symbol_is_refused_over_rest_and_websocket(start_relay, fake_fmp, http, tmp_path, nursery):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    with trio.fail_after(10):
        rest = await http.post(
            api(relay, "/alerts"), headers=bearer(symbols=["AAPL"]), json={"type": "above", "symbol": "AMD", "level": 1}
        )
        client = await authed(relay, nursery, symbols=["AAPL"])
        ws = await client.request({"action": "alert_create", "rule": {"type": "above", "symbol": "amd", "level": 1}}, "alert_created")
        rules = (await http.get(api(relay, "/alerts"), headers=bearer(symbols=["AAPL"]))).json()["rules"]
    assert rest.status_code == 403 and rest.json()["error"] == "forbidden_symbols"
    assert ws["type"] == "error" and ws["code"] == "forbidden_symbols" and ws["action"] == "alert_create"
    assert rules == [] and "AMD" not in relay.hub.demand.wanted and "AMD" not in fake_fmp.subscriptions


async def test_only_an_admins_alert_holds_its_symbol_upstream(start_relay, fake_fmp, http, tmp_path):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    with trio.fail_after(10):
        user = await http.post(api(relay, "/alerts"), headers=bearer(), json={"type": "above", "symbol": "TSLA", "level": 1})
        admin = await http.post(
            api(relay, "/alerts"), headers=bearer(sub="root", scope=ADMIN), json={"type": "above", "symbol": "IBM", "level": 1}
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


async def test_alerts_count_against_the_users_symbol_budget(start_relay, fake_fmp, http, tmp_path):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    headers = bearer(max_symbols=2)
    with trio.fail_after(10):
        codes = [
            (await http.post(api(relay, "/alerts"), headers=headers, json={"type": "above", "symbol": s, "level": 1})).status_code
            for s in ("AAPL", "MSFT", "AAPL", "AMD")
        ]
        last = await http.post(api(relay, "/alerts"), headers=headers, json={"type": "above", "symbol": "AMD", "level": 1})
    assert codes == [200, 200, 200, 422]  # a third rule on a held symbol costs nothing
    assert last.json()["error"] == "symbol_budget" and "at most 2" in last.json()["message"]


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
    assert (first["symbol"], second["symbol"]) == ("MSFT", "AAPL")
    assert got["symbol"] == "AAPL"  # the MSFT alert, sent before it, never reached this connection


# ------------------------------------------------------------------------- the other paths


async def test_cache_history_bars_and_pins_refuse_symbols_the_token_does_not_allow(start_relay, fake_fmp, http, tmp_path):
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
