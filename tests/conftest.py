"""Shared fixtures: real servers on port 0 in the test's nursery, real clients."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import trio_websocket

from trio_relay.config import Config, load_config
from trio_relay.daemon import Relay, run_relay
from trio_relay.testing.fake_fmp import FakeFmpServer

FMP_KEY = "fmp-test-key-5f3a9c2e71"  # long enough to be masked, unique enough to grep for


def make_config(**sections: dict[str, Any]) -> Config:
    """A config with port 0 and fast timings, plus ``sections`` overrides."""
    base: dict[str, dict[str, Any]] = {
        "server": {"port": 0, "graceful_timeout": 1.0},
        "upstream": {"provider": "sim", "unsubscribe_linger": 0.0},
        "sim": {"rate": 50.0},
        "history": {"backend": "off"},  # a test that wants history sets it (with a tmp data_dir)
        "alerts": {"enabled": False},  # likewise (they write data_dir/app.sqlite3)
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return load_config(environ={}, overrides=base, dotenv=None)


@pytest.fixture
async def start_relay(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    """``relay = await start_relay(**sections)``: the real daemon (Hypercorn on a free port)."""
    relays: list[Relay] = []

    async def start(**sections: dict[str, Any]) -> Relay:
        relay: Relay = await nursery.start(run_relay, make_config(**sections))
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        relay.shutdown()


@pytest.fixture
async def fake_fmp() -> AsyncIterator[FakeFmpServer]:
    async with FakeFmpServer.open(api_keys=[FMP_KEY], rate=50.0, heartbeat_interval=1.0) as server:
        yield server


def fmp_sections(fake: FakeFmpServer, **upstream: Any) -> dict[str, dict[str, Any]]:
    return {
        "upstream": {"provider": "fmp", "unsubscribe_linger": 0.0, **upstream},
        "fmp": {"api_key": FMP_KEY, "url": fake.url, "login_timeout": 1.0},
    }


class JsonWsClient:
    """A real WebSocket client that speaks JSON."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(obj if isinstance(obj, str) else json.dumps(obj))

    async def recv(self) -> Any:
        return json.loads(await self.ws.get_message())

    async def recv_until(self, predicate: Callable[[Any], bool], limit: int = 10_000) -> tuple[Any, list[Any]]:
        """Read until a message matches; returns it and everything read before it."""
        seen: list[Any] = []
        for _ in range(limit):
            msg = await self.recv()
            if predicate(msg):
                return msg, seen
            seen.append(msg)
        raise AssertionError(f"no matching message in {limit}: last {seen[-3:]}")

    async def request(self, obj: Any, reply_type: str) -> Any:
        """Send, then return the first reply of ``reply_type`` (skipping price updates)."""
        await self.send(obj)
        msg, _ = await self.recv_until(lambda m: isinstance(m, dict) and m.get("type") in (reply_type, "error"))
        return msg


@pytest.fixture
async def ws_connect() -> AsyncIterator[Callable[..., Any]]:
    """``client = await ws_connect(relay)``: a client connection closed at the end of the test."""
    async with trio.open_nursery() as nursery:

        async def connect(relay: Relay, query: str = "") -> JsonWsClient:
            ws = await trio_websocket.connect_websocket_url(nursery, relay.ws_url + query, message_queue_size=10_000)
            return JsonWsClient(ws)

        yield connect
        nursery.cancel_scope.cancel()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def api(relay: Relay, path: str) -> str:
    return f"{relay.http_url}/api/v2/realtime{path}"


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


async def wait_cached(relay: Relay, symbol: str) -> None:
    """Wait (on a hub callback, not a timer) until ``symbol`` has a cached price."""
    if relay.hub.snapshot(symbol) is not None:
        return
    arrived = trio.Event()
    unregister = relay.hub.add_callback(lambda u: arrived.set() if u.symbol == symbol else None)
    try:
        await arrived.wait()
    finally:
        unregister()


async def close_code(ws: trio_websocket.WebSocketConnection) -> int:
    """Read (and drop) messages until the server closes; the close code it sent."""
    try:
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed as exc:
        assert exc.reason is not None
        return exc.reason.code


async def wait_state(relay: Relay, state: str) -> None:
    """Wait until the relay's upstream is in ``state`` (re-checked whenever the run loop idles)."""
    while relay.upstream.state != state:
        await trio.testing.wait_all_tasks_blocked()


def require(missing: str | None) -> None:
    """A real service or tool the test needs: skip with why it is ``missing`` (None: all there).

    Under CI (``CI=true``) it fails instead: CI provides every service, so missing there is a
    broken CI, not a skip.
    """
    import os

    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing}: CI must provide it")
    pytest.skip(missing)


REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def redis_unreachable() -> str | None:
    """Why Redis cannot be used here (None: it answers)."""
    import socket

    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                return f"Redis at {REDIS_HOST}:{REDIS_PORT} did not answer PING"
    except OSError as exc:
        return f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} ({exc})"
    return None


@pytest.fixture
def fleet_prefix() -> Any:
    """A fresh fleet prefix on the real Redis; its keys are deleted afterwards.

    Skipped when Redis is unreachable, except in CI (CI=true), where that is a failure.
    """
    import uuid

    require(redis_unreachable())
    prefix = f"test-fleet-{uuid.uuid4().hex[:10]}"
    yield prefix
    redis_command(
        "EVAL", "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end", "0", prefix + ":*"
    )


def redis_command(*args: str) -> bytes:
    """One command to the real Redis over a plain socket (set-up and clean-up; the raw reply)."""
    import socket

    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=5) as sock:
        sock.sendall(payload)
        return sock.recv(65536)
