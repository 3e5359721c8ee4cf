"""The fleet under the faults a production fleet meets: every promise checked after each one.

Three real ``trio-relay serve`` processes share a private ``redis-server`` (started by the test
on a free port with no persistence, so it can be SIGKILLed, SIGSTOPped and restarted with its
data gone); the fake FMP server stamps every tick with its own time, so ``(symbol, timestamp)``
names one tick; each relay has clients that resume (``since``/``epoch``) on another relay when
theirs goes away. After each fault the test checks:

- prices again on every client within ``lock_ttl + 3`` s of the fault's end (:data:`RECOVERY`);
- no tick and no ``(epoch, symbol, seq)`` delivered twice to a client, seq only going up
  within an epoch;
- at most one upstream session at a time (a frozen holder: two for the freeze minus lock_ttl);
- ``status upstream down`` heard by every client of every live relay within about
  ``lock_ttl`` of losing the holder, and ``up`` after it;
- ``/health`` 503 during such an outage and 200 again within 1 s of prices flowing;
- demand released when a symbol's last client leaves.

Each test prints one ``CHAOS |`` line (fault, recovery time, duplicates, ticks lost): the fault
table of docs/fleet.md comes from ``pytest -s tests/test_fleet_chaos.py | grep CHAOS``. Every
wait is on a condition, bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio_websocket
from conftest import FMP_KEY
from test_fleet_processes import LOCK_TTL, Fleet, RelayProcess, free_port, open_fleet, redis_server_or_skip

from trio_relay.testing.fake_fmp import FakeFmpServer
from trio_relay.testing.tcpgate import TcpGate

SYMBOLS = ["AAPL", "MSFT", "NVDA"]
RATE = 20.0  # ticks per second per symbol
RECOVERY = LOCK_TTL + 3  # the promise: prices on every client within this of a fault's end
SIGNAL_BOUND = LOCK_TTL + 0.25  # "down" within lock_ttl of losing the holder (measured ~0.75 s), plus scheduling
HEALTH_LAG = 1.0  # /health follows the truth within this
HEALTH_POLL = 0.1
LINGER = 0.5  # upstream.unsubscribe_linger of every relay
FREEZE = 3.0  # a SIGSTOP lasts this long
SETTINGS = {
    "TRIO_RELAY_ENGINE_TIMEOUT": "0.5",
    "TRIO_RELAY_UPSTREAM_UNSUBSCRIBE_LINGER": str(LINGER),
    "TRIO_RELAY_CLIENTS_SYMBOL_STALE_AFTER": "0",
    # The provider's own reconnect backoff (default up to 30 s, full jitter) would dominate the
    # recovery from an upstream outage; capped here so the suite measures the fleet, not the
    # jitter (it once took 5.2 s under load with the default).
    "TRIO_RELAY_UPSTREAM_BACKOFF_MAX": "1.0",
}


# ---------------------------------------------------------------------- the pieces
class RedisServer:
    """A private redis-server the test can kill, pause and restart (its data is never saved)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.port = free_port()
        self.proc: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        argv = [
            redis_server_or_skip(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc, lines = await self.fleet.spawn(argv)
        await self.fleet.changes.until(lambda: any("Ready to accept connections" in line for line in lines), 10)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@attrs.define(eq=False)
class ResumingClient:
    """A WebSocket client that, when its relay goes away, resumes on the next live one."""

    name: str
    home: int  # index of its first relay; it moves on from there
    symbols: list[str]
    events: list[tuple[float, dict[str, Any]]] = attrs.Factory(list)  # (trio time, message)
    last: dict[str, tuple[str, int]] = attrs.Factory(dict)  # symbol → (epoch, seq) last seen
    relay: RelayProcess | None = None
    reconnects: int = 0
    ws: trio_websocket.WebSocketConnection | None = None
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)  # cancelled: it leaves for good
    connection: trio.CancelScope = attrs.Factory(trio.CancelScope)  # cancelled: this connection drops

    def drop(self) -> None:
        """Lose the connection abruptly (as on a network cut); the client resumes at once."""
        self.connection.cancel()

    def prices(self, after: float = -1.0) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.events if t > after and m.get("type") == "price_update"]

    def statuses(self, after: float = -1.0) -> list[tuple[float, str]]:
        return [
            (t, m["state"])
            for t, m in self.events
            if t > after and m.get("type") == "status" and m.get("scope") == "upstream"
        ]

    def acks(self) -> list[dict[str, Any]]:
        return [m for _t, m in self.events if m.get("type") == "subscribed"]

    def resume_request(self) -> dict[str, Any]:
        message: dict[str, Any] = {"action": "subscribe", "symbols": self.symbols}
        if self.last:
            epoch = max(self.last.values(), key=lambda v: v[1])[0]
            since = {s: seq for s, (e, seq) in self.last.items() if e == epoch and s in self.symbols}
            if since:
                message.update(since=since, epoch=epoch)
        return message


