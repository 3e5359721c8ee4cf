"""Resume after reconnect (seq + epoch + history) and the state signals clients get.

The hub-level tests drive a real :class:`Hub` under ``MockClock``; the end-to-end ones use the
real daemon (Hypercorn on a free port), real WebSocket clients and the fake FMP server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from conftest import close_code, fmp_sections

from trio_relay.config import ClientsConfig
from trio_relay.hub import Client, Demand, Hub, Stats
from trio_relay.model import Update, ws_payload


@asynccontextmanager
async def open_hub(*, pinned: tuple[str, ...] = (), **clients: Any) -> AsyncIterator[Hub]:
    async with Hub.open(ClientsConfig(**clients), Demand(linger=0.0, pinned=list(pinned)), Stats()) as hub:
        yield hub


def trade(symbol: str, price: float) -> Update:
    return Update(symbol, "T", 1_700_000_000_000, last_price=price, last_size=100)


async def pending(client: Client) -> list[dict[str, Any]]:
    """Everything queued for the client (nothing if nothing is)."""
    if not len(client.outbox):
        return []
    with trio.fail_after(1):
        return [json.loads(ws_payload(m)) for m in await client.outbox.get()]


async def wait_seq(hub: Hub, symbol: str, seq: int) -> None:
    """Wait (on a hub callback, no polling) until ``symbol`` reaches ``seq``."""
    reached = trio.Event()

    def check(update: Update) -> None:
        state = hub.cache.get(symbol)
        if state is not None and state.seq >= seq:
            reached.set()

    unregister = hub.add_callback(check)
    try:
        await reached.wait()
    finally:
        unregister()


def seqs(messages: list[dict[str, Any]], symbol: str = "AAPL") -> list[int]:
    return [m["seq"] for m in messages if m.get("type") == "price_update" and m["symbol"] == symbol]


# --------------------------------------------------------------------------- resume, hub level


async def test_resume_replays_exactly_the_missed_updates_in_order() -> None:
    async with open_hub(pinned=("AAPL",), resume_history=50) as hub:
        first = hub.connect()
        hub.subscribe(first, ["AAPL"])
        for i in range(5):
            hub.publish(trade("AAPL", 100 + i))
        seen = await pending(first)
        last = seen[-1]
        assert last["seq"] == 5 and last["epoch"] == hub.epoch
        hub.disconnect(first)
        for i in range(7):  # missed while away
            hub.publish(trade("AAPL", 200 + i))
        again = hub.connect()
        hub.subscribe(again, ["AAPL"], since={"AAPL": 5}, epoch=last["epoch"])
        hub.publish(trade("AAPL", 300))  # live, after the resume
        got = await pending(again)
    assert got[0] == {"type": "subscribed", "symbols": ["AAPL"], "epoch": hub.epoch, "recovered": True}
    assert seqs(got) == list(range(6, 14))  # 6..12 replayed, 13 live: no gap, no repeat
    assert [m["last_price"] for m in got[1:8]] == [200 + i for i in range(7)]


async def test_a_gap_older_than_the_history_gets_a_snapshot_and_recovered_false() -> None:
    async with open_hub(pinned=("AAPL", "MSFT"), resume_history=4) as hub:
        for i in range(10):
            hub.publish(trade("AAPL", 100 + i))
        hub.publish(trade("MSFT", 50))
        client = hub.connect()
        hub.subscribe(client, ["AAPL", "MSFT"], since={"AAPL": 3, "MSFT": 0}, epoch=hub.epoch)
        got = await pending(client)
    assert got[0] == {
        "type": "subscribed",
        "symbols": ["AAPL", "MSFT"],
        "epoch": hub.epoch,
        "recovered": False,
        "unrecovered": ["AAPL"],
    }
    # AAPL: seq 4..6 are gone from the 4-deep history, so one snapshot of the latest state.
    assert seqs(got) == [10] and got[1]["last_price"] == 109
    # MSFT was recovered from seq 0: its one update.
    assert seqs(got, "MSFT") == [1]


async def test_another_epoch_gets_a_snapshot() -> None:
    async with open_hub(pinned=("AAPL",)) as hub:
        for i in range(3):
            hub.publish(trade("AAPL", 100 + i))
        client = hub.connect()
        hub.subscribe(client, ["AAPL"], since={"AAPL": 1}, epoch="an-older-run")
        got = await pending(client)
    assert got[0]["recovered"] is False and got[0]["unrecovered"] == ["AAPL"]
    assert seqs(got) == [3]


async def test_a_client_that_missed_nothing_gets_nothing_twice() -> None:
    async with open_hub(pinned=("AAPL",)) as hub:
        for i in range(3):
            hub.publish(trade("AAPL", 100 + i))
        client = hub.connect()
        hub.subscribe(client, ["AAPL"], since={"AAPL": 3}, epoch=hub.epoch)
        got = await pending(client)
        # A seq ahead of this relay in its own epoch (a fleet relay that lags the holder, or does
        # not follow the symbol yet): nothing at or below it is sent to that client, ever.
        other = hub.connect()
        hub.subscribe(other, ["AAPL"], since={"AAPL": 5}, epoch=hub.epoch)
        future = await pending(other)
        for i in range(3):
            hub.publish(trade("AAPL", 200 + i))
        after = await pending(other)
    assert got == [{"type": "subscribed", "symbols": ["AAPL"], "epoch": hub.epoch, "recovered": True}]
    assert future[0]["recovered"] is False and seqs(future) == []
    assert seqs(after) == [6]


async def test_a_new_epoch_restarts_numbering_and_is_announced() -> None:
    """A fleet whose Redis lost its data numbers from 1 in a new epoch: the hub follows at once."""
    async with open_hub(pinned=("AAPL",)) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        for i in range(3):
            hub.publish(
                Update(symbol="AAPL", kind="T", timestamp=1, last_price=100 + i, last_size=1, seq=40 + i, epoch="old")
            )
        await pending(client)
        assert hub.snapshot("AAPL").seq == 42  # type: ignore[union-attr]
        hub.publish(Update(symbol="AAPL", kind="T", timestamp=2, last_price=200, last_size=1, seq=1, epoch="new"))
        got = await pending(client)
    assert got[0] == {
        "type": "status", "scope": "relay", "state": "epoch", "epoch": "new", "previous": "old",
        "reason": "the sequence space restarted: seq numbering starts again in this epoch",
    }  # fmt: skip
    assert [(m["epoch"], m["seq"], m["last_price"]) for m in got[1:]] == [("new", 1, 200)]


async def test_replayed_updates_are_never_conflated() -> None:
    """More replayed updates than the outbox holds: all still arrive, in order."""
    async with open_hub(pinned=("AAPL",), resume_history=100, outbox_size=8) as hub:
        for i in range(60):
            hub.publish(trade("AAPL", 100 + i))
        client = hub.connect()
        hub.subscribe(client, ["AAPL"], since={"AAPL": 10}, epoch=hub.epoch)
        for i in range(20):  # live updates on top overflow the outbox: they conflate, not the replay
            hub.publish(trade("AAPL", 500 + i))
        got = await pending(client)
    assert seqs(got) == [*range(11, 61), 80]


async def test_seed_clients_see_no_change() -> None:
    async with open_hub(pinned=("AAPL",)) as hub:
        hub.publish(trade("AAPL", 100))
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        got = await pending(client)
    assert got[0] == {"type": "subscribed", "symbols": ["AAPL"]}
    assert seqs(got) == [1]


# --------------------------------------------------------------------------- per-symbol staleness


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_symbol_that_stops_ticking_is_flagged_stale_and_fresh_again(autojump_clock) -> None:
    async with open_hub(symbol_stale_after=10.0) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL", "MSFT"])
        await pending(client)
        start = trio.current_time()
        flagged_at = None
        # AAPL ticks every second; MSFT ticks for 3 s, then stops.
        for second in range(30):
            hub.publish(trade("AAPL", 100 + second))
            if second < 3:
                hub.publish(trade("MSFT", 50 + second))
            await trio.sleep(1.0)  # virtual time (MockClock)
            statuses = [m for m in await pending(client) if m["type"] == "status"]
            if statuses and flagged_at is None:
                flagged_at = trio.current_time() - start
                assert statuses == [
                    {"type": "status", "scope": "symbols", "state": "stale", "symbols": ["MSFT"], "stale_after": 10.0}
                ]
            else:
                assert statuses == []
        assert hub.stale_symbols == {"MSFT"}
        # Its last update was at t=2: flagged between 12 s and 12 s + one scan (2.5 s).
        assert flagged_at is not None and 12.0 <= flagged_at <= 15.0
        # A new subscriber is told at once.
        late = hub.connect()
        hub.subscribe(late, ["MSFT"])
        assert [m for m in await pending(late) if m["type"] == "status"][0]["symbols"] == ["MSFT"]
        await pending(client)
        hub.publish(trade("MSFT", 60))
        await trio.sleep(3.0)  # virtual time (MockClock)
        statuses = [m for m in await pending(client) if m["type"] == "status"]
        assert statuses == [
            {"type": "status", "scope": "symbols", "state": "fresh", "symbols": ["MSFT"], "stale_after": 10.0}
        ]
        assert hub.stale_symbols == set()


async def test_staleness_can_be_turned_off(autojump_clock) -> None:
    async with open_hub(symbol_stale_after=0.0) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await pending(client)
        await trio.sleep(3600.0)  # virtual time (MockClock)
        assert await pending(client) == [] and hub.stale_symbols == set()


# --------------------------------------------------------------------------- end to end


async def test_reconnect_and_resume_through_the_real_relay(start_relay, ws_connect):
    relay = await start_relay(upstream={"pinned": ["AAPL"]}, sim={"rate": 200.0})
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        last, _ = await client.recv_until(lambda m: m.get("type") == "price_update" and m["seq"] >= 5)
        await client.ws.aclose()
        # Updates flow while the client is away.
        await wait_seq(relay.hub, "AAPL", last["seq"] + 20)
        again = await ws_connect(relay)
        ack = await again.request(
            {"action": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": last["seq"]}, "epoch": last["epoch"]},
            "subscribed",
        )
        got = [await again.recv() for _ in range(40)]
    assert ack["recovered"] is True and ack["epoch"] == last["epoch"]
    assert [m["seq"] for m in got] == list(range(last["seq"] + 1, last["seq"] + 41))


async def test_resume_after_a_relay_restart_is_not_recovered(start_relay, ws_connect):
    old = await start_relay(upstream={"pinned": ["AAPL"]})
    client = await ws_connect(old)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        last, _ = await client.recv_until(lambda m: m.get("type") == "price_update")
        new = await start_relay(upstream={"pinned": ["AAPL"]})
        other = await ws_connect(new)
        ack = await other.request(
            {"action": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": last["seq"]}, "epoch": last["epoch"]},
            "subscribed",
        )
        snapshot, _ = await other.recv_until(lambda m: m.get("type") == "price_update")
    assert new.hub.epoch != old.hub.epoch
    assert ack["recovered"] is False and ack["unrecovered"] == ["AAPL"] and ack["epoch"] == new.hub.epoch
    assert snapshot["epoch"] == new.hub.epoch


@pytest.mark.parametrize(
    "message, code",
    [
        ({"action": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": "12"}, "epoch": "x"}, "invalid_since"),
        ({"action": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": -1}, "epoch": "x"}, "invalid_since"),
        ({"action": "subscribe", "symbols": ["AAPL"], "since": [1], "epoch": "x"}, "invalid_since"),
        ({"action": "subscribe", "symbols": ["AAPL"], "since": {"MSFT": 1}, "epoch": "x"}, "invalid_since"),
        ({"action": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": 1}}, "missing_field"),
    ],
)
async def test_a_bad_resume_request_gets_an_error_and_the_connection_stays(start_relay, ws_connect, message, code):
    relay = await start_relay()
    client = await ws_connect(relay)
    with trio.fail_after(5):
        error = await client.request(message, "subscribed")
        pong = await client.request({"action": "ping"}, "pong")
    assert error["type"] == "error" and error["code"] == code and error["action"] == "subscribe"
    assert pong == {"type": "pong"}
    assert relay.hub.demand.wanted == set()  # nothing was subscribed


async def test_upstream_down_stale_and_up_reach_every_subscribed_client(start_relay, fake_fmp, ws_connect):
    relay = await start_relay(**fmp_sections(fake_fmp, stale_after=0.5, backoff_initial=0.05, backoff_max=0.1))
    a = await ws_connect(relay)
    b = await ws_connect(relay)
    idle = await ws_connect(relay)  # subscribed to nothing: told nothing
    with trio.fail_after(10):
        await a.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await b.request({"action": "subscribe", "symbols": ["MSFT", "IBM"]}, "subscribed")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL", "MSFT", "IBM"})
        # Killed: "down" at once.
        await fake_fmp.drop_all()
        down_a, _ = await a.recv_until(lambda m: m.get("type") == "status")
        down_b, _ = await b.recv_until(lambda m: m.get("type") == "status")
        up_a, _ = await a.recv_until(lambda m: m.get("type") == "status")
        # Silent (heartbeats too): "stale" within the stale limit, then "up" after the reconnect.
        fake_fmp.stall()
        stale_a, _ = await a.recv_until(lambda m: m.get("type") == "status")
        fake_fmp.resume()
        up_again, _ = await a.recv_until(lambda m: m.get("type") == "status")
        await idle.request({"action": "ping"}, "pong")
    assert down_a["scope"] == "upstream" and down_a["state"] == "down" and down_a["provider"] == "fmp"
    assert down_a["symbols"] == ["AAPL"] and down_b["symbols"] == ["IBM", "MSFT"]
    assert "connection closed" in down_a["reason"]
    assert up_a["state"] == "up" and stale_a["state"] == "stale" and up_again["state"] == "up"
    assert "silent" in stale_a["reason"]


async def test_a_client_subscribing_while_the_upstream_is_down_is_told(start_relay, fake_fmp, ws_connect):
    relay = await start_relay(**fmp_sections(fake_fmp, backoff_initial=5.0, backoff_max=5.0))
    first = await ws_connect(relay)
    with trio.fail_after(10):
        await first.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL"})
        fake_fmp.api_keys = set()
        await fake_fmp.drop_all()
        await first.recv_until(lambda m: m.get("type") == "status")
        late = await ws_connect(relay)
        await late.request({"action": "subscribe", "symbols": ["TSLA"]}, "subscribed")
        status, _ = await late.recv_until(lambda m: m.get("type") == "status")
    assert status["scope"] == "upstream" and status["state"] == "down" and status["symbols"] == ["TSLA"]


async def test_shutdown_tells_clients_to_reconnect_then_closes_1001(start_relay, ws_connect):
    relay = await start_relay()
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        relay.shutdown()
        notice, _ = await client.recv_until(lambda m: m.get("type") == "status")
        code = await close_code(client.ws)
    assert notice == {
        "type": "status",
        "scope": "relay",
        "state": "closing",
        "reason": "server shutting down",
        "reconnect": True,
        "epoch": relay.hub.epoch,
        "retry_after_ms": 1000,
    }
    assert code == 1001


async def test_a_relay_that_never_connects_tells_its_clients(start_relay, fake_fmp, ws_connect):
    """A wrong key from the start: a subscriber learns the upstream is down (not silence)."""
    sections = fmp_sections(fake_fmp, auth_retry_delay=300.0)
    sections["fmp"]["api_key"] = "wrong-key-0123456789"
    relay = await start_relay(**sections)
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await fake_fmp.wait_until(lambda: fake_fmp.failed_logins >= 1)
        while relay.hub.upstream_status is None:
            await trio.testing.wait_all_tasks_blocked()
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        status, _ = await client.recv_until(lambda m: m.get("type") == "status")
    assert status["scope"] == "upstream" and status["state"] == "down" and "Unauthorized" in status["reason"]


async def test_a_symbol_that_comes_back_keeps_counting_in_the_same_epoch() -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        for i in range(5):
            hub.publish(trade("AAPL", 100 + i))
        hub.unsubscribe(client, ["AAPL"])  # linger 0: evicted with its history
        assert hub.snapshot("AAPL") is None
        hub.subscribe(client, ["AAPL"])
        hub.publish(trade("AAPL", 200))
        state = hub.snapshot("AAPL")
    assert state is not None and state.seq == 6  # not 1 again: never a repeat within an epoch
