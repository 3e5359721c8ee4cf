"""A local server that speaks FMP's WebSocket protocol, for tests and demos.

It checks the API key on login (``{"event":"login","status":200,"message":"Authenticated"}`` or
``401 Unauthorized`` then a close), honours subscribe/unsubscribe with lower-case tickers, streams
simulated ticks as FMP frames (``t`` in nanoseconds, like FMP's stock examples), sends
``{"event":"heartbeat"}``, and can misbehave on request: drop every connection abruptly, stall
(send nothing, not even heartbeats), send malformed frames, or push any raw frame.

Two modes model what FMP does not document: ``idle_silent`` (no heartbeat on a connection with
nothing subscribed: a real FMP session may be quiet when idle) and ``deliver = False`` (logins
accepted, subscriptions acknowledged, heartbeats sent, but never a data frame: a feed that is
"up" and delivers nothing). Both are attributes a test may flip at any time.

Everything a test wants to observe is an attribute (``subscriptions``, ``history``, ``logins``...)
and :meth:`wait_until` waits for a condition without sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

import attrs
import msgspec
import trio
import trio_websocket

from ..model import Update
from ..providers.sim import SimMarket
from .base import Connection, FakeServer

__all__ = ["FakeFmpServer"]

MALFORMED_FRAMES = (
    "this is not json",
    '{"s": "aapl", "type": "T"',  # truncated
    '{"s": 42, "t": 1, "type": "T", "lp": 1.0}',  # symbol of the wrong type
    '{"s": "aapl", "t": 1699564800000, "type": "Z", "lp": 1.0}',  # unknown type
    '{"s": "aapl", "t": 1699564800000, "type": "T", "lp": "cheap"}',  # price of the wrong type
    "[1, 2, 3]",
)

_enc = msgspec.json.Encoder()

# Tick stamps kept per symbol (FakeFmpServer.sent).
SENT_LOG = 100_000


@attrs.define(eq=False)
class _Conn(Connection):
    subscribed: set[str] = attrs.Factory(set)


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


class FakeFmpServer(FakeServer[_Conn]):
    """Run with ``async with FakeFmpServer.open(...) as fake:``; ``fake.url`` is its address."""

    malformed_frames = MALFORMED_FRAMES

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
        echo_key: bool = False,
        idle_silent: bool = False,
        deliver: bool = True,
    ) -> None:
        super().__init__(rate=rate, tick=tick)
        self.api_keys = set(api_keys)
        self.heartbeat_interval = heartbeat_interval
        self.login_reply = login_reply
        # Refuse a key by quoting it back ("Invalid API key <key>"), as some vendors do.
        self.echo_key = echo_key
        self.ts_unit = ts_unit
        # No heartbeat while a connection has nothing subscribed (silent when idle).
        self.idle_silent = idle_silent
        self.deliver = deliver  # FakeServer's: False = log in, acknowledge, heartbeats, never data
        self.market = SimMarket(seed)
        self.logins = 0
        self.failed_logins = 0
        self.history: list[tuple[str, tuple[str, ...]]] = []  # ("subscribe", ("AAPL",)), ...
        self.received_keys: list[str] = []  # what clients sent as apiKey (tests check no leak)
        # Each simulated tick is stamped with its own time (UTC ms, strictly increasing per
        # symbol), so (symbol, timestamp) names one tick: fault tests find a tick delivered twice
        # or lost. The stamps sent, per symbol (the last SENT_LOG of each).
        self.sent: dict[str, deque[int]] = {}

    @property
    def subscriptions(self) -> set[str]:
        """Upper-case symbols subscribed on the logged-in connections."""
        return {symbol for conn in self._logged_in() for symbol in conn.subscribed}

    async def _accept(self, request: trio_websocket.WebSocketRequest) -> _Conn:
        return _Conn(await request.accept())

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
                conn.key = key
                self.logins += 1
                self._notify()
                if self.login_reply:
                    await conn.ws.send_message('{"event":"login","status":200,"message":"Authenticated"}')
                return True
            self.failed_logins += 1
            self._notify()
            message = (
                f"Invalid API key {key} (see https://example.test/?apikey={key})" if self.echo_key else "Unauthorized"
            )
            await conn.ws.send_message(
                msgspec.json.encode({"event": "login", "status": 401, "message": message}).decode()
            )
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
                _enc.encode(
                    {"event": event, "status": 200, "message": f"{event}d {','.join(symbols).lower()}"}
                ).decode()
            )
            conn.wake.set()
            self._notify()

    async def _keepalive(self, conn: _Conn) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            await self._unstalled()
            if self.idle_silent and not conn.subscribed:
                continue
            await conn.ws.send_message('{"event":"heartbeat","timestamp":0}')

    def _streamed(self, conn: _Conn) -> list[str]:
        return sorted(conn.subscribed)

    def stamp(self, symbol: str) -> int:
        """A new tick's time: now (UTC ms), or 1 ms after the symbol's previous tick."""
        sent = self.sent.get(symbol)
        if sent is None:
            sent = self.sent[symbol] = deque(maxlen=SENT_LOG)
        ts = max(time.time_ns() // 1_000_000, sent[-1] + 1 if sent else 0)
        sent.append(ts)
        return ts

    async def _send_ticks(self, conn: _Conn, symbols: list[str]) -> None:
        for symbol in symbols:
            await conn.ws.send_message(fmp_frame(self.market.next(symbol, self.stamp(symbol)), self.ts_unit))
            self.frames_sent += 1
