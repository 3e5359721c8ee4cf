"""Tick history through the real relay: stored as it streams, queried over REST, never in the way."""

from __future__ import annotations

import socket
import sqlite3
import uuid
from typing import Any

import pytest
import trio
from conftest import api, require, wait_cached

from trio_relay.bars import bars_from_trades
from trio_relay.model import Update, wall_ms

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def sqlite_sections(tmp_path: Any, **history: Any) -> dict[str, dict[str, Any]]:
    return {
        "history": {"backend": "sqlite", "data_dir": str(tmp_path / "data"), "flush_interval": 0.05, **history},
        "upstream": {"pinned": ["AAPL"]},
        "sim": {"rate": 200.0, "trade_ratio": 0.5},
    }


async def written_at_least(relay: Any, n: int) -> None:
    writer = relay.history_writer
    while writer.written < n:
        await writer.changed()


async def test_ticks_are_stored_and_paginated(start_relay, http, tmp_path):
    relay = await start_relay(**sqlite_sections(tmp_path))
    with trio.fail_after(15):
        await written_at_least(relay, 300)
        first = (await http.get(api(relay, "/history/AAPL"), params={"limit": 100})).json()
        pages = [first]
        while pages[-1]["next_cursor"] and len(pages) < 3:
            params = {"limit": 100, "start": first["start"], "end": first["end"], "cursor": pages[-1]["next_cursor"]}
            pages.append((await http.get(api(relay, "/history/AAPL"), params=params)).json())
        everything = (
            await http.get(
                api(relay, "/history/AAPL"), params={"limit": 10000, "start": first["start"], "end": first["end"]}
            )
        ).json()
    ticks = [t for page in pages for t in page["ticks"]]
    assert len(ticks) == 300 and ticks == everything["ticks"][:300]  # pages join with no gap, no repeat
    assert [t["timestamp"] for t in ticks] == sorted(t["timestamp"] for t in ticks)
    assert {t["symbol"] for t in ticks} == {"AAPL"} and {t["kind"] for t in ticks} <= {"T", "Q"}
    trade = next(t for t in ticks if t["kind"] == "T")
    assert trade["last_price"] > 0 and trade["bid_price"] is None and trade["recv_ms"] >= trade["timestamp"] - 5_000


async def test_bars_from_history_equal_bars_built_from_the_stored_trades(start_relay, http, tmp_path):
    relay = await start_relay(**sqlite_sections(tmp_path))
    with trio.fail_after(15):
        await written_at_least(relay, 600)
        ticks = (await http.get(api(relay, "/history/AAPL"), params={"limit": 10000})).json()
        # Compare over a window that ended 2 s before the last stored tick: every trade of it
        # was written long before either query (the writer flushes every 0.5 s), so trades
        # still arriving between the two queries cannot change its bars.
        start, end = ticks["start"], max(t["timestamp"] for t in ticks["ticks"]) - 2_000
        bars = (await http.get(api(relay, "/bars/AAPL"), params={"interval": "1s", "start": start, "end": end})).json()
    trades = [
        Update("AAPL", "T", t["timestamp"], last_price=t["last_price"], last_size=t["last_size"])
        for t in ticks["ticks"]
        if t["kind"] == "T" and t["timestamp"] <= end
    ]
    expected = bars_from_trades(trades, "1s", start - start % 1000, end)
    assert bars["count"] == len(expected) > 0
    assert [(b["start_ms"], b["open"], b["high"], b["low"], b["close"], b["trades"]) for b in bars["bars"]] == [
        (b.start_ms, b.open, b.high, b.low, b.close, b.trades) for b in expected
    ]


