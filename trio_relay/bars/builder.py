"""OHLCV bars built from trades: live (:class:`BarBuilder`) and over history (:func:`bars_from_trades`).

Pure and synchronous (no I/O, no Trio): the hub feeds :meth:`BarBuilder.add` on its hot path and
publishes the bars it returns; the history API runs :func:`bars_from_trades` over stored ticks.
Both run the same aggregation, so a bar rebuilt from history equals, to the last bit, the bar that
was built live from the same trades in the same order.

What a bar is (the semantics a caller may rely on):

* Only trades (``kind == "T"`` with a ``last_price``) make bars. Quotes (``"Q"``) do not move
  OHLCV, and a trade break (``"B"``) is a correction of an earlier trade, not a new one: it is
  ignored too (a bar already published is never revised).
* A bar covers ``[start_ms, start_ms + INTERVALS[interval])`` in event time (the update's
  ``timestamp``, UTC epoch ms); ``start_ms`` is a multiple of the interval, so ``1h`` bars start on
  the UTC hour. A trade exactly at a boundary belongs to the bar that starts there.
* ``open`` is the price of the interval's earliest trade, ``close`` of its latest (by timestamp;
  among equal timestamps the first to arrive opens and the last closes). ``volume`` sums
  ``last_size`` (a trade without a size counts as a trade of size 0), ``trades`` counts trades, and
  ``vwap`` is ``sum(price * size) / volume``, or None when the volume is 0.
* An interval without trades has no bar: no flat bar is carried forward (as Polygon's aggregates).
  A chart fills gaps itself if it wants them.
* ``complete`` is True once the interval is over and the bar can no longer change.

How (why ``add`` is cheap): each symbol keeps one open bar per interval of the chain 1s → 1m →
5m → 1h, each interval a multiple of the one before. A trade updates only the finest open bar;
when a bar closes it is folded into the next coarser one, so the coarser intervals cost something
once per finer bar, not once per trade. The sums of a coarse bar are therefore added up bar by
bar (floating-point addition is not associative: its volume and vwap may differ in the last bits
from a plain running sum). :func:`bars_from_trades` uses the same chain, hence live == history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import ClassVar, Final

import msgspec

from ..model import Update

__all__ = [
    "INTERVALS",
    "Bar",
    "BarBuilder",
    "TradeRow",
    "BarsPageResult",
    "BudgetExceeded",
    "bars_from_trades",
    "bars_from_sorted_trades",
]

# Read-only: a module-level dict would be a mutable singleton shared by every builder.
INTERVALS: Final[Mapping[str, int]] = MappingProxyType({"1s": 1_000, "1m": 60_000, "5m": 300_000, "1h": 3_600_000})

# A stored trade without the Update around it: (symbol, timestamp epoch ms, price, size).
TradeRow = tuple[str, int, float, float | None]

_CHAIN: Final = tuple(sorted(INTERVALS.items(), key=lambda item: item[1]))
assert all(coarse % fine == 0 for (_, fine), (_, coarse) in zip(_CHAIN, _CHAIN[1:])), "intervals must nest"
_RANK: Final = {name: k for k, (name, _) in enumerate(_CHAIN)}

_NEVER: Final = -(1 << 62)  # before any timestamp
_NO_BARS: Final[tuple[()]] = ()  # what add() returns for almost every trade: nothing to allocate


class Bar(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="bar"):
    """One OHLCV bar; its field order IS the wire format, ``{"type": "bar", "symbol": ...}``.

    Frozen, so one bar can be encoded once and shared by every client that gets it. ``type`` is
    msgspec's tag (encoded first, checked when decoding), so the fields stay positional and a bar
    is cheap to make.
    """

    type: ClassVar[str] = "bar"
    symbol: str
    interval: str  # a key of INTERVALS
    start_ms: int  # UTC epoch ms, a multiple of the interval's length
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int
    vwap: float | None
    complete: bool


class _Slot:
    """One (symbol, interval) of the chain, rewritten in place from one bar to the next.

    Open while ``start < end``: then the bar of ``[start, end)`` is this slot's aggregates (the
    finer bars folded in so far, plus any trade that came too late for the finer interval but not
    for this one) together with the finer slots' open bars, which lie inside it. The finest slot
    holds its whole bar. Closed (no open bar): ``start == end`` == the watermark before which this
    interval's bars are final, so a trade timed before it is late.
    """

    __slots__ = (
        "symbol",
        "interval",
        "ms",
        "emit",
        "start",
        "end",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "pv",
        "trades",
        "open_ts",
        "close_ts",
    )

    def __init__(self, symbol: str, interval: str, ms: int, emit: bool, floor: int) -> None:
        self.symbol = symbol
        self.interval = interval
        self.ms = ms
        self.emit = emit  # a requested interval (the chain's others are only stepping stones)
        self.start = self.end = floor
        self.open = self.high = self.low = self.close = 0.0
        self.volume = self.pv = 0.0
        self.trades = 0
        self.open_ts = self.close_ts = 0

    def take(self, ts: int, price: float, size: float) -> None:
        """Add one trade to the aggregates."""
        if not self.trades:
            self.open = self.high = self.low = self.close = price
            self.open_ts = self.close_ts = ts
            self.volume = size
            self.pv = price * size
            self.trades = 1
            return
        self.trades += 1
        self.volume += size
        self.pv += price * size
        if price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        if ts >= self.close_ts:
            self.close = price
            self.close_ts = ts
        elif ts < self.open_ts:
            self.open = price
            self.open_ts = ts

    def fold_into(self, dst: _Slot) -> None:
        """Add this slot's aggregates (a finer bar inside ``dst``'s interval) to ``dst``'s."""
        if not self.trades:
            return
        if not dst.trades:
            dst.open, dst.high, dst.low, dst.close = self.open, self.high, self.low, self.close
            dst.open_ts, dst.close_ts = self.open_ts, self.close_ts
            dst.volume, dst.pv, dst.trades = self.volume, self.pv, self.trades
            return
        dst.trades += self.trades
        dst.volume += self.volume
        dst.pv += self.pv
        if self.high > dst.high:
            dst.high = self.high
        if self.low < dst.low:
            dst.low = self.low
        if self.close_ts >= dst.close_ts:
            dst.close, dst.close_ts = self.close, self.close_ts
        if self.open_ts < dst.open_ts:
            dst.open, dst.open_ts = self.open, self.open_ts

    def bar(self, complete: bool) -> Bar:
        volume = self.volume
        return Bar(
            self.symbol,
            self.interval,
            self.start,
            self.open,
            self.high,
            self.low,
            self.close,
            volume,
            self.trades,
            self.pv / volume if volume > 0 else None,
            complete,
        )


