"""Reference-counted upstream demand: client subscriptions, pins, and a linger period."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable

import trio

__all__ = ["Demand"]


class Demand:
    """Reference-counted upstream demand: client subscriptions, pins, and a linger period."""

    def __init__(self, linger: float, pinned: Iterable[str] = ()) -> None:
        self.linger = linger
        self._refs: Counter[str] = Counter()
        self._pinned: set[str] = set(pinned)
        self._lingering: dict[str, float] = {}  # symbol → trio time it stops being wanted
        self.wanted: set[str] = set(self._pinned)
        self._changed = trio.Event()
        self.on_removed: Callable[[str], None] | None = None

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    def refcount(self, symbol: str) -> int:
        return self._refs[symbol]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _add(self, symbols: Iterable[str]) -> None:
        changed = False
        for s in symbols:
            self._lingering.pop(s, None)
            if s not in self.wanted:
                self.wanted.add(s)
                changed = True
        if changed:
            self._notify()

    def _maybe_release(self, symbols: Iterable[str]) -> None:
        now = trio.current_time()
        removed = []
        for s in symbols:
            if self._refs[s] > 0 or s in self._pinned or s not in self.wanted:
                continue
            if self.linger > 0:
                self._lingering[s] = now + self.linger
            else:
                removed.append(s)
        self._remove(removed)
        if self._lingering:
            self._notify()  # the reconciler re-computes its next deadline

    def _remove(self, symbols: list[str]) -> None:
        for s in symbols:
            self.wanted.discard(s)
            self._refs.pop(s, None)
            if self.on_removed is not None:
                self.on_removed(s)
        if symbols:
            self._notify()

    def acquire(self, symbols: Iterable[str]) -> None:
        symbols = list(symbols)
        for s in symbols:
            self._refs[s] += 1
        self._add(symbols)

    def release(self, symbols: Iterable[str]) -> None:
        symbols = list(symbols)
        for s in symbols:
            if self._refs[s] > 0:
                self._refs[s] -= 1
        self._maybe_release(symbols)

    def pin(self, symbols: Iterable[str]) -> None:
        symbols = list(symbols)
        self._pinned.update(symbols)
        self._add(symbols)

    def unpin(self, symbols: Iterable[str]) -> list[str]:
        """Unpin; returns the symbols that were pinned."""
        was = [s for s in symbols if s in self._pinned]
        self._pinned.difference_update(was)
        self._maybe_release(was)
        return was

    def expire(self) -> None:
        """Drop lingering symbols whose time is up."""
        now = trio.current_time()
        done = [s for s, t in self._lingering.items() if t <= now]
        for s in done:
            del self._lingering[s]
        self._remove(done)

    def next_expiry(self) -> float:
        return min(self._lingering.values(), default=math.inf)

    def changed_event(self) -> trio.Event:
        """An event set at the next change of :attr:`wanted` (take it before reading ``wanted``)."""
        return self._changed
