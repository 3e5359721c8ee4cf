"""Finnhub WebSocket (US stocks, crypto and forex trades on one endpoint).

Protocol (see shared/providers.md, section 2), and what this adapter relies on:

- One endpoint for every asset class: ``wss://ws.finnhub.io?token=KEY``. The token in the query
  is the whole authentication: there is no login message. A bad key fails the HTTP upgrade with
  ``401`` (maintainer, Finnhub-API #465); we map 401/403 to :class:`AuthFailed` and 429 (and any
  other status) to :class:`ProviderError` (normal backoff). Because the key sits in the URL, the
  URL with its query is built only when connecting and never kept, logged or put into an
  exception: :meth:`FinnhubProvider.describe` shows scheme, host and path only, and any error
  text that could echo the URL is scrubbed.
- One symbol per message: ``{"type":"subscribe","symbol":"AAPL"}`` / ``"unsubscribe"``. No
  acknowledgement is documented (UNCONFIRMED that none exists); none is awaited.
- Data: ``{"type":"trade","data":[{"s":..,"p":..,"t":..,"v":..,"c":[..]}, ...]}``, several trades
  for several symbols in one frame. ``s`` is the symbol as subscribed, ``p`` the price, ``t`` epoch
  milliseconds, ``v`` the volume: ``0`` for venues that send price updates rather than trades (some
  forex and crypto venues), which becomes ``last_size=None``. ``c`` (condition codes) is not
  decoded. Every element is a kind ``"T"`` update; no correction or break message is documented on
  this socket, so there is no ``"B"``. There is no quote stream.
- ``{"type":"ping"}`` arrives every 1-2 minutes (a user's report); no reply is documented (a user
  who answered with a pong was disconnected anyway), so none is sent. Pings come whether or not
  anything trades (stocks get only pings while the market is closed), so the relay's generic
  staleness check (``stale_after``, 30 s by default) would tear down a healthy socket:
  ``detects_stale`` is False. Instead a session that hears nothing at all, not even a ping, for
  ``silence_timeout`` (300 s: well over the reported ping interval) while symbols are subscribed
  raises :class:`ProviderError`, so a half-open TCP connection does not go unnoticed forever.
- ``{"type":"error","msg":..}`` is never fatal here: ``"Invalid symbol X"`` (older servers omit
  the symbol) is a warning, once per symbol; ``"Subscribing to too many symbols"`` (plan limit,
  about 50 on the free tier; it does not say which symbol) is an error naming how many symbols
  this connection asked for; any other text is a warning. The session stays up.
- One connection per key: a second connection with the same key drops both (third-party
  report), with no message we could recognise; the relay sees a drop and reconnects.
- The server restarts for updates and drops connections (#256, #272); the upstream task
  reconnects and resubscribes.
- During an incident every trade was delivered three times (#158): a trade identical in
  ``(s, t, p, v)`` to the last trade of that symbol on this connection is dropped. Two genuine
  prints of the same size at the same price in the same millisecond are rare and merge into one;
  that is the accepted cost.

Symbols: clients say ``BTCUSD`` / ``EURUSD`` / ``AAPL``; Finnhub wants ``COINBASE:BTC-USD``,
``OANDA:EUR_USD`` and ``AAPL``. ``[finnhub.symbols]`` adds or overrides entries (e.g.
``BTCUSD = "BINANCE:BTCUSDT"``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from urllib.parse import quote, urlsplit

import attrs
import msgspec
import trio

from ..model import SYMBOL_RE, TRADE, Update, normalize_epoch_ms, wall_ms
from ..settings import no_query, symbol_map, ws_url
from .base import (
    Credential,
    ErrorClass,
    MalformedFrame,
    MalformedSink,
    ProviderEntry,
    ProviderError,
    RateLimited,
    RefusalSink,
    error_for,
    ignore_malformed,
    ignore_refused,
)
from .symbols import SymbolMap
from .wsclient import HandshakeRejected, WsClient

__all__ = [
    "FinnhubConfig",
    "ENTRY",
    "FinnhubProvider",
    "FinnhubSession",
    "FinnhubDecoder",
    "FinnhubTrade",
    "TradeFrame",
    "PingFrame",
    "ErrorFrame",
    "decode_frame",
    "finnhub_symbols",
    "public_url",
]

FINNHUB_URL = "wss://ws.finnhub.io"


@attrs.frozen
class FinnhubConfig:
    # Finnhub's token travels in the URL query: the relay never logs a URL with it.
    api_key: str = attrs.field(default="", repr=False)
    # Overrides wss://ws.finnhub.io (tests and the local fake server use this). No query: the
    # relay adds the token itself, and a URL is not a place for a secret.
    url: str = attrs.field(default="", validator=[no_query, ws_url])
    # Extra client symbol → Finnhub symbol entries (e.g. "BTCUSD" = "BINANCE:BTCUSDT"); they win
    # over the built-in table.
    symbols: dict[str, str] = attrs.field(factory=dict, validator=symbol_map)

    @property
    def resolved_url(self) -> str:
        return self.url or FINNHUB_URL


log = logging.getLogger("trio_relay.providers.finnhub")

MAX_FRAME = 1 << 22  # a busy crypto frame holds many trades; 4 MiB bounds one message
# Seconds of total silence (not even a ping) tolerated while symbols are subscribed.
SILENCE_TIMEOUT = 300.0
# Seconds allowed for our close frame on the way out (aclose closes the socket in any case).
CLOSE_TIMEOUT = 5.0
# Bounds of per-process / per-session memories that grow with distinct symbols seen.
MAX_REMEMBERED = 4096
# Least wait after an HTTP 429 without Retry-After: Finnhub's plan limits are per minute (free
# plan: 60 API calls/minute, finnhub-js #2 quoting the docs) on top of 30 calls/second.
RATE_LIMIT_WAIT = 60.0

#: What an HTTP status on the upgrade means (any other: RETRY). A bad key is 401 (maintainer,
#: Finnhub-API #465).
HTTP_ERRORS: dict[int, ErrorClass] = {401: ErrorClass.AUTH, 403: ErrorClass.AUTH, 429: ErrorClass.RATE_LIMIT}
#: What an ``{"type":"error","msg":..}`` means, by the start of its text (any other: NOTICE).
#: Never fatal: the session goes on, the symbols concerned are refused.
MESSAGE_ERRORS: dict[str, ErrorClass] = {
    "invalid symbol": ErrorClass.SYMBOLS,  # "Invalid symbol X" (#472; older servers omit X)
    "subscribing to too many symbols": ErrorClass.SYMBOLS,  # the plan's limit (does not say which)
}


# --------------------------------------------------------------------------- wire types


class FinnhubTrade(msgspec.Struct, gc=False):
    """One element of a trade frame's ``data`` (``c``, the condition codes, is skipped unread)."""

    s: str
    p: float
    t: int | float
    v: int | float | None = None  # a JSON integer stays an int (whole shares are not 100.0)


