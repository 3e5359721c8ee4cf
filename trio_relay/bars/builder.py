"""OHLCV bars built from trades: live (:class:`BarBuilder`) and over history (:func:`bars_from_trades`).

Pure and synchronous (no I/O, no Trio): the hub's bar channel feeds :meth:`BarBuilder.add` and
publishes the bars it returns; the history API runs :func:`bars_from_sorted_trades` over stored
trades. Both decide which trades count with the same :class:`Lateness` rule and aggregate them
with the same :class:`_Agg`, so once a bar's lateness window has passed, the bar built live and
the bar rebuilt from history are equal to the last bit, whatever order the trades arrived in.

What a bar is (the semantics a caller may rely on):

* Only trades (``kind == "T"`` with a ``last_price``) make bars. Quotes (``"Q"``) do not move
  OHLCV, and a trade break (``"B"``) is ignored here (how a correction reaches bars is the
  providers' corrections work: it can reuse the amendment path below).
* A bar covers ``[start_ms, start_ms + INTERVALS[interval])`` in event time (the update's
  ``timestamp``, UTC epoch ms); ``start_ms`` is a multiple of the interval, so ``1h`` bars start on
  the UTC hour. A trade exactly at a boundary belongs to the bar that starts there.
* **Lateness** (:class:`Lateness`): a trade counts in its interval-I bar only if it arrived (the
  relay's wall clock, ``recv_ms``) before the bar's end + ``grace`` + I's allowed lateness, and
  is stamped at most ``grace`` ahead of its arrival. Otherwise it is *late* for I: left out of
  I's bars, live and in history alike, and counted. The decision depends on the trade alone
  (its timestamp and arrival time), never on the order trades came in.
* ``open`` is the price of the interval's earliest trade, ``close`` of its latest (by timestamp;
  among equal timestamps the first to arrive opens and the last closes). ``volume`` sums
  ``last_size`` (a trade without a size counts as a trade of size 0), ``trades`` counts trades, and
  ``vwap`` is ``sum(price * size) / volume``, or None when the volume is 0. The sums are exact
  (Shewchuk's partials, rounded once by ``math.fsum``), hence independent of the order of the
  trades: that is what makes a live bar equal its rebuild from history.
* An interval without trades has no bar: no flat bar is carried forward (as Polygon's aggregates).
* ``complete`` (:meth:`Lateness.complete`): the bar's interval lies inside the window asked for,
  and its lateness window has passed (the wall clock is at or past ``end + grace + lateness``),
  so no trade can change it any more.
* ``amended``: a live bar sent again because a late trade (within its lateness) changed a bar
  that had already been sent as closed (or added a bar behind it). Never set over REST.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import ClassVar, Final

import msgspec

from ..model import Update

__all__ = [
    "INTERVALS",
    "DEFAULT_GRACE_MS",
    "DEFAULT_LATENESS_MS",
    "Bar",
    "BarBuilder",
    "Lateness",
    "TradeRow",
    "BarsPageResult",
    "BudgetExceeded",
    "bars_from_trades",
    "bars_from_sorted_trades",
]

# Read-only: a module-level dict would be a mutable singleton shared by every builder.
INTERVALS: Final[Mapping[str, int]] = MappingProxyType({"1s": 1_000, "1m": 60_000, "5m": 300_000, "1h": 3_600_000})

# How far the feed's timestamps may be off the relay's clock (either way): a trade stamped up to
# this long before its bar's end + lateness, or this far ahead of its arrival, still counts.
DEFAULT_GRACE_MS: Final = 2_000
# Extra time, per interval, that a closed bar still takes late trades (then amends it).
DEFAULT_LATENESS_MS: Final[Mapping[str, int]] = MappingProxyType({"1s": 1_000, "1m": 5_000, "5m": 10_000, "1h": 30_000})

# A stored trade without the Update around it: (symbol, timestamp epoch ms, price, size, recv_ms),
# recv_ms being the relay's wall clock when it arrived.
TradeRow = tuple[str, int, float, float | None, int]

_NO_BARS: Final[tuple[()]] = ()  # what add() returns for almost every trade: nothing to allocate
_FOREVER: Final = 1 << 62


class Bar(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="bar", omit_defaults=True):
    """One OHLCV bar; its field order IS the wire format, ``{"type": "bar", "symbol": ...}``.

    Frozen, so one bar can be encoded once and shared by every client that gets it. ``type`` is
    msgspec's tag (encoded first, checked when decoding), so the fields stay positional and a bar
    is cheap to make. ``amended`` is only on the wire when true.
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
    amended: bool = False


