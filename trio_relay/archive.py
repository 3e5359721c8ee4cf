"""``trio-relay archive``: the fleet's tick stream into the tick history, once for the whole fleet.

The relays of a fleet append every update to the Redis stream ``<engine.prefix>:ticks`` when
``engine.stream_maxlen > 0``. This reads it as a member of a consumer group (``history`` by
default) and writes every update to the history backend of its own config (``[history]``:
SQLite or PostgreSQL), with the time the holder published it (the stream entry's id).

At least once: an entry is acknowledged (``XACK``) only once the history writer has written it
(or the database refused it for good). After a crash, the consumer first reads its own entries
that were never acknowledged, then new ones. Several archivers of one group share the stream
(give each a ``--consumer`` name); a new group starts with whatever the stream still holds.

Losing Redis or the database: it waits and carries on (Redis with backoff; the database through
the writer's own retries, while it stops reading when the writer's buffer is full).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections import deque
from functools import partial
from typing import Any

import coredis
import coredis.exceptions
import msgspec
import trio

from .config import Config, ConfigError, load_config
from .engine.redis import fleet_keys
from .engine.redis_client import describe_failure, is_redis_failure, redis_client
from .history import HistoryWriter
from .logsetup import configure_logging
from .model import Update
from .upstream import Backoff

__all__ = ["Archiver", "default_consumer", "run_archive"]

log = logging.getLogger("trio_relay.archive")

READ_COUNT = 1000  # entries per read
READ_BLOCK_MS = 1000  # a read waits this long for new entries (then acknowledges what was written)


def default_consumer() -> str:
    return socket.gethostname().split(".")[0][:48] or f"archiver-{os.getpid()}"


class Archiver:
    """Reads the stream into ``writer`` until cancelled. Counters for logs and tests."""

    def __init__(self, config: Config, writer: HistoryWriter, *, group: str = "history", consumer: str = "") -> None:
        self.config = config.engine
        self.writer = writer
        self.group = group
        self.consumer = consumer or default_consumer()
        self.stream = fleet_keys(self.config.prefix).stream
        self.read = 0  # entries read
        self.acked = 0  # entries acknowledged
        self.malformed = 0  # entries that are not an update (acknowledged, skipped)
        self.redis_state = "connecting"
        self.last_error = ""
        self._offered = 0  # updates offered to the writer
        self._unacked: deque[tuple[int, bytes]] = deque()  # (offered count once written, entry id)
        self._in_writer: set[bytes] = set()  # ids of the entries in _unacked
        self._decoder = msgspec.json.Decoder(Update)
        self.caught_up = trio.Event()  # set once a read found nothing new (tests, logs)
        self._stopping = trio.Event()

    def stop(self) -> None:
        """Read nothing more; wait (a while) for the writer to write what was read, acknowledge it, return."""
        self._stopping.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff(0.2, 5.0)
        task_status.started()
        while True:
            try:
                async with redis_client(self.config, f"trio-relay-archive:{self.consumer}") as redis:
                    await self._join(redis)
                    backoff.reset()
                    await self._read_all(redis)
                    return  # stopped
            except BaseException as exc:  # noqa: BLE001 (sorted right below)
                if isinstance(exc, trio.Cancelled) or not is_redis_failure(exc):
                    raise
                if self.redis_state != "down":
                    log.error("[ARCHIVE] lost Redis: %s; retrying", describe_failure(exc))
                self.redis_state, self.last_error = "down", describe_failure(exc)
            await trio.sleep(backoff.next_delay())

    async def _join(self, redis: coredis.Redis[bytes]) -> None:
        with trio.fail_after(self.config.timeout):
            try:
                await redis.xgroup_create(self.stream, self.group, "0", mkstream=True)
                log.info("[ARCHIVE] consumer group %r created on %s", self.group, self.stream)
            except coredis.exceptions.StreamDuplicateConsumerGroupError:
                pass  # it exists: carry on where the group is
        if self.redis_state != "up":
            log.info("[ARCHIVE] reading %s as consumer %r of group %r", self.stream, self.consumer, self.group)
        self.redis_state, self.last_error = "up", ""

    async def _read_all(self, redis: coredis.Redis[bytes]) -> None:
        position = b"0"  # this consumer's pending entries first, then ">" (new ones)
        while not self._stopping.is_set():
            await self._room()
            with trio.fail_after(self.config.timeout + READ_BLOCK_MS / 1000):
                reply = await redis.xreadgroup(
                    self.group,
                    self.consumer,
                    streams={self.stream: position},
                    count=READ_COUNT,
                    block=READ_BLOCK_MS if position == b">" else None,
                )
            entries = reply.get(self.stream.encode(), ()) if reply else ()
            if not entries:
                if position != b">":
                    position = b">"  # the backlog of our own is done
                else:
                    self.caught_up.set()
            for entry in entries:
                self._take(entry.identifier, entry.field_values)
            if position != b">" and entries:
                last = entries[-1].identifier  # next page of our own pending entries
                position = last if isinstance(last, bytes) else str(last).encode()
            await self._ack(redis)
        with trio.move_on_after(self.writer.shutdown_timeout):
            while self.writer.pending and not self.writer.stopped:
                await self.writer.changed()
        await self._ack(redis)

    async def _room(self) -> None:
        """Wait while the writer's buffer cannot take a whole read (the database is slow or down)."""
        writer = self.writer
        while writer.pending + READ_COUNT > writer.queue_size and not writer.stopped:
            await writer.changed()

    def _take(self, identifier: Any, fields: Any) -> None:
        entry_id = identifier if isinstance(identifier, bytes) else str(identifier).encode()
        if entry_id in self._in_writer:
            return  # read again after a lost connection: already with the writer
        self.read += 1
        raw = fields.get(b"update") if isinstance(fields, dict) else None
        try:
            update = self._decoder.decode(raw) if raw is not None else None
        except msgspec.DecodeError:
            update = None
        if update is None:
            self.malformed += 1
            if self.malformed <= 10 or self.malformed % 1000 == 0:
                log.warning(
                    "[ARCHIVE] entry %s is not an update: skipped (%d so far)", entry_id.decode(), self.malformed
                )
            self._unacked.append((self._offered, entry_id))  # nothing to wait for
            self._in_writer.add(entry_id)
            return
        published_ms = int(entry_id.split(b"-", 1)[0])
        self.writer.offer(update, published_ms)  # room was made for the whole read
        self._offered += 1
        self._unacked.append((self._offered, entry_id))
        self._in_writer.add(entry_id)

    async def _ack(self, redis: coredis.Redis[bytes]) -> None:
        writer = self.writer
        # Written, or refused for good by the database. (Dropped only while the writer stops:
        # never acknowledged, so read again next time.)
        settled = writer.written + writer.rejected
        done: list[bytes] = []
        while self._unacked and self._unacked[0][0] <= settled:
            done.append(self._unacked.popleft()[1])
        if done:
            with trio.fail_after(self.config.timeout):
                self.acked += await redis.xack(self.stream, self.group, done)
            self._in_writer.difference_update(done)