class TradeFrame(msgspec.Struct, tag_field="type", tag="trade", gc=False):
    data: list[FinnhubTrade]


class PingFrame(msgspec.Struct, tag_field="type", tag="ping", gc=False):
    pass


class ErrorFrame(msgspec.Struct, tag_field="type", tag="error", gc=False):
    msg: str = ""


class NewsFrame(msgspec.Struct, tag_field="type", tag="news", gc=False):
    """Premium news on the same socket; never subscribed by the relay, ignored if it comes."""


class PressFrame(msgspec.Struct, tag_field="type", tag="pr", gc=False):
    """Enterprise press releases; never subscribed by the relay, ignored if it comes."""


Frame = TradeFrame | PingFrame | ErrorFrame | NewsFrame | PressFrame

_DECODER: msgspec.json.Decoder[Frame] = msgspec.json.Decoder(Frame)  # immutable, safe to share
_ENCODER = msgspec.json.Encoder()


def decode_frame(raw: str | bytes) -> Frame:
    """Decode one Finnhub frame by its ``type``; anything else is :class:`MalformedFrame`."""
    try:
        return _DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        raise MalformedFrame(f"unexpected frame shape: {exc}", raw) from None
    except msgspec.DecodeError as exc:
        raise MalformedFrame(f"not a JSON object: {exc}", raw) from None


# --------------------------------------------------------------------------- symbols


