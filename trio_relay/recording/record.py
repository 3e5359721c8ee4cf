"""``record()``: a provider's feed into a recording file, and the ``trio-relay record`` command.

The upstream task runs exactly as in the daemon (same provider, same reconnects), but its
updates go to a :class:`~trio_relay.recording.file.RecordingWriter` instead of a hub; with
``raw``, each provider text frame is tapped and written before the updates made from it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..model import ProviderSwitched, UpstreamItem
from ..providers import registry
from ..providers.base import ignore_malformed, ignore_refused
from .file import RecordingError, RecordingHeader, RecordingWriter

if TYPE_CHECKING:
    from ..config import Config
    from ..providers.base import MalformedSink, Provider, RefusalSink, Session

__all__ = ["RecordSummary", "record", "add_record_parser", "run_record"]

log = logging.getLogger("trio_relay.recording")

SYNC_INTERVAL = 1.0  # seconds between fsyncs while recording
SYNC_LINES = 10_000  # ...or after this many lines, whichever comes first
RAW_PROVIDERS = frozenset(name for name, entry in registry.ENTRIES.items() if entry.network)
DRAIN_TIMEOUT = 5.0  # after a stop: seconds to close the upstream and write what it sent


class _ReceiveClock:
    """Receive times in epoch ms: the wall clock at the start, advanced by the Trio clock.

    Monotonic (an NTP step cannot make a recording go back in time) and virtual under
    ``MockClock``, so a test can record minutes in milliseconds.
    """

    def __init__(self) -> None:
        self._wall_ms = time.time_ns() // 1_000_000
        self._origin = trio.current_time()

    def now_ms(self) -> int:
        return self._wall_ms + round((trio.current_time() - self._origin) * 1000)


class RecordSummary:
    """What ``record()`` wrote so far (live while it runs: ``task_status.started`` hands it over)."""

    def __init__(self, path: Path, provider: str, symbols: list[str]) -> None:
        self.path = path
        self.provider = provider
        self.symbols = symbols
        self.updates = 0
        self.raw_frames = 0
        self.per_symbol: Counter[str] = Counter()
        self.bytes = 0
        self.started_at = trio.current_time()
        self.elapsed = 0.0

    def describe(self) -> str:
        missing = [s for s in self.symbols if not self.per_symbol[s]]
        text = (
            f"recorded {self.updates} update(s) of {len(self.per_symbol)}/{len(self.symbols)} symbol(s) "
            f"from {self.provider} in {self.elapsed:.1f}s to {self.path} ({self.bytes} bytes)"
        )
        if self.raw_frames:
            text += f", with {self.raw_frames} raw frame(s)"
        if missing:
            text += f"; nothing for {','.join(missing[:10])}{',…' if len(missing) > 10 else ''}"
        return text


class _TapWs:
    """Stands in for a session's WsClient and hands every text frame it reads to ``sink``."""

    def __init__(self, ws: Any, sink: Callable[[list[str]], None]) -> None:
        self._ws = ws
        self._sink = sink

    async def receive_batch(self) -> list[str]:
        frames: list[str] = await self._ws.receive_batch()
        self._sink(frames)
        return frames

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)


class _RawTapProvider:
    """A provider whose sessions' frames are also handed to ``sink`` (raw recording).

    The network sessions read through a :class:`~trio_relay.providers.wsclient.WsClient` kept
    in ``_ws``; that attribute is wrapped once the session is open. Frames read during the
    login (before the session exists) are not seen.
    """

    def __init__(self, inner: Provider, sink: Callable[[list[str]], None]) -> None:
        self._inner = inner
        self._sink = sink
        self.name = inner.name
        self.detects_stale = inner.detects_stale

    def describe(self) -> str:
        return self._inner.describe()

    def session(
        self, on_malformed: MalformedSink = ignore_malformed, on_refused: RefusalSink = ignore_refused
    ) -> AbstractAsyncContextManager[Session]:
        return self._session(on_malformed, on_refused)

    @asynccontextmanager
    async def _session(self, on_malformed: MalformedSink, on_refused: RefusalSink) -> AsyncIterator[Session]:
        async with self._inner.session(on_malformed, on_refused) as session:
            ws = getattr(session, "_ws", None)
            if ws is None or not hasattr(ws, "receive_batch"):
                raise RecordingError(
                    f"provider {self.name!r} does not expose its frames: raw recording is not possible"
                )
            setattr(session, "_ws", _TapWs(ws, self._sink))  # noqa: B010
            yield session


