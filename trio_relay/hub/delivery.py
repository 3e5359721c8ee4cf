"""Per-subscription delivery options: a rate cap, a field subset, deltas; one feed per option set.

A client may ask, per symbol, for at most ``max_rate`` updates a second, for only some ``fields``
of the ``price_update``, and for ``delta`` messages (only what changed since the last message it
received). Clients with the default options never come here: the hub's shared frame reaches
them as before (encoded once, one append per outbox).

The cost stays on the hub's side and is paid once per distinct option set, not per client: every
(symbol, option set) pair with subscribers is one :class:`Feed`, which decides when to emit
(its rate cap), encodes the message once (and the delta once) and appends the same bytes to
every outbox it serves.

Guarantees:

- **Never stale under a rate cap.** An update that arrives within ``1/max_rate`` of the feed's last
  emission is not dropped but deferred: the feed emits the symbol's *latest* state when the
  interval is up, so the last update of a burst arrives at most ``1/max_rate`` late.
- **Deltas are never applied to the wrong base.** A delta is relative to the feed's previous
  emission. An outbox gets one only if it got that previous emission in order (it is in the
  feed's ``synced`` set): a new subscriber, a resumed one, one whose options changed, and one
  after a trade break get a full message first. Deltas are queued in order and never conflated
  (each builds on the one before); when an outbox is already conflating, the feed queues a full
  message instead (a full one may replace another full one, never a delta).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
import msgspec
import trio

from ..model import PriceState, ws_text_frame
from .outbox import Outbox
from .stats import Stats

__all__ = ["ALWAYS_FIELDS", "PRICE_FIELDS", "DeliveryOptions", "Delivery", "OptionsError", "parse_options"]

#: The fields a ``price_update`` carries, in wire order (``type`` is always first).
PRICE_FIELDS: Final = tuple(f for f in PriceState.__struct_fields__ if f != "type")
#: Always sent, whatever ``fields`` says: a client needs them to place and resume an update.
ALWAYS_FIELDS: Final = frozenset({"symbol", "seq", "epoch"})

_EMISSIONS: Final = itertools.count()  # numbers the delta feeds' in-order messages (see Feed.emit)

MIN_RATE: Final = 0.1  # updates/s: one every 10 s
MAX_RATE: Final = 100.0


class OptionsError(ValueError):
    """A delivery option a client gave is not valid; ``code`` and ``message`` are safe to show."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _wire_order(fields: tuple[str, ...] | list[str] | None) -> tuple[str, ...] | None:
    """The chosen fields plus the three always sent, in wire order (None: all of them)."""
    if fields is None:
        return None
    wanted = set(fields) | ALWAYS_FIELDS
    chosen = tuple(f for f in PRICE_FIELDS if f in wanted)
    return None if chosen == PRICE_FIELDS else chosen


@attrs.frozen
class DeliveryOptions:
    """How one symbol is delivered to one client. Hashable: the key of a :class:`Feed`.

    ``max_rate``: at most that many messages a second (None: every update). ``fields``: the
    ``price_update`` fields sent, in wire order, ``symbol``/``seq``/``epoch`` included (None: all).
    ``delta``: after a full message, only the fields that changed (and the three always sent).
    """

    max_rate: float | None = None
    fields: tuple[str, ...] | None = attrs.field(default=None, converter=_wire_order)
    delta: bool = False

    def as_json(self) -> dict[str, object]:
        """The options as a client states them (for ``list`` and the acks)."""
        out: dict[str, object] = {}
        if self.max_rate is not None:
            out["max_rate"] = self.max_rate
        if self.fields is not None:
            out["fields"] = list(self.fields)
        if self.delta:
            out["delta"] = True
        return out

    @property
    def sent_fields(self) -> tuple[str, ...]:
        return self.fields if self.fields is not None else PRICE_FIELDS


