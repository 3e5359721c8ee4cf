"""The SSE price stream (api/sse.py), end to end: the real daemon, real HTTP clients, curl.

The relay's simulated market ticks every subscribed symbol; each test reads the stream as a
browser would (``text/event-stream``), including a reconnect with ``Last-Event-ID``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from test_auth import auth_sections, token

from trio_relay.api.sse import SSE_PATH, parse_event_id
from trio_relay.daemon import Relay


async def wait_seq(relay: Relay, symbol: str, seq: int) -> None:
    """Wait (on a hub callback, no polling) until ``symbol`` reaches ``seq``."""
    reached = trio.Event()

    def check(_update: object) -> None:
        state = relay.hub.cache.get(symbol)
        if state is not None and state.seq >= seq:
            reached.set()

    unregister = relay.hub.add_callback(check)
    try:
        await reached.wait()
    finally:
        unregister()


def sse_url(relay: Relay, query: str) -> str:
    return f"{relay.http_url}{SSE_PATH}?{query}"


class Events:
    """Reads one text/event-stream response event by event (fields per the HTML spec)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.comments: list[str] = []

    async def next(self) -> dict[str, Any]:
        event: dict[str, Any] = {}
        data: list[str] = []
        async for line in self._lines:
            if not line:
                if data:  # an event without data is not dispatched (the "retry:" preamble)
                    event["data"] = json.loads("\n".join(data))
                    return event
                event = {}
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                event[name] = value
        raise EOFError

    async def until(self, predicate: Any, limit: int = 1000) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        seen = []
        for _ in range(limit):
            event = await self.next()
            seen.append(event)
            if predicate(event):
                return event, seen
        raise AssertionError(f"no matching event in {limit}")


@asynccontextmanager
async def stream(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[Events]:
    async with httpx.AsyncClient(timeout=10) as client, client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Events(response)


async def test_streams_prices_with_an_id_that_names_every_symbols_seq(start_relay: Any) -> None:
    relay = await start_relay()
    with trio.fail_after(10):
        async with stream(sse_url(relay, "symbols=AAPL,MSFT")) as events:
            ack = await events.next()
            assert ack["event"] == "subscribed" and ack["data"]["symbols"] == ["AAPL", "MSFT"]
            last: dict[str, int] = {}
            while set(last) != {"AAPL", "MSFT"}:
                event = await events.next()
                if event.get("event") == "price_update":
                    last[event["data"]["symbol"]] = event["data"]["seq"]
                    epoch, seqs = parse_event_id(event["id"]) or ("", {})
                    assert epoch == relay.hub.epoch
                    assert seqs == last  # every symbol's last seq so far: what a resume needs


async def test_reconnect_with_last_event_id_gets_exactly_the_missed_updates(start_relay: Any) -> None:
    # Pinned: the symbol keeps ticking (and its history growing) while no client holds it.
    relay = await start_relay(sim={"rate": 200.0}, upstream={"provider": "sim", "pinned": ["AAPL"]})
    url = sse_url(relay, "symbols=AAPL")
    with trio.fail_after(15):
        async with stream(url) as events:
            event, _ = await events.until(lambda e: e.get("event") == "price_update" and e["data"]["seq"] >= 5)
            last_id, last_seq = event["id"], event["data"]["seq"]
        # Gone for a while: the market moves on without us.
        await wait_seq(relay, "AAPL", last_seq + 20)
        async with stream(url, headers={"Last-Event-ID": last_id}) as events:
            ack = await events.next()
            assert ack["event"] == "subscribed" and ack["data"]["recovered"] is True
            seqs = []
            while len(seqs) < 25:
                event = await events.next()
                if event.get("event") == "price_update":
                    seqs.append(event["data"]["seq"])
            assert seqs == list(range(last_seq + 1, last_seq + 26))  # no gap, no repeat


async def test_an_unknown_epoch_says_recovered_false_and_sends_a_snapshot(start_relay: Any) -> None:
    relay = await start_relay()
    with trio.fail_after(10):
        async with stream(sse_url(relay, "symbols=AAPL&last_event_id=0-000000~AAPL:3")) as events:
            ack = await events.next()
            assert ack["data"]["recovered"] is False and ack["data"]["unrecovered"] == ["AAPL"]
            event, _ = await events.until(lambda e: e.get("event") == "price_update")
            assert event["data"]["epoch"] == relay.hub.epoch


async def test_options_apply_to_the_stream(start_relay: Any) -> None:
    relay = await start_relay(sim={"rate": 200.0})
    with trio.fail_after(10):
        async with stream(sse_url(relay, "symbols=AAPL&fields=last_price&delta=1&max_rate=50")) as events:
            ack = await events.next()
            assert ack["data"]["options"] == {
                "max_rate": 50.0,
                "fields": ["symbol", "last_price", "seq", "epoch"],
                "delta": True,
            }
            prices = []
            while len(prices) < 5:
                event = await events.next()
                if event.get("event") == "price_update":
                    prices.append(event["data"])
            assert "delta" not in prices[0] and all(p.get("delta") for p in prices[1:])
            assert all(set(p) <= {"type", "symbol", "last_price", "seq", "epoch", "delta"} for p in prices)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("", "missing_field"),
        ("symbols=not%20a%20symbol", "invalid_symbols"),
        ("symbols=AAPL&max_rate=fast", "invalid_max_rate"),
        ("symbols=AAPL&max_rate=1000", "invalid_max_rate"),
        ("symbols=AAPL&fields=price", "invalid_fields"),
    ],
)
async def test_a_bad_query_is_a_400_with_a_code(
    start_relay: Any, http: httpx.AsyncClient, query: str, code: str
) -> None:
    relay = await start_relay()
    response = await http.get(sse_url(relay, query))
    assert response.status_code == 400
    assert response.json()["error"] == code


