"""Alpaca Market Data stream: v2 stocks (iex, sip, delayed_sip, test) and v1beta3 crypto.

Protocol (see shared/providers.md §3; field names checked against alpaca-trade-api-go
``marketdata/stream/message.go``):

- URL ``wss://stream.data.alpaca.markets/v2/{feed}`` or ``.../v1beta3/crypto/{loc}``. Every
  server frame is a JSON **array**; control frames (``success``, ``error``, ``subscription``)
  hold one element, data frames may hold many (the server batches for slow readers).
- Login: the server greets with ``[{"T":"success","msg":"connected"}]``; we send
  ``{"action":"auth","key":KEY_ID,"secret":SECRET}`` and wait ``auth_timeout`` for
  ``[{"T":"success","msg":"authenticated"}]`` (Alpaca itself closes after 10 s without auth).
  The key and secret go into that one frame only: never a URL, a log line or an exception.
- Subscriptions are incremental: ``{"action":"subscribe","trades":[...],"quotes":[...]}`` adds,
  ``"unsubscribe"`` removes. Every request is answered with the WHOLE current set
  (``{"T":"subscription","trades":[...],"quotes":[...],...}``), or with an error. Requests and
  replies are matched in order to warn about symbols the server left out. Stock trades bring
  ``corrections`` and ``cancelErrors`` along automatically. Bars are not subscribed: an
  :class:`~trio_relay.model.Update` has no bar kind.
- Data, by ``T``: ``t`` trade (``S p s t``, trade id ``i``; crypto sizes are fractional), ``q``
  quote (``S bp bs ap as t``), ``c`` correction (``S t``, the original trade ``oi op os`` and
  the corrected one ``ci cp cs``) → kind ``C`` whose :class:`~trio_relay.model.Amend` names
  both; ``x`` cancel/error (``S t``, the cancelled trade ``i p s``; action ``a`` is ``C`` cancel
  or ``E`` error, both void the trade) → kind ``X``. Field names as alpaca-py's
  ``TRADE_CORRECTION_MAPPING`` / ``TRADE_CANCEL_MAPPING`` (alpaca/data/mappings.py).
  ``b u d s l i o n p`` (bars, statuses, LULD, imbalances, order books, news, futures pricing)
  are skipped without looking at their fields.
- ``t`` is RFC-3339 text with up to nanosecond precision (``2021-02-22T15:51:44.208123456Z``),
  turned into epoch ms (floor) by :func:`rfc3339_ms`: ``datetime.fromisoformat`` (C code,
  truncates past µs) minus the epoch, floor-divided by 1 ms, all integer arithmetic. Measured on
  CPython 3.11 it is the fastest exact way: a pure-Python parser caching each minute's epoch
  costs 2-3x more per tick, and msgspec's own ``datetime`` decoding, though faster, rounds to
  the µs (``.208999999`` would become 209 ms).
- Sizes are passed through as sent. Stock quote sizes are taken to be shares, not round lots
  (Alpaca's v2 docs are said to have stated shares since 2022; shared/providers.md marks the
  unit UNCONFIRMED and we found no stored page either way, so no ×100 is applied). Crypto
  sizes are in the base asset with no lot multiplier (Alpaca changelog, crypto quote schema).
  A quote side with price 0 (an empty side) is reported as ``None``, not as a zero price.
- Errors ``{"T":"error","code":N,"msg":...}``: every documented code is classified in
  :data:`ERRORS` (one table; see :class:`~trio_relay.providers.base.ErrorClass`): 402, 408,
  409, 410, 411 (credentials, plan, feed) wait ``auth_retry_delay``; 406 connection limit is
  retried quickly a few times first (our own previous connection may linger after a blip);
  404, 407, 500 reconnect at the normal backoff; 405 symbol limit and 400 invalid syntax refuse
  the symbols of the request they answer (reported through ``on_refused``, never subscribed
  again until their demand changes) and the session goes on; 401 and 403 are warnings. Symbols
  the subscription reply leaves out are refused the same way.
- No application heartbeat, and nothing at all is sent while nothing trades, so silence does
  not mean a dead feed (``detects_stale = False``); the socket's own ping/pong is answered by
  :class:`~trio_relay.providers.wsclient.WsClient`.
- Symbols: stock feeds pass tickers through (``AAPL``); the crypto feed speaks ``BTC/USD`` for
  the client's ``BTCUSD``, by rule for every pair quoted in :data:`CRYPTO_QUOTES` (``BATUSD`` →
  ``BAT/USD``), ``[alpaca.symbols]`` for exceptions; anything else (a stock ticker) is refused.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

import attrs
import msgspec
import trio

from ..model import CANCEL, CORRECTION, QUOTE, SYMBOL_RE, TRADE, Amend, AmendAction, Update, wall_ms
from ..settings import positive, symbol_map, ws_url
from .base import (
    Credential,
    ErrorClass,
    MalformedFrame,
    MalformedSink,
    ProviderEntry,
    ProviderError,
    RefusalSink,
    error_for,
    ignore_malformed,
    ignore_refused,
)
from .symbols import FOREX_PAIRS, PairRule, SymbolMap
from .wsclient import WsClient

__all__ = [
    "AlpacaConfig",
    "ENTRY",
    "AlpacaProvider",
    "AlpacaSession",
    "AlpacaMessage",
    "rfc3339_ms",
    "ERRORS",
    "error_outcome",
    "error_class",
]

#: The quote currencies of Alpaca's crypto pairs: "trading pairs are based on BTC, USD, USDT and
#: USDC" (docs.alpaca.markets/docs/crypto-trading). Any BASEQUOTE with one of them maps to BASE/QUOTE.
CRYPTO_QUOTES = ("USD", "USDT", "USDC", "BTC")

ALPACA_HOSTS = {False: "wss://stream.data.alpaca.markets", True: "wss://stream.data.sandbox.alpaca.markets"}


@attrs.frozen
class AlpacaConfig:
    key_id: str = attrs.field(default="", repr=False)
    secret_key: str = attrs.field(default="", repr=False)
    # Stocks: iex (free), sip (paid), delayed_sip, test (FAKEPACA, open at all hours); or crypto.
    feed: Literal["iex", "sip", "delayed_sip", "test", "crypto"] = "iex"
    # Crypto venue: us (Alpaca), us-1 (Kraken US), eu-1 (Kraken EU).
    crypto_location: Literal["us", "us-1", "eu-1"] = "us"
    sandbox: bool = False
    # Overrides the URL built from feed/sandbox (tests and the local fake server use this).
    url: str = attrs.field(default="", validator=ws_url)
    # Alpaca closes a connection that has not authenticated within 10 s.
    auth_timeout: float = attrs.field(default=10.0, validator=positive)
    symbols: dict[str, str] = attrs.field(factory=dict, validator=symbol_map)

    @property
    def resolved_url(self) -> str:
        if self.url:
            return self.url
        host = ALPACA_HOSTS[self.sandbox]
        if self.feed == "crypto":
            return f"{host}/v1beta3/crypto/{self.crypto_location}"
        return f"{host}/v2/{self.feed}"


log = logging.getLogger("trio_relay.providers.alpaca")

# WebSocket keepalive: Alpaca sends nothing while nothing trades, so only pings can tell a quiet feed
# from a half-open connection. alpaca-py pings every 10 s too (ping_interval=10 in
# alpaca/data/live/websocket.py); it waits up to 180 s for the pong, we give up after 20 s of silence.
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
# Symbols per subscribe/unsubscribe request, so no single frame grows without bound.
SUBSCRIBE_CHUNK = 200
MAX_FRAME = 1 << 22  # a busy batch can be large: many ticks in one array
# Requests whose reply we still wait for (only used to name symbols in warnings).
MAX_PENDING = 256
# Memo of native → client symbols; cleared when it reaches this size.
MAX_MEMO = 20_000
# Client symbols already warned about as unmapped; cleared when it reaches this size.
MAX_WARNED = 10_000

#: Every error code Alpaca documents, and what the relay does about it (ErrorClass). Sources: the
#: stream docs' error table (shared/providers.md section 3); alpaca-trade-api-go, which stops on
#: 402/409/410/411 and retries anything else with a delay of 150 ms x the failures so far
#: (marketdata/stream/{errors,client}.go); alpaca-py, which gives up only on "insufficient
#: subscription" (alpaca/data/live/websocket.py). Any other code: NOTICE (if it was fatal, the
#: server closes the socket, and that is a normal reconnect).
ERRORS: dict[int, tuple[str, ErrorClass]] = {
    400: ("invalid syntax", ErrorClass.SYMBOLS),  # also a badly formatted symbol: that request's symbols
    401: ("not authenticated", ErrorClass.NOTICE),
    402: ("auth failed", ErrorClass.AUTH),
    403: ("already authenticated", ErrorClass.NOTICE),
    404: ("auth timeout", ErrorClass.RETRY),
    405: ("symbol limit exceeded", ErrorClass.SYMBOLS),  # the set stays as it was: that request's symbols
    406: ("connection limit exceeded", ErrorClass.CONNECTION_LIMIT),  # often our own previous connection
    407: ("slow client", ErrorClass.RETRY),
    408: ("v2 not enabled", ErrorClass.AUTH),
    409: ("insufficient subscription", ErrorClass.AUTH),
    410: ("invalid subscribe action for this feed", ErrorClass.AUTH),
    411: ("insufficient scope", ErrorClass.AUTH),
    429: ("rate limit exceeded", ErrorClass.RATE_LIMIT),  # an HTTP 429 on the upgrade (any provider)
    500: ("internal error", ErrorClass.RETRY),
}

# Message types we never turn into updates: bars, updated bars, daily bars, trading statuses,
# LULD bands, order imbalances, crypto order books, news, perpetual-futures pricing.
_SKIPPED = frozenset({"b", "u", "d", "s", "l", "i", "o", "n", "p"})


class AlpacaMessage(msgspec.Struct, gc=False):
    """The fields we read from one array element, data or control.

    Only fields whose JSON type is the same in every message type are declared (``c`` is a
    condition list in a trade but a price in a bar, ``i`` an int in a trade but a string in a
    LULD, ``a`` a cancel's action but an order book's asks): anything else is skipped by the decoder, so a message we skip can never make a
    frame fail to decode.
    """

    T: str = ""
    S: str | None = None
    t: str | None = None
    p: int | float | None = None
    s: int | float | None = None
    bp: int | float | None = None
    bs: int | float | None = None
    ap: int | float | None = None
    as_: int | float | None = msgspec.field(default=None, name="as")
    # A trade's id (an int; a LULD's "i" is a string of indicators, never read there).
    i: int | str | None = None
    oi: int | str | None = None
    op: int | float | None = None
    os: int | float | None = None
    ci: int | str | None = None
    cp: int | float | None = None
    cs: int | float | None = None
    code: int | None = None
    msg: str | None = None
    trades: list[str] | None = None
    quotes: list[str] | None = None


_DECODER = msgspec.json.Decoder(list[AlpacaMessage])  # immutable, safe to share
_RAW_DECODER = msgspec.json.Decoder(list[msgspec.Raw])
_ONE_DECODER = msgspec.json.Decoder(AlpacaMessage)
_ENCODER = msgspec.json.Encoder()

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_fromisoformat = datetime.fromisoformat


def rfc3339_ms(text: str) -> int:
    """An RFC-3339 time (``Z`` or ``±HH:MM``, any fraction length) → UTC epoch ms, floored.

    ``datetime.fromisoformat`` (C, Python ≥ 3.11) keeps 6 fraction digits and drops the rest,
    so nanoseconds are truncated, never rounded up; the integer timedelta division keeps it
    exact. Raises ``ValueError`` for text it cannot read and ``TypeError`` for a time without a
    zone.
    """
    return (_fromisoformat(text) - _EPOCH) // _MS


def error_class(code: int | None) -> ErrorClass:
    """The class of an Alpaca error code (:data:`ERRORS`; unknown codes are NOTICE)."""
    found = ERRORS.get(code) if code is not None else None
    return found[1] if found is not None else ErrorClass.NOTICE


def error_outcome(code: int | None, message: str, *, logged_in: bool = False) -> ProviderError | None:
    """The exception an Alpaca error message ends the session with, or None to carry on.

    A 406 while logging in may be our own previous connection (quick retries); in a session that
    was logged in, another connection with the key took its place: an auth failure, so the two
    never take turns kicking each other out.
    """
    cls = error_class(code)
    if cls is ErrorClass.CONNECTION_LIMIT and logged_in:
        cls = ErrorClass.AUTH
    return error_for(cls, f"Alpaca error {code}: {message}")


def _amendment(symbol: str, ts: int, m: AlpacaMessage) -> Update | None:
    """A correction (``c``) or cancel/error (``x``) as an amendment update; None if unreadable."""
    if m.T == "c":
        if m.cp is None:
            return None
        amend = Amend(
            action=AmendAction.CORRECTION,
            trade_id=None if m.oi is None else str(m.oi),
            price=m.op,
            size=m.os,
            corrected_id=None if m.ci is None else str(m.ci),
            corrected_price=m.cp,
            corrected_size=m.cs,
        )
        return Update(symbol, CORRECTION, ts, m.cp, m.cs, amend=amend)
    if m.p is None and m.i is None:
        return None
    amend = Amend(action=AmendAction.CANCEL, trade_id=None if m.i is None else str(m.i), price=m.p, size=m.s)
    return Update(symbol, CANCEL, ts, m.p, m.s, amend=amend)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class Transport(Protocol):
    """What a session needs from its WebSocket (:class:`WsClient` in production)."""

    async def send_text(self, text: str) -> None: ...

    async def receive_batch(self) -> list[str]: ...


class AlpacaSession:
    """One authenticated connection: subscriptions in client symbols, updates out."""

    def __init__(
        self,
        ws: Transport,
        symbols: SymbolMap,
        on_malformed: MalformedSink = ignore_malformed,
        *,
        early: Sequence[str] = (),
        warned: set[str] | None = None,
        secrets: Sequence[str] = (),
        provider: str = "alpaca",
        on_refused: RefusalSink = ignore_refused,
    ) -> None:
        self._ws = ws
        self._on_refused = on_refused
        self._symbols = symbols
        self._on_malformed = on_malformed
        self._early = list(early)  # frames that came in the same read as the auth reply
        self._warned = warned if warned is not None else set()
        self._secrets = tuple(s for s in secrets if s)
        self._provider = provider
        # Native symbol → the client symbols wanting it (two client spellings may share one).
        self._wanted: dict[str, set[str]] = {}
        # (action, native symbols) of each request not yet answered, in send order.
        self._pending: deque[tuple[str, tuple[str, ...]]] = deque(maxlen=MAX_PENDING)
        self._clients: dict[str, str] = {}  # memo: native symbol in frames → client symbol

    @property
    def wanted(self) -> frozenset[str]:
        """The native symbols this session believes are subscribed upstream."""
        return frozenset(self._wanted)

    # ------------------------------------------------------------------ subscriptions
    async def subscribe(self, symbols: Sequence[str]) -> None:
        natives: list[str] = []
        for sym in symbols:
            native = self._symbols.to_native(sym)
            if native is None:
                self._warn_unmapped(sym)
                self._on_refused([sym], f"{self._provider} has no symbol for it on this feed")
                continue
            holders = self._wanted.setdefault(native, set())
            if not holders:
                natives.append(native)
            holders.add(sym)
        await self._send("subscribe", natives)

    async def unsubscribe(self, symbols: Sequence[str]) -> None:
        natives: list[str] = []
        for sym in symbols:
            native = self._symbols.to_native(sym)
            holders = self._wanted.get(native) if native is not None else None
            if native is None or holders is None:
                continue  # never sent (unmapped, or refused by a 405)
            holders.discard(sym)
            if not holders:
                del self._wanted[native]
                natives.append(native)
        await self._send("unsubscribe", natives)

    async def _send(self, action: str, natives: list[str]) -> None:
        for i in range(0, len(natives), SUBSCRIBE_CHUNK):
            chunk = natives[i : i + SUBSCRIBE_CHUNK]
            self._pending.append((action, tuple(chunk)))
            frame = _ENCODER.encode({"action": action, "trades": chunk, "quotes": chunk})
            await self._ws.send_text(frame.decode())

    def _warn_unmapped(self, symbol: str) -> None:
        if symbol in self._warned:
            return
        if len(self._warned) >= MAX_WARNED:
            self._warned.clear()
        self._warned.add(symbol)
        log.warning("[SUBSCRIBE] %s has no symbol for %s; add it to [alpaca.symbols]", self._provider, symbol)

    # ------------------------------------------------------------------ receiving
    async def receive(self) -> list[Update]:
        if self._early:
            raws, self._early = self._early, []
        else:
            raws = await self._ws.receive_batch()
        return self.process(raws)

    def process(self, raws: Sequence[str | bytes]) -> list[Update]:
        """The updates in ``raws`` (frames as read); handles control messages on the way.

        Raises :class:`AuthFailed` / :class:`ProviderError` for an error that ends the session.
        Long on purpose: the feed's hot loop, each message kind's mapping inline.
        """
        updates: list[Update] = []
        append = updates.append
        fromisoformat = _fromisoformat
        epoch, one_ms = _EPOCH, _MS
        clients = self._clients
        for raw in raws:
            try:
                messages = _DECODER.decode(raw)
            except (msgspec.ValidationError, msgspec.DecodeError):
                messages = self._salvage(raw)
            for m in messages:
                kind = m.T
                if kind == "q" or kind == "t" or kind == "c" or kind == "x":
                    native = m.S
                    if native is None:
                        self._malformed(f"{kind!r} message without S", raw)
                        continue
                    symbol = clients.get(native)
                    if symbol is None:
                        symbol = self._client_symbol(native, raw)
                        if symbol is None:
                            continue
                    try:
                        ts = (fromisoformat(m.t) - epoch) // one_ms if m.t is not None else wall_ms()
                    except (ValueError, TypeError):
                        self._malformed(f"bad timestamp {m.t!r}", raw)
                        continue
                    if kind == "q":
                        bp, ap = m.bp, m.ap
                        if bp is None and ap is None:
                            self._malformed("quote without bp or ap", raw)
                            continue
                        # A side with price 0 is an empty side, not a free offer.
                        if bp:
                            bid_size = m.bs
                        else:
                            bp = bid_size = None
                        if ap:
                            ask_size = m.as_
                        else:
                            ap = ask_size = None
                        append(Update(symbol, QUOTE, ts, None, None, ap, ask_size, bp, bid_size))
                    elif kind == "t":
                        if m.p is None:
                            self._malformed("trade without p", raw)
                            continue
                        trade_id = None if m.i is None else str(m.i)
                        append(Update(symbol, TRADE, ts, m.p, m.s, trade_id=trade_id))
                    else:
                        update = _amendment(symbol, ts, m)
                        if update is None:
                            self._malformed("correction without cp" if kind == "c" else "cancel without p or i", raw)
                            continue
                        append(update)
                elif kind in _SKIPPED:
                    continue
                else:
                    self._control(m, raw)
        return updates

    def _salvage(self, raw: str | bytes) -> list[AlpacaMessage]:
        """Decode a frame element by element, reporting each bad one (the slow path)."""
        try:
            elements = _RAW_DECODER.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._malformed(f"not a JSON array: {exc}", raw)
            return []
        messages: list[AlpacaMessage] = []
        for element in elements:
            try:
                messages.append(_ONE_DECODER.decode(element))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                self._malformed(f"bad message: {exc}", bytes(element).decode("utf-8", "replace"))
        return messages

    def _malformed(self, reason: str, raw: str | bytes) -> None:
        self._on_malformed(MalformedFrame(reason, raw))

    def _client_symbol(self, native: str, raw: str | bytes) -> str | None:
        symbol = self._symbols.to_client(native)
        if symbol is None:
            log.debug("[DATA] %s is not a symbol of ours; skipped", native)
            return None
        if not SYMBOL_RE.match(symbol):
            self._malformed(f"invalid symbol {native!r}", raw)
            return None
        if len(self._clients) >= MAX_MEMO:
            self._clients.clear()
        self._clients[native] = symbol
        return symbol

    def _control(self, m: AlpacaMessage, raw: str | bytes) -> None:
        kind = m.T
        if kind == "subscription":
            self._subscription_reply(m)
        elif kind == "error":
            self._error(m.code, m.msg or "")
        elif kind == "success":
            log.debug("[CONTROL] success: %s", m.msg)
        else:
            self._malformed(f"unknown message type {kind!r}", raw)

    def _subscription_reply(self, m: AlpacaMessage) -> None:
        trades = set(m.trades or ())
        quotes = set(m.quotes or ())
        log.debug("[SUBSCRIPTION] Alpaca now sends trades for %d and quotes for %d symbol(s)", len(trades), len(quotes))
        if not self._pending:
            return
        action, natives = self._pending.popleft()
        if action != "subscribe":
            return
        missing = [s for s in natives if s in self._wanted and (s not in trades or s not in quotes)]
        if missing:
            log.warning(
                "[SUBSCRIBE] Alpaca did not subscribe %d symbol(s) we asked for: %s",
                len(missing),
                ",".join(missing[:20]) + (",…" if len(missing) > 20 else ""),
            )
            self._refuse(missing, "left out of Alpaca's subscription reply (unknown symbol or not in the plan)")

    def _refuse(self, natives: Sequence[str], reason: str) -> None:
        """Forget ``natives`` (not subscribed upstream) and report their client symbols refused."""
        clients: list[str] = []
        for native in natives:
            clients.extend(sorted(self._wanted.pop(native, ())))
        if clients:
            self._on_refused(clients, reason)

    def _error(self, code: int | None, message: str) -> None:
        message = _scrub(message, self._secrets)
        outcome = error_outcome(code, message, logged_in=True)
        if outcome is not None:
            raise outcome
        if error_class(code) is ErrorClass.SYMBOLS:
            # 405: the set stays as it was before the request, so none of its symbols is
            # subscribed. 400 answers a request Alpaca could not read: a badly formatted symbol.
            refused: tuple[str, ...] = ()
            if self._pending:
                action, natives = self._pending.popleft()
                if action == "subscribe":
                    refused = natives
            log.error(
                "[SUBSCRIBE] Alpaca error %s (%s): not subscribed upstream: %s",
                code,
                message,
                ",".join(refused) if refused else "(unknown request)",
            )
            self._refuse(refused, f"Alpaca error {code}: {message or 'refused'}")
        elif code in (401, 403):
            log.warning("[CONTROL] Alpaca error %s (%s)", code, message)
        else:
            log.error("[CONTROL] Alpaca error %s (%s); carrying on", code, message)


class AlpacaProvider:
    name = "alpaca"
    detects_stale = False  # Alpaca sends nothing at all while nothing trades

    def __init__(self, config: AlpacaConfig, connect_timeout: float = 30.0) -> None:
        self.config = config
        self.connect_timeout = connect_timeout
        if config.feed == "crypto":
            self.symbols = SymbolMap(
                crypto=lambda base, quote: f"{base}/{quote}",
                extra=config.symbols,
                stocks=None,
                rule=PairRule("/", CRYPTO_QUOTES, excluded=FOREX_PAIRS),
            )
        else:
            self.symbols = SymbolMap(extra=config.symbols)
        self._warned: set[str] = set()  # unmapped client symbols already logged (once each)

    def describe(self) -> str:
        feed = f"crypto/{self.config.crypto_location}" if self.config.feed == "crypto" else self.config.feed
        return f"Alpaca {feed} at {self.config.resolved_url}"

    @asynccontextmanager
    async def session(
        self, on_malformed: MalformedSink = ignore_malformed, on_refused: RefusalSink = ignore_refused
    ) -> AsyncIterator[AlpacaSession]:
        url = self.config.resolved_url
        async with WsClient.open(
            url,
            connect_timeout=self.connect_timeout,
            max_message=MAX_FRAME,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
        ) as ws:
            early = await self._login(ws, on_malformed)
            yield AlpacaSession(
                ws,
                self.symbols,
                on_malformed,
                early=early,
                warned=self._warned,
                secrets=(self.config.key_id, self.config.secret_key),
                provider=self.name,
                on_refused=on_refused,
            )

    async def _login(self, ws: WsClient, on_malformed: MalformedSink) -> list[str]:
        """Wait for the greeting, authenticate, wait for the reply; the frames read after it."""
        secrets = (self.config.key_id, self.config.secret_key)
        timeout = self.config.auth_timeout
        greeted = False
        try:
            with trio.fail_after(timeout):
                while True:
                    raws = await ws.receive_batch()
                    for index, raw in enumerate(raws):
                        try:
                            messages = _DECODER.decode(raw)
                        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                            on_malformed(MalformedFrame(f"unexpected frame during login: {exc}", raw))
                            continue
                        for m in messages:
                            if m.T == "success" and m.msg == "connected" and not greeted:
                                greeted = True
                                auth = {"action": "auth", "key": self.config.key_id, "secret": self.config.secret_key}
                                await ws.send_text(_ENCODER.encode(auth).decode())
                            elif m.T == "success" and m.msg == "authenticated":
                                log.info("[LOGIN] Alpaca accepted the key")
                                return raws[index + 1 :]
                            elif m.T == "error":
                                message = _scrub(m.msg or "", secrets)
                                outcome = error_outcome(m.code, message)
                                if outcome is not None:
                                    raise outcome
                                log.warning("[LOGIN] Alpaca error %s (%s) while logging in", m.code, message)
                            else:
                                log.debug("[LOGIN] ignored %r message while logging in", m.T)
        except trio.TooSlowError:
            waiting = "authenticated" if greeted else "connected greeting"
            raise ProviderError(f"no auth reply within {timeout:g}s (no {waiting})") from None


ENTRY = ProviderEntry(
    name="alpaca",
    settings=AlpacaConfig,
    build=lambda settings, upstream: AlpacaProvider(settings, connect_timeout=upstream.connect_timeout),
    credentials=(Credential("key_id", ("APCA_API_KEY_ID",)), Credential("secret_key", ("APCA_API_SECRET_KEY",))),
)
