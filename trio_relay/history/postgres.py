"""The production backend: PostgreSQL through psycopg 3 (synchronous, used from worker threads).

A batch is one ``COPY ... FROM STDIN`` (binary) in one transaction, far cheaper per row than
INSERTs. The table has the same columns as the SQLite one; ``id`` is an identity column (its
sequence hands the one writer session ascending ranges, so id order is arrival order), and the
``(symbol, ts, id)`` index serves the paginated queries, the trades of a window and retention
as index range scans. The schema is created if missing, under an advisory lock so that two
connections (or two relays) starting together do not race on ``CREATE``.

The DSN may hold a password: it is never part of an error message, a log line or a repr.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

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
    redact,
    rows_of,
)

__all__ = ["PostgresBackend"]

_ROW_ERRORS: Final = (psycopg.DataError, psycopg.IntegrityError, OverflowError, TypeError, ValueError)
_COPY_TYPES: Final = [
    "text",
    "int8",
    "int8",
    "text",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "text",
]


class PostgresBackend:
    """Ticks in ``[schema.]table`` of the database at ``dsn`` (created if missing).

    ``table`` and ``schema`` exist so that tests (and several relays sharing one database) can
    keep their ticks apart.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "ticks",
        schema: str | None = None,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
    ) -> None:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            raise ValueError(f"invalid PostgreSQL DSN: {redact(str(exc), [dsn])}") from None
        self._dsn = dsn
        self._secrets = [dsn, str(params.get("password") or "")]
        self.table = check_identifier(table, "table")
        self.schema = check_identifier(schema, "schema") if schema is not None else None
        self.statement_timeout = statement_timeout
        # Bounded waits even when the DSN says nothing: a connect to a black-holed host, and a
        # peer that vanished mid-COPY (unacknowledged data), fail instead of hanging the thread.
        self._connect_kwargs: dict[str, Any] = {}
        if "connect_timeout" not in params:
            self._connect_kwargs["connect_timeout"] = max(1, round(connect_timeout))
        if "tcp_user_timeout" not in params:
            self._connect_kwargs["tcp_user_timeout"] = max(1000, round(statement_timeout * 1000))
        if "application_name" not in params:
            self._connect_kwargs["application_name"] = "trio-relay history"
        dbname = params.get("dbname") or params.get("user") or ""
        where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}/{dbname}"
        self._description = f"postgres {where} table {self.qualified_name}"

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table

    @property
    def description(self) -> str:
        return self._description

    def __repr__(self) -> str:
        return f"PostgresBackend({self._description!r})"

    def redact(self, text: str) -> str:
        """``text`` without the DSN or its password."""
        return redact(text, self._secrets)

    def _message(self, exc: BaseException) -> str:
        return f"{self._description}: {self.redact(' '.join(str(exc).split()))}"  # one line

    def _unavailable(self, exc: BaseException) -> HistoryUnavailable:
        return HistoryUnavailable(self._message(exc))

    def connect(self) -> _PostgresConnection:
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, **self._connect_kwargs)
        except psycopg.Error as exc:
            raise self._unavailable(exc) from None  # no chained driver error: it may quote the DSN
        try:
            conn.execute(
                sql.SQL("SET statement_timeout = {}").format(sql.Literal(round(self.statement_timeout * 1000)))
            )
            table = sql.Identifier(self.schema, self.table) if self.schema else sql.Identifier(self.table)
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"trio_relay.history.{self.qualified_name}"]
                )
                if self.schema:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} ("
                        "id BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1000), symbol TEXT NOT NULL, ts BIGINT NOT NULL,"
                        " recv_ms BIGINT NOT NULL, kind TEXT NOT NULL, last_price DOUBLE PRECISION,"
                        " last_size DOUBLE PRECISION, bid_price DOUBLE PRECISION, bid_size DOUBLE PRECISION,"
                        " ask_price DOUBLE PRECISION, ask_size DOUBLE PRECISION, provider TEXT)"
                    ).format(table)
                )
                # A table made by an older relay: the provider column, NULL in old rows (no rewrite).
                conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS provider TEXT").format(table))
                conn.execute(
                    sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (symbol, ts, id)").format(
                        sql.Identifier(f"{self.table}_symbol_ts_id"), table
                    )
                )
        except psycopg.Error as exc:
            conn.close()
            raise self._unavailable(exc) from None
        except BaseException:
            conn.close()
            raise
        return _PostgresConnection(conn, table, self)