def _check_interval(name: str) -> int:
    try:
        return INTERVALS[name]
    except KeyError:
        raise ValueError(f"unknown bar interval {name!r}; known: {', '.join(INTERVALS)}") from None


class Lateness:
    """The one lateness rule, and the one ``complete`` rule, of live and history bars alike.

    ``allowed_ms``: per interval name, how long after a bar's end (plus ``grace_ms``) it still
    takes late trades; intervals not named get :data:`DEFAULT_LATENESS_MS`. ``grace_ms``: how far
    the feed's timestamps may be off the relay's wall clock.
    """

    __slots__ = ("grace_ms", "_allowed")

    def __init__(self, allowed_ms: Mapping[str, int] | None = None, grace_ms: int = DEFAULT_GRACE_MS) -> None:
        allowed = dict(DEFAULT_LATENESS_MS)
        for name, ms in (allowed_ms or {}).items():
            _check_interval(name)
            allowed[name] = ms
        if grace_ms < 0 or any(ms < 0 for ms in allowed.values()):
            raise ValueError("lateness and grace must be >= 0")
        self.grace_ms = grace_ms
        self._allowed: Mapping[str, int] = MappingProxyType(allowed)

    def allowed(self, interval: str) -> int:
        """The allowed lateness of ``interval`` bars, ms."""
        return self._allowed[interval]

    def final_at(self, interval: str, start_ms: int) -> int:
        """The wall-clock ms from which the bar starting at ``start_ms`` can no longer change."""
        return start_ms + INTERVALS[interval] + self.grace_ms + self._allowed[interval]

    def counts(self, interval: str, ts: int, recv_ms: int) -> bool:
        """Whether a trade stamped ``ts`` that arrived at ``recv_ms`` counts in its ``interval`` bar."""
        return recv_ms < self.final_at(interval, ts - ts % INTERVALS[interval]) and ts <= recv_ms + self.grace_ms

    def complete(self, interval: str, start_ms: int, now_ms: int, window: tuple[int, int] | None = None) -> bool:
        """``complete`` of the bar starting at ``start_ms`` at wall-clock ``now_ms``.

        True when the interval lies inside ``window`` (``[start, end)``; None: no window) and its
        lateness window has passed (``now_ms >= final_at``): then no trade can change it.
        """
        if window is not None and not (window[0] <= start_ms and start_ms + INTERVALS[interval] <= window[1]):
            return False
        return now_ms >= self.final_at(interval, start_ms)

    def __repr__(self) -> str:
        return f"Lateness({dict(self._allowed)!r}, grace_ms={self.grace_ms})"


# Terms a bar's sums buffer before they are compacted: memory per bar vs work per trade.
_BUFFER: Final = 64


def _compact(terms: list[float]) -> None:
    """Replace ``terms`` by a few floats with exactly the same sum (in place).

    ``math.fsum`` rounds the exact sum correctly; what it leaves out is again a sum of floats,
    so repeating it on the terms minus what was taken yields an exact expansion (2 or 3 floats in
    practice: each round takes ~53 more bits). Done once per ``_BUFFER`` trades, in C.
    """
    taken: list[float] = []
    rest = math.fsum(terms)
    while rest:
        taken.append(rest)
        rest = math.fsum(terms + [-x for x in taken])
    terms[:] = taken


