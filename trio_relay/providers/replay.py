"""A recording played back as the upstream: no key, no network, the original timing.

The session replays a file made by ``trio-relay record`` (:mod:`trio_relay.recording`): the
updates received together are returned together, at the recorded gaps between receive times
divided by ``speed``. The clock starts at the session's first subscribe, so a client that
subscribes to an idle relay sees the recording from its beginning; from then on it runs
whatever is subscribed: only subscribed symbols' updates are returned, the others are skipped
but their time still passes (like a live feed).

Event timestamps are re-timed to now (``retime``, the default): the first recorded update is
stamped with the wall-clock time at which playback starts, the others at their recorded distance
from it divided by ``speed``, so replayed ticks sit where they are played (in a chart, in the
tick history) instead of at the recording's date. ``retime = false`` keeps the recorded ones.

At the end it loops (``loop``: every update and timestamp shifted forward by the recording's
length plus one average gap, so times keep increasing) or stays connected and idle, logging
``[REPLAY] end of recording`` once. A new session (a reconnect, a reload) starts again from the
beginning.

A recording made from another relay carries that relay's sequence numbers and epoch; they are
passed on as recorded on the first pass, and dropped (the hub numbers the updates itself) on
the passes after it, where they would go backwards.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import msgspec
import trio

from ..model import Update, wall_ms
from ..recording import DEMO, DEMO_RESOURCE, Recorded, RecordingError, RecordingHeader, RecordingReader, recording_path
from ..settings import ConfigError, positive
from .base import (
    MalformedFrame,
    MalformedSink,
    ProviderEntry,
    ProviderError,
    RefusalSink,
    ignore_malformed,
    ignore_refused,
)

__all__ = ["ReplayConfig", "ENTRY", "ReplayProvider", "ReplaySession"]


@attrs.frozen
class ReplayConfig:
    # For provider "replay": a recording made by `trio-relay record` ("demo": the one shipped).
    file: str = "demo"
    # Playback speed: 1 = the original timing, 10 = ten times faster.
    speed: float = attrs.field(default=1.0, validator=positive)
    # Start again from the beginning at the end of the file.
    loop: bool = False
    # Stamp the replayed updates with the time they are played (the first at playback start, the
    # others at their recorded distance / speed); false: keep the recorded timestamps.
    retime: bool = True


log = logging.getLogger("trio_relay.providers.replay")

# Most updates returned at once when the hub is behind and several recorded batches are due.
MAX_BATCH = 10_000


class ReplaySession:
    """Plays one recording; see the module docstring for what a caller may rely on."""

    def __init__(self, path: Path, config: ReplayConfig, header: RecordingHeader, on_malformed: MalformedSink) -> None:
        self._path = path
        self._speed = config.speed
        self._loop = config.loop
        self._retime = config.retime
        self._wall0 = 0  # wall-clock ms at which playback started (retime)
        self._ts0: int | None = None  # the first recorded event timestamp (retime)
        self._on_malformed = on_malformed
        self._known = set(header.symbols)
        self._symbols: set[str] = set()
        self._started = trio.Event()  # set by the first subscribe: the clock starts
        self._origin = 0.0  # trio time at which the first recorded update is due
        self._reader = self._open(first=True)
        self._entries: Iterator[Recorded] = self._reader.updates()
        self._next: Recorded | None = None  # read, not yet due
        self._pass = 0
        self._t0: int | None = None  # receive time of the first update (first pass)
        self._t_shift = 0  # ms added to receive times on this pass
        self._ts_shift = 0  # ms added to event timestamps on this pass
        # The first pass's extent, for the shifts of the next ones.
        self._last_t = 0
        self._ts_min: int | None = None
        self._ts_max = 0
        self._groups = 0  # distinct receive times
        self.delivered = 0
        self.ended = False

    def _open(self, first: bool) -> RecordingReader:
        def corrupt(reason: str, line: bytes) -> None:
            self._on_malformed(MalformedFrame(f"corrupt recording line ({reason})", line))

        try:
            # Later passes read the same file again: its problems were reported on the first.
            return RecordingReader(self._path, on_corrupt=corrupt if first else None, quiet=not first)
        except RecordingError as exc:
            raise ProviderError(str(exc)) from None

    def close(self) -> None:
        self._reader.close()

    # ------------------------------------------------------------------ Session
    async def subscribe(self, symbols: Sequence[str]) -> None:
        for s in symbols:
            if self._known and s not in self._known and s not in self._symbols:
                log.warning("[REPLAY] %s is not in the recording: it will get no updates", s)
        self._symbols.update(symbols)
        if not self._started.is_set():
            self._origin = trio.current_time()
            self._wall0 = wall_ms()
            self._started.set()

    async def unsubscribe(self, symbols: Sequence[str]) -> None:
        self._symbols.difference_update(symbols)

    async def receive(self) -> list[Update]:
        await self._started.wait()
        while True:
            head = self._peek()
            if head is None:
                if self._loop and self._rewind():
                    continue
                if not self.ended:
                    self.ended = True
                    log.info("[REPLAY] end of recording (%d update(s) delivered); staying connected", self.delivered)
                await trio.sleep_forever()
            await trio.sleep_until(self._due(head.t))
            batch = self._take_due()
            if batch:
                self.delivered += len(batch)
                return batch

    # ------------------------------------------------------------------ playback
    def _due(self, t: int) -> float:
        assert self._t0 is not None
        return self._origin + (t + self._t_shift - self._t0) / 1000.0 / self._speed

    def _peek(self) -> Recorded | None:
        if self._next is None:
            self._next = next(self._entries, None)
            if self._next is not None and self._t0 is None:
                self._t0 = self._next.t
        return self._next

    def _take_due(self) -> list[Update]:
        """Every update due by now (one recorded batch, or several when behind), filtered."""
        now = trio.current_time()
        out: list[Update] = []
        wanted = self._symbols
        taken = 0
        while taken < MAX_BATCH:
            entry = self._peek()
            if entry is None or self._due(entry.t) > now:
                break
            self._next = None
            taken += 1
            update = entry.update
            if self._pass == 0:
                self._note_extent(entry)
            if self._ts0 is None:
                self._ts0 = update.timestamp
            if update.symbol in wanted:
                if self._pass or self._retime:
                    update = msgspec.structs.replace(update, timestamp=self._stamp(update.timestamp))
                if self._pass:
                    update = msgspec.structs.replace(update, seq=0, epoch=None)
                out.append(update)
        return out

    def _stamp(self, recorded: int) -> int:
        """An update's event time on this pass: shifted past the earlier passes, re-timed to now if asked."""
        ts = recorded + self._ts_shift
        if not self._retime:
            return ts
        assert self._ts0 is not None
        return self._wall0 + round((ts - self._ts0) / self._speed)

    def _note_extent(self, entry: Recorded) -> None:
        if self._groups == 0 or entry.t != self._last_t:
            self._groups += 1
        self._last_t = entry.t
        ts = entry.update.timestamp
        self._ts_min = ts if self._ts_min is None else min(self._ts_min, ts)
        self._ts_max = max(self._ts_max, ts)

    def _rewind(self) -> bool:
        """Start the next pass; False when there is nothing to loop over."""
        if self._t0 is None or self._ts_min is None:
            return False  # no update at all
        span = self._last_t - self._t0
        # One average gap between the last batch and the first one again (1 s if there is one batch).
        gap = max(1, round(span / (self._groups - 1))) if self._groups > 1 else 1000
        self._pass += 1
        self._t_shift += span + gap
        self._ts_shift += max(span, self._ts_max - self._ts_min) + gap
        self._reader.close()
        self._reader = self._open(first=False)
        self._entries = self._reader.updates()
        log.info("[REPLAY] looping: pass %d", self._pass + 1)
        return True


