"""Polygon.io / Massive.com WebSocket (one cluster per market: stocks, crypto or forex).

Protocol (see shared/providers.md, section 4): the URL is ``wss://socket.massive.com/<market>``
(``delayed.massive.com`` for the 15-minute delayed feed). On connect the server sends
``[{"ev":"status","status":"connected",...}]``; we then send ``{"action":"auth","params":KEY}``
and wait ``auth_timeout`` for ``status: "auth_success"`` before subscribing.
``{"action":"subscribe","params":"T.AAPL,Q.AAPL"}`` takes comma-separated ``CHANNEL.TICKER``
entries (mixed channels allowed); the server acknowledges each entry with status ``success``
("subscribed to: T.AAPL").

Every frame is a JSON **array** of events that may mix channels and status messages. The events
we use (all timestamps ``t`` in Unix ms, whatever the Stocks Overview page says about seconds;
they go through :func:`normalize_epoch_ms` anyway):

- ``T`` stock trade: ``sym p s t`` (also ``x``, ``i`` a *string* trade id, ``c`` int conditions,
  ``q``, ``z``, ignored). The spec has no correction or break event on this channel.
- ``Q`` stock NBBO quote: ``sym bp bs ap as t``; ``bs``/``as`` count **round lots**, so they are
  multiplied by 100 to give shares, as every other provider reports them.
- ``XT`` crypto trade ``pair p s t`` and ``XQ`` crypto quote ``pair bp bs ap as t``: sizes are in
  coins, taken as given.
- ``C`` forex quote: ``p`` is the *pair* (``"EUR/USD"``), ``a`` ask, ``b`` bid, ``t``; no sizes.

Aggregates (``A``/``AM``/``XA``/``CA``...) and every other event type are skipped without being
looked at. Status events are classified in :data:`STATUSES` (one table, from the spec's status
enums in ``.massive/websocket.json``): ``auth_failed`` waits ``auth_retry_delay``;
``max_connections`` (an account gets one connection per cluster; right after a blip it is
usually our own previous connection) is retried quickly a few times first, then waits
``auth_retry_delay`` too, never a reconnect hot loop; ``auth_timeout``, ``force_disconnect`` and
``slow_consumer`` reconnect at the normal backoff. The older wording of a refused key,
``{"status":"error","message":"authentication failed"}`` (alpacahq/Alpaca-API #68), is an auth
failure too (:data:`AUTH_TEXTS`), not a login timeout. There is no application-level heartbeat,
so a quiet feed cannot be told from a dead one (``detects_stale = False``).

Trade ids: ``i`` is unique per exchange ``x``, so a trade's id is ``"x:i"``; the upstream drops a
trade whose id it has just seen for that symbol (the same trade twice in one frame). The spec
documents no cancel or correction event, and no condition code we found documented as one, so
nothing maps to an amendment.

Symbols: stocks pass through unchanged; crypto pairs are ``BASE-QUOTE`` (``BTCUSD`` ↔
``BTC-USD``), forex ``BASE/QUOTE`` (``EURUSD`` ↔ ``EUR/USD``), plus ``[polygon.symbols]``. A
connection serves one market, so a pair on the stocks cluster, or a stock ticker on the crypto
or forex cluster, has no symbol and is not sent.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final, Literal

import attrs
import msgspec
import trio

from ..model import QUOTE, SYMBOL_RE, TRADE, Update, normalize_epoch_ms, wall_ms
from ..settings import ConfigError, positive, symbol_map, ws_url
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
from .symbols import FOREX_CURRENCIES, FOREX_PAIRS, PairRule, SymbolMap
from .wsclient import WsClient

__all__ = [
    "PolygonConfig",
    "ENTRY",
    "PolygonProvider",
    "PolygonSession",
    "PolygonEvent",
    "FrameDecoder",
    "CHANNELS",
    "MAX_SUBSCRIBE_BYTES",
    "polygon_symbols",
]


def _cluster(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value and value not in CLUSTERS:
        raise ConfigError(f"{attribute.name}: unknown Polygon/Massive cluster {value!r} (one of {', '.join(CLUSTERS)})")


POLYGON_HOSTS = {False: "wss://socket.massive.com", True: "wss://delayed.massive.com"}
#: The vendor's own list of hosts (massive/websocket/models/common.py, ``Feed``), by the name a
#: config uses: ``cluster = "business"`` connects to business.massive.com.
CLUSTERS: Final[Mapping[str, str]] = {
    "realtime": "socket.massive.com",
    "delayed": "delayed.massive.com",
    "nasdaq": "nasdaqfeed.massive.com",
    "polyfeed": "polyfeed.massive.com",
    "polyfeedplus": "polyfeedplus.massive.com",
    "starterfeed": "starterfeed.massive.com",
    "launchpad": "launchpad.massive.com",
    "business": "business.massive.com",
    "edgx-business": "edgx-business.massive.com",
    "iex-business": "iex-business.massive.com",
    "delayed-business": "delayed-business.massive.com",
    "delayed-edgx-business": "delayed-edgx-business.massive.com",
    "delayed-nasdaq-last-sale-business": "delayed-nasdaq-last-sale-business.massive.com",
    "delayed-nasdaq-basic-business": "delayed-nasdaq-basic-business.massive.com",
    "delayed-fullmarket-business": "delayed-fullmarket-business.massive.com",
    "fullmarket-business": "fullmarket-business.massive.com",
    "nasdaq-last-sale-business": "nasdaq-last-sale-business.massive.com",
    "nasdaq-basic-business": "nasdaq-basic-business.massive.com",
}
#: Markets whose data exists only in real time: no delayed host serves them.
REALTIME_ONLY: Final = frozenset({"crypto", "forex"})


@attrs.frozen
class PolygonConfig:
    api_key: str = attrs.field(default="", repr=False)
    # The market paths the vendor lists (options are not served: their tickers, O:..., are no
    # client symbol).
    market: Literal["stocks", "crypto", "forex", "indices"] = "stocks"
    # The 15-minute delayed cluster (delayed.massive.com) instead of the real-time one (stocks
    # and indices only: crypto and forex are real-time only).
    delayed: bool = False
    # Another of the vendor's hosts by name (CLUSTERS: "business", "launchpad", "delayed-business"...);
    # "" = socket.massive.com, or delayed.massive.com with delayed = true.
    cluster: str = attrs.field(default="", validator=_cluster)
    # Overrides the URL built from market/delayed (tests and the local fake server use this).
    url: str = attrs.field(default="", validator=ws_url)
    # Seconds to wait for auth_success after sending the key.
    auth_timeout: float = attrs.field(default=10.0, validator=positive)
    symbols: dict[str, str] = attrs.field(factory=dict, validator=symbol_map)

    @property
    def resolved_url(self) -> str:
        if self.url:
            return self.url
        if self.cluster:
            return f"wss://{CLUSTERS[self.cluster]}/{self.market}"
        return f"{POLYGON_HOSTS[self.delayed]}/{self.market}"

    @property
    def is_delayed(self) -> bool:
        return self.delayed or self.cluster.startswith("delayed")


def _check(settings: PolygonConfig) -> str | None:
    """A delayed host for a market that has none (the vendor lists crypto and forex real-time only)."""
    if settings.market in REALTIME_ONLY and settings.is_delayed and not settings.url:
        return f"delayed: Polygon/Massive serves {settings.market} in real time only (no delayed host)"
    return None


log = logging.getLogger("trio_relay.providers.polygon")

#: What each status means (the spec's enums: auth, disconnect, subscribe). Others: NOTICE.
STATUSES: Final[Mapping[str, ErrorClass]] = {
    "connected": ErrorClass.NOTICE,
    "auth_success": ErrorClass.NOTICE,
    "success": ErrorClass.NOTICE,
    "auth_failed": ErrorClass.AUTH,
    "auth_timeout": ErrorClass.RETRY,
    "max_connections": ErrorClass.CONNECTION_LIMIT,
    "force_disconnect": ErrorClass.RETRY,
    "slow_consumer": ErrorClass.RETRY,
}
#: Texts of an older refused-key answer under status "error" (lower case).
AUTH_TEXTS: Final = ("authentication failed", "not authorized", "unauthorized", "invalid api key")

#: The channels subscribed for each client symbol, by market.
CHANNELS: Final[Mapping[str, tuple[str, ...]]] = {
    "stocks": ("T", "Q"),
    "crypto": ("XT", "XQ"),
    "forex": ("C",),
    "indices": ("V",),  # index values (no trades, no quotes): a price without a size
}
#: Quote currencies of Polygon's crypto pairs mapped by rule (BASEQUOTE ↔ BASE-QUOTE); others
#: need a [polygon.symbols] entry. Its crypto tickers (X:BTCUSD, X:ETHEUR...) quote in these.
CRYPTO_QUOTES: Final = ("USD", "USDT", "USDC", "EUR", "GBP", "JPY", "BTC", "ETH")
#: One subscribe/unsubscribe message stays below this many bytes (a few thousand entries).
MAX_SUBSCRIBE_BYTES: Final = 32 * 1024
# WebSocket keepalive: Polygon sends nothing while nothing trades, so only pings can tell a quiet feed
# from a half-open connection. The official client relies on the websockets library's 20 s pings;
# a user saw pongs delayed in busy hours (polygon-io/issues #134), so we wait longer than its 20 s.
PING_INTERVAL: Final = 20.0
PING_TIMEOUT: Final = 60.0
# Polygon batches many events per frame; a busy second on many tickers makes big frames.
MAX_FRAME: Final = 8 << 20
# Frames kept while waiting for auth_success (they are decoded after it); more is a broken peer.
MAX_EARLY: Final = 1024
# Distinct native symbols whose client symbol is remembered; the cache restarts when full.
SYMBOL_CACHE: Final = 4096
# Client symbols already warned about as unmapped (the set restarts when full).
MAX_WARNED: Final = 10_000

Number = int | float


class PolygonEvent(msgspec.Struct, gc=False, omit_defaults=True):
    """The fields we read from any event, data or status; everything else is skipped unparsed.

    ``p`` is a price in trades but the pair in forex quotes (``"EUR/USD"``), hence ``str`` too.
    """

    ev: str = ""
    sym: str | None = None
    pair: str | None = None
    p: Number | str | None = None
    s: Number | None = None
    val: Number | None = None  # an index value (V)
    T: str | None = None  # an index ticker (V): I:SPX
    t: Number | None = None
    bp: Number | None = None
    bs: Number | None = None
    ap: Number | None = None
    as_: Number | None = msgspec.field(default=None, name="as")
    a: Number | None = None
    b: Number | None = None
    i: str | int | list[int] | None = None  # a trade's id (a string); a quote's or LULD's indicators (ints)
    x: int | str | None = None  # the exchange of a trade
    status: str | None = None
    message: str | None = None


# Immutable, safe to share. The frame decoder is the fast path; the two others only run on
# frames it rejects, to save the good events of a frame holding a bad one.
_FRAME = msgspec.json.Decoder(list[PolygonEvent])
_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])
_EVENT = msgspec.json.Decoder(PolygonEvent)


class _EventType(msgspec.Struct):
    ev: str = ""


_EVENT_TYPE = msgspec.json.Decoder(_EventType)
# The events we read; any other may use our field names with other types (XL2's "a"/"b" are lists).
_OURS: Final = frozenset({"T", "Q", "XT", "XQ", "C", "V", "status", ""})
_ENCODER = msgspec.json.Encoder()
_NO_STATUS: Final[tuple[PolygonEvent, ...]] = ()
_NOT_OURS: Final = ""
# Integers in this range are already epoch milliseconds (as normalize_epoch_ms decides).
_MS_LOW: Final = 100_000_000_000
_MS_HIGH: Final = 100_000_000_000_000


def polygon_symbols(market: str, extra: Mapping[str, str] | None = None) -> SymbolMap:
    """Client ↔ Polygon symbols for one market's cluster: pairs by rule, tables for exceptions."""
    if market == "crypto":
        rule = PairRule("-", CRYPTO_QUOTES, excluded=FOREX_PAIRS)
        return SymbolMap(crypto=lambda b, q: f"{b}-{q}", extra=extra, stocks=None, rule=rule)
    if market == "forex":
        rule = PairRule("/", FOREX_CURRENCIES, bases=FOREX_CURRENCIES)
        return SymbolMap(forex=lambda b, q: f"{b}/{q}", extra=extra, stocks=None, rule=rule)
    if market == "indices":
        return SymbolMap(extra=extra, stocks=None, rule=IndexRule())
    return SymbolMap(extra=extra)


