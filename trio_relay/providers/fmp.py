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
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Literal

import attrs
import msgspec
import trio

from ..masking import mask_secrets
from ..model import BREAK, SYMBOL_RE, Amend, AmendAction, Update, normalize_epoch_ms, wall_ms
from ..settings import positive, ws_url
from .base import (
    AuthFailed,
    Credential,
    MalformedFrame,
    MalformedSink,
    ProviderEntry,
    RefusalSink,
    ignore_malformed,
    ignore_refused,
)
from .wsclient import WsClient

__all__ = ["FmpConfig", "ENTRY", "FmpProvider", "FmpSession", "SymbolMemo", "decode_frame", "FmpFrame"]

FMP_URLS = {
    "stocks": "wss://websockets.financialmodelingprep.com",
    "crypto": "wss://crypto.financialmodelingprep.com",
    "forex": "wss://forex.financialmodelingprep.com",
}


@attrs.frozen
class FmpConfig:
    # Never logged or shown: repr=False keeps it out of every repr and error.
    api_key: str = attrs.field(default="", repr=False)
    endpoint: Literal["stocks", "crypto", "forex"] = "stocks"
    # Overrides the endpoint's URL (tests and the local fake server use this).
    url: str = attrs.field(default="", validator=ws_url)
    # Seconds to wait for the (optional, undocumented) login reply before carrying on.
    login_timeout: float = attrs.field(default=3.0, validator=positive)

    @property
    def resolved_url(self) -> str:
        return self.url or FMP_URLS[self.endpoint]


log = logging.getLogger("trio_relay.providers.fmp")

# Subscribe in chunks so no single frame grows without bound.
SUBSCRIBE_CHUNK = 100
# Data frames kept while waiting for the login reply (they are delivered after it).
MAX_EARLY = 1024
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

#: Most raw symbols a :class:`SymbolMemo` holds. An upstream may send any symbol, so the memo is
#: bounded: once full, a symbol not in it is validated on every frame instead (still correct).
MAX_SYMBOL_MEMO = 65_536


class SymbolMemo:
    """Raw ``s`` → its client symbol (upper case, valid), for the symbols seen in data frames.

    A known symbol costs one dict lookup instead of ``upper()`` and the regex. Only valid symbols
    enter, at most :data:`MAX_SYMBOL_MEMO`, and nothing leaves: the mapping is a pure function of
    the raw symbol, so an entry never goes stale. One per session (no state shared between them).
    """

    __slots__ = ("known",)

    def __init__(self) -> None:
        self.known: dict[str | None, str] = {}

    def symbol(self, s: str | None, raw: str | bytes) -> str:
        """The client symbol of ``s``; :class:`MalformedFrame` if it is not a valid one."""
        symbol = self.known.get(s)
        if symbol is None:
            symbol = s.upper() if s else ""
            if not symbol or not SYMBOL_RE.match(symbol):
                raise MalformedFrame(f"missing or invalid symbol {s!r}", raw)
            if len(self.known) < MAX_SYMBOL_MEMO:
                self.known[s] = symbol
        return symbol


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


