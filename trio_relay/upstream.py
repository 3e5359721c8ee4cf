"""The upstream task: owns the ONE provider connection for the life of the daemon.

One attempt = open a provider session (connect + log in), then run three tasks until the
connection fails: the reader (frames → updates → hub channel), the reconciler (tells the
provider what :class:`~trio_relay.hub.Demand` wants, re-subscribing everything after each
reconnect), and the stale-feed watchdog. Between attempts it waits under a cancel scope: capped
exponential backoff with full jitter, reset once a connection has stayed up for
``backoff_reset_after``; a rejected key waits ``auth_retry_delay`` instead. By default it never
gives up.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

import trio

from .config import UpstreamConfig
from .hub import Demand, Stats
from .model import Update
from .providers.base import AuthFailed, MalformedFrame, Provider, ProviderError, Session

__all__ = ["Upstream", "Backoff", "StaleFeed", "UpstreamGaveUp", "UpstreamState"]

log = logging.getLogger("trio_relay.upstream")


class UpstreamState:
    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    AUTH_FAILED = "auth_failed"
    STOPPED = "stopped"
    FAILED = "failed"


class StaleFeed(Exception):
    """No frame for longer than ``stale_after`` while symbols are subscribed."""


class UpstreamGaveUp(Exception):
    """``max_retries`` consecutive attempts failed (only when max_retries > 0)."""


# What a network peer or provider can do to one attempt; anything else is a bug and propagates.
RETRYABLE: tuple[type[BaseException], ...] = (
    ProviderError,  # includes the WebSocket client's UpstreamClosed and HandshakeRejected
    StaleFeed,
    trio.BrokenResourceError,
    trio.TooSlowError,
    OSError,
)


class Backoff:
    """Capped exponential backoff with full jitter: delay n is uniform(0, min(cap, initial·2ⁿ))."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng if rng is not None else random.Random()

    def ceiling(self) -> float:
        return min(self.maximum, self.initial * float(2 ** min(self.attempt, 64)))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, OSError) else text