class Chaos:
    """A fleet of three relays on a private Redis, with resuming clients and /health watchers."""

    def __init__(
        self, fleet: Fleet, redis: RedisServer, fake: FakeFmpServer, gate: TcpGate, nursery: trio.Nursery
    ) -> None:
        self.fleet = fleet
        self.gate = gate  # between the relays and the upstream: cut = the provider is unreachable
        self.redis = redis
        self.fake = fake
        self.nursery = nursery
        self.relays: list[RelayProcess] = []
        self.clients: list[ResumingClient] = []
        self.health: dict[str, list[tuple[float, int]]] = {}  # node → (trio time, status code)
        self.sessions: list[tuple[float, int]] = [(trio.current_time(), 0)]  # upstream connections over time
        self.clock_offset = time.time() - trio.current_time()  # trio time → wall clock

    def wall(self, t: float) -> float:
        return t + self.clock_offset

    def alive(self, relay: RelayProcess) -> bool:
        return relay.proc.returncode is None

    # ------------------------------------------------------------------ setup
    async def start_relays(self, nodes: list[str]) -> list[RelayProcess]:
        relays = await self.fleet.start_relays(nodes, redis_url=self.redis.url, settings=SETTINGS)
        self.relays += relays
        for relay in relays:
            self.health[relay.node] = []
            self.nursery.start_soon(self._watch_health, relay)
        return relays

    async def connect(self, name: str, home: int, symbols: list[str] = SYMBOLS) -> ResumingClient:
        client = ResumingClient(name, home, list(symbols))
        self.clients.append(client)
        self.nursery.start_soon(self._run_client, client)
        await self.fleet.changes.until(lambda: client.acks(), 10)
        return client

    def leave(self, client: ResumingClient) -> None:
        """The client goes away for good (its connection closes, it does not come back)."""
        self.clients.remove(client)
        client.scope.cancel()

    async def _run_client(self, client: ResumingClient) -> None:
        with client.scope:
            await self._client_session(client)

    async def _client_session(self, client: ResumingClient) -> None:
        while True:
            # Its home relay if alive, else the next live one.
            ring = self.relays[client.home % len(self.relays) :] + self.relays[: client.home % len(self.relays)]
            relay = next((r for r in ring if self.alive(r)), None)
            assert relay is not None, "no relay left"
            client.connection = trio.CancelScope()
            try:
                with client.connection:
                    await self._connection(client, relay)
            except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, OSError):
                pass
            client.relay = client.ws = None
            client.reconnects += 1
            self.fleet.changes.notify()
            await trio.sleep(0.1)

    async def _connection(self, client: ResumingClient, relay: RelayProcess) -> None:
        async with trio_websocket.open_websocket_url(relay.ws_url, message_queue_size=10_000) as ws:
            client.relay, client.ws = relay, ws
            await ws.send_message(json.dumps(client.resume_request()))
            while True:
                message = json.loads(await ws.get_message())
                client.events.append((trio.current_time(), message))
                if message.get("type") == "price_update":
                    client.last[message["symbol"]] = (message["epoch"], message["seq"])
                self.fleet.changes.notify()

    async def _watch_health(self, relay: RelayProcess) -> None:
        samples = self.health[relay.node]
        async with httpx.AsyncClient(timeout=2) as http:
            while self.alive(relay):
                try:
                    response = await http.get(relay.api("/health"))
                    samples.append((trio.current_time(), response.status_code))
                    self.fleet.changes.notify()
                except httpx.TransportError:
                    pass
                await trio.sleep(HEALTH_POLL)

    async def count_sessions(self) -> None:
        def record() -> bool:
            if len(self.fake.connections) != self.sessions[-1][1]:
                self.sessions.append((trio.current_time(), len(self.fake.connections)))
            return False

        await self.fake.wait_until(record)

    # ------------------------------------------------------------------ observe
    async def holder(self, timeout: float = 10) -> RelayProcess:
        return await self.fleet.holder([r for r in self.relays if self.alive(r)], timeout)

    async def flowing(
        self, after: float, timeout: float, clients: list[ResumingClient] | None = None
    ) -> dict[str, float]:
        """Wait until every client got a tick stamped after ``after``; when each did (trio time)."""
        clients = self.clients if clients is None else clients
        wall_ms = self.wall(after) * 1000
        got: dict[str, float] = {}

        def all_fresh() -> bool:
            for client in clients:
                if client.name not in got:
                    fresh = [t for t, m in client.prices(after) if m["timestamp"] > wall_ms]
                    if fresh:
                        got[client.name] = fresh[0]
            return len(got) == len(clients)

        try:
            await self.fleet.changes.until(all_fresh, timeout)
        except trio.TooSlowError:
            late = [c.name for c in clients if c.name not in got]
            raise AssertionError(f"no fresh price within {timeout}s on {late}; logs:\n{self.logs()}") from None
        return got

    def logs(self) -> str:
        return "\n".join(f"--- {r.node}\n" + "\n".join(r.lines[-25:]) for r in self.relays)

    def peak_sessions(self, start: float, end: float = float("inf")) -> int:
        before = [n for t, n in self.sessions if t <= start][-1:]
        during = [n for t, n in self.sessions if start < t <= end]
        return max(before + during, default=0)

    def double_session_time(self) -> float:
        """Seconds during which two or more upstream sessions were open."""
        total = 0.0
        for (t, n), (t_next, _n) in zip(self.sessions, [*self.sessions[1:], (trio.current_time(), 0)]):
            if n >= 2:
                total += t_next - t
        return total

    # ------------------------------------------------------------------ the invariants
    def duplicates(self, client: ResumingClient) -> int:
        """Ticks or (epoch, symbol, seq) seen twice; asserts seq only goes up within an epoch."""
        seqs: set[tuple[str, str, int]] = set()
        ticks: set[tuple[str, int]] = set()
        last: dict[tuple[str, str], int] = {}
        repeats = 0
        for _t, m in client.prices():
            key, numbered, tick = (
                (m["epoch"], m["symbol"]),
                (m["epoch"], m["symbol"], m["seq"]),
                (m["symbol"], m["timestamp"]),
            )
            if numbered in seqs or tick in ticks:
                repeats += 1
            else:
                assert m["seq"] > last.get(key, 0), f"{client.name}: {key} seq {m['seq']} after {last.get(key)}"
            seqs.add(numbered)
            ticks.add(tick)
            last[key] = max(m["seq"], last.get(key, 0))
        return repeats

    def lost(self, client: ResumingClient, start: float, end: float) -> int:
        """Ticks the fake sent in [start, end] (trio time) of the client's symbols that it never got."""
        got = {(m["symbol"], m["timestamp"]) for _t, m in client.prices()}
        first = min((m["timestamp"] for _t, m in client.prices()), default=0)  # it joined then
        lo, hi = max(self.wall(start) * 1000, first), self.wall(end) * 1000
        return sum(
            1 for s in client.symbols for ts in self.fake.sent.get(s, ()) if lo <= ts <= hi and (s, ts) not in got
        )

    def check(
        self,
        fault: str,
        start: float,
        end: float,
        recovered: dict[str, float],
        *,
        holder_lost: bool = False,
        max_sessions: int = 1,
        frozen: RelayProcess | None = None,
        back: dict[str, float] | None = None,
    ) -> None:
        """Every invariant after a fault that ran from ``start`` to ``end``; prints its table row."""
        recovery = max(recovered.values()) - end
        assert recovery <= RECOVERY, f"{fault}: prices back after {recovery:.2f}s"
        repeats = sum(self.duplicates(c) for c in self.clients)
        assert repeats == 0, f"{fault}: {repeats} updates delivered twice"
        lost = max(self.lost(c, start, max(recovered.values())) for c in self.clients)
        peak = self.peak_sessions(start)
        assert peak <= max_sessions, f"{fault}: {peak} upstream sessions at once"
        heard = ""
        if holder_lost:
            delays = []
            for client in self.clients:
                statuses = client.statuses(start)
                downs = [t for t, s in statuses if s == "down"]
                if not downs and client.reconnects:
                    continue  # its relay died: it resumed elsewhere (checked by the prices)
                assert downs, f"{fault}: {client.name} heard no 'down' ({statuses})"
                assert any(t > downs[0] and s == "up" for t, s in statuses), (
                    f"{fault}: {client.name} heard no 'up' after 'down'"
                )
                if client.relay is not frozen:  # a frozen relay says nothing until it wakes
                    delays.append(downs[0] - start)
            if delays:
                assert max(delays) <= SIGNAL_BOUND, f"{fault}: 'down' heard after {max(delays):.2f}s"
                heard = f"down after {max(delays):.2f}s"
        self.check_health(fault, start, back or recovered, outage=holder_lost, frozen=frozen)
        print(
            f"CHAOS | {fault} | prices back {recovery:.2f}s after the fault's end | duplicates {repeats} "
            f"| ticks lost (worst client) {lost} | peak upstream sessions {peak} | {heard}"
        )

    def check_health(
        self, fault: str, start: float, recovered: dict[str, float], *, outage: bool, frozen: RelayProcess | None
    ) -> None:
        for relay in self.relays:
            if not self.alive(relay) or relay is frozen:
                continue  # a frozen relay answers nothing: its /health was a timeout
            samples = [(t, code) for t, code in self.health[relay.node] if t >= start]
            mine = [recovered[c.name] for c in self.clients if c.relay is relay and c.name in recovered]
            back = max(mine, default=max(recovered.values()))
            if outage and back - start > LOCK_TTL + HEALTH_LAG:
                assert any(code == 503 for t, code in samples if t <= back), f"{fault}: {relay.node} /health never 503"
            late = [(round(t - back, 2), code) for t, code in samples if t > back + HEALTH_LAG and code != 200]
            assert not late, f"{fault}: {relay.node} /health not 200 after prices came back: {late[:5]}"

    async def settle(self) -> None:
        """Wait until every live relay's /health was sampled three times past its HEALTH_LAG from now."""
        after = trio.current_time() + HEALTH_LAG
        await self.fleet.changes.until(
            lambda: all(
                sum(t > after for t, _ in self.health[relay.node]) >= 3 for relay in self.relays if self.alive(relay)
            ),
            HEALTH_LAG + 10,
        )


