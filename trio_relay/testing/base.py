"""What every fake provider server shares: serving, connection bookkeeping, faults, streaming.

A fake subclasses :class:`FakeServer` and supplies only its protocol: how a connection is accepted
(:meth:`FakeServer._accept`), greeted and logged in (``_login``), how requests are read (``_read``),
which symbols a connection streams (``_streamed``) and how simulated ticks become frames
(``_send_ticks``). Tests rely on what the base gives every fake: ``url``, ``connections``,
``connections_total``, ``frames_sent``, :meth:`~FakeServer.wait_until`, :meth:`~FakeServer.drop_all`,
:meth:`~FakeServer.stall` / :meth:`~FakeServer.resume`, :meth:`~FakeServer.inject`,
:meth:`~FakeServer.send_malformed`, and ``deliver``: set it False for a server that logs clients
in and answers them (heartbeats and pings included) but never sends a data frame.
"""

from __future__ import annotations

import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Generic, Self, TypeVar

import attrs
import trio
import trio_websocket

__all__ = ["Connection", "FakeServer"]

# What a client going away raises; from a nursery these arrive grouped.
_GONE = (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


@attrs.define(eq=False)
class Connection:
    """One client connection as a fake sees it; a fake's subclass adds its subscription state."""

    ws: trio_websocket.WebSocketConnection
    key: str | None = None  # the credential it logged in with; None until it has
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    wake: trio.Event = attrs.Factory(trio.Event)  # set when there may be something new to stream

    async def woken(self) -> None:
        """Wait until :attr:`wake` is next set."""
        self.wake = trio.Event()
        await self.wake.wait()


C = TypeVar("C", bound=Connection)


class FakeServer(ABC, Generic[C]):
    """Run with ``async with Fake.open(...) as fake:``; ``fake.url`` is its address."""

    #: Frames :meth:`send_malformed` cycles through.
    malformed_frames: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, rate: float, tick: float) -> None:
        self.rate = rate  # simulated ticks per second per streamed symbol (0: only injected frames)
        self.tick = tick  # seconds between two rounds of streaming
        self.port = 0
        self.connections: list[C] = []
        self.connections_total = 0  # connections accepted
        self.frames_sent = 0
        self.stalled = False
        self.deliver = True  # False: everything but data frames (a feed that is "up" and delivers nothing)
        self._resume = trio.Event()
        self._changed = trio.Event()
        self._pending_malformed: list[str] = []

    # ------------------------------------------------------------------ observe
    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _logged_in(self) -> list[C]:
        return [conn for conn in self.connections if conn.key is not None]

    def _with_key(self, key: str | None) -> list[C]:
        return [conn for conn in self.connections if conn.key == key]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (no polling) until ``predicate()`` is true after some server-side change."""
        while not predicate():
            await self._changed.wait()

    # ------------------------------------------------------------------ faults
    async def _abort(self, conn: C) -> None:
        """Close ``conn`` abruptly; it stops counting (``connections``, per-key limits) at once."""
        conn.scope.cancel()
        if conn in self.connections:
            self.connections.remove(conn)
        # trio-websocket has no public abort; a fake may reach for the socket.
        await trio.aclose_forcefully(conn.ws._stream)

    async def drop_all(self) -> int:
        """Abruptly close every connection (TCP close, no WebSocket close frame)."""
        conns = list(self.connections)
        for conn in conns:
            await self._abort(conn)
        self._notify()
        return len(conns)

    def stall(self) -> None:
        """Stream nothing, heartbeats included, until :meth:`resume` (replies to requests still go out)."""
        self.stalled = True

    def resume(self) -> None:
        self.stalled = False
        self._resume.set()
        self._resume = trio.Event()

    async def _unstalled(self) -> None:
        while self.stalled:
            await self._resume.wait()

    def send_malformed(self, count: int | None = None) -> None:
        """Queue ``count`` (default: all) of :attr:`malformed_frames`, sent by the next connection to stream."""
        count = len(self.malformed_frames) if count is None else count
        self._pending_malformed.extend(itertools.islice(itertools.cycle(self.malformed_frames), count))
        for conn in self.connections:
            conn.wake.set()

    async def inject(self, frame: str) -> None:
        """Send one raw frame to every logged-in connection."""
        for conn in self._logged_in():
            await conn.ws.send_message(frame)

    # ------------------------------------------------------------------ serve
    @classmethod
    @asynccontextmanager
    async def open(cls, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> AsyncIterator[Self]:
        server = cls(**kwargs)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, host, port)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()  # also when the block raised (else its tasks run on)

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(trio_websocket.serve_websocket, self._handle, host, port, None)
            self.port = ws_server.port
            logging.getLogger(type(self).__module__).info("%s listening on %s", type(self).__name__, self.url)
            task_status.started()

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        conn = await self._accept(request)
        if conn is None:
            return
        self.connections.append(conn)
        self.connections_total += 1
        self._notify()
        try:
            with conn.scope:
                await self._session(conn)
        except* _GONE:
            pass  # a client going away is not an error
        finally:
            if conn in self.connections:
                self.connections.remove(conn)
            self._notify()

    async def _session(self, conn: C) -> None:
        """Log in, then stream and send heartbeats while reading requests, until the client goes."""
        if not await self._login(conn):
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stream, conn)
            nursery.start_soon(self._keepalive, conn)
            await self._read(conn)
            nursery.cancel_scope.cancel()

    async def _stream(self, conn: C) -> None:
        owed = 0.0  # ticks due but not yet sent: a round sends only whole ones
        turn = 0
        while True:
            await self._unstalled()
            while self._pending_malformed:
                await conn.ws.send_message(self._pending_malformed.pop(0))
            symbols = self._streamed(conn)
            if not symbols or self.rate <= 0:
                await conn.woken()
                continue
            owed += self.rate * len(symbols) * self.tick
            ticks = []
            while owed >= 1:
                owed -= 1
                turn += 1
                ticks.append(symbols[turn % len(symbols)])  # round robin
            if ticks and self.deliver:
                await self._send_ticks(conn, ticks)
            with trio.move_on_after(self.tick):
                await conn.woken()

    # ------------------------------------------------------------------ the protocol's part
    @abstractmethod
    async def _accept(self, request: trio_websocket.WebSocketRequest) -> C | None:
        """Accept the upgrade and return the new connection, or reject it and return None."""

    async def _login(self, conn: C) -> bool:
        """Greet and authenticate; False when the connection was refused (and closed)."""
        return True

    async def _keepalive(self, conn: C) -> None:
        """Send heartbeats, for a protocol that has them."""

    @abstractmethod
    async def _read(self, conn: C) -> None:
        """Read and answer the client's requests until it goes away."""

    @abstractmethod
    def _streamed(self, conn: C) -> list[str]:
        """The symbols ``conn`` gets simulated ticks for, in a stable order."""

    @abstractmethod
    async def _send_ticks(self, conn: C, symbols: list[str]) -> None:
        """Send one simulated tick per entry of ``symbols`` (a symbol may repeat)."""
