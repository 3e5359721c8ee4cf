"""Portfolios persisted in the relay's own SQLite file (:class:`~trio_relay.appstore.AppStore`).

The database is the only copy: the store keeps nothing in memory, so every worker process of a
relay (``server.workers > 1``, all on one ``app.sqlite3``) sees the same portfolios, and a limit
is checked in the same write transaction (``BEGIN IMMEDIATE``) as the change it guards, so two
concurrent requests cannot both slip under it.

Tables are prefixed ``pf_``; create them once with :meth:`PortfolioStore.migrate`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Final

from ..appstore import AppStore
from ..config import PortfolioConfig
from .model import Portfolio, PortfolioError, Position, check_name, check_symbol, make_position

__all__ = ["PortfolioStore", "SCHEMA"]

SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS pf_portfolios (
        id INTEGER PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        UNIQUE (owner, name)
    )""",
    """CREATE TABLE IF NOT EXISTS pf_positions (
        portfolio_id INTEGER NOT NULL,
        symbol TEXT NOT NULL,
        quantity REAL NOT NULL,
        cost_basis REAL NOT NULL,
        PRIMARY KEY (portfolio_id, symbol)
    ) WITHOUT ROWID""",
)

_SELECT = """
    SELECT p.owner, p.name, s.symbol, s.quantity, s.cost_basis
    FROM pf_portfolios AS p LEFT JOIN pf_positions AS s ON s.portfolio_id = p.id
"""
_ORDER = " ORDER BY p.owner, p.name, s.symbol"

_Row = tuple[str, str, str | None, float | None, float | None]


def _portfolios(rows: Iterable[_Row]) -> list[Portfolio]:
    """Rows of :data:`_SELECT` (ordered by owner, name, symbol) → portfolios."""
    out: list[Portfolio] = []
    key: tuple[str, str] | None = None
    positions: list[Position] = []
    for owner, name, symbol, quantity, cost_basis in rows:
        if (owner, name) != key:
            if key is not None:
                out.append(Portfolio(key[0], key[1], tuple(positions)))
            key, positions = (owner, name), []
        if symbol is not None and quantity is not None and cost_basis is not None:
            positions.append(Position(symbol, quantity, cost_basis))
    if key is not None:
        out.append(Portfolio(key[0], key[1], tuple(positions)))
    return out


def _fetch(conn: sqlite3.Connection, owner: str, name: str) -> Portfolio | None:
    rows = conn.execute(_SELECT + " WHERE p.owner = ? AND p.name = ?" + _ORDER, (owner, name)).fetchall()
    found = _portfolios(rows)
    return found[0] if found else None


def _portfolio_id(conn: sqlite3.Connection, owner: str, name: str) -> int:
    row = conn.execute("SELECT id FROM pf_portfolios WHERE owner = ? AND name = ?", (owner, name)).fetchone()
    if row is None:
        raise PortfolioError("not_found", f"no portfolio named {name!r}")
    return int(row[0])


def _checked(positions: Iterable[Position], limit: int) -> list[Position]:
    """Positions checked again (they may not come from make_position), zeros dropped, one per symbol."""
    out: dict[str, Position] = {}
    for p in positions:
        checked = make_position(p.symbol, p.quantity, p.cost_basis)
        if checked.symbol in out:
            raise PortfolioError("invalid_symbols", f"{checked.symbol} is listed twice")
        if checked.quantity != 0:
            out[checked.symbol] = checked
    if len(out) > limit:
        raise PortfolioError("position_limit", f"at most {limit} positions per portfolio (got {len(out)})")
    return list(out.values())


