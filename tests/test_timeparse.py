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
