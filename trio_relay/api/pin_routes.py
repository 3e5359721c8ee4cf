"""Pins: ``POST /subscribe`` and ``/unsubscribe`` hold symbols upstream for everybody (admin scope)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from quart import Response, request
from quart_trio import QuartTrio

from ..entitlements import EntitlementError
from ..jsonbody import JsonError, decode_json
from .responses import PREFIX, entitlement, entitlement_error, error_response, json_response
from .ws import ProtocolError, parse_symbols

if TYPE_CHECKING:
    from .app import RelayContext

__all__ = ["register_pins"]

log = logging.getLogger("trio_relay.api.rest")


def register_pins(app: QuartTrio, ctx: RelayContext) -> None:
    """Add the pin routes to ``app``."""
    hub, security = ctx.hub, ctx.security

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
