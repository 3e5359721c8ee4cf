"""The embedded backend: one SQLite file, ``<data_dir>/history.sqlite3``, in WAL mode.

WAL lets the query connection read while the writer's connection writes; ``synchronous=NORMAL``
makes a commit cost no fsync (the WAL is synced at checkpoints): a power cut may lose the last
commits, never corrupt the file. Each batch is one ``executemany`` in one transaction; a value an
update does not have is bound as NaN, which SQLite stores as NULL (cheaper to bind than None:
see :func:`~trio_relay.history.base.rows_of`).

``id`` is the rowid (monotonic: rows are only ever deleted from the old end, per symbol), and
the ``(symbol, ts)`` index carries the rowid, so ``ORDER BY ts, id`` of one symbol is a plain
index range scan, and so is retention (``symbol = ? AND ts < ?``).
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from ..private_files import private_file
from .base import (
    COLUMNS,
    Batch,
    HistoryUnavailable,
    Position,
    QueryTimeout,
    RejectedRows,
    Tick,
    TradeRow,
    check_identifier,
    rows_of,
)

__all__ = ["SqliteBackend", "SQLITE_FILENAME"]

SQLITE_FILENAME: Final = "history.sqlite3"

# Errors that come from the rows of a batch, not from the database being unusable.
_ROW_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,  # "Error binding parameter": an unsupported type
    OverflowError,  # an int beyond 64 bits
    TypeError,
    ValueError,  # includes UnicodeEncodeError (a lone surrogate)
)


# An absent price or size as bound: SQLite stores a NaN as NULL (see rows_of).
_ABSENT: Final = math.nan

# Virtual-machine steps between two deadline checks of a streamed query (a few µs of work).
_PROGRESS_STEPS: Final = 10_000


class SqliteBackend:
    """Ticks in ``<data_dir>/<filename>`` (the directory is created if missing)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        filename: str = SQLITE_FILENAME,
        table: str = "ticks",
        busy_timeout: float = 5.0,
        cache_mb: int = 64,
        wal_checkpoint_mb: int = 64,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / filename
        self.table = check_identifier(table, "table")
        # How long a statement waits for a lock held by another process before it fails.
        self.busy_timeout = busy_timeout
        # Page cache per connection (allocated as used). Inserts touch the tail leaf page of every
        # symbol in the (symbol, ts) index: with SQLite's default 2 MB, 500 symbols already thrash
        # it (58k rows/s here, against 130k with 64 MB).
        self.cache_mb = cache_mb
        # WAL size that triggers a checkpoint (SQLite's default: 4 MB); the file is truncated back
        # to it afterwards. Fewer, larger checkpoints: about 1.5x the write rate with many symbols.
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
                f'CREATE TABLE IF NOT EXISTS "{t}" ('
                "id INTEGER PRIMARY KEY, symbol TEXT NOT NULL, ts INTEGER NOT NULL, recv_ms INTEGER NOT NULL,"
                " kind TEXT NOT NULL, last_price REAL, last_size REAL, bid_price REAL, bid_size REAL,"
                " ask_price REAL, ask_size REAL, provider TEXT)"
            )
            conn.execute(f'CREATE INDEX IF NOT EXISTS "{t}_symbol_ts" ON "{t}" (symbol, ts)')
            _migrate(conn, t)
        except sqlite3.Error as exc:
            conn.close()
            raise HistoryUnavailable(f"{self.description}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return _SqliteConnection(conn, self.table, self.description)


def _migrate(conn: sqlite3.Connection, table: str) -> None:
    """Bring a table made by an older relay up to date: the ``provider`` column (NULL in old rows)."""
    columns = {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}
    if "provider" not in columns:
        conn.execute(f'ALTER TABLE "{table}" ADD COLUMN provider TEXT')  # instant: no row is rewritten


class _SqliteConnection:
    def __init__(self, conn: sqlite3.Connection, table: str, description: str) -> None:
        self._conn = conn
        self._description = description
        t = table
        self._insert = f'INSERT INTO "{t}" ({", ".join(COLUMNS)}) VALUES ({", ".join("?" * len(COLUMNS))})'
        columns = (
            "id, symbol, ts, recv_ms, kind, last_price, last_size, bid_price, bid_size, ask_price, ask_size, provider"
        )
        self._ticks = f'SELECT {columns} FROM "{t}" WHERE symbol = ? AND ts >= ? AND ts < ? ORDER BY ts, id LIMIT ?'
        # After a cursor (ts0, id0): ts >= max(start, ts0) bounds the index range, the OR trims ts0's rows.
        self._ticks_after = (
            f'SELECT {columns} FROM "{t}" WHERE symbol = ? AND ts >= ? AND ts < ? AND (ts > ? OR id > ?)'
            " ORDER BY ts, id LIMIT ?"
        )
        self._trades = (
            f'SELECT symbol, ts, last_price, last_size, recv_ms FROM "{t}"'
            " WHERE symbol = ? AND ts >= ? AND ts < ? AND kind = 'T' AND last_price IS NOT NULL ORDER BY ts, id LIMIT ?"
        )
        # Every symbol in the table, one index seek each (a "loose index scan").
        self._symbols = (
            f'WITH RECURSIVE s(symbol) AS (SELECT (SELECT min(symbol) FROM "{t}")'
            f' UNION ALL SELECT (SELECT min(symbol) FROM "{t}" WHERE symbol > s.symbol) FROM s WHERE s.symbol IS NOT NULL)'
            " SELECT symbol FROM s WHERE symbol IS NOT NULL"
        )
        self._delete = f'DELETE FROM "{t}" WHERE id IN (SELECT id FROM "{t}" WHERE symbol = ? AND ts < ? LIMIT ?)'

    def _unavailable(self, exc: BaseException) -> HistoryUnavailable:
        return HistoryUnavailable(f"{self._description}: {exc}")

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the failure being reported is the one that matters; the owner reconnects

    def write(self, batch: Batch) -> None:
        try:
            rows = rows_of(batch, _ABSENT)
            self._conn.execute("BEGIN")
            self._conn.executemany(self._insert, rows)
            self._conn.execute("COMMIT")
        except _ROW_ERRORS as exc:
            self._rollback()
            raise RejectedRows(f"{self._description}: {exc}") from exc
        except sqlite3.Error as exc:
            self._rollback()
            raise self._unavailable(exc) from exc

    def delete_before(self, cutoff_ms: int, max_rows: int) -> int:
        deleted = 0
        try:
            symbols = [row[0] for row in self._conn.execute(self._symbols)]
            self._conn.execute("BEGIN")
            for symbol in symbols:
                deleted += self._conn.execute(self._delete, (symbol, cutoff_ms, max_rows - deleted)).rowcount
                if deleted >= max_rows:
                    break
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._unavailable(exc) from exc
        return deleted

    def ticks(
        self, symbol: str, start_ms: int, end_ms: int, limit: int, after: Position | None
    ) -> list[tuple[Tick, Position]]:
        try:
            if after is None:
                cur = self._conn.execute(self._ticks, (symbol, start_ms, end_ms, limit))
            else:
                ts0, id0 = after
                cur = self._conn.execute(self._ticks_after, (symbol, max(start_ms, ts0), end_ms, ts0, id0, limit))
            rows = cur.fetchall()
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        # Columns are in table order (bid before ask); Tick is in Update order (ask before bid).
        return [
            (Tick(s, k, ts, rv, lp, ls, ap, az, bp, bz, pv), (ts, i))
            for i, s, ts, rv, k, lp, ls, bp, bz, ap, az, pv in rows
        ]

    def trades(self, symbol: str, start_ms: int, end_ms: int, limit: int | None) -> list[TradeRow]:
        try:
            params = (symbol, start_ms, end_ms, -1 if limit is None else limit)  # LIMIT -1: no limit
            rows: list[TradeRow] = self._conn.execute(self._trades, params).fetchall()
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        return rows

    def trade_batches(
        self, symbol: str, start_ms: int, end_ms: int, batch: int, deadline: float
    ) -> Iterator[list[TradeRow]]:
        # SQLite calls the handler every N virtual-machine steps: a non-zero answer interrupts the
        # statement, so a scan that finds no trades for seconds still stops at the deadline.
        self._conn.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_STEPS)
        try:
            cur = self._conn.execute(self._trades, (symbol, start_ms, end_ms, -1))
            try:
                while rows := cur.fetchmany(batch):
                    yield rows
            finally:
                cur.close()
        except sqlite3.OperationalError as exc:
            if time.monotonic() > deadline:
                raise QueryTimeout(f"the query ran past its time budget ({exc})") from None
            raise self._unavailable(exc) from exc
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        finally:
            self._conn.set_progress_handler(None, 0)

    def close(self) -> None:
        try:
            self._conn.close()
        except sqlite3.Error:
            pass  # closing a broken connection: nothing left to release