class IndexRule(PairRule):
    """Indices: the client's ``^SPX`` is Polygon's ``I:SPX``."""

    def __init__(self) -> None:
        super().__init__(":", ())

    def to_native(self, symbol: str) -> str | None:
        return f"I:{symbol[1:]}" if symbol.startswith("^") and len(symbol) > 1 else None

    def to_client(self, native: str) -> str | None:
        return f"^{native[2:]}" if native.upper().startswith("I:") and len(native) > 2 else None


class FrameDecoder:
    """Turns Polygon frames into updates; remembers the client symbol of each native symbol."""

    def __init__(self, symbols: SymbolMap) -> None:
        self._symbols = symbols
        self._clients: dict[str, str] = {}  # native → client symbol, or _NOT_OURS

    def _client(self, native: str | None, raw: str | bytes) -> str:
        """The client symbol ("" when it is not ours); MalformedFrame for a missing or invalid one."""
        if not native:
            raise MalformedFrame("event without a symbol", raw)
        client = self._symbols.to_client(native)
        if client is None:
            log.debug("[DATA] %r maps to no client symbol; its events are skipped", native)
            client = _NOT_OURS
        elif not SYMBOL_RE.match(client):
            raise MalformedFrame(f"invalid symbol {native!r}", raw)
        if len(self._clients) >= SYMBOL_CACHE:
            self._clients.clear()
        self._clients[native] = client
        return client

    def decode(
        self, raw: str | bytes, now_ms: int, out: list[Update], on_malformed: MalformedSink = ignore_malformed
    ) -> Sequence[PolygonEvent]:
        """Append the frame's updates to ``out``; return its status events.

        A frame that is not a JSON array of objects, or an event that cannot be read, goes to
        ``on_malformed``; the other events of the same frame are still decoded.

        Long on purpose: the per-event loop of the feed's hot path, each kind's mapping inline
        (a function call per event would cost more than most mappings do).
        """
        try:
            events = _FRAME.decode(raw)
        except msgspec.ValidationError:
            return self._decode_each(raw, now_ms, out, on_malformed)
        except msgspec.DecodeError as exc:
            on_malformed(MalformedFrame(f"not JSON: {exc}", raw))
            return _NO_STATUS
        statuses: list[PolygonEvent] | None = None
        clients = self._clients
        append = out.append
        for event in events:
            kind = event.ev
            try:
                native: str | None
                if kind == "Q" or kind == "T":
                    native = event.sym
                elif kind == "XQ" or kind == "XT":
                    native = event.pair
                elif kind == "C":
                    pair = event.p
                    if pair is not None and not isinstance(pair, str):
                        raise MalformedFrame("C event whose p is not a pair", raw)
                    native = pair
                elif kind == "V":
                    native = event.T
                elif kind == "status":
                    if statuses is None:
                        statuses = []
                    statuses.append(event)
                    continue
                elif not kind:
                    raise MalformedFrame("event without ev", raw)
                else:
                    continue  # A, AM, LULD, FMV, XA...: not for us
                client = clients.get(native) if native else None
                if client is None:
                    client = self._client(native, raw)
                if not client:
                    continue
                t = event.t
                if type(t) is int and _MS_LOW <= t < _MS_HIGH:
                    ts = t  # the documented unit: no conversion
                else:
                    ts = normalize_epoch_ms(t) if t is not None and t > 0 else now_ms
                if kind == "Q" or kind == "XQ":
                    if event.bp is None and event.ap is None:
                        raise MalformedFrame(f"{kind} event without bp or ap", raw)
                    ask_size, bid_size = event.as_, event.bs
                    if kind == "Q":  # round lots → shares
                        ask_size = None if ask_size is None else ask_size * 100
                        bid_size = None if bid_size is None else bid_size * 100
                    append(
                        Update(
                            client,
                            QUOTE,
                            ts,
                            ask_price=event.ap,
                            ask_size=ask_size,
                            bid_price=event.bp,
                            bid_size=bid_size,
                        )
                    )
                elif kind == "C":
                    if event.a is None and event.b is None:
                        raise MalformedFrame("C event without a or b", raw)
                    append(Update(client, QUOTE, ts, ask_price=event.a, bid_price=event.b))
                elif kind == "V":
                    if event.val is None:
                        raise MalformedFrame("V event without val", raw)
                    append(Update(client, TRADE, ts, last_price=event.val))
                else:
                    price = event.p
                    if price is None or isinstance(price, str):
                        raise MalformedFrame(f"{kind} event without a numeric p", raw)
                    trade_id = None if event.i is None or isinstance(event.i, list) else f"{event.x}:{event.i}"
                    append(Update(client, TRADE, ts, last_price=price, last_size=event.s, trade_id=trade_id))
            except MalformedFrame as exc:
                # The raw text given with the error is the event alone, not the whole frame.
                exc.frame = _ENCODER.encode(event).decode()
                on_malformed(exc)
        return statuses if statuses is not None else _NO_STATUS

    def _decode_each(
        self, raw: str | bytes, now_ms: int, out: list[Update], on_malformed: MalformedSink
    ) -> Sequence[PolygonEvent]:
        """The slow path: decode a rejected frame event by event, reporting only the bad ones."""
        try:
            elements = _RAW_LIST.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            on_malformed(MalformedFrame("not a JSON array", raw))
            return _NO_STATUS
        good: list[bytes] = []
        for element in elements:
            text = bytes(element)
            try:
                _EVENT.decode(text)
            except msgspec.ValidationError as exc:
                try:
                    ours = _EVENT_TYPE.decode(text).ev in _OURS
                except msgspec.ValidationError:
                    ours = True  # not even an object with a string ev
                if ours:
                    on_malformed(MalformedFrame(f"unexpected field type: {exc}", text.decode("utf-8", "replace")))
                continue
            good.append(text)
        if not good:
            return _NO_STATUS
        return self.decode(b"[" + b",".join(good) + b"]", now_ms, out, on_malformed)