@asynccontextmanager
async def open_chaos(tmp_path: Path, nodes: tuple[str, ...] = ("r1", "r2", "r3")) -> AsyncIterator[Chaos]:
    async with (
        FakeFmpServer.open(api_keys=[FMP_KEY], rate=RATE, heartbeat_interval=1.0, tick=0.02) as fake,
        trio.open_nursery() as gates,
    ):
        gate = TcpGate("127.0.0.1", fake.port)
        await gates.start(gate.run)
        async with open_fleet("chaos", f"ws://{gate.url_host}", tmp_path) as fleet, trio.open_nursery() as nursery:
            redis = RedisServer(fleet)
            await redis.start()
            chaos = Chaos(fleet, redis, fake, gate, nursery)
            nursery.start_soon(chaos.count_sessions)
            await chaos.start_relays(list(nodes))
            for i in range(len(nodes)):
                await chaos.connect(f"c{i + 1}", i)
            await chaos.flowing(trio.current_time(), 10)
            await chaos.holder()
            try:
                yield chaos
            finally:
                nursery.cancel_scope.cancel()
                gates.cancel_scope.cancel()


# ---------------------------------------------------------------------- the faults
async def test_holder_sigkill(tmp_path: Path) -> None:
    async with open_chaos(tmp_path) as chaos:
        holder = await chaos.holder()
        start = trio.current_time()
        holder.proc.send_signal(signal.SIGKILL)
        recovered = await chaos.flowing(start, RECOVERY + 5)
        await chaos.settle()
        chaos.check("holder SIGKILL", start, start, recovered, holder_lost=True)


