"""REST routes for portfolios (per user: the token's subject, or "anonymous" with auth off).

- ``GET /portfolios``: the user's portfolios (positions only).
- ``POST /portfolios`` ``{"name":"main","positions":[{"symbol":"AAPL","quantity":100,"cost_basis":150}]}``.
- ``GET /portfolios/{name}``: the portfolio valued now (the same message as the WebSocket channel).
- ``DELETE /portfolios/{name}``.
- ``PUT /portfolios/{name}/positions/{symbol}`` ``{"quantity":100,"cost_basis":150}`` (0 removes it).
- ``DELETE /portfolios/{name}/positions/{symbol}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from quart import Response, g, request
from quart_trio import QuartTrio

from ..entitlements import EntitlementError
from ..jsonbody import JsonError, decode_json
from ..portfolio import Portfolio, PortfolioError, check_name, check_symbol, make_position, valuate
from .responses import entitlement, entitlement_error, error_response, json_response

if TYPE_CHECKING:
    from .app import RelayContext

__all__ = ["register_portfolios", "PortfolioBody", "PortfolioList"]

MAX_BODY_POSITIONS = 1000


class PositionBody(msgspec.Struct, forbid_unknown_fields=True):
    symbol: str
    quantity: float
    cost_basis: float


class PortfolioBody(msgspec.Struct, forbid_unknown_fields=True):
    """A portfolio's positions (not valued)."""

    name: str
    positions: list[PositionBody]


class PortfolioList(msgspec.Struct, forbid_unknown_fields=True):
    portfolios: list[PortfolioBody]


def _error(exc: PortfolioError) -> Response:
    return error_response(exc.status, exc.code, exc.message)


def _body(portfolio: Portfolio) -> PortfolioBody:
    return PortfolioBody(
        portfolio.name, [PositionBody(p.symbol, p.quantity, p.cost_basis) for p in portfolio.positions]
    )


async def _json_object(max_depth: int) -> dict[str, Any]:
    try:
        body = decode_json(await request.get_data(), max_depth)
    except JsonError as exc:
        if exc.code != "invalid_json":
            raise PortfolioError(exc.code, exc.message) from None
        raise PortfolioError("invalid_json", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise PortfolioError("invalid_json", "the body must be a JSON object")
    return body


PREFIX = "/api/v2/realtime/portfolios"


class _PortfolioRoutes:
    """The portfolio routes' views, one method each, over the relay's context (see the module doc)."""

    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx

    def service(self) -> Any:
        if self.ctx.portfolios is None:
            raise PortfolioError("not_found", "portfolios are off on this relay (alerts.enabled = false)")
        return self.ctx.portfolios

    @staticmethod
    def owner() -> str:
        return str(g.principal.subject)

    async def admit(self, symbols: list[str]) -> None:
        """The entitlement check for symbols a user puts in a portfolio (EntitlementError)."""
        ctx, owner = self.ctx, self.owner()
        allowed = entitlement(ctx.security)
        allowed.require(symbols)
        held = {
            p.symbol for portfolio in await self.service().store.list_portfolios(owner) for p in portfolio.positions
        }
        if ctx.alerts is not None:  # one budget: the symbols of their alert rules count too
            held |= ctx.alerts.engine.owner_symbols(owner)
        allowed.require_budget(held, symbols)

    async def portfolios_list(self) -> Response:
        """The caller's portfolios and their positions."""
        try:
            found = await self.service().store.list_portfolios(self.owner())
        except PortfolioError as exc:
            return _error(exc)
        return json_response(PortfolioList([_body(p) for p in found]))

    async def portfolios_create(self) -> Response:
        """Create a portfolio: `{"name":"main","positions":[{"symbol","quantity","cost_basis"}...]}`."""
        try:
            body = await _json_object(self.ctx.security.limits.json_max_depth)
            raw = body.get("positions", [])
            if not isinstance(raw, list) or len(raw) > MAX_BODY_POSITIONS:
                raise PortfolioError("invalid_json", f"'positions' must be a list of at most {MAX_BODY_POSITIONS}")
            positions = []
            for item in raw:
                if not isinstance(item, dict):
                    raise PortfolioError("invalid_json", "each position is an object: symbol, quantity, cost_basis")
                positions.append(make_position(item.get("symbol"), item.get("quantity"), item.get("cost_basis")))
            name = check_name(body.get("name"))
            await self.admit([p.symbol for p in positions])
            created = await self.service().store.create(self.owner(), name, positions)
        except PortfolioError as exc:
            return _error(exc)
        except EntitlementError as exc:
            return entitlement_error(exc)
        return json_response(_body(created))

    async def portfolio_value(self, name: str) -> Response:
        """The portfolio valued now at the relay's prices (as the WebSocket `portfolio` channel sends it)."""
        try:
            svc = self.service()
            portfolio = await svc.store.get(self.owner(), check_name(name))
            if portfolio is None:
                raise PortfolioError("not_found", f"no portfolio {name[:40]!r}")
        except PortfolioError as exc:
            return _error(exc)
        return json_response(
            valuate(portfolio, self.ctx.hub.cache, svc.day_open, entitled=entitlement(self.ctx.security).allows)
        )

    async def portfolio_delete(self, name: str) -> Response:
        """Delete a portfolio (its live streams end with a not_found error)."""
        try:
            svc = self.service()
            checked = check_name(name)
            if not await svc.store.delete(self.owner(), checked):
                raise PortfolioError("not_found", f"no portfolio {name[:40]!r}")
        except PortfolioError as exc:
            return _error(exc)
        svc.changed(self.owner(), checked, None)
        return json_response({"status": "deleted", "name": checked})

    async def position_put(self, name: str, symbol: str) -> Response:
        """Set a position: `{"quantity": 100, "cost_basis": 150.0}` (quantity 0 removes it)."""
        try:
            svc = self.service()
            body = await _json_object(self.ctx.security.limits.json_max_depth)
            position = make_position(symbol, body.get("quantity"), body.get("cost_basis"))
            checked = check_name(name)
            if position.quantity:
                await self.admit([position.symbol])
            portfolio = await svc.store.put_position(self.owner(), checked, position)
        except PortfolioError as exc:
            return _error(exc)
        except EntitlementError as exc:
            return entitlement_error(exc)
        svc.changed(self.owner(), checked, portfolio)
        return json_response(_body(portfolio))

    async def position_delete(self, name: str, symbol: str) -> Response:
        """Remove a position."""
        try:
            svc = self.service()
            checked = check_name(name)
            portfolio = await svc.store.delete_position(self.owner(), checked, check_symbol(symbol))
        except PortfolioError as exc:
            return _error(exc)
        svc.changed(self.owner(), checked, portfolio)
        return json_response(_body(portfolio))


def register_portfolios(app: QuartTrio, ctx: RelayContext) -> None:
    routes = _PortfolioRoutes(ctx)
    app.add_url_rule(PREFIX, "portfolios_list", routes.portfolios_list, methods=["GET"])
    app.add_url_rule(PREFIX, "portfolios_create", routes.portfolios_create, methods=["POST"])
    app.add_url_rule(PREFIX + "/<name>", "portfolio_value", routes.portfolio_value, methods=["GET"])
    app.add_url_rule(PREFIX + "/<name>", "portfolio_delete", routes.portfolio_delete, methods=["DELETE"])
    app.add_url_rule(PREFIX + "/<name>/positions/<symbol>", "position_put", routes.position_put, methods=["PUT"])
    app.add_url_rule(
        PREFIX + "/<name>/positions/<symbol>", "position_delete", routes.position_delete, methods=["DELETE"]
    )
