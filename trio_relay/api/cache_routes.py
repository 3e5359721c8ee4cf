"""The cache: ``GET /cache`` and ``/cache/{symbol}`` (a fleet answers from its shared cache)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Response
from quart_trio import QuartTrio

from ..entitlements import EntitlementError
from .responses import PREFIX, entitlement, entitlement_error, error_response, json_response

if TYPE_CHECKING:
    from .app import RelayContext

__all__ = ["register_cache"]


def register_cache(app: QuartTrio, ctx: RelayContext) -> None:
    """Add the cache routes to ``app``."""
    hub, security = ctx.hub, ctx.security

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
