"""REST routes for alerts (per user: the token's subject, or "anonymous" with auth off).

- ``GET /alerts``: the user's rules and their latest fired alerts.
- ``POST /alerts`` with a rule, e.g. ``{"type":"above","symbol":"AAPL","level":190}``.
- ``DELETE /alerts/{rule_id}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from quart import Response, g, request
from quart_trio import QuartTrio

from ..alerts import FiredAlert, RuleError
from ..entitlements import EntitlementError
from ..jsonbody import JsonError, decode_json
from .responses import entitlement, entitlement_error, error_response, json_response

if TYPE_CHECKING:
    from .app import RelayContext

__all__ = ["register_alerts", "AlertsBody"]


class AlertsBody(msgspec.Struct):
    """The caller's rules (with their state) and latest fired alerts, newest first."""

    rules: list[dict[str, Any]]
    fired: list[FiredAlert]


def _error(exc: RuleError) -> Response:
    status = 404 if exc.code == "not_found" else 422
    return error_response(status, exc.code, exc.message)


def register_alerts(app: QuartTrio, ctx: RelayContext) -> None:
    prefix = "/api/v2/realtime/alerts"

    def service() -> Any:
        if ctx.alerts is None:
            raise RuleError("not_found", "alerts are off on this relay (alerts.enabled = false)")
        return ctx.alerts

    @app.get(prefix)
    async def alerts_list() -> Response:
        """The caller's alert rules and their latest fired alerts (query `limit`, default 50)."""
        try:
            svc = service()
            owner = str(g.principal.subject)
            raw = request.args.get("limit", "50")
            limit = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 4 and 0 < int(raw) <= 1000 else 50
            allows = entitlement(ctx.security).allows
            # A fired alert carries a price: not shown to a token that no longer allows its symbol.
            fired = [f for f in await svc.fired(owner, limit=limit) if allows(f.symbol)]
        except RuleError as exc:
            return _error(exc)
        return json_response(AlertsBody([msgspec.to_builtins(r) for r in svc.rules(owner)], fired))

    @app.post(prefix)
    async def alerts_create() -> Response:
        """Create a rule: above / below (level, field), move (pct, window_s), spread (max_spread or
        max_spread_bps), stale (seconds)."""
        try:
            svc = service()
            try:
                body = decode_json(await request.get_data(), ctx.security.limits.json_max_depth)
            except JsonError as exc:
                raise RuleError(exc.code, exc.message) from None
            if not isinstance(body, dict):
                raise RuleError("invalid_json", "a rule must be a JSON object")
            rule = await svc.create_checked(str(g.principal.subject), body, entitlement(ctx.security))
        except RuleError as exc:
            return _error(exc)
        except EntitlementError as exc:
            return entitlement_error(exc)
        return json_response(msgspec.to_builtins(rule))

    @app.delete(prefix + "/<rule_id>")
    async def alerts_delete(rule_id: str) -> Response:
        """Delete a rule."""
        try:
            service().delete(str(g.principal.subject), rule_id)
        except RuleError as exc:
            return _error(exc)
        return json_response({"status": "deleted", "id": rule_id})
