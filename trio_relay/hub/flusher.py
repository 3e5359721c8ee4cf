"""The single writer loop: one task writes every direct-mode outbox's frames to its socket.

With one sender task per client, every update that reaches a client costs a scheduler wake-up
of that client's task (unpark, a run-queue turn, a socket write, a park again): at a thousand
clients that was a quarter of the relay's core. Here an outbox in direct mode (see
:meth:`.Outbox.direct`) only marks itself dirty on its first put since the last flush; after
the hub's turn this one task takes each dirty outbox's frames and writes them to the client's
socket with one non-blocking write. Updates queued while it works go out in the next round, so
a busier relay writes fewer, larger writes (the batching adapts to the load, with no timer).

What the socket does not take at once (its send buffer is full: a slow reader) is handed to
that client's own task, which waits for the socket and owns the connection until the rest is
written; meanwhile the flusher skips that outbox (its frames queue and, when full, conflate),
so a slow client never holds up the others.
"""

from __future__ import annotations

import time

import trio

from .outbox import Outbox

__all__ = ["Flusher"]

# After a round that took longer than PACE_ABOVE seconds, the next starts PACING times as long
# later (the writes then use at most 1/(1+PACING) of the core, and each carries more).
PACE_ABOVE = 0.0005
PACING = 1.0


class Flusher:
    """Writes the pending frames of marked outboxes; run :meth:`run` in the hub's nursery.

    Guarantees: an outbox marked (by its first put after a flush) is looked at in the next round;
    a round never waits (each write is non-blocking); between rounds the loop yields, so the hub
    and the client readers run. An outbox that is stopped, finishing (its task writes the last
    frames itself) or whose sink is busy is skipped; the sink marks it again when it is free.
    """

    __slots__ = ("_dirty", "_lot", "rounds", "writes", "deferred")

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._lot = trio.lowlevel.ParkingLot()
        self.rounds = 0  # rounds that wrote (or looked at) something
        self.writes = 0  # non-blocking socket writes
        self.deferred = 0  # of which the socket did not take all (the rest went to the client's task)

    def mark(self, outbox: Outbox) -> None:
        """``outbox`` has frames to write (called once per flush by its first put)."""
        dirty = self._dirty
        dirty.append(outbox)
        if len(dirty) == 1:
            self._lot.unpark()

    def flush(self) -> None:
        """One round: write what every marked outbox has pending, without waiting."""
        dirty, self._dirty = self._dirty, []
        self.rounds += 1
        now = trio.current_time()  # one clock reading per round for the takes
        for outbox in dirty:
            outbox.dirty = False
            sink = outbox.sink
            if sink is None or outbox.stopped or outbox.finishing or not sink.ready():
                continue
            frames = outbox.take(now=now)
            if frames:
                self.writes += 1
                # Idle again unless the sink's task now holds the rest (the stall reaper's measure).
                outbox.idle = whole = sink.write_now(frames)
                if not whole:
                    self.deferred += 1
                outbox.progressed(len(frames))  # its own clock reading: the latency histogram's end

    async def run(self) -> None:
        """Flush after each turn of the other tasks, until cancelled.

        After a round that took T seconds the next one starts no sooner than T later: at light
        load a round takes microseconds (no delay worth the name), under load the writes stay at
        most about half of the core and each carries more, instead of the writes themselves
        using up the core the hub needs (which only turns into queueing).
        """
        clock = time.perf_counter
        while True:
            if not self._dirty:
                await self._lot.park()
            started = clock()
            self.flush()
            # Let the hub take the next upstream batch and the readers run before the next round.
            took = clock() - started
            if took > PACE_ABOVE:
                await trio.sleep(PACING * took)
            else:
                # A short round paces nothing: sleeping would cost a whole epoll tick (1 ms) of
                # latency to the next update when nothing else wakes the loop first.
                await trio.lowlevel.checkpoint()