def _check_interval(name: str) -> int:
    try:
        return INTERVALS[name]
    except KeyError:
        raise ValueError(f"unknown bar interval {name!r}; known: {', '.join(INTERVALS)}") from None


class BarBuilder:
    """Live OHLCV bars of every symbol traded, for each of ``intervals`` (names from INTERVALS).

    Feed every update to :meth:`add` in arrival order; it returns the bars that update closed.
    Call :meth:`flush` with the current time now and then, so that the last bar of a symbol that
    stopped trading completes without waiting for its next trade.

    Out-of-order trades: a trade older than the open bar's first trade but inside its interval
    updates it (high, low, volume, trades, vwap; it becomes the open if it is the earliest). A
    trade for an earlier interval (one a later trade of the symbol or :meth:`flush` has closed,
    or that passed with no trade) would change or add a bar behind the ones already published:
    it is dropped, and counted in :attr:`late` (once per trade, however many of the intervals
    dropped it; a trade late for 1s bars may still count in the open 1m bar).

    State: one open bar per (symbol, interval of the chain up to the coarsest requested), reused
    from bar to bar, whatever the traffic; :meth:`forget` drops a symbol's.
    """

    __slots__ = ("intervals", "late", "_chain", "_emit", "_floors", "_open")

    def __init__(self, intervals: Iterable[str]) -> None:
        names = tuple(dict.fromkeys(intervals))
        if not names:
            raise ValueError("a BarBuilder needs at least one interval")
        for name in names:
            _check_interval(name)
        self.intervals: tuple[str, ...] = names
        self.late = 0  # trades dropped (from at least one interval) because their bar was closed
        # Every interval of the chain up to the coarsest requested is aggregated; only the
        # requested ones are emitted. Fine to coarse, so the finest is slots[0].
        self._chain = _CHAIN[: max(_RANK[name] for name in names) + 1]
        self._emit = tuple(name in names for name, _ in self._chain)
        # Per chain interval: the start of the interval containing the latest flush's now. Every
        # interval before it is closed for every symbol, including symbols not seen yet.
        self._floors = [_NEVER] * len(self._chain)
        self._open: dict[str, tuple[_Slot, ...]] = {}

    def add(self, update: Update) -> tuple[Bar, ...]:
        """Aggregate ``update`` if it is a trade; return the bars it closed (complete, finest first).

        Quotes and trade breaks are ignored (see the module doc). At most one bar per interval is
        returned: a trade in a later interval closes the symbol's open bar of that interval. A
        tuple, so that the usual answer (no bar closed) is the shared ``()``, not a new list.
        """
        # The literal, not model.TRADE: a constant instead of a global lookup, on every update.
        if update.kind != "T":
            return _NO_BARS
        price = update.last_price
        if price is None:
            return _NO_BARS
        ts = update.timestamp
        slots = self._open.get(update.symbol)
        if slots is not None:
            o = slots[0]
            if o.start <= ts < o.end:
                # The common case, inlined: inside the symbol's finest open bar, hence inside the
                # open bar of every coarser interval, which this trade does not touch.
                size = update.last_size or 0.0
                o.trades += 1
                o.volume += size
                o.pv += price * size
                if price > o.high:
                    o.high = price
                elif price < o.low:
                    o.low = price
                if ts >= o.close_ts:
                    o.close = price
                    o.close_ts = ts
                elif ts < o.open_ts:
                    o.open = price
                    o.open_ts = ts
                return _NO_BARS
            if o.start < o.end <= ts and len(slots) > 1 and slots[1].start <= ts < slots[1].end:
                # The next most common case, inlined too: the finest bar is over, the next coarser
                # one is not (for a symbol trading about once a second, every trade).
                closed = (o.bar(True),) if o.emit else _NO_BARS
                o.fold_into(slots[1])
                size = update.last_size or 0.0
                start = ts - ts % o.ms
                o.start = start
                o.end = start + o.ms
                o.open = o.high = o.low = o.close = price
                o.open_ts = o.close_ts = ts
                o.volume = size
                o.pv = price * size
                o.trades = 1
                return closed
        else:
            slots = self._new_symbol(update.symbol)
        return self._place(slots, ts, price, update.last_size or 0.0)

    def _place(self, slots: tuple[_Slot, ...], ts: int, price: float, size: float) -> tuple[Bar, ...]:
        """A trade outside the finest open bar: roll intervals, fold closed bars, or drop it late."""
        closed: list[Bar] = []
        placed = False
        late = False
        last = len(slots) - 1
        for k, o in enumerate(slots):
            if ts >= o.end:  # a later interval: close the open bar, if any, and open this one
                if o.start < o.end:
                    if o.emit and o.trades:
                        closed.append(o.bar(True))
                    if k < last:
                        o.fold_into(slots[k + 1])
                start = ts - ts % o.ms
                o.start = start
                o.end = start + o.ms
                if placed:  # in a finer bar: this interval starts with nothing of its own
                    o.trades = 0
                else:  # take(), inlined: the first trade of a bar
                    o.open = o.high = o.low = o.close = price
                    o.open_ts = o.close_ts = ts
                    o.volume = size
                    o.pv = price * size
                    o.trades = 1
                    placed = True
                continue  # the coarser interval may be over too
            if ts >= o.start:  # inside this open bar
                if not placed:
                    o.take(ts, price, size)
                break  # inside every coarser open bar as well
            late = late or o.emit  # an earlier, closed interval: maybe not too late for a coarser one
        if late:
            self.late += 1
        return tuple(closed) if closed else _NO_BARS

    def flush(self, now_ms: int) -> list[Bar]:
        """Close every bar whose interval ended at or before ``now_ms``; return them (complete).

        ``now_ms`` is on the trades' clock (UTC epoch ms). Afterwards every interval that ended by
        ``now_ms`` is closed for every symbol (a trade for it is late), so pass ``now`` minus a
        grace period if the feed's timestamps lag the wall clock. Costs a few checks per symbol.
        """
        floors = self._floors
        for k, (_, ms) in enumerate(self._chain):
            floors[k] = max(floors[k], now_ms - now_ms % ms)
        closed: list[Bar] = []
        for slots in self._open.values():
            last = len(slots) - 1
            for k, o in enumerate(slots):
                if o.start < o.end:
                    if o.end > now_ms:
                        break  # coarser bars contain this one: they are open too
                    if o.emit and o.trades:
                        closed.append(o.bar(True))
                    if k < last:
                        o.fold_into(slots[k + 1])
                    o.trades = 0
                    o.start = o.end
                floor = floors[k]
                if o.end < floor:
                    o.start = o.end = floor
        return closed

    def current(self, symbol: str, interval: str) -> Bar | None:
        """The open bar of ``symbol`` in ``interval`` (``complete=False``), or None if it has none."""
        if interval not in self.intervals:
            raise ValueError(f"interval {interval!r} is not built here; built: {', '.join(self.intervals)}")
        slots = self._open.get(symbol)
        if slots is None:
            return None
        k = _RANK[interval]
        if slots[k].start == slots[k].end:
            return None
        # Fold the open finer bars up the chain, in the order their closes will: a scratch copy.
        acc: _Slot | None = None
        for o in slots[: k + 1]:
            if o.start == o.end:
                continue
            view = _Slot(o.symbol, o.interval, o.ms, o.emit, o.start)
            view.end = o.end
            o.fold_into(view)
            if acc is not None:
                acc.fold_into(view)
            acc = view
        return acc.bar(False) if acc is not None and acc.trades else None

    def forget(self, symbol: str) -> None:
        """Drop ``symbol``'s open bars, unpublished (e.g. once nobody wants its bars any more)."""
        self._open.pop(symbol, None)

    def _new_symbol(self, symbol: str) -> tuple[_Slot, ...]:
        slots = tuple(
            _Slot(symbol, name, ms, emit, floor)
            for (name, ms), emit, floor in zip(self._chain, self._emit, self._floors)
        )
        self._open[symbol] = slots
        return slots


