"""SQLite history in blocks (trio_relay/history/sqlite.py): the order, pages, retention and the
conversion of an older file are exactly what a row per tick gave.

Against a real SQLite file; the reference is a plain list sorted by (event time, arrival).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from trio_relay.history import sqlite as sqlite_mod
from trio_relay.history.base import Batch, rows_of
from trio_relay.history.sqlite import BUCKET_MS, SqliteBackend
from trio_relay.model import Update

T0 = 1_700_000_000_000


def ticks_in_batches(seed: int, n: int = 3000, batches: int = 7) -> tuple[list[Batch], list[tuple[Update, int]]]:
    """Ticks of 3 symbols over ~4 buckets, late and equal timestamps included, in arrival order."""
    rng = random.Random(seed)
    arrivals: list[tuple[Update, int]] = []
    for i in range(n):
        symbol = rng.choice("ABC")
        ts = T0 + rng.randrange(0, 4 * BUCKET_MS, 250)  # many equal timestamps, most out of order
        if rng.random() < 0.4:
            u = Update(symbol, "T", ts, last_price=100 + i / 100, last_size=float(i))
        else:
            u = Update(symbol, "Q", ts, bid_price=99.5, bid_size=1.0, ask_price=100.5, ask_size=float(i))
        arrivals.append((u, T0 + i))
    cut = sorted(rng.sample(range(1, n), batches - 1))
    bounds = [0, *cut, n]
    return [[(u, r, "sim") for u, r in arrivals[a:b]] for a, b in zip(bounds, bounds[1:], strict=False)], arrivals


def reference(arrivals: list[tuple[Update, int]], symbol: str, start: int, end: int) -> list[tuple[int, int]]:
    """(ts, recv_ms) of the symbol's ticks in [start, end) by event time, then arrival."""
    rows = [(u.timestamp, r) for u, r in arrivals if u.symbol == symbol and start <= u.timestamp < end]
    return sorted(rows, key=lambda x: x[0])  # stable: arrival order among equal times


