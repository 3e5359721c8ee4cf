"""Fuzzing the client WebSocket protocol (Hypothesis) against the real daemon.

Each example starts a relay in a fresh Trio run, sends what Hypothesis made up, and checks that
the connection is still answered (or closed with a protocol code), that the relay still serves a
new client afterwards, and that every task ends when it shuts down (a leaked task would hang the
shutdown, which ``fail_after`` turns into a failure).
"""

from __future__ import annotations

import json
from typing import Any

import trio
import trio_websocket
from conftest import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_relay.daemon import Relay, run_relay

ACTIONS = ["subscribe", "unsubscribe", "ping", "list", "auth", "SUBSCRIBE", "", None, 7]
symbols = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["AAPL", "msft", "BRK.B", "BTC/USD", "^GSPC", " aapl ", "A" * 21, "ÄÖÜ", "\x00"]),
    st.integers(),
    st.none(),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
messages = st.one_of(
    st.fixed_dictionaries(
        {"action": st.sampled_from(ACTIONS)},
        optional={
            "symbols": st.one_of(st.lists(symbols, max_size=60), json_values),
            "since": st.one_of(st.dictionaries(st.text(max_size=8), st.integers(), max_size=4), json_values),
            "epoch": json_values,
            "batch": json_values,
            "token": json_values,
        },
    ).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
)

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


async def _with_relay(body: Any, **sections: Any) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            relay: Relay = await nursery.start(run_relay, make_config(**sections))
            await body(relay)
            # Everything the example did must be gone before shutdown.
            await relay.hub.wait_no_clients()
            relay.shutdown()


async def _still_serves(relay: Relay) -> None:
    async with trio_websocket.open_websocket_url(relay.ws_url) as ws:
        await ws.send_message('{"action":"ping"}')
        assert json.loads(await ws.get_message()) == {"type": "pong"}


@FUZZ
@given(batch=st.lists(messages, min_size=1, max_size=25))
def test_any_client_message_gets_an_answer_and_never_breaks_the_relay(batch: list[str]) -> None:
    async def body(relay: Relay) -> None:
        async with trio_websocket.open_websocket_url(relay.ws_url, message_queue_size=10_000) as ws:
            for text in batch:
                await ws.send_message(text)
            await ws.send_message('{"action":"ping"}')
            # Everything sent is answered in order; the connection is up; the ping is last.
            while True:
                reply = json.loads(await ws.get_message())
                assert isinstance(reply, (dict, list))
                if isinstance(reply, dict) and reply.get("type") == "pong" and reply == {"type": "pong"}:
                    break
        await _still_serves(relay)

    trio.run(_with_relay, body)


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=300))
def test_garbage_frames_close_the_connection_not_the_relay(garbage: bytes) -> None:
    async def body(relay: Relay) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        async with stream:
            await stream.send_all(
                b"GET /api/v2/realtime/ws/prices HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
            assert head.startswith(b"HTTP/1.1 101")
            try:
                await stream.send_all(garbage)
            except trio.BrokenResourceError:
                pass
        await _still_serves(relay)

    trio.run(_with_relay, body)


@FUZZ
@given(request=st.binary(min_size=1, max_size=500))
def test_garbage_requests_on_the_port_never_break_the_relay(request: bytes) -> None:
    async def body(relay: Relay) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        async with stream:
            try:
                await stream.send_all(request + b"\r\n\r\n")
            except trio.BrokenResourceError:
                pass
        await _still_serves(relay)

    trio.run(_with_relay, body)