_OPEN: Final = 0  # the bar in progress (the latest interval traded)
_CLOSED: Final = 1  # sent as closed (a later interval traded, or the clock passed its end)


class _Agg:
    """The aggregates of one bar; the same code adds trades live and over history.

    ``volume`` and ``pv`` are the terms of exact sums (appended per trade, compacted now and
    then): :meth:`bar` rounds them once, so the result does not depend on the trades' order.
    """

    __slots__ = ("start", "open", "high", "low", "close", "open_ts", "close_ts", "volume", "pv", "trades", "state")

    def __init__(self, start: int, ts: int, price: float, size: float) -> None:
        self.start = start
        self.open = self.high = self.low = self.close = price
        self.open_ts = self.close_ts = ts
        self.volume = [size]
        self.pv = [price * size]
        self.trades = 1
        self.state = _OPEN

    def take(self, ts: int, price: float, size: float) -> None:
        """Add one trade (in any order: ties of timestamp go to the earlier arrival for ``open``)."""
        self.trades += 1
        if size:
            volume = self.volume
            volume.append(size)
            self.pv.append(price * size)
            if len(volume) > _BUFFER:
                _compact(volume)
                _compact(self.pv)
        if price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        if ts >= self.close_ts:
            self.close = price
            self.close_ts = ts
        if ts < self.open_ts:
            self.open = price
            self.open_ts = ts

    def bar(self, symbol: str, interval: str, complete: bool, amended: bool = False) -> Bar:
        volume = math.fsum(self.volume) + 0.0
        vwap = math.fsum(self.pv) / volume if volume > 0 else None
        return Bar(
            symbol,
            interval,
            self.start,
            self.open,
            self.high,
            self.low,
            self.close,
            volume,
            self.trades,
            vwap,
            complete,
            amended,
        )


class _Line:
    """One (symbol, interval): its open bar and the closed bars not yet complete, by start."""

    __slots__ = ("open", "bars", "top")

    def __init__(self) -> None:
        self.open: _Agg | None = None  # the bar in progress, also in ``bars``
        self.bars: dict[int, _Agg] = {}
        self.top = -(1 << 62)  # the latest start held (a new bar before it is behind: amended)


