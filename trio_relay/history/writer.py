"""The history writer: every update offered is written to the database in batches, off the hot path.

The hub calls :meth:`HistoryWriter.offer` for each update. It never waits: the update goes into a
bounded buffer (``queue_size``), and when the buffer is full (the database is slow or down) the
update is dropped and counted. Live relaying never waits on the database.

The writer task (:meth:`HistoryWriter.run`, started in the daemon's nursery) takes up to
``batch_size`` updates at a time and writes them in one transaction, in a worker thread (the
drivers are synchronous): as soon as a full batch is waiting, otherwise at least every
``flush_interval`` (an update arriving after a quiet spell is written at once). Its one
connection is only ever used by one thread at a time (a ``CapacityLimiter(1)``).

If the database fails, the batch stays in the buffer, :attr:`~HistoryWriter.state` becomes
``"down"`` and the writer reconnects after a capped exponential backoff; once a write succeeds it
carries on with everything still buffered. Every few minutes it deletes the ticks older than
``retention_days`` (in chunks, taking turns with the writes).

Shutdown (cancellation of :meth:`~HistoryWriter.run`, or :meth:`~HistoryWriter.aclose`): the
writer stops taking updates and writes what is pending, for at most ``shutdown_timeout`` seconds,
then closes its connection. What could not be written in that time is logged and lost.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Final, Literal, TypeVar

import trio

from ..config import HistoryConfig
from ..model import Update, wall_ms
from .base import HistoryBackend, HistoryConnection, HistoryUnavailable, RejectedRows

__all__ = ["HistoryWriter", "WriterState"]

log = logging.getLogger("trio_relay.history")

T = TypeVar("T")

WriterState = Literal["ok", "degraded", "down"]

DAY_MS: Final = 86_400_000

# Seconds the connection may take to close once the writer has stopped.
CLOSE_GRACE: Final = 1.0


class _Tally:
    """How far a batch got: rows settled (a prefix of the batch), of which written and refused."""

    __slots__ = ("settled", "written", "rejected", "error")

    def __init__(self) -> None:
        self.settled = self.written = self.rejected = 0
        self.error = ""


class HistoryWriter:
    """Writes offered updates to a :class:`~trio_relay.history.base.HistoryBackend`.

    What a caller may rely on:

    * :meth:`offer` never blocks and never raises; it returns False when the update was dropped.
    * ``written + dropped + rejected + pending`` is the number of updates offered.
    * :attr:`state` is ``"ok"``, ``"degraded"`` (the database keeps up badly: the buffer is more
      than half full, or updates were dropped since it last was) or ``"down"`` (the last attempt to
      connect or write failed; :attr:`last_error` says why, never with a password).
    * Updates are written in the order they were offered, each at most ``flush_interval`` seconds
      (plus the time of the write before) after it was offered while the database is up. A batch
      whose commit was lost with the connection may be written twice (at least once, not exactly once).
    """

    def __init__(
        self,
        backend: HistoryBackend,
        *,
        queue_size: int = 200_000,
        batch_size: int = 50_000,
        flush_interval: float = 0.5,
        retention_days: float = 7.0,
        retention_interval: float = 300.0,
        retention_chunk: int = 50_000,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        shutdown_timeout: float = 5.0,
        wall_clock: Callable[[], int] = wall_ms,
    ) -> None:
        """Check the settings (ValueError) and set up an idle writer; :meth:`run` starts it.

        Long only by its settings and counters, one line each (every one is read elsewhere).
        """
        for name, value in (
            ("queue_size", queue_size),
            ("batch_size", batch_size),
            ("flush_interval", flush_interval),
            ("retention_interval", retention_interval),
            ("retention_chunk", retention_chunk),
            ("backoff_initial", backoff_initial),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0 (got {value!r})")
        if retention_days < 0 or shutdown_timeout < 0 or backoff_max < backoff_initial:
            raise ValueError("retention_days and shutdown_timeout must be >= 0, backoff_max >= backoff_initial")
        self.backend = backend
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retention_days = retention_days
        self.retention_interval = retention_interval
        self.retention_chunk = retention_chunk
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.shutdown_timeout = shutdown_timeout
        self._wall_clock = wall_clock

        # Updates in the order offered, with their receive time. Bounded by queue_size in offer();
        # the batch being written stays here until its commit, so a failed batch is retried.
        self._buffer: deque[tuple[Update, int, str | None]] = deque()
        self.written = 0
        self.dropped = 0
        self.rejected = 0  # refused by the database itself (a value it cannot store)
        self.deleted = 0  # by retention
        self.last_error: str | None = None

        self._down = False
        self._overflowing = False  # dropping since the buffer was last at most half full
        self._backoff = backoff_initial
        self._flush_at = -math.inf  # the next write of a partial batch
        self._retention_at = 0.0 if retention_days > 0 else math.inf
        self._retained_last = False

        self._conn: HistoryConnection | None = None
        self._limiter = trio.CapacityLimiter(1)  # the connection is used by one thread at a time
        self._abandoned = False  # a worker thread may still be using the connection
        self._wake = trio.Event()
        self._stop = trio.Event()
        self._stopping = False
        self._started = False
        self._done = trio.Event()
        self._work_scope = trio.CancelScope(shield=True)
        self._changes = trio.lowlevel.ParkingLot()

    @classmethod
    def from_config(
        cls, config: HistoryConfig, backend: HistoryBackend, *, shutdown_timeout: float = 5.0
    ) -> HistoryWriter:
        return cls(
            backend,
            queue_size=config.queue_size,
            batch_size=config.batch_size,
            flush_interval=config.flush_interval,
            retention_days=config.retention_days,
            shutdown_timeout=shutdown_timeout,
        )

    # -- what the hub and the status routes use --------------------------------------------

    @property
    def pending(self) -> int:
        """Updates offered and not yet written."""
        return len(self._buffer)

    @property
    def state(self) -> WriterState:
        """``"ok"`` until something fails; see the class docstring for the others."""
        if self._down:
            return "down"
        if self._overflowing or len(self._buffer) > self.queue_size // 2:
            return "degraded"
        return "ok"

    @property
    def stopped(self) -> bool:
        """True once :meth:`run` has returned."""
        return self._done.is_set()

    def status(self) -> dict[str, object]:
        """The writer's state and counters, for /status, /health and metrics."""
        return {
            "backend": self.backend.description,
            "state": self.state,
            "written": self.written,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "pending": self.pending,
            "deleted": self.deleted,
            "last_error": self.last_error,
        }

    def offer(self, update: Update, recv_ms: int, provider: str | None = None) -> bool:
        """Queue ``update`` (received at wall-clock ``recv_ms``) for writing; False if it was dropped.

        ``provider`` is stored with it when the update itself does not name one (the hub's source).

        Never blocks: when ``queue_size`` updates are waiting (or the writer is stopping), the
        update is dropped and counted in :attr:`dropped`.
        """
        buffer = self._buffer
        n = len(buffer)
        if n >= self.queue_size or self._stopping:
            self.dropped += 1
            if not self._overflowing and not self._stopping:
                self._overflowing = True
                log.warning(
                    "history: %d updates waiting for %s: dropping new updates until it catches up",
                    n,
                    self.backend.description,
                )
                self._changes.unpark_all()
            return False
        buffer.append((update, recv_ms, provider))
        if n == 0 or n + 1 == self.batch_size:
            self._wake.set()
        return True

    async def changed(self) -> None:
        """Wait until the writer task next makes progress or changes state (returns at once once stopped)."""
        if self._done.is_set():
            await trio.lowlevel.checkpoint()
            return
        await self._changes.park()

    # -- the task ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task. Ready at once (the database may still be unreachable: it keeps trying).

        Returns after :meth:`aclose`; when cancelled, it still writes what is pending for up to
        ``shutdown_timeout`` seconds before the cancellation goes on.
        """
        if self._started:
            raise RuntimeError("HistoryWriter.run() was already started")
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._work)
                task_status.started()
                try:
                    await self._stop.wait()
                finally:
                    # Cancelled or asked to stop: the worker (shielded) gets shutdown_timeout.
                    self._begin_shutdown()
        finally:
            self._done.set()
            self._changes.unpark_all()

    async def aclose(self) -> None:
        """Stop taking updates, write what is pending (at most ``shutdown_timeout`` s), close."""
        if not self._started:
            self._begin_shutdown()
            if self._buffer:
                log.warning("history: writer closed before it ran: %d updates not written", len(self._buffer))
            self._done.set()
            return
        self._stop.set()
        await self._done.wait()

    def _begin_shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop.set()
        self._wake.set()
        self._work_scope.deadline = min(self._work_scope.deadline, trio.current_time() + self.shutdown_timeout)

    async def _work(self) -> None:
        with self._work_scope:
            await self._loop()
        if self._work_scope.cancelled_caught:
            log.warning(
                "history: shutdown: %s did not finish within %.1f s", self.backend.description, self.shutdown_timeout
            )
        if self._conn is not None and not self._abandoned:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE):
                await self._close_connection()
        if self._buffer:
            log.warning("history: shutdown: %d updates not written to %s", len(self._buffer), self.backend.description)
        log.info(
            "history: stopped (%d written, %d dropped, %d rejected, %d not written)",
            self.written,
            self.dropped,
            self.rejected,
            len(self._buffer),
        )

    async def _loop(self) -> None:
        buffer = self._buffer
        while True:
            stopping = self._stopping
            if stopping and not buffer:
                return
            if self._conn is None:
                if not await self._connect():
                    await self._pause()
                continue
            now = trio.current_time()
            write_due = bool(buffer) and (stopping or len(buffer) >= self.batch_size or now >= self._flush_at)
            retention_due = not stopping and now >= self._retention_at
            # Retention takes turns with writes, so that neither waits behind the other for long.
            if retention_due and not (write_due and self._retained_last):
                self._retained_last = True
                if not await self._retain():
                    await self._pause()
                continue
            if write_due:
                self._retained_last = False
                if not await self._write_batch():
                    await self._pause()
                continue
            deadline = min(self._retention_at, self._flush_at) if buffer else self._retention_at
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)
        except trio.Cancelled:
            # Only the shutdown deadline cancels the worker: the thread may go on using the connection.
            self._abandoned = True
            raise

    async def _pause(self) -> None:
        """The backoff wait after a failure (capped exponential; cut short by a shutdown)."""
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.backoff_max)
        if self._stopping:
            await trio.sleep(delay)  # bounded by the shutdown deadline
        else:
            with trio.move_on_after(delay):
                await self._stop.wait()

    async def _connect(self) -> bool:
        try:
            self._conn = await self._in_thread(self.backend.connect)
        except HistoryUnavailable as exc:
            self._failed(str(exc))
            return False
        log.debug("history: connected to %s", self.backend.description)
        if not self._buffer:
            self._succeeded()  # nothing to prove with a write
        return True

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._in_thread(conn.close)

    async def _write_batch(self) -> bool:
        buffer = self._buffer
        n = min(len(buffer), self.batch_size)
        batch = list(islice(buffer, n))
        self._flush_at = trio.current_time() + self.flush_interval
        tally = _Tally()
        try:
            await self._write_sorted(batch, 0, n, tally)
        except HistoryUnavailable as exc:
            await self._lost(exc)
            return False
        finally:
            # Rows settled before a failure (written, or refused) are not tried again.
            for _ in range(tally.settled):
                buffer.popleft()
            self.written += tally.written
            self.rejected += tally.rejected
            if tally.rejected:
                self.last_error = tally.error
                log.error("history: %d updates refused by the database, dropped: %s", tally.rejected, tally.error)
        self._succeeded()
        return True

    async def _write_sorted(self, batch: list[tuple[Update, int, str | None]], lo: int, hi: int, tally: _Tally) -> None:
        """Write ``batch[lo:hi]``; if the database refuses rows, halve until each refused row is alone."""
        assert self._conn is not None
        try:
            await self._in_thread(self._conn.write, batch[lo:hi] if lo or hi < len(batch) else batch)
            tally.written += hi - lo
        except RejectedRows as exc:
            if hi - lo == 1:
                tally.rejected += 1
                tally.error = str(exc)
            else:
                mid = (lo + hi) // 2
                await self._write_sorted(batch, lo, mid, tally)
                await self._write_sorted(batch, mid, hi, tally)
        tally.settled = hi

    async def _retain(self) -> bool:
        assert self._conn is not None
        cutoff = self._wall_clock() - round(self.retention_days * DAY_MS)
        try:
            deleted = await self._in_thread(self._conn.delete_before, cutoff, self.retention_chunk)
        except HistoryUnavailable as exc:
            await self._lost(exc)
            return False
        self.deleted += deleted
        now = trio.current_time()
        # A full chunk: there is more to delete, after the writes that are due.
        self._retention_at = now if deleted >= self.retention_chunk else now + self.retention_interval
        if deleted:
            log.info("history: deleted %d ticks older than %g days", deleted, self.retention_days)
        self._succeeded()
        return True

    async def _lost(self, exc: HistoryUnavailable) -> None:
        await self._close_connection()
        self._failed(str(exc))

    def _failed(self, error: str) -> None:
        self.last_error = error
        if not self._down:
            self._down = True
            log.warning(
                "history: %s unavailable, buffering up to %d updates and retrying: %s",
                self.backend.description,
                self.queue_size,
                error,
            )
        else:
            log.debug("history: still unavailable: %s", error)
        self._changes.unpark_all()

    def _succeeded(self) -> None:
        self._backoff = self.backoff_initial
        if self._down:
            self._down = False
            log.info(
                "history: %s is back (%d updates pending, %d dropped so far)",
                self.backend.description,
                len(self._buffer),
                self.dropped,
            )
        if self._overflowing and len(self._buffer) <= self.queue_size // 2:
            self._overflowing = False
            log.info("history: caught up (%d updates dropped so far)", self.dropped)
        self._changes.unpark_all()
