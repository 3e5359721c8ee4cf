"""Times given by people and programs: ISO 8601 or epoch milliseconds, to epoch ms (UTC)."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["TimeError", "parse_time"]

# Epoch values below this are taken for seconds, a common mistake: refused with a hint.
_MS_FLOOR = 100_000_000_000  # 1973-03-03 in ms; 5138-11-16 in seconds


class TimeError(ValueError):
    """A time that cannot be read; the message says what was expected."""


def parse_time(raw: str, name: str) -> int:
    """``raw`` (ISO 8601, or an integer of epoch milliseconds) as epoch ms; :class:`TimeError` otherwise.

    ISO times without an offset are UTC; a date alone is its midnight UTC.
    """
    text = raw.strip()
    if not text:
        raise TimeError(f"'{name}' is empty; give ISO 8601 (2024-11-10T14:30:00Z) or epoch milliseconds")
    if text.lstrip("-").isdigit():
        value = int(text)
        if 0 <= value < _MS_FLOOR:
            raise TimeError(f"'{name}'={text} looks like seconds; epoch times here are milliseconds ({value}000?)")
        if value < 0:
            raise TimeError(f"'{name}' must not be negative")
        return value
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TimeError(
            f"'{name}'={text[:40]!r} is not a time; give ISO 8601 (2024-11-10T14:30:00Z) or epoch milliseconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)