class BarBuilder:
    """Live OHLCV bars of every symbol traded, for each of ``intervals`` (names from INTERVALS).

    Feed every update to :meth:`add` with its arrival time; it returns the bars to send now:

    * a bar **closed** by a trade of a later interval (``complete`` only if its lateness window
      has passed already, else ``complete=False``: late trades may still amend it);
    * a bar **amended** by a late trade that still counts (``amended=True``, ``complete=False``);
    * a bar **completed**, when a trade that opens a bar finds closed ones past their lateness.

    Call :meth:`flush` with the wall clock about once a second: it closes the bars whose interval
    the clock has passed (the symbol stopped trading) and sends each bar once more, with
    ``complete=True``, when its lateness window passes (then it is dropped from memory). A trade
    the :class:`Lateness` rule leaves out is counted in :attr:`late` (once per trade).

    State: per (symbol, interval), the bars not yet complete: by the rule those lie within
    ``grace`` of the clock before or after, plus the lateness: a handful, whatever the traffic.
    :meth:`forget` drops a symbol's.
    """

    __slots__ = ("intervals", "lateness", "late", "_spec", "_lines")

    def __init__(self, intervals: Iterable[str], lateness: Lateness | None = None) -> None:
        names = tuple(dict.fromkeys(intervals))
        if not names:
            raise ValueError("a BarBuilder needs at least one interval")
        for name in names:
            _check_interval(name)
        self.intervals: tuple[str, ...] = names
        self.lateness = lateness or Lateness()
        self.late = 0  # trades left out of at least one interval by the lateness rule
        g = self.lateness.grace_ms
        # Per interval: (name, length, final_at offset from start, index).
        self._spec = tuple(
            (n, INTERVALS[n], INTERVALS[n] + g + self.lateness.allowed(n), k) for k, n in enumerate(names)
        )
        self._lines: dict[str, tuple[_Line, ...]] = {}

    def add(self, update: Update, recv_ms: int) -> tuple[Bar, ...]:
        """Aggregate ``update`` if it is a trade; return the bars to send (closed, amended, completed).

        ``recv_ms``: when the relay received it (wall clock, UTC epoch ms), the same value the
        history stores. Quotes and trade breaks are ignored. A tuple, so that the usual answer
        (nothing to send) is the shared ``()``, not a new list. (Longer than most functions: the
        update of the open bar, nearly every trade, is inlined here.)
        """
        # The literal, not model.TRADE: a constant instead of a global lookup, on every update.
        if update.kind != "T":
            return _NO_BARS
        price = update.last_price
        if price is None:
            return _NO_BARS
        ts = update.timestamp
        lines = self._lines.get(update.symbol)
        if lines is None:
            lines = self._lines[update.symbol] = tuple(_Line() for _ in self._spec)
        if ts > recv_ms + self.lateness.grace_ms:
            self.late += 1  # stamped too far ahead of the clock: late for every interval
            return _NO_BARS
        size = update.last_size or 0.0
        pv = price * size  # once, for every interval
        out: list[Bar] | None = None
        late = False
        for name, ms, final, k in self._spec:
            start = ts - ts % ms
            if recv_ms >= start + final:
                late = True
                continue
            line = lines[k]
            agg = line.open
            if agg is not None and agg.start == start:
                # The common case, _Agg.take inlined: inside the open bar.
                agg.trades += 1
                if size:
                    volume = agg.volume
                    volume.append(size)
                    agg.pv.append(pv)
                    if len(volume) > _BUFFER:
                        _compact(volume)
                        _compact(agg.pv)
                if price > agg.high:
                    agg.high = price
                elif price < agg.low:
                    agg.low = price
                if ts >= agg.close_ts:
                    agg.close = price
                    agg.close_ts = ts
                if ts < agg.open_ts:
                    agg.open = price
                    agg.open_ts = ts
                continue
            sent = self._place(update.symbol, name, ms, final, line, start, ts, price, size, recv_ms)
            if sent:
                if out is None:
                    out = sent
                else:
                    out += sent
        if late:
            self.late += 1
        return tuple(out) if out else _NO_BARS

    def _place(
        self,
        symbol: str,
        name: str,
        ms: int,
        final: int,
        line: _Line,
        start: int,
        ts: int,
        price: float,
        size: float,
        recv_ms: int,
    ) -> list[Bar] | None:
        """A trade that counts, outside the open bar: amend a closed bar, or open a new one.

        Behind the latest bar held, or after the clock (less the grace) passed its interval: the
        trade was late, and its bar (held, or born closed) is sent as an amendment. Otherwise it
        opens the next bar: the open one (if any) is closed, and the closed ones whose lateness
        window has passed are sent complete and dropped (so memory stays bounded between flushes).
        """
        bars = line.bars
        agg = bars.get(start)
        if agg is not None:  # a closed bar (the open one is handled by add)
            agg.take(ts, price, size)
            return [agg.bar(symbol, name, False, True)]
        agg = _Agg(start, ts, price, size)
        bars[start] = agg
        if start < line.top or recv_ms - self.lateness.grace_ms >= start + ms:
            agg.state = _CLOSED
            line.top = max(line.top, start)
            return [agg.bar(symbol, name, False, True)]
        out: list[Bar] = []
        previous = line.open
        if previous is not None:
            previous.state = _CLOSED
            if recv_ms < previous.start + final:
                out.append(previous.bar(symbol, name, False))
        for held in [b for b in bars.values() if b.state == _CLOSED and recv_ms >= b.start + final]:
            out.append(held.bar(symbol, name, True))
            del bars[held.start]
        line.open = agg
        line.top = start
        return out

    def flush(self, now_ms: int) -> list[Bar]:
        """Close the bars whose interval the wall clock ``now_ms`` has passed, complete the final ones.

        Returns them: a bar the clock closes is sent ``complete=False`` (or ``True`` at once when
        its lateness window has passed too), and every bar sent before is sent once more with
        ``complete=True`` when its lateness window passes. Costs a few checks per bar held.
        """
        out: list[Bar] = []
        g = self.lateness.grace_ms
        for symbol, lines in self._lines.items():
            for name, ms, final, k in self._spec:
                line = lines[k]
                bars = line.bars
                if not bars:
                    continue
                for start, agg in list(bars.items()):
                    if now_ms >= start + final:
                        out.append(agg.bar(symbol, name, True))
                        del bars[start]
                        if agg is line.open:
                            line.open = None
                    elif agg.state == _OPEN and now_ms - g >= start + ms:
                        agg.state = _CLOSED
                        line.open = None
                        out.append(agg.bar(symbol, name, False))
        return out

    def current(self, symbol: str, interval: str) -> Bar | None:
        """The open bar of ``symbol`` in ``interval`` (``complete=False``), or None if it has none."""
        if interval not in self.intervals:
            raise ValueError(f"interval {interval!r} is not built here; built: {', '.join(self.intervals)}")
        lines = self._lines.get(symbol)
        if lines is None:
            return None
        agg = lines[self.intervals.index(interval)].open
        return None if agg is None else agg.bar(symbol, interval, False)

    def pending(self) -> int:
        """Bars held (open, or closed and not yet complete), over every symbol and interval."""
        return sum(len(line.bars) for lines in self._lines.values() for line in lines)

    def forget(self, symbol: str) -> None:
        """Drop ``symbol``'s bars, unpublished (e.g. once nobody wants its bars any more)."""
        self._lines.pop(symbol, None)


