"""What a portfolio is worth at the relay's latest prices: :func:`valuate` and :class:`DayOpen`.

**Price used.** A symbol's price is its last trade price; without one, the mid of its bid and ask
(both needed), computed in decimal (:func:`~trio_relay.model.mid_price`: 40.1 and 40.2 give
40.15, never 40.150000000000006); otherwise it is unknown. A price counts only when it is a finite number > 0
(providers send 0 for an empty side of the book).

**Per position** (``q`` quantity, ``cb`` cost basis, ``p`` price, ``o`` day open)::

    cost               = q * cb                       (always known)
    market_value       = q * p
    unrealised_pnl     = market_value - cost
    unrealised_pnl_pct = unrealised_pnl / |cost| * 100          (None when cost is 0)
    day_change         = q * (p - o)                            (None without a day open)
    day_change_pct     = (p - o) / o * 100

A short position (``q < 0``) has a negative cost and market value; its P&L is positive when the
price falls, and its percentage is relative to ``|cost|``. Day change uses today's quantity for the
whole day (the relay does not know when the position was opened).

**Totals** are over the positions that have a price (the others are counted in ``unpriced``, and
listed with their cost and ``null`` for everything that needs a price): ``market_value`` and
``cost`` are sums, ``unrealised_pnl = market_value - cost``, ``unrealised_pnl_pct`` is relative to
the *gross* cost ``sum(|cost|)`` (so longs and shorts do not cancel out; None when it is 0), and
``day_change`` sums the positions that also have a day open. A total that no position contributes
to is ``null`` (an empty portfolio's totals are all ``null``).

**Rounding.** Everything is computed in binary floating point, unrounded; each derived amount and
percentage (costs, market values, P&L, day changes, their percentages, totals) is then rounded once,
with ``round(x, 6)``, as it is put into the :class:`Valuation`. Totals are computed from the
unrounded per-position values. Inputs (quantity, cost basis, a last trade price, day open) pass
through as they are; a mid price has at most one decimal more than the quotes it is made of. So ``100 * 155.5`` is ``15550.0`` and ``550 / 15000 * 100`` is ``3.666667``, exactly.

**Day open.** The relay has no official previous close: :class:`DayOpen` remembers the first price
it saw of each symbol in the current UTC day, and "day change" is relative to that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Final

import msgspec

from ..model import PriceState, mid_price, wall_ms
from .model import Portfolio, Position

__all__ = ["valuate", "price_of", "Valuation", "PositionValue", "Totals", "DayOpen", "DECIMALS"]

DECIMALS: Final = 6
DAY_MS: Final = 86_400_000


class PositionValue(msgspec.Struct, kw_only=True):
    """One position, valued. ``price_source`` is ``"last"`` or ``"mid"``; ``price_time`` is the
    symbol's latest event time (UTC epoch ms). Everything that needs a price is None without one."""

    symbol: str
    quantity: float
    cost_basis: float
    price: float | None
    price_source: str | None
    price_time: int | None
    market_value: float | None
    cost: float
    unrealised_pnl: float | None
    unrealised_pnl_pct: float | None
    day_open: float | None
    day_change: float | None
    day_change_pct: float | None
    # False: the caller's token does not allow this symbol, so nothing that needs its price is
    # shown (it counts as unpriced).
    entitled: bool = True


class Totals(msgspec.Struct, kw_only=True):
    market_value: float | None
    cost: float | None
    unrealised_pnl: float | None
    unrealised_pnl_pct: float | None
    day_change: float | None
    unpriced: int  # positions without a price, left out of the sums


class Valuation(msgspec.Struct, kw_only=True):
    """The ``portfolio`` message; its field order is the wire format (``msgspec.json.encode``)."""

    type: str = "portfolio"
    name: str
    positions: list[PositionValue]
    totals: Totals
    as_of: int  # when it was computed, UTC epoch ms


