"""Queries over the stored ticks (the REST history routes and bars rebuilt from history).

The store has a connection of its own, apart from the writer's: a query never waits behind a
batch being written, nor a batch behind a query (SQLite in WAL mode reads while it writes). The
connection is opened on the first query and used by one worker thread at a time; when the
database fails, the query raises :class:`~trio_relay.history.base.HistoryUnavailable` and the
next one connects again (a query that finds its connection dead is retried once on a new one).

Pages are ordered by ``(timestamp, id)``, ``id`` being the row's insertion number, and the cursor
is the position of the last row returned: following cursors yields every stored row of the
window exactly once, without gaps or duplicates, while rows are being added after the window's
end or before its start. (A late tick inserted behind a cursor already passed is not seen by
that walk.)
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import trio

from .base import HistoryBackend, HistoryConnection, HistoryUnavailable, Tick, TradeRow, decode_cursor, encode_cursor

__all__ = ["HistoryStore"]

T = TypeVar("T")


class HistoryStore:
    """Read access to the history: ``async with HistoryStore(backend) as store: ...``."""

    def __init__(self, backend: HistoryBackend) -> None:
        self.backend = backend
        self._conn: HistoryConnection | None = None
        self._closed = False
        self._limiter = trio.CapacityLimiter(1)  # one thread at a time uses the connection

    async def __aenter__(self) -> HistoryStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def ticks(
        self, symbol: str, start_ms: int, end_ms: int, limit: int = 1000, *, after: str | None = None
    ) -> tuple[list[Tick], str | None]:
        """The ticks of ``symbol`` with ``start_ms <= timestamp < end_ms``, at most ``limit``.

        Returns the page and the cursor of the next one (None when this page is the last). Pass
        the cursor as ``after`` with the same window to continue. Raises
        :class:`~trio_relay.history.base.InvalidCursor` (a ValueError) for a cursor this store
        did not make, :class:`~trio_relay.history.base.HistoryUnavailable` when the database
        cannot be used.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (got {limit})")
        position = decode_cursor(after) if after is not None else None
        # One row more than asked says whether there is a next page.
        rows = await self._call(lambda conn: conn.ticks(symbol, start_ms, end_ms, limit + 1, position))
        if len(rows) > limit:
            del rows[limit:]
            return [tick for tick, _ in rows], encode_cursor(rows[-1][1])
        return [tick for tick, _ in rows], None

    async def trades(self, symbol: str, start_ms: int, end_ms: int, *, limit: int | None = None) -> list[TradeRow]:
        """The trades (``kind == "T"`` with a price) of ``symbol`` with ``start_ms <= timestamp < end_ms``.

        ``(symbol, timestamp, price, size)`` tuples (:data:`trio_relay.bars.TradeRow`), in the
        order of :meth:`ticks` (by timestamp, then arrival), at most ``limit`` (None: all).
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 (got {limit})")
        return await self._call(lambda conn: conn.trades(symbol, start_ms, end_ms, limit))

    async def aclose(self) -> None:
        """Close the connection (waits for a query in progress)."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    async def _call(self, query: Callable[[HistoryConnection], T]) -> T:
        # Not abandoned on cancellation: the connection must not be shared by two threads.
        return await trio.to_thread.run_sync(self._run, query, limiter=self._limiter)

    # -- in the worker thread, under the limiter ---------------------------------------------

    def _run(self, query: Callable[[HistoryConnection], T]) -> T:
        if self._closed:
            raise HistoryUnavailable(f"{self.backend.description}: the history store is closed")
        fresh = self._conn is None
        if self._conn is None:
            self._conn = self.backend.connect()
        try:
            return query(self._conn)
        except HistoryUnavailable:
            self._drop()
            if fresh:
                raise
        # The connection was an old one (the server may have restarted since): once more, anew.
        self._conn = self.backend.connect()
        try:
            return query(self._conn)
        except HistoryUnavailable:
            self._drop()
            raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _close(self) -> None:
        self._closed = True
        self._drop()
