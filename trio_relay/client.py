"""A Trio client for the relay's price WebSocket that reconnects and resumes by itself.

::

    import trio_relay.client

    async with trio_relay.client.connect("ws://127.0.0.1:8000/api/v2/realtime/ws/prices", ["AAPL"]) as feed:
        async for event in feed:
            if isinstance(event, trio_relay.client.PriceUpdate):
                print(event.symbol, event.last_price, event.seq)
            else:  # a Status: the upstream, a symbol, the relay or this client's connection changed
                print(event.scope, event.state, event.symbols)
        # from any task, at any time:
        await feed.subscribe(["MSFT"])
        await feed.unsubscribe(["AAPL"])

What a caller may rely on:

- **Typed events.** The iterator yields :class:`PriceUpdate` (every field of the relay's
  ``price_update``) and :class:`Status` (the relay's ``status`` messages, plus this client's own,
  ``scope="client"``: ``connected``, ``disconnected`` with the wait before the next attempt in
  ``retry_after_ms``, and ``gap``). Acks, auth replies and rate-limit answers are handled inside.
- **Nothing missed, nothing twice.** After any drop the feed reconnects with capped full-jitter
  backoff (``uniform(0, min(backoff_max, backoff_initial * 2**n))``, reset after a connection that
  lasted ``backoff_reset_after`` seconds) and subscribes everything again with ``since`` (the last
  ``seq`` of each symbol) and its ``epoch``: the relay replays exactly what was missed. An update
  whose ``seq`` is not above the last one yielded for that symbol in that epoch is dropped, so a
  symbol's ``seq`` only goes up. When the relay could not replay (it restarted: a new epoch, or
  the gap is older than its history), the feed yields ``Status(scope="client", state="gap",
  symbols=[...])`` before the fresh snapshot: the application knows it skipped data.
- **Close codes.** ``1001`` (the relay is going away): wait the ``retry_after_ms`` of its
  ``closing`` notice plus a backoff delay, then reconnect; ``4008`` (too slow) and network
  failures: reconnect with backoff; ``4001`` (token expired): with a token callable, get a fresh
  token and reconnect, with a fixed token raise :class:`TokenExpired`; ``1002``, ``1008``,
  ``1009``: raise :class:`RelayError` (a retry would fail the same way).
- **Errors.** An ``error`` frame answering one of this client's own requests (``invalid_symbols``,
  ``forbidden_symbols``, ``symbol_limit``, ``unauthorized``...) ends the feed: the iterator raises
  :class:`RelayError` with the relay's ``code`` once the events before it are yielded.
  ``rate_limited`` is not an error here: the request is sent again after ``retry_after_ms``.
- **Tokens.** ``token`` is sent as ``{"action":"auth"}`` first thing on every connection. When it
  is an async callable, the feed calls it for each connection and, when the relay says when the
  token expires, again ahead of time (``refresh_before`` seconds before ``expires_at``, or halfway
  for a short-lived token) to refresh the session without reconnecting.
- **State.** ``feed.latest`` (the last :class:`PriceUpdate` yielded per symbol), ``feed.stale``
  (symbols the relay reported as not ticking) and ``feed.upstream_state`` follow what the
  iterator has yielded, so they agree with the events the application has seen; ``"up"`` after
  each connection, as the relay reports only changes (and a down upstream right after a
  subscribe). ``feed.connected`` and ``feed.reconnects`` follow the socket itself.
- **Lifetimes and memory.** One reader task, started in the ``async with``'s own nursery, runs
  every connection; nothing outlives the block. Events wait in a channel of ``queue_size``; when
  the application does not keep up it fills, the reader stops reading the socket and the relay
  conflates (the feed sees ``seq`` gaps, never repeats) or, after ``clients.stall_timeout``,
  drops the connection with ``4008`` and the feed resumes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import attrs
import msgspec
import trio
import trio_websocket

from .model import Amend
from .upstream import Backoff

__all__ = ["connect", "Feed", "PriceUpdate", "Status", "Event", "RelayError", "TokenExpired", "TokenSource"]

log = logging.getLogger("trio_relay.client")

TokenSource: TypeAlias = str | Callable[[], Awaitable[str]]

REQUEST_CHUNK = 50  # the relay's default clients.max_symbols_per_request
MAX_FRAME = 64 * 1024 * 1024  # a batched resume replay can be large; the relay is trusted
CLOSE_GOING_AWAY = 1001
CLOSE_TOKEN_EXPIRED = 4001
_FATAL_CLOSES = {1002: "protocol_error", 1008: "policy_violation", 1009: "message_too_big"}


# --------------------------------------------------------------------------- wire types


class PriceUpdate(msgspec.Struct, tag="price_update", tag_field="type", kw_only=True, frozen=True, gc=False):
    """A symbol's full current state after an update (the relay's ``price_update``)."""

    symbol: str
    timestamp: int  # event time, UTC epoch ms
    data_type: str  # "T" trade, "Q" quote; amendments of an earlier trade: "B" break, "X" cancel, "C" correction
    last_price: float | None = None
    last_size: float | None = None
    ask_price: float | None = None
    ask_size: float | None = None
    bid_price: float | None = None
    bid_size: float | None = None
    cached_at: str = ""  # ISO 8601 UTC, when the relay cached it
    seq: int = 0  # per symbol, compares only within one epoch
    provider: str = ""
    epoch: str = ""
    # Only on an amendment (B, X, C): the trade it amends and with what (docs/api.md).
    amends: Amend | None = None


class Status(msgspec.Struct, tag="status", tag_field="type", kw_only=True, frozen=True):
    """A state change. ``scope`` is ``upstream``, ``symbols`` or ``relay`` (from the relay) or
    ``client`` (this feed's connection: ``connected``, ``disconnected``, ``gap``)."""

    scope: str
    state: str
    provider: str | None = None
    reason: str | None = None
    symbols: list[str] = []
    stale_after: float | None = None
    reconnect: bool | None = None
    retry_after_ms: int | None = None
    epoch: str | None = None


Event: TypeAlias = PriceUpdate | Status


class _Subscribed(msgspec.Struct, tag="subscribed", tag_field="type", kw_only=True, gc=False):
    symbols: list[str] = []
    epoch: str | None = None
    recovered: bool | None = None
    unrecovered: list[str] = []


class _Unsubscribed(msgspec.Struct, tag="unsubscribed", tag_field="type", kw_only=True, gc=False):
    symbols: list[str] = []


class _Authenticated(msgspec.Struct, tag="authenticated", tag_field="type", kw_only=True, gc=False):
    subject: str | None = None
    expires_at: float | None = None


class _Error(msgspec.Struct, tag="error", tag_field="type", kw_only=True, gc=False):
    code: str
    message: str = ""
    action: str | None = None
    retry_after_ms: int | None = None


_Message: TypeAlias = PriceUpdate | Status | _Subscribed | _Unsubscribed | _Authenticated | _Error
# One decoder for both frame shapes: a message (per-message frames) or an array of them (batched).
_DECODER = msgspec.json.Decoder(_Message | list[_Message])
_ENCODER = msgspec.json.Encoder()


def _decode(raw: str | bytes) -> list[_Message]:
    try:
        frame = _DECODER.decode(raw)
    except msgspec.ValidationError:
        return _decode_leniently(raw)  # a message type this client does not know: skip just it
    except msgspec.DecodeError:
        log.warning("[CLIENT] ignored a frame that is not JSON: %.80r", raw)
        return []
    return frame if isinstance(frame, list) else [frame]


def _decode_leniently(raw: str | bytes) -> list[_Message]:
    try:
        items = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return []
    out: list[_Message] = []
    for item in items if isinstance(items, list) else [items]:
        try:
            out.append(msgspec.convert(item, _Message))
        except msgspec.ValidationError:
            log.debug("[CLIENT] skipped a message: %.120r", item)
    return out


# --------------------------------------------------------------------------- errors


class RelayError(Exception):
    """The relay refused something this client asked for; retrying the same way would not help.

    ``code`` is the relay's error code (``invalid_symbols``, ``forbidden_symbols``,
    ``unauthorized``...) or, for a close without a preceding error, ``protocol_error`` /
    ``policy_violation`` / ``message_too_big``; ``close_code`` the WebSocket close code and
    ``status`` the HTTP status of a refused handshake, when that is how it ended.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        action: str | None = None,
        close_code: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.action = action
        self.close_code = close_code
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class TokenExpired(RelayError):
    """The relay closed with ``4001`` and the feed has no way to get a fresh token (a fixed one)."""


# --------------------------------------------------------------------------- the feed


@attrs.define(eq=False)
class _Ended:
    """How one connection (or attempt) ended."""

    code: int | None  # WebSocket close code; None: never connected or no close frame
    reason: str
    retry_after: float | None = None  # from the relay's "closing" notice
    last_error: _Error | None = None  # an unsolicited error frame that preceded the close
    lasted: float = 0.0


class _Connection:
    """One WebSocket session: its socket, the requests awaiting a reply, its refresh timer."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery) -> None:
        self.ws = ws
        self.nursery = nursery
        # The relay answers each request with exactly one reply, in order: this pairs them (an
        # error frame other than rate_limited names its action, rate_limited does not).
        self.pending: deque[dict[str, Any]] = deque()
        self._lock = trio.Lock()  # so pending's order is the order on the wire
        self.refresh = trio.CancelScope()  # its deadline: when to refresh the token
        self.failure: RelayError | None = None
        self.ended = _Ended(None, "connection lost")

    async def request(self, message: dict[str, Any]) -> None:
        text = _ENCODER.encode(message).decode()
        async with self._lock:
            self.pending.append(message)
            try:
                await self.ws.send_message(text)
            except trio_websocket.ConnectionClosed:
                pass  # the reader sees the close and reports how it ended

    def fail(self, error: RelayError) -> None:
        if self.failure is None:
            self.failure = error
        self.nursery.cancel_scope.cancel()


def _normalize(symbols: Iterable[str]) -> list[str]:
    if isinstance(symbols, str):
        raise TypeError("symbols must be a list of symbols, e.g. ['AAPL'], not a string")
    return list(dict.fromkeys(s.strip().upper() for s in symbols))


def _with_batch(url: str) -> str:
    return url + ("&" if "?" in url else "?") + "batch=1"


class Feed:
    """A live, self-healing subscription to a relay; made by :func:`connect`.

    Iterate it for events; :meth:`subscribe` and :meth:`unsubscribe` may be called from any task
    while it runs. See the module docstring for what it guarantees.
    """

    def __init__(
        self,
        url: str,
        symbols: Iterable[str] = (),
        *,
        token: TokenSource | None = None,
        batch: bool = True,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        backoff_reset_after: float = 10.0,
        connect_timeout: float = 10.0,
        refresh_before: float = 30.0,
        queue_size: int = 1024,
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        #: The last update yielded per symbol (only symbols still subscribed).
        self.latest: dict[str, PriceUpdate] = {}
        #: Symbols the relay said stopped ticking (``scope="symbols"``, ``state="stale"``).
        self.stale: set[str] = set()
        #: ``unknown`` until connected; then ``up``, ``down``, ``stale`` or ``failover``.
        self.upstream_state = "unknown"
        #: The relay's provider as last reported by a status or an update.
        self.provider: str | None = None
        #: True while a WebSocket to the relay is open.
        self.connected = False
        #: Connections made after the first one.
        self.reconnects = 0
        self._symbols: dict[str, None] = dict.fromkeys(_normalize(symbols))
        self._last: dict[str, tuple[str, int]] = {}  # symbol -> (epoch, seq) last accepted
        self._token = token
        self._url = _with_batch(url) if batch else url
        self._backoff = Backoff(backoff_initial, backoff_max, rng)
        self._backoff_reset_after = backoff_reset_after
        self._connect_timeout = connect_timeout
        self._refresh_before = refresh_before
        self._ssl_context = ssl_context
        # Reader -> application. When full the reader waits: the socket is not read, and the
        # relay conflates for us (or drops us with 4008, and the feed resumes).
        self._send, self._receive = trio.open_memory_channel[Event](queue_size)
        self._conn: _Connection | None = None
        self._connections = 0
        self._failure: RelayError | None = None
        self._closing = False  # the application left the block: no reconnect

    @property
    def symbols(self) -> list[str]:
        """The symbols this feed keeps subscribed, in the order they were asked for."""
        return list(self._symbols)

    # ----------------------------------------------------------------- the application's side
    def __aiter__(self) -> Feed:
        return self

    async def __anext__(self) -> Event:
        while True:
            try:
                event = await self._receive.receive()
            except trio.EndOfChannel:
                if self._failure is not None:
                    raise self._failure from None
                raise StopAsyncIteration from None
            if isinstance(event, PriceUpdate):
                if event.symbol not in self._symbols:
                    continue  # unsubscribed since it was read
                self.latest[event.symbol] = event
                if event.provider:
                    self.provider = event.provider
            elif event.scope == "symbols":
                if event.state == "stale":
                    self.stale.update(s for s in event.symbols if s in self._symbols)
                elif event.state == "fresh":
                    self.stale.difference_update(event.symbols)
            elif event.scope == "upstream":
                self.upstream_state = event.state
                if event.provider:
                    self.provider = event.provider
            elif event.scope == "client" and event.state == "connected":
                self.upstream_state = "up"
                self.stale.clear()  # the relay says again which are stale on the re-subscribe
            return event

    async def subscribe(self, symbols: Iterable[str]) -> None:
        """Add symbols; they stay subscribed across reconnects. Errors come from the iterator."""
        new = [s for s in _normalize(symbols) if s not in self._symbols]
        if not new:
            return
        self._symbols.update(dict.fromkeys(new))
        conn = self._conn
        if conn is not None:
            for i in range(0, len(new), REQUEST_CHUNK):
                await conn.request({"action": "subscribe", "symbols": new[i : i + REQUEST_CHUNK]})

    async def unsubscribe(self, symbols: Iterable[str]) -> None:
        """Remove symbols: no update of them is yielded after this returns."""
        gone = [s for s in _normalize(symbols) if s in self._symbols]
        if not gone:
            return
        for s in gone:
            del self._symbols[s]
            self._last.pop(s, None)
            self.latest.pop(s, None)
            self.stale.discard(s)
        conn = self._conn
        if conn is not None:
            for i in range(0, len(gone), REQUEST_CHUNK):
                await conn.request({"action": "unsubscribe", "symbols": gone[i : i + REQUEST_CHUNK]})

    # ----------------------------------------------------------------- the reader's side
    async def _run(self) -> None:
        """Connect, read, reconnect... until a :class:`RelayError` (kept for the iterator)."""
        async with self._send:
            try:
                await self._connect_forever()
            except RelayError as exc:
                log.warning("[CLIENT] giving up on %s: %s", self.url, exc)
                self._failure = exc

    async def _connect_forever(self) -> None:
        backoff = self._backoff
        while True:
            ended = await self._session()
            if self._closing:
                return
            if ended.lasted >= self._backoff_reset_after:
                backoff.reset()
            code = ended.code
            if code == CLOSE_TOKEN_EXPIRED and not callable(self._token):
                raise TokenExpired(
                    "token_expired", "the token expired and no callable was given to get a fresh one", close_code=code
                )
            if code in _FATAL_CLOSES:
                error = ended.last_error
                raise RelayError(
                    error.code if error is not None else _FATAL_CLOSES[code],
                    error.message if error is not None else ended.reason,
                    close_code=code,
                )
            delay = backoff.next_delay()
            if code == CLOSE_GOING_AWAY and ended.retry_after is not None:
                delay += ended.retry_after  # the relay's hint, spread by the jitter
            log.info("[CLIENT] %s; reconnecting in %.2fs", ended.reason, delay)
            await self._emit(
                Status(
                    scope="client", state="disconnected", reason=ended.reason, retry_after_ms=math.ceil(delay * 1000)
                )
            )
            await trio.sleep(delay)

    async def _fresh_token(self) -> str:
        source = self._token
        if isinstance(source, str):
            return source
        assert source is not None
        try:
            value = await source()
        except Exception as exc:  # the application's callable: end the feed with its reason
            raise RelayError("token_unavailable", f"the token callable failed: {exc!r}") from exc
        if not isinstance(value, str) or not value:
            raise RelayError("token_unavailable", "the token callable returned no token")
        return value

    async def _session(self) -> _Ended:
        """One connection from handshake to close; raises :class:`RelayError` when it must end."""
        try:
            async with trio_websocket.open_websocket_url(
                self._url,
                ssl_context=self._ssl_context,
                connect_timeout=self._connect_timeout,
                disconnect_timeout=1.0,
                message_queue_size=64,
                max_message_size=MAX_FRAME,
            ) as ws:
                return await self._serve(ws)
        except trio_websocket.ConnectionRejected as exc:
            status = exc.status_code
            code, message = _rejection(exc)
            if status in (408, 429) or status >= 500:
                return _Ended(None, f"refused: HTTP {status} {code}: {message}")
            raise RelayError(code, message, status=status) from None
        except (trio_websocket.HandshakeError, OSError, trio.BrokenResourceError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio_websocket.HandshakeError) and exc.__cause__ else exc
            return _Ended(None, f"connect failed: {str(cause) or type(cause).__name__}")

    async def _serve(self, ws: trio_websocket.WebSocketConnection) -> _Ended:
        # Asked only once connected: a relay that is down costs no tokens.
        token = await self._fresh_token() if self._token is not None else None
        connected_at = trio.current_time()
        if self._connections:
            self.reconnects += 1
        self._connections += 1
        self.connected = True
        log.info("[CLIENT] connected to %s", self.url)
        try:
            async with trio.open_nursery() as nursery:
                conn = _Connection(ws, nursery)
                await self._emit(Status(scope="client", state="connected"))
                if token is not None:
                    await conn.request({"action": "auth", "token": token})
                    if callable(self._token):
                        nursery.start_soon(self._refresh_token, conn)
                # From here the application's subscribe() goes straight to this connection;
                # what it asked before is in the snapshot taken now (no checkpoint in between).
                self._conn = conn
                requests = self._resubscribe_requests()
                for request in requests:
                    await conn.request(request)
                await self._read(conn)
                nursery.cancel_scope.cancel()  # the token refresher, rate-limit retries
        finally:
            self._conn = None
            self.connected = False
        if conn.failure is not None:
            raise conn.failure
        conn.ended.lasted = trio.current_time() - connected_at
        return conn.ended

    def _resubscribe_requests(self) -> list[dict[str, Any]]:
        """Everything wanted, with ``since`` per symbol seen, one request per epoch and chunk."""
        groups: dict[str | None, list[str]] = {}
        for s in self._symbols:
            seen = self._last.get(s)
            groups.setdefault(seen[0] if seen else None, []).append(s)
        requests: list[dict[str, Any]] = []
        for epoch, symbols in groups.items():
            for i in range(0, len(symbols), REQUEST_CHUNK):
                chunk = symbols[i : i + REQUEST_CHUNK]
                request: dict[str, Any] = {"action": "subscribe", "symbols": chunk}
                if epoch is not None:
                    request["since"] = {s: self._last[s][1] for s in chunk}
                    request["epoch"] = epoch
                requests.append(request)
        return requests

    async def _refresh_token(self, conn: _Connection) -> None:
        """Send a fresh token before the current one expires (the deadline is set on each reply)."""
        while True:
            with conn.refresh:
                await trio.sleep_forever()
            conn.refresh = trio.CancelScope()
            try:
                token = await self._fresh_token()
            except RelayError as exc:
                conn.fail(exc)
                return
            log.debug("[CLIENT] refreshing the token")
            await conn.request({"action": "auth", "token": token})

    async def _read(self, conn: _Connection) -> None:
        retry_after: float | None = None
        last_error: _Error | None = None
        try:
            while True:
                raw = await conn.ws.get_message()
                for msg in _decode(raw):
                    if isinstance(msg, PriceUpdate):
                        if self._accept(msg):
                            await self._emit(msg)
                    elif isinstance(msg, Status):
                        if msg.scope == "relay" and msg.retry_after_ms is not None:
                            retry_after = msg.retry_after_ms / 1000
                        await self._emit(msg)
                    elif isinstance(msg, _Error) and _unsolicited(msg):
                        last_error = msg  # token_expired / unauthenticated: the close follows
                    else:
                        await self._reply(conn, msg)
                        if conn.failure is not None:
                            return
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            if reason is None:
                conn.ended = _Ended(None, "connection lost", retry_after, last_error)
            else:
                text = f"closed {reason.code}" + (f": {reason.reason}" if reason.reason else f" ({reason.name})")
                conn.ended = _Ended(reason.code, text, retry_after, last_error)

    def _accept(self, update: PriceUpdate) -> bool:
        """Record an update; False for an unwanted symbol or a seq already seen in its epoch."""
        symbol = update.symbol
        if symbol not in self._symbols:
            return False
        if update.seq <= 0:
            return True  # a relay that does not number its updates: nothing to compare
        seen = self._last.get(symbol)
        if seen is not None and seen[0] == update.epoch and update.seq <= seen[1]:
            return False
        self._last[symbol] = (update.epoch, update.seq)
        return True

    async def _reply(self, conn: _Connection, msg: _Message) -> None:
        request = conn.pending.popleft() if conn.pending else None
        if isinstance(msg, _Subscribed):
            if msg.recovered is False:
                for s in msg.unrecovered:
                    # What follows is a new start: even in the same epoch its seq may be lower
                    # (a relay that dropped an unwanted symbol's cache numbers it from 1 again).
                    self._last.pop(s, None)
                gap = [s for s in msg.unrecovered if s in self._symbols]
                if gap:
                    await self._emit(
                        Status(
                            scope="client",
                            state="gap",
                            symbols=gap,
                            epoch=msg.epoch,
                            reason="the relay could not replay what was missed (restarted, or the gap is too old)",
                        )
                    )
        elif isinstance(msg, _Authenticated):
            if msg.expires_at is not None and callable(self._token):
                remaining = msg.expires_at - time.time()  # a wall-clock instant from the relay
                wait = max(0.0, remaining - self._refresh_before, remaining / 2)
                conn.refresh.deadline = trio.current_time() + wait
        elif isinstance(msg, _Error):
            if msg.code == "rate_limited":
                if request is not None:
                    log.debug("[CLIENT] rate_limited: sending %s again in %sms", _action(request), msg.retry_after_ms)
                    conn.nursery.start_soon(self._retry, conn, request, (msg.retry_after_ms or 1000) / 1000)
            else:
                conn.fail(RelayError(msg.code, msg.message, action=msg.action or _action(request)))

    async def _retry(self, conn: _Connection, request: dict[str, Any], delay: float) -> None:
        await trio.sleep(delay)
        await conn.request(request)

    async def _emit(self, event: Event) -> None:
        await self._send.send(event)

    async def _close(self) -> None:
        """Close the current connection with 1000 (the relay logs a client that left)."""
        self._closing = True
        conn = self._conn
        if conn is not None:
            with trio.move_on_after(1.0):
                await conn.ws.aclose(1000, "client closing")


def _unsolicited(error: _Error) -> bool:
    """An error frame the relay sends on its own (its close follows), not as a reply."""
    return error.code == "token_expired" or (error.code == "unauthenticated" and error.action is None)


def _action(request: dict[str, Any] | None) -> str | None:
    action = request.get("action") if request is not None else None
    return action if isinstance(action, str) else None


def _rejection(exc: trio_websocket.ConnectionRejected) -> tuple[str, str]:
    """The relay's ``{"error","message"}`` body of a refused handshake, if it sent one."""
    try:
        body = json.loads(exc.body or b"")
        return str(body["error"]), str(body["message"])
    except (ValueError, TypeError, KeyError):
        return f"http_{exc.status_code}", f"the relay refused the connection (HTTP {exc.status_code})"


@asynccontextmanager
async def connect(
    url: str,
    symbols: Iterable[str] = (),
    *,
    token: TokenSource | None = None,
    batch: bool = True,
    backoff_initial: float = 0.5,
    backoff_max: float = 30.0,
    backoff_reset_after: float = 10.0,
    connect_timeout: float = 10.0,
    refresh_before: float = 30.0,
    queue_size: int = 1024,
    rng: random.Random | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Feed]:
    """Open a :class:`Feed` to the relay's price socket at ``url`` and keep it connected.

    Returns at once; the connection is made (and remade) by a task of this block, which ends with
    it. ``token``: a JWT, or an async callable returning a fresh one (called for each connection
    and before the current one expires). ``batch``: ask for batched frames (``?batch=1``).
    ``rng``: the backoff's jitter source (inject a seeded one for a reproducible schedule).
    ``queue_size``: events buffered for a slow application. The rest: see the module docstring.
    """
    feed = Feed(
        url,
        symbols,
        token=token,
        batch=batch,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        backoff_reset_after=backoff_reset_after,
        connect_timeout=connect_timeout,
        refresh_before=refresh_before,
        queue_size=queue_size,
        rng=rng,
        ssl_context=ssl_context,
    )
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed._run)
        try:
            yield feed
        except BaseException as exc:  # re-raised below, outside the nursery: unwrapped for the caller
            body_error = exc
        if not isinstance(body_error, (trio.Cancelled, GeneratorExit)):
            await feed._close()
        nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