async def test_holder_sigterm(tmp_path: Path) -> None:
    async with open_chaos(tmp_path) as chaos:
        holder = await chaos.holder()
        start = trio.current_time()
        holder.proc.send_signal(signal.SIGTERM)
        recovered = await chaos.flowing(start, RECOVERY + 5)
        await chaos.settle()
        chaos.check("holder SIGTERM", start, start, recovered)


async def test_holder_frozen(tmp_path: Path) -> None:
    async with open_chaos(tmp_path) as chaos:
        holder = await chaos.holder()
        others = [c for c in chaos.clients if c.relay is not holder]
        start = trio.current_time()
        holder.proc.send_signal(signal.SIGSTOP)
        taken_over = await chaos.flowing(start, RECOVERY + 5, others)
        await trio.sleep_until(start + FREEZE)
        holder.proc.send_signal(signal.SIGCONT)
        end = trio.current_time()
        recovered = await chaos.flowing(end, RECOVERY + 5)
        await chaos.settle()
        takeover = max(taken_over.values()) - start
        assert takeover <= RECOVERY
        # Two upstream sessions while the frozen holder's is still open: the freeze minus the
        # lock's life at most (plus the time the woken holder takes to close its own).
        doubled = chaos.double_session_time()
        assert doubled <= FREEZE - LOCK_TTL + 1.0, doubled
        chaos.check(
            f"holder SIGSTOP {FREEZE:g}s (takeover {takeover:.2f}s, two sessions {doubled:.2f}s)",
            start,
            end,
            recovered,
            holder_lost=True,
            max_sessions=2,
            frozen=holder,
            back={**recovered, **taken_over},
        )


