"""The client WebSocket protocol at ``/api/v2/realtime/ws/prices``.

Served natively (see :class:`PriceSocketServer`): one reader loop (client → hub) and one sender task
(outbox → socket) per connection, both owned by the connection's handler. Client messages:

- ``{"action":"subscribe","symbols":["AAPL"]}`` → ``{"type":"subscribed","symbols":[...]}`` then the
  cached ``price_update`` of each newly subscribed symbol that has one, then live updates.
  An optional ``"batch": true`` switches the connection to batched frames (see below).
  A reconnecting client adds ``"since": {"AAPL": 1234}, "epoch": "..."`` (the last ``seq`` and
  the ``epoch`` it saw): it gets exactly the updates it missed instead of a snapshot, and the ack
  says ``"recovered": true`` (or ``false`` + ``"unrecovered"`` with a snapshot for those).
- ``{"type":"status",...}`` messages come unasked: the upstream went down / stale / failed over /
  came back (``scope: "upstream"``), symbols stopped or resumed ticking (``scope: "symbols"``),
  the relay is shutting down and the client should reconnect (``scope: "relay"``).
- ``"channel": "bars", "interval": "1m"`` in a subscribe/unsubscribe: live OHLCV bars
  (``{"type":"bar",...}``) instead of ticks; see :mod:`trio_relay.bars.channel`.
- ``{"action":"unsubscribe","symbols":[...]}`` → ``{"type":"unsubscribed","symbols":[...]}``; no update
  of those symbols follows the ack.
- ``{"action":"ping"}`` → ``{"type":"pong"}``; ``{"action":"list"}`` → ``{"type":"subscriptions","symbols":[...]}``.
- Anything wrong → ``{"type":"error","code":...,"message":...}``; the connection stays up.

By default each message is its own text frame. With ``?batch=1`` on the URL (or ``"batch":true``
in a subscribe), every frame is a JSON array of all messages pending for the client, sent as soon
as the previous frame went out (no timer).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Final
from urllib.parse import parse_qs, urlsplit

import msgspec
import trio
import wsproto
import wsproto.events as wse
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..alerts import RuleError
from ..alerts.service import AlertService
from ..auth import BROWSER_PARAM, OPEN, AuthError, Principal, Security, TokenBucket, bearer_token, open_principal
from ..bars import INTERVALS
from ..config import Config
from ..entitlements import Entitlement, EntitlementError, entitlement_for
from ..hub import (
    CLOSE_GRACE,
    CLOSE_POLICY,
    CLOSE_TOKEN_EXPIRED,
    Client,
    Hub,
    SubscriptionError,
)
from ..jsonbody import JsonError, decode_json
from ..model import SYMBOL_RE, CloseCode, control, ws_payload, ws_text_frame
from ..portfolio import PortfolioError, check_name
from ..portfolio.service import PortfolioService, owner_of

__all__ = ["WS_PATH", "PriceSocketServer", "ProtocolError", "parse_symbols", "peer", "peer_ip"]

log = logging.getLogger("trio_relay.api.ws")

WS_PATH = "/api/v2/realtime/ws/prices"


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_symbols(raw: object, max_per_request: int, field: str = "symbols") -> list[str]:
    """Validate a list of symbols: upper-cased, de-duplicated, format-checked, capped."""
    if raw is None:
        raise ProtocolError("missing_field", f"'{field}' is required: a list of symbols, e.g. [\"AAPL\"]")
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise ProtocolError("invalid_symbols", f"'{field}' must be a list of strings")
    if not raw:
        raise ProtocolError("invalid_symbols", f"'{field}' must not be empty")
    if len(raw) > max_per_request:
        raise ProtocolError("too_many_symbols", f"at most {max_per_request} symbols per request (got {len(raw)})")
    symbols = list(dict.fromkeys(s.strip().upper() for s in raw))
    bad = [s for s in symbols if not SYMBOL_RE.match(s)]
    if bad:
        shown = ", ".join(repr(s[:24]) for s in bad[:5])
        raise ProtocolError(
            "invalid_symbols",
            f"invalid symbol(s): {shown}; a symbol is 1-20 of A-Z 0-9 . - / ^ = starting with a letter, a digit or ^",
        )
    return symbols


def _flag(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes"))


CHANNELS = ("ticks", "bars", "portfolio")


def _channel(msg: dict[str, object]) -> str:
    channel = msg.get("channel", "ticks")
    if channel not in CHANNELS:
        raise ProtocolError("invalid_channel", f"'channel' must be one of {', '.join(CHANNELS)} (got {channel!r:.40})")
    return str(channel)


def _interval(msg: dict[str, object], *, required: bool) -> str | None:
    interval = msg.get("interval")
    if interval is None and not required:
        return None
    if interval not in INTERVALS:
        raise ProtocolError(
            "invalid_interval",
            f"'interval' must be one of {', '.join(INTERVALS)} for the bars channel (got {interval!r:.40})",
        )
    return str(interval)


def _resume_fields(msg: dict[str, object], symbols: list[str]) -> tuple[dict[str, int] | None, str | None]:
    """``since`` ({symbol: last seq seen}) and ``epoch`` of a resuming subscribe, validated."""
    raw = msg.get("since")
    if raw is None:
        return None, None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in raw.items()):
        raise ProtocolError("invalid_since", "'since' must be an object of symbol: last seq seen (an integer >= 0)")
    epoch = msg.get("epoch")
    if not isinstance(epoch, str):
        raise ProtocolError("missing_field", "'epoch' is required with 'since': the epoch of the updates you saw")
    wanted = set(symbols)
    since = {k.strip().upper(): v for k, v in raw.items()}
    extra = [k for k in since if k not in wanted]
    if extra:
        raise ProtocolError("invalid_since", f"'since' names symbols not in 'symbols': {', '.join(extra[:5])}")
    return since, epoch


class PriceSocketServer:
    """The client WebSocket, served natively on Trio + wsproto; one instance serves every connection.

    Not through ASGI: every frame through Hypercorn's WebSocket stream cost ~60 µs (wsproto
    framing per client, the H11 protocol layers, a lock and a shielded socket write per frame),
    which capped a 1,000-client relay at ~11,000 frames/s and, because the shielded write cannot
    be cancelled, left a client that stops reading pinned until the kernel gave up. Here each
    message arrives from the hub already framed (encoded once for everybody), and a client's
    sender writes everything it has pending with ONE socket write.
    """

    def __init__(self, hub: Hub, security: Security | None = None) -> None:
        self.hub = hub  # hub.config holds the client limits (and changes on reload)
        self.security = security if security is not None else Security(Config())
        self.portfolios: PortfolioService | None = None  # set by the front door when portfolios run
        self.alerts: AlertService | None = None  # likewise for alerts

    async def serve(self, stream: trio.abc.Stream, conn: wsproto.WSConnection, request: wse.Request) -> None:
        """Take over a connection whose upgrade ``request`` the edge parsed into ``conn``.

        The edge has checked the Host, the handshake headers and the per-address cap; this
        checks the origin and the token, then answers 101 (or an HTTP error and the end of the
        connection).
        """
        query = parse_qs(urlsplit(request.target).query)
        batch = _flag(query.get("batch", [""])[-1])
        headers = {bytes(k).lower(): bytes(v).decode("latin-1") for k, v in request.extra_headers}
        security = self.security
        if not security.origin_allowed(headers.get(b"origin"), request.host):
            log.warning("[CLIENT] refused: origin %.100r is not allowed", headers.get(b"origin"))
            await _reject(stream, 403, "forbidden_origin", "this page's origin may not open the price socket")
            return
        session = _Session(security)
        if not security.auth.enabled:
            try:
                session.principal = open_principal(query.get(BROWSER_PARAM, [""])[-1])
            except AuthError as exc:
                await _reject(stream, 400, "invalid_browser", exc.reason)
                return
        else:
            token = query.get("token", [""])[-1] or bearer_token(headers.get(b"authorization"))
            if token:
                try:
                    session.principal = security.auth.verify(token)
                except AuthError as exc:
                    log.info("[AUTH] WebSocket refused: %s", exc.reason)
                    await _reject(stream, 401, "unauthorized", exc.reason, bearer=True)
                    return
        try:
            if session.principal is not None and not session.claim_user():
                cap = security.per_user.cap
                await _reject(stream, 429, "too_many_connections", f"at most {cap} connections per user")
                return
            # No extensions offered back: permessage-deflate stays off (it would cost a
            # compression per client per frame, and our frames are encoded once for everyone).
            await stream.send_all(conn.send(wse.AcceptConnection()))
            await self._serve_accepted(stream, conn, session, batch)
        finally:
            session.release_user()

    async def _serve_accepted(
        self, stream: trio.abc.Stream, conn: wsproto.WSConnection, session: _Session, batch: bool
    ) -> None:
        address = peer(stream)
        remote = f"{address[0]}:{address[1]}" if address else "?"
        client = self.hub.connect(batch=batch, remote=remote)
        session.client = client
        if session.principal is not None:
            client.user = session.principal.subject
            client.max_symbols = session.principal.max_symbols
            client.entitlement = entitlement_for(session.principal, self.security.config)
        log.info(
            "[CLIENT] #%d connected from %s%s%s",
            client.id,
            client.remote,
            f" as {client.user}" if client.user else "",
            " (batch)" if batch else "",
        )
        writer = _Writer(stream)
        peer_gone = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    sender = trio.CancelScope()
                    nursery.start_soon(self._send_loop, client, writer, sender)
                    if self.security.auth.enabled:
                        nursery.start_soon(self._guard, session)
                    # close() cancels only the reader: the sender must not be cut mid-frame.
                    with client.cancel_scope:
                        peer_gone = await self._read_loop(client, stream, conn, writer, session)
                    session.guard.cancel()
                    if peer_gone:
                        client.outbox.stop()
                    else:  # the sender writes what is pending (a last error or notice), ends...
                        client.outbox.finish()
                    sender.deadline = trio.current_time() + CLOSE_GRACE  # ...if that ends in time
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                # Reset or gone mid-write/read; from the nursery these arrive grouped.
                peer_gone = True
            if client.close_code is not None and not peer_gone:
                # Bounded: a peer that stopped reading may never take the close frame.
                with trio.move_on_after(1.0):
                    try:
                        frame = conn.send(wse.CloseConnection(code=client.close_code, reason=client.close_reason))
                        await writer.write(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                        pass
        finally:
            # Only now: shutdown waits for the last client to be gone before it stops serving.
            if self.portfolios is not None:
                self.portfolios.disconnect(client)
            self.hub.disconnect(client)
        log.info(
            "[CLIENT] #%d disconnected (%s)",
            client.id,
            f"closed {client.close_code}: {client.close_reason}" if client.close_code and not peer_gone else "by peer",
        )

    async def _send_loop(self, client: Client, writer: _Writer, scope: trio.CancelScope) -> None:
        outbox = client.outbox
        with scope:
            while True:
                frames = await outbox.get()
                if not frames:
                    return  # stopped
                if client.batch:
                    # One frame holding a JSON array of everything pending.
                    body = b"[" + b",".join([ws_payload(f) for f in frames]) + b"]"
                    await writer.write(ws_text_frame(body))
                else:
                    # Every pending message as its own frame, all in one socket write.
                    await writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
                outbox.progressed(len(frames))

    async def _guard(self, session: _Session) -> None:
        """Close the connection when its authentication runs out.

        Until the client authenticates it has ``auth.auth_timeout`` (then 1008); after, until
        its token expires (then 4001), unless a refreshed token moves the deadline first.
        """
        client = session.client
        assert client is not None
        with session.guard:
            if session.principal is None:
                session.guard.deadline = trio.current_time() + self.security.config.auth.auth_timeout
            else:
                session.arm_expiry()
            await trio.sleep_forever()
        if not session.guard.cancelled_caught or client.close_code is not None:
            return
        if session.principal is None:
            self._error(client, "unauthenticated", "no token received in time")
            client.close(CLOSE_POLICY, "authentication required")
        else:
            self._error(client, "token_expired", "the token expired; reconnect with a fresh one")
            client.close(CLOSE_TOKEN_EXPIRED, "token expired")

    async def _read_loop(
        self,
        client: Client,
        stream: trio.abc.Stream,
        conn: wsproto.WSConnection,
        writer: _Writer,
        session: _Session,
    ) -> bool:
        """Apply client messages until the peer closes; True if the peer ended the connection."""
        limit = self.hub.config.max_message_size
        max_frames = self.hub.config.max_frames_per_message
        parts: list[str] = []
        size = 0
        frames = 0  # of the message being received: an endless run of empty fragments ends here
        while True:
            data = await stream.receive_some(65536)
            try:
                conn.receive_data(bytes(data) if data else None)  # bytes(bytes) is no copy
                events = list(conn.events())
            except RemoteProtocolError as exc:
                client.close(CloseCode.PROTOCOL_ERROR, f"protocol error: {exc}"[:120])
                return False
            for event in events:
                if isinstance(event, (wse.TextMessage, wse.BytesMessage)):
                    piece = event.data
                    size += len(piece)
                    if size > limit:
                        client.close(CloseCode.TOO_BIG, f"message larger than {limit} bytes")
                        return False
                    if event.frame_finished:
                        frames += 1
                        if frames > max_frames:
                            client.close(CLOSE_POLICY, f"message split into more than {max_frames} frames")
                            return False
                    if not piece and not event.message_finished:
                        continue  # an empty fragment adds nothing to keep
                    if isinstance(piece, (bytes, bytearray)):
                        try:
                            piece = bytes(piece).decode("utf-8")
                        except UnicodeDecodeError:
                            piece = "\ufffd"  # reported as invalid JSON below
                    parts.append(piece)
                    if event.message_finished:
                        text = "".join(parts)
                        parts.clear()
                        size = 0
                        frames = 0
                        self.handle_message(client, text, session)
                elif isinstance(event, wse.Ping):
                    await writer.write(conn.send(event.response()))
                elif isinstance(event, wse.CloseConnection):
                    try:
                        await writer.write(conn.send(event.response()))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                        pass
                    return True
            if not data:
                return True

    def _error(self, client: Client, code: str, message: str, action: object = None) -> None:
        fields: dict[str, object] = {"code": code, "message": message}
        if isinstance(action, str):
            fields["action"] = action
        self.hub.send_control(client, control("error", **fields))

    def _limited(self, client: Client, session: _Session, wait: float, what: str, action: str | None = None) -> None:
        session.strikes += 1
        if session.strikes >= self.security.limits.strikes:
            log.warning("[LIMIT] client #%d (%s) kept sending past its rate limit; closing", client.id, client.remote)
            client.close(CLOSE_POLICY, "rate limit exceeded")
            return
        fields: dict[str, object] = {
            "code": "rate_limited",
            "message": f"too many {what}; slow down",
            "retry_after_ms": max(1, math.ceil(wait * 1000)),
        }
        if action is not None:
            fields["action"] = action  # known for subscribe/unsubscribe, not for a message never read
        self.hub.send_control(client, control("error", **fields))

    def handle_message(self, client: Client, text: str, session: _Session | None = None) -> None:
        """Apply one client message (sync: the hub never awaits)."""
        if session is None:
            session = _Session(self.security, principal=OPEN)
        now = trio.current_time()
        wait = session.messages.take(now)
        if wait:
            self._limited(client, session, wait, "messages")
            return
        try:
            msg = decode_json(text, self.security.limits.json_max_depth)
        except JsonError as exc:
            message = "message is not valid JSON" if exc.code == "invalid_json" else exc.message
            self._error(client, exc.code, message)
            return
        if not isinstance(msg, dict):
            self._error(
                client,
                "invalid_message",
                'message must be a JSON object like {"action":"subscribe","symbols":["AAPL"]}',
            )
            return
        action = msg.get("action")
        try:
            if action == "auth":
                self._authenticate(client, session, msg.get("token"))
                return
            if session.principal is None:
                raise ProtocolError("unauthenticated", 'authenticate first: {"action":"auth","token":"<JWT>"}')
            if action in ("subscribe", "unsubscribe"):
                wait = session.subscribes.take(now)
                if wait:
                    self._limited(client, session, wait, "subscribe/unsubscribe requests", action)
                    return
            session.strikes = 0
            if action is None:
                raise ProtocolError("missing_field", "'action' is required: subscribe, unsubscribe, ping or list")
            handler = _ACTIONS.get(action) if isinstance(action, str) else None
            if handler is None:
                shown = action if isinstance(action, str) else repr(action)
                raise ProtocolError(
                    "unknown_action",
                    f"unknown action {shown[:40]!r}; expected subscribe, unsubscribe, ping, list, auth, alert_create, "
                    "alert_delete or alerts",
                )
            handler(self, client, session, msg)
        except EntitlementError as exc:
            self._error(client, exc.code, exc.message, action)
        except ProtocolError as exc:
            self._error(client, exc.code, exc.message, action)

    # ---------------------------------------------------------------- one method per action
    # Each takes the client, its session and the decoded message; it answers through the hub
    # (never awaits) and raises ProtocolError / EntitlementError for an error frame.

    def _on_subscribe(self, client: Client, session: _Session, msg: dict[str, object]) -> None:
        if msg.get("channel") == "portfolio":
            _entitled(client, session)  # the stream values positions through it
            self._portfolio(client, "subscribe", msg.get("portfolio"))
            return
        symbols = parse_symbols(msg.get("symbols"), self.hub.config.max_symbols_per_request)
        _entitled(client, session).require(symbols)  # before any snapshot is sent
        if "batch" in msg:
            client.batch = _flag(msg["batch"])
        try:
            if _channel(msg) == "bars":
                self.hub.bars.subscribe(client, symbols, _interval(msg, required=True) or "")
            else:
                since, epoch = _resume_fields(msg, symbols)
                self.hub.subscribe(client, symbols, since=since, epoch=epoch)
        except SubscriptionError as exc:
            raise ProtocolError(exc.code, exc.message) from None

    def _on_unsubscribe(self, client: Client, session: _Session, msg: dict[str, object]) -> None:
        if msg.get("channel") == "portfolio":
            _entitled(client, session)
            self._portfolio(client, "unsubscribe", msg.get("portfolio"))
            return
        symbols = parse_symbols(msg.get("symbols"), self.hub.config.max_symbols_per_request)
        if _channel(msg) == "bars":
            self.hub.bars.unsubscribe(client, symbols, _interval(msg, required=False))
        else:
            self.hub.unsubscribe(client, symbols)

    def _on_alerts(self, client: Client, session: _Session, msg: dict[str, object]) -> None:
        self._alerts(client, str(msg["action"]), msg, _entitled(client, session))

    def _on_ping(self, client: Client, session: _Session, msg: dict[str, object]) -> None:
        self.hub.send_control(client, control("pong"))

    def _on_list(self, client: Client, session: _Session, msg: dict[str, object]) -> None:
        listing = control("subscriptions", symbols=sorted(client.symbols))
        if client.bars:  # only then: a ticks-only client sees the seed's reply
            bars: dict[str, list[str]] = {}
            for symbol, interval in sorted(client.bars):
                bars.setdefault(interval, []).append(symbol)
            listing["bars"] = bars
        self.hub.send_control(client, listing)

    def _alerts(self, client: Client, action: str, msg: dict[str, object], entitlement: Entitlement) -> None:
        """``alert_create`` {"rule":{...}}, ``alert_delete`` {"id":...}, ``alerts`` (list): the user's rules."""
        if self.alerts is None:
            raise ProtocolError("unavailable", "alerts are off on this relay (alerts.enabled = false)")
        owner = owner_of(client)
        try:
            if action == "alert_create":
                rule = msg.get("rule")
                if not isinstance(rule, dict):
                    raise ProtocolError("missing_field", '\'rule\' is required: an object, e.g. {"type":"above",...}')
                # Answered by the alert service once its checks are done (webhook host, budget).
                self.alerts.create_for(client, owner, rule, entitlement)
            elif action == "alert_delete":
                rule_id = msg.get("id")
                if not isinstance(rule_id, str):
                    raise ProtocolError("missing_field", "'id' is required: the rule's id")
                self.alerts.delete(owner, rule_id)
                self.hub.send_control(client, control("alert_deleted", id=rule_id))
            else:
                rules = [msgspec.to_builtins(r) for r in self.alerts.rules(owner)]
                self.hub.send_control(client, control("alerts", rules=rules))
        except RuleError as exc:
            raise ProtocolError(exc.code, exc.message) from None

    def _portfolio(self, client: Client, action: str, raw: object) -> None:
        """Subscribe or unsubscribe the ``portfolio`` channel: live valuations of one portfolio."""
        if self.portfolios is None:
            raise ProtocolError("unavailable", "portfolios are off on this relay (alerts.enabled = false)")
        try:
            name = check_name(raw)
        except PortfolioError as exc:
            raise ProtocolError(exc.code, exc.message) from None
        if action == "subscribe":
            self.portfolios.subscribe(client, name)
        else:
            self.portfolios.unsubscribe(client, name)

    def _authenticate(self, client: Client, session: _Session, token: object) -> None:
        """``{"action":"auth","token":...}``: first authentication, or a refresh before expiry."""
        security = self.security
        if not security.auth.enabled:
            subject = (session.principal or OPEN).subject
            self.hub.send_control(client, control("authenticated", subject=subject, expires_at=None))
            return
        if not isinstance(token, str) or not token:
            raise_first = session.principal is None
            self._error(client, "missing_field", "'token' is required: a JWT", "auth")
            if raise_first:
                client.close(CLOSE_POLICY, "authentication failed")
            return
        try:
            principal = security.auth.verify(token)
        except AuthError as exc:
            log.info("[AUTH] client #%d: %s", client.id, exc.reason)
            self._error(client, "unauthorized", exc.reason, "auth")
            if session.principal is None:
                client.close(CLOSE_POLICY, "authentication failed")
            return
        if session.principal is None:
            session.principal = principal
            if not session.claim_user():
                self._error(
                    client, "too_many_connections", f"at most {security.per_user.cap} connections per user", "auth"
                )
                client.close(CLOSE_POLICY, "too many connections for this user")
                return
            client.user = principal.subject
            client.max_symbols = principal.max_symbols
            client.entitlement = entitlement_for(principal, security.config)
            log.info("[AUTH] client #%d authenticated as %s", client.id, principal.subject)
        elif principal.subject != session.principal.subject:
            self._error(client, "unauthorized", "a refreshed token must be for the same user", "auth")
            return
        else:
            session.principal = principal  # new claims apply to the next requests
            client.max_symbols = principal.max_symbols
            entitlement = client.entitlement = entitlement_for(principal, security.config)
            # A narrower token takes effect now: what it no longer allows stops (an "unsubscribed" says so).
            refused = sorted({s for s in client.symbols if not entitlement.allows(s)})
            if refused:
                self.hub.unsubscribe(client, refused)
            refused_bars = sorted({s for s, _ in client.bars if not entitlement.allows(s)})
            if refused_bars:
                self.hub.bars.unsubscribe(client, refused_bars, None)
        session.arm_expiry()
        self.hub.send_control(
            client, control("authenticated", subject=principal.subject, expires_at=principal.expires_at)
        )