class PortfolioStore:
    """Create, read, change and delete portfolios; every method is one transaction.

    ``config`` is read at each call (a reload may replace it): a lowered limit keeps what exists
    and refuses only additions beyond it.
    """

    def __init__(self, app: AppStore, config: PortfolioConfig) -> None:
        self.app = app
        self.config = config

    def __repr__(self) -> str:
        return f"PortfolioStore({self.app!r})"

    async def migrate(self) -> None:
        """Create the ``pf_`` tables if missing; call once before anything else."""
        await self.app.migrate(SCHEMA)

    async def create(self, owner: str, name: str, positions: Iterable[Position] = ()) -> Portfolio:
        """A new portfolio. Zero quantities are dropped; a symbol listed twice is refused.

        Raises :class:`PortfolioError`: ``invalid_*``, ``portfolio_exists``, ``portfolio_limit``,
        ``position_limit``.
        """
        name = check_name(name)
        max_portfolios = self.config.max_portfolios_per_user
        wanted = _checked(positions, self.config.max_positions_per_portfolio)

        def run(conn: sqlite3.Connection) -> Portfolio:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                if conn.execute("SELECT 1 FROM pf_portfolios WHERE owner = ? AND name = ?", (owner, name)).fetchone():
                    raise PortfolioError("portfolio_exists", f"a portfolio named {name!r} already exists")
                (count,) = conn.execute("SELECT count(*) FROM pf_portfolios WHERE owner = ?", (owner,)).fetchone()
                if count >= max_portfolios:
                    raise PortfolioError("portfolio_limit", f"at most {max_portfolios} portfolios per user")
                cur = conn.execute("INSERT INTO pf_portfolios (owner, name) VALUES (?, ?)", (owner, name))
                conn.executemany(
                    "INSERT INTO pf_positions (portfolio_id, symbol, quantity, cost_basis) VALUES (?, ?, ?, ?)",
                    [(cur.lastrowid, p.symbol, p.quantity, p.cost_basis) for p in wanted],
                )
            return Portfolio(owner, name, tuple(sorted(wanted, key=lambda p: p.symbol)))

        return await self.app.call(run)

    async def list_portfolios(self, owner: str) -> list[Portfolio]:
        """The owner's portfolios, by name."""

        def run(conn: sqlite3.Connection) -> list[Portfolio]:
            return _portfolios(conn.execute(_SELECT + " WHERE p.owner = ?" + _ORDER, (owner,)).fetchall())

        return await self.app.call(run)

    async def held_symbols(self, owner: str) -> set[str]:
        """The distinct symbols of all the owner's portfolios (what counts against their symbol budget)."""
        return {p.symbol for portfolio in await self.list_portfolios(owner) for p in portfolio.positions}

    async def get(self, owner: str, name: str) -> Portfolio | None:
        """The portfolio, or None if the owner has none of that name."""
        return await self.app.call(lambda conn: _fetch(conn, owner, name))

    async def delete(self, owner: str, name: str) -> bool:
        """Delete the portfolio and its positions; False if there was none."""

        def run(conn: sqlite3.Connection) -> bool:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    pid = _portfolio_id(conn, owner, name)
                except PortfolioError:
                    return False
                conn.execute("DELETE FROM pf_positions WHERE portfolio_id = ?", (pid,))
                conn.execute("DELETE FROM pf_portfolios WHERE id = ?", (pid,))
                return True

        return await self.app.call(run)

    async def put_position(self, owner: str, name: str, position: Position) -> Portfolio:
        """Set the position of ``position.symbol`` (insert or replace); quantity 0 removes it.

        Returns the portfolio as it now is. Raises :class:`PortfolioError`: ``invalid_*``,
        ``not_found`` (no such portfolio), ``position_limit`` (a new symbol beyond the limit;
        changing a held one is always allowed).
        """
        p = make_position(position.symbol, position.quantity, position.cost_basis)
        limit = self.config.max_positions_per_portfolio

        def run(conn: sqlite3.Connection) -> Portfolio:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                pid = _portfolio_id(conn, owner, name)
                if p.quantity == 0:
                    conn.execute("DELETE FROM pf_positions WHERE portfolio_id = ? AND symbol = ?", (pid, p.symbol))
                else:
                    held = conn.execute(
                        "SELECT 1 FROM pf_positions WHERE portfolio_id = ? AND symbol = ?", (pid, p.symbol)
                    ).fetchone()
                    if not held:
                        (count,) = conn.execute(
                            "SELECT count(*) FROM pf_positions WHERE portfolio_id = ?", (pid,)
                        ).fetchone()
                        if count >= limit:
                            raise PortfolioError("position_limit", f"at most {limit} positions per portfolio")
                    conn.execute(
                        "INSERT OR REPLACE INTO pf_positions (portfolio_id, symbol, quantity, cost_basis) VALUES (?, ?, ?, ?)",
                        (pid, p.symbol, p.quantity, p.cost_basis),
                    )
                portfolio = _fetch(conn, owner, name)
            assert portfolio is not None  # the portfolio exists: we hold the write lock
            return portfolio

        return await self.app.call(run)

    async def delete_position(self, owner: str, name: str, symbol: str) -> Portfolio:
        """Remove ``symbol`` from the portfolio; returns the portfolio as it now is.

        Raises :class:`PortfolioError` ``not_found`` when there is no such portfolio or it does
        not hold the symbol (``invalid_symbols`` for a malformed one).
        """
        sym = check_symbol(symbol)

        def run(conn: sqlite3.Connection) -> Portfolio:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                pid = _portfolio_id(conn, owner, name)
                cur = conn.execute("DELETE FROM pf_positions WHERE portfolio_id = ? AND symbol = ?", (pid, sym))
                if cur.rowcount == 0:
                    raise PortfolioError("not_found", f"portfolio {name!r} holds no {sym}")
                portfolio = _fetch(conn, owner, name)
            assert portfolio is not None
            return portfolio

        return await self.app.call(run)

    async def load_all(self) -> list[Portfolio]:
        """Every portfolio of every owner (by owner, then name): the start-up load."""
        return await self.app.call(lambda conn: _portfolios(conn.execute(_SELECT + _ORDER).fetchall()))