class _Syncer:
    """fsyncs the recording every SYNC_INTERVAL seconds, or sooner when asked."""

    def __init__(self, writer: RecordingWriter) -> None:
        self._writer = writer
        self._wanted = trio.Event()

    def want(self) -> None:
        self._wanted.set()

    async def run(self) -> None:
        writer = self._writer
        while True:
            with trio.move_on_after(SYNC_INTERVAL):
                await self._wanted.wait()
            self._wanted = trio.Event()
            if writer.unsynced:
                # In the Trio thread, on purpose: it blocks the loop for an fsync's few
                # milliseconds once a second, which a recorder can afford (the upstream socket
                # buffers meanwhile), and keeps the recorder deterministic in virtual time (a
                # worker thread lets a MockClock jump ahead while it runs).
                writer.sync()


async def record(
    config: Config,
    symbols: Sequence[str],
    out_path: str | Path,
    *,
    raw: bool = False,
    duration: float | None = None,
    stop: trio.Event | None = None,
    overwrite: bool = False,
    task_status: trio.TaskStatus[RecordSummary] = trio.TASK_STATUS_IGNORED,
) -> RecordSummary:
    """Record every update of ``symbols`` from the config's provider into ``out_path``.

    Runs the normal :class:`~trio_relay.upstream.Upstream` (reconnects and backoff included)
    with ``symbols`` pinned, until ``duration`` seconds have passed, ``stop`` is set (both: the
    upstream is closed cleanly and what it already sent is written) or the task is cancelled
    (the file is closed as it is). ``raw`` also records the upstream frames (network providers
    only). ``started`` hands over the live :class:`RecordSummary`; the return value is the
    final one, also logged. (Long by this contract; the body is the recording's lifetime.)
    """
    from ..hub import Demand, Stats
    from ..upstream import Item, Upstream, cancel_on

    provider = _recording_provider(config, raw)
    wanted = list(dict.fromkeys(symbols))
    if not wanted:
        raise RecordingError("no symbols to record")
    clock = _ReceiveClock()
    path = Path(out_path)
    header = RecordingHeader.new(provider.name, wanted, clock.now_ms(), raw=raw)
    summary = RecordSummary(path, provider.name, wanted)
    demand = Demand(0.0, wanted)
    # Upstream → recorder, in batches. When full, the upstream reader waits (the provider's
    # socket buffers meanwhile); writing a batch is one write(), so it rarely fills.
    send, receive = trio.open_memory_channel[Item](config.upstream.queue_size)
    writer = RecordingWriter(path, header, overwrite=overwrite)
    try:
        syncer = _Syncer(writer)
        sink = _Sink(writer, summary, clock, syncer)
        write_batch = sink.batch
        if raw:
            provider = _RawTapProvider(provider, sink.frames)
        upstream = Upstream(provider, demand, send, config.upstream, Stats())
        log.info("[RECORD] %s -> %s: %s", provider.describe(), path, ",".join(wanted))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(syncer.run)
            await nursery.start(upstream.run)
            task_status.started(summary)
            with trio.CancelScope() as recording:
                if duration is not None:
                    recording.deadline = trio.current_time() + duration
                if stop is not None:
                    nursery.start_soon(cancel_on, stop, recording)
                async for item in receive:
                    write_batch(item)
            upstream.stop()  # a clean close; the channel ends once it is closed
            with trio.move_on_after(DRAIN_TIMEOUT):
                async for item in receive:
                    write_batch(item)
            nursery.cancel_scope.cancel()
    finally:
        writer.close()  # flushed and fsynced, whatever ended the recording
        summary.bytes = path.stat().st_size
        summary.elapsed = trio.current_time() - summary.started_at
        log.info("[RECORD] %s", summary.describe())
    return summary


def _recording_provider(config: Config, raw: bool) -> Provider:
    """The config's first provider (failover is not used while recording); RecordingError if unfit."""
    provider: Provider = registry.make_provider(config)
    if raw and provider.name not in RAW_PROVIDERS:
        raise RecordingError(
            f"raw recording needs a network provider ({', '.join(sorted(RAW_PROVIDERS))}); "
            f"{provider.name!r} has no upstream frames"
        )
    if len(config.provider_chain) > 1:
        log.warning("[RECORD] failover is not used while recording: recording %s only", provider.name)
    return provider


