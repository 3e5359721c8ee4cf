"""A client's bounded queue of encoded frames, conflating per symbol when full."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import trio

from ..model import ws_payload, ws_text_frame
from .stats import LatencyHistogram

__all__ = ["DirectSink", "Outbox"]


class DirectSink(Protocol):
    """Where the hub's flusher writes an outbox's frames without waiting (see :mod:`.flusher`)."""

    def ready(self) -> bool:
        """True if no write to the client is in progress (the flusher may write now)."""
        ...

    def write_now(self, frames: list[bytes]) -> bool:
        """Write ``frames`` as far as the socket takes them now; True if all of it was written.

        False: the sink's own task now owns the rest (and the connection until it is written).
        """
        ...


def _unpark_sender(outbox: Outbox) -> None:
    outbox._lot.unpark()


class Outbox:
    """A client's bounded queue of encoded WebSocket frames (bytes, shared between clients).

    A batched client's outbox (``batch``) holds the frames' payloads instead (the hub routes one
    payload, sliced once per update, to all of a symbol's batched subscribers): its sender joins
    them into one JSON array without touching each message again. :meth:`put` takes a frame and
    keeps what the mode needs; :meth:`push` takes the entry as it is (the hub's hot path).

    Up to ``capacity`` frames queue in order. When full it switches to conflation: one pending
    frame per symbol (the latest), so its size is bounded by the client's symbol count, and the
    client always gets the newest price of every symbol it wants, never a backlog. Replies
    (acks, errors, pongs) are never conflated; more than ``capacity`` unread replies is a
    protocol abuse and :meth:`put_control` returns False.
    """

    __slots__ = (
        "capacity",
        "_msgs",
        "_mkeys",
        "_latest",
        "_lot",
        "_controls",
        "_keys",
        "conflated",
        "sent",
        "idle",
        "last_progress",
        "stopped",
        "finishing",
        "oldest",
        "_taken_oldest",
        "latency",
        "dirty",
        "_wake",
        "sink",
        "batch",
    )

    def __init__(self, capacity: int, *, batch: bool = False) -> None:
        self.capacity = capacity
        self.batch = batch  # entries are payloads (one JSON array per write), not frames
        # Below capacity: the pending entries in order, and their keys alongside (two lists, so
        # a put makes no tuple and a take hands over the list itself).
        self._msgs: list[bytes] = []
        self._mkeys: list[object] = []
        self._latest: OrderedDict[object, bytes] | None = None  # not None while conflating
        self._lot = trio.lowlevel.ParkingLot()
        self._controls = 0
        self._keys = itertools.count()
        self.conflated = 0
        self.sent = 0
        self.idle = True  # the sender is waiting for data (so it cannot be stalled)
        self.last_progress = trio.current_time()
        self.stopped = False
        self.finishing = False  # set by finish(): hand out what is pending, then stop
        self.oldest = 0.0  # when the oldest pending frame was queued (trio clock)
        self._taken_oldest = 0.0
        self.latency: LatencyHistogram | None = None  # set by the hub: queued → written
        # Set by the first put since the consumer last looked, which then calls _wake once: the
        # sender task's unpark, or (direct mode) the hub flusher's mark. Later puts pay one test.
        self.dirty = False
        self._wake: Callable[[Outbox], object] = _unpark_sender
        self.sink: DirectSink | None = None  # set in direct mode: the flusher writes to it

    def __len__(self) -> int:
        return len(self._msgs) if self._latest is None else len(self._latest)

    def put(self, key: object, frame: bytes) -> None:
        """Queue ``frame`` (its payload, in batch mode) for symbol ``key``; never blocks."""
        self.push(key, ws_payload(frame) if self.batch else frame)

    def push(self, key: object, msg: bytes) -> None:
        """Queue ``msg``, already in this outbox's form (frame or payload), for ``key``."""
        latest = self._latest
        if latest is None:
            msgs = self._msgs
            if len(msgs) < self.capacity:
                if not msgs:
                    self.oldest = trio.current_time()  # for the relay-latency histogram
                msgs.append(msg)
                self._mkeys.append(key)
                if not self.dirty:
                    self.dirty = True
                    self._wake(self)
                return
            latest = self._latest = OrderedDict()
            for k, m in zip(self._mkeys, msgs):
                if k in latest:
                    self.conflated += 1
                latest[k] = m
            self._msgs, self._mkeys = [], []
        if key in latest:
            self.conflated += 1
        latest[key] = msg
        if not self.dirty:
            self.dirty = True
            self._wake(self)

    def direct(self, sink: DirectSink, mark: Callable[[Outbox], object]) -> None:
        """Direct mode: each put that finds the outbox clean calls ``mark(self)`` (the hub's
        flusher), which takes the frames and writes them to ``sink`` without a task wake-up.

        The sender task then only waits for :meth:`stop`/:meth:`finish` and for what the sink
        hands it (a write the socket did not take at once).
        """
        self.sink = sink
        self._wake = mark
        if self:
            self.dirty = True
            mark(self)

    def poke(self) -> None:
        """Signal pending frames again (a direct sink that was busy when the flusher came)."""
        if not self.dirty and (self._msgs or self._latest):
            self.dirty = True
            self._wake(self)

    async def wait(self) -> None:
        """Park the sender task until :meth:`wake`, :meth:`stop` or :meth:`finish` (direct mode)."""
        await self._lot.park()

    def wake(self) -> None:
        """Wake the sender task parked in :meth:`wait` (its sink has bytes for it to write)."""
        self._lot.unpark_all()

    def __bool__(self) -> bool:
        return bool(self._msgs or self._latest)

    @property
    def conflating(self) -> bool:
        """True while full: one pending frame per key, the latest."""
        return self._latest is not None

    def set_batch(self, batch: bool) -> None:
        """Switch the entries' form (frames ↔ payloads), the pending ones included, in place."""
        if batch == self.batch:
            return
        self.batch = batch

        def convert(msg: bytes) -> bytes:
            return ws_payload(msg) if batch else ws_text_frame(msg)

        if self._latest is not None:
            for key, msg in self._latest.items():
                self._latest[key] = convert(msg)
        else:
            self._msgs = [convert(m) for m in self._msgs]

    def put_last(self, key: object, msg: bytes) -> None:
        """Queue ``msg`` for ``key`` after everything pending (a full state replacing an older one).

        Unlike :meth:`put`, a replaced frame's place is not kept: the new one goes last, after
        any frame queued since (a delta feed's in-order messages, see :mod:`.delivery`).
        """
        if self._latest is not None and key in self._latest:
            del self._latest[key]
            self.conflated += 1
        self.put(key, msg)

    def put_control(self, msg: bytes) -> bool:
        """Queue a reply; False if the client already has ``capacity`` unread replies."""
        if self._controls >= self.capacity:
            return False
        self._controls += 1
        # An int key never equals a symbol, so a reply is never conflated away.
        self.put(-1 - next(self._keys), msg)
        return True

    def put_replay(self, symbol: str, msg: bytes) -> None:
        """Queue a replayed update: in order, never conflated (bounded by the resume history)."""
        self.put((symbol, next(self._keys)), msg)

    def discard(self, symbols: set[str]) -> None:
        """Forget pending updates of ``symbols`` (called on unsubscribe, before its ack)."""

        def of(key: object) -> bool:
            return key in symbols or (type(key) is tuple and key[0] in symbols)

        if self._latest is not None:
            for k in [k for k in self._latest if of(k)]:
                del self._latest[k]
        else:
            kept = [(k, m) for k, m in zip(self._mkeys, self._msgs) if not of(k)]
            self._mkeys = [k for k, _m in kept]
            self._msgs = [m for _k, m in kept]

    async def get(self, limit: int = 0) -> list[bytes]:
        """Wait for pending frames and take them in order: all of them, or at most ``limit``.

        A sender that writes one frame at a time should take one at a time: what it leaves
        here can still be conflated, what it took can only go stale in its hands.
        """
        if self.stopped:
            return []
        if not (self._msgs or self._latest):
            if self.finishing:
                self.stopped = True
                return []
            self.idle = True
            while not (self._msgs or self._latest):
                self.dirty = False  # the next put wakes this task
                await self._lot.park()
                if self.stopped or (self.finishing and not (self._msgs or self._latest)):
                    self.stopped = True
                    return []
        return self.take(limit)

    def take(self, limit: int = 0, now: float | None = None) -> list[bytes]:
        """Take pending frames in order without waiting: all of them, or at most ``limit``.

        ``now`` is trio's clock if the caller has read it already (the flusher, once per round).
        """
        self.idle = False
        self.last_progress = now = trio.current_time() if now is None else now
        self._taken_oldest = self.oldest
        self.oldest = now  # what stays behind was queued no earlier than... close enough
        latest = self._latest
        if latest is not None:
            if limit and len(latest) > limit:
                pairs = [latest.popitem(last=False) for _ in range(limit)]
            else:
                pairs = list(latest.items())
                self._latest = None
            keys: list[object] = [k for k, _m in pairs]
            msgs = [m for _k, m in pairs]
        elif limit and len(self._msgs) > limit:
            keys, msgs = self._mkeys[:limit], self._msgs[:limit]
            del self._mkeys[:limit], self._msgs[:limit]
        else:
            keys, msgs = self._mkeys, self._msgs
            self._mkeys, self._msgs = [], []
        if self._controls:
            self._controls -= sum(1 for k in keys if type(k) is int)
        return msgs

    def stop(self) -> None:
        """No more sending: :meth:`get` returns ``[]`` from now on, pending frames or not."""
        self.stopped = True
        self._lot.unpark_all()

    def finish(self) -> None:
        """Hand out what is pending (a last error or notice before a close), then stop."""
        self.finishing = True
        self._lot.unpark_all()

    def progressed(self, n: int = 1) -> None:
        """The sender delivered ``n`` frames (the oldest of them queued at ``_taken_oldest``)."""
        self.sent += n
        self.last_progress = now = trio.current_time()
        if self.latency is not None:
            self.latency.observe(now - self._taken_oldest)
