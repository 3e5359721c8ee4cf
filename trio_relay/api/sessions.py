"""Client sessions: who a connection is, its limits, and the actions it applies to the hub.

Shared by both price transports (the WebSocket in :mod:`.ws`, Server-Sent Events in :mod:`.sse`):

- :class:`Session` is one connection's security state: its principal, its rate-limit buckets,
  its auth deadline (the ``guard`` scope), its claim on the per-user connection cap. The
  subscriptions themselves (symbols and their delivery options) live on the hub's
  :class:`~trio_relay.hub.Client`, where routing reads them.
- :class:`Actions` applies a client's typed actions (parsed by :mod:`.protocol`) to the hub,
  the alert service and the portfolio service, one method per action type; it never awaits
  (the hub never waits for a client) and answers through the client's outbox.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

import msgspec
import trio

from ..alerts import RuleError
from ..alerts.service import AlertService
from ..auth import OPEN, AuthError, Principal, Security, TokenBucket
from ..entitlements import Entitlement, EntitlementError, entitlement_for
from ..hub import CLOSE_POLICY, CLOSE_TOKEN_EXPIRED, Client, Hub, SubscriptionError
from ..model import control
from ..portfolio import PortfolioError, check_name
from ..portfolio.service import PortfolioService, owner_of
from .protocol import (
    SUBSCRIPTION_ACTIONS,
    Action,
    AlertCreate,
    AlertDelete,
    AlertList,
    Auth,
    Channel,
    ListSubscriptions,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    decode_message,
    error_reply,
    parse_action,
    rate_limited_reply,
)

__all__ = ["Actions", "Session"]

log = logging.getLogger("trio_relay.api.sessions")


class Session:
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

    def attach(self, client: Client) -> None:
        """Bind the hub's client to this session (and the principal's limits to the client)."""
        self.client = client
        if self.principal is not None:
            client.user = self.principal.subject
            client.max_symbols = self.principal.max_symbols
            client.entitlement = entitlement_for(self.principal, self.security.config)

    def entitlement(self) -> Entitlement:
        """The connection's entitlement (set at authentication)."""
        client = self.client
        assert client is not None and self.principal is not None  # callers check authentication first
        if client.entitlement is None:
            client.entitlement = entitlement_for(self.principal, self.security.config)
        return client.entitlement