def decode_frame(raw: str | bytes, now_ms: int, symbols: SymbolMemo | None = None) -> tuple[FmpFrame, Update | None]:
    """Decode one FMP frame. Returns the frame and its update (None for control frames).

    ``symbols``: the session's memo of validated symbols (None: a fresh one, for a single frame).
    """
    try:
        frame = _DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        raise MalformedFrame(f"unexpected field type: {exc}", raw) from None
    except msgspec.DecodeError as exc:
        raise MalformedFrame(f"not a JSON object: {exc}", raw) from None
    if frame.event is not None:
        return frame, None
    kind = frame.type
    memo = symbols if symbols is not None else SymbolMemo()
    symbol = memo.known.get(frame.s) or memo.symbol(frame.s, raw)  # a known one: one lookup
    t = frame.t
    ts = normalize_epoch_ms(t) if t is not None and t > 0 else now_ms
    if kind == "T" or kind == "B":
        lp = frame.lp
        if lp is None:
            raise MalformedFrame(f"{kind} frame without lp", raw)
        if kind == "B":
            # A break voids the trade it carries (FMP gives no trade ids: the hub matches by price and size).
            amend = Amend(action=AmendAction.BREAK, price=lp, size=frame.ls)
            return frame, Update(symbol, BREAK, ts, last_price=lp, last_size=frame.ls, amend=amend)
        return frame, Update(symbol, kind, ts, last_price=lp, last_size=frame.ls)
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
    def __init__(
        self, ws: WsClient, early: list[str], on_malformed: MalformedSink, secrets: Sequence[str] = ()
    ) -> None:
        self._ws = ws
        self._secrets = secrets  # masked out of FMP's messages (a refusal may quote the key)
        self._early = early  # frames that arrived while we waited for the login reply
        self._on_malformed = on_malformed
        self._symbols = SymbolMemo()

    async def _send(self, event: str, symbols: Sequence[str]) -> None:
        for i in range(0, len(symbols), SUBSCRIBE_CHUNK):
            chunk = [s.lower() for s in symbols[i : i + SUBSCRIBE_CHUNK]]
            await self._ws.send_text(_ENCODER.encode({"event": event, "data": {"ticker": chunk}}).decode())

    async def subscribe(self, symbols: Sequence[str]) -> None:
        await self._send("subscribe", symbols)

    async def unsubscribe(self, symbols: Sequence[str]) -> None:
        await self._send("unsubscribe", symbols)

    async def receive(self) -> list[Update]:
        if self._early:
            raws, self._early = self._early, []
        else:
            raws = await self._ws.receive_batch()
        now = wall_ms()
        updates: list[Update] = []
        for raw in raws:
            try:
                frame, update = decode_frame(raw, now, self._symbols)
            except MalformedFrame as exc:
                self._on_malformed(exc)  # counted and logged; the rest of the batch goes on
                continue
            if update is not None:
                updates.append(update)
                continue
            reason = _fatal(frame)
            if reason is not None:
                raise AuthFailed(mask_secrets(f"FMP refused the session: {reason}", self._secrets))
            if frame.event != "heartbeat":
                log.debug(
                    "[CONTROL] %s: %s %s", frame.event, frame.status, mask_secrets(str(frame.message), self._secrets)
                )
        return updates


class FmpProvider:
    name = "fmp"
    detects_stale = True  # FMP sends heartbeats, so silence means a dead feed

    def __init__(self, config: FmpConfig, connect_timeout: float = 30.0) -> None:
        self.config = config
        self.connect_timeout = connect_timeout

    def describe(self) -> str:
        return f"FMP {self.config.endpoint} at {self.config.resolved_url}"

    @asynccontextmanager
    async def session(
        self, on_malformed: MalformedSink = ignore_malformed, on_refused: RefusalSink = ignore_refused
    ) -> AsyncIterator[FmpSession]:
        # FMP documents no per-symbol refusal: every symbol is sent as it is (on_refused unused).
        url = self.config.resolved_url
        async with WsClient.open(url, connect_timeout=self.connect_timeout, max_message=MAX_FRAME) as ws:
            yield FmpSession(ws, await self._login(ws), on_malformed, (self.config.api_key,))

    async def _login(self, ws: WsClient) -> list[str]:
        # The key goes only into this frame: never into a URL, a log line or an exception.
        await ws.send_text(_ENCODER.encode({"event": "login", "data": {"apiKey": self.config.api_key}}).decode())
        early: list[str] = []
        with trio.move_on_after(self.config.login_timeout):
            while len(early) < MAX_EARLY:
                for raw in await ws.receive_batch():
                    try:
                        frame = _DECODER.decode(raw)
                    except (msgspec.ValidationError, msgspec.DecodeError):
                        early.append(raw)  # counted as malformed by the normal path
                        continue
                    reason = _fatal(frame)
                    if reason is not None:
                        raise AuthFailed(mask_secrets(f"FMP rejected the API key: {reason}", (self.config.api_key,)))
                    if frame.event == "login":
                        said = mask_secrets(str(frame.message or frame.status or "no message"), (self.config.api_key,))
                        log.info("[LOGIN] FMP accepted the login (%s)", said)
                        return early
                    early.append(raw)
        log.info("[LOGIN] no login reply from FMP within %.1fs; carrying on", self.config.login_timeout)
        return early


ENTRY = ProviderEntry(
    name="fmp",
    settings=FmpConfig,
    build=lambda settings, upstream: FmpProvider(settings, connect_timeout=upstream.connect_timeout),
    credentials=(Credential("api_key", ("FMP_API_KEY",)),),
)
