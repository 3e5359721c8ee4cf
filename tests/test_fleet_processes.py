"""The fleet as users run it: several ``trio-relay serve`` processes on one Redis, one upstream.

Real processes (``python -m trio_relay serve`` with ``engine.backend = redis``), the fake FMP
server in the test's nursery (it counts the upstream connections), real WebSocket clients, and
SIGKILL for the failures: a holder that dies, a relay whose demand must expire, a Redis server
that dies and comes back. Every wait is on a condition (a log line, a WebSocket message, the
fake server's state, or /health and /status polled every ``POLL_INTERVAL``) bounded by
``trio.fail_after``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio
import trio_websocket
from conftest import FMP_KEY, require

from trio_relay.testing.fake_fmp import FakeFmpServer

LOCK_TTL = 1.0  # engine.lock_ttl: a dead holder is replaced within ~lock_ttl + lock_ttl / 3
DEMAND_TTL = 1.5  # engine.demand_ttl: a dead relay's demand is forgotten after it
POLL_INTERVAL = 0.05  # between two reads of /health or /status
START_TIMEOUT = 20  # a relay process up and listening (imports on a busy 2-core machine)
TAKEOVER_LIMIT = 5.0  # a holder SIGKILLed is replaced within this (the expected figure: ~1.3 s)
STOP_TIMEOUT = 5  # SIGTERM → exit, before SIGKILL

T = TypeVar("T")


class Changes:
    """Wakes the waiters whenever something the test observes changes (a log line, a message)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def until(self, predicate: Callable[[], T], timeout: float) -> T:
        """``predicate()``'s first true value, re-checked at every change (fails after ``timeout``)."""
        with trio.fail_after(timeout):
            while not (value := predicate()):
                await self._event.wait()
            return value


class RelayProcess:
    """One ``trio-relay serve`` process; its stderr (the log) is read as it comes."""

    def __init__(self, node: str, proc: trio.Process, lines: list[str]) -> None:
        self.node = node
        self.proc = proc
        self.lines = lines  # appended to as the process writes them
        self.http_url = ""
        self.ws_url = ""

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def api(self, path: str) -> str:
        return f"{self.http_url}/api/v2/realtime{path}"

    def logged(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.log)


class Client:
    """A WebSocket client of one relay; every message it receives is kept, in order."""

    def __init__(self, relay: RelayProcess, ws: trio_websocket.WebSocketConnection) -> None:
        self.relay = relay
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.closed = False

    def prices(self, start: int = 0) -> list[dict[str, Any]]:
        return [m for m in self.messages[start:] if m.get("type") == "price_update"]

    def statuses(self, start: int = 0) -> list[dict[str, Any]]:
        return [m for m in self.messages[start:] if m.get("type") == "status" and m.get("scope") == "upstream"]


