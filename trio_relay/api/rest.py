"""The REST app (Quart-Trio): its guard, error handlers and headers; the routes live by noun.

``health_routes`` (/health*, /status, /metrics), ``pin_routes`` (/subscribe, /unsubscribe),
``cache_routes`` (/cache), ``history_routes`` (/history, /bars), ``alert_routes``,
``portfolio_routes``, and the dashboard. Errors are JSON, never a stack trace.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..auth import BROWSER_HEADER, OPEN, AuthError, bearer_token, open_principal
from .alert_routes import register_alerts
from .cache_routes import register_cache
from .dashboard import OPEN_PREFIXES, PAGE_PATH, register_dashboard
from .health_routes import register_health
from .history_routes import register_history
from .openapi import OPENAPI_PATH, add_openapi_route
from .pin_routes import register_pins
from .portfolio_routes import register_portfolios
from .responses import PREFIX, error_response

if TYPE_CHECKING:
    from .app import RelayContext

__all__ = ["create_rest_app", "PREFIX"]

log = logging.getLogger("trio_relay.api.rest")

MAX_BODY = 64 * 1024


def _unauthorized(message: str) -> Response:
    response = error_response(401, "unauthorized", message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="trio-relay", error="invalid_token"'
    return response


def create_rest_app(ctx: RelayContext) -> QuartTrio:
    app = QuartTrio("trio_relay")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False  # type: ignore[attr-defined]
    register_dashboard(app)  # the web page at / and its files at /static/
    register_history(app, ctx)  # /history/{symbol} and /bars/{symbol}
    register_portfolios(app, ctx)  # /portfolios...
    register_alerts(app, ctx)  # /alerts...
    register_health(app, ctx)  # /health, /health/ready, /health/live, /status, /metrics
    register_pins(app, ctx)  # /subscribe, /unsubscribe
    register_cache(app, ctx)  # /cache, /cache/{symbol}

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

    @app.before_request
    async def guard() -> Response | None:
        """Rate limit per client IP, then (auth on) a valid Bearer token and, for pins, the admin scope."""
        return await _guard(ctx, open_paths, admin_paths)

    @app.after_request
    async def security_headers(response: Response) -> Response:
        _set_security_headers(response, tls=bool(security.config.server.tls_certfile))
        return response

    @app.errorhandler(Exception)
    async def internalerror_response(exc: Exception) -> Response:
        log.exception("[REST] %s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the relay's log")

    add_openapi_route(app, security, open_paths=open_paths, open_exact=(PAGE_PATH,), admin_paths=admin_paths)
    return app


async def _guard(ctx: RelayContext, open_paths: tuple[str, ...], admin_paths: tuple[str, ...]) -> Response | None:
    """The guard of every request: None lets it through (with ``g.principal`` set), else the answer."""
    security = ctx.security
    path = request.path
    g.principal = OPEN
    if path == PAGE_PATH or path.startswith(open_paths):
        return None
    wait = security.rest_allowed(ctx.client_ip(request.scope.get("client")), trio.current_time())
    if wait:
        response = error_response(429, "rate_limited", "too many requests; slow down")
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response
    if not security.auth.enabled:
        try:
            g.principal = open_principal(request.headers.get(BROWSER_HEADER))
        except AuthError as exc:
            return error_response(400, "invalid_browser", exc.reason)
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


def _set_security_headers(response: Response, *, tls: bool) -> None:
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
    headers.setdefault("Cache-Control", "no-store")
    if tls:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")
