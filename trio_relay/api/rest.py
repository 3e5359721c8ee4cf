"""REST routes under ``/api/v2/realtime`` (Quart-Trio). Errors are JSON, never a stack trace."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import msgspec
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import make_registry, render
from .ws import ProtocolError, parse_symbols

if TYPE_CHECKING:
    from .app import RelayContext

__all__ = ["create_rest_app", "PREFIX"]

log = logging.getLogger("trio_relay.api.rest")

PREFIX = "/api/v2/realtime"
MAX_BODY = 64 * 1024
MAX_CLIENTS_LISTED = 1000

_encoder = msgspec.json.Encoder()


def _json(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status=status, mimetype="application/json")


def _error(status: int, code: str, message: str) -> Response:
    return _json({"error": code, "message": message}, status)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def create_rest_app(ctx: RelayContext) -> QuartTrio:
    app = QuartTrio("trio_relay")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False  # type: ignore[attr-defined]
    hub, upstream = ctx.hub, ctx.upstream

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        return _error(exc.code or 500, code, exc.description or exc.name or "error")

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("[REST] %s %s failed", request.method, request.path)
        return _error(500, "internal_error", "internal error; see the relay's log")

    def health_body() -> tuple[dict[str, Any], bool]:
        fresh = upstream.is_fresh()
        age = upstream.message_age()
        body: dict[str, Any] = {
            "status": "ok" if fresh else "unavailable",
            "provider": ctx.provider_name,
            "state": upstream.state,
            "last_message_age_s": _round(age),
            "reconnects": upstream.reconnects,
            "clients": len(hub.clients),
        }
        if not fresh:
            # "code" is for machines (alert rules), "reason" for people.
            body["code"] = "stale" if upstream.state == "connected" else upstream.state
            if upstream.state == "connected":
                body["reason"] = f"stale: no upstream message for {age or 0:.0f}s"
            elif upstream.state == "auth_failed":
                body["reason"] = f"auth_failed: {upstream.last_error}"
            elif upstream.last_error:
                body["reason"] = f"{upstream.state}: {upstream.last_error}"
            else:
                body["reason"] = upstream.state
        if upstream.failover:
            body["failover"] = failover_body()
        if ctx.provider_name == "sim":
            body["note"] = "simulated market data (no FMP_API_KEY set)"
        return body, fresh

    def failover_body() -> dict[str, Any]:
        chain = upstream.chain
        return {
            "active": upstream.provider.name,
            "preferred": chain[0].provider.name,
            "on_preferred": upstream.active == 0,
            "switches": upstream.switches,
            "reason": upstream.switch_reason or None,
        }

    @app.get(PREFIX + "/health")
    async def health() -> Response:
        body, fresh = health_body()
        return _json(body, 200 if fresh else 503)

    @app.get(PREFIX + "/health/ready")
    async def ready() -> Response:
        """Ready to serve prices: the upstream is connected and fresh (always, for the simulator)."""
        body, fresh = health_body()
        return _json(body, 200 if fresh else 503)

    registry = make_registry(ctx)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get(PREFIX + "/health/live")
    async def live() -> Response:
        """The process answers (its event loop runs), whatever the upstream does."""
        return _json({"status": "ok", "pid": os.getpid(), "uptime_s": round(time.time() - ctx.started_at, 1)})

    @app.get(PREFIX + "/status")
    async def status() -> Response:
        now = time.time()
        clients = list(hub.clients.values())
        stats = hub.stats
        body: dict[str, Any] = {
            "provider": ctx.provider_name,
            "upstream": {
                "state": upstream.state,
                "source": upstream.provider.describe(),
                "connected_since": _iso(upstream.connected_since),
                "reconnects": upstream.reconnects,
                "attempts": upstream.attempts,
                "last_error": upstream.last_error or None,
                "last_message_age_s": _round(upstream.message_age()),
                "subscribed": sorted(upstream.subscribed),
                "wanted": sorted(hub.demand.wanted),
                "providers": [
                    {
                        "name": h.provider.name,
                        "active": i == upstream.active,
                        "state": upstream.state if i == upstream.active else h.state,
                        "source": h.provider.describe(),
                        "last_error": (upstream.last_error if i == upstream.active else h.last_error) or None,
                        "probes": h.probes,
                    }
                    for i, h in enumerate(upstream.chain)
                ],
            },
            "failover": failover_body() if upstream.failover else None,
            "pinned": sorted(hub.demand.pinned),
            "clients": {
                "count": len(clients),
                "total_connected": stats.clients_total,
                "slow_closed": stats.slow_clients_closed,
                "subscriptions": [
                    {
                        "id": c.id,
                        "remote": c.remote,
                        "symbols": len(c.symbols),
                        "pending": len(c.outbox),
                        "sent": c.outbox.sent,
                        "conflated": c.outbox.conflated,
                        "batch": c.batch,
                    }
                    for c in clients[:MAX_CLIENTS_LISTED]
                ],
            },
            "messages": {
                "in": stats.updates_in,
                "out": stats.messages_out,
                "dropped": stats.dropped,
                "conflated": hub.conflated_total(),
                "coalesced": stats.coalesced,
                "malformed": stats.malformed,
                "callback_errors": stats.callback_errors,
                "callback_dropped": stats.callback_dropped,
            },
            "cache": {"symbols": len(hub.cache)},
            "pid": os.getpid(),
            "started_at": _iso(ctx.started_at),
            "uptime_s": round(now - ctx.started_at, 1),
        }
        return _json(body)

    async def _symbols_from_body() -> list[str] | Response:
        raw = await request.get_data()
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            return _error(400, "invalid_json", 'body must be JSON: a list of symbols like ["AAPL","MSFT"]')
        if isinstance(body, dict):
            body = body.get("symbols")
        try:
            return parse_symbols(body, hub.config.max_symbols_per_request, field="body")
        except ProtocolError as exc:
            return _error(422, exc.code, exc.message)

    @app.post(PREFIX + "/subscribe")
    async def subscribe() -> Response:
        symbols = await _symbols_from_body()
        if isinstance(symbols, Response):
            return symbols
        hub.pin(symbols)
        log.info("[SUBSCRIBE] REST pinned %s", ",".join(symbols))
        return _json({"status": "subscribed", "symbols": symbols, "pinned": sorted(hub.demand.pinned)})

    @app.post(PREFIX + "/unsubscribe")
    async def unsubscribe() -> Response:
        symbols = await _symbols_from_body()
        if isinstance(symbols, Response):
            return symbols
        was = hub.unpin(symbols)
        log.info("[UNSUBSCRIBE] REST unpinned %s", ",".join(was) or "(none were pinned)")
        return _json(
            {
                "status": "unsubscribed",
                "symbols": was,
                "not_pinned": [s for s in symbols if s not in was],
                "pinned": sorted(hub.demand.pinned),
            }
        )

    @app.get(PREFIX + "/cache")
    async def cache_all() -> Response:
        data = {s: st for s, st in sorted(hub.cache.items()) if st.seq}
        return _json({"count": len(data), "data": data})

    @app.get(PREFIX + "/cache/<symbol>")
    async def cache_one(symbol: str) -> Response:
        symbol = symbol.upper()
        state = hub.snapshot(symbol)
        if state is None:
            return _error(404, "not_found", f"no cached data for {symbol[:24]!r}")
        return _json(state)

    return app
