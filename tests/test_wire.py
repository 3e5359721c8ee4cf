"""The wire helpers of model.py: the cached_at clock string and the WebSocket text frame."""

from __future__ import annotations

import calendar
import time

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from trio_relay.model import Encoder, ws_payload, ws_text_frame

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


# --------------------------------------------------------------------------- text frames


def rfc6455_frame(payload: bytes) -> bytes:
    """RFC 6455 §5.2 written out: FIN + text opcode, no mask, the length in its shortest form."""
    n = len(payload)
    if n <= 125:
        return bytes([0x81, n]) + payload
    if n <= 0xFFFF:
        return bytes([0x81, 126]) + n.to_bytes(2, "big") + payload
    return bytes([0x81, 127]) + n.to_bytes(8, "big") + payload


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 255, 256, 281, 1023, 1024, 1025, 65535, 65536, 70_000])
def test_text_frame_is_rfc6455_and_its_payload_reads_back(n: int) -> None:
    payload = bytes(i % 251 for i in range(n))
    frame = ws_text_frame(payload)
    assert frame == rfc6455_frame(payload)
    assert type(frame) is bytes
    assert ws_payload(frame) == payload


def test_text_frame_read_by_a_websocket_library() -> None:
    # wsproto (the relay's server side is built on it) reads every length form back as one text message.
    reader = FrameProtocol(client=True, extensions=[])
    payloads = [b"x" * n for n in (5, 126, 281, 1024, 65536)]
    reader.receive_bytes(b"".join(ws_text_frame(p) for p in payloads))
    frames = list(reader.received_frames())
    assert [(f.opcode, f.message_finished, f.payload) for f in frames] == [
        (Opcode.TEXT, True, p.decode()) for p in payloads
    ]
