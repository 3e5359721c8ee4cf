"""Financial Modeling Prep WebSocket (stocks, crypto, forex endpoints).

Protocol (see shared/providers.md): after the socket opens send
``{"event":"login","data":{"apiKey":KEY}}``; the reply is undocumented and optional, so we wait
``login_timeout`` for it and carry on without one. ``Unauthorized`` / "not authorized" /
"Connected from another location" are fatal (:class:`AuthFailed`). Subscriptions are
``{"event":"subscribe","data":{"ticker":["aapl","msft"]}}`` with lower-case tickers. Data frames
are one JSON object each: ``s`` ticker, ``t`` timestamp of unknown unit, ``type`` T/Q/B,
``lp ls ap as bp bs``. The server sends ``{"event":"heartbeat"}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import msgspec
import trio
import trio_websocket

from ..config import FmpConfig
from ..model import SYMBOL_RE, Update, normalize_epoch_ms
from .base import AuthFailed, MalformedFrame, ProviderError

__all__ = ["FmpProvider", "FmpSession", "decode_frame", "FmpFrame"]

log = logging.getLogger("trio_relay.providers.fmp")

# Subscribe in chunks so no single frame grows without bound.
SUBSCRIBE_CHUNK = 100
# Frames trio-websocket may buffer before its reader stops reading the socket (backpressure).
MESSAGE_QUEUE = 256
MAX_FRAME = 1 << 20


class FmpFrame(msgspec.Struct, gc=False):
    """Every field FMP may send in one frame, data or control."""

    s: str | None = None
    t: int | float | None = None
    type: str | None = None
    lp: int | float | None = None
    ls: int | float | None = None
    ap: int | float | None = None
    as_: int | float | None = msgspec.field(default=None, name="as")
    bp: int | float | None = None
    bs: int | float | None = None
    e: str | None = None
    event: str | None = None
    status: int | str | None = None
    message: str | None = None


_DECODER = msgspec.json.Decoder(FmpFrame)  # immutable, safe to share
_ENCODER = msgspec.json.Encoder()

_FATAL_TEXTS = ("unauthorized", "not authorized", "connected from another location", "invalid api key")


def _fatal(frame: FmpFrame) -> str | None:
    """The reason if a control frame says our session is refused, else None."""
    message = (frame.message or "").strip()
    lowered = message.lower()
    if any(text in lowered for text in _FATAL_TEXTS):
        return message
    if frame.event == "login" and str(frame.status) in ("401", "403"):
        return message or f"login refused (status {frame.status})"
    return None


def decode_frame(raw: str | bytes, now_ms: int) -> tuple[FmpFrame, Update | None]:
    """Decode one FMP frame. Returns the frame and its update (None for control frames)."""
    try:
        frame = _DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        raise MalformedFrame(f"unexpected field type: {exc}", raw) from None
    except msgspec.DecodeError as exc:
        raise MalformedFrame(f"not a JSON object: {exc}", raw) from None
    if frame.event is not None:
        return frame, None
    kind = frame.type
    symbol = frame.s.upper() if frame.s else ""
    if not symbol or not SYMBOL_RE.match(symbol):
        raise MalformedFrame(f"missing or invalid symbol {frame.s!r}", raw)
    ts = normalize_epoch_ms(frame.t) if frame.t is not None and frame.t > 0 else now_ms
    if kind == "T" or kind == "B":
        if frame.lp is None:
            raise MalformedFrame(f"{kind} frame without lp", raw)
        return frame, Update(symbol, kind, ts, last_price=frame.lp, last_size=frame.ls)
    if kind == "Q":
        if frame.bp is None and frame.ap is None:
            raise MalformedFrame("Q frame without bp or ap", raw)
        return frame, Update(
            symbol,
            kind,
            ts,
            ask_price=frame.ap,
            ask_size=frame.as_,
            bid_price=frame.bp,
            bid_size=frame.bs,
        )
    raise MalformedFrame(f"unknown type {kind!r}", raw)


class FmpSession:
    def __init__(self, ws: trio_websocket.WebSocketConnection, early: list[str | bytes]) -> None:
        self._ws = ws
        self._early = early  # frames that arrived while we waited for the login reply

    async def _send(self, event: str, symbols: Sequence[str]) -> None:
        for i in range(0, len(symbols), SUBSCRIBE_CHUNK):
            chunk = [s.lower() for s in symbols[i : i + SUBSCRIBE_CHUNK]]
            await self._ws.send_message(_ENCODER.encode({"event": event, "data": {"ticker": chunk}}).decode())

    async def subscribe(self, symbols: Sequence[str]) -> None:
        await self._send("subscribe", symbols)

    async def unsubscribe(self, symbols: Sequence[str]) -> None:
        await self._send("unsubscribe", symbols)

    async def receive(self) -> list[Update]:
        raw = self._early.pop(0) if self._early else await self._ws.get_message()
        frame, update = decode_frame(raw, wall_ms())
        if update is not None:
            return [update]
        reason = _fatal(frame)
        if reason is not None:
            raise AuthFailed(f"FMP refused the session: {reason}")
        if frame.event not in ("heartbeat", None):
            log.debug("[CONTROL] %s: %s %s", frame.event, frame.status, frame.message)
        return []


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class FmpProvider:
    name = "fmp"
    detects_stale = True  # FMP sends heartbeats, so silence means a dead feed

    def __init__(self, config: FmpConfig, connect_timeout: float = 30.0) -> None:
        self.config = config
        self.connect_timeout = connect_timeout

    def describe(self) -> str:
        return f"FMP {self.config.endpoint} at {self.config.resolved_url}"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[FmpSession]:
        # Not open_websocket_url(connect_timeout=...): on a timeout it leaves its reader task
        # waiting on a silent peer forever (trio-websocket 0.12), so a black-holed upstream
        # would hang the relay. Here the reader lives in our nursery, which the timeout cancels.
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(self.connect_timeout):
                    ws = await trio_websocket.connect_websocket_url(
                        nursery,
                        self.config.resolved_url,
                        message_queue_size=MESSAGE_QUEUE,
                        max_message_size=MAX_FRAME,
                    )
            except trio.TooSlowError:
                raise ProviderError(f"connect timed out after {self.connect_timeout:g}s") from None
            except OSError as exc:
                raise ProviderError(f"cannot connect: {exc.strerror or exc}") from None
            try:
                with trio.fail_after(self.connect_timeout):
                    early = await self._login(ws)
                yield FmpSession(ws, early)
            except trio.TooSlowError:
                raise ProviderError(f"login timed out after {self.connect_timeout:g}s") from None
            finally:
                # A clean close frame when we can; bounded, and skipped if we are being cancelled.
                with trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()

    async def _login(self, ws: trio_websocket.WebSocketConnection) -> list[str | bytes]:
        # The key goes only into this frame: never into a URL, a log line or an exception.
        await ws.send_message(_ENCODER.encode({"event": "login", "data": {"apiKey": self.config.api_key}}).decode())
        early: list[str | bytes] = []
        with trio.move_on_after(self.config.login_timeout):
            while len(early) < MESSAGE_QUEUE:
                raw = await ws.get_message()
                try:
                    frame = _DECODER.decode(raw)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    early.append(raw)  # counted as malformed by the normal path
                    continue
                reason = _fatal(frame)
                if reason is not None:
                    raise AuthFailed(f"FMP rejected the API key: {reason}")
                if frame.event == "login":
                    log.info("[LOGIN] FMP accepted the login (%s)", frame.message or frame.status or "no message")
                    return early
                early.append(raw)
        log.info("[LOGIN] no login reply from FMP within %.1fs; carrying on", self.config.login_timeout)
        return early