def finnhub_symbols(config: FinnhubConfig) -> SymbolMap:
    """Client symbols ↔ Finnhub's: Coinbase crypto, OANDA forex, stocks as they are."""
    return SymbolMap(
        crypto=lambda base, quote_: f"COINBASE:{base}-{quote_}",
        forex=lambda base, quote_: f"OANDA:{base}_{quote_}",
        extra=config.symbols,
        stocks="identity",
    )


class _Remembered:
    """A set that forgets everything once it holds ``limit`` entries (bounded, for log-once)."""

    __slots__ = ("_items", "_limit")

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._items: set[str] = set()
        self._limit = limit

    def first_time(self, item: str) -> bool:
        if item in self._items:
            return False
        if len(self._items) >= self._limit:
            self._items.clear()
        self._items.add(item)
        return True


# --------------------------------------------------------------------------- decoding


_INVALID_SYMBOL = "invalid symbol"
_TOO_MANY = "subscribing to too many symbols"


class FinnhubDecoder:
    """Frames of one connection → updates, with that connection's duplicate filter.

    Holds per-connection state only: the last trade seen per symbol (duplicates of it are
    dropped), a cache of Finnhub symbol → client symbol, and the Finnhub symbols asked for (to
    say how many when the plan's limit is hit).
    """

    def __init__(
        self,
        symbols: SymbolMap,
        *,
        warned: _Remembered | None = None,
        scrub: Callable[[str], str] = str,
        on_refused: RefusalSink = ignore_refused,
    ) -> None:
        self.symbols = symbols
        self.subscribed: set[str] = set()  # Finnhub spelling
        # The same symbols in the order they were subscribed: a "too many symbols" error refuses
        # the newest (Finnhub answers each subscribe in turn and never says which one it refused).
        self._order: dict[str, None] = {}
        self._on_refused = on_refused
        self.duplicates = 0
        self.too_many = 0
        self._last: dict[str, tuple[int | float, float, float | None]] = {}
        self._client_of: dict[str, str] = {}  # "" for a symbol that maps to nothing
        self._warned = warned if warned is not None else _Remembered()
        self._scrub = scrub

    def forget(self, native: str) -> None:
        """``native`` was unsubscribed: drop its state (a later identical trade is new)."""
        self.subscribed.discard(native)
        self._order.pop(native, None)
        self._last.pop(native, None)

    def subscribed_to(self, native: str) -> None:
        self.subscribed.add(native)
        self._order[native] = None

    def _refuse(self, native: str, reason: str) -> None:
        self.forget(native)
        client = self.symbols.to_client(native)
        if client:
            self._on_refused([client], reason)

    def refuse_unmapped(self, symbols: list[str]) -> None:
        self._on_refused(symbols, "finnhub has no symbol for it (add it to [finnhub.symbols])")

    def _client_symbol(self, native: str) -> str:
        client = self.symbols.to_client(native) or ""
        if not SYMBOL_RE.match(client):
            log.debug("[DATA] Finnhub symbol %r maps to no client symbol; skipped", native)
            client = ""
        if len(self._client_of) >= MAX_REMEMBERED:
            self._client_of.clear()
        self._client_of[native] = client
        return client

    def decode_batch(self, raws: Sequence[str | bytes], on_malformed: MalformedSink, now_ms: int) -> list[Update]:
        """The updates of ``raws`` in order; bad frames go to ``on_malformed``, control frames act."""
        updates: list[Update] = []
        append = updates.append
        client_of = self._client_of
        last = self._last
        for raw in raws:
            try:
                frame = decode_frame(raw)
            except MalformedFrame as exc:
                on_malformed(exc)  # counted and logged; the rest of the batch goes on
                continue
            if type(frame) is TradeFrame:
                for trade in frame.data:
                    native = trade.s
                    client = client_of.get(native)
                    if client is None:
                        client = self._client_symbol(native)
                    if not client:
                        continue
                    key = (trade.t, trade.p, trade.v)
                    if last.get(native) == key:
                        self.duplicates += 1
                        continue
                    last[native] = key
                    t = trade.t
                    append(
                        Update(
                            client,
                            TRADE,
                            normalize_epoch_ms(t) if t > 0 else now_ms,
                            last_price=trade.p,
                            last_size=trade.v or None,  # v == 0: a price update, not a trade
                        )
                    )
            elif type(frame) is ErrorFrame:
                self._error(frame.msg)
            elif type(frame) is PingFrame:
                pass  # liveness only: no reply is documented
            else:
                log.debug("[CONTROL] Finnhub %s frame ignored (not subscribed by the relay)", type(frame).__name__)
        return updates

    def _error(self, msg: str) -> None:
        text = self._scrub(msg.strip())
        lowered = text.lower()
        if lowered.startswith(_INVALID_SYMBOL):
            native = text[len(_INVALID_SYMBOL) :].strip()
            if native in self.subscribed:
                self._refuse(native, f"Finnhub: {text[:100]}")  # not a subscription: out of the count too
            if not native:
                log.warning("[SUBSCRIBE] Finnhub: %s (it does not say which symbol)", text)
            elif self._warned.first_time(native):
                client = self.symbols.to_client(native)
                shown = f"{native} (client symbol {client})" if client and client != native else native
                log.warning("[SUBSCRIBE] Finnhub says invalid symbol %s; it gets no data", shown)
            else:
                log.debug("[SUBSCRIBE] Finnhub says invalid symbol %s (again)", native)
        elif lowered.startswith(_TOO_MANY):
            self.too_many += 1
            level = logging.ERROR if self.too_many == 1 else logging.DEBUG
            log.log(
                level,
                "[SUBSCRIBE] Finnhub refused a subscription: too many symbols (%d asked for on this connection; "
                "the plan's limit is lower, so some symbols get no data)",
                len(self.subscribed),
            )
            if self._order:
                newest = next(reversed(self._order))
                self._refuse(newest, "Finnhub: subscribing to too many symbols (the plan's limit)")
        else:
            log.warning("[PROVIDER] Finnhub error: %.200s", text)