def _row(trade: Update | TradeRow) -> TradeRow:
    if isinstance(trade, Update):
        # An update without an arrival time: taken as arriving when it was stamped (on time).
        return (trade.symbol, trade.timestamp, trade.last_price, trade.last_size, trade.timestamp)  # type: ignore[return-value]
    return trade


def bars_from_trades(
    trades: Iterable[Update | TradeRow],
    interval: str,
    start_ms: int,
    end_ms: int,
    *,
    lateness: Lateness | None = None,
    now_ms: int = _FOREVER,
) -> list[Bar]:
    """The ``interval`` bars of the trades timed in ``[start_ms, end_ms)``, by symbol then start.

    ``trades`` may be updates (only trades count; each taken as arriving at its own timestamp)
    or :data:`TradeRow` tuples, in any order (arrival order is kept among equal timestamps).
    The first bar starts on the interval boundary at or before ``start_ms``, but only the trades
    inside the window count, and a bar is ``complete`` per :meth:`Lateness.complete` over the
    window at ``now_ms`` (default: far in the future, so every whole interval is complete).
    """
    _check_interval(interval)
    rows = [
        _row(t)
        for t in trades
        if (not isinstance(t, Update) or t.kind == "T") and (_row(t)[2] is not None) and start_ms <= _row(t)[1] < end_ms
    ]
    bars: list[Bar] = []
    by_symbol: dict[str, list[TradeRow]] = {}
    for r in rows:
        by_symbol.setdefault(r[0], []).append(r)
    first = start_ms - start_ms % INTERVALS[interval]
    for symbol in sorted(by_symbol):
        ordered = sorted(by_symbol[symbol], key=lambda r: r[1])
        page = bars_from_sorted_trades(
            [ordered], interval, first, end_ms, 1 << 40, lateness=lateness, now_ms=now_ms, window_start=start_ms
        )
        bars += page.bars
    return bars


