"""Tick history: the writer and the queries, on a real SQLite file and the real PostgreSQL.

PostgreSQL is expected at 127.0.0.1:5432 (user postgres, database test, trust auth). When it is not
there the PostgreSQL cases are skipped, except in CI (CI=true), where that is a failure. Each
PostgreSQL case writes to a table of its own and drops it.

Timing (flush interval, retry backoff, retention period) runs on a MockClock: worker-thread work
takes no virtual time, so the times asserted are exact.
"""

from __future__ import annotations

import inspect
import logging
import math
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from conftest import require

from trio_relay.config import HistoryConfig
from trio_relay.history import (
    HistoryBackend,
    HistoryStore,
    HistoryUnavailable,
    HistoryWriter,
    InvalidCursor,
    PostgresBackend,
    SqliteBackend,
    Tick,
    make_backend,
)
from trio_relay.history.base import Batch, HistoryConnection
from trio_relay.model import Update
from trio_relay.testing.tcpgate import TcpGate

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
SECRET = "pw-s3cret-7Qx9"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def _pg_unreachable() -> str | None:
    try:
        socket.create_connection((PG_HOST, PG_PORT), timeout=2).close()
    except OSError as exc:
        return f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} ({exc})"
    return None


@pytest.fixture
def pg_table() -> Iterator[str]:
    """A fresh table name for this test; the table is dropped afterwards."""
    require(_pg_unreachable())
    table = f"ticks_test_{uuid.uuid4().hex[:12]}"
    yield table
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> HistoryBackend:
    if request.param == "sqlite":
        return SqliteBackend(tmp_path / "data")
    return PostgresBackend(PG_DSN, table=request.getfixturevalue("pg_table"))


def writer_for(backend: HistoryBackend, **options: Any) -> HistoryWriter:
    """A writer without retention, unless the test asks (T0 is long past for any retention)."""
    options.setdefault("retention_days", 0)
    return HistoryWriter(backend, **options)


async def until(writer: HistoryWriter, predicate: Callable[[], bool]) -> None:
    """Wait (on the writer's progress, not on a timer) until ``predicate()`` holds."""
    while not predicate():
        if writer.stopped:
            raise AssertionError(f"the writer stopped first: {writer.status()}")
        await writer.changed()


def expected(update: Update, recv_ms: int) -> Tick:
    u = update
    return Tick(
        u.symbol,
        u.kind,
        u.timestamp,
        recv_ms,
        u.last_price,
        u.last_size,
        u.ask_price,
        u.ask_size,
        u.bid_price,
        u.bid_size,
    )


async def all_ticks(store: HistoryStore, symbol: str, start: int = -(1 << 62), end: int = 1 << 62) -> list[Tick]:
    rows, cursor = await store.ticks(symbol, start, end, 1_000_000)
    assert cursor is None
    return rows


def at(t: float | list[float]) -> Any:
    """A virtual time, give or take float rounding in MockClock's jumps."""
    return pytest.approx(t, abs=1e-9)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- round trip, pagination, trades ---------------------------------------------------------


