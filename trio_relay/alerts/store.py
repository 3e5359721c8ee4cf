"""Alert rules and fired alerts in the relay's SQLite file (:class:`~trio_relay.appstore.AppStore`).

Two tables, prefixed ``alert_`` (the file is shared with other features):

- ``alert_rules``: one row per rule, its definition as JSON plus the runtime columns ``state``,
  ``fired_at`` and ``fire_count``. The row is written when the rule is created, when it fires
  (:meth:`AlertStore.record_fired`) and when its state changes without firing
  (:meth:`AlertStore.save_state`: armed -> active, the end of a cooldown), so after a restart
  every rule is in the state it had: a one-shot rule that fired stays fired, a re-arming one
  finishes its cooldown, and an ``active`` rule (the price was on the near side) fires on the
  first update beyond its threshold: a crossing that spans the restart fires once.
- ``alert_fired``: the fired alerts, newest kept: at most ``keep_fired`` per user, older ones
  are deleted as new ones arrive.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Final

import msgspec

from ..appstore import AppStore
from .rules import FiredAlert, Rule, decode_rule, encode_rule

__all__ = ["AlertStore"]

log = logging.getLogger(__name__)

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS alert_rules (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        symbol TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        rule TEXT NOT NULL,
        state TEXT NOT NULL,
        fired_at INTEGER,
        fire_count INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS alert_rules_owner ON alert_rules (owner)",
    """CREATE TABLE IF NOT EXISTS alert_fired (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        rule_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        symbol TEXT NOT NULL,
        fired_at INTEGER NOT NULL,
        alert TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS alert_fired_owner ON alert_fired (owner, seq)",
)

_fired_encoder: Final = msgspec.json.Encoder()
_fired_decoder: Final = msgspec.json.Decoder(FiredAlert)


class AlertStore:
    """Rules and fired alerts on an :class:`AppStore`. Tables are created on first use."""

    def __init__(self, store: AppStore, *, keep_fired: int = 1000) -> None:
        self.store = store
        self.keep_fired = keep_fired
        self._ready = False

    async def migrate(self) -> None:
        """Create the tables if missing (every method does it on first use)."""
        if not self._ready:
            await self.store.migrate(_SCHEMA)
            self._ready = True

    async def load(self) -> list[Rule]:
        """Every stored rule, oldest first, with its stored runtime state (``engine.load(...)``).

        A row that cannot be decoded is logged and skipped: one bad row must not stop the relay.
        """
        await self.migrate()

        def run(conn: sqlite3.Connection) -> list[tuple[str, str, str, int | None, int]]:
            return conn.execute(
                "SELECT id, rule, state, fired_at, fire_count FROM alert_rules ORDER BY created_at, rowid"
            ).fetchall()

        rules: list[Rule] = []
        for rule_id, raw, state, fired_at, fire_count in await self.store.call(run):
            try:
                rule = decode_rule(raw)
            except msgspec.DecodeError as e:
                log.error("[ALERTS] stored rule %s skipped: %s", rule_id, e)
                continue
            rule.state, rule.fired_at, rule.fire_count = state, fired_at, fire_count
            rules.append(rule)
        return rules

    async def save_rule(self, rule: Rule) -> None:
        """Insert or replace the rule, runtime state included."""
        await self.migrate()
        row = (
            rule.id,
            rule.owner,
            rule.symbol,
            rule.created_at,
            encode_rule(rule).decode(),
            rule.state,
            rule.fired_at,
            rule.fire_count,
        )

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO alert_rules VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

        await self.store.call(run)

    async def save_state(self, rule: Rule) -> None:
        """Update the runtime state of a stored rule (a deleted rule stays deleted)."""
        await self.migrate()
        row = (rule.state, rule.fired_at, rule.fire_count, rule.id)

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE alert_rules SET state = ?, fired_at = ?, fire_count = ? WHERE id = ?", row)

        await self.store.call(run)

    async def delete_rule(self, rule_id: str) -> bool:
        """Delete a rule (its fired alerts stay in the history); False if there was none."""
        await self.migrate()

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM alert_rules WHERE id = ?", (rule_id,)).rowcount > 0

        return await self.store.call(run)

    async def record_fired(self, alert: FiredAlert, rule: Rule | None = None) -> None:
        """Append a fired alert and, in the same transaction, the runtime state of its ``rule``.

        Keeps the newest ``keep_fired`` alerts of the owner.
        """
        await self.migrate()
        row = (
            alert.id,
            alert.rule_id,
            alert.owner,
            alert.symbol,
            alert.fired_at,
            _fired_encoder.encode(alert).decode(),
        )
        state = None if rule is None else (rule.state, rule.fired_at, rule.fire_count, rule.id)
        keep = self.keep_fired

        def run(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN")
                conn.execute(
                    "INSERT OR IGNORE INTO alert_fired (id, rule_id, owner, symbol, fired_at, alert) VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
                conn.execute(
                    "DELETE FROM alert_fired WHERE owner = ? AND seq <= "
                    "(SELECT seq FROM alert_fired WHERE owner = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (alert.owner, alert.owner, keep),
                )
                if state is not None:
                    conn.execute("UPDATE alert_rules SET state = ?, fired_at = ?, fire_count = ? WHERE id = ?", state)

        await self.store.call(run)

    async def fired(self, owner: str, *, limit: int = 50, rule_id: str | None = None) -> list[FiredAlert]:
        """``owner``'s fired alerts, newest first, at most ``limit`` (optionally of one rule)."""
        await self.migrate()

        def run(conn: sqlite3.Connection) -> list[tuple[str]]:
            args: tuple[object, ...]
            if rule_id is None:
                sql, args = "SELECT alert FROM alert_fired WHERE owner = ? ORDER BY seq DESC LIMIT ?", (owner, limit)
            else:
                sql = "SELECT alert FROM alert_fired WHERE owner = ? AND rule_id = ? ORDER BY seq DESC LIMIT ?"
                args = (owner, rule_id, limit)
            return conn.execute(sql, args).fetchall()

        return [_fired_decoder.decode(raw) for (raw,) in await self.store.call(run)]