class Fleet:
    """Starts relay processes and clients; stops every process it started when the test ends."""

    def __init__(self, nursery: trio.Nursery, prefix: str, upstream_url: str, cwd: Path) -> None:
        self.nursery = nursery
        self.prefix = prefix
        self.upstream_url = upstream_url
        self.cwd = cwd
        self.redis_url = "redis://127.0.0.1:6379/0"
        self.changes = Changes()
        self.processes: list[trio.Process] = []
        self.http = httpx.AsyncClient(timeout=5)

    # ------------------------------------------------------------------ processes
    async def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[trio.Process, list[str]]:
        """Start a process whose merged stdout/stderr is appended, line by line, to the returned list."""
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.cwd, env=env
        )
        self.processes.append(proc)
        lines: list[str] = []
        self.nursery.start_soon(self._read_output, proc, lines)
        return proc, lines

    async def _read_output(self, proc: trio.Process, lines: list[str]) -> None:
        assert proc.stdout is not None
        pending = b""
        async with proc.stdout:
            while chunk := await proc.stdout.receive_some(65536):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                lines.extend(line.decode(errors="replace") for line in complete)
                self.changes.notify()
        lines.append("<exited>")
        self.changes.notify()

    async def start_relay(
        self, node: str, *, redis_url: str | None = None, settings: dict[str, str] | None = None
    ) -> RelayProcess:
        """Start ``trio-relay serve`` as fleet node ``node`` (``settings``: more TRIO_RELAY_* variables)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIO_RELAY_", "FMP_"))}
        env.update(
            FMP_API_KEY=FMP_KEY,
            TRIO_RELAY_ENGINE_BACKEND="redis",
            TRIO_RELAY_ENGINE_REDIS_URL=redis_url or self.redis_url,
            TRIO_RELAY_ENGINE_PREFIX=self.prefix,
            TRIO_RELAY_ENGINE_NODE_ID=node,
            TRIO_RELAY_ENGINE_LOCK_TTL=str(LOCK_TTL),
            TRIO_RELAY_ENGINE_DEMAND_TTL=str(DEMAND_TTL),
            TRIO_RELAY_UPSTREAM_UNSUBSCRIBE_LINGER="0",
            TRIO_RELAY_HISTORY_BACKEND="off",
            TRIO_RELAY_ALERTS_ENABLED="false",
        )
        env.update(settings or {})
        argv = [
            sys.executable,
            "-m",
            "trio_relay",
            "serve",
            "--port",
            "0",
            "--provider",
            "fmp",
            "--upstream-url",
            self.upstream_url,
        ]
        proc, lines = await self.spawn(argv, env)
        relay = RelayProcess(node, proc, lines)

        def ready() -> bool:
            assert "<exited>" not in lines, f"relay {node} exited while starting:\n{relay.log[-3000:]}"
            return bool(relay.logged(r"\[START\] client WebSocket: ") and relay.logged(r"\[FLEET\] node \S+ joined"))

        await self.changes.until(ready, START_TIMEOUT)
        http = relay.logged(r"\[START\] trio-relay listening on (http://\S+)")
        ws = relay.logged(r"\[START\] client WebSocket: (ws://\S+)")
        assert http and ws
        relay.http_url, relay.ws_url = http.group(1), ws.group(1)
        return relay

    async def start_relays(self, nodes: list[str], **kwargs: Any) -> list[RelayProcess]:
        """Start several relays at once (in the order of ``nodes``)."""
        started: dict[str, RelayProcess] = {}

        async def start(node: str) -> None:
            started[node] = await self.start_relay(node, **kwargs)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(start, node)
        return [started[node] for node in nodes]

    def kill(self, relay: RelayProcess) -> None:
        relay.proc.send_signal(signal.SIGKILL)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for proc in self.processes:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.processes:
                with trio.move_on_after(STOP_TIMEOUT):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await self.http.aclose()

    # ------------------------------------------------------------------ clients
    async def connect(self, relay: RelayProcess, symbols: list[str]) -> Client:
        ws = await trio_websocket.connect_websocket_url(self.nursery, relay.ws_url, message_queue_size=10_000)
        client = Client(relay, ws)
        self.nursery.start_soon(self._receive, client)
        await ws.send_message(json.dumps({"action": "subscribe", "symbols": symbols}))
        await self.changes.until(lambda: any(m.get("type") == "subscribed" for m in client.messages), 10)
        return client

    async def _receive(self, client: Client) -> None:
        try:
            while True:
                client.messages.append(json.loads(await client.ws.get_message()))
                self.changes.notify()
        except trio_websocket.ConnectionClosed:
            client.closed = True
            self.changes.notify()

    # ------------------------------------------------------------------ HTTP
    async def get(self, relay: RelayProcess, path: str) -> httpx.Response:
        return await self.http.get(relay.api(path))

    async def poll(
        self, relay: RelayProcess, path: str, predicate: Callable[[httpx.Response], bool], timeout: float
    ) -> httpx.Response:
        """GET ``path`` every POLL_INTERVAL until ``predicate(response)`` (fails after ``timeout``)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    response = await self.get(relay, path)
                except httpx.TransportError:
                    response = None
                if response is not None and predicate(response):
                    return response
                await trio.sleep(POLL_INTERVAL)

    async def fleet_status(self, relay: RelayProcess) -> dict[str, Any]:
        fleet: dict[str, Any] = (await self.get(relay, "/status")).json()["fleet"]
        return fleet

    async def holder(self, relays: list[RelayProcess], timeout: float) -> RelayProcess:
        """The relay whose /status says it holds the upstream, and every other one agrees."""
        with trio.fail_after(timeout):
            while True:
                fleets = [await self.fleet_status(r) for r in relays]
                holders = [r for r, f in zip(relays, fleets, strict=True) if f["role"] == "holder"]
                if len(holders) == 1 and all(f["holder"] == holders[0].node for f in fleets):
                    return holders[0]
                await trio.sleep(POLL_INTERVAL)


