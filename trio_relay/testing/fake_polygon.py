"""A local server that speaks Polygon.io / Massive's WebSocket protocol, for tests and demos.

It serves one market's cluster (``stocks``, ``crypto`` or ``forex``), like the real
``/stocks``, ``/crypto`` and ``/forex`` paths: it greets with status ``connected``, checks the
key of ``{"action":"auth","params":KEY}`` (``auth_success``, or ``auth_failed`` and a close),
enforces a per-key connection limit (status ``max_connections`` then a 1008 close, for the new
connection or, if asked, the oldest one; ``auth_failure`` sets the refused-key answer, e.g. the
older ``status: "error"`` wording), acknowledges every subscribe/unsubscribe entry
separately (``"subscribed to: T.AAPL"``), and streams simulated ticks batched in JSON arrays with
Polygon's fields: ``T``/``Q`` for stocks (quote sizes in round lots), ``XT``/``XQ`` for crypto,
``C`` for forex. It can misbehave on request: drop every connection abruptly, stall (send
nothing), push any raw frame, or send every trade twice in its frame (``duplicate_trades``).

Everything a test wants to observe is an attribute (``subscriptions`` in Polygon's own spelling,
``history``, ``logins``, ``received_keys``...) and :meth:`wait_until` waits for a condition without
sleeping.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, Literal

import attrs
import msgspec
import trio
import trio_websocket

from ..model import QUOTE, TRADE, Update
from ..providers.sim import SimMarket
from .base import Connection, FakeServer

__all__ = ["FakePolygonServer", "polygon_events", "MAX_CONNECTIONS_MESSAGE"]

Market = Literal["stocks", "crypto", "forex"]

MAX_CONNECTIONS_MESSAGE = (
    "Maximum number of websocket connections exceeded. You have reached the connection limit for your account."
)
# Channels each cluster knows (aggregates are accepted, but this fake never sends them).
_KNOWN_CHANNELS: dict[str, frozenset[str]] = {
    "stocks": frozenset({"T", "Q", "A", "AM"}),
    "crypto": frozenset({"XT", "XQ", "XA", "XAS"}),
    "forex": frozenset({"C", "CA", "CAS"}),
}
# Events sent in one frame at most (the rest go in the next frame).
MAX_BATCH = 200

_enc = msgspec.json.Encoder()


def _status(status: str, message: str) -> dict[str, str]:
    return {"ev": "status", "status": status, "message": message}


def polygon_events(update: Update, ticker: str, market: str, seq: int) -> list[dict[str, Any]]:
    """A simulated update as Polygon events for ``market`` (none for a trade on forex)."""
    t = update.timestamp
    if market == "stocks":
        if update.kind == TRADE:
            return [
                {"ev": "T", "sym": ticker, "i": str(1_000_000 + seq), "x": 4, "p": update.last_price,
                 "s": update.last_size, "c": [12, 37], "t": t, "q": seq, "z": 3}
            ]  # fmt: skip
        return [
            {"ev": "Q", "sym": ticker, "bx": 11, "bp": update.bid_price, "bs": int((update.bid_size or 0) // 100),
             "ax": 12, "ap": update.ask_price, "as": int((update.ask_size or 0) // 100), "c": 1, "i": [604],
             "t": t, "q": seq, "z": 3}
        ]  # fmt: skip
    if market == "crypto":
        if update.kind == TRADE:
            size = (update.last_size or 0) / 1000
            return [{"ev": "XT", "pair": ticker, "p": update.last_price, "t": t, "s": size, "c": [1],
                     "i": str(1_000_000_000 + seq), "x": 1, "r": t + 3}]  # fmt: skip
        return [
            {"ev": "XQ", "pair": ticker, "bp": update.bid_price, "bs": (update.bid_size or 0) / 1000,
             "ap": update.ask_price, "as": (update.ask_size or 0) / 1000, "t": t, "x": 1, "r": t + 3}
        ]  # fmt: skip
    if update.kind == QUOTE:
        return [{"ev": "C", "p": ticker, "x": 48, "a": update.ask_price, "b": update.bid_price, "t": t}]
    return []


@attrs.define(eq=False)
class _Conn(Connection):
    subscribed: set[str] = attrs.Factory(set)  # "T.AAPL", "Q.AAPL"...

    @property
    def tickers(self) -> list[str]:
        return sorted({entry.partition(".")[2] for entry in self.subscribed})


class FakePolygonServer(FakeServer[_Conn]):
    """Run with ``async with FakePolygonServer.open(...) as fake:``; ``fake.url`` is its address."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = ("test-key",),
        market: Market = "stocks",
        rate: float = 20.0,
        seed: int = 7,
        tick: float = 0.02,
        max_connections: int = 0,
        limit_drops: Literal["new", "old"] = "new",
        auth_reply: bool = True,
        auth_failure: dict[str, str] | None = None,
        duplicate_trades: bool = False,
    ) -> None:
        super().__init__(rate=rate, tick=tick)
        self.api_keys = set(api_keys)
        self.market = market
        # Connections per key (0 = no limit); which one goes when a key goes over it.
        self.max_connections = max_connections
        self.limit_drops = limit_drops
        self.auth_reply = auth_reply  # False: never answer the auth message (a login that hangs)
        # The status event a bad key gets: auth_failed by default; an older server said
        # {"status":"error","message":"authentication failed"} (alpacahq/Alpaca-API #68).
        self.auth_failure = auth_failure or {"status": "auth_failed", "message": "authentication failed"}
        # Each trade sent twice in the same frame (same id), as a duplicating feed does.
        self.duplicate_trades = duplicate_trades
        self.duplicates_sent = 0  # repeated trade events sent
        self.sim = SimMarket(seed)
        self.logins = 0
        self.failed_logins = 0
        self.refused_over_limit = 0  # connections closed with max_connections (new or old)
        self.events_sent = 0
        self.history: list[tuple[str, tuple[str, ...]]] = []  # ("subscribe", ("T.AAPL", "Q.AAPL")), ...
        self.largest_message = 0  # bytes of the largest client message received
        self.received_keys: list[str] = []  # what clients sent as params of auth (tests check no leak)
        self._seq = itertools.count(1)

    @property
    def url(self) -> str:
        return f"{super().url}/{self.market}"

    @property
    def subscriptions(self) -> set[str]:
        """Entries (``T.AAPL``, ``XQ.BTC-USD``, ``C.EUR/USD``) subscribed on the authenticated connections."""
        return {entry for conn in self._logged_in() for entry in conn.subscribed}

    async def _send(self, conn: _Conn, events: list[dict[str, Any]]) -> None:
        await conn.ws.send_message(_enc.encode(events).decode())

    async def _accept(self, request: trio_websocket.WebSocketRequest) -> _Conn:
        return _Conn(await request.accept())

    async def _refuse_over_limit(self, conn: _Conn) -> None:
        self.refused_over_limit += 1
        self._notify()
        try:
            await self._send(conn, [_status("max_connections", MAX_CONNECTIONS_MESSAGE)])
            await conn.ws.aclose(1008, "max_connections")
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        conn.scope.cancel()

    async def _login(self, conn: _Conn) -> bool:
        await self._send(conn, [_status("connected", "Connected Successfully")])
        with trio.move_on_after(30):
            while True:
                raw = await conn.ws.get_message()
                try:
                    msg = msgspec.json.decode(raw)
                    action, key = msg.get("action"), msg.get("params")
                except (msgspec.DecodeError, AttributeError):
                    action, key = None, None
                if action != "auth":
                    await self._send(conn, [_status("auth_required", "you must authenticate first")])
                    continue
                if isinstance(key, str):
                    self.received_keys.append(key)
                if not self.auth_reply:
                    await trio.sleep_forever()
                if not isinstance(key, str) or key not in self.api_keys:
                    self.failed_logins += 1
                    self._notify()
                    await self._send(conn, [_status(self.auth_failure["status"], self.auth_failure["message"])])
                    await conn.ws.aclose(1008, "authentication failed")
                    return False
                same_key = self._with_key(key)
                if self.max_connections and len(same_key) >= self.max_connections:
                    if self.limit_drops == "new":
                        await self._refuse_over_limit(conn)
                        return False
                    await self._refuse_over_limit(same_key[0])
                conn.key = key
                self.logins += 1
                self._notify()
                await self._send(conn, [_status("auth_success", "authenticated")])
                return True
        await conn.ws.aclose(1008, "auth timeout")
        return False

    async def _read(self, conn: _Conn) -> None:
        while True:
            raw = await conn.ws.get_message()
            self.largest_message = max(self.largest_message, len(raw.encode() if isinstance(raw, str) else raw))
            try:
                msg = msgspec.json.decode(raw)
                action, params = msg["action"], msg["params"]
            except (msgspec.DecodeError, KeyError, TypeError):
                await self._send(conn, [_status("error", "invalid message")])
                continue
            if action not in ("subscribe", "unsubscribe") or not isinstance(params, str):
                await self._send(conn, [_status("error", f"unknown action {action!r}")])
                continue
            entries = tuple(e.strip() for e in params.split(",") if e.strip())
            acks = []
            for entry in entries:
                channel = entry.partition(".")[0]
                if channel not in _KNOWN_CHANNELS[self.market]:
                    acks.append(_status("error", f"unknown channel: {entry}"))
                    continue
                if action == "subscribe":
                    conn.subscribed.add(entry)
                else:
                    conn.subscribed.discard(entry)
                acks.append(_status("success", f"{action}d to: {entry}"))
            self.history.append((action, entries))
            await self._send(conn, acks)
            conn.wake.set()
            self._notify()

    def _streamed(self, conn: _Conn) -> list[str]:
        return conn.tickers

    async def _send_ticks(self, conn: _Conn, tickers: list[str]) -> None:
        events = [
            event
            for ticker in tickers
            for event in polygon_events(self.sim.next(ticker), ticker, self.market, next(self._seq))
            if f"{event['ev']}.{ticker}" in conn.subscribed
        ]
        if self.duplicate_trades:
            events = [copy for event in events for copy in ((event, event) if event["ev"] in ("T", "XT") else (event,))]
            self.duplicates_sent += sum(1 for event in events if event["ev"] in ("T", "XT")) // 2
        for i in range(0, len(events), MAX_BATCH):
            await self._send(conn, events[i : i + MAX_BATCH])
            self.frames_sent += 1
        self.events_sent += len(events)
