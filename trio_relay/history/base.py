"""What every history backend provides, the row types queries return, and the errors.

A backend (:class:`HistoryBackend`) only knows how to open a :class:`HistoryConnection`; a
connection is synchronous (``sqlite3`` and ``psycopg`` are) and is used by ONE worker thread at
a time: its owner (the writer, or the query store) runs every call under its own
``trio.CapacityLimiter(1)``. Errors leave a connection as one of two exceptions, so the owner can
act without knowing the driver:

* :class:`HistoryUnavailable`: the database cannot be reached or refused the work (connection
  lost, locked, disk full...). The connection is closed and opened again later.
* :class:`RejectedRows`: the data itself was refused (a value out of range...). Retrying the same
  rows cannot help.

Neither message ever holds a DSN or its password (see :func:`redact`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, Protocol

import msgspec

from ..model import Update

__all__ = [
    "Tick",
    "TradeRow",
    "Batch",
    "COLUMNS",
    "rows_of",
    "HistoryBackend",
    "HistoryConnection",
    "HistoryError",
    "HistoryUnavailable",
    "RejectedRows",
    "InvalidCursor",
    "HistoryBusy",
    "QueryTimeout",
    "encode_cursor",
    "decode_cursor",
    "check_identifier",
    "redact",
]

# What the writer hands to a backend: each update with the wall-clock ms at which it arrived and
# the provider it came from (stored as ``update.provider or provider``; None: not known).
Batch = Sequence[tuple[Update, int, str | None]]

# The columns of a stored tick, in the order of :func:`rows_of` (PostgreSQL's table; SQLite's view).
COLUMNS: tuple[str, ...] = (
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
)


def rows_of(batch: Batch) -> Iterator[tuple[object, ...]]:
    """Every update of ``batch`` as a row of :data:`COLUMNS`, in order (its own provider wins).

    A generator: each row is consumed as it is made (a list of them costs more, in allocation
    and in the garbage collector's passes over the young tuples).
    """
    for u, recv_ms, provider in batch:
        yield (
            u.symbol,
            u.timestamp,
            recv_ms,
            u.kind,
            u.last_price,
            u.last_size,
            u.bid_price,
            u.bid_size,
            u.ask_price,
            u.ask_size,
            u.provider or provider,
        )


# A stored trade, as trio_relay.bars.TradeRow: (symbol, timestamp epoch ms, price, size, recv_ms).
TradeRow = tuple[str, int, float, float | None, int]

# (ts, id) of the last row of a page: where the next page starts.
Position = tuple[int, int]

_INT64_MAX: Final = (1 << 63) - 1
_IDENTIFIER: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
_CURSOR: Final = re.compile(r"^(-?\d{1,19}):(\d{1,19})$")


class Tick(msgspec.Struct, frozen=True, gc=False):
    """One stored update. ``None`` is kept as ``None`` (the provider did not say)."""

    symbol: str
    kind: str  # "T" | "Q" | "B"
    timestamp: int  # event time, UTC epoch ms (the provider's)
    recv_ms: int  # when the relay received it, UTC epoch ms (the relay's wall clock)
    last_price: float | None = None
    last_size: float | None = None
    ask_price: float | None = None
    ask_size: float | None = None
    bid_price: float | None = None
    bid_size: float | None = None
    # The provider it came from ("fmp", "sim", "replay"...); None for ticks stored before the
    # column existed (a database created by an older relay gets the column, empty, at start).
    provider: str | None = None


class HistoryError(Exception):
    """Base of the history store's errors."""


class HistoryUnavailable(HistoryError):
    """The database cannot be used right now (down, locked, full...); the message is safe to show."""


class RejectedRows(HistoryError):
    """The database refused the rows themselves (not the connection): retrying them cannot help."""


class HistoryBusy(HistoryUnavailable):
    """Every query slot stayed taken for ``history.query_queue_timeout``: try again later."""


class QueryTimeout(HistoryError):
    """A query ran past its time budget (``history.query_timeout``) inside the database.

    Not :class:`HistoryUnavailable`: the connection is fine, the request was too big.
    """


class InvalidCursor(HistoryError, ValueError):
    """A pagination cursor that this store did not make."""


class HistoryConnection(Protocol):
    """One open database connection. Synchronous; one thread at a time."""

    def write(self, batch: Batch) -> None:
        """Store every row of ``batch`` in one transaction (all or none)."""

    def delete_before(self, cutoff_ms: int, max_rows: int) -> int:
        """Delete up to ``max_rows`` ticks with ``ts < cutoff_ms``; how many were deleted."""
        ...

    def ticks(
        self, symbol: str, start_ms: int, end_ms: int, limit: int, after: Position | None
    ) -> list[tuple[Tick, Position]]:
        """Up to ``limit`` ticks of ``symbol`` in ``[start_ms, end_ms)`` after ``after``, by (ts, id)."""
        ...

    def trades(self, symbol: str, start_ms: int, end_ms: int, limit: int | None) -> list[TradeRow]:
        """The trades (kind T with a price) of ``symbol`` in ``[start_ms, end_ms)``, by (ts, id)."""
        ...

    def trade_batches(
        self, symbol: str, start_ms: int, end_ms: int, batch: int, deadline: float
    ) -> Iterator[list[TradeRow]]:
        """The trades of :meth:`trades` (no limit), streamed from the cursor ``batch`` rows at a time.

        Memory holds one batch, however many rows match. ``deadline`` (``time.monotonic()``) bounds
        the time spent inside the database on one batch (a scan over rows that are not trades
        returns nothing for long): past it, :class:`QueryTimeout`. Close the iterator to stop early.
        """
        ...

    def close(self) -> None: ...


class HistoryBackend(Protocol):
    """Opens connections to one database (creating the schema when it is missing)."""

    @property
    def description(self) -> str:
        """What the backend writes to, safe to log and show (no password)."""
        ...

    def connect(self) -> HistoryConnection:
        """Open a connection (blocking: call it in a worker thread). Raises :class:`HistoryUnavailable`."""
        ...


def encode_cursor(position: Position) -> str:
    ts, row_id = position
    return f"{ts}:{row_id}"


def decode_cursor(cursor: str) -> Position:
    """The position in a cursor made by :func:`encode_cursor`; :class:`InvalidCursor` otherwise."""
    m = _CURSOR.match(cursor)
    if m is None:
        raise InvalidCursor(f"invalid cursor {cursor[:40]!r}")
    ts, row_id = int(m[1]), int(m[2])
    if not -_INT64_MAX - 1 <= ts <= _INT64_MAX or row_id > _INT64_MAX:
        raise InvalidCursor(f"invalid cursor {cursor[:40]!r}")
    return ts, row_id


def check_identifier(name: str, what: str) -> str:
    """A table or schema name: letters, digits and _ (it is put into SQL, quoted)."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"{what} {name!r}: use letters, digits and _ (at most 40, not starting with a digit)")
    return name


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret and any ``user:password@`` of a URL replaced by ``***``."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.IGNORECASE)
