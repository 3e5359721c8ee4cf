"""Normalized market-data types and the client wire encoding.

Every provider turns its frames into :class:`Update` objects; the hub merges them into one
:class:`PriceState` per symbol (the cache entry) and encodes that state ONCE per update into the
``price_update`` text frame that every subscribed client receives.

The encoded message is the merged *state* of the symbol after the update: ``data_type`` says which
event produced it (``T`` trade, ``Q`` quote, and the three amendments of an earlier trade: ``B``
break, ``C`` correction, ``X`` cancel; see :class:`Amend`), ``timestamp`` is that event's time
(UTC epoch milliseconds), and the price fields carry the latest known trade and the latest known
top of book. A client that is conflated (sees only the latest update of a symbol) therefore still
holds the full current picture.
"""

from __future__ import annotations

import enum
import re
import struct
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Final

import msgspec

__all__ = [
    "Update",
    "Amend",
    "AmendAction",
    "AmendMatch",
    "AmendedState",
    "AMENDS",
    "PriceState",
    "ProviderSwitched",
    "UpstreamItem",
    "CloseCode",
    "Encoder",
    "SYMBOL_RE",
    "normalize_epoch_ms",
    "wall_ms",
    "control",
    "ws_text_frame",
    "ws_payload",
]

# Upper-case letters and digits, then also . - / ^ = (BRK.B, BRK-B, BTC/USD, ^GSPC, EURUSD=X).
# \Z, not $: a $ also matches before a final newline, and "AAPL\n" is no symbol.
SYMBOL_RE: Final = re.compile(r"^[A-Z0-9^][A-Z0-9./^=\-]{0,19}\Z")

TRADE: Final = "T"
QUOTE: Final = "Q"
BREAK: Final = "B"  # an earlier trade is void (FMP's "B")
CORRECTION: Final = "C"  # an earlier trade's price or size was corrected (Alpaca's "c")
CANCEL: Final = "X"  # an earlier trade was cancelled or was an error (Alpaca's "x")
#: The kinds that amend an earlier trade instead of reporting a new event.
AMENDS: Final = frozenset({BREAK, CORRECTION, CANCEL})


class AmendAction(enum.StrEnum):
    """What an amendment does to the trade it names (``amends.action`` on the wire)."""

    BREAK = "break"  # the trade is void
    CANCEL = "cancel"  # the trade is void (a cancel, or a trade reported in error)
    CORRECTION = "correction"  # the trade stands with corrected_price / corrected_size


class AmendMatch(enum.StrEnum):
    """Where the relay found the amended trade in its short per-symbol trade memory."""

    LAST = "last"  # it was the cached last trade: last_price/last_size changed
    EARLIER = "earlier"  # an earlier remembered trade: the cached last trade is unchanged
    UNKNOWN = "unknown"  # not remembered (older, or before the relay saw the symbol): nothing changed


