"""A local server that speaks FMP's WebSocket protocol, for tests and demos.

It checks the API key on login (``{"event":"login","status":200,"message":"Authenticated"}`` or
``401 Unauthorized`` then a close), honours subscribe/unsubscribe with lower-case tickers, streams
simulated ticks as FMP frames (``t`` in nanoseconds, like FMP's stock examples), sends
``{"event":"heartbeat"}``, and can misbehave on request: drop every connection abruptly, stall
(send nothing, not even heartbeats), send malformed frames, or push any raw frame.

Everything a test wants to observe is an attribute (``subscriptions``, ``history``, ``logins``...)
and :meth:`wait_until` waits for a condition without sleeping.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import attrs
import msgspec
import trio
import trio_websocket

from ..model import Update
from ..providers.sim import SimMarket

__all__ = ["FakeFmpServer"]

log = logging.getLogger("trio_relay.testing.fake_fmp")

MALFORMED_FRAMES = (
    "this is not json",
    '{"s": "aapl", "type": "T"',  # truncated
    '{"s": 42, "t": 1, "type": "T", "lp": 1.0}',  # symbol of the wrong type
    '{"s": "aapl", "t": 1699564800000, "type": "Z", "lp": 1.0}',  # unknown type
    '{"s": "aapl", "t": 1699564800000, "type": "T", "lp": "cheap"}',  # price of the wrong type
    "[1, 2, 3]",
)

_enc = msgspec.json.Encoder()


@attrs.define(eq=False)
class _Conn:
    id: int
    ws: trio_websocket.WebSocketConnection
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    subscribed: set[str] = attrs.Factory(set)
    logged_in: bool = False
    wake: trio.Event = attrs.Factory(trio.Event)


def fmp_frame(update: Update, unit: str = "ns") -> str:
    """An update as FMP would send it (lower-case ticker, all price fields present)."""
    scale = {"ns": 1_000_000, "us": 1_000, "ms": 1, "s": 0.001}[unit]
    t = int(update.timestamp * scale)
    return _enc.encode(
        {
            "s": update.symbol.lower(),
            "t": t,
            "type": update.kind,
            "ap": update.ask_price,
            "as": update.ask_size,
            "bp": update.bid_price,
            "bs": update.bid_size,
            "lp": update.last_price,
            "ls": update.last_size,
        }
    ).decode()


class FakeFmpServer:
    """Run with ``async with FakeFmpServer.open(...) as fake:``; ``fake.url`` is its address."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = ("test-key",),
        rate: float = 20.0,
        seed: int = 7,
        heartbeat_interval: float = 10.0,
        tick: float = 0.02,
        login_reply: bool = True,
        ts_unit: str = "ns",
    ) -> None:
        self.api_keys = set(api_keys)
        self.rate = rate  # frames per second per subscribed symbol
        self.heartbeat_interval = heartbeat_interval
        self.tick = tick
        self.login_reply = login_reply
        self.ts_unit = ts_unit
        self.market = SimMarket(seed)
        self.port = 0
        self.connections: list[_Conn] = []
        self.connections_total = 0
        self.logins = 0
        self.failed_logins = 0
        self.frames_sent = 0
        self.history: list[tuple[str, tuple[str, ...]]] = []  # ("subscribe", ("AAPL",)), ...
        self.received_keys: list[str] = []  # what clients sent as apiKey (tests check no leak)
        self.stalled = False
        self._resume = trio.Event()
        self._pending_malformed: list[str] = []
        self._ids = itertools.count(1)
        self._changed = trio.Event()

    # ------------------------------------------------------------------ observe
    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def subscriptions(self) -> set[str]:
        """Upper-case symbols subscribed on the logged-in connections."""
        out: set[str] = set()
        for conn in self.connections:
            if conn.logged_in:
                out |= conn.subscribed
        return out

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (no polling) until ``predicate()`` is true after some server-side change."""
        while not predicate():
            await self._changed.wait()

    # ------------------------------------------------------------------ faults
    async def drop_all(self) -> int:
        """Abruptly close every connection (TCP close, no WebSocket close frame)."""
        conns = list(self.connections)
        for conn in conns:
            conn.scope.cancel()
            # trio-websocket has no public abort; a fake may reach for the socket.
            await trio.aclose_forcefully(conn.ws._stream)
        return len(conns)

    def stall(self) -> None:
        """Send nothing at all (no data, no heartbeats) until :meth:`resume`."""
        self.stalled = True

    def resume(self) -> None:
        self.stalled = False
        self._resume.set()
        self._resume = trio.Event()

    def send_malformed(self, count: int = len(MALFORMED_FRAMES)) -> None:
        """Queue ``count`` malformed frames for every connection."""
        frames = itertools.islice(itertools.cycle(MALFORMED_FRAMES), count)
        self._pending_malformed.extend(frames)
        for conn in self.connections:
            conn.wake.set()

    async def inject(self, frame: str) -> None:
        """Send one raw frame to every logged-in connection."""
        for conn in list(self.connections):
            if conn.logged_in:
                await conn.ws.send_message(frame)

    # ------------------------------------------------------------------ serve
    @classmethod
    @asynccontextmanager
    async def open(cls, host: str = "127.0.0.1", port: int = 0, **kwargs: object) -> AsyncIterator[FakeFmpServer]:
        server = cls(**kwargs)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, host, port)
            yield server
            nursery.cancel_scope.cancel()

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(
                trio_websocket.serve_websocket, self._handle, host, port, None
            )
            self.port = ws_server.port
            log.info("fake FMP server on %s", self.url)
            task_status.started()

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        conn = _Conn(next(self._ids), ws)
        self.connections.append(conn)
        self.connections_total += 1
        self._notify()
        try:
            with conn.scope:
                if not await self._login(conn):
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._stream, conn)
                    nursery.start_soon(self._heartbeat, conn)
                    await self._read(conn)
                    nursery.cancel_scope.cancel()
        except* (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # from the nursery these arrive grouped: a client going away is not an error
        finally:
            self.connections.remove(conn)
            self._notify()

    async def _login(self, conn: _Conn) -> bool:
        with trio.move_on_after(30):
            raw = await conn.ws.get_message()
            try:
                msg = msgspec.json.decode(raw)
                key = msg["data"]["apiKey"] if msg.get("event") == "login" else None
            except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
                key = None
            if key is not None:
                self.received_keys.append(key)
            if key in self.api_keys:
                conn.logged_in = True
                self.logins += 1
                self._notify()
                if self.login_reply:
                    await conn.ws.send_message('{"event":"login","status":200,"message":"Authenticated"}')
                return True
            self.failed_logins += 1
            self._notify()
            await conn.ws.send_message('{"event":"login","status":401,"message":"Unauthorized"}')
            await conn.ws.aclose(1008, "Unauthorized")
            return False
        await conn.ws.aclose(1008, "login timeout")
        return False

    async def _read(self, conn: _Conn) -> None:
        while True:
            raw = await conn.ws.get_message()
            try:
                msg = msgspec.json.decode(raw)
                event = msg["event"]
                tickers = msg["data"]["ticker"]
            except (msgspec.DecodeError, KeyError, TypeError):
                await conn.ws.send_message('{"event":"error","message":"invalid message"}')
                continue
            symbols = tuple(t.upper() for t in ([tickers] if isinstance(tickers, str) else tickers))
            if event == "subscribe":
                conn.subscribed.update(symbols)
            elif event == "unsubscribe":
                conn.subscribed.difference_update(symbols)
            else:
                continue
            self.history.append((event, symbols))
            await conn.ws.send_message(
                _enc.encode({"event": event, "status": 200, "message": f"{event}d {','.join(symbols).lower()}"}).decode()
            )
            conn.wake.set()
            self._notify()

    async def _heartbeat(self, conn: _Conn) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            while self.stalled:
                await self._resume.wait()
            await conn.ws.send_message('{"event":"heartbeat","timestamp":0}')

    async def _stream(self, conn: _Conn) -> None:
        owed = 0.0
        turn = 0
        while True:
            while self.stalled:
                await self._resume.wait()
            while self._pending_malformed:
                await conn.ws.send_message(self._pending_malformed.pop(0))
            if not conn.subscribed:
                conn.wake = trio.Event()
                await conn.wake.wait()
                continue
            symbols = sorted(conn.subscribed)
            owed += self.rate * len(symbols) * self.tick
            for _ in range(int(owed)):
                turn += 1
                symbol = symbols[turn % len(symbols)]
                owed -= 1
                await conn.ws.send_message(fmp_frame(self.market.next(symbol), self.ts_unit))
                self.frames_sent += 1
            with trio.move_on_after(self.tick):
                conn.wake = trio.Event()
                await conn.wake.wait()