# The client protocol's actions ("auth" is handled before: it is the one allowed unauthenticated).
_ACTIONS: Final[Mapping[str, Callable[[PriceSocketServer, Client, _Session, dict[str, object]], None]]] = (
    MappingProxyType(
        {
            "subscribe": PriceSocketServer._on_subscribe,
            "unsubscribe": PriceSocketServer._on_unsubscribe,
            "alert_create": PriceSocketServer._on_alerts,
            "alert_delete": PriceSocketServer._on_alerts,
            "alerts": PriceSocketServer._on_alerts,
            "ping": PriceSocketServer._on_ping,
            "list": PriceSocketServer._on_list,
        }
    )
)


def _entitled(client: Client, session: _Session) -> Entitlement:
    """The connection's entitlement (set at authentication; a bare handle_message call: its session's)."""
    if client.entitlement is None:
        assert session.principal is not None  # callers check authentication first
        client.entitlement = entitlement_for(session.principal, session.security.config)
    return client.entitlement


class _Session:
    """What one connection's security state is: who it is, its buckets, its auth deadline."""

    __slots__ = ("security", "principal", "client", "messages", "subscribes", "strikes", "guard", "_user")

    def __init__(self, security: Security, principal: Principal | None = None) -> None:
        now = trio.current_time()
        limits = security.limits
        self.security = security
        self.principal = principal
        self.client: Client | None = None
        self.messages = TokenBucket(limits.messages_per_second, limits.messages_burst, now)
        self.subscribes = TokenBucket(limits.subscribes_per_second, limits.subscribes_burst, now)
        self.strikes = 0  # over-limit messages in a row
        self.guard = trio.CancelScope()  # its deadline: auth_timeout, then the token's expiry
        self._user: str | None = None

    def claim_user(self) -> bool:
        """Count this connection against its user's cap (auth on only)."""
        if self.principal is None or not self.security.auth.enabled:
            return True
        if not self.security.per_user.acquire(self.principal.subject):
            return False
        self._user = self.principal.subject
        return True

    def release_user(self) -> None:
        if self._user is not None:
            self.security.per_user.release(self._user)
            self._user = None

    def arm_expiry(self) -> None:
        expires = self.principal.expires_at if self.principal is not None else None
        if expires is None:
            self.guard.deadline = math.inf
        else:
            self.guard.deadline = trio.current_time() + max(0.0, expires - time.time())