def walk(
    conn: sqlite_mod._SqliteConnection, symbol: str, start: int, end: int, rng: random.Random
) -> list[tuple[int, int]]:
    """Every tick, page after page of random sizes, each page starting at the last one's cursor."""
    out: list[tuple[int, int]] = []
    after = None
    while True:
        page = conn.ticks(symbol, start, end, rng.randint(1, 97), after)
        if not page:
            return out
        out += [(t.timestamp, t.recv_ms) for t, _ in page]
        after = page[-1][1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_order_and_pages_match_a_row_per_tick(tmp_path: Path, seed: int) -> None:
    batches, arrivals = ticks_in_batches(seed)
    conn = SqliteBackend(tmp_path).connect()
    try:
        for batch in batches:
            conn.write(batch)
        rng = random.Random(seed)
        for symbol in "ABC":
            for start, end in [
                (0, 1 << 62),
                (T0 + 3_000, T0 + 2 * BUCKET_MS + 500),
                (T0 + BUCKET_MS, T0 + BUCKET_MS + 1),
            ]:
                want = reference(arrivals, symbol, start, end)
                assert walk(conn, symbol, start, end, rng) == want
                got = [(t.timestamp, t.recv_ms) for t, _ in conn.ticks(symbol, start, end, 10**6, None)]
                assert got == want
            trades = [(u.timestamp, r, u.last_price) for u, r in arrivals if u.symbol == symbol and u.kind == "T"]
            trades.sort(key=lambda x: x[0])
            assert [(ts, rv, p) for _s, ts, p, _z, rv in conn.trades(symbol, 0, 1 << 62, None)] == trades
            streamed = [row for part in conn.trade_batches(symbol, 0, 1 << 62, 50, float("inf")) for row in part]
            assert streamed == conn.trades(symbol, 0, 1 << 62, None)
        # Plain SQL over the view: a row per tick, ids in the same (ts, id) order.
        view = conn._conn.execute("SELECT ts, recv_ms FROM ticks WHERE symbol = 'A' ORDER BY ts, id").fetchall()
        assert view == reference(arrivals, "A", 0, 1 << 62)
        # Stored as blocks: per symbol and bucket, at most one per write.
        (blocks,) = conn._conn.execute("SELECT count(*) FROM ticks_blocks").fetchone()
        assert 3 * 4 <= blocks <= 3 * 5 * len(batches)
    finally:
        conn.close()


def test_retention_is_exact_to_the_tick_and_keeps_cursors(tmp_path: Path) -> None:
    batches, arrivals = ticks_in_batches(7)
    conn = SqliteBackend(tmp_path).connect()
    try:
        for batch in batches:
            conn.write(batch)
        cutoff = T0 + BUCKET_MS + 1_250  # inside a bucket: blocks straddle it
        half = conn.ticks("A", 0, 1 << 62, 10**6, None)
        # A cursor taken before retention, just past the cutoff (in a block that gets trimmed),
        # on the first of several ticks with one timestamp: the page after it starts at a tie.
        k = next(i for i, (t, _) in enumerate(half) if t.timestamp >= cutoff + 500)
        assert half[k + 1][0].timestamp == half[k][0].timestamp
        mid = half[k][1]
        total = sum(1 for u, _ in arrivals if u.timestamp < cutoff)
        done = 0
        while n := conn.delete_before(cutoff, 113):  # in chunks: the budget holds
            assert n <= 113
            done += n
        assert done == total
        for symbol in "ABC":
            assert [(t.timestamp, t.recv_ms) for t, _ in conn.ticks(symbol, 0, 1 << 62, 10**6, None)] == reference(
                arrivals, symbol, cutoff, 1 << 62
            )
        # The cursor taken before goes on where it was: ids do not move when a block is trimmed.
        rest = [(t.timestamp, t.recv_ms) for t, _ in conn.ticks("A", 0, 1 << 62, 10**6, mid)]
        assert rest == [(t.timestamp, t.recv_ms) for t, _ in half[k + 1 :]]
    finally:
        conn.close()


OLD_TABLE = (
    "CREATE TABLE ticks (id INTEGER PRIMARY KEY, symbol TEXT NOT NULL, ts INTEGER NOT NULL, recv_ms INTEGER NOT NULL,"
    " kind TEXT NOT NULL, last_price REAL, last_size REAL, bid_price REAL, bid_size REAL, ask_price REAL, ask_size REAL,"
    " provider TEXT)"
)


def old_file(path: Path, arrivals: list[tuple[Update, int]]) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    with sqlite3.connect(path / "history.sqlite3") as raw:
        raw.execute(OLD_TABLE)
        raw.execute("CREATE INDEX ticks_symbol_ts ON ticks (symbol, ts)")
        raw.executemany(
            "INSERT INTO ticks (id, symbol, ts, recv_ms, kind, last_price, last_size, bid_price, bid_size, ask_price,"
            " ask_size, provider) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            # Ids of a relay that wrote for a long time; the columns as the row-per-tick writer made them.
            [(10**10 + i, *row) for i, row in enumerate(rows_of([(u, r, "old") for u, r in arrivals]))],
        )


def test_an_older_file_is_read_with_the_blocks_in_order(tmp_path: Path) -> None:
    """A file of a row per tick (an older relay's): kept as it is, read and retained with the new blocks.

    At equal times its ticks come first (they arrived first), pages cross from one to the other
    without a gap or a duplicate, and the view shows both.
    """
    batches, arrivals = ticks_in_batches(11, n=1200, batches=4)
    old, new = arrivals[:500], arrivals[500:]
    old_file(tmp_path, old)
    conn = SqliteBackend(tmp_path).connect()
    try:
        conn.write([(u, r, "old") for u, r in new])
        rng = random.Random(5)
        for symbol in "ABC":
            want = reference(arrivals, symbol, 0, 1 << 62)
            assert walk(conn, symbol, 0, 1 << 62, rng) == want
            page = conn.ticks(symbol, T0 + 5_000, T0 + 30_000, 10**6, None)
            assert [(t.timestamp, t.recv_ms) for t, _ in page] == reference(arrivals, symbol, T0 + 5_000, T0 + 30_000)
            assert {t.provider for t, _ in page} == {"old"}
        names = dict(conn._conn.execute("SELECT name, type FROM sqlite_master WHERE name LIKE 'ticks%'"))
        assert names["ticks"] == "view" and names["ticks_rows"] == "table" and names["ticks_blocks"] == "table"
        view = conn._conn.execute("SELECT ts, recv_ms FROM ticks WHERE symbol = 'B' ORDER BY ts, id").fetchall()
        assert view == reference(arrivals, "B", 0, 1 << 62)
        cutoff = T0 + 2 * BUCKET_MS + 250
        done = 0
        while n := conn.delete_before(cutoff, 77):
            assert n <= 77
            done += n
        assert done == sum(1 for u, _ in arrivals if u.timestamp < cutoff)
        for symbol in "ABC":
            got = [(t.timestamp, t.recv_ms) for t, _ in conn.ticks(symbol, 0, 1 << 62, 10**6, None)]
            assert got == reference(arrivals, symbol, cutoff, 1 << 62)
    finally:
        conn.close()
    SqliteBackend(tmp_path).connect().close()  # a second start: nothing to rename, the view is there