def parse_options(max_rate: object, fields: object, delta: object) -> DeliveryOptions | None:
    """Validate the options of a subscribe; None when they are all the defaults."""
    rate: float | None = None
    if max_rate is not None:
        if isinstance(max_rate, bool) or not isinstance(max_rate, (int, float)) or not math.isfinite(max_rate):
            raise OptionsError("invalid_max_rate", "'max_rate' must be a number of updates per second, e.g. 4")
        if not MIN_RATE <= max_rate <= MAX_RATE:
            raise OptionsError(
                "invalid_max_rate", f"'max_rate' must be between {MIN_RATE:g} and {MAX_RATE:g} updates per second"
            )
        rate = float(max_rate)
    chosen: tuple[str, ...] | None = None
    if fields is not None:
        if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
            raise OptionsError("invalid_fields", "'fields' must be a non-empty list of price_update field names")
        unknown = [f for f in fields if f not in PRICE_FIELDS and f != "type"]
        if unknown:
            shown = ", ".join(repr(f[:24]) for f in unknown[:5])
            raise OptionsError("invalid_fields", f"unknown field(s) {shown}; one of {', '.join(PRICE_FIELDS)}")
        chosen = tuple(fields)
    if delta is not None and not isinstance(delta, bool):
        raise OptionsError("invalid_delta", "'delta' must be true or false")
    options = DeliveryOptions(rate, chosen, bool(delta))
    return None if options == DEFAULT else options


DEFAULT: Final = DeliveryOptions()


class Feed:
    """One symbol for one option set: its subscribers, its rate cap, what it last emitted."""

    __slots__ = ("symbol", "options", "fields", "outboxes", "synced", "last", "last_at", "due", "_encode")

    def __init__(self, symbol: str, options: DeliveryOptions, encode: msgspec.json.Encoder) -> None:
        self.symbol = symbol
        self.options = options
        self.fields = options.sent_fields
        self.outboxes: set[Outbox] = set()
        self.synced: set[Outbox] = set()  # delta feeds: got the previous emission, in order
        self.last: tuple[Any, ...] | None = None  # the values of the previous emission
        self.last_at = -math.inf
        self.due: float | None = None  # a deferred emission is scheduled at this time
        self._encode = encode

    def full_frame(self, state: PriceState) -> bytes:
        body: dict[str, Any] = {"type": "price_update"}
        for name in self.fields:
            body[name] = getattr(state, name)
        amends = getattr(state, "amends", None)  # an amendment (AmendedState): always with what it amends
        if amends is not None:
            body["amends"] = amends
        return ws_text_frame(self._encode.encode(body))

    def emit(self, state: PriceState, now: float) -> int:
        """Send ``state`` to every subscriber (encoded once, the delta once); how many got it."""
        values = tuple(getattr(state, name) for name in self.fields)
        self.last_at = now
        self.due = None
        full: bytes | None = None
        if not self.options.delta:
            full = self.full_frame(state)
            for outbox in self.outboxes:
                outbox.put(self.symbol, full)
            self.last = values
            return len(self.outboxes)
        delta: bytes | None = None
        if self.last is not None and self.synced:
            body: dict[str, Any] = {"type": "price_update"}
            for name, value, before in zip(self.fields, values, self.last, strict=True):
                if name in ALWAYS_FIELDS or value != before:
                    body[name] = value
            body["delta"] = True
            delta = ws_text_frame(self._encode.encode(body))
        self.last = values
        synced = self.synced
        # One key for this emission in every outbox: a tuple never equals a symbol, so it is
        # never conflated, and its number makes it unique (Outbox.discard still finds it).
        key = (self.symbol, next(_EMISSIONS))
        for outbox in self.outboxes:
            if outbox.conflating:
                # A full message that may replace an older full one, never a delta.
                full = full or self.full_frame(state)
                outbox.put_last(self.symbol, full)
            elif delta is not None and outbox in synced:
                outbox.put(key, delta)  # in order, never conflated
            else:
                full = full or self.full_frame(state)
                outbox.put(key, full)
            synced.add(outbox)
        return len(self.outboxes)


