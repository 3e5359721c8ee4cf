"""A local server that speaks Finnhub's WebSocket protocol, for tests and demos.

Like the real ``wss://ws.finnhub.io`` it authenticates on the HTTP upgrade: the ``token`` query
parameter must be one of ``api_keys``, otherwise the upgrade is answered ``401`` (counted in
``rejected``). It allows one connection per key: a second connection with the same key drops
both (``single_connection``, on by default, as a third-party project observed on the real
service). It takes ``{"type":"subscribe","symbol":S}`` / ``unsubscribe`` one symbol at a time, in
Finnhub's spelling (``AAPL``, ``COINBASE:BTC-USD``, ``OANDA:EUR_USD``), answers a symbol in
``invalid`` with ``{"type":"error","msg":"Invalid symbol S"}`` and one beyond ``max_symbols`` with
``{"type":"error","msg":"Subscribing to too many symbols"}``, streams simulated trades for the
subscribed symbols as ``{"type":"trade","data":[...]}`` frames holding up to ``batch`` trades of
several symbols (``t`` in ms; ``v`` 0 for OANDA forex, which sends prices, not trades), and sends
``{"type":"ping"}`` every ``ping_interval`` seconds.

On request it misbehaves: drop every connection abruptly (:meth:`drop_all`), go silent, pings
included (:meth:`stall` / :meth:`resume`), push any raw frame (:meth:`inject`), reject every
upgrade with a given HTTP status (``reject_status``, e.g. 429).

What a client sent to the fake (malformed messages, a ``pong``) is answered with nothing but
recorded in ``history``; the real server's answer to those is not documented.

Everything a test observes is an attribute (``subscriptions``, ``history``, ``rejected``...) and
:meth:`wait_until` waits for a condition without sleeping. The fake never logs a token.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, urlsplit

import attrs
import msgspec
import trio
import trio_websocket

from ..providers.sim import SimMarket

__all__ = ["FakeFinnhubServer", "MALFORMED_FRAMES", "trade_frame"]

log = logging.getLogger("trio_relay.testing.fake_finnhub")

MALFORMED_FRAMES = (
    "this is not json",
    '{"type":"trade","data":[{"s":"AAPL","p":1.5',  # truncated
    '{"type":"trade","data":[{"s":"AAPL","p":"cheap","t":1699564800000,"v":1}]}',  # price of the wrong type
    '{"type":"trade","data":[{"p":1.5,"t":1699564800000,"v":1}]}',  # no symbol
    '{"type":"trade"}',  # no data
    '{"type":"quote","data":[]}',  # unknown type
    '{"data":[]}',  # no type
    "[1, 2, 3]",
)

_enc = msgspec.json.Encoder()

# A trade as sent: (symbol, price, epoch ms, volume).
Trade = tuple[str, float, int, float]


def trade_frame(trades: Iterable[Trade], conditions: list[str] | None = None) -> str:
    """A ``trade`` frame holding ``trades`` (Finnhub spelling), as the real server sends it."""
    data = [{"s": s, "p": p, "t": t, "v": v, "c": conditions or []} for s, p, t, v in trades]
    return _enc.encode({"type": "trade", "data": data}).decode()


def _token(target: str) -> str | None:
    values = parse_qs(urlsplit(target).query).get("token")
    return values[0] if values else None


@attrs.define(eq=False)
class _Conn:
    id: int
    key: str
    ws: trio_websocket.WebSocketConnection
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    subscribed: set[str] = attrs.Factory(set)
    wake: trio.Event = attrs.Factory(trio.Event)


class FakeFinnhubServer:
    """Run with ``async with FakeFinnhubServer.open(...) as fake:``; ``fake.url`` is its address."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = ("test-key",),
        rate: float = 20.0,
        seed: int = 7,
        ping_interval: float = 60.0,
        tick: float = 0.02,
        batch: int = 4,
        single_connection: bool = True,
        invalid: Iterable[str] = (),
        max_symbols: int = 50,
        reject_status: int | None = None,
    ) -> None:
        self.api_keys = set(api_keys)
        self.rate = rate  # trades per second per subscribed symbol (0: only injected frames)
        self.ping_interval = ping_interval
        self.tick = tick
        self.batch = batch  # most trades in one frame
        self.single_connection = single_connection
        self.invalid = set(invalid)  # symbols answered with "Invalid symbol S"
        self.max_symbols = max_symbols
        self.reject_status = reject_status  # when set, every upgrade gets this HTTP status
        self.market = SimMarket(seed, trade_ratio=1.0)
        self.port = 0
        self.connections: list[_Conn] = []
        self.connections_total = 0  # upgrades accepted
        self.accept_times: list[float] = []  # trio time of each accepted upgrade
        self.rejected = 0  # upgrades refused (bad token or reject_status)
        self.kicked = 0  # connections dropped because their key connected twice
        self.received_tokens: list[str] = []  # every token presented (tests check it arrived, and nowhere else)
        self.history: list[tuple[str, str]] = []  # ("subscribe", "AAPL"), ...; ("?", raw) for the rest
        self.errors_sent: list[str] = []
        self.pings_sent = 0
        self.frames_sent = 0
        self.trades_sent = 0
        self.last_trade: dict[str, Trade] = {}  # per symbol, the last trade streamed
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
        """Symbols (Finnhub spelling) subscribed on the open connections."""
        out: set[str] = set()
        for conn in self.connections:
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
    async def _abort(self, conn: _Conn) -> None:
        conn.scope.cancel()
        # trio-websocket has no public abort; a fake may reach for the socket.
        await trio.aclose_forcefully(conn.ws._stream)

    async def drop_all(self) -> int:
        """Abruptly close every connection (TCP close, no WebSocket close frame)."""
        conns = list(self.connections)
        for conn in conns:
            await self._abort(conn)
        return len(conns)

    def stall(self) -> None:
        """Send nothing at all (no trades, no pings) until :meth:`resume`."""
        self.stalled = True

    def resume(self) -> None:
        self.stalled = False
        self._resume.set()
        self._resume = trio.Event()

    def send_malformed(self, count: int = len(MALFORMED_FRAMES)) -> None:
        """Queue ``count`` malformed frames for every connection (sent by its streaming task)."""
        self._pending_malformed.extend(itertools.islice(itertools.cycle(MALFORMED_FRAMES), count))
        for conn in self.connections:
            conn.wake.set()

    async def inject(self, frame: str) -> None:
        """Send one raw frame to every open connection."""
        for conn in list(self.connections):
            await conn.ws.send_message(frame)

    # ------------------------------------------------------------------ serve
    @classmethod
    @asynccontextmanager
    async def open(cls, host: str = "127.0.0.1", port: int = 0, **kwargs: object) -> AsyncIterator[FakeFinnhubServer]:
        server = cls(**kwargs)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, host, port)
            yield server
            nursery.cancel_scope.cancel()

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(trio_websocket.serve_websocket, self._handle, host, port, None)
            self.port = ws_server.port
            log.info("fake Finnhub server on %s", self.url)
            task_status.started()

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        token = _token(request.path)
        self.received_tokens.append(token or "")
        if self.reject_status is not None or token not in self.api_keys:
            status = self.reject_status or 401
            self.rejected += 1
            self._notify()
            await request.reject(status, body=b"Unauthorized" if status == 401 else b"Too Many Requests")
            return
        ws = await request.accept()
        conn = _Conn(next(self._ids), token, ws)
        rivals = [c for c in self.connections if c.key == token] if self.single_connection else []
        self.connections.append(conn)
        self.connections_total += 1
        self.accept_times.append(trio.current_time())
        self._notify()
        try:
            if rivals:
                # One connection per key: the newcomer and the one already there both go.
                self.kicked += len(rivals) + 1
                for other in [*rivals, conn]:
                    await self._abort(other)
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    if self.rate > 0:
                        nursery.start_soon(self._stream, conn)
                    nursery.start_soon(self._ping, conn)
                    await self._read(conn)
                    nursery.cancel_scope.cancel()
        except* (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # from the nursery these arrive grouped: a client going away is not an error
        finally:
            self.connections.remove(conn)
            self._notify()

    async def _error(self, conn: _Conn, msg: str) -> None:
        self.errors_sent.append(msg)
        await conn.ws.send_message(_enc.encode({"type": "error", "msg": msg}).decode())

    async def _read(self, conn: _Conn) -> None:
        while True:
            raw = await conn.ws.get_message()
            try:
                msg = msgspec.json.decode(raw)
                kind, symbol = msg["type"], msg["symbol"]
                if not isinstance(kind, str) or not isinstance(symbol, str):
                    raise TypeError(kind)
            except (msgspec.DecodeError, KeyError, TypeError):
                self.history.append(("?", raw if isinstance(raw, str) else raw.decode("utf-8", "replace")))
                self._notify()
                continue
            self.history.append((kind, symbol))
            if kind == "subscribe":
                if symbol in self.invalid:
                    await self._error(conn, f"Invalid symbol {symbol}")
                elif symbol not in conn.subscribed and len(conn.subscribed) >= self.max_symbols:
                    await self._error(conn, "Subscribing to too many symbols")
                else:
                    conn.subscribed.add(symbol)
                    conn.wake.set()
            elif kind == "unsubscribe":
                conn.subscribed.discard(symbol)
            self._notify()

    async def _ping(self, conn: _Conn) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            while self.stalled:
                await self._resume.wait()
            self.pings_sent += 1  # counted first: the client may read it before this task resumes
            self._notify()
            await conn.ws.send_message('{"type":"ping"}')

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
            frame: list[Trade] = []
            while owed >= 1:
                owed -= 1
                turn += 1
                symbol = symbols[turn % len(symbols)]  # round robin: a frame mixes symbols
                update = self.market.next(symbol)
                price = update.last_price if update.last_price is not None else 0.0
                size = 0.0 if symbol.startswith("OANDA:") else float(update.last_size or 0)
                trade = (symbol, price, update.timestamp, size)
                self.last_trade[symbol] = trade
                frame.append(trade)
                if len(frame) >= self.batch or owed < 1:
                    self.frames_sent += 1  # counted first, like pings
                    self.trades_sent += len(frame)
                    self._notify()
                    await conn.ws.send_message(trade_frame(frame, ["1"]))
                    frame = []
            with trio.move_on_after(self.tick):
                conn.wake = trio.Event()
                await conn.wake.wait()
