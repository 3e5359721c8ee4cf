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
upgrade with a given HTTP status (``reject_status``, e.g. 429, with ``retry_after`` as its
``Retry-After`` header).

What a client sent to the fake (malformed messages, a ``pong``) is answered with nothing but
recorded in ``history``; the real server's answer to those is not documented.

Everything a test observes is an attribute (``subscriptions``, ``history``, ``rejected``...) and
:meth:`wait_until` waits for a condition without sleeping. The fake never logs a token.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

import attrs
import msgspec
import trio
import trio_websocket

from ..providers.sim import SimMarket
from .base import Connection, FakeServer

__all__ = ["FakeFinnhubServer", "MALFORMED_FRAMES", "trade_frame"]

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
class _Conn(Connection):
    subscribed: set[str] = attrs.Factory(set)


class FakeFinnhubServer(FakeServer[_Conn]):
    """Run with ``async with FakeFinnhubServer.open(...) as fake:``; ``fake.url`` is its address."""

    malformed_frames = MALFORMED_FRAMES

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
        retry_after: str | None = None,
    ) -> None:
        super().__init__(rate=rate, tick=tick)
        self.api_keys = set(api_keys)
        self.ping_interval = ping_interval
        self.batch = batch  # most trades in one frame
        self.single_connection = single_connection
        self.invalid = set(invalid)  # symbols answered with "Invalid symbol S"
        self.max_symbols = max_symbols
        self.reject_status = reject_status  # when set, every upgrade gets this HTTP status
        self.retry_after = retry_after  # a Retry-After header for those rejections
        self.market = SimMarket(seed, trade_ratio=1.0)
        self.accept_times: list[float] = []  # trio time of each accepted upgrade
        self.rejected = 0  # upgrades refused (bad token or reject_status)
        self.kicked = 0  # connections dropped because their key connected twice
        self.received_tokens: list[str] = []  # every token presented (tests check it arrived, and nowhere else)
        self.history: list[tuple[str, str]] = []  # ("subscribe", "AAPL"), ...; ("?", raw) for the rest
        self.errors_sent: list[str] = []
        self.pings_sent = 0
        self.trades_sent = 0
        self.last_trade: dict[str, Trade] = {}  # per symbol, the last trade streamed

    @property
    def subscriptions(self) -> set[str]:
        """Symbols (Finnhub spelling) subscribed on the open connections."""
        return {symbol for conn in self.connections for symbol in conn.subscribed}

    async def _accept(self, request: trio_websocket.WebSocketRequest) -> _Conn | None:
        token = _token(request.path)
        self.received_tokens.append(token or "")
        if self.reject_status is not None or token not in self.api_keys:
            status = self.reject_status or 401
            self.rejected += 1
            self._notify()
            headers = [(b"Retry-After", self.retry_after.encode())] if self.retry_after is not None else None
            body = b"Unauthorized" if status == 401 else b"Too Many Requests"
            await request.reject(status, extra_headers=headers, body=body)
            return None
        conn = _Conn(await request.accept(), key=token)  # authenticated by the upgrade
        self.accept_times.append(trio.current_time())
        return conn

    async def _session(self, conn: _Conn) -> None:
        rivals = [c for c in self._with_key(conn.key) if c is not conn] if self.single_connection else []
        if rivals:
            # One connection per key: the newcomer and the one already there both go.
            self.kicked += len(rivals) + 1
            for other in [*rivals, conn]:
                await self._abort(other)
            return
        await super()._session(conn)

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

    async def _keepalive(self, conn: _Conn) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            await self._unstalled()
            self.pings_sent += 1  # counted first: the client may read it before this task resumes
            self._notify()
            await conn.ws.send_message('{"type":"ping"}')

    def _streamed(self, conn: _Conn) -> list[str]:
        return sorted(conn.subscribed)

    async def _send_ticks(self, conn: _Conn, symbols: list[str]) -> None:
        trades = [self._trade(symbol) for symbol in symbols]  # round robin: a frame mixes symbols
        for i in range(0, len(trades), self.batch):
            frame = trades[i : i + self.batch]
            self.frames_sent += 1  # counted first, like pings
            self.trades_sent += len(frame)
            self._notify()
            await conn.ws.send_message(trade_frame(frame, ["1"]))

    def _trade(self, symbol: str) -> Trade:
        update = self.market.next(symbol)
        price = update.last_price if update.last_price is not None else 0.0
        # Stocks trade whole shares (a JSON integer); forex sends prices only (v 0); crypto fractions.
        if symbol.startswith("OANDA:"):
            size: float = 0.0
        elif ":" in symbol:
            size = float(update.last_size or 0) / 1000
        else:
            size = int(update.last_size or 0)
        self.last_trade[symbol] = (symbol, price, update.timestamp, size)
        return self.last_trade[symbol]
