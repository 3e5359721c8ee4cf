"""REST routes under ``/api/v2/realtime`` (Quart-Trio). Errors are JSON, never a stack trace."""

from __future__ import annotations

import logging
import math
import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..auth import OPEN, AuthError, bearer_token
from ..entitlements import EntitlementError
from ..jsonbody import JsonError, decode_json
from .alert_routes import register_alerts
from .dashboard import OPEN_PREFIXES, PAGE_PATH, register_dashboard
from .history_routes import register_history
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import make_registry, render
from .openapi import OPENAPI_PATH, add_openapi_route
from .portfolio_routes import register_portfolios
from .responses import entitlement, entitlement_error, error_response, json_response
from .schemas import (
    CacheInfo,
    ClientInfo,
    ClientsInfo,
    FailoverInfo,
    Health,
    HistoryHealth,
    HistoryStatus,
    Live,
    MessageCounters,
    ProviderInfo,
    Status,
    UpstreamInfo,
)
from .ws import ProtocolError, parse_symbols

if TYPE_CHECKING:
    from .app import RelayContext

__all__ = ["create_rest_app", "PREFIX"]

log = logging.getLogger("trio_relay.api.rest")

PREFIX = "/api/v2/realtime"
MAX_BODY = 64 * 1024
MAX_CLIENTS_LISTED = 1000