class PolygonSession:
    def __init__(
        self,
        provider: PolygonProvider,
        ws: WsClient,
        early: list[str],
        on_malformed: MalformedSink,
        on_refused: RefusalSink = ignore_refused,
    ) -> None:
        self._provider = provider
        self._on_refused = on_refused
        self._ws = ws
        self._early = early  # frames that came with or before auth_success
        self._on_malformed = on_malformed
        self._decoder = FrameDecoder(provider.symbols)
        self._channels = CHANNELS[provider.config.market]

    async def _send(self, action: str, natives: Sequence[str]) -> None:
        """Send ``action`` for every channel of ``natives``, each message below MAX_SUBSCRIBE_BYTES."""
        budget = MAX_SUBSCRIBE_BYTES - len(_ENCODER.encode({"action": action, "params": ""})) - 1
        chunk: list[str] = []
        size = 0
        for native in natives:
            for channel in self._channels:
                entry = f"{channel}.{native}"
                cost = len(_ENCODER.encode(entry)) - 2 + 1  # as JSON-escaped, plus its comma
                if chunk and size + cost > budget:
                    await self._send_chunk(action, chunk)
                    chunk, size = [], 0
                chunk.append(entry)
                size += cost
        if chunk:
            await self._send_chunk(action, chunk)

    async def _send_chunk(self, action: str, entries: list[str]) -> None:
        await self._ws.send_text(_ENCODER.encode({"action": action, "params": ",".join(entries)}).decode())

    async def subscribe(self, symbols: Sequence[str]) -> None:
        natives, missing = self._provider.natives(symbols, warn=True)
        if missing:
            self._on_refused(missing, f"polygon has no symbol for it on the {self._provider.config.market} cluster")
        await self._send("subscribe", natives)

    async def unsubscribe(self, symbols: Sequence[str]) -> None:
        await self._send("unsubscribe", self._provider.natives(symbols, warn=False)[0])

    async def receive(self) -> list[Update]:
        if self._early:
            raws, self._early = self._early, []
        else:
            raws = await self._ws.receive_batch()
        now = wall_ms()
        updates: list[Update] = []
        decode = self._decoder.decode
        for raw in raws:
            statuses = decode(raw, now, updates, self._on_malformed)
            for status in statuses:
                self._provider.check_status(status, logged_in=True)
        return updates


