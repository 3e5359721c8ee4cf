"""Queries over the stored ticks (the REST history routes and bars rebuilt from history).

The store has connections of its own, apart from the writer's: a query never waits behind a
batch being written, nor a batch behind a query (SQLite in WAL mode reads while it writes). Up to
``budget.concurrency`` queries run at once, each in a worker thread with a connection of its
own (opened on first use, kept idle for the next query); a request that finds every slot taken
for ``budget.queue_timeout`` gets :class:`~trio_relay.history.base.HistoryBusy`. So a heavy
query costs the event loop nothing but the wait, and at most ``concurrency`` threads of work.
When the database fails, the query raises :class:`~trio_relay.history.base.HistoryUnavailable`
and the next one connects again (a query that finds its connection dead is retried once on a
new one).

Pages are ordered by ``(timestamp, id)``, ``id`` being the row's insertion number, and the cursor
is the position of the last row returned: following cursors yields every stored row of the
window exactly once, without gaps or duplicates, while rows are being added after the window's
end or before its start. (A late tick inserted behind a cursor already passed is not seen by
that walk.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import attrs
import trio

from ..bars import BarsPageResult, Lateness, bars_from_sorted_trades
from .base import (
    HistoryBackend,
    HistoryBusy,
    HistoryConnection,
    HistoryUnavailable,
    Tick,
    TradeRow,
    decode_cursor,
    encode_cursor,
)

__all__ = ["HistoryStore", "QueryBudget"]

T = TypeVar("T")

# Trades read from the cursor at a time by a bars query: the memory it holds, how often its row
# and time budgets are checked, and how often it offers the GIL to the event loop (below).
BARS_BATCH = 500


@attrs.frozen
class QueryBudget:
    """What one history request may cost (``[history]`` query_* keys; see config.py)."""

    concurrency: int = 2  # queries running at once (worker threads, one connection each)
    queue_timeout: float = 5.0  # seconds a query waits for a free slot, then HistoryBusy
    timeout: float = 5.0  # seconds of work per query (bars: a truncated page; ticks: QueryTimeout)
    max_rows: int = 1_000_000  # trades a bars query reads per page (then a truncated page)


class HistoryStore:
    """Read access to the history: ``async with HistoryStore(backend) as store: ...``."""

    def __init__(
        self, backend: HistoryBackend, budget: QueryBudget | None = None, lateness: Lateness | None = None
    ) -> None:
        self.backend = backend
        self.budget = budget or QueryBudget()
        self.lateness = lateness or Lateness()  # the live bars' rule (one per relay: [bars])
        self._idle: list[HistoryConnection] = []  # connections between two queries
        self._lock = threading.Lock()  # guards _idle and _closed (worker threads share them)
        self._closed = False
        self._limiter = trio.CapacityLimiter(self.budget.concurrency)

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

        ``(symbol, timestamp, price, size, recv_ms)`` tuples (:data:`trio_relay.bars.TradeRow`), in the
        order of :meth:`ticks` (by timestamp, then arrival), at most ``limit`` (None: all: only
        for callers that know the window is small; requests use :meth:`bars`).
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 (got {limit})")
        return await self._call(lambda conn: conn.trades(symbol, start_ms, end_ms, limit))

    async def bars(
        self,
        symbol: str,
        interval: str,
        start_ms: int,
        end_ms: int,
        limit: int,
        *,
        now_ms: int,
        window_start: int | None = None,
    ) -> BarsPageResult:
        """Up to ``limit`` ``interval`` bars of ``symbol``'s trades in ``[start_ms, end_ms)``.

        ``start_ms`` on an interval boundary. The trades the store's :class:`~trio_relay.bars.Lateness`
        leaves out are left out here too, and ``complete`` is its rule over ``[window_start,
        end_ms)`` (default ``start_ms``) at wall-clock ``now_ms``. Computed in a worker thread while the trades stream
        from the database cursor (:func:`~trio_relay.bars.bars_from_sorted_trades`): memory is
        one batch and the bars, whatever the window. Within the budget (``max_rows`` trades,
        ``timeout`` seconds), else a page ``truncated`` at the bar being read (its
        ``next_start``), or :class:`~trio_relay.bars.BudgetExceeded` if no bar was finished.
        """
        budget = self.budget

        def keep_going(read: int, deadline: float) -> bool:
            # Building bars is Python code: it holds the GIL, and the event loop thread waits for
            # it up to the interpreter's switch interval (5 ms) each time it wakes. Letting go
            # after each batch (~1-2 ms of work) hands it over sooner: measured with a 1 ms timer
            # on the loop, p99 lateness 9-15 ms with batches of 2,000 and no yield, 5-8 ms so.
            time.sleep(0)
            return read < budget.max_rows and time.monotonic() < deadline

        def query(conn: HistoryConnection) -> BarsPageResult:
            deadline = time.monotonic() + budget.timeout
            # The budget is checked between batches (BARS_BATCH trades), at the database inside one.
            batches = conn.trade_batches(symbol, start_ms, end_ms, BARS_BATCH, deadline)
            try:
                return bars_from_sorted_trades(
                    batches,
                    interval,
                    start_ms,
                    end_ms,
                    limit,
                    lateness=self.lateness,
                    now_ms=now_ms,
                    window_start=window_start,
                    keep_going=lambda read: keep_going(read, deadline),
                )
            finally:
                batches.close()  # type: ignore[attr-defined]  # a generator: ends its cursor now

        return await self._call(query)

    async def aclose(self) -> None:
        """Close the connections (a query in progress closes its own when it ends)."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._close)

    async def _call(self, query: Callable[[HistoryConnection], T]) -> T:
        with trio.move_on_after(self.budget.queue_timeout) as waited:
            await self._limiter.acquire()
        if waited.cancelled_caught:
            raise HistoryBusy(f"all {self.budget.concurrency} history query slots are busy; try again")
        try:
            # Not abandoned on cancellation: a connection must not be used by two threads.
            return await trio.to_thread.run_sync(self._run, query)
        finally:
            self._limiter.release()

    # -- in a worker thread, holding a slot ----------------------------------------------------

    def _take(self) -> tuple[HistoryConnection, bool]:
        with self._lock:
            if self._closed:
                raise HistoryUnavailable(f"{self.backend.description}: the history store is closed")
            if self._idle:
                return self._idle.pop(), False
        return self.backend.connect(), True

    def _give_back(self, conn: HistoryConnection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _run(self, query: Callable[[HistoryConnection], T]) -> T:
        conn, fresh = self._take()
        try:
            result = query(conn)
        except HistoryUnavailable:
            conn.close()
            if fresh:
                raise
        except BaseException:
            self._give_back(conn)  # the request's fault (a budget, a bad value): the connection is fine
            raise
        else:
            self._give_back(conn)
            return result
        # The connection was an old one (the server may have restarted since): once more, anew.
        conn = self.backend.connect()
        try:
            result = query(conn)
        except HistoryUnavailable:
            conn.close()
            raise
        except BaseException:
            self._give_back(conn)
            raise
        self._give_back(conn)
        return result

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
