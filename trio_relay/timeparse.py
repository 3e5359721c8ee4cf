"""Times given by people and programs: ISO 8601, epoch milliseconds, or relative to now, to epoch ms (UTC)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

__all__ = ["TimeError", "parse_time", "MAX_MS"]

# Epoch values below this are taken for seconds, a common mistake: refused with a hint.
_MS_FLOOR = 100_000_000_000  # 1973-03-03 in ms; 5138-11-16 in seconds
# The last millisecond of year 9999: later is no time anyone means, and beyond 64 bits no
# database can hold it (an absurd number must get a clear 400, not an overflow deep inside).
MAX_MS = 253_402_300_799_999
_INTEGER = re.compile(r"-?[0-9]{1,30}")  # ASCII digits only: int() would take "²" or "١" too
_MAX_TEXT = 64
# "-90s", "-5m", "-2h", "-1d": that long before now (examples that work on any day).
_RELATIVE = re.compile(r"-([0-9]{1,7})([smhd])")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class TimeError(ValueError):
    """A time that cannot be read; the message says what was expected."""


def parse_time(raw: str, name: str, now_ms: int | None = None) -> int:
    """``raw`` as epoch ms; :class:`TimeError` otherwise.

    ``raw`` is ISO 8601 (without an offset: UTC; a date alone: its midnight UTC), an integer of
    epoch milliseconds, ``now``, or a time before now: ``-90s``, ``-5m``, ``-2h``, ``-1d``
    (``now_ms``, the wall clock by default, is "now").
    """
    text = raw.strip()
    if not text:
        raise TimeError(f"'{name}' is empty; give ISO 8601 (2024-11-10T14:30:00Z) or epoch milliseconds")
    if len(text) > _MAX_TEXT:
        raise TimeError(f"'{name}' is too long to be a time ({len(text)} characters)")
    relative = _RELATIVE.fullmatch(text)
    if relative or text == "now":
        now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
        return max(0, now - int(relative.group(1)) * _UNIT_MS[relative.group(2)]) if relative else now
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
            f"'{name}'={text[:40]!r} is not a time; give ISO 8601 (2024-11-10T14:30:00Z), epoch milliseconds, or -5m (before now)"
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