class PolygonProvider:
    name = "polygon"
    detects_stale = False  # no application heartbeat: a quiet feed looks like a dead one

    def __init__(self, config: PolygonConfig, connect_timeout: float = 30.0) -> None:
        self.config = config
        self.connect_timeout = connect_timeout
        self.symbols = polygon_symbols(config.market, config.symbols)
        self._warned: set[str] = set()

    def describe(self) -> str:
        feed = "delayed" if self.config.is_delayed else "real-time"
        return f"Polygon/Massive {self.config.market} ({feed}) at {self.config.resolved_url}"

    def natives(self, symbols: Sequence[str], *, warn: bool) -> tuple[list[str], list[str]]:
        """(Polygon tickers for client symbols, the client symbols with none: warned about once)."""
        natives, missing = self.symbols.split(symbols)
        if warn:
            for symbol in missing:
                if symbol in self._warned:
                    continue
                if len(self._warned) >= MAX_WARNED:
                    self._warned.clear()
                self._warned.add(symbol)
                log.warning(
                    "[SUBSCRIBE] polygon has no symbol for %s on the %s cluster; add it to [polygon.symbols]",
                    symbol,
                    self.config.market,
                )
        return natives, missing

    def _clean(self, text: str | None) -> str:
        """Server text fit for a log line or an exception: short, and never with the key."""
        text = (text or "")[:200]
        key = self.config.api_key
        return text.replace(key, "***") if key else text

    def _text(self, event: PolygonEvent) -> str:
        return self._clean(event.message)

    def check_status(self, event: PolygonEvent, *, logged_in: bool = False) -> str | None:
        """Log a status event; raise for one that ends the session (:data:`STATUSES`). Returns it.

        ``max_connections`` while logging in may be our own previous connection, still counted
        after a blip (quick retries); once logged in it means another connection with the key
        took over, and fighting it would be a reconnect loop: an auth failure.
        """
        status = event.status
        cls = STATUSES.get(status or "", ErrorClass.NOTICE)
        if cls is ErrorClass.CONNECTION_LIMIT and logged_in:
            cls = ErrorClass.AUTH
        if status == "error" and any(text in (event.message or "").lower() for text in AUTH_TEXTS):
            cls = ErrorClass.AUTH  # the older wording of auth_failed
        if cls is ErrorClass.NOTICE:
            if status in STATUSES:
                log.debug("[STATUS] %s: %s", status, self._text(event))  # several per subscribe: debug
            else:
                log.info("[STATUS] Polygon says %s: %s", self._clean(status), self._text(event))
            return status
        said = self._text(event) or "no message"
        if status == "max_connections":
            text = f"Polygon connection limit reached: another connection uses this API key ({status}: {said})"
        elif cls is ErrorClass.AUTH:
            text = f"Polygon rejected the API key ({self._clean(status)}: {said})"
        elif cls is ErrorClass.CONNECTION_LIMIT:
            text = f"Polygon connection limit reached: another connection uses this API key ({status}: {said})"
        else:
            text = f"Polygon ended the connection ({self._clean(status)}: {said})"
        raise error_for(cls, text) or ProviderError(text)

    @asynccontextmanager
    async def session(
        self, on_malformed: MalformedSink = ignore_malformed, on_refused: RefusalSink = ignore_refused
    ) -> AsyncIterator[PolygonSession]:
        url = self.config.resolved_url
        async with WsClient.open(
            url,
            connect_timeout=self.connect_timeout,
            max_message=MAX_FRAME,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
        ) as ws:
            yield PolygonSession(self, ws, await self._login(ws), on_malformed, on_refused)

    async def _login(self, ws: WsClient) -> list[str]:
        """Wait for ``connected``, send the key, wait for ``auth_success``: all within auth_timeout."""
        timeout = self.config.auth_timeout
        early: list[str] = []
        stage = "connected"
        with trio.move_on_after(timeout):
            await self._await_status(ws, stage, early)
            # The key goes only into this frame: never into a URL, a log line or an exception.
            await ws.send_text(_ENCODER.encode({"action": "auth", "params": self.config.api_key}).decode())
            stage = "auth_success"
            await self._await_status(ws, stage, early)
            log.info("[LOGIN] Polygon accepted the API key")
            return early
        raise ProviderError(f"no {stage} from Polygon within {timeout:g}s")

    async def _await_status(self, ws: WsClient, wanted: str, early: list[str]) -> None:
        """Read until status ``wanted``; frames carrying anything else are kept in ``early``."""
        while True:
            raws = await ws.receive_batch()
            for i, raw in enumerate(raws):
                if len(early) >= MAX_EARLY:
                    raise ProviderError(f"more than {MAX_EARLY} frames from Polygon before {wanted}")
                try:
                    events = _FRAME.decode(raw)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    early.append(raw)  # counted as malformed by the session
                    continue
                found = False
                for event in events:
                    if event.ev == "status":
                        found = self.check_status(event) == wanted or found
                if len(events) != sum(1 for e in events if e.ev == "status"):
                    early.append(raw)  # data (or junk: counted as malformed later) for the session
                if found:
                    early.extend(raws[i + 1 :])
                    return


ENTRY = ProviderEntry(
    name="polygon",
    settings=PolygonConfig,
    build=lambda settings, upstream: PolygonProvider(settings, connect_timeout=upstream.connect_timeout),
    credentials=(Credential("api_key", ("POLYGON_API_KEY", "MASSIVE_API_KEY")),),
    aliases=("massive",),
    check=_check,
)