async def test_bars_are_complete_only_inside_the_window_and_past_their_lateness(start_relay, http, tmp_path):
    """Issue 22, case 2: a start off the boundary and an end in the future, over REST."""
    relay = await start_relay(**sqlite_sections(tmp_path))
    with trio.fail_after(20):
        await written_at_least(relay, 600)
        first = (await http.get(api(relay, "/history/AAPL"), params={"limit": 1})).json()["ticks"][0]["timestamp"]
        while wall_ms() < first + 7_000:  # some bars past their lateness window (the writer wakes us)
            await relay.history_writer.changed()
        start = first - first % 1000 + 500  # inside an interval
        end = wall_ms() + 60_000  # in the future: the running bar is in the window
        before = wall_ms()
        bars = (await http.get(api(relay, "/bars/AAPL"), params={"interval": "1s", "start": start, "end": end})).json()
        after = wall_ms()
    final_after = 1_000 + 2_000 + 1_000  # a 1s bar can change until its end + grace (2 s) + lateness (1 s)
    assert bars["bars"] and bars["bars"][0]["start_ms"] < start and not bars["bars"][0]["complete"]
    for bar in bars["bars"][1:]:
        if bar["start_ms"] + final_after <= before:
            assert bar["complete"], bar
        elif bar["start_ms"] + final_after > after:
            assert not bar["complete"], bar  # still running, or within its lateness
    assert any(not b["complete"] for b in bars["bars"][1:]) and any(b["complete"] for b in bars["bars"][1:])


@pytest.mark.parametrize(
    "path, params, code, message",
    [
        (
            "/history/AAPL",
            {"start": "2024-11-10T15:00:00Z", "end": "2024-11-10T14:00:00Z"},
            "invalid_range",
            "must be before 'end'",
        ),
        ("/history/AAPL", {"start": "1731249000"}, "invalid_range", "looks like seconds"),
        ("/history/AAPL", {"end": "yesterday"}, "invalid_range", "'end'='yesterday' is not a time"),
        ("/history/AAPL", {"limit": "0"}, "invalid_range", "'limit' must be an integer from 1 to 10000"),
        ("/history/AAPL", {"cursor": "nonsense"}, "invalid_cursor", "not a next_cursor"),
        ("/history/BAD!", {}, "invalid_symbols", "invalid symbol"),
        ("/bars/AAPL", {"interval": "2m"}, "invalid_interval", "'interval' must be one of 1s, 1m, 5m, 1h"),
    ],
)
async def test_bad_queries_get_400_with_a_clear_message(start_relay, http, tmp_path, path, params, code, message):
    relay = await start_relay(**sqlite_sections(tmp_path))
    with trio.fail_after(10):
        response = await http.get(api(relay, path), params=params)
    assert response.status_code == 400
    assert response.json()["error"] == code and message in response.json()["message"]


async def test_history_off_answers_404(start_relay, http):
    relay = await start_relay()
    with trio.fail_after(10):
        response = await http.get(api(relay, "/history/AAPL"))
    assert response.status_code == 404 and response.json()["error"] == "history_off"


async def test_a_database_that_is_down_never_stops_the_prices(start_relay, http, ws_connect, tmp_path):
    # The data directory is writable (so the relay starts: an unwritable one is refused at
    # start), but the database file cannot be opened: a directory stands where it should be.
    data_dir = tmp_path / "data"
    (data_dir / "history.sqlite3").mkdir(parents=True)
    relay = await start_relay(**sqlite_sections(tmp_path, data_dir=str(data_dir), queue_size=50))
    writer = relay.history_writer
    client = await ws_connect(relay)
    with trio.fail_after(15):
        await client.request({"action": "subscribe", "symbols": ["MSFT"]}, "subscribed")
        while writer.dropped == 0 or writer.state != "down":
            await writer.changed()
        # Prices keep flowing while the database is down and updates are dropped.
        seqs = [(await client.recv_until(lambda m: m.get("type") == "price_update"))[0]["seq"] for _ in range(20)]
        health = await http.get(api(relay, "/health"))
        status = (await http.get(api(relay, "/status"))).json()
        query = await http.get(api(relay, "/history/MSFT"))
    assert seqs == sorted(seqs) and len(set(seqs)) == 20
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["degraded"] == ["history"] and body["history"]["state"] == "down"
    assert body["history"]["dropped"] > 0 and body["history"]["pending"] <= 50
    assert status["history"]["state"] == "down" and status["history"]["last_error"]
    assert query.status_code == 503 and query.json()["error"] == "history_unavailable"


