"""The relay's own small database (alert rules, fired alerts, portfolios): one SQLite file.

Used from Trio through :meth:`AppStore.call`, which runs a function with the connection in a
worker thread, one at a time (a :class:`trio.CapacityLimiter` of 1), so the connection is only
ever used by one thread at once. Each feature creates its tables with :meth:`AppStore.migrate`
(``CREATE TABLE IF NOT EXISTS ...``). WAL mode: readers do not wait for the writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import trio

from .private_files import private_file

__all__ = ["AppStore", "APP_DB"]

APP_DB = "app.sqlite3"

T = TypeVar("T")


class AppStore:
    """One SQLite connection (opened on first use), used by one worker thread at a time."""

    def __init__(self, data_dir: str | Path, filename: str = APP_DB) -> None:
        self.path = Path(data_dir) / filename
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"AppStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            private_file(self.path)  # 0600 in a 0700 folder: webhook URLs and positions are private
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
        return self._conn

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in a worker thread; one call at a time. A transaction is ``fn``'s."""

        def run() -> T:
            return fn(self._connect())

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def migrate(self, statements: Iterable[str]) -> None:
        """Create what is missing (idempotent statements, run in one transaction)."""
        script = list(statements)

        def run(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN")
                for statement in script:
                    conn.execute(statement)

        await self.call(run)

    async def aclose(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await trio.to_thread.run_sync(close, limiter=self._limiter)