class Amend(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """Which trade an amendment (kind ``B``, ``C`` or ``X``) names, and with what.

    ``trade_id`` is the provider's id of the amended trade (None when the provider has no ids:
    FMP); ``price``/``size`` are that trade as first reported. A correction adds the corrected
    values (and the corrected trade's new id, when the provider gives one). ``matched`` is
    filled in by the hub (see :class:`AmendMatch`); providers leave it ``unknown``.
    """

    action: AmendAction
    trade_id: str | None = None
    price: float | None = None
    size: float | None = None
    corrected_id: str | None = None
    corrected_price: float | None = None
    corrected_size: float | None = None
    matched: AmendMatch = AmendMatch.UNKNOWN


class Update(msgspec.Struct, gc=False):
    """One normalized upstream event. ``None`` means "the provider did not say"."""

    symbol: str
    kind: str  # "T" | "Q", or an amendment of an earlier trade: "B" | "C" | "X" (see AMENDS)
    timestamp: int  # event time, UTC epoch ms
    last_price: float | None = None
    last_size: float | None = None
    ask_price: float | None = None
    ask_size: float | None = None
    bid_price: float | None = None
    bid_size: float | None = None
    # True when the update carries a symbol's whole state (from an upstream relay): every known
    # field is applied, whatever ``kind`` says, so a first snapshot loses nothing.
    merged: bool = False
    # The provider that produced it, when it is not the upstream session's own (an upstream relay
    # passes on its provider's name). None: the hub's current source.
    provider: str | None = None
    # An upstream relay's own numbering (its seq and epoch), kept so that the clients of every
    # worker of one relay see the same sequence and can resume on any of them. 0 / None: none.
    seq: int = 0
    epoch: str | None = None
    # The provider's id of this trade (kind "T"), when it has ids: the hub's trade memory and the
    # providers' duplicate filters match on it.
    trade_id: str | None = None
    # For an amendment (kind in AMENDS): the trade it names and what it does. An amendment's own
    # last_price/last_size are the void trade's (B, X) or the corrected values (C).
    amend: Amend | None = None


class PriceState(msgspec.Struct, gc=False, kw_only=True):
    """The cache entry of one symbol; its field order IS the ``price_update`` wire format."""

    type: str = "price_update"
    symbol: str
    timestamp: int = 0
    data_type: str = QUOTE
    last_price: float | None = None
    last_size: float | None = None
    ask_price: float | None = None
    ask_size: float | None = None
    bid_price: float | None = None
    bid_size: float | None = None
    cached_at: str = ""
    seq: int = 0
    provider: str = ""  # which upstream provider the latest update came from
    epoch: str = ""  # the relay's sequence space: seq values compare only within one epoch

    def apply(self, update: Update, cached_at: str) -> None:
        """Merge a trade, a quote or a whole state into this one.

        Amendments (``B``/``C``/``X``) are the hub's to apply: they need its trade memory.
        """
        self.seq = update.seq or self.seq + 1
        self.timestamp = update.timestamp
        self.data_type = update.kind
        self.cached_at = cached_at
        if update.merged:
            if update.last_price is not None:
                self.last_price, self.last_size = update.last_price, update.last_size
            if update.bid_price is not None:
                self.bid_price, self.bid_size = update.bid_price, update.bid_size
            if update.ask_price is not None:
                self.ask_price, self.ask_size = update.ask_price, update.ask_size
        elif update.kind == TRADE:
            self.last_price = update.last_price
            self.last_size = update.last_size
        elif update.kind == QUOTE:
            if update.bid_price is not None:
                self.bid_price = update.bid_price
                self.bid_size = update.bid_size
            if update.ask_price is not None:
                self.ask_price = update.ask_price
                self.ask_size = update.ask_size


class AmendedState(PriceState, kw_only=True):
    """The ``price_update`` of an amendment: the symbol's state after it, plus ``amends``.

    Only amendment frames carry ``amends`` (a subclass, so every other frame is unchanged).
    """

    amends: Amend


class ProviderSwitched(msgspec.Struct, frozen=True):
    """On the upstream → hub channel: the batches that follow come from ``provider`` (a failover).

    Sent in order with the data, so every update before it is published under the old name and
    every update after it under the new one.
    """

    provider: str


#: What the upstream hands the hub: a batch of updates, or a provider switch.
UpstreamItem = list[Update] | ProviderSwitched


class CloseCode(enum.IntEnum):
    """Every WebSocket close code the relay sends, named once (docs/api.md lists them)."""

    GOING_AWAY = 1001  # the relay shuts down: reconnect after the status's retry_after_ms
    PROTOCOL_ERROR = 1002  # not a WebSocket message the relay can read
    POLICY = 1008  # a policy broken: too many unread replies, rate-limit strikes, fragments, auth
    TOO_BIG = 1009  # a message larger than clients.max_message_size
    TOKEN_EXPIRED = 4001  # the token expired and no fresh one came (auth on)
    SLOW_CONSUMER = 4008  # no progress for clients.stall_timeout


def mid_price(bid: float, ask: float) -> float:
    """The midpoint of ``bid`` and ``ask`` as people write it: exact in decimal, then a float.

    ``(bid + ask) / 2`` in binary floating point shows artefacts (40.1 and 40.2 give
    40.150000000000006). The decimal midpoint of the prices as quoted (their shortest repr) has
    at most one decimal more than they have, and the float nearest to it prints as exactly that
    decimal: ``mid_price(40.1, 40.2) == 40.15``. About a microsecond: for what is shown (portfolio
    valuations, alert prices), not for the hub's path.
    """
    return float((Decimal(repr(bid)) + Decimal(repr(ask))) / 2)


def wall_ms() -> int:
    """The wall clock in epoch milliseconds: for timestamps that leave the process, never for timing."""
    return time.time_ns() // 1_000_000


def normalize_epoch_ms(t: int | float) -> int:
    """Epoch timestamp of unknown unit → ms, by magnitude (ns ≥ 1e17, µs ≥ 1e14, ms ≥ 1e11, else s).

    Runs once per upstream update. An int (what the feeds send) is compared with int bounds and
    divided without a float in between (a comparison of an int with a float costs more, and
    ``int()`` of an int is a call for nothing); the results are those of the float branch,
    whose bounds are the same numbers exactly.
    """
    if type(t) is int:
        if t >= 100_000_000_000_000_000:
            return t // 1_000_000
        if t >= 100_000_000_000_000:
            return t // 1_000
        if t >= 100_000_000_000:
            return t
        return t * 1000
    if t >= 1e17:
        return int(t // 1_000_000)
    if t >= 1e14:
        return int(t // 1_000)
    if t >= 1e11:
        return int(t)
    return int(t * 1000)


class Encoder:
    """Encodes wire messages. One instance per hub; it memoizes the formatted millisecond.

    ``clock`` is the wall clock in epoch nanoseconds (``time.time_ns``; a test may pass its own).
    """

    __slots__ = ("_enc", "_clock", "_sec", "_prefix", "_from", "_until", "_iso")

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._enc = msgspec.json.Encoder()
        self._clock = clock
        self._sec = -1
        self._prefix = ""
        # The memoized millisecond as a range of the clock, [_from, _until) in ns: empty at first.
        self._from = 0
        self._until = 0
        self._iso = ""

    def now_iso(self) -> str:
        """Wall-clock now as ISO 8601 UTC with milliseconds, e.g. ``2024-11-10T12:00:00.123Z``.

        Every call within one millisecond returns the same string (the same object): at a high
        update rate most updates share a millisecond, and formatting one costs about three times
        what the rest of this call does. The string is always that of the clock's current ms.
        """
        ns = self._clock()
        if self._from <= ns < self._until:  # two compares: cheaper than dividing ns to compare ms
            return self._iso
        ms = ns // 1_000_000
        sec, milli = divmod(ms, 1000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        self._from = ms * 1_000_000
        self._until = self._from + 1_000_000
        iso = self._iso = f"{self._prefix}.{milli:03d}Z"
        return iso

    def price_update(self, state: PriceState) -> bytes:
        """The state as a complete WebSocket text frame, ready to be written to any client."""
        return ws_text_frame(self._enc.encode(state))

    def encode(self, obj: object) -> bytes:
        """Any message as a complete WebSocket text frame."""
        return ws_text_frame(self._enc.encode(obj))


#: The header of a text frame of each payload length below 1024 (about 45 KB): a price_update
#: (~280 bytes) then costs one index and one concatenation, not int.to_bytes and two.
_HEADERS: Final = tuple(bytes((0x81, n)) if n < 126 else bytes((0x81, 126, n >> 8, n & 0xFF)) for n in range(1024))
_HEADER16: Final = struct.Struct(">BBH").pack  # FIN + text, 126 (a 16-bit length follows), the length


def ws_text_frame(payload: bytes) -> bytes:
    """A final, unmasked (server → client) WebSocket text frame around ``payload`` (RFC 6455 §5.2).

    Built once per message and shared by every client that gets it: a per-frame client's send
    is then one concatenation and one socket write for everything it has pending. The length is
    always in its shortest form (7 bits below 126, then 16, then 64), as :func:`ws_payload` reads it.
    """
    n = len(payload)
    if n < 1024:
        return _HEADERS[n] + payload
    if n < 65536:
        return _HEADER16(0x81, 126, n) + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def ws_payload(frame: bytes) -> bytes:
    """The payload of a frame made by :func:`ws_text_frame`."""
    marker = frame[1]
    return frame[2:] if marker < 126 else frame[4:] if marker == 126 else frame[10:]


def control(kind: str, **fields: object) -> dict[str, object]:
    """A control message (ack, error, pong...) as a dict with ``type`` first."""
    msg: dict[str, object] = {"type": kind}
    msg.update(fields)
    return msg