class _PostgresConnection:
    def __init__(self, conn: psycopg.Connection[Any], table: sql.Identifier, backend: PostgresBackend) -> None:
        self._conn = conn
        self._backend = backend
        t = table
        names = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        self._copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(t, names)
        columns = sql.SQL(
            "id, symbol, ts, recv_ms, kind, last_price, last_size, bid_price, bid_size, ask_price, ask_size, provider"
        )
        self._ticks = sql.SQL(
            "SELECT {} FROM {} WHERE symbol = %s AND ts >= %s AND ts < %s ORDER BY ts, id LIMIT %s"
        ).format(columns, t)
        self._ticks_after = sql.SQL(
            "SELECT {} FROM {} WHERE symbol = %s AND ts >= %s AND ts < %s AND (ts, id) > (%s, %s) ORDER BY ts, id LIMIT %s"
        ).format(columns, t)
        self._trades = sql.SQL(
            "SELECT symbol, ts, last_price, last_size, recv_ms FROM {}"
            " WHERE symbol = %s AND ts >= %s AND ts < %s AND kind = 'T' AND last_price IS NOT NULL ORDER BY ts, id LIMIT %s"
        ).format(t)
        self._symbols = sql.SQL(
            "WITH RECURSIVE s(symbol) AS (SELECT (SELECT min(symbol) FROM {t})"
            " UNION ALL SELECT (SELECT min(symbol) FROM {t} WHERE symbol > s.symbol) FROM s WHERE s.symbol IS NOT NULL)"
            " SELECT symbol FROM s WHERE symbol IS NOT NULL"
        ).format(t=t)
        self._delete = sql.SQL(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE symbol = %s AND ts < %s LIMIT %s))"
        ).format(t=t)

    def write(self, batch: Batch) -> None:
        try:
            with self._conn.transaction(), self._conn.cursor() as cur, cur.copy(self._copy) as copy:
                copy.set_types(_COPY_TYPES)
                write_row = copy.write_row
                for row in rows_of(batch):
                    write_row(row)
        except _ROW_ERRORS as exc:
            if self._conn.broken:
                raise self._backend._unavailable(exc) from None
            raise RejectedRows(self._backend._message(exc)) from None
        except psycopg.Error as exc:
            raise self._backend._unavailable(exc) from None

    def delete_before(self, cutoff_ms: int, max_rows: int) -> int:
        deleted = 0
        try:
            symbols = [row[0] for row in self._conn.execute(self._symbols)]
            with self._conn.transaction():
                for symbol in symbols:
                    deleted += self._conn.execute(self._delete, (symbol, cutoff_ms, max_rows - deleted)).rowcount
                    if deleted >= max_rows:
                        break
        except psycopg.Error as exc:
            raise self._backend._unavailable(exc) from None
        return deleted

    def ticks(
        self, symbol: str, start_ms: int, end_ms: int, limit: int, after: Position | None
    ) -> list[tuple[Tick, Position]]:
        try:
            if after is None:
                rows = self._conn.execute(self._ticks, (symbol, start_ms, end_ms, limit)).fetchall()
            else:
                rows = self._conn.execute(self._ticks_after, (symbol, start_ms, end_ms, *after, limit)).fetchall()
        except psycopg.Error as exc:
            raise self._backend._unavailable(exc) from None
        # Columns are in table order (bid before ask); Tick is in Update order (ask before bid).
        return [
            (Tick(s, k, ts, rv, lp, ls, ap, az, bp, bz, pv), (ts, i))
            for i, s, ts, rv, k, lp, ls, bp, bz, ap, az, pv in rows
        ]

    def trades(self, symbol: str, start_ms: int, end_ms: int, limit: int | None) -> list[TradeRow]:
        try:
            rows: list[TradeRow] = self._conn.execute(self._trades, (symbol, start_ms, end_ms, limit)).fetchall()
        except psycopg.Error as exc:
            raise self._backend._unavailable(exc) from None
        return rows

    def trade_batches(
        self, symbol: str, start_ms: int, end_ms: int, batch: int, deadline: float
    ) -> Iterator[list[TradeRow]]:
        # A server-side cursor (it lives in a transaction): the server keeps the result, the
        # relay holds one batch. Each FETCH is bounded by the deadline left (SET LOCAL).
        try:
            with self._conn.transaction():
                left_ms = max(1, round((deadline - time.monotonic()) * 1000))
                self._conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(left_ms)))
                with self._conn.cursor(name="trio_relay_trades") as cur:
                    cur.execute(self._trades, (symbol, start_ms, end_ms, None))
                    while rows := cur.fetchmany(batch):
                        yield rows
        except psycopg.errors.QueryCanceled:
            raise QueryTimeout("the query ran past its time budget") from None
        except psycopg.Error as exc:
            raise self._backend._unavailable(exc) from None

    def close(self) -> None:
        try:
            self._conn.close()
        except psycopg.Error:
            pass  # closing a broken connection: nothing left to release