async def _reject(stream: trio.abc.Stream, status: int, code: str, message: str, *, bearer: bool = False) -> None:
    """Refuse a WebSocket upgrade with an HTTP error and a JSON body."""
    body = msgspec.json.encode({"error": code, "message": message})
    extra = b'www-authenticate: Bearer realm="trio-relay"\r\n' if bearer else b""
    reason = HTTPStatus(status).phrase.encode()
    await stream.send_all(
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n%s"
        b"content-length: %d\r\n\r\n%s" % (status, reason, extra, len(body), body)
    )


def peer(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The remote (host, port) of a socket stream, or of the socket under a TLS stream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return None
    return str(host), int(port)


def peer_ip(stream: trio.abc.Stream) -> str:
    address = peer(stream)
    return address[0] if address else "?"


class _Writer:
    """Serialises writes to one client socket (the sender and the reader's pongs share it).

    A write cancelled half-way leaves a torn frame on the wire: the writer is then ``broken`` and
    refuses further writes (no close frame may follow a torn one; the connection is just dropped).
    """

    __slots__ = ("_stream", "_lock", "_in_write")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._lock = trio.Lock()
        self._in_write = False

    async def write(self, data: bytes) -> None:
        # Uncontended (nearly always: only pongs race the sender), take the lock without the
        # scheduler round-trip `async with` costs; send_all is this call's checkpoint.
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            if self._in_write:
                raise trio.ClosedResourceError("an earlier write was abandoned mid-frame")
            self._in_write = True
            await self._stream.send_all(data)
            self._in_write = False
        finally:
            self._lock.release()