async def test_shutdown_writes_everything_pending(nursery, tmp_path):
    from conftest import make_config

    from trio_relay.daemon import run_relay
    from trio_relay.history import HistoryStore, SqliteBackend

    config = make_config(**sqlite_sections(tmp_path, flush_interval=30.0))  # nothing written before the stop
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await run_relay(config, task_status=task_status)
        done.set()

    relay = await nursery.start(run)
    with trio.fail_after(15):
        await wait_cached(relay, "AAPL")
        published = trio.Event()
        seen = 0

        def count(_update: Update) -> None:
            nonlocal seen
            seen += 1
            if seen >= 50:
                published.set()

        relay.hub.add_callback(count)
        await published.wait()  # the writer holds them: its flush interval is 30 s
        relay.shutdown()
        await done.wait()
    writer = relay.history_writer
    assert writer.dropped == 0 and writer.pending == 0 and writer.written >= 50
    async with HistoryStore(SqliteBackend(str(tmp_path / "data"))) as store:
        ticks, _ = await store.ticks("AAPL", 0, 1 << 50, 10_000)
    assert len(ticks) == writer.written


def _postgres_reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
        return True
    except OSError:
        return False


async def test_postgres_backend_end_to_end(start_relay, http):
    if not _postgres_reachable():
        require("PostgreSQL at 127.0.0.1:5432 is unreachable")
    import psycopg

    table = f"ticks_test_{uuid.uuid4().hex[:12]}"
    try:
        relay = await start_relay(
            history={"backend": "postgres", "postgres_dsn": PG_DSN, "table": table, "flush_interval": 0.05},
            upstream={"pinned": ["AAPL"]},
            sim={"rate": 200.0},
        )
        with trio.fail_after(15):
            await written_at_least(relay, 200)
            ticks = (await http.get(api(relay, "/history/AAPL"), params={"limit": 5000})).json()
            bars = (await http.get(api(relay, "/bars/AAPL"), params={"interval": "1s"})).json()
        assert ticks["count"] >= 200 and bars["count"] >= 1
        assert relay.history_writer.status()["backend"].lower().startswith("postgres")
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')


async def test_an_older_relays_history_file_is_served_with_the_new_ticks(start_relay, http, tmp_path):
    """Upgrading over a file of a row per tick (an older relay's): its ticks are served at once,
    before and in the same pages as the ticks the new relay stores, and /bars reads both."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    now = wall_ms()
    old = [("AAPL", now - 60_000 + i * 100, now - 60_000 + i * 100, "T", 200.0 + i, 10.0) for i in range(50)]
    with sqlite3.connect(data / "history.sqlite3") as raw:
        raw.execute(
            "CREATE TABLE ticks (id INTEGER PRIMARY KEY, symbol TEXT NOT NULL, ts INTEGER NOT NULL,"
            " recv_ms INTEGER NOT NULL, kind TEXT NOT NULL, last_price REAL, last_size REAL, bid_price REAL,"
            " bid_size REAL, ask_price REAL, ask_size REAL, provider TEXT)"
        )
        raw.execute("CREATE INDEX ticks_symbol_ts ON ticks (symbol, ts)")
        raw.executemany(
            "INSERT INTO ticks (symbol, ts, recv_ms, kind, last_price, last_size) VALUES (?, ?, ?, ?, ?, ?)", old
        )
    relay = await start_relay(**sqlite_sections(tmp_path))
    with trio.fail_after(15):
        await written_at_least(relay, 100)
        params = {"start": now - 70_000, "end": "now", "limit": 30}
        pages = [(await http.get(api(relay, "/history/AAPL"), params=params)).json()]
        while pages[-1]["next_cursor"] and len(pages) < 10:
            more = {**params, "start": pages[0]["start"], "end": pages[0]["end"], "cursor": pages[-1]["next_cursor"]}
            pages.append((await http.get(api(relay, "/history/AAPL"), params=more)).json())
        bars = (
            await http.get(
                api(relay, "/bars/AAPL"), params={"interval": "1m", "start": now - 60_000, "end": now - 55_000}
            )
        ).json()
    ticks = [t for page in pages for t in page["ticks"]]
    assert [(t["timestamp"], t["last_price"], t["provider"]) for t in ticks[:50]] == [
        (ts, p, None) for _s, ts, _r, _k, p, _z in old
    ]
    assert len(ticks) > 50 and {t["provider"] for t in ticks[50:]} == {"sim"}  # the new relay's, after them
    assert [t["timestamp"] for t in ticks] == sorted(t["timestamp"] for t in ticks)
    assert len({(t["timestamp"], t["recv_ms"], t["kind"]) for t in ticks}) == len(ticks)  # no tick twice
    assert bars["bars"][0]["open"] == 200.0 and sum(b["trades"] for b in bars["bars"]) == 50