class BarsPageResult(msgspec.Struct, frozen=True):
    """What :func:`bars_from_sorted_trades` made of one page.

    ``next_start``: where the next page starts (None: the window is done). ``truncated``: the
    page stopped early because the caller's budget ran out, not because ``limit`` bars were
    made; its bars are still exact (every one of them whole), and ``next_start`` resumes at the
    bar that was being read. ``late``: trades read that the lateness rule left out.
    """

    bars: list[Bar]
    next_start: int | None
    truncated: bool
    trades_read: int
    late: int = 0


def bars_from_sorted_trades(
    batches: Iterable[Iterable[TradeRow]],
    interval: str,
    start_ms: int,
    end_ms: int,
    limit: int,
    *,
    lateness: Lateness | None = None,
    now_ms: int = _FOREVER,
    window_start: int | None = None,
    keep_going: Callable[[int], bool] | None = None,
) -> BarsPageResult:
    """At most ``limit`` bars of one symbol's trades, sorted by (timestamp, arrival), read batch by batch.

    The trades :class:`Lateness` leaves out are skipped (counted in ``late``); the others are
    aggregated as live (:class:`_Agg`), so each bar equals the live one once complete. Memory is
    one batch and ``limit`` bars, however many trades the window holds: the stream is read only
    until the bar after the ``limit``-th starts (its start is ``next_start``). ``start_ms`` must
    be on an interval boundary and trades outside ``[start_ms, end_ms)`` must not be given (the
    database query selects them). ``complete`` is :meth:`Lateness.complete` over the window
    ``[window_start, end_ms)`` (``window_start`` defaults to ``start_ms``) at ``now_ms``.

    ``keep_going(trades_read)`` is asked after each batch; False stops the page there (a row or
    time budget): the bars closed so far are returned with ``truncated=True`` and ``next_start``
    at the bar being read. When it stops before any bar closed, :class:`BudgetExceeded` is raised
    (no progress can be offered: the caller should ask for a finer interval or narrower window).

    Long by this contract; the body is one pass over the trades, kept in one piece on purpose
    (it runs once per stored trade of a ``/bars`` request).
    """
    ms = _check_interval(interval)
    if start_ms % ms:
        raise ValueError(f"start_ms {start_ms} is not on a {interval} boundary")
    rule = lateness or Lateness()
    final = ms + rule.grace_ms + rule.allowed(interval)
    grace = rule.grace_ms
    window = (start_ms if window_start is None else window_start, end_ms)
    bars: list[Bar] = []
    read = late = 0
    cur: _Agg | None = None
    symbol = ""
    for batch in batches:
        for symbol, ts, price, size, recv in batch:
            read += 1
            start = ts - ts % ms
            if recv >= start + final or ts > recv + grace:
                late += 1
                continue
            if cur is not None and cur.start == start:
                cur.take(ts, price, size or 0.0)
                continue
            if cur is not None:
                bars.append(cur.bar(symbol, interval, rule.complete(interval, cur.start, now_ms, window)))
                if len(bars) >= limit:
                    # This trade opened bar number limit + 1: the page is full.
                    return BarsPageResult(bars, start, False, read, late)
            cur = _Agg(start, ts, price, size or 0.0)
        if keep_going is not None and not keep_going(read):
            if cur is None:
                return BarsPageResult(bars, None, False, read, late)
            if not bars:
                raise BudgetExceeded(read)
            return BarsPageResult(bars, cur.start, True, read, late)
    if cur is not None:
        bars.append(cur.bar(symbol, interval, rule.complete(interval, cur.start, now_ms, window)))
    return BarsPageResult(bars, None, False, read, late)


class BudgetExceeded(Exception):
    """The caller's budget ran out before one whole bar was read (``trades_read`` trades)."""

    def __init__(self, trades_read: int) -> None:
        super().__init__(f"budget exhausted after {trades_read} trades, inside one bar")
        self.trades_read = trades_read