class Delivery:
    """Every feed of the hub (symbol → option set → :class:`Feed`) and their deferred emissions.

    Owned by the hub: :meth:`run` is one of its tasks. ``routes`` is read on the hub's hot
    path only as "is this symbol in it", so clients with default options pay one lookup.
    """

    def __init__(self, cache: Mapping[str, PriceState], stats: Stats) -> None:
        self.routes: dict[str, dict[DeliveryOptions, Feed]] = {}
        self._cache = cache
        self._encode = msgspec.json.Encoder()
        # Deferred emissions: (due, tiebreak, feed); each feed at most once (bounded by the feeds).
        self._timers: list[tuple[float, int, Feed]] = []
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None
        self._stats = stats  # messages_out counts what the feeds queue too

    # ----------------------------------------------------------------- subscribers
    def add(self, symbol: str, options: DeliveryOptions, outbox: Outbox) -> None:
        feeds = self.routes.setdefault(symbol, {})
        feed = feeds.get(options)
        if feed is None:
            feed = feeds[options] = Feed(symbol, options, self._encode)
        feed.outboxes.add(outbox)

    def remove(self, symbol: str, options: DeliveryOptions, outbox: Outbox) -> None:
        feeds = self.routes.get(symbol)
        feed = feeds.get(options) if feeds is not None else None
        if feeds is None or feed is None:
            return
        feed.outboxes.discard(outbox)
        feed.synced.discard(outbox)
        if not feed.outboxes:
            del feeds[options]  # a deferred emission of it finds no subscriber and is skipped
            if not feeds:
                del self.routes[symbol]

    def subscriber_count(self, symbol: str) -> int:
        return sum(len(f.outboxes) for f in self.routes.get(symbol, {}).values())

    def snapshot(self, options: DeliveryOptions, state: PriceState) -> bytes:
        """A full message of ``state`` under ``options`` (a subscribe's snapshot or replay)."""
        return Feed(state.symbol, options, self._encode).full_frame(state)

    def frames_for(self, options: DeliveryOptions, states: Iterable[PriceState]) -> list[bytes]:
        """Replayed states under ``options``: all of them, or the latest only under a rate cap."""
        states = list(states)
        if options.max_rate is not None:
            states = states[-1:]
        return [self.snapshot(options, s) for s in states]

    # ----------------------------------------------------------------- the hub's updates
    def publish(self, symbol: str, state: PriceState) -> None:
        """A new state of ``symbol``: each feed emits it now, or schedules its latest state."""
        now = trio.current_time()
        for feed in self.routes[symbol].values():
            rate = feed.options.max_rate
            if rate is None or now >= feed.last_at + 1.0 / rate:
                self._stats.messages_out += feed.emit(state, now)
            elif feed.due is None:
                feed.due = feed.last_at + 1.0 / rate
                heapq.heappush(self._timers, (feed.due, next(self._order), feed))
                if self._sleep is not None and feed.due < self._sleep.deadline:
                    self._sleep.deadline = feed.due

    def publish_break(self, symbol: str, state: PriceState) -> None:
        """An amendment (break, cancel, correction; its ``amends`` included): a full message to
        every subscriber at once, never deferred or conflated. The delta chain restarts after it.
        """
        for feed in self.routes[symbol].values():
            frame = feed.full_frame(state)
            for outbox in feed.outboxes:
                outbox.put_replay(symbol, frame)
            feed.synced.clear()
            self._stats.messages_out += len(feed.outboxes)

    async def run(self) -> None:
        """Emit deferred states when their interval is up (the latest state, never a stale one)."""
        while True:
            with trio.CancelScope() as self._sleep:
                self._sleep.deadline = self._timers[0][0] if self._timers else math.inf
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            timers = self._timers
            while timers and timers[0][0] <= now:
                _due, _n, feed = heapq.heappop(timers)
                feed.due = None
                state = self._cache.get(feed.symbol)
                if feed.outboxes and state is not None and state.seq:
                    self._stats.messages_out += feed.emit(state, now)