async def test_round_trip_keeps_every_field_and_none(
    backend: HistoryBackend, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    updates = [
        Update("AAPL", "T", T0, last_price=189.45, last_size=1000.0),
        Update("AAPL", "Q", T0 + 1, ask_price=189.46, ask_size=5000.0, bid_price=189.44, bid_size=3000.0),
        Update("AAPL", "Q", T0 + 1, bid_price=189.43),  # one side, no size: the rest stays None
        Update("AAPL", "B", T0 + 2, last_price=189.45, last_size=1000.0),
        Update("AAPL", "T", T0 + 3, last_price=0.1 + 0.2, last_size=0.000123),
        Update("AAPL", "T", T0 - 5, last_price=-1.5e-300, last_size=1e300),  # late, and extreme floats
        Update("AAPL", "T", T0 + 4),  # a trade without any price
        Update("BRK.B", "Q", T0, ask_price=1.0, ask_size=2.0),
        Update("BTC/USD", "T", T0, last_price=37_000.5, last_size=0.00001),
    ]
    writer = writer_for(backend, batch_size=4)
    await nursery.start(writer.run)
    for i, u in enumerate(updates):
        assert writer.offer(u, T0 + 1000 + i)
    await until(writer, lambda: writer.written == len(updates))
    assert (writer.state, writer.dropped, writer.pending) == ("ok", 0, 0)

    async with HistoryStore(backend) as store:
        aapl = [(u, T0 + 1000 + i) for i, u in enumerate(updates) if u.symbol == "AAPL"]
        by_time = sorted(aapl, key=lambda pair: pair[0].timestamp)  # stable: equal times keep arrival order
        assert await all_ticks(store, "AAPL") == [expected(u, r) for u, r in by_time]
        assert await all_ticks(store, "BRK.B") == [expected(updates[7], T0 + 1007)]
        assert await all_ticks(store, "BTC/USD") == [expected(updates[8], T0 + 1008)]
        assert await all_ticks(store, "MSFT") == []
        # [start, end): start included, end excluded.
        rows = await all_ticks(store, "AAPL", T0 + 1, T0 + 3)
        assert [(t.timestamp, t.kind) for t in rows] == [(T0 + 1, "Q"), (T0 + 1, "Q"), (T0 + 2, "B")]
        # Trades for bars: kind T with a price only, as bars.TradeRow (with the arrival time the
        # lateness rule reads), in time order.
        assert await store.trades("AAPL", T0 - 10, T0 + 10) == [
            ("AAPL", T0 - 5, -1.5e-300, 1e300, T0 + 1005),
            ("AAPL", T0, 189.45, 1000.0, T0 + 1000),
            ("AAPL", T0 + 3, 0.1 + 0.2, 0.000123, T0 + 1004),
        ]
        assert await store.trades("AAPL", T0 - 10, T0 + 10, limit=1) == [("AAPL", T0 - 5, -1.5e-300, 1e300, T0 + 1005)]
    await writer.aclose()


async def test_sqlite_stores_what_an_update_does_not_have_as_null(tmp_path: Path) -> None:
    """SQL NULL in the file's view (what any reader of it sees), not NaN or a number; a NaN or an
    infinity the provider sent too (JSON has neither)."""
    conn = await trio.to_thread.run_sync(SqliteBackend(tmp_path).connect)
    try:
        batch = [
            (Update("AAPL", "T", T0, last_price=1.5, last_size=10.0), T0, None),
            (Update("AAPL", "Q", T0 + 1, bid_price=1.25, ask_size=0.0), T0, "sim"),
            (Update("AAPL", "T", T0 + 2, last_price=math.nan, last_size=math.inf), T0, "sim"),
        ]
        await trio.to_thread.run_sync(conn.write, batch)
        query = (
            "SELECT typeof(last_price), typeof(last_size), typeof(bid_price), typeof(bid_size), typeof(ask_price),"
            " typeof(ask_size), typeof(provider), ask_size, last_size FROM ticks ORDER BY id"
        )
        assert conn._conn.execute(query).fetchall() == [  # white box: the stored types
            ("real", "real", "null", "null", "null", "null", "null", None, 10.0),
            ("null", "null", "real", "null", "null", "real", "text", 0.0, None),
            ("null", "null", "null", "null", "null", "null", "text", None, None),
        ]
    finally:
        conn.close()


async def test_pagination_has_no_duplicate_and_no_gap(
    backend: HistoryBackend, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    writer = writer_for(backend, batch_size=64)
    await nursery.start(writer.run)
    # 7 ticks per millisecond (page boundaries fall inside runs of equal timestamps), every third
    # a trade, interleaved with another symbol.
    offered: list[tuple[Update, int]] = []
    for i in range(400):
        kind = "T" if i % 3 == 0 else "Q"
        u = Update("AAPL", kind, T0 + i // 7, last_price=100 + i / 100 if kind == "T" else None, bid_price=float(i))
        offered.append((u, i))
        writer.offer(u, i)
        writer.offer(Update("MSFT", "T", T0 + i // 7, last_price=1.0), 10_000 + i)
    await until(writer, lambda: writer.written == 800)

    start, end = T0 + 3, T0 + 30
    want = [expected(u, r) for u, r in offered if start <= u.timestamp < end]
    assert len(want) == 27 * 7
    async with HistoryStore(backend) as store:
        got: list[Tick] = []
        cursor: str | None = None
        pages = 0
        while True:
            page, cursor = await store.ticks("AAPL", start, end, 10, after=cursor)
            got += page
            pages += 1
            # Rows added meanwhile outside the window (later ticks, a late tick before it) change nothing.
            writer.offer(Update("AAPL", "Q", end + pages, bid_price=1.0), 50_000 + pages)
            writer.offer(Update("AAPL", "Q", start - 1, bid_price=1.0), 60_000 + pages)
            await until(writer, lambda: writer.pending == 0)
            if cursor is None:
                break
        assert got == want
        assert pages == 19  # 18 full pages and a last one of 9
        # A page that ends exactly at the last row says so: no cursor to an empty page.
        page, cursor = await store.ticks("AAPL", start, end, len(want))
        assert (page, cursor) == (want, None)
        with pytest.raises(InvalidCursor):
            await store.ticks("AAPL", start, end, 10, after="not-a-cursor")
        with pytest.raises(ValueError):
            await store.ticks("AAPL", start, end, 0)
        trades = await store.trades("AAPL", start, end)
        assert trades == [("AAPL", t.timestamp, t.last_price, None, t.recv_ms) for t in want if t.kind == "T"]
    await writer.aclose()


# -- retention ------------------------------------------------------------------------------


async def test_retention_deletes_only_the_old_rows(
    backend: HistoryBackend, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    now = T0
    cutoff = now - 86_400_000  # retention_days=1
    writer = HistoryWriter(backend, retention_days=1, retention_interval=300, retention_chunk=4, wall_clock=lambda: now)
    await nursery.start(writer.run)
    keep: dict[str, list[Tick]] = {}
    for n, symbol in enumerate(["AAPL", "MSFT", "ZZZZ"]):
        for age in (3, 2, 1):  # older than the cutoff by 1..3 ms: deleted
            writer.offer(Update(symbol, "T", cutoff - age, last_price=1.0), n)
        for ts in (cutoff, now):  # exactly at the cutoff, and new: kept
            writer.offer(Update(symbol, "T", ts, last_price=2.0), n)
            keep.setdefault(symbol, []).append(Tick(symbol, "T", ts, n, last_price=2.0))
    await until(writer, lambda: writer.written == 15)
    # The first pass ran as the writer connected, before these rows were written.
    assert writer.deleted == 0 and trio.current_time() == at(0.0)
    await until(writer, lambda: writer.deleted == 9)
    assert trio.current_time() == at(300.0)  # the next pass, in chunks of 4, all at once
    async with HistoryStore(backend) as store:
        for symbol, ticks in keep.items():
            assert await all_ticks(store, symbol) == ticks
    await until(writer, lambda: trio.current_time() >= 600.0)
    assert writer.deleted == 9
    await writer.aclose()


# -- batching in time -----------------------------------------------------------------------


async def test_flush_interval_and_full_batches(tmp_path: Path, nursery: trio.Nursery, autojump_clock: Any) -> None:
    writer = writer_for(SqliteBackend(tmp_path), batch_size=10, flush_interval=0.5)
    await nursery.start(writer.run)
    writer.offer(Update("AAPL", "T", T0, last_price=1.0), 0)
    await until(writer, lambda: writer.written == 1)
    assert trio.current_time() == at(0.0)  # after a quiet spell: at once
    for i in range(3):
        writer.offer(Update("AAPL", "T", T0 + i, last_price=1.0), 0)
    await until(writer, lambda: writer.written == 4)
    assert trio.current_time() == at(0.5)  # one flush_interval after the previous write
    await trio.sleep(0.1)  # virtual time (MockClock)
    for i in range(10):
        writer.offer(Update("AAPL", "T", T0 + i, last_price=1.0), 0)
    await until(writer, lambda: writer.written == 14)
    assert trio.current_time() == at(0.6)  # a full batch does not wait
    writer.offer(Update("AAPL", "T", T0, last_price=1.0), 0)
    writer.offer(Update("AAPL", "T", T0, last_price=1.0), 0)
    await until(writer, lambda: writer.written == 16)
    assert trio.current_time() == at(1.1)
    await writer.aclose()


# -- the bound, failures, recovery ----------------------------------------------------------


async def test_sqlite_unavailable_buffer_is_bounded_then_recovers(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("a file where the directory should be")
    writer = writer_for(SqliteBackend(data_dir), queue_size=50, batch_size=20, backoff_initial=0.5, backoff_max=4)
    await nursery.start(writer.run)
    await until(writer, lambda: writer.state == "down")
    assert writer.last_error is not None and str(data_dir) in writer.last_error
    assert not inspect.iscoroutinefunction(HistoryWriter.offer)  # it cannot wait: plain calls
    results = [writer.offer(Update("AAPL", "T", T0 + i, last_price=float(i)), i) for i in range(60)]
    assert results == [True] * 50 + [False] * 10
    assert (writer.dropped, writer.pending, writer.written, writer.state) == (10, 50, 0, "down")
    async with HistoryStore(SqliteBackend(data_dir)) as store:
        with pytest.raises(HistoryUnavailable):
            await store.ticks("AAPL", 0, 1 << 62, 10)

        await trio.sleep(60)  # virtual time (MockClock): still down, retrying every 4 s
        assert (writer.state, writer.written, writer.pending) == ("down", 0, 50)

        data_dir.unlink()  # the database can be back: the writer makes the directory
        await until(writer, lambda: writer.written == 50)
        assert (writer.state, writer.pending, writer.dropped) == ("ok", 0, 10)
        writer.offer(Update("AAPL", "T", T0 + 100, last_price=1.0), 100)
        await until(writer, lambda: writer.written == 51)
        rows = await all_ticks(store, "AAPL")  # the store connects again too
        assert [t.recv_ms for t in rows] == [*range(50), 100]
    await writer.aclose()


class FlakyBackend:
    """A real SQLite backend whose connect and write fail, or hang, when the test says so."""

    def __init__(self, real: SqliteBackend) -> None:
        self.real = real
        self.refuse_connect = False
        self.refuse_write = False
        self.hold_write: threading.Event | None = None  # set: writes wait for it
        self.write_started = trio.Event()
        self.connects: list[float] = []  # trio time of each attempt
        self.writes: list[float] = []

    @property
    def description(self) -> str:
        return "flaky " + self.real.description

    def connect(self) -> HistoryConnection:
        self.connects.append(trio.from_thread.run_sync(trio.current_time))
        if self.refuse_connect:
            raise HistoryUnavailable("flaky: connection refused")
        return FlakyConnection(self, self.real.connect())


class FlakyConnection:
    def __init__(self, backend: FlakyBackend, conn: HistoryConnection) -> None:
        self.backend = backend
        self.conn = conn

    def write(self, batch: Batch) -> None:
        self.backend.writes.append(trio.from_thread.run_sync(trio.current_time))
        hold = self.backend.hold_write
        if hold is not None:
            trio.from_thread.run_sync(self.backend.write_started.set)
            assert hold.wait(10), "the test never released the write"
        if self.backend.refuse_write:
            raise HistoryUnavailable("flaky: write failed")
        self.conn.write(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


async def test_backoff_is_exponential_capped_and_reset(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    flaky = FlakyBackend(SqliteBackend(tmp_path))
    flaky.refuse_connect = True
    writer = writer_for(flaky, backoff_initial=0.5, backoff_max=4)
    await nursery.start(writer.run)
    writer.offer(Update("AAPL", "T", T0, last_price=1.0), 0)
    await until(writer, lambda: len(flaky.connects) == 7)
    assert flaky.connects == at([0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5])
    assert (writer.state, writer.last_error) == ("down", "flaky: connection refused")

    flaky.refuse_connect = False
    await until(writer, lambda: writer.written == 1)
    assert trio.current_time() == at(19.5) and writer.state == "ok"

    # A write that fails: reconnect after the initial delay again (the backoff was reset).
    flaky.refuse_write = True
    await trio.sleep(10)  # virtual time (MockClock)
    writer.offer(Update("AAPL", "T", T0, last_price=1.0), 1)
    await until(writer, lambda: len(flaky.writes) == 3)
    assert flaky.writes[1:] == at([29.5, 30.0]) and writer.state == "down"
    assert flaky.connects[-1] == at(30.0)
    flaky.refuse_write = False
    await until(writer, lambda: writer.written == 2)
    assert trio.current_time() == at(31.0) and writer.state == "ok"
    await writer.aclose()


async def test_a_slow_database_degrades_then_catches_up(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    flaky = FlakyBackend(SqliteBackend(tmp_path))
    flaky.hold_write = hold = threading.Event()
    writer = writer_for(flaky, queue_size=20, batch_size=5)
    await nursery.start(writer.run)
    writer.offer(Update("AAPL", "T", T0, last_price=1.0), 0)
    await flaky.write_started.wait()  # the write hangs in its thread
    results = [writer.offer(Update("AAPL", "T", T0 + i, last_price=1.0), i) for i in range(1, 26)]
    assert results == [True] * 19 + [False] * 6  # the batch in flight still counts against the bound
    assert (writer.state, writer.pending, writer.dropped) == ("degraded", 20, 6)
    flaky.hold_write = None
    hold.set()
    await until(writer, lambda: writer.pending == 0)
    assert (writer.state, writer.written, writer.dropped) == ("ok", 20, 6)
    await writer.aclose()


async def test_refused_rows_are_dropped_alone(
    backend: HistoryBackend, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    writer = writer_for(backend, batch_size=100)
    await nursery.start(writer.run)
    await until(writer, lambda: writer.state == "ok" and writer.pending == 0)
    updates = [Update("AAPL", "T", T0 + i, last_price=1.0) for i in range(10)]
    updates[6] = Update("AAPL", "T", 1 << 70, last_price=1.0)  # beyond a 64-bit integer
    for i, u in enumerate(updates):
        writer.offer(u, i)
    await until(writer, lambda: writer.pending == 0)
    assert (writer.written, writer.rejected, writer.dropped, writer.state) == (9, 1, 0, "ok")
    async with HistoryStore(backend) as store:
        assert [t.recv_ms for t in await all_ticks(store, "AAPL")] == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    await writer.aclose()


# -- shutdown -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_shutdown_writes_what_is_pending(backend: HistoryBackend, how: str) -> None:
    writer = writer_for(backend, batch_size=1000, flush_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.offer(Update("AAPL", "T", T0, last_price=1.0), 0)
        await until(writer, lambda: writer.written == 1)  # the next partial batch waits an hour
        for i in range(1, 501):
            writer.offer(Update("AAPL", "Q", T0 + i, bid_price=float(i)), i)
        assert writer.pending == 500
        if how == "aclose":
            await writer.aclose()
            assert not writer.offer(Update("AAPL", "T", T0, last_price=1.0), 0)  # closed: dropped
        else:
            nursery.cancel_scope.cancel()
    assert writer.stopped and (writer.written, writer.pending) == (501, 0)
    async with HistoryStore(backend) as store:
        assert len(await all_ticks(store, "AAPL")) == 501


async def test_shutdown_is_bounded_when_the_database_is_down(tmp_path: Path, autojump_clock: Any) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("not a directory")
    writer = writer_for(SqliteBackend(data_dir), shutdown_timeout=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.offer(Update("AAPL", "T", T0, last_price=1.0), 0)
        await until(writer, lambda: writer.state == "down")
        started = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started <= 2.0
    assert writer.stopped and writer.pending == 1


# -- PostgreSQL specifics -------------------------------------------------------------------


class PgGate(TcpGate):
    """A loopback TCP proxy in front of PostgreSQL: closed, it hangs up on every connection."""

    def __init__(self) -> None:
        super().__init__(PG_HOST, PG_PORT, open=False)


async def test_postgres_down_then_back(pg_table: str, nursery: trio.Nursery, autojump_clock: Any) -> None:
    gate = PgGate()
    await nursery.start(gate.run)
    backend = PostgresBackend(f"postgresql://postgres@127.0.0.1:{gate.port}/test", table=pg_table)
    writer = writer_for(backend, queue_size=100, batch_size=30, backoff_initial=0.5, backoff_max=2)
    await nursery.start(writer.run)
    await until(writer, lambda: writer.state == "down")
    results = [writer.offer(Update("AAPL", "T", T0 + i, last_price=float(i)), i) for i in range(120)]
    assert results.count(False) == writer.dropped == 20 and writer.pending == 100

    gate.open = True
    await until(writer, lambda: writer.written == 100)
    assert writer.state == "ok"

    gate.cut()  # the server goes away under an open connection
    writer.offer(Update("AAPL", "T", T0 + 500, last_price=1.0), 500)
    await until(writer, lambda: writer.state == "down")
    assert writer.pending == 1
    gate.open = True
    await until(writer, lambda: writer.written == 101)
    assert writer.state == "ok"
    async with HistoryStore(PostgresBackend(PG_DSN, table=pg_table)) as store:
        assert [t.recv_ms for t in await all_ticks(store, "AAPL")] == [*range(100), 500]
    await writer.aclose()


async def test_postgres_password_never_shows(
    pg_table: str, nursery: trio.Nursery, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = closed_port()
    dsn = f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/test"
    backend = PostgresBackend(dsn, table=pg_table)
    writer = writer_for(backend, queue_size=10, shutdown_timeout=1.0)
    await nursery.start(writer.run)
    await until(writer, lambda: writer.state == "down")
    assert [writer.offer(Update("AAPL", "T", T0, last_price=1.0), 0) for _ in range(12)].count(False) == 2
    assert writer.last_error is not None and str(port) in writer.last_error
    async with HistoryStore(backend) as store:
        with pytest.raises(HistoryUnavailable) as failed:
            await store.ticks("AAPL", 0, 1, 10)
    await writer.aclose()
    assert writer.pending == 10
    shown = [
        writer.last_error,
        str(writer.status()),
        repr(backend),
        backend.description,
        str(failed.value),
        caplog.text,
    ]
    assert all(SECRET not in text for text in shown)
    assert "127.0.0.1" in backend.description
    # Not even an invalid DSN echoes it.
    with pytest.raises(ValueError) as bad:
        PostgresBackend(f"postgresql://postgres:{SECRET}@127.0.0.1/test?nonsense=1")
    assert SECRET not in str(bad.value)
    with pytest.raises(ValueError) as bad:
        PostgresBackend(f"host=127.0.0.1 password={SECRET} nonsense")
    assert SECRET not in str(bad.value)


# -- schema and configuration ---------------------------------------------------------------


async def test_sqlite_file_is_created_in_wal_mode_with_its_index(tmp_path: Path) -> None:
    backend = make_backend(HistoryConfig(backend="sqlite", data_dir=str(tmp_path / "a" / "b")))
    assert isinstance(backend, SqliteBackend)
    conn = await trio.to_thread.run_sync(backend.connect)
    try:
        raw = conn._conn  # white box: the writer's own settings
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        columns = [row[1] for row in raw.execute("PRAGMA table_info(ticks)")]
        assert columns == [
            "id",
            "symbol",
            "ts",
            "recv_ms",
            "kind",
            "last_price",
            "last_size",
            "bid_price",
            "bid_size",
            "ask_price",
            "ask_size",
            "provider",
        ]
        # The ticks are stored in blocks (see history/sqlite.py); `ticks` is a view of one row each.
        assert raw.execute("SELECT type FROM sqlite_master WHERE name = 'ticks'").fetchone() == ("view",)
        assert [row[2] for row in raw.execute("PRAGMA index_xinfo(ticks_blocks_symbol_ts)")][:2] == ["symbol", "ts_min"]
        plan = raw.execute(f"EXPLAIN QUERY PLAN {conn._blocks}", ("A", 0, 9, 0)).fetchall()
        assert "ticks_blocks_symbol_ts" in str(plan) and "TEMP B-TREE" not in str(plan)
    finally:
        conn.close()
    assert (tmp_path / "a" / "b" / "history.sqlite3").is_file()
    assert make_backend(HistoryConfig(backend="off")) is None
    pg = make_backend(HistoryConfig(backend="postgres", postgres_dsn=f"postgresql://relay:{SECRET}@db:5432/ticks"))
    assert isinstance(pg, PostgresBackend) and SECRET not in repr(pg)
    writer = HistoryWriter.from_config(HistoryConfig(queue_size=7, batch_size=3, flush_interval=0.25), backend)
    assert (writer.queue_size, writer.batch_size, writer.flush_interval, writer.retention_days) == (7, 3, 0.25, 7.0)


async def test_retention_runs_on_its_schedule_as_rows_age(
    backend: HistoryBackend, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    """Not only at start: every retention_interval, what has aged past retention_days since goes."""
    start = trio.current_time()

    def wall() -> int:  # the wall clock follows the virtual one
        return T0 + round((trio.current_time() - start) * 1000)

    # Kept 1/1440 of a day (60 s); a pass every 300 s.
    writer = HistoryWriter(
        backend, retention_days=1 / 1440, retention_interval=300, retention_chunk=1000, wall_clock=wall
    )
    await nursery.start(writer.run)
    for i in range(10):  # one tick every 100 s of event time, all offered now
        writer.offer(Update("AAPL", "T", T0 + i * 100_000, last_price=1.0), T0)
    await until(writer, lambda: writer.written == 10)
    assert writer.deleted == 0  # the pass at start found nothing older than T0 - 60 s
    # No deadline of the test's own here: autojump would jump to it while a pass runs in its
    # worker thread. The passes are the only deadlines, so each wait ends at the next one.
    for t, gone in [(300.0, 3), (600.0, 6), (900.0, 9)]:
        # At t the cutoff is T0 + t - 60 s: the ticks stamped before it go, at that pass.
        await until(writer, lambda: writer.deleted >= gone)  # noqa: B023 (used at once)
        assert (trio.current_time() - start, writer.deleted) == (at(t), gone)
    await writer.aclose()  # no pass runs while the query below waits for its thread
    async with HistoryStore(backend) as store:
        assert [x.timestamp for x in await all_ticks(store, "AAPL")] == [T0 + 900_000]


# -- the provider column ----------------------------------------------------------------------

# The table as relays before the provider column made it (both backends' DDL of that time).
OLD_SQLITE = (
    "CREATE TABLE ticks (id INTEGER PRIMARY KEY, symbol TEXT NOT NULL, ts INTEGER NOT NULL, recv_ms INTEGER NOT NULL,"
    " kind TEXT NOT NULL, last_price REAL, last_size REAL, bid_price REAL, bid_size REAL, ask_price REAL, ask_size REAL)"
)
OLD_POSTGRES = (
    'CREATE TABLE "{t}" (id BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1000), symbol TEXT NOT NULL, ts BIGINT NOT NULL,'
    " recv_ms BIGINT NOT NULL, kind TEXT NOT NULL, last_price DOUBLE PRECISION, last_size DOUBLE PRECISION,"
    " bid_price DOUBLE PRECISION, bid_size DOUBLE PRECISION, ask_price DOUBLE PRECISION, ask_size DOUBLE PRECISION)"
)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_an_old_database_gets_the_provider_column(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A database made before the column: the relay adds it at start; old rows say None, new ones their provider."""
    old_row = ("AAPL", T0, T0 + 5, "T", 1.0, 10.0)
    insert = "INSERT INTO {t} (symbol, ts, recv_ms, kind, last_price, last_size) VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
    backend: HistoryBackend
    if kind == "sqlite":
        (tmp_path / "data").mkdir(mode=0o700)
        with sqlite3.connect(tmp_path / "data" / "history.sqlite3") as raw:
            raw.execute(OLD_SQLITE)
            raw.execute(insert.format(t="ticks", p="?"), old_row)
        backend = SqliteBackend(tmp_path / "data")
    else:
        table = request.getfixturevalue("pg_table")
        with psycopg.connect(PG_DSN, autocommit=True) as raw_pg:
            raw_pg.execute(OLD_POSTGRES.format(t=table))
            raw_pg.execute(insert.format(t=f'"{table}"', p="%s"), old_row)
        backend = PostgresBackend(PG_DSN, table=table)
    for _ in range(2):  # connecting again finds the column and changes nothing
        conn = await trio.to_thread.run_sync(backend.connect)
        await trio.to_thread.run_sync(conn.close)
    conn = await trio.to_thread.run_sync(backend.connect)
    try:
        batch = [
            (Update("AAPL", "T", T0 + 1, last_price=2.0, last_size=1.0), T0 + 6, "sim"),
            (Update("AAPL", "Q", T0 + 2, bid_price=1.5, ask_price=2.5, provider="fmp"), T0 + 7, "sim"),
        ]
        await trio.to_thread.run_sync(conn.write, batch)
        rows = await trio.to_thread.run_sync(conn.ticks, "AAPL", T0, T0 + 10, 10, None)
    finally:
        await trio.to_thread.run_sync(conn.close)
    # The update's own provider wins over the hub's source (an upstream relay passes its provider on).
    assert [(t.timestamp, t.provider) for t, _ in rows] == [(T0, None), (T0 + 1, "sim"), (T0 + 2, "fmp")]
    assert rows[0][0].last_price == 1.0  # the old row is intact
