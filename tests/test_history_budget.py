"""Heavy history queries are bounded: bars stream from the cursor, under a row/time budget and a slot limit.

On a real SQLite file and the real PostgreSQL (skipped when it is not there, as in
test_history_store.py). The budget's time half is exercised with a budget of zero seconds (the
deadline has passed before the first batch), so no test depends on how fast this machine is.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from conftest import require
from test_history_store import PG_DSN, _pg_unreachable

from trio_relay.bars import BarBuilder, BudgetExceeded, Lateness, bars_from_trades
from trio_relay.history import (
    HistoryBackend,
    HistoryBusy,
    HistoryStore,
    PostgresBackend,
    QueryBudget,
    QueryTimeout,
    SqliteBackend,
)
from trio_relay.model import Update

T0 = 1_700_000_040_000 - 1_700_000_040_000 % 3_600_000  # on an hour boundary
N = 30_000  # trades, one every 120 ms: 3,600 s = one hour, 60 one-minute bars
NOW = T0 + 86_400_000  # the wall clock of the queries: a day later, every lateness window has passed


def trades() -> list[Update]:
    return [
        Update("AAPL", "T", T0 + i * 120, last_price=100.0 + (i * 7919 % 1000) / 100, last_size=float(1 + i % 9))
        for i in range(N)
    ]


def fill(backend: HistoryBackend) -> list[Update]:
    rows = trades()
    conn = backend.connect()
    try:
        quotes = [Update("AAPL", "Q", T0 + i * 120 + 1, bid_price=99.0, ask_price=101.0) for i in range(0, N, 10)]
        conn.write([(u, u.timestamp, None) for u in rows + quotes])  # each arrived when stamped: on time
    finally:
        conn.close()
    return rows


@pytest.fixture
def pg_backend() -> Iterator[PostgresBackend]:
    require(_pg_unreachable())
    table = f"ticks_budget_{uuid.uuid4().hex[:12]}"
    yield PostgresBackend(PG_DSN, table=table)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> HistoryBackend:
    if request.param == "sqlite":
        return SqliteBackend(tmp_path / "data")
    return request.getfixturevalue("pg_backend")  # type: ignore[no-any-return]


def key(bar: Any) -> tuple[Any, ...]:
    return (bar.start_ms, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.trades, bar.vwap, bar.complete)


async def test_streamed_bars_equal_bars_built_from_every_trade(backend: HistoryBackend) -> None:
    rows = fill(backend)
    end = T0 + N * 120 - 30_000  # the last bar is still open at the window's end
    expected = bars_from_trades(rows, "1m", T0, end)
    async with HistoryStore(backend) as store:
        page = await store.bars("AAPL", "1m", T0, end, 1000, now_ms=NOW)
        first = await store.bars("AAPL", "1m", T0, end, 10, now_ms=NOW)
    assert [key(b) for b in page.bars] == [key(b) for b in expected] and len(expected) == 60
    assert not page.bars[-1].complete and page.bars[-2].complete
    assert page.next_start is None and not page.truncated and page.trades_read == N - 250
    # A page of `limit` bars stops reading at the first trade of the bar after them.
    assert [key(b) for b in first.bars] == [key(b) for b in expected[:10]]
    assert first.next_start == T0 + 10 * 60_000 and not first.truncated and first.trades_read == 10 * 500 + 1


async def test_a_page_over_the_row_budget_is_truncated_and_resumes_exactly(backend: HistoryBackend) -> None:
    rows = fill(backend)
    end = T0 + N * 120
    expected = bars_from_trades(rows, "1m", T0, end)
    pages = []
    async with HistoryStore(backend, QueryBudget(max_rows=4_000)) as store:
        start: int | None = T0
        while start is not None and len(pages) < 100:
            page = await store.bars("AAPL", "1m", start, end, 1000, now_ms=NOW)
            pages.append(page)
            start = page.next_start
    assert all(p.truncated for p in pages[:-1]) and not pages[-1].truncated
    assert max(p.trades_read for p in pages) <= 4_000 + 2_000  # the budget, checked every batch
    assert [key(b) for p in pages for b in p.bars] == [key(b) for b in expected]  # no gap, no repeat


async def test_one_bar_over_the_budget_is_refused(backend: HistoryBackend) -> None:
    fill(backend)
    async with HistoryStore(backend, QueryBudget(max_rows=4_000)) as store:
        with pytest.raises(BudgetExceeded):
            await store.bars("AAPL", "1h", T0, T0 + N * 120, 10, now_ms=NOW)
        # The connection is still good for the next request.
        assert len((await store.bars("AAPL", "1m", T0, T0 + 120_000, 10, now_ms=NOW)).bars) == 2


async def test_the_time_budget_stops_a_query(backend: HistoryBackend) -> None:
    fill(backend)
    async with HistoryStore(backend, QueryBudget(timeout=1e-9)) as store:
        try:
            page = await store.bars("AAPL", "1m", T0, T0 + N * 120, 1000, now_ms=NOW)
        except (BudgetExceeded, QueryTimeout):
            return  # stopped inside the database, or before one bar was done
        # Or stopped after the first batch (the database answered it within its deadline).
        assert page.truncated and page.trades_read <= 2_000 and page.next_start is not None


class _GatedBackend(SqliteBackend):
    """A real SQLite backend whose connect() waits for the test to open the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def connect(self) -> Any:
        self.entered.set()
        self.gate.wait(30)
        return super().connect()