def _ts(trade: Update | TradeRow) -> int:
    return trade.timestamp if isinstance(trade, Update) else trade[1]


def bars_from_trades(trades: Iterable[Update | TradeRow], interval: str, start_ms: int, end_ms: int) -> list[Bar]:
    """The ``interval`` bars of the trades timed in ``[start_ms, end_ms)``, by symbol then start.

    ``trades`` may be updates (only trades count, as live) or :data:`TradeRow` tuples, in any
    order: they are sorted by timestamp (stably, so equal timestamps keep their order) and
    aggregated exactly as :class:`BarBuilder` does live. Trades outside the window are ignored.

    A bar is ``complete`` when its whole interval lies inside the window: with window bounds on
    the interval's boundaries, the first bar is complete too, and the last one is complete if its
    interval has ended by ``end_ms``. Fed the same trades in timestamp order, a live builder
    flushed at ``end_ms`` has closed exactly the complete bars, and its open bars are the others.
    """
    ms = _check_interval(interval)
    window = sorted((t for t in trades if start_ms <= _ts(t) < end_ms), key=_ts)
    builder = BarBuilder((interval,))
    bars: list[Bar] = []
    for t in window:
        if isinstance(t, Update):
            bars += builder.add(t)
        else:
            bars += builder.add(Update(t[0], "T", t[1], last_price=t[2], last_size=t[3]))
    bars += builder.flush(end_ms)
    for symbol in builder._open:
        bar = builder.current(symbol, interval)
        if bar is not None:
            bars.append(bar)
    if start_ms % ms:
        # A bar that started before the window lacks the trades before start_ms.
        bars = [msgspec.structs.replace(b, complete=False) if b.start_ms < start_ms and b.complete else b for b in bars]
    bars.sort(key=lambda b: (b.symbol, b.start_ms))
    return bars