async def test_redis_restarted_with_its_data_lost_after_a_holder_change(tmp_path: Path) -> None:
    async with open_chaos(tmp_path) as chaos:
        # An earlier holder change: the fencing counter is past 1 when Redis loses it.
        holder = await chaos.holder()
        holder.proc.send_signal(signal.SIGTERM)
        await chaos.flowing(trio.current_time(), RECOVERY + 5)
        # Every client's seqs well above what a new epoch starts from (20 ticks/s: ~2 s).
        await chaos.fleet.changes.until(
            lambda: all(c.last and min(seq for _epoch, seq in c.last.values()) >= 40 for c in chaos.clients), 15
        )
        epochs = {m["epoch"] for c in chaos.clients for _t, m in c.prices()}
        start = trio.current_time()
        await chaos.redis.kill()
        await chaos.redis.start()
        end = trio.current_time()
        recovered = await chaos.flowing(end, RECOVERY + 5)
        await chaos.settle()
        chaos.check("Redis SIGKILL + restart, data lost", start, end, recovered, holder_lost=True)
        # A new epoch, announced to every client, numbering from 1 again.
        for client in chaos.clients:
            new = [m for _t, m in client.prices(start) if m["epoch"] not in epochs]
            assert new, client.name
            assert min(m["seq"] for m in new) <= 3, new[:3]


async def test_redis_paused(tmp_path: Path) -> None:
    async with open_chaos(tmp_path) as chaos:
        start = trio.current_time()
        chaos.redis.pause()
        await trio.sleep(FREEZE)
        chaos.redis.resume()
        end = trio.current_time()
        recovered = await chaos.flowing(end, RECOVERY + 5)
        await chaos.settle()
        chaos.check(f"Redis SIGSTOP {FREEZE:g}s", start, end, recovered, holder_lost=True)


