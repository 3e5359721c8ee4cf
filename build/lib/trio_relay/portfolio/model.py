"""Portfolios and positions, and the validation every way into the store goes through.

A position is ``quantity`` units of ``symbol`` bought (or, negative, sold short) at ``cost_basis``
per unit. A portfolio is ``(owner, name, positions)``; ``owner`` is the token's ``sub`` (or
``"anonymous"``), ``name`` is unique per owner, and a symbol appears at most once in it.

Validation raises :class:`PortfolioError` with a machine-readable ``code`` and a message for
people. Inputs are taken as ``object`` so that values straight out of a JSON body can be passed in:
a wrong type is reported the same way as a wrong value, naming the field.
"""

from __future__ import annotations

import math
import re
from typing import Final

import msgspec

from ..model import SYMBOL_RE

__all__ = [
    "Position",
    "Portfolio",
    "PortfolioError",
    "make_position",
    "check_name",
    "check_symbol",
    "MAX_QUANTITY",
    "NAME_RE",
]

# Beyond this a quantity (or a cost per unit) is a typo, not a holding.
MAX_QUANTITY: Final = 1e12
MAX_COST_BASIS: Final = 1e12
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,40}$")

_SYMBOL_RULE = "a symbol is 1-20 of A-Z 0-9 . - / ^ = starting with a letter, a digit or ^"

# The HTTP status a REST route should answer each code with (the relay answers a bad or
# over-the-limit request with 422, as it does for invalid_symbols / too_many_symbols).
_STATUS: Final = {"not_found": 404, "portfolio_exists": 409}


class PortfolioError(Exception):
    """A request about a portfolio cannot be done; nothing was changed.

    Codes: ``invalid_symbols``, ``invalid_quantity``, ``invalid_cost_basis``, ``invalid_name``,
    ``portfolio_limit``, ``position_limit`` (422); ``not_found`` (404); ``portfolio_exists`` (409).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        """The HTTP status for this error (see the class docstring)."""
        return _STATUS.get(self.code, 422)


class Position(msgspec.Struct, frozen=True):
    """``quantity`` (negative: short) units of ``symbol`` at ``cost_basis`` per unit (>= 0).

    Build one from untrusted input with :func:`make_position`; the store checks again anyway.
    """

    symbol: str
    quantity: float
    cost_basis: float


class Portfolio(msgspec.Struct, frozen=True):
    """A user's named portfolio; ``positions`` are sorted by symbol, one per symbol, none zero."""

    owner: str
    name: str
    positions: tuple[Position, ...] = ()

    @property
    def symbols(self) -> frozenset[str]:
        """The symbols held (long or short): what a portfolio subscriber must be notified of."""
        return frozenset(p.symbol for p in self.positions)

    def position(self, symbol: str) -> Position | None:
        for p in self.positions:
            if p.symbol == symbol:
                return p
        return None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_symbol(raw: object) -> str:
    """``raw`` as a symbol: stripped and upper-cased like every symbol the relay accepts."""
    if not isinstance(raw, str):
        raise PortfolioError("invalid_symbols", f"symbol must be a string (got {_shown(raw)})")
    symbol = raw.strip().upper()
    if not SYMBOL_RE.match(symbol):
        raise PortfolioError("invalid_symbols", f"invalid symbol {_shown(raw[:24])}: {_SYMBOL_RULE}")
    return symbol


def check_name(raw: object) -> str:
    """``raw`` as a portfolio name: 1-40 of ``A-Z a-z 0-9 _ -``, case kept (``Main`` != ``main``)."""
    if not isinstance(raw, str) or not NAME_RE.match(raw):
        raise PortfolioError(
            "invalid_name", f"a portfolio name is 1-40 characters of A-Z a-z 0-9 _ - (got {_shown(raw)})"
        )
    return raw


def _number(raw: object) -> float | None:
    """A JSON number as a float (None: not a number, or too large to be one)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    try:
        return float(raw)
    except OverflowError:  # an int beyond the float range
        return None


def make_position(symbol: object, quantity: object, cost_basis: object) -> Position:
    """A checked :class:`Position`: the symbol normalized, the numbers as floats.

    ``quantity`` is any finite number with ``|quantity| <= 1e12``; 0 is valid and means "no
    position" (:meth:`PortfolioStore.put_position <trio_relay.portfolio.PortfolioStore.put_position>`
    removes the symbol). ``cost_basis`` is the price paid per unit: finite, ``0 <= cost_basis <= 1e12``.
    """
    sym = check_symbol(symbol)
    q = _number(quantity)
    if q is None or not math.isfinite(q) or abs(q) > MAX_QUANTITY:
        raise PortfolioError(
            "invalid_quantity",
            f"quantity of {sym} must be a number between -1e12 and 1e12 (negative: short; 0: remove) "
            f"(got {_shown(quantity)})",
        )
    cb = _number(cost_basis)
    if cb is None or not math.isfinite(cb) or not 0 <= cb <= MAX_COST_BASIS:
        raise PortfolioError(
            "invalid_cost_basis",
            f"cost_basis of {sym} must be the price paid per unit, a number between 0 and 1e12 "
            f"(got {_shown(cost_basis)})",
        )
    return Position(sym, q + 0.0, cb + 0.0)  # + 0.0: no -0.0