class BarsPageResult(msgspec.Struct, frozen=True):
    """What :func:`bars_from_sorted_trades` made of one page.

    ``next_start``: where the next page starts (None: the window is done). ``truncated``: the
    page stopped early because the caller's budget ran out, not because ``limit`` bars were
    made; its bars are still exact (every one of them complete or the window's last), and
    ``next_start`` resumes at the bar that was being read.
    """

    bars: list[Bar]
    next_start: int | None
    truncated: bool
    trades_read: int


def bars_from_sorted_trades(
    batches: Iterable[Iterable[TradeRow]],
    interval: str,
    start_ms: int,
    end_ms: int,
    limit: int,
    *,
    keep_going: Callable[[int], bool] | None = None,
) -> BarsPageResult:
    """At most ``limit`` bars of trades already sorted by timestamp, read batch by batch.

    The same bars as :func:`bars_from_trades` over the same trades (it runs the same builder), in
    memory of one batch and ``limit`` bars however many trades the window holds: the stream is
    read only until the bar after the ``limit``-th starts (its start is ``next_start``).
    ``start_ms`` must be on an interval boundary and trades outside ``[start_ms, end_ms)`` must
    not be given (the database query selects them).

    ``keep_going(trades_read)`` is asked after each batch; False stops the page there (a row or
    time budget): the bars closed so far are returned with ``truncated=True`` and ``next_start``
    at the bar being read. When it stops before any bar closed, :class:`BudgetExceeded` is raised
    (no progress can be offered: the caller should ask for a finer interval or narrower window).
    """
    ms = _check_interval(interval)
    if start_ms % ms:
        raise ValueError(f"start_ms {start_ms} is not on a {interval} boundary")
    builder = BarBuilder((interval,))
    bars: list[Bar] = []
    read = 0
    for batch in batches:
        for symbol, ts, price, size in batch:
            read += 1
            closed = builder.add(Update(symbol, "T", ts, last_price=price, last_size=size))
            if closed:
                bars += closed
                if len(bars) >= limit:
                    # This trade opened bar number limit + 1: the page is full.
                    del bars[limit:]
                    return BarsPageResult(bars, ts - ts % ms, False, read)
        if keep_going is not None and not keep_going(read):
            current = next((builder.current(s, interval) for s in builder._open), None)
            if current is None:  # the batch ended exactly on nothing open: cannot happen with rows
                return BarsPageResult(bars, None, False, read)
            if not bars:
                raise BudgetExceeded(read)
            return BarsPageResult(bars, current.start_ms, True, read)
    bars += builder.flush(end_ms)
    for symbol in builder._open:
        bar = builder.current(symbol, interval)
        if bar is not None:
            bars.append(bar)
    next_start = None
    if len(bars) > limit:
        next_start = bars[limit].start_ms
        del bars[limit:]
    return BarsPageResult(bars, next_start, False, read)


class BudgetExceeded(Exception):
    """The caller's budget ran out before one whole bar was read (``trades_read`` trades)."""

    def __init__(self, trades_read: int) -> None:
        super().__init__(f"budget exhausted after {trades_read} trades, inside one bar")
        self.trades_read = trades_read
