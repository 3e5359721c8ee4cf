"""Times in query strings: ISO 8601 or epoch milliseconds."""

from __future__ import annotations

import pytest

from trio_relay.timeparse import TimeError, parse_time

T = 1_731_249_000_000  # 2024-11-10T14:30:00Z


@pytest.mark.parametrize(
    "raw",
    [
        "2024-11-10T14:30:00Z",
        "2024-11-10T14:30:00+00:00",
        "2024-11-10T15:30:00+01:00",
        "2024-11-10T14:30:00",
        str(T),
        " 2024-11-10T14:30:00.000Z ",
    ],
)
def test_accepted_forms(raw: str) -> None:
    assert parse_time(raw, "start") == T


def test_a_date_is_midnight_utc() -> None:
    assert parse_time("2024-11-10", "start") == 1_731_196_800_000


@pytest.mark.parametrize(
    "raw, message",
    [
        ("", "'start' is empty"),
        ("1731249000", "looks like seconds; epoch times here are milliseconds (1731249000000?)"),
        ("-5", "must not be negative"),
        ("yesterday", "'start'='yesterday' is not a time"),
        ("2024-13-45T00:00:00Z", "is not a time"),
    ],
)
def test_refused_with_a_message(raw: str, message: str) -> None:
    with pytest.raises(TimeError) as info:
        parse_time(raw, "start")
    assert message in str(info.value)


@pytest.mark.parametrize(
    "raw, before",
    [("now", 0), ("-90s", 90_000), ("-5m", 300_000), ("-2h", 7_200_000), ("-1d", 86_400_000), (" -0s ", 0)],
)
def test_relative_to_now(raw: str, before: int) -> None:
    """Examples that work on any day: "the last five minutes" is start=-5m."""
    assert parse_time(raw, "start", now_ms=T) == T - before


def test_relative_uses_the_wall_clock_by_default() -> None:
    import time

    low = time.time_ns() // 1_000_000 - 60_000
    assert low <= parse_time("-1m", "start") <= low + 5_000


@pytest.mark.parametrize("raw", ["-5y", "+5m", "-m", "5m", "-1.5h", "now-5m"])
def test_relative_forms_that_are_not_times(raw: str) -> None:
    with pytest.raises(TimeError):
        parse_time(raw, "start", now_ms=T)
