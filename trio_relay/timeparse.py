"""Times given by people and programs: ISO 8601 or epoch milliseconds, to epoch ms (UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = ["TimeError", "parse_time", "MAX_MS"]

# Epoch values below this are taken for seconds, a common mistake: refused with a hint.
_MS_FLOOR = 100_000_000_000  # 1973-03-03 in ms; 5138-11-16 in seconds
# The last millisecond of year 9999: later is no time anyone means, and beyond 64 bits no
# database can hold it (an absurd number must get a clear 400, not an overflow deep inside).
MAX_MS = 253_402_300_799_999
_INTEGER = re.compile(r"-?[0-9]{1,30}")  # ASCII digits only: int() would take "²" or "١" too
_MAX_TEXT = 64


class TimeError(ValueError):
    """A time that cannot be read; the message says what was expected."""


def parse_time(raw: str, name: str) -> int:
    """``raw`` (ISO 8601, or an integer of epoch milliseconds) as epoch ms; :class:`TimeError` otherwise.

    ISO times without an offset are UTC; a date alone is its midnight UTC.
    """
    text = raw.strip()
    if not text:
        raise TimeError(f"'{name}' is empty; give ISO 8601 (2024-11-10T14:30:00Z) or epoch milliseconds")
    if len(text) > _MAX_TEXT:
        raise TimeError(f"'{name}' is too long to be a time ({len(text)} characters)")
    if _INTEGER.fullmatch(text):
        value = int(text)
        if value > MAX_MS:
            raise TimeError(f"'{name}'={text[:24]} is after the year 9999; epoch times here are milliseconds")
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
        when = when.replace(tzinfo=UTC)
    try:
        value = int(when.timestamp() * 1000)
    except (OverflowError, ValueError, OSError):  # year 1 or 9999 with an offset beyond the calendar
        raise TimeError(f"'{name}'={text[:40]!r} is out of range") from None
    if not 0 <= value <= MAX_MS:
        raise TimeError(f"'{name}'={text[:40]!r} is out of range (1970 to 9999)")
    return value