async def run_archive(config: Config, *, group: str, consumer: str) -> None:
    """The CLI's archiver: until SIGINT/SIGTERM, then write what is pending and stop."""
    import signal

    from .history import make_backend

    backend = make_backend(config.history)
    assert backend is not None, "checked by the CLI"
    writer = HistoryWriter.from_config(config.history, backend)
    archiver = Archiver(config, writer, group=group, consumer=consumer)
    log.info("[ARCHIVE] %s → %s", archiver.stream, backend.description)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            done = trio.Event()
            reading = trio.CancelScope()

            async def read() -> None:
                with reading:
                    await archiver.run()
                done.set()

            nursery.start_soon(read)
            async for signum in signals:
                log.info("[SIGNAL] %s received; writing what is pending", signal.Signals(signum).name)
                break
            archiver.stop()  # it waits for the writer, acknowledges, and returns
            with trio.move_on_after(writer.shutdown_timeout + READ_BLOCK_MS / 1000 + 1):
                await done.wait()
            reading.cancel()  # Redis is down: what is not acknowledged is read again next time
            await writer.aclose()
    log.info("[ARCHIVE] stopped: %d read, %d acknowledged, %d written", archiver.read, archiver.acked, writer.written)


def main(args: argparse.Namespace) -> int:
    """``trio-relay archive`` with the arguments parsed by :mod:`trio_relay.cli`; the exit code."""
    overrides = {"logging": {"level": args.log_level}} if args.log_level else {}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"trio-relay: {exc}", file=sys.stderr)
        return 2
    if config.history.backend == "off":
        print("trio-relay: config error: history.backend: 'off' leaves nothing to archive into", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, secrets=config.secrets(), fmt=config.logging.format)
    trio.run(partial(run_archive, config, group=args.group, consumer=args.consumer))
    return 0
