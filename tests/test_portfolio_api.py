"""Portfolios through the real relay: REST to edit, the WebSocket channel to watch, exact P&L."""

from __future__ import annotations

from typing import Any

import trio
from conftest import api, fmp_sections


def sections(fake: Any, tmp_path: Any, **extra: Any) -> dict[str, dict[str, Any]]:
    out = fmp_sections(fake)
    out["alerts"] = {"enabled": True, "data_dir": str(tmp_path / "data")}
    out["portfolio"] = {"update_interval": 0.05}
    out.update(extra)
    return out


def trade(symbol: str, price: float, t: int) -> str:
    return f'{{"s":"{symbol.lower()}","t":{t},"type":"T","lp":{price},"ls":10}}'


async def test_a_portfolio_is_valued_live_and_follows_edits(start_relay, fake_fmp, ws_connect, http, tmp_path):
    fake_fmp.rate = 0.0  # prices come only from the trades injected here
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    created = await http.post(
        api(relay, "/portfolios"),
        json={"name": "main", "positions": [{"symbol": "aapl", "quantity": 100, "cost_basis": 150}]},
    )
    assert created.status_code == 200 and created.json() == {
        "name": "main",
        "positions": [{"symbol": "AAPL", "quantity": 100.0, "cost_basis": 150.0}],
    }
    client = await ws_connect(relay)
    with trio.fail_after(10):
        ack = await client.request({"action": "subscribe", "channel": "portfolio", "portfolio": "main"}, "subscribed")
        await fake_fmp.wait_until(lambda: "AAPL" in fake_fmp.subscriptions)  # held symbols are wanted upstream
        await fake_fmp.inject(trade("AAPL", 155.5, 1_700_000_000_000))
        value, _ = await client.recv_until(
            lambda m: m.get("type") == "portfolio" and m["positions"][0]["price"] == 155.5
        )
        # A REST edit reaches the live stream: a short MSFT position.
        put = await http.put(api(relay, "/portfolios/main/positions/MSFT"), json={"quantity": -10, "cost_basis": 400})
        await fake_fmp.wait_until(lambda: "MSFT" in fake_fmp.subscriptions)
        await fake_fmp.inject(trade("MSFT", 390, 1_700_000_001_000))
        both, _ = await client.recv_until(
            lambda m: m.get("type") == "portfolio" and len(m["positions"]) == 2 and m["positions"][1]["price"] == 390
        )
        now = (await http.get(api(relay, "/portfolios/main"))).json()
        deleted = await http.delete(api(relay, "/portfolios/main"))
        gone, _ = await client.recv_until(lambda m: m.get("type") == "error")
    assert ack == {"type": "subscribed", "channel": "portfolio", "portfolio": "main"}
    aapl = value["positions"][0]
    assert (aapl["market_value"], aapl["cost"], aapl["unrealised_pnl"]) == (15550.0, 15000.0, 550.0)
    assert aapl["unrealised_pnl_pct"] == 3.666667
    assert put.status_code == 200
    msft = both["positions"][1]
    assert (msft["symbol"], msft["market_value"], msft["unrealised_pnl"]) == ("MSFT", -3900.0, 100.0)
    assert both["totals"]["unrealised_pnl"] == 650.0 and both["totals"]["market_value"] == 11650.0
    assert now["totals"] == both["totals"]
    assert deleted.status_code == 200 and gone["code"] == "not_found"


async def test_bad_portfolios_get_clear_errors(start_relay, fake_fmp, ws_connect, http, tmp_path):
    relay = await start_relay(**sections(fake_fmp, tmp_path))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        bad_name = await http.post(api(relay, "/portfolios"), json={"name": "no spaces!", "positions": []})
        absurd = await http.post(
            api(relay, "/portfolios"),
            json={"name": "x", "positions": [{"symbol": "AAPL", "quantity": 1e15, "cost_basis": 1}]},
        )
        bad_symbol = await http.put(api(relay, "/portfolios/x/positions/BAD!"), json={"quantity": 1, "cost_basis": 1})
        missing = await http.get(api(relay, "/portfolios/nope"))
        ws_missing = await client.request(
            {"action": "subscribe", "channel": "portfolio", "portfolio": "nope"}, "subscribed"
        )
        ws_bad = await client.request(
            {"action": "subscribe", "channel": "portfolio", "portfolio": "no spaces!"}, "subscribed"
        )
    assert bad_name.status_code == 422 and bad_name.json()["error"] == "invalid_name"
    assert absurd.status_code == 422 and absurd.json()["error"] == "invalid_quantity"
    assert bad_symbol.status_code == 422 and bad_symbol.json()["error"] == "invalid_symbols"
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert ws_missing["code"] == "not_found" and ws_bad["code"] == "invalid_name"


async def test_portfolios_survive_a_restart(start_relay, fake_fmp, http, tmp_path):
    first = await start_relay(**sections(fake_fmp, tmp_path))
    with trio.fail_after(10):
        await http.post(
            api(first, "/portfolios"),
            json={"name": "keep", "positions": [{"symbol": "IBM", "quantity": 5, "cost_basis": 120.5}]},
        )
        first.shutdown()
        second = await start_relay(**sections(fake_fmp, tmp_path))
        listed = (await http.get(api(second, "/portfolios"))).json()
    assert listed == {
        "portfolios": [{"name": "keep", "positions": [{"symbol": "IBM", "quantity": 5.0, "cost_basis": 120.5}]}]
    }