async def test_a_query_that_finds_every_slot_busy_gets_history_busy(tmp_path: Path) -> None:
    backend = _GatedBackend(tmp_path / "data")
    outcome: list[object] = []
    async with HistoryStore(backend, QueryBudget(concurrency=1, queue_timeout=0.2)) as store:
        async with trio.open_nursery() as nursery:

            async def first() -> None:
                outcome.append(await store.ticks("AAPL", T0, T0 + 1000))

            nursery.start_soon(first)
            await trio.to_thread.run_sync(backend.entered.wait, 30)  # it holds the only slot
            with pytest.raises(HistoryBusy):
                await store.ticks("AAPL", T0, T0 + 1000)
            backend.gate.set()
    assert outcome == [([], None)]


async def test_stored_bars_follow_the_live_lateness_rule_and_complete_rule(backend: HistoryBackend) -> None:
    """Issue 22, cases 1 and 2 at the store, on SQLite and PostgreSQL: the same rule as live."""
    rule = Lateness({"1s": 1_000}, grace_ms=1_000)
    arrivals = [  # (timestamp, price, size, received): in arrival order
        (T0 + 100, 10.0, 5.0, T0 + 100),
        (T0 + 1_200, 11.0, 5.0, T0 + 1_200),
        (T0 + 900, 9.0, 2.0, T0 + 2_999),  # late by 2 s: within end + grace + lateness, counts
        (T0 + 950, 1.0, 100.0, T0 + 3_000),  # late by 2 s and 1 ms: in no 1s bar
        (T0 + 2_500, 12.0, 1.0, T0 + 2_500),
    ]
    conn = backend.connect()
    try:
        conn.write([(Update("AAPL", "T", ts, last_price=p, last_size=q), r, None) for ts, p, q, r in arrivals])
    finally:
        conn.close()
    live = BarBuilder(["1s"], rule)
    sent = [bar for ts, p, q, r in arrivals for bar in live.add(Update("AAPL", "T", ts, last_price=p, last_size=q), r)]
    sent += live.flush(T0 + 60_000)
    final = {bar.start_ms: bar for bar in sent if bar.complete}
    async with HistoryStore(backend, lateness=rule) as store:
        page = await store.bars("AAPL", "1s", T0, T0 + 10_000, 100, now_ms=T0 + 60_000)
        # Asked at T0+4.5 s: [T0, T0+1s) is final (from T0+3 s), [T0+1s, T0+2s) is not (T0+4 s)...
        early = await store.bars("AAPL", "1s", T0, T0 + 10_000, 100, now_ms=T0 + 3_999)
        # ... and a start inside an interval makes that first bar incomplete whatever the time.
        cut = await store.bars("AAPL", "1s", T0, T0 + 10_000, 100, now_ms=T0 + 60_000, window_start=T0 + 1)
    assert page.bars == [final[start] for start in sorted(final)] and page.late == 1
    assert [(b.start_ms - T0, b.low, b.trades) for b in page.bars] == [(0, 9.0, 2), (1_000, 11.0, 1), (2_000, 12.0, 1)]
    assert [b.complete for b in early.bars] == [True, False, False]
    assert [b.complete for b in cut.bars] == [False, True, True]
