"""A local server that speaks Alpaca's market-data stream protocol (v2 stocks, v1beta3 crypto).

Like the real one it greets with ``[{"T":"success","msg":"connected"}]``, expects
``{"action":"auth","key":...,"secret":...}`` within ``auth_deadline`` seconds (else
``404 auth timeout`` and a close), answers a bad key with ``402 auth failed`` and a close,
enforces a per-key connection limit (``406``) and a symbol limit over trades ∪ quotes (``405``,
the set stays as it was), answers every subscribe/unsubscribe with the whole current set, and
streams simulated trades and quotes as JSON arrays of several messages, with RFC-3339
nanosecond timestamps. Symbols are kept in Alpaca's spelling (``AAPL``, ``BTC/USD``).

Faults on request: :meth:`drop_all` (abrupt TCP close), :meth:`stall` / :meth:`resume`,
:meth:`inject` (any raw frame), :meth:`send_error` (an error message, optionally closing),
``auth_error`` (answer a good key with an error, e.g. 409 for a feed outside the plan),
``ignore_auth`` (act as if no auth came, so the deadline fires), ``unknown_symbols`` (left out
of the set silently). Everything a test observes is an attribute; :meth:`wait_until` waits for
a condition without sleeping.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import msgspec
import trio
import trio_websocket

from ..model import Update
from ..providers.sim import SimMarket
from .base import Connection, FakeServer

__all__ = [
    "FakeAlpacaServer",
    "MALFORMED_FRAMES",
    "rfc3339_ns",
    "trade_msg",
    "quote_msg",
    "correction_msg",
    "cancel_msg",
    "frame",
]

STOCK_CHANNELS = ("trades", "quotes", "bars", "updatedBars", "dailyBars", "statuses", "lulds")
CRYPTO_CHANNELS = ("trades", "quotes", "bars", "updatedBars", "dailyBars", "orderbooks")

MALFORMED_FRAMES = (
    "this is not json",
    '[{"T":"t","S":"AAPL"',  # truncated
    '{"T":"t","S":"AAPL","p":1.0,"s":1,"t":"2024-01-02T15:00:00Z"}',  # an object, not an array
    '[{"T":"t","S":"AAPL","p":"cheap","s":1,"t":"2024-01-02T15:00:00Z"}]',  # price of the wrong type
    '[{"T":"t","S":"AAPL","p":1.0,"s":1,"t":"yesterday"}]',  # not an RFC-3339 time
    '[{"T":"zz","S":"AAPL"}]',  # unknown message type
)

_enc = msgspec.json.Encoder()


def rfc3339_ns(epoch_ns: int) -> str:
    """``2024-01-02T15:04:05.123456789Z``: Alpaca's timestamp spelling."""
    sec, ns = divmod(epoch_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns:09d}Z"


def trade_msg(
    symbol: str, price: float, size: float, t: str, *, trade_id: int = 1, crypto: bool = False
) -> dict[str, Any]:
    """A trade message as Alpaca sends it (stock or crypto field set)."""
    if crypto:
        return {"T": "t", "S": symbol, "p": price, "s": size, "t": t, "i": trade_id, "tks": "B"}
    return {"T": "t", "S": symbol, "i": trade_id, "x": "V", "p": price, "s": size, "c": ["@"], "t": t, "z": "C"}


def quote_msg(
    symbol: str, bid: float, bid_size: float, ask: float, ask_size: float, t: str, *, crypto: bool = False
) -> dict[str, Any]:
    """A quote message as Alpaca sends it (stock or crypto field set)."""
    if crypto:
        return {"T": "q", "S": symbol, "bp": bid, "bs": bid_size, "ap": ask, "as": ask_size, "t": t}
    return {
        "T": "q", "S": symbol, "bx": "V", "bp": bid, "bs": bid_size, "ax": "V", "ap": ask, "as": ask_size,
        "c": ["R"], "t": t, "z": "C",
    }  # fmt: skip


def correction_msg(
    symbol: str,
    *,
    original_price: float,
    original_size: int,
    corrected_price: float,
    corrected_size: int,
    t: str,
    original_id: int = 1,
    corrected_id: int = 2,
) -> dict[str, Any]:
    """A trade correction (``T":"c"``) with the fields alpaca-trade-api-go reads."""
    return {
        "T": "c", "S": symbol, "x": "V", "oi": original_id, "op": original_price, "os": original_size, "oc": ["@"],
        "ci": corrected_id, "cp": corrected_price, "cs": corrected_size, "cc": ["@"], "z": "C", "t": t,
    }  # fmt: skip