def _usable(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def price_of(state: PriceState) -> tuple[float, str] | None:
    """``(price, "last" | "mid")`` of a symbol's merged state, or None when unknown."""
    last = state.last_price
    if last is not None and _usable(last):
        return last, "last"
    bid, ask = state.bid_price, state.ask_price
    if bid is not None and ask is not None and _usable(bid) and _usable(ask):
        return mid_price(bid, ask), "mid"
    return None


def _r(x: float) -> float:
    return round(x, DECIMALS) + 0.0  # + 0.0: never "-0.0" on the wire


def _r_opt(x: float | None) -> float | None:
    return None if x is None else _r(x)


class _Sums:
    """The running totals of a valuation (unrounded until :meth:`totals`)."""

    def __init__(self) -> None:
        self.market_value = self.cost = self.gross_cost = self.day_change = 0.0
        self.priced = self.with_day = self.unpriced = 0

    def add(self, value: float, cost: float, change: float | None) -> None:
        self.priced += 1
        self.market_value += value
        self.cost += cost
        self.gross_cost += abs(cost)
        if change is not None:
            self.day_change += change
            self.with_day += 1

    def totals(self) -> Totals:
        priced = self.priced
        pnl = self.market_value - self.cost
        return Totals(
            market_value=_r(self.market_value) if priced else None,
            cost=_r(self.cost) if priced else None,
            unrealised_pnl=_r(pnl) if priced else None,
            unrealised_pnl_pct=_r(pnl / self.gross_cost * 100) if self.gross_cost else None,
            day_change=_r(self.day_change) if self.with_day else None,
            unpriced=self.unpriced,
        )


def _unpriced(position: Position, opened: float | None, allowed: bool) -> PositionValue:
    return PositionValue(
        symbol=position.symbol,
        quantity=position.quantity,
        cost_basis=position.cost_basis,
        price=None,
        price_source=None,
        price_time=None,
        market_value=None,
        cost=_r(position.quantity * position.cost_basis),
        unrealised_pnl=None,
        unrealised_pnl_pct=None,
        day_open=opened,
        day_change=None,
        day_change_pct=None,
        entitled=allowed,
    )


def _priced(
    position: Position, price: float, source: str, state: PriceState, opened: float | None, sums: _Sums
) -> PositionValue:
    q = position.quantity
    cost = q * position.cost_basis
    value = q * price
    pnl = value - cost
    change: float | None = None
    change_pct: float | None = None
    if opened is not None:
        change = q * (price - opened)
        change_pct = (price - opened) / opened * 100
    sums.add(value, cost, change)
    return PositionValue(
        symbol=position.symbol,
        quantity=q,
        cost_basis=position.cost_basis,
        price=price,
        price_source=source,
        price_time=state.timestamp or None,
        market_value=_r(value),
        cost=_r(cost),
        unrealised_pnl=_r(pnl),
        unrealised_pnl_pct=_r(pnl / abs(cost) * 100) if cost else None,
        day_open=opened,
        day_change=_r_opt(change),
        day_change_pct=_r_opt(change_pct),
    )


def valuate(
    portfolio: Portfolio,
    prices: Mapping[str, PriceState],
    day_open: Mapping[str, float],
    *,
    as_of: int | None = None,
    entitled: Callable[[str], bool] | None = None,
) -> Valuation:
    """Value ``portfolio`` at ``prices`` (the hub's cache) against ``day_open`` (a :class:`DayOpen`).

    See the module docstring for the formulas and the rounding. ``as_of`` defaults to the wall
    clock. Pure: reads the mappings, changes nothing. ``entitled(symbol)`` False (the viewer's
    token does not allow it, :mod:`trio_relay.entitlements`): the position is valued as if it had
    no price and no day open, with ``entitled=False``; None: every symbol is allowed.
    """
    rows: list[PositionValue] = []
    sums = _Sums()
    for position in portfolio.positions:
        symbol = position.symbol
        allowed = entitled is None or entitled(symbol)
        state = prices.get(symbol) if allowed else None
        found = price_of(state) if state is not None else None
        opened = day_open.get(symbol) if allowed else None
        if opened is not None and not _usable(opened):
            opened = None
        if state is None or found is None:
            sums.unpriced += 1
            rows.append(_unpriced(position, opened, allowed))
        else:
            rows.append(_priced(position, *found, state, opened, sums))
    if as_of is None:
        as_of = wall_ms()
    return Valuation(name=portfolio.name, positions=rows, totals=sums.totals(), as_of=as_of)


class DayOpen(Mapping[str, float]):
    """The first price the relay saw of each symbol in the current UTC day: ``symbol → price``.

    Feed it every merged state the hub produces (:meth:`observe`); the price is chosen as in
    :func:`price_of`. The day is the UTC day of the events' own timestamps, so a replay values
    against the recorded days. The first event of a later day starts that day and forgets every
    older open (memory: one float per symbol seen today); an event of an earlier day (late) is
    ignored. :meth:`roll` starts a new day from the wall clock, for a caller that wants opens to
    disappear at midnight even for symbols that have not traded since.

    The relay has no official previous close: "day change" is relative to this first price, which
    depends on when the relay started and which symbols it was receiving.
    """

    def __init__(self) -> None:
        self._day: int | None = None
        self._opens: dict[str, float] = {}

    @property
    def day(self) -> int | None:
        """The current UTC day (days since the epoch), None before the first price."""
        return self._day

    def observe(self, state: PriceState) -> None:
        """Take note of ``state`` (a hub cache entry, just updated). Cheap: one dict lookup."""
        if state.symbol in self._opens and state.timestamp // DAY_MS == self._day:
            return  # the usual case on the hub's path: today's open is known already
        found = price_of(state)
        if found is not None:
            self.record(state.symbol, found[0], state.timestamp)

    def record(self, symbol: str, price: float, timestamp_ms: int) -> None:
        """``price`` of ``symbol`` at ``timestamp_ms`` (UTC epoch ms; <= 0: unknown, ignored)."""
        if timestamp_ms <= 0 or not _usable(price):
            return
        day = timestamp_ms // DAY_MS
        if self._day is None or day > self._day:
            self._day = day
            self._opens = {}
        elif day < self._day:
            return
        self._opens.setdefault(symbol, price)

    def roll(self, now_ms: int) -> None:
        """Start the UTC day of ``now_ms`` if it is later than the current one."""
        day = now_ms // DAY_MS
        if self._day is None or day > self._day:
            self._day = day
            self._opens = {}

    def __getitem__(self, symbol: str) -> float:
        return self._opens[symbol]

    def __iter__(self) -> Iterator[str]:
        return iter(self._opens)

    def __len__(self) -> int:
        return len(self._opens)