def _unauthorized(message: str) -> Response:
    response = error_response(401, "unauthorized", message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="trio-relay", error="invalid_token"'
    return response


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def create_rest_app(ctx: RelayContext) -> QuartTrio:
    app = QuartTrio("trio_relay")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False  # type: ignore[attr-defined]
    register_dashboard(app)  # the web page at / and its files at /static/
    register_history(app, ctx)  # /history/{symbol} and /bars/{symbol}
    register_portfolios(app, ctx)  # /portfolios...
    register_alerts(app, ctx)  # /alerts...
    hub, upstream = ctx.hub, ctx.upstream

    @app.errorhandler(HTTPException)
    async def httperror_response(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name or "error")

    security = ctx.security
    # Routes monitoring must always reach, and the dashboard's page and files (they carry no
    # data): never rate limited, never behind a token.
    open_paths = (PREFIX + "/health", "/metrics", OPENAPI_PATH, *OPEN_PREFIXES)
    # Routes that change what the relay holds upstream for everybody, or show every client.
    admin_paths = (PREFIX + "/subscribe", PREFIX + "/unsubscribe", PREFIX + "/status")

    def client_ip() -> str:
        return ctx.client_ip(request.scope.get("client"))

    @app.before_request
    async def guard() -> Response | None:
        """Rate limit per client IP, then (auth on) a valid Bearer token and, for pins, the admin scope."""
        path = request.path
        g.principal = OPEN
        if path == PAGE_PATH or path.startswith(open_paths):
            return None
        wait = security.rest_allowed(client_ip(), trio.current_time())
        if wait:
            response = error_response(429, "rate_limited", "too many requests; slow down")
            response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return response
        if not security.auth.enabled:
            return None
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return _unauthorized("a Bearer token is required (Authorization: Bearer <JWT>)")
        try:
            g.principal = security.auth.verify(token)
        except AuthError as exc:
            log.info("[AUTH] REST %s %s refused: %s", request.method, path, exc.reason)
            return _unauthorized(exc.reason)
        if path.startswith(admin_paths) and not g.principal.has_scope(security.config.auth.admin_scope):
            return error_response(
                403, "insufficient_scope", f"this route needs the {security.config.auth.admin_scope!r} scope"
            )
        return None

    @app.after_request
    async def security_headers(response: Response) -> Response:
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        headers.setdefault("Cache-Control", "no-store")
        if security.config.server.tls_certfile:
            headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    @app.errorhandler(Exception)
    async def internalerror_response(exc: Exception) -> Response:
        log.exception("[REST] %s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the relay's log")

    def health_body() -> tuple[Health, bool]:
        fresh = upstream.is_fresh()
        age = upstream.message_age()
        body = Health(
            status="ok" if fresh else "unavailable",
            provider=ctx.provider_name,
            state=upstream.state,
            last_message_age_s=_round(age),
            reconnects=upstream.reconnects,
            clients=len(hub.clients),
        )
        if not fresh:
            # "code" is for machines (alert rules), "reason" for people.
            body.code = "stale" if upstream.state == "connected" else upstream.state
            if upstream.state == "connected":
                body.reason = f"stale: no upstream message for {age or 0:.0f}s"
            elif upstream.state == "auth_failed":
                body.reason = f"auth_failed: {upstream.last_error}"
            elif upstream.last_error:
                body.reason = f"{upstream.state}: {upstream.last_error}"
            else:
                body.reason = upstream.state
        if upstream.failover:
            body.failover = failover_body()
        fleet = ctx.engine.fleet_health()
        if fleet is not None:
            body.fleet = fleet
        writer = ctx.history_writer
        if writer is not None:
            # Live relaying does not depend on the database: a slow or down one degrades, never 503s.
            body.history = HistoryHealth(state=writer.state, dropped=writer.dropped, pending=writer.pending)
            if writer.state != "ok":
                body.degraded = ["history"]
        if ctx.provider_name == "sim":
            body.note = "simulated market data (no FMP_API_KEY set)"
        return body, fresh

    def failover_body() -> FailoverInfo:
        chain = upstream.chain
        return FailoverInfo(
            active=upstream.provider.name,
            preferred=chain[0].provider.name,
            on_preferred=upstream.active == 0,
            switches=upstream.switches,
            reason=upstream.switch_reason or None,
        )

    @app.get(PREFIX + "/health")
    async def health() -> Response:
        """Upstream health: 200 when it is connected and fresh, 503 with the reason otherwise.

        For monitoring: never behind a token, never rate limited. Same body as /health/ready.
        """
        body, fresh = health_body()
        return json_response(body, 200 if fresh else 503)

    @app.get(PREFIX + "/health/ready")
    async def ready() -> Response:
        """Ready to serve prices: the upstream is connected and fresh (always, for the simulator)."""
        body, fresh = health_body()
        return json_response(body, 200 if fresh else 503)

    registry = make_registry(ctx)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics: upstream, messages, clients, latency (no per-client or per-symbol labels)."""
        return Response(render(registry), content_type=METRICS_CONTENT_TYPE)

    @app.get(PREFIX + "/health/live")
    async def live() -> Response:
        """The process answers (its event loop runs), whatever the upstream does."""
        ip = ctx.client_ip(request.scope.get("client"))  # the real client's, through the front door
        return json_response(
            Live(status="ok", pid=os.getpid(), uptime_s=round(time.time() - ctx.started_at, 1), client_ip=ip)
        )

    @app.get(PREFIX + "/status")
    async def status() -> Response:
        """The relay's state: upstream and failover chain, pins, every client, message counters.

        With auth on it needs the admin scope (it lists every client).
        """
        now = time.time()
        clients = list(hub.clients.values())
        stats = hub.stats
        writer = ctx.history_writer
        body = Status(
            provider=ctx.provider_name,
            upstream=UpstreamInfo(
                state=upstream.state,
                source=upstream.provider.describe(),
                connected_since=_iso(upstream.connected_since),
                reconnects=upstream.reconnects,
                attempts=upstream.attempts,
                last_error=upstream.last_error or None,
                last_message_age_s=_round(upstream.message_age()),
                subscribed=sorted(upstream.subscribed),
                wanted=sorted(hub.demand.wanted),
                providers=[
                    ProviderInfo(
                        name=h.provider.name,
                        active=i == upstream.active,
                        state=upstream.state if i == upstream.active else h.state,
                        source=h.provider.describe(),
                        last_error=(upstream.last_error if i == upstream.active else h.last_error) or None,
                        probes=h.probes,
                    )
                    for i, h in enumerate(upstream.chain)
                ],
            ),
            failover=failover_body() if upstream.failover else None,
            fleet=ctx.engine.fleet_status(),
            history=msgspec.convert(writer.status(), HistoryStatus) if writer is not None else None,
            pinned=sorted(hub.demand.pinned),
            clients=ClientsInfo(
                count=len(clients),
                total_connected=stats.clients_total,
                slow_closed=stats.slow_clients_closed,
                subscriptions=[
                    ClientInfo(
                        id=c.id,
                        remote=c.remote,
                        symbols=len(c.symbols),
                        pending=len(c.outbox),
                        sent=c.outbox.sent,
                        conflated=c.outbox.conflated,
                        batch=c.batch,
                    )
                    for c in clients[:MAX_CLIENTS_LISTED]
                ],
            ),
            messages=MessageCounters(
                in_=stats.updates_in,
                out=stats.messages_out,
                dropped=stats.dropped,
                conflated=hub.conflated_total(),
                coalesced=stats.coalesced,
                malformed=stats.malformed,
                callback_errors=stats.callback_errors,
                callback_dropped=stats.callback_dropped,
            ),
            cache=CacheInfo(symbols=len(hub.cache)),
            pid=os.getpid(),
            started_at=_iso(ctx.started_at),
            uptime_s=round(now - ctx.started_at, 1),
        )
        return json_response(body)

    async def _symbols_from_body() -> list[str] | Response:
        raw = await request.get_data()
        try:
            body = decode_json(raw, security.limits.json_max_depth) if raw else None
        except JsonError as exc:
            if exc.code != "invalid_json":
                return error_response(400, exc.code, exc.message)
            return error_response(400, "invalid_json", 'body must be JSON: a list of symbols like ["AAPL","MSFT"]')
        if isinstance(body, dict):
            body = body.get("symbols")
        try:
            return parse_symbols(body, hub.config.max_symbols_per_request, field="body")
        except ProtocolError as exc:
            return error_response(422, exc.code, exc.message)

    @app.post(PREFIX + "/subscribe")
    async def subscribe() -> Response:
        """Pin symbols upstream, whatever clients want (admin scope with auth on).

        Body: a JSON list of symbols or {"symbols": [...]}. Pins hold the upstream subscription
        for everybody until unpinned; clients still subscribe on their WebSocket to get prices.
        """
        symbols = await _symbols_from_body()
        if isinstance(symbols, Response):
            return symbols
        try:
            allowed = entitlement(security)
            allowed.require_pin()
            allowed.require(symbols)
        except EntitlementError as exc:
            return entitlement_error(exc)
        hub.pin(symbols)
        log.info("[SUBSCRIBE] REST pinned %s", ",".join(symbols))
        return json_response({"status": "subscribed", "symbols": symbols, "pinned": sorted(hub.demand.pinned)})

    @app.post(PREFIX + "/unsubscribe")
    async def unsubscribe() -> Response:
        """Unpin symbols (admin scope with auth on); clients' own subscriptions stay."""
        symbols = await _symbols_from_body()
        if isinstance(symbols, Response):
            return symbols
        was = hub.unpin(symbols)
        log.info("[UNSUBSCRIBE] REST unpinned %s", ",".join(was) or "(none were pinned)")
        return json_response(
            {
                "status": "unsubscribed",
                "symbols": was,
                "not_pinned": [s for s in symbols if s not in was],
                "pinned": sorted(hub.demand.pinned),
            }
        )

    @app.get(PREFIX + "/cache")
    async def cache_all() -> Response:
        """Every cached price_update, by symbol (with auth on: the symbols the token allows)."""
        allowed = entitlement(security).allows
        cache = hub.cache
        source = "local"
        # A fleet answers from the shared cache, the same on every relay (this relay's own
        # while it cannot reach Redis; the X-Cache-Source header says which).
        shared = await ctx.engine.cached_states()
        if shared is not None:
            cache, source = shared, "fleet"
        data = {s: st for s, st in sorted(cache.items()) if st.seq and allowed(s)}
        response = json_response({"count": len(data), "data": data})
        response.headers["X-Cache-Source"] = source
        return response

    @app.get(PREFIX + "/cache/<symbol>")
    async def cache_one(symbol: str) -> Response:
        """One symbol's cached price_update (its full current state); 404 when none is cached."""
        symbol = symbol.upper()
        try:
            entitlement(security).require([symbol])
        except EntitlementError as exc:
            return entitlement_error(exc)
        state = hub.snapshot(symbol)
        source = "local"
        shared = await ctx.engine.cached_states([symbol])
        if shared is not None:
            state, source = shared.get(symbol), "fleet"
        if state is None:
            return error_response(404, "not_found", f"no cached data for {symbol[:24]!r}")
        response = json_response(state)
        response.headers["X-Cache-Source"] = source
        return response

    add_openapi_route(app, security, open_paths=open_paths, open_exact=(PAGE_PATH,), admin_paths=admin_paths)
    return app