class _Sink:
    """Writes what the upstream hands over (updates, and raw frames when asked), counting it."""

    def __init__(self, writer: RecordingWriter, summary: RecordSummary, clock: _ReceiveClock, syncer: _Syncer) -> None:
        self.writer, self.summary, self.clock, self.syncer = writer, summary, clock, syncer

    def batch(self, item: UpstreamItem) -> None:
        if isinstance(item, ProviderSwitched):
            return  # there is one provider here
        self.writer.write_updates(item, self.clock.now_ms())
        self.summary.updates += len(item)
        self.summary.per_symbol.update(u.symbol for u in item)
        if self.writer.unsynced >= SYNC_LINES:
            self.syncer.want()

    def frames(self, frames: list[str]) -> None:
        self.writer.write_raw(frames, self.clock.now_ms())
        self.summary.raw_frames += len(frames)
        if self.writer.unsynced >= SYNC_LINES:
            self.syncer.want()


# --------------------------------------------------------------------------- command line

_PROVIDER_CHOICES = tuple(registry.names(aliases=True))


def add_record_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``trio-relay record`` to the CLI's subcommands (dispatch it to :func:`run_record`)."""
    p = subparsers.add_parser(
        "record",
        help="record an upstream feed to a file (play it back with provider 'replay')",
        description=(
            "Record every update of the given symbols from a provider into a recording file "
            "(JSON lines; gzip if the name ends in .gz), until --duration or Ctrl-C. "
            "Play it back with 'trio-relay serve --provider replay --replay-file FILE'."
        ),
    )
    p.add_argument("--config", help="TOML config file (provider keys and settings)")
    p.add_argument("--provider", choices=_PROVIDER_CHOICES, help="provider to record (default: the config's)")
    p.add_argument("--symbols", required=True, help="comma-separated symbols to record")
    p.add_argument("--out", required=True, help="the recording to write (.jsonl, or .jsonl.gz for gzip)")
    p.add_argument("--raw", action="store_true", help="also record the raw upstream frames (network providers only)")
    p.add_argument("--duration", type=float, help="seconds to record (default: until Ctrl-C)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default INFO)")
    return p


async def _record_until_signalled(
    config: Config, symbols: list[str], out: str, raw: bool, duration: float | None, overwrite: bool
) -> RecordSummary | None:
    """``record()`` until it ends; the first SIGINT/SIGTERM stops it cleanly, a second at once."""
    stop = trio.Event()
    result: RecordSummary | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    if stop.is_set():
                        nursery.cancel_scope.cancel()
                        return
                    log.info("[SIGNAL] %s received; finishing the recording", signal.Signals(signum).name)
                    stop.set()

            nursery.start_soon(watch)
            result = await record(config, symbols, out, raw=raw, duration=duration, stop=stop, overwrite=overwrite)
            nursery.cancel_scope.cancel()
    return result


def run_record(args: argparse.Namespace) -> int:
    """``trio-relay record``: 0 when done, 1 when recording failed, 2 for bad arguments."""
    from ..config import ConfigError, load_config
    from ..logsetup import configure_logging
    from ..upstream import UpstreamGaveUp

    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    upstream: dict[str, Any] = {"pinned": symbols, "unsubscribe_linger": 0.0}
    if args.provider is not None:
        upstream.update(provider=args.provider, providers=[])
    overrides: dict[str, dict[str, Any]] = {"upstream": upstream}
    if args.log_level is not None:
        overrides["logging"] = {"level": args.log_level}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"trio-relay: {exc}", file=sys.stderr)
        return 2
    if not config.upstream.pinned:
        print("trio-relay: --symbols: no symbols given", file=sys.stderr)
        return 2
    if args.duration is not None and not (args.duration > 0 and math.isfinite(args.duration)):
        print("trio-relay: --duration: must be a number of seconds > 0", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not args.force:
        print(f"trio-relay: {args.out} exists (use --force to overwrite it)", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, secrets=config.secrets(), fmt=config.logging.format)
    code = 0
    summary: RecordSummary | None = None
    try:
        summary = trio.run(
            _record_until_signalled, config, list(config.upstream.pinned), args.out, args.raw, args.duration, args.force
        )
    except* UpstreamGaveUp as group:
        log.error("[EXIT] upstream gave up: %s", group.exceptions[0])
        code = 1
    except* (RecordingError, OSError) as group:
        print(f"trio-relay: {group.exceptions[0]}", file=sys.stderr)
        code = 1
    if summary is not None:
        print(summary.describe())
    return code