# --------------------------------------------------------------------------- session


class FinnhubSession:
    """One connection: sends subscriptions, decodes frames, watches for total silence."""

    def __init__(
        self,
        ws: WsClient,
        decoder: FinnhubDecoder,
        on_malformed: MalformedSink,
        *,
        unmapped: _Remembered | None = None,
        silence_timeout: float | None = SILENCE_TIMEOUT,
    ) -> None:
        self._ws = ws
        self.decoder = decoder
        self._on_malformed = on_malformed
        self._unmapped = unmapped if unmapped is not None else _Remembered()
        self._silence = silence_timeout
        self._heard_at = trio.current_time()  # last frame, or the first subscribe after none
        self._scope: trio.CancelScope | None = None

    def _deadline(self) -> float:
        if not self._silence or not self.decoder.subscribed:  # None or 0: no watchdog
            return float("inf")
        return self._heard_at + self._silence

    def _rearm(self) -> None:
        if self._scope is not None:
            self._scope.deadline = self._deadline()

    async def _send(self, kind: str, native: str) -> None:
        await self._ws.send_text(_ENCODER.encode({"type": kind, "symbol": native}).decode())

    async def subscribe(self, symbols: Sequence[str]) -> None:
        mapped, missing = self.decoder.symbols.split(symbols)
        for sym in missing:
            if self._unmapped.first_time(sym):
                log.warning("[SUBSCRIBE] finnhub has no symbol for %s; add it to [finnhub.symbols]", sym)
        if missing:
            self.decoder.refuse_unmapped(missing)
        subscribed = self.decoder.subscribed
        for native in mapped:
            if not subscribed:
                self._heard_at = trio.current_time()  # silence counts from the first subscription
            await self._send("subscribe", native)
            self.decoder.subscribed_to(native)
        self._rearm()

    async def unsubscribe(self, symbols: Sequence[str]) -> None:
        mapped, _missing = self.decoder.symbols.split(symbols)  # the missing were never sent
        for native in mapped:
            await self._send("unsubscribe", native)
            self.decoder.forget(native)
        self._rearm()

    async def receive(self) -> list[Update]:
        with trio.CancelScope(deadline=self._deadline()) as scope:
            self._scope = scope
            try:
                raws = await self._ws.receive_batch()
            finally:
                self._scope = None
        if scope.cancelled_caught:
            # The read was interrupted mid-way, so this connection must not be read again.
            raise ProviderError(f"Finnhub sent nothing, not even a ping, for {self._silence:g}s")
        self._heard_at = trio.current_time()
        return self.decoder.decode_batch(raws, self._on_malformed, wall_ms())