@asynccontextmanager
async def open_fleet(prefix: str, upstream_url: str, cwd: Path) -> AsyncIterator[Fleet]:
    async with trio.open_nursery() as nursery:
        fleet = Fleet(nursery, prefix, upstream_url, cwd)
        try:
            yield fleet
        finally:
            await fleet.aclose()
            nursery.cancel_scope.cancel()


async def count_peak_connections(fake: FakeFmpServer, peak: list[int]) -> None:
    """Keep ``peak[0]`` = the most upstream connections the fake server held at the same time."""

    def record() -> bool:
        peak[0] = max(peak[0], len(fake.connections))
        return False

    await fake.wait_until(record)


def check_numbering(client: Client) -> None:
    """Each (symbol, seq) at most once, and seq only going up, within an epoch."""
    last: dict[tuple[str, str], int] = {}
    for message in client.prices():
        key = (message["epoch"], message["symbol"])
        previous = last.get(key, 0)
        assert message["seq"] > previous, f"{client.relay.node}: {key} seq {message['seq']} after {previous}"
        last[key] = message["seq"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_holder_killed_another_takes_over_without_repeating_a_seq(
    fleet_prefix: str, fake_fmp: FakeFmpServer, tmp_path: Path
) -> None:
    symbols = ["AAPL", "MSFT"]
    peak = [0]
    async with trio.open_nursery() as watchers:
        watchers.start_soon(count_peak_connections, fake_fmp, peak)
        async with open_fleet(fleet_prefix, fake_fmp.url, tmp_path) as fleet:
            relays = await fleet.start_relays(["r1", "r2", "r3"])
            clients = [await fleet.connect(relay, symbols) for relay in relays]
            # Every client gets prices of both symbols, numbered the same way on every relay.
            await fleet.changes.until(
                lambda: all({m["symbol"] for m in c.prices()} == set(symbols) for c in clients), 10
            )
            holder = await fleet.holder(relays, 10)
            survivors = [r for r in relays if r is not holder]
            before = {c.relay.node: len(c.messages) for c in clients}
            top_seq = max(m["seq"] for c in clients for m in c.prices())

            fleet.kill(holder)
            killed_at = trio.current_time()
            took_over = await fleet.changes.until(
                lambda: next((r for r in survivors if r.logged(r"\[FLEET\] node \S+ now holds the upstream")), None),
                TAKEOVER_LIMIT,
            )
            takeover_s = trio.current_time() - killed_at
            assert takeover_s < TAKEOVER_LIMIT
            assert await fleet.holder(survivors, TAKEOVER_LIMIT) is took_over

            # The survivors' clients stay connected and get new prices (numbered on from before).
            survivor_clients = [c for c in clients if c.relay is not holder]
            await fleet.changes.until(
                lambda: all(
                    len([m for m in c.prices(before[c.relay.node]) if m["seq"] > top_seq]) >= 5
                    for c in survivor_clients
                ),
                10,
            )
            assert not any(c.closed for c in survivor_clients)
            for client in clients:
                check_numbering(client)
            # One sequence space across the takeover, and the same update under the same seq everywhere.
            assert len({m["epoch"] for c in clients for m in c.prices()}) == 1
            by_seq: dict[tuple[str, int], float] = {}
            for client in clients:
                for m in client.prices():
                    assert by_seq.setdefault((m["symbol"], m["seq"]), m["last_price"]) == m["last_price"]
            fleets = [await fleet.fleet_status(r) for r in survivors]
            assert sum(f["received"]["stale_token_dropped"] for f in fleets) == 0
            assert [f["token"] for f in fleets] == [fleets[0]["token"]] * 2 and fleets[0]["token"] >= 2
        watchers.cancel_scope.cancel()
    # One upstream connection at a time: the first holder's, then its successor's.
    assert peak[0] == 1
    assert fake_fmp.connections_total >= 2
    print(f"takeover in {takeover_s:.2f}s")


async def test_a_dead_relays_demand_expires_and_the_holder_unsubscribes(
    fleet_prefix: str, fake_fmp: FakeFmpServer, tmp_path: Path
) -> None:
    async with open_fleet(fleet_prefix, fake_fmp.url, tmp_path) as fleet:
        holder = await fleet.start_relay("holder")
        await fleet.changes.until(lambda: holder.logged(r"now holds the upstream"), 10)
        other = await fleet.start_relay("other")
        kept = await fleet.connect(holder, ["AAPL"])
        doomed = await fleet.connect(other, ["AAPL", "NVDA"])
        await fleet.changes.until(lambda: {m["symbol"] for m in doomed.prices()} == {"AAPL", "NVDA"}, 10)
        assert fake_fmp.subscriptions == {"AAPL", "NVDA"}

        fleet.kill(other)
        killed_at = trio.current_time()
        # Its key lives demand_ttl after its last refresh; the holder reads the union every
        # demand_ttl / 3; the linger is 0.
        with trio.fail_after(DEMAND_TTL + DEMAND_TTL / 3 + 2):
            await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL"})
        expired_s = trio.current_time() - killed_at
        status = (await fleet.get(holder, "/status")).json()
        assert status["upstream"]["subscribed"] == ["AAPL"]
        assert status["fleet"]["fleet_symbols"] == 1
        # The holder's own client is untouched.
        seen = len(kept.messages)
        await fleet.changes.until(lambda: len(kept.prices(seen)) >= 3, 5)
        assert not kept.closed
    print(f"demand expired after {expired_s:.2f}s (demand_ttl {DEMAND_TTL}s)")


def redis_server_or_skip() -> str:
    path = shutil.which("redis-server")
    if path is None:
        require("redis-server is not installed: the Redis restart test starts its own")
    assert path is not None
    return path


async def test_redis_restarted_relays_keep_clients_and_recover(
    fleet_prefix: str, fake_fmp: FakeFmpServer, tmp_path: Path
) -> None:
    redis_server = redis_server_or_skip()
    port = free_port()
    redis_argv = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    peak = [0]
    async with trio.open_nursery() as watchers:
        watchers.start_soon(count_peak_connections, fake_fmp, peak)
        async with open_fleet(fleet_prefix, fake_fmp.url, tmp_path) as fleet:

            async def start_redis() -> trio.Process:
                proc, lines = await fleet.spawn(redis_argv)
                await fleet.changes.until(lambda: any("Ready to accept connections" in line for line in lines), 10)
                return proc

            redis = await start_redis()
            url = f"redis://127.0.0.1:{port}/0"
            relays = await fleet.start_relays(["a", "b"], redis_url=url)
            clients = [await fleet.connect(relay, ["AAPL"]) for relay in relays]
            await fleet.changes.until(lambda: all(c.prices() for c in clients), 10)
            first_epoch = clients[0].prices()[-1]["epoch"]

            marks = [len(c.messages) for c in clients]  # before: "down" may come within ms
            redis.send_signal(signal.SIGKILL)
            await redis.wait()
            for relay in relays:
                down = await fleet.poll(relay, "/health", lambda r: r.status_code == 503, 10)
                assert down.json()["code"] == "redis_down"
                assert down.json()["fleet"]["redis"]["state"] == "down"
            # The clients are told, and stay connected.
            await fleet.changes.until(
                lambda: all(
                    any(s["state"] == "down" for s in c.statuses(mark)) for c, mark in zip(clients, marks, strict=True)
                ),
                10,
            )
            assert not any(c.closed for c in clients)
            assert peak[0] <= 1
            with trio.fail_after(5):
                await fake_fmp.wait_until(lambda: not fake_fmp.connections)  # the holder let go of the upstream

            await start_redis()
            for relay in relays:
                await fleet.poll(relay, "/health", lambda r: r.status_code == 200, 15)
            await fleet.holder(relays, 10)
            # Prices again, on the same connections, in the new Redis's sequence space.
            await fleet.changes.until(
                lambda: all(m["epoch"] != first_epoch for c in clients for m in c.prices()[-1:]), 10
            )
            assert not any(c.closed for c in clients)
            for client in clients:
                check_numbering(client)
            fleets = [await fleet.fleet_status(r) for r in relays]
            assert all(f["redis"]["state"] == "up" and f["redis"]["outages"] == 1 for f in fleets)
        watchers.cancel_scope.cancel()
    assert peak[0] == 1