class Actions:
    """Applies client actions to the hub and the services; one instance serves every connection."""

    def __init__(self, hub: Hub, security: Security) -> None:
        self.hub = hub  # hub.config holds the client limits (and changes on reload)
        self.security = security
        self.portfolios: PortfolioService | None = None  # set by the front door when portfolios run
        self.alerts: AlertService | None = None  # likewise for alerts

    # ---------------------------------------------------------------- replies
    def error(self, client: Client, code: str, message: str, action: object = None) -> None:
        self.hub.send_control(client, error_reply(code, message, action))

    def _limited(self, client: Client, session: Session, wait: float, what: str, action: str | None = None) -> None:
        session.strikes += 1
        if session.strikes >= self.security.limits.strikes:
            log.warning("[LIMIT] client #%d (%s) kept sending past its rate limit; closing", client.id, client.remote)
            client.close(CLOSE_POLICY, "rate limit exceeded")
            return
        self.hub.send_control(client, rate_limited_reply(wait, what, action))

    # ---------------------------------------------------------------- one client message
    def handle_text(self, client: Client, session: Session, text: str) -> None:
        """Apply one client message (sync: the hub never awaits)."""
        now = trio.current_time()
        wait = session.messages.take(now)
        if wait:
            self._limited(client, session, wait, "messages")
            return
        action: object = None
        try:
            msg = decode_message(text, self.security.limits.json_max_depth)
            action = msg.get("action")
            if action == "auth":
                self._authenticate(client, session, msg.get("token"))
                return
            if session.principal is None:
                raise ProtocolError("unauthenticated", 'authenticate first: {"action":"auth","token":"<JWT>"}')
            if action in SUBSCRIPTION_ACTIONS:
                wait = session.subscribes.take(now)
                if wait:
                    self._limited(client, session, wait, "subscribe/unsubscribe requests", str(action))
                    return
            session.strikes = 0
            self.apply(client, session, parse_action(msg, self.hub.config.max_symbols_per_request))
        except (EntitlementError, ProtocolError) as exc:
            self.error(client, exc.code, exc.message, action)

    def apply(self, client: Client, session: Session, action: Action) -> None:
        """Apply one parsed action; raises ProtocolError / EntitlementError for an error frame."""
        _HANDLERS[type(action)](self, client, session, action)

    # ---------------------------------------------------------------- one method per action
    def _on_subscribe(self, client: Client, session: Session, action: Subscribe) -> None:
        if action.channel is Channel.PORTFOLIO:
            session.entitlement()  # the stream values positions through it
            self._portfolio(client, "subscribe", action.portfolio)
            return
        session.entitlement().require(action.symbols)  # before any snapshot is sent
        if action.batch is not None:
            self.hub.set_batch(client, action.batch)
        try:
            if action.channel is Channel.BARS:
                self.hub.bars.subscribe(client, action.symbols, action.interval or "")
            else:
                hub = self.hub
                hub.subscribe(client, action.symbols, since=action.since, epoch=action.epoch, options=action.options)
        except SubscriptionError as exc:
            raise ProtocolError(exc.code, exc.message) from None

    def _on_unsubscribe(self, client: Client, session: Session, action: Unsubscribe) -> None:
        if action.channel is Channel.PORTFOLIO:
            session.entitlement()
            self._portfolio(client, "unsubscribe", action.portfolio)
            return
        if action.channel is Channel.BARS:
            self.hub.bars.unsubscribe(client, action.symbols, action.interval)
        else:
            self.hub.unsubscribe(client, action.symbols)

    def _on_ping(self, client: Client, session: Session, action: Ping) -> None:
        self.hub.send_control(client, control("pong"))

    def _on_list(self, client: Client, session: Session, action: ListSubscriptions) -> None:
        listing = control("subscriptions", symbols=sorted(client.symbols))
        if client.options:  # only then, likewise: the symbols delivered with options, and theirs
            listing["options"] = {s: o.as_json() for s, o in sorted(client.options.items())}
        if client.bars:  # only then: a ticks-only client sees the seed's reply
            bars: dict[str, list[str]] = {}
            for symbol, interval in sorted(client.bars):
                bars.setdefault(interval, []).append(symbol)
            listing["bars"] = bars
        self.hub.send_control(client, listing)

    def _on_auth(self, client: Client, session: Session, action: Auth) -> None:
        self._authenticate(client, session, action.token)

    def _on_alert_create(self, client: Client, session: Session, action: AlertCreate) -> None:
        alerts = self._alert_service()
        try:
            # Answered by the alert service once its checks are done (webhook host, budget).
            alerts.create_for(client, owner_of(client), action.rule, session.entitlement())
        except RuleError as exc:
            raise ProtocolError(exc.code, exc.message) from None

    def _on_alert_delete(self, client: Client, session: Session, action: AlertDelete) -> None:
        alerts = self._alert_service()
        session.entitlement()
        try:
            alerts.delete(owner_of(client), action.id)
        except RuleError as exc:
            raise ProtocolError(exc.code, exc.message) from None
        self.hub.send_control(client, control("alert_deleted", id=action.id))

    def _on_alert_list(self, client: Client, session: Session, action: AlertList) -> None:
        alerts = self._alert_service()
        session.entitlement()
        rules = [msgspec.to_builtins(r) for r in alerts.rules(owner_of(client))]
        self.hub.send_control(client, control("alerts", rules=rules))

    def _alert_service(self) -> AlertService:
        if self.alerts is None:
            raise ProtocolError("unavailable", "alerts are off on this relay (alerts.enabled = false)")
        return self.alerts

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

    # ---------------------------------------------------------------- authentication
    def _authenticate(self, client: Client, session: Session, token: object) -> None:
        """``{"action":"auth","token":...}``: first authentication, or a refresh before expiry."""
        security = self.security
        if not security.auth.enabled:
            subject = (session.principal or OPEN).subject
            self.hub.send_control(client, control("authenticated", subject=subject, expires_at=None))
            return
        first = session.principal is None
        if not isinstance(token, str) or not token:
            self.error(client, "missing_field", "'token' is required: a JWT", "auth")
            if first:
                client.close(CLOSE_POLICY, "authentication failed")
            return
        try:
            principal = security.auth.verify(token)
        except AuthError as exc:
            log.info("[AUTH] client #%d: %s", client.id, exc.reason)
            self.error(client, "unauthorized", exc.reason, "auth")
            if first:
                client.close(CLOSE_POLICY, "authentication failed")
            return
        if first:
            session.principal = principal
            if not session.claim_user():
                cap = security.per_user.cap
                self.error(client, "too_many_connections", f"at most {cap} connections per user", "auth")
                client.close(CLOSE_POLICY, "too many connections for this user")
                return
            session.attach(client)
            log.info("[AUTH] client #%d authenticated as %s", client.id, principal.subject)
        elif session.principal is not None and principal.subject != session.principal.subject:
            self.error(client, "unauthorized", "a refreshed token must be for the same user", "auth")
            return
        else:
            self._refresh(client, session, principal)
        session.arm_expiry()
        self.hub.send_control(
            client, control("authenticated", subject=principal.subject, expires_at=principal.expires_at)
        )

    def _refresh(self, client: Client, session: Session, principal: Principal) -> None:
        """A refreshed token's claims apply to the next requests; what it no longer allows stops now."""
        session.principal = principal
        client.max_symbols = principal.max_symbols
        entitlement = client.entitlement = entitlement_for(principal, self.security.config)
        refused = sorted({s for s in client.symbols if not entitlement.allows(s)})
        if refused:
            self.hub.unsubscribe(client, refused)  # an "unsubscribed" says so
        refused_bars = sorted({s for s, _ in client.bars if not entitlement.allows(s)})
        if refused_bars:
            self.hub.bars.unsubscribe(client, refused_bars, None)

    async def guard(self, session: Session) -> None:
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
            self.error(client, "unauthenticated", "no token received in time")
            client.close(CLOSE_POLICY, "authentication required")
        else:
            self.error(client, "token_expired", "the token expired; reconnect with a fresh one")
            client.close(CLOSE_TOKEN_EXPIRED, "token expired")


# One handler per action type ("auth" also arrives here from a bare apply(); handle_text takes it first).
_HANDLERS: Final[Mapping[type, Callable[[Actions, Client, Session, Any], None]]] = MappingProxyType(
    {
        Subscribe: Actions._on_subscribe,
        Unsubscribe: Actions._on_unsubscribe,
        Ping: Actions._on_ping,
        ListSubscriptions: Actions._on_list,
        Auth: Actions._on_auth,
        AlertCreate: Actions._on_alert_create,
        AlertDelete: Actions._on_alert_delete,
        AlertList: Actions._on_alert_list,
    }
)
