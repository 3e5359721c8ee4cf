"""Tick history: every update written to SQLite (embedded) or PostgreSQL, and queried back.

* :class:`HistoryWriter`: the task that writes what the hub offers, in batches, never making the
  hub wait (bounded buffer, drops counted), surviving a database that is slow or down.
* :class:`HistoryStore`: paginated tick queries and the trades of a window (for bars).
* :func:`make_backend`: the backend ``[history]`` configures (None when it is ``off``).

Wiring (the daemon)::

    backend = make_backend(config.history)
    if backend is not None:
        writer = HistoryWriter.from_config(config.history, backend)
        await nursery.start(writer.run)
        hub.add_callback(lambda u: writer.offer(u, time.time_ns() // 1_000_000))
        store = HistoryStore(backend)  # closed with `await store.aclose()`
"""

from __future__ import annotations

from ..config import HistoryConfig
from .base import (
    HistoryBackend,
    HistoryBusy,
    HistoryConnection,
    HistoryError,
    HistoryUnavailable,
    InvalidCursor,
    QueryTimeout,
    RejectedRows,
    Tick,
    TradeRow,
)
from .postgres import PostgresBackend
from .sqlite import SQLITE_FILENAME, SqliteBackend
from .store import HistoryStore, QueryBudget
from .writer import HistoryWriter, WriterState

__all__ = [
    "HistoryWriter",
    "WriterState",
    "HistoryStore",
    "HistoryBackend",
    "HistoryConnection",
    "SqliteBackend",
    "PostgresBackend",
    "SQLITE_FILENAME",
    "Tick",
    "TradeRow",
    "HistoryError",
    "HistoryUnavailable",
    "RejectedRows",
    "InvalidCursor",
    "HistoryBusy",
    "QueryTimeout",
    "QueryBudget",
    "make_backend",
]


def make_backend(config: HistoryConfig, *, table: str | None = None) -> HistoryBackend | None:
    """The backend ``config`` asks for; None when history is off. Connects to nothing yet."""
    table = table or config.table
    if config.backend == "sqlite":
        return SqliteBackend(config.data_dir, table=table)
    if config.backend == "postgres":
        return PostgresBackend(config.postgres_dsn, table=table)
    return None