class ReplayProvider:
    name = "replay"
    detects_stale = False  # a quiet stretch of a recording is not a dead connection

    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        try:
            with recording_path(config.file) as path, RecordingReader(path, quiet=True) as reader:
                self.header = reader.header
        except (OSError, RecordingError) as exc:
            raise ConfigError(f"config error: replay.file: {_reason(exc)}") from None

    @property
    def label(self) -> str:
        return f"demo ({DEMO_RESOURCE})" if self.config.file == DEMO else self.config.file

    def describe(self) -> str:
        loop = ", looping" if self.config.loop else ""
        stamps = "re-timed to now" if self.config.retime else "recorded timestamps"
        return f"replay of {self.label} at {self.config.speed:g}x{loop} ({stamps})"

    @asynccontextmanager
    async def session(
        self, on_malformed: MalformedSink = ignore_malformed, on_refused: RefusalSink = ignore_refused
    ) -> AsyncIterator[ReplaySession]:
        with recording_path(self.config.file) as path:
            session = ReplaySession(path, self.config, self.header, on_malformed)
            try:
                yield session
            finally:
                session.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename}"
    if isinstance(exc, OSError):
        return f"cannot read {exc.filename}: {exc.strerror}"
    return str(exc)


ENTRY = ProviderEntry(
    name="replay", settings=ReplayConfig, build=lambda settings, _upstream: ReplayProvider(settings), network=False
)