class Upstream:
    """Runs the provider connection; its attributes are the upstream's health and status."""

    def __init__(
        self,
        provider: Provider,
        demand: Demand,
        send: trio.MemorySendChannel[list[Update]],
        config: UpstreamConfig,
        stats: Stats,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.provider = provider
        self.demand = demand
        self.config = config
        self.stats = stats
        self._send = send
        self._backoff = Backoff(config.backoff_initial, config.backoff_max, rng)
        self._rng = rng if rng is not None else random.Random()
        self._stop = trio.Event()
        self._wake = trio.Event()  # set by stop() and restart(): ends the current session
        self._restart = False
        self._connect_scope = trio.CancelScope()
        self.state = UpstreamState.STARTING
        self.connected_since: float | None = None  # wall clock, for /status
        self.connected_at: float | None = None  # trio clock
        self.last_message_at: float | None = None  # trio clock
        self.next_attempt_at: float | None = None  # trio clock
        self.attempts = 0
        self.reconnects = 0
        self.last_error = ""
        self.subscribed: set[str] = set()
        self._active_since = 0.0  # staleness is measured from max(last message, last subscribe)

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Close the connection cleanly and make :meth:`run` return.

        A connect or login still in progress is abandoned at once (nothing to close cleanly).
        """
        self._stop.set()
        self._wake.set()
        if self.state != UpstreamState.CONNECTED:
            self._connect_scope.cancel()

    def restart(self, provider: Provider, config: UpstreamConfig) -> None:
        """Switch to new provider settings: close the session cleanly, reconnect at once.

        Demand is kept, so everything wanted is subscribed again on the new session.
        """
        self.provider = provider
        self.config = config
        self._backoff = Backoff(config.backoff_initial, config.backoff_max, self._rng)
        self._restart = True
        self._wake.set()
        if self.state != UpstreamState.CONNECTED:
            self._connect_scope.cancel()

    def message_age(self) -> float | None:
        if self.last_message_at is None:
            return None
        return trio.current_time() - self.last_message_at

    def is_fresh(self) -> bool:
        """Connected, and not silent past the stale limit while something is subscribed."""
        if self.state != UpstreamState.CONNECTED:
            return False
        if not self.provider.detects_stale or not self.subscribed:
            return True
        since = max(self.last_message_at or 0.0, self._active_since)
        return trio.current_time() - since <= self.config.stale_after

    # ------------------------------------------------------------------ lifetime
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect forever (or until ``max_retries``), until :meth:`stop`."""
        task_status.started()
        failures = 0
        async with self._send:
            while not self._stop.is_set():
                self.attempts += 1
                error: BaseException | None = None
                auth_error: BaseException | None = None
                try:
                    with self._connect_scope:
                        await self._attempt()
                except* AuthFailed as group:
                    auth_error = _leaf(group)
                except* RETRYABLE as group:
                    error = _leaf(group)
                stable = (
                    self.connected_at is not None
                    and trio.current_time() - self.connected_at >= self.config.backoff_reset_after
                )
                self._disconnected()
                if self._stop.is_set():
                    break
                if self._restart:
                    # New settings: reconnect now, with no backoff and no failure counted.
                    self._restart = False
                    self._wake = trio.Event()
                    self._connect_scope = trio.CancelScope()
                    log.info("[RELOAD] reconnecting with the new upstream settings")
                    continue
                if stable:
                    self._backoff.reset()
                    failures = 0
                failures += 1
                if auth_error is not None:
                    self.state = UpstreamState.AUTH_FAILED
                    self.last_error = str(auth_error)
                else:
                    self.state = UpstreamState.BACKOFF
                    self.last_error = _describe(error) if error is not None else "connection ended"
                if self.config.max_retries and failures >= self.config.max_retries:
                    self.state = UpstreamState.FAILED
                    log.error("[GIVE UP] %d consecutive attempts failed (last: %s); stopping", failures, self.last_error)
                    raise UpstreamGaveUp(self.last_error)
                if auth_error is not None:
                    # Slow and slightly jittered, so a fleet with one bad key does not sync up.
                    delay = self.config.auth_retry_delay * self._rng.uniform(0.9, 1.1)
                    log.error(
                        "[AUTH] %s; state auth_failed, next attempt in %.0fs (check the API key)",
                        auth_error,
                        delay,
                    )
                else:
                    delay = self._backoff.next_delay()
                    log.warning(
                        "[RECONNECT] upstream lost: %s; retrying in %.2fs (attempt %d)",
                        self.last_error,
                        delay,
                        self.attempts + 1,
                    )
                self.next_attempt_at = trio.current_time() + delay
                with trio.move_on_after(delay):
                    await self._wake.wait()  # stop() ends the wait; so does restart()
                self.next_attempt_at = None
                if not self._stop.is_set():
                    self.reconnects += 1
                    self._connect_scope = trio.CancelScope()
                    self._restart = False
                    self._wake = trio.Event()
        self.state = UpstreamState.STOPPED
        log.info("[STOP] upstream closed")

    def _disconnected(self) -> None:
        self.connected_at = None
        self.connected_since = None
        self.subscribed = set()

    async def _attempt(self) -> None:
        self.state = UpstreamState.CONNECTING
        log.info("[CONNECT] connecting to %s", self.provider.describe())
        async with self.provider.session(self._malformed) as session:
            now = trio.current_time()
            self.connected_at = now
            self.connected_since = time.time()
            self.last_message_at = now
            self._active_since = now
            self.subscribed = set()
            self.state = UpstreamState.CONNECTED
            self.last_error = ""
            log.info("[CONNECT] connected to %s", self.provider.describe())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, session)
                nursery.start_soon(self._reconcile, session)
                if self.provider.detects_stale:
                    nursery.start_soon(self._watch_stale)
                await self._wake.wait()
                nursery.cancel_scope.cancel()
            # Leaving the session block closes the socket cleanly (close frame, not a reset).

    async def _read(self, session: Session) -> None:
        send = self._send
        while True:
            batch = await session.receive()
            self.last_message_at = trio.current_time()
            if batch:
                # May wait when the hub is behind: backpressure towards the provider is fine.
                await send.send(batch)

    def _malformed(self, exc: MalformedFrame) -> None:
        self.stats.malformed += 1
        n = self.stats.malformed
        # Log the first few, then every 1000th: a broken feed must not flood the journal.
        if n <= 10 or n % 1000 == 0:
            frame = exc.frame if isinstance(exc.frame, str) else repr(exc.frame)
            log.warning("[MALFORMED] #%d skipped (%s): %.200s", n, exc.reason, frame)

    async def _reconcile(self, session: Session) -> None:
        demand = self.demand
        while True:
            changed = demand.changed_event()
            demand.expire()
            wanted = demand.wanted
            add = sorted(wanted - self.subscribed)
            remove = sorted(self.subscribed - wanted)
            if add:
                await session.subscribe(add)
                if not self.subscribed:
                    self._active_since = trio.current_time()
                self.subscribed.update(add)
                log.info("[SUBSCRIBE] %d symbol(s): %s", len(add), _short(add))
            if remove:
                await session.unsubscribe(remove)
                self.subscribed.difference_update(remove)
                log.info("[UNSUBSCRIBE] %d symbol(s): %s", len(remove), _short(remove))
            with trio.move_on_at(demand.next_expiry()):
                await changed.wait()

    async def _watch_stale(self) -> None:
        limit = self.config.stale_after
        while True:
            since = max(self.last_message_at or 0.0, self._active_since)
            deadline = since + limit
            if trio.current_time() >= deadline:
                if self.subscribed:
                    log.warning("[STALE] no message for %.0fs with %d symbol(s) subscribed", limit, len(self.subscribed))
                    raise StaleFeed(f"feed silent for {limit:g}s")
                deadline = trio.current_time() + limit
            await trio.sleep_until(deadline)


def _short(symbols: Sequence[str], limit: int = 10) -> str:
    shown = ",".join(symbols[:limit])
    return shown + (f",… (+{len(symbols) - limit})" if len(symbols) > limit else "")
