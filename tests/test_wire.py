"""The wire helpers of model.py: the cached_at clock string and the WebSocket text frame."""

from __future__ import annotations

import calendar
import time

from trio_relay.model import Encoder

# 2023-11-09T21:20:00.000Z in epoch nanoseconds.
BASE_NS = 1_699_564_800 * 1_000_000_000


class FakeClock:
    """A wall clock in epoch ns that the test sets."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def reference_iso(ns: int) -> str:
    """What the string must be, computed independently of the encoder."""
    sec, rem = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + ".%03dZ" % (rem // 1_000_000)


def test_now_iso_format() -> None:
    clock = FakeClock(BASE_NS + 123_456_789)
    assert Encoder(clock).now_iso() == "2023-11-09T21:20:00.123Z"


def test_now_iso_is_the_clocks_millisecond_whatever_came_before() -> None:
    # The memo must never hand out a stale string: the same ms (the same string), the next ms,
    # the next second, a jump back (a stepped clock), a jump back into the memoized second.
    clock = FakeClock(BASE_NS)
    encoder = Encoder(clock)
    steps = [
        BASE_NS + 1,
        BASE_NS + 999_999,  # still ms 0
        BASE_NS + 1_000_000,  # ms 1
        BASE_NS + 999_000_000,
        BASE_NS + 1_000_000_000,  # the next second, ms 0 again
        BASE_NS + 1_000_000_000 + 999_999,
        BASE_NS - 1,  # the clock stepped back: the previous second's .999
        BASE_NS + 1_000_000_000,  # forward again, same ms as two steps before
        BASE_NS + 86_400 * 1_000_000_000 + 7_000_000,  # a day later, same ms of the second as...
        BASE_NS + 7_000_000,  # ...this one, which is in an earlier second
    ]
    for ns in [BASE_NS, *steps]:
        clock.ns = ns
        assert encoder.now_iso() == reference_iso(ns), ns


def test_now_iso_same_millisecond_same_string() -> None:
    clock = FakeClock(BASE_NS + 5_400_000)
    encoder = Encoder(clock)
    first = encoder.now_iso()
    for ns in (BASE_NS + 5_000_000, BASE_NS + 5_999_999, BASE_NS + 5_400_000):  # ms 5's first and last ns
        clock.ns = ns
        assert encoder.now_iso() is first  # memoized, not formatted again
    clock.ns = BASE_NS + 6_000_000
    assert encoder.now_iso() == "2023-11-09T21:20:00.006Z"


def test_now_iso_default_clock_is_the_wall_clock() -> None:
    before = time.time_ns() // 1_000_000
    iso = Encoder().now_iso()
    after = time.time_ns() // 1_000_000
    stamp = time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S")
    ms = calendar.timegm(stamp) * 1000 + int(iso[20:23])
    assert before <= ms <= after