# --------------------------------------------------------------------------- provider


def _handshake_error(exc: HandshakeRejected) -> ProviderError:
    """The error an HTTP status on the upgrade ends the attempt with (:data:`HTTP_ERRORS`)."""
    status = exc.status
    cls = HTTP_ERRORS.get(status, ErrorClass.RETRY)
    if cls is ErrorClass.RATE_LIMIT:
        wait = exc.retry_after if exc.retry_after is not None else RATE_LIMIT_WAIT
        return RateLimited(f"Finnhub refused the connection: HTTP {status} (too many requests)", max(wait, 0.0))
    if cls is ErrorClass.AUTH:
        text = f"Finnhub rejected the API key (HTTP {status} on the upgrade)"
    else:
        text = f"Finnhub refused the upgrade with HTTP {status}"
    return error_for(cls, text) or ProviderError(text)


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment: what may be shown (the token is a query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


_TOKEN_RE = re.compile(r"(token=)[^&\s'\":;,)]*", re.IGNORECASE)


class FinnhubProvider:
    name = "finnhub"
    # Only pings (every 1-2 min) arrive while nothing trades: the relay's 30 s staleness check
    # would kill healthy sessions. The session's own silence_timeout covers dead connections.
    detects_stale = False

    def __init__(
        self,
        config: FinnhubConfig,
        connect_timeout: float = 30.0,
        *,
        silence_timeout: float | None = SILENCE_TIMEOUT,
    ) -> None:
        self.config = config
        self.connect_timeout = connect_timeout
        self.silence_timeout = silence_timeout
        self.symbols = finnhub_symbols(config)
        # Log-once memories shared by the sessions of this provider (bounded).
        self._unmapped = _Remembered()
        self._invalid = _Remembered()

    def describe(self) -> str:
        return f"Finnhub at {public_url(self.config.resolved_url)}"

    def scrub(self, text: str) -> str:
        """``text`` with the API key (raw or URL-encoded) and any ``token=`` value masked."""
        key = self.config.api_key
        for secret in (key, quote(key, safe=""), quote(key)):
            if secret:
                text = text.replace(secret, "***")
        return _TOKEN_RE.sub(r"\1***", text)

    def _token_url(self) -> str:
        # Built here and nowhere else; never stored, logged or put in an exception.
        base = self.config.resolved_url
        sep = "&" if urlsplit(base).query else "?"
        return f"{base}{sep}token={quote(self.config.api_key, safe='')}"

    async def _connect(self) -> WsClient:
        where = self.describe()
        try:
            with trio.fail_after(self.connect_timeout):
                return await WsClient.connect(self._token_url(), max_message=MAX_FRAME)
        except trio.TooSlowError:
            raise ProviderError(f"connect to {where} timed out after {self.connect_timeout:g}s") from None
        except HandshakeRejected as exc:
            raise _handshake_error(exc) from None
        except (ProviderError, OSError) as exc:
            # wsclient's messages name host and port only today; make sure no future one leaks.
            text = str(exc)
            clean = self.scrub(text)
            if clean != text:
                raise ProviderError(clean) from None
            raise

    @asynccontextmanager
    async def session(
        self, on_malformed: MalformedSink = ignore_malformed, on_refused: RefusalSink = ignore_refused
    ) -> AsyncIterator[FinnhubSession]:
        ws = await self._connect()
        try:
            decoder = FinnhubDecoder(self.symbols, warned=self._invalid, scrub=self.scrub, on_refused=on_refused)
            yield FinnhubSession(
                ws, decoder, on_malformed, unmapped=self._unmapped, silence_timeout=self.silence_timeout
            )
        finally:
            # A dead peer can leave the close frame unsendable; the socket is closed regardless.
            with trio.move_on_after(CLOSE_TIMEOUT):
                await ws.aclose()


ENTRY = ProviderEntry(
    name="finnhub",
    settings=FinnhubConfig,
    build=lambda settings, upstream: FinnhubProvider(settings, connect_timeout=upstream.connect_timeout),
    credentials=(Credential("api_key", ("FINNHUB_API_KEY",)),),
)
