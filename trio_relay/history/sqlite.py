"""The embedded backend: one SQLite file, ``<data_dir>/history.sqlite3``, in WAL mode, ticks in blocks.

WAL lets the query connection read while the writer's connection writes; ``synchronous=NORMAL``
makes a commit cost no fsync (the WAL is synced at checkpoints): a power cut may lose the last
commits, never corrupt the file.

**Blocks, not a row per tick.** A row and its index entry cost SQLite ~3.3 µs per tick, and the
GIL hand-offs of a per-row ``executemany`` as much again on a relay's busy core: at 40,000 ticks/s
the history took a quarter of the core and held deliveries to 60 % of demand (issue 25 in
bench/RESULTS.md). So one write stores, per symbol and per :data:`BUCKET_MS` of event time, one
row of ``<table>_blocks``: the ticks as one JSON array (``msgspec``, in C), sorted by event time
(ties in arrival order), with the block's first and last ``ts``. A batch of 20,000 ticks over 500
symbols is ~500 inserts.

* **Order and cursors.** A tick's id is ``ID_BASE + block_id * 65536 + its index`` in the block
  (a block holds at most :data:`BLOCK_ROWS`): blocks are numbered in write order and a block is sorted
  stably, so ``(ts, id)`` orders ticks exactly as a row per tick did (event time, then arrival),
  and a cursor ``(ts, id)`` stays valid while the block is trimmed by retention (``first`` counts
  the ticks trimmed from its front).
* **Reads.** A query reads the blocks of one symbol whose bucket can hold ``[start, end)`` (an
  index range on ``(symbol, ts_min)``: every tick of a block lies in one bucket) and merges their
  ticks by ``(ts, id)``; it holds at most the ticks of the blocks that overlap in time.
* **Retention** deletes whole blocks older than the cutoff and trims the front of a block that
  straddles it: exact to the tick, as before.
* **Plain SQL still works**: the view ``<table>`` shows one row per tick with the columns a row
  per tick had (``id, symbol, ts, recv_ms, kind, last_price, ...``), for ``sqlite3`` and any tool.
* **Values**: JSON has no NaN or infinity; a non-finite price or size is stored as null, which
  the relay stored as NULL already for NaN.

A file made by an older relay (``<table>``, a table of a row per tick) is not converted (that
would take minutes for a week of ticks, and the history would stop meanwhile): at start the table
is renamed ``<table>_rows`` (instant), and reads merge its rows, by the old index, with the
blocks'. Its ids are rowids, below :data:`ID_BASE`: at equal times its ticks come first, as they
arrived first, and a cursor an older relay gave goes on. Retention empties it like the blocks.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Generator, Iterator
from operator import itemgetter
from pathlib import Path
from typing import Final

import msgspec

from ..private_files import private_file
from .base import (
    Batch,
    HistoryUnavailable,
    Position,
    QueryTimeout,
    RejectedRows,
    Tick,
    TradeRow,
    check_identifier,
)

__all__ = ["SqliteBackend", "SQLITE_FILENAME", "BUCKET_MS", "BLOCK_ROWS", "ID_BASE"]

log = logging.getLogger(__name__)

SQLITE_FILENAME: Final = "history.sqlite3"

#: Event time one block spans at most: every tick of a block has ``ts // BUCKET_MS`` in common.
#: Bounds what a query must look at before its start, and what it holds while merging.
BUCKET_MS: Final = 10_000

#: Ticks in one block at most: a tick's id is ``block_id * 65536 + index``.
BLOCK_ROWS: Final = 65_536

#: The first id of a tick in a block: above any rowid of an older relay's row-per-tick table.
ID_BASE: Final = 1 << 50

# Errors that come from the rows of a batch, not from the database being unusable.
_ROW_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,  # "Error binding parameter": an unsupported type
    msgspec.EncodeError,
    OverflowError,  # an int beyond 64 bits
    TypeError,
    ValueError,  # includes UnicodeEncodeError (a lone surrogate)
)

# Virtual-machine steps between two deadline checks of a streamed query (a few µs of work).
_PROGRESS_STEPS: Final = 10_000

# One stored tick: ts, recv_ms, kind, last_price, last_size, bid_price, bid_size, ask_price,
# ask_size, provider (the table order of the row-per-tick layout, without symbol and id).
_Row = tuple[
    int, int, str, float | None, float | None, float | None, float | None, float | None, float | None, str | None
]
_ENCODE: Final = msgspec.json.Encoder().encode
_DECODE: Final = msgspec.json.Decoder(list[_Row]).decode
_BY_TS: Final = itemgetter(0)

# The view's columns, as the row-per-tick table had them.
_VIEW_COLUMNS: Final = (
    "ts", "recv_ms", "kind", "last_price", "last_size", "bid_price", "bid_size", "ask_price", "ask_size", "provider"
)  # fmt: skip


class SqliteBackend:
    """Ticks in ``<data_dir>/<filename>`` (the directory is created if missing)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        filename: str = SQLITE_FILENAME,
        table: str = "ticks",
        busy_timeout: float = 5.0,
        cache_mb: int = 16,
        wal_checkpoint_mb: int = 64,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / filename
        self.table = check_identifier(table, "table")
        # How long a statement waits for a lock held by another process before it fails.
        self.busy_timeout = busy_timeout
        # Page cache per connection (allocated as used). A write touches one index page per
        # block, not per tick, so SQLite's working set is small (it was 64 MB for a row per tick).
        self.cache_mb = cache_mb
        # WAL size that triggers a checkpoint (SQLite's default: 4 MB); the file is truncated back
        # to it afterwards. Fewer, larger checkpoints cost less per byte written.
        self.wal_checkpoint_mb = wal_checkpoint_mb

    @property
    def description(self) -> str:
        return f"sqlite {self.path}"

    def __repr__(self) -> str:
        return f"SqliteBackend({str(self.path)!r}, table={self.table!r})"

    def connect(self) -> _SqliteConnection:
        try:
            private_file(self.path)  # 0600 in a 0700 folder (see private_files)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise HistoryUnavailable(f"{self.description}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise HistoryUnavailable(f"{self.description}: WAL mode refused (journal_mode={mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA cache_size=-{self.cache_mb * 1024}")
            conn.execute(f"PRAGMA wal_autocheckpoint={self.wal_checkpoint_mb * 256}")  # pages of 4 KiB
            conn.execute(f"PRAGMA journal_size_limit={self.wal_checkpoint_mb * 1024 * 1024}")
            t = self.table
            conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{t}_blocks" (id INTEGER PRIMARY KEY, symbol TEXT NOT NULL,'
                " ts_min INTEGER NOT NULL, ts_max INTEGER NOT NULL, first INTEGER NOT NULL, n INTEGER NOT NULL,"
                " rows TEXT NOT NULL)"
            )
            conn.execute(f'CREATE INDEX IF NOT EXISTS "{t}_blocks_symbol_ts" ON "{t}_blocks" (symbol, ts_min)')
            legacy = _adopt_legacy(conn, t)
            _create_view(conn, t, legacy)
        except sqlite3.Error as exc:
            conn.close()
            raise HistoryUnavailable(f"{self.description}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return _SqliteConnection(conn, t, self.description, legacy)


def _create_view(conn: sqlite3.Connection, table: str, legacy: bool) -> None:
    """The view ``<table>``: a row per tick, for SQL readers. A convenience: without SQLite's JSON
    functions (a build without JSON1) the relay logs it and goes on without the view."""
    blocks = ", ".join(f"json_extract(j.value, '$[{i}]') AS {c}" for i, c in enumerate(_VIEW_COLUMNS))
    view = (
        f"SELECT {ID_BASE} + b.id * {BLOCK_ROWS} + b.first + j.key AS id, b.symbol AS symbol, {blocks}"
        f' FROM "{table}_blocks" AS b, json_each(b.rows) AS j'
    )
    if legacy:
        view = f'SELECT id, symbol, {", ".join(_VIEW_COLUMNS)} FROM "{table}_rows" UNION ALL {view}'
    try:
        conn.execute(f'CREATE VIEW IF NOT EXISTS "{table}" AS {view}')
    except sqlite3.OperationalError as exc:
        log.warning("[HISTORY] no SQL view %r of the ticks (%s); the history itself is unaffected", table, exc)


def _adopt_legacy(conn: sqlite3.Connection, table: str) -> bool:
    """Rename an older relay's row-per-tick ``<table>`` to ``<table>_rows``; True if that table exists.

    It gets the ``provider`` column if it predates it (instant: no row is rewritten).
    """
    conn.execute("BEGIN IMMEDIATE")  # two connections starting at once: one renames, one waits
    try:
        kinds = dict(
            conn.execute("SELECT name, type FROM sqlite_master WHERE name IN (?, ?)", (table, f"{table}_rows"))
        )
        if kinds.get(table) == "table":
            conn.execute(f'ALTER TABLE "{table}" RENAME TO "{table}_rows"')
            kinds[f"{table}_rows"] = "table"
        legacy = kinds.get(f"{table}_rows") == "table"
        if legacy:
            columns = {row[1] for row in conn.execute(f'PRAGMA table_info("{table}_rows")')}
            if "provider" not in columns:
                conn.execute(f'ALTER TABLE "{table}_rows" ADD COLUMN provider TEXT')
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return legacy


def _loose_scan(table: str) -> str:
    """Every symbol of ``table`` (indexed on symbol first), one index seek each (a "loose index scan")."""
    return (
        f"WITH RECURSIVE s(symbol) AS (SELECT (SELECT min(symbol) FROM {table})"
        f" UNION ALL SELECT (SELECT min(symbol) FROM {table} WHERE symbol > s.symbol) FROM s WHERE s.symbol IS NOT NULL)"
        " SELECT symbol FROM s WHERE symbol IS NOT NULL"
    )


class _SqliteConnection:
    def __init__(self, conn: sqlite3.Connection, table: str, description: str, legacy: bool) -> None:
        self._conn = conn
        self._description = description
        b = f'"{table}_blocks"'
        self._insert = f"INSERT INTO {b} (symbol, ts_min, ts_max, first, n, rows) VALUES (?, ?, ?, 0, ?, ?)"
        # Every block that can hold a tick in [lo, end), in ts_min order: a block with a tick at
        # or after `lo` lies in lo's bucket or a later one (BUCKET_MS), so its ts_min is at least
        # that bucket's start, an index bound; ts_max >= lo drops the rest of that bucket.
        self._blocks = (
            f"SELECT id, ts_min, ts_max, first, rows FROM {b}"
            " WHERE symbol = ? AND ts_min >= ? AND ts_min < ? AND ts_max >= ? ORDER BY ts_min, id"
        )
        self._symbols = _loose_scan(b)
        self._old = (
            f"SELECT id, ts_max, first, n, rows FROM {b} WHERE symbol = ? AND ts_min < ? ORDER BY ts_min, id LIMIT ?"
        )
        self._delete = f"DELETE FROM {b} WHERE id = ?"
        self._trim = f"UPDATE {b} SET ts_min = ?, first = ?, n = ?, rows = ? WHERE id = ?"
        # An older relay's rows (see _adopt_legacy), by its (symbol, ts) index; after a cursor
        # (ts0, id0): ts >= max(start, ts0) bounds the index range, the OR trims ts0's rows.
        self._legacy = legacy
        r = f'"{table}_rows"'
        self._legacy_rows = (
            f"SELECT ts, id, recv_ms, kind, last_price, last_size, bid_price, bid_size, ask_price, ask_size, provider"
            f" FROM {r} WHERE symbol = ? AND ts >= ? AND ts < ? AND (ts > ? OR id > ?) ORDER BY ts, id"
        )
        self._legacy_symbols = _loose_scan(r)
        self._legacy_delete = f"DELETE FROM {r} WHERE id IN (SELECT id FROM {r} WHERE symbol = ? AND ts < ? LIMIT ?)"

    def _unavailable(self, exc: BaseException) -> HistoryUnavailable:
        return HistoryUnavailable(f"{self._description}: {exc}")

    def rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the failure being reported is the one that matters; the owner reconnects

    def _insert_blocks(self, groups: dict[str, list[_Row]]) -> None:
        """Insert each symbol's rows (in arrival order) as blocks: per bucket, sorted by ts.

        Inside the caller's transaction. The rows' order among equal ``ts`` is kept (a stable
        sort); the lists are sorted in place.
        """
        blocks = []
        for symbol, rows in groups.items():
            rows.sort(key=_BY_TS)
            if rows[0][0] // BUCKET_MS == rows[-1][0] // BUCKET_MS and len(rows) <= BLOCK_ROWS:
                blocks.append((symbol, rows[0][0], rows[-1][0], len(rows), _ENCODE(rows)))
                continue  # the common case: one write's ticks of a symbol lie in one bucket
            for _bucket, same in itertools.groupby(rows, key=lambda r: r[0] // BUCKET_MS):
                part = list(same)
                for i in range(0, len(part), BLOCK_ROWS):
                    chunk = part[i : i + BLOCK_ROWS]
                    blocks.append((symbol, chunk[0][0], chunk[-1][0], len(chunk), _ENCODE(chunk)))
        self._conn.executemany(self._insert, blocks)

    def write(self, batch: Batch) -> None:
        # Grouped here, in one loop with no call per tick: this loop is most of the history's
        # cost on the relay's core (~1 µs a tick, against ~6 for a row each).
        groups: dict[str, list[_Row]] = {}
        get = groups.get
        for u, recv_ms, provider in batch:
            row = (u.timestamp, recv_ms, u.kind, u.last_price, u.last_size, u.bid_price, u.bid_size,
                   u.ask_price, u.ask_size, u.provider or provider)  # fmt: skip
            group = get(u.symbol)
            if group is None:
                groups[u.symbol] = [row]
            else:
                group.append(row)
        try:
            self._conn.execute("BEGIN")
            self._insert_blocks(groups)
            self._conn.execute("COMMIT")
        except _ROW_ERRORS as exc:
            self.rollback()
            raise RejectedRows(f"{self._description}: {exc}") from exc
        except sqlite3.Error as exc:
            self.rollback()
            raise self._unavailable(exc) from exc

    def delete_before(self, cutoff_ms: int, max_rows: int) -> int:
        deleted = 0
        try:
            if self._legacy:
                legacy = [row[0] for row in self._conn.execute(self._legacy_symbols)]
            symbols = [row[0] for row in self._conn.execute(self._symbols)]
            self._conn.execute("BEGIN")
            if self._legacy:
                for symbol in legacy:
                    args = (symbol, cutoff_ms, max_rows - deleted)
                    deleted += self._conn.execute(self._legacy_delete, args).rowcount
                    if deleted >= max_rows:
                        break
            for symbol in symbols:
                if deleted >= max_rows:
                    break
                deleted += self._delete_symbol(symbol, cutoff_ms, max_rows - deleted)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.rollback()
            raise self._unavailable(exc) from exc
        return deleted

    def _delete_symbol(self, symbol: str, cutoff_ms: int, budget: int) -> int:
        """Up to ``budget`` ticks of ``symbol`` before the cutoff: whole blocks, then a block's front."""
        deleted = 0
        # A block holds at least one tick: `budget` blocks are enough to find `budget` ticks.
        for block_id, ts_max, first, n, blob in self._conn.execute(self._old, (symbol, cutoff_ms, budget)).fetchall():
            if ts_max < cutoff_ms and n <= budget - deleted:
                self._conn.execute(self._delete, (block_id,))
                deleted += n
            else:
                rows = _DECODE(blob)
                cut = 0
                while cut < n and rows[cut][0] < cutoff_ms and deleted + cut < budget:
                    cut += 1
                if cut == n:
                    self._conn.execute(self._delete, (block_id,))
                elif cut:
                    rest = rows[cut:]
                    self._conn.execute(self._trim, (rest[0][0], first + cut, n - cut, _ENCODE(rest), block_id))
                deleted += cut
            if deleted >= budget:
                break
        return deleted

    def _merged(
        self, symbol: str, start_ms: int, end_ms: int, after: Position | None, deadline: float | None = None
    ) -> Generator[tuple[int, int, _Row], None, None]:
        """``(ts, id, row)`` of every tick of ``symbol`` in ``[start_ms, end_ms)`` after ``after``, by (ts, id).

        The blocks' ticks, merged with an older relay's rows when the file has them. Close it to
        stop early: its cursors close with it.
        """
        lo = start_ms if after is None else max(start_ms, after[0])
        blocks = self._from_blocks(symbol, lo, end_ms, after, deadline)
        if not self._legacy:
            yield from blocks
            return
        ts0, id0 = after if after is not None else (lo, -1)
        cur = self._conn.execute(self._legacy_rows, (symbol, lo, end_ms, ts0, id0))
        legacy: Iterator[tuple[int, int, _Row]] = ((r[0], r[1], (r[0], *r[2:])) for r in iter(cur.fetchone, None))
        try:
            yield from heapq.merge(legacy, blocks)  # ids are unique: rows are never compared
        finally:
            blocks.close()
            cur.close()

    def _from_blocks(
        self, symbol: str, lo: int, end_ms: int, after: Position | None, deadline: float | None
    ) -> Generator[tuple[int, int, _Row], None, None]:
        """The blocks' ticks in ``[lo, end_ms)`` after ``after``, by (ts, id).

        Blocks come in ``ts_min`` order and are cut into runs that overlap in time (a block that
        starts after every tick before it starts a new run): a run of one block (the usual case:
        writes follow the clock) is its ticks as stored, a longer one is merged. Memory holds one
        run's ticks.
        """
        cur = self._conn.execute(self._blocks, (symbol, lo - lo % BUCKET_MS, end_ms, lo))
        run: list[tuple[int, int, int, int, str]] = []
        run_max = 0
        try:
            while blocks := cur.fetchmany(64):
                for block in blocks:
                    if deadline is not None and time.monotonic() > deadline:
                        raise QueryTimeout("the query ran past its time budget")
                    if run and block[1] > run_max:
                        yield from self._run(run, lo, end_ms, after)
                        run = []
                    run_max = block[2] if not run else max(run_max, block[2])
                    run.append(block)
            if run:
                yield from self._run(run, lo, end_ms, after)
        finally:
            cur.close()

    @staticmethod
    def _run(
        run: list[tuple[int, int, int, int, str]], lo: int, end_ms: int, after: Position | None
    ) -> Iterator[tuple[int, int, _Row]]:
        """The ticks of blocks ``(id, ts_min, ts_max, first, rows)`` in ``[lo, end_ms)`` after ``after``, by (ts, id)."""
        parts = []
        for block_id, ts_min, ts_max, first, blob in run:
            rows = _DECODE(blob)
            base = ID_BASE + block_id * BLOCK_ROWS + first
            ticks: Iterator[tuple[int, int, _Row]] = zip(map(_BY_TS, rows), itertools.count(base), rows)
            if ts_min < lo or ts_max >= end_ms or (after is not None and ts_min <= after[0]):
                ticks = (
                    t for t in ticks if lo <= t[0] < end_ms and (after is None or t[0] > after[0] or t[1] > after[1])
                )  # fmt: skip
            parts.append(ticks)
        return parts[0] if len(parts) == 1 else heapq.merge(*parts)

    def ticks(
        self, symbol: str, start_ms: int, end_ms: int, limit: int, after: Position | None
    ) -> list[tuple[Tick, Position]]:
        out: list[tuple[Tick, Position]] = []
        if limit <= 0:
            return out
        merged = self._merged(symbol, start_ms, end_ms, after)
        try:
            for ts, i, (_, rv, k, lp, ls, bp, bz, ap, az, pv) in merged:
                # Rows are in table order (bid before ask); Tick is in Update order (ask before bid).
                out.append((Tick(symbol, k, ts, rv, lp, ls, ap, az, bp, bz, pv), (ts, i)))
                if len(out) >= limit:
                    break
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        finally:
            merged.close()
        return out

    def _trade_rows(
        self, symbol: str, start_ms: int, end_ms: int, deadline: float | None
    ) -> Generator[TradeRow, None, None]:
        for ts, _i, (_, rv, kind, lp, ls, *_rest) in self._merged(symbol, start_ms, end_ms, None, deadline):
            if kind == "T" and lp is not None:
                yield (symbol, ts, lp, ls, rv)

    def trades(self, symbol: str, start_ms: int, end_ms: int, limit: int | None) -> list[TradeRow]:
        rows = self._trade_rows(symbol, start_ms, end_ms, None)
        out: list[TradeRow] = []
        try:
            for row in rows:
                out.append(row)
                if limit is not None and len(out) >= limit:
                    break
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        finally:
            rows.close()
        return out

    def trade_batches(
        self, symbol: str, start_ms: int, end_ms: int, batch: int, deadline: float
    ) -> Iterator[list[TradeRow]]:
        # SQLite calls the handler every N virtual-machine steps: a non-zero answer interrupts the
        # statement, so a scan of blocks stops at the deadline inside SQLite too; between blocks
        # the merge checks it itself.
        self._conn.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_STEPS)
        rows = self._trade_rows(symbol, start_ms, end_ms, deadline)
        try:
            out: list[TradeRow] = []
            for row in rows:
                out.append(row)
                if len(out) >= batch:
                    yield out
                    out = []
            if out:
                yield out
        except sqlite3.OperationalError as exc:
            if time.monotonic() > deadline:
                raise QueryTimeout(f"the query ran past its time budget ({exc})") from None
            raise self._unavailable(exc) from exc
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        finally:
            rows.close()
            self._conn.set_progress_handler(None, 0)

    def close(self) -> None:
        try:
            self._conn.close()
        except sqlite3.Error:
            pass  # closing a broken connection: nothing left to release
