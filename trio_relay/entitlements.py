"""The one symbol-entitlement check: every path that shows a price or moves upstream demand calls it.

A token's ``symbols`` claim (see :mod:`trio_relay.auth`) says which symbols its user may see.
Every way to see a price or make the relay want a symbol goes through :class:`Entitlement`:

================================  =====================================================
path                              check
================================  =====================================================
WebSocket subscribe (prices,      :meth:`Entitlement.require` (refused: ``forbidden_symbols``;
bars, the snapshot it sends)      the snapshot is sent only after the check)
REST ``/cache``, ``/cache/{s}``   :meth:`~Entitlement.allows` filters; one symbol: require
REST ``/history``, ``/bars``      require
REST pins (subscribe)             require, and :attr:`~Entitlement.may_pin` (admins only)
alerts: creation (REST, WS)       require + :meth:`~Entitlement.require_budget`; the rule
                                  holds its symbol upstream (``pins``) only when created by
                                  a user who :attr:`may_pin`
alerts: firing                    a connection gets a fired alert only if ITS token allows
                                  the symbol (a webhook relies on the check at creation)
portfolios: creation / position   require + require_budget
portfolios: valuation (REST GET   a position whose symbol the token does not allow is shown
and the WebSocket channel)        without any price (``"entitled": false``); the channel
                                  does not make the relay want it upstream
================================  =====================================================

**Symbol budget.** A user's budget is the smaller of the relay's
``clients.max_symbols_per_client`` and the token's ``max_symbols``. The distinct symbols of the
user's live alert rules and portfolios together may not exceed it (a symbol already held costs
nothing more). Live WebSocket subscriptions have their own cap per connection (``symbol_limit``).

**Who pins.** With auth off (a loopback relay: everyone is its operator) every caller may pin. With
auth on only a token with ``auth.admin_scope``: a non-admin's alert rule fires while the symbol
is wanted for another reason (a subscriber, a pin), and never makes the relay subscribe upstream.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from .auth import Principal
    from .config import Config

__all__ = ["Entitlement", "EntitlementError", "entitlement_for"]

_SHOWN: Final = 10  # refused symbols named in one message


class EntitlementError(Exception):
    """A path refused: ``status`` (403 or 422), ``code`` and ``message`` are safe to show."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@attrs.frozen
class Entitlement:
    """What one principal may see and hold; build it with :func:`entitlement_for`."""

    principal: Principal
    may_pin: bool  # may make the relay hold a symbol upstream for everybody (admins; everyone with auth off)
    symbol_budget: int  # distinct symbols the user may add through alerts, and through portfolios

    @property
    def subject(self) -> str:
        return self.principal.subject

    def allows(self, symbol: str) -> bool:
        """May this user see ``symbol``'s prices (and make the relay want it)?"""
        return self.principal.may_subscribe(symbol)

    def require(self, symbols: Iterable[str]) -> None:
        """Raise :class:`EntitlementError` (403 ``forbidden_symbols``) naming the refused symbols."""
        refused = [s for s in symbols if not self.allows(s)]
        if refused:
            shown = ", ".join(refused[:_SHOWN])
            raise EntitlementError(403, "forbidden_symbols", f"your token does not allow: {shown}")

    def require_pin(self) -> None:
        """Raise 403 ``insufficient_scope`` unless this user may pin."""
        if not self.may_pin:
            raise EntitlementError(403, "insufficient_scope", "only an admin token may hold symbols upstream")

    def require_budget(self, held: Iterable[str], adding: Iterable[str]) -> None:
        """Raise 422 ``symbol_budget`` if ``held`` plus ``adding`` is more distinct symbols than the budget."""
        after = set(held)
        before = len(after)
        after.update(adding)
        if len(after) > self.symbol_budget and len(after) > before:
            raise EntitlementError(
                422,
                "symbol_budget",
                f"at most {self.symbol_budget} distinct symbols per user here; remove some first",
            )


def entitlement_for(principal: Principal, config: Config) -> Entitlement:
    """The :class:`Entitlement` of ``principal`` under ``config`` (its auth and client limits)."""
    budget = config.clients.max_symbols_per_client
    if principal.max_symbols is not None:
        budget = min(budget, principal.max_symbols)
    may_pin = not config.auth.enabled or principal.has_scope(config.auth.admin_scope)
    return Entitlement(principal, may_pin, budget)