async def test_upstream_connections_dropped(tmp_path: Path) -> None:
    async with open_chaos(tmp_path) as chaos:
        start = trio.current_time()
        await chaos.fake.drop_all()
        recovered = await chaos.flowing(start, RECOVERY + 5)
        await chaos.settle()
        chaos.check("upstream connection dropped", start, start, recovered)


async def test_upstream_unreachable_then_back(tmp_path: Path) -> None:
    async with open_chaos(tmp_path) as chaos:
        start = trio.current_time()
        chaos.gate.cut()  # the provider goes away (connection reset, new connections refused)
        await trio.sleep(FREEZE)
        chaos.gate.reopen()
        end = trio.current_time()
        recovered = await chaos.flowing(end, RECOVERY + 5)
        await chaos.settle()
        chaos.check(f"upstream unreachable {FREEZE:g}s", start, end, recovered, holder_lost=True)


async def test_a_symbols_last_client_leaves_and_a_relay_joins(tmp_path: Path) -> None:
    async with open_chaos(tmp_path) as chaos:
        holder = await chaos.holder()
        follower = next(i for i, r in enumerate(chaos.relays) if r is not holder)
        lonely = await chaos.connect("lonely", follower, ["TSLA"])
        await chaos.flowing(trio.current_time(), 10, [lonely])
        assert "TSLA" in chaos.fake.subscriptions
        left = trio.current_time()
        chaos.leave(lonely)
        with trio.fail_after(2 * LINGER + 1.5 + 1.0):  # the relay's linger, the holder's, demand_ttl
            await chaos.fake.wait_until(lambda: "TSLA" not in chaos.fake.subscriptions)
        released = trio.current_time() - left

        start = trio.current_time()
        (joined,) = await chaos.start_relays(["r4"])
        await chaos.connect("c4", len(chaos.relays) - 1)
        end = trio.current_time()
        recovered = await chaos.flowing(end, RECOVERY)
        await chaos.settle()
        assert all(not c.statuses(start) for c in chaos.clients), "a relay joining disturbed the fleet"
        chaos.check(
            f"relay joins (a lone symbol released upstream {released:.2f}s after its last client left)",
            start,
            end,
            recovered,
        )
        assert joined.node == "r4"


async def test_resume_on_a_relay_that_does_not_follow_the_symbol(tmp_path: Path) -> None:
    async with open_chaos(tmp_path, nodes=("r1", "r2")) as chaos:
        mover = await chaos.connect("mover", 0, ["TSLA"])
        await chaos.flowing(trio.current_time(), 10, [mover])
        # No tick while it moves: the state r2 reads from the shared cache is exactly the last
        # one the client has (the case that was delivered twice).
        chaos.fake.stall()
        last = mover.last["TSLA"]
        with trio.fail_after(5):
            while True:  # the last tick in flight has arrived
                await trio.sleep(0.2)
                if mover.last["TSLA"] == last:
                    break
                last = mover.last["TSLA"]
        start = trio.current_time()
        mover.home = 1  # r2: nobody there follows TSLA
        mover.drop()
        await chaos.fleet.changes.until(lambda: len(mover.acks()) == 2 and mover.relay is chaos.relays[1], 5)
        await chaos.fleet.changes.until(lambda: "TSLA" in chaos.fake.subscriptions, 5)
        await trio.sleep(0.5)  # r2 read the cache and would have sent it by now
        assert not mover.prices(start), mover.prices(start)
        resumed = mover.acks()[-1]
        assert resumed["recovered"] is False and resumed["unrecovered"] == ["TSLA"], resumed
        chaos.fake.resume()
        end = trio.current_time()
        recovered = await chaos.flowing(end, RECOVERY, [mover])
        await chaos.settle()
        assert mover.prices(start)[0][1]["seq"] == last[1] + 1
        chaos.check(
            "client resumes on a relay that did not follow its symbol",
            start,
            end,
            {**{c.name: start for c in chaos.clients}, **recovered},
        )