async def test_auth_is_required_when_on(start_relay: Any, http: httpx.AsyncClient) -> None:
    relay = await start_relay(**auth_sections())
    response = await http.get(sse_url(relay, "symbols=AAPL"))
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"
    response = await http.get(sse_url(relay, "symbols=AAPL&token=nonsense"))
    assert response.status_code == 401
    response = await http.get(
        sse_url(relay, "symbols=MSFT"), headers={"authorization": f"Bearer {token({'symbols': ['AAPL']})}"}
    )
    assert response.status_code == 403 and response.json()["error"] == "forbidden_symbols"
    with trio.fail_after(10):
        async with stream(sse_url(relay, f"symbols=AAPL&token={token()}")) as events:
            event, _ = await events.until(lambda e: e.get("event") == "price_update")
            assert event["data"]["symbol"] == "AAPL"


async def test_heartbeat_comments_when_nothing_is_sent(start_relay: Any) -> None:
    relay = await start_relay(clients={"sse_heartbeat": 0.05}, sim={"rate": 0.001})
    with trio.fail_after(10):
        async with stream(sse_url(relay, "symbols=ZZZZ")) as events:
            await events.next()  # subscribed
            async for line in events._lines:
                if line.startswith(":"):
                    break
            assert line == ": keep-alive"


async def test_curl_streams_prices(start_relay: Any) -> None:
    """``curl -N .../sse/prices?symbols=AAPL`` prints price events as they come."""
    relay = await start_relay()
    url = sse_url(relay, "symbols=AAPL")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                lambda task_status: trio.run_process(
                    ["curl", "-sN", url], stdout=-1, check=False, task_status=task_status
                )
            )
            buffer = b""
            while buffer.count(b"event: price_update") < 3:
                buffer += await process.stdout.receive_some(4096)
            process.terminate()
    assert b"id: " in buffer and b'"type":"price_update"' in buffer


async def test_the_stream_counts_as_a_client_and_goes_when_the_peer_does(start_relay: Any) -> None:
    relay = await start_relay()
    with trio.fail_after(10):
        async with stream(sse_url(relay, "symbols=AAPL")) as events:
            await events.next()
            assert len(relay.hub.clients) == 1 and relay.hub.subscriber_count("AAPL") == 1
        await relay.hub.wait_no_clients()
    assert relay.hub.subscriber_count("AAPL") == 0