def cancel_msg(symbol: str, *, trade_id: int, price: float, size: float, t: str, action: str = "C") -> dict[str, Any]:
    """A trade cancel/error (``"T":"x"``) as alpaca-py's ``TRADE_CANCEL_MAPPING`` reads it.

    ``action`` is ``C`` (cancel) or ``E`` (error); ``i``/``p``/``s`` are the cancelled trade's.
    """
    return {"T": "x", "S": symbol, "i": trade_id, "x": "V", "p": price, "s": size, "a": action, "z": "C", "t": t}


def frame(*messages: Mapping[str, Any]) -> str:
    """Messages as one server frame (a JSON array)."""
    return _enc.encode(list(messages)).decode()


@attrs.define(eq=False)
class _Conn(Connection):
    channels: dict[str, set[str]] = attrs.Factory(dict)  # Alpaca channel → symbols

    def symbols(self, channel: str) -> set[str]:
        return self.channels.setdefault(channel, set())


class FakeAlpacaServer(FakeServer[_Conn]):
    """Run with ``async with FakeAlpacaServer.open(...) as fake:``; ``fake.url`` is its address."""

    malformed_frames = MALFORMED_FRAMES

    def __init__(
        self,
        *,
        credentials: Mapping[str, str] | None = None,
        crypto: bool = False,
        rate: float = 20.0,
        seed: int = 7,
        tick: float = 0.02,
        batch: int = 8,
        auth_deadline: float = 10.0,
        connection_limit: int = 1,
        symbol_limit: int | None = None,
        auth_error: tuple[int, str] | None = None,
        ignore_auth: bool = False,
        unknown_symbols: Iterable[str] = (),
    ) -> None:
        super().__init__(rate=rate, tick=tick)
        self.credentials = dict(credentials if credentials is not None else {"test-key-id": "test-secret"})
        self.crypto = crypto
        self.channel_names = CRYPTO_CHANNELS if crypto else STOCK_CHANNELS
        self.batch = batch  # most messages in one streamed array
        self.auth_deadline = auth_deadline
        self.connection_limit = connection_limit
        self.symbol_limit = symbol_limit  # over trades ∪ quotes, per connection; None = unlimited
        self.auth_error = auth_error
        self.ignore_auth = ignore_auth
        self.unknown_symbols = set(unknown_symbols)
        self.market = SimMarket(seed)
        self.logins = 0
        self.failed_logins = 0
        self.errors_sent: list[int] = []  # every error code sent, in order
        self.messages_sent = 0  # streamed data messages (array elements)
        # (action, trades, quotes) of every subscribe/unsubscribe, in Alpaca spelling.
        self.history: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
        self.received_credentials: list[tuple[str, str]] = []  # what clients sent (tests check no leak)
        # Ids of the streamed trades: large, like the real ones, so that a trade a test injects with
        # a small id is never taken for a repeat of a streamed one (the relay drops repeats).
        self._trade_ids = itertools.count(52_983_525_000_000)
        self._sub_ms = itertools.count(1)

    def _union(self, channel: str) -> set[str]:
        return {symbol for conn in self._logged_in() for symbol in conn.channels.get(channel, ())}

    @property
    def subscriptions(self) -> set[str]:
        """Symbols whose trades the authenticated connections get (Alpaca spelling)."""
        return self._union("trades")

    @property
    def quote_subscriptions(self) -> set[str]:
        return self._union("quotes")

    async def send_error(self, code: int, msg: str, *, close: bool = True) -> None:
        """Send ``[{"T":"error","code":code,"msg":msg}]`` to every authenticated connection."""
        for conn in self._logged_in():
            await self._error(conn, code, msg)
            if close:
                await conn.ws.aclose(1008, msg)

    async def send_correction(self, symbol: str, **fields: Any) -> None:
        """Inject a trade correction (keyword arguments of :func:`correction_msg`)."""
        await self.inject(frame(correction_msg(symbol, **fields)))

    async def send_cancel(self, symbol: str, **fields: Any) -> None:
        """Inject a trade cancel/error (keyword arguments of :func:`cancel_msg`)."""
        await self.inject(frame(cancel_msg(symbol, **fields)))

    async def _accept(self, request: trio_websocket.WebSocketRequest) -> _Conn:
        return _Conn(await request.accept())

    async def _error(self, conn: _Conn, code: int, msg: str) -> None:
        self.errors_sent.append(code)
        self._notify()
        await conn.ws.send_message(frame({"T": "error", "code": code, "msg": msg}))

    async def _login(self, conn: _Conn) -> bool:
        await conn.ws.send_message(frame({"T": "success", "msg": "connected"}))
        with trio.move_on_after(self.auth_deadline):
            while True:
                raw = await conn.ws.get_message()
                msg = _decode(raw)
                if msg is None:
                    await self._error(conn, 400, "invalid syntax")
                    continue
                if msg.get("action") != "auth":
                    await self._error(conn, 401, "not authenticated")
                    continue
                key, secret = msg.get("key"), msg.get("secret")
                if isinstance(key, str) and isinstance(secret, str):
                    self.received_credentials.append((key, secret))
                if self.ignore_auth:
                    continue
                if not isinstance(key, str) or self.credentials.get(key) != secret:
                    self.failed_logins += 1
                    await self._error(conn, 402, "auth failed")
                    await conn.ws.aclose(1008, "auth failed")
                    return False
                if self.auth_error is not None:
                    await self._error(conn, *self.auth_error)
                    await conn.ws.aclose(1008, self.auth_error[1])
                    return False
                if len(self._with_key(key)) >= self.connection_limit:
                    await self._error(conn, 406, "connection limit exceeded")
                    await conn.ws.aclose(1008, "connection limit exceeded")
                    return False
                conn.key = key
                self.logins += 1
                self._notify()
                await conn.ws.send_message(frame({"T": "success", "msg": "authenticated"}))
                return True
        await self._error(conn, 404, "auth timeout")
        await conn.ws.aclose(1008, "auth timeout")
        return False

    async def _read(self, conn: _Conn) -> None:
        while True:
            raw = await conn.ws.get_message()
            msg = _decode(raw)
            action = msg.get("action") if msg is not None else None
            if action == "auth":
                await self._error(conn, 403, "already authenticated")
                continue
            if msg is None or action not in ("subscribe", "unsubscribe"):
                await self._error(conn, 400, "invalid syntax")
                continue
            requested = {name: value for name, value in msg.items() if name != "action"}
            if any(name not in self.channel_names for name in requested):
                await self._error(conn, 410, "invalid subscribe action for this feed")
            elif not requested or not all(_is_symbol_list(value) for value in requested.values()):
                await self._error(conn, 400, "invalid syntax")
            else:
                await self._apply(conn, action, requested)

    async def _apply(self, conn: _Conn, action: str, requested: dict[str, Any]) -> None:
        trades = tuple(requested.get("trades", ()))
        quotes = tuple(requested.get("quotes", ()))
        self.history.append((action, trades, quotes))
        if action == "subscribe":
            known = {name: {s for s in symbols if s not in self.unknown_symbols} for name, symbols in requested.items()}
            after = (conn.symbols("trades") | known.get("trades", set())) | (
                conn.symbols("quotes") | known.get("quotes", set())
            )
            if self.symbol_limit is not None and len(after) > self.symbol_limit:
                await self._error(conn, 405, "symbol limit exceeded")  # the set stays as it was
                return
            for name, wanted in known.items():
                conn.symbols(name).update(wanted)
        else:
            for name, symbols in requested.items():
                conn.symbols(name).difference_update(symbols)
        await conn.ws.send_message(frame(self._subscription(conn)))
        conn.wake.set()
        self._notify()

    def _subscription(self, conn: _Conn) -> dict[str, Any]:
        reply: dict[str, Any] = {"T": "subscription"}
        for name in self.channel_names:
            reply[name] = sorted(conn.channels.get(name, ()))
        if not self.crypto:
            reply["corrections"] = reply["cancelErrors"] = sorted(conn.channels.get("trades", ()))
        return reply

    def _message(self, update: Update, epoch_ns: int) -> dict[str, Any]:
        t = rfc3339_ns(epoch_ns)
        if update.kind == "T":
            assert update.last_price is not None and update.last_size is not None
            size = update.last_size / 1000 if self.crypto else update.last_size
            return trade_msg(
                update.symbol, update.last_price, size, t, trade_id=next(self._trade_ids), crypto=self.crypto
            )
        assert update.bid_price is not None and update.ask_price is not None
        assert update.bid_size is not None and update.ask_size is not None
        scale = 1000 if self.crypto else 1
        return quote_msg(
            update.symbol, update.bid_price, update.bid_size / scale, update.ask_price, update.ask_size / scale, t,
            crypto=self.crypto,
        )  # fmt: skip

    def _streamed(self, conn: _Conn) -> list[str]:
        return sorted(conn.symbols("trades") | conn.symbols("quotes"))

    async def _send_ticks(self, conn: _Conn, symbols: list[str]) -> None:
        trades, quotes = conn.symbols("trades"), conn.symbols("quotes")
        batch: list[dict[str, Any]] = []
        for symbol in symbols:
            update = self.market.next(symbol)
            if symbol in (trades if update.kind == "T" else quotes):
                # Sub-millisecond digits too, so clients must cut nanoseconds correctly.
                batch.append(self._message(update, update.timestamp * 1_000_000 + next(self._sub_ms) % 1_000_000))
        for i in range(0, len(batch), self.batch):
            await conn.ws.send_message(frame(*batch[i : i + self.batch]))
            self.frames_sent += 1
            self.messages_sent += len(batch[i : i + self.batch])
            self._notify()


def _is_symbol_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def _decode(raw: str | bytes) -> dict[str, Any] | None:
    try:
        msg = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    return msg if isinstance(msg, dict) else None
