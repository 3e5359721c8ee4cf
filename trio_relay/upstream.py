"""The upstream task: owns the ONE provider connection for the life of the daemon.

One attempt = open a provider session (connect + log in), then run three tasks until the
connection fails: the reader (frames → updates → hub channel), the reconciler (tells the
provider what :class:`~trio_relay.hub.Demand` wants, re-subscribing everything after each
reconnect), and the stale-feed watchdog. Between attempts it waits under a cancel scope: capped
exponential backoff with full jitter, reset once a connection has stayed up for
``backoff_reset_after``; a rejected key waits ``auth_retry_delay`` instead. By default it never
gives up.

Failover: given several providers (priority order), the upstream uses one at a time. When the
active one has been down, or silent while symbols are subscribed, for ``failover_after`` seconds
it switches to the next one with the same demand (clients keep their connections; a
:class:`~trio_relay.model.ProviderSwitched` item on the hub channel names the provider of the
batches that follow). While a less preferred one is active, a prober keeps trying the preferred
ones in the background: a probe session subscribes a small sample of the wanted symbols and must
*deliver* (data, not just a login or heartbeats) for ``failback_after`` seconds before the relay
switches back. A provider that fails again within ``failback_flap_window`` of a failback is not
probed for a hold-off that doubles at each such failure (``failback_after`` up to
``failback_holdoff_max``).
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from .config import UpstreamConfig
from .hub import Demand, Stats
from .masking import mask_secrets
from .model import ProviderSwitched, Update, UpstreamItem
from .providers.base import (
    AuthFailed,
    ConnectionLimit,
    MalformedFrame,
    Provider,
    ProviderError,
    RateLimited,
    Session,
    ignore_malformed,
    ignore_refused,
)
from .providers.dedup import TradeIds

__all__ = [
    "UpstreamView",
    "NamedProvider",
    "Upstream",
    "Backoff",
    "StaleFeed",
    "UpstreamGaveUp",
    "UpstreamState",
    "ProviderState",
    "ProviderHealth",
    "Item",
    "RefusalListener",
]

log = logging.getLogger("trio_relay.upstream")


class UpstreamState(enum.StrEnum):
    """The upstream's state, as /health, /status, metrics and systemd's STATUS= show it."""

    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    # Logged in, but the feed went silent for wanted symbols (this session or the one before
    # it) and no data has flowed since: a stalled provider that keeps accepting logins stays
    # here across reconnects, and is never reported "connected" until data flows again.
    STALE = "stale"
    BACKOFF = "backoff"
    AUTH_FAILED = "auth_failed"
    STOPPED = "stopped"
    FAILED = "failed"


class ProviderState(enum.StrEnum):
    """A provider of the failover chain, as /status shows it (the active one shows the upstream's state)."""

    STANDBY = "standby"  # not in use, not being probed
    PROBING = "probing"  # a failback probe is proving it delivers
    HEALTHY = "healthy"  # its probe holds: failback when it has held failback_after
    HELD_OFF = "held_off"  # it failed soon after a failback: not probed for a while (flap guard)
    DOWN = "down"  # its last probe failed
    CONNECTED = UpstreamState.CONNECTED.value
    STALE = UpstreamState.STALE.value
    BACKOFF = UpstreamState.BACKOFF.value
    AUTH_FAILED = UpstreamState.AUTH_FAILED.value
    STOPPED = UpstreamState.STOPPED.value


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


# What the upstream hands the hub (model.UpstreamItem): a batch, or a ProviderSwitched marker.
Item = UpstreamItem


class ProviderHealth:
    """What the failover logic knows about one provider of the chain (shown in /status)."""

    __slots__ = (
        "provider",
        "state",
        "last_error",
        "healthy_since",
        "auth_failed_at",
        "probes",
        "failed_back_at",
        "flaps",
        "held_until",
    )

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.state = ProviderState.STANDBY
        self.last_error = ""
        self.healthy_since: float | None = None  # trio clock: its probe's first update (None: failed)
        self.auth_failed_at: float | None = None  # trio clock
        self.probes = 0
        # The flap guard (Upstream._guard_flap): when the relay last failed back to it (trio
        # clock; None once it has been left again), how many times in a row it failed soon
        # after a failback, and until when it is not probed.
        self.failed_back_at: float | None = None
        self.flaps = 0
        self.held_until: float | None = None

    def probe_allowed_at(self, auth_retry_delay: float) -> float:
        """The trio time from which it may be probed (-inf: now): after a refused key, after a hold-off."""
        allowed = -math.inf
        if self.auth_failed_at is not None:
            allowed = self.auth_failed_at + auth_retry_delay
        if self.held_until is not None:
            allowed = max(allowed, self.held_until)
        return allowed


class NamedProvider(Protocol):
    """What status pages need of a provider."""

    name: str

    def describe(self) -> str: ...


class RefusalListener(Protocol):
    """Who tells clients about symbols the provider refuses (the hub)."""

    def symbols_refused(self, symbols: list[str], provider: str, reason: str) -> None: ...

    def refusals_cleared(self, symbols: list[str]) -> None: ...


class UpstreamView(Protocol):
    """The upstream as the API sees it: the :class:`Upstream` itself, or a fleet's view of it."""

    @property
    def state(self) -> str: ...
    @property
    def provider(self) -> NamedProvider: ...
    @property
    def chain(self) -> list[ProviderHealth]: ...
    @property
    def active(self) -> int: ...
    @property
    def failover(self) -> bool: ...
    @property
    def switches(self) -> int: ...
    @property
    def switch_reason(self) -> str: ...
    @property
    def connected_since(self) -> float | None: ...
    @property
    def reconnects(self) -> int: ...
    @property
    def attempts(self) -> int: ...
    @property
    def last_error(self) -> str: ...
    @property
    def subscribed(self) -> set[str]: ...
    @property
    def refused(self) -> dict[str, str]: ...

    def message_age(self) -> float | None: ...

    def is_fresh(self) -> bool: ...

    def stop(self) -> None: ...

    def restart(
        self, providers: Provider | Sequence[Provider], config: UpstreamConfig, secrets: Sequence[str] = ()
    ) -> None: ...


class Upstream:
    """Runs the provider connection; its attributes are the upstream's health and status."""

    def __init__(
        self,
        providers: Provider | Sequence[Provider],
        demand: Demand,
        send: trio.MemorySendChannel[Item],
        config: UpstreamConfig,
        stats: Stats,
        *,
        rng: random.Random | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        """An idle upstream over the failover chain ``providers`` (one provider: no failover).

        Long only by its state, one commented line per field (each is read by /status or the loop).
        """
        chain = [providers] if not isinstance(providers, Sequence) else list(providers)
        # The configured keys and passwords (Config.secrets()): masked out of every provider's
        # error text before it is stored (last_error: /health, /status), logged or sent to clients.
        self.secrets = tuple(secrets)
        if not chain:
            raise ValueError("no provider")
        self.chain = [ProviderHealth(p) for p in chain]
        self.active = 0
        self.switches = 0
        self.switch_reason = ""  # why the active provider is the active one (after a switch)
        self._unhealthy_since: float | None = None  # trio clock; None while connected and fresh
        self._switch_to: int | None = None  # set by the prober: fail back to this index
        self._probe_turn = 0  # rotates the probe's sample of wanted symbols
        self._subscribing = trio.Event()  # set when a session subscribes its first symbols
        self._chain_changed = trio.Event()
        self._state_changed = trio.Event()
        self._state = UpstreamState.STARTING
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
        self.connected_since: float | None = None  # wall clock, for /status
        self.connected_at: float | None = None  # trio clock
        self.last_message_at: float | None = None  # trio clock
        self.next_attempt_at: float | None = None  # trio clock
        self.attempts = 0
        self.reconnects = 0
        self.last_error = ""
        self.subscribed: set[str] = set()
        # Wanted symbols the active provider refused (plan limit, unknown, entitlement, no spelling),
        # with the reason: never asked for again until their demand changes (they stop being wanted)
        # or the provider changes. A subset of the wanted symbols, so bounded by demand.
        self.refused: dict[str, str] = {}
        self.refusals: RefusalListener | None = None
        # Recent trade ids per subscribed symbol: a trade seen again is dropped (and counted).
        self.trade_ids = TradeIds()
        self._marker_pending = False
        # Connection-limit answers retried quickly since the last login (see _retry_delay).
        self._limit_retries = 0
        # Told of each change the clients should see: ("up" | "down" | "stale" | "failover",
        # provider name, reason). Wired to the hub, which sends {"type":"status"} messages.
        self.on_event: Callable[[str, str, str], None] | None = None
        self._signal = "starting"
        self._active_since = 0.0  # staleness is measured from max(last message, last subscribe)
        # Set when a session ends because the feed went silent; cleared only by data (or by
        # nothing being wanted any more). A reconnect alone does not clear it.
        self._stalled = False

    @property
    def state(self) -> UpstreamState:
        return self._state

    @state.setter
    def state(self, value: UpstreamState) -> None:
        self._state = value
        self._state_changed.set()
        self._state_changed = trio.Event()

    @property
    def in_session(self) -> bool:
        """Logged in (fresh or stale): a session that can be closed cleanly."""
        return self._state in (UpstreamState.CONNECTED, UpstreamState.STALE)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds after some change of state (or of active provider)."""
        while not predicate():
            await self._state_changed.wait()

    @property
    def provider(self) -> Provider:
        """The active provider."""
        return self.chain[self.active].provider

    @property
    def failover(self) -> bool:
        return len(self.chain) > 1

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Close the connection cleanly and make :meth:`run` return.

        A connect or login still in progress is abandoned at once (nothing to close cleanly).
        """
        self._stop.set()
        self._wake.set()
        if not self.in_session:
            self._connect_scope.cancel()

    def restart(
        self, providers: Provider | Sequence[Provider], config: UpstreamConfig, secrets: Sequence[str] = ()
    ) -> None:
        """Switch to new provider settings: close the session cleanly, reconnect at once.

        Demand is kept, so everything wanted is subscribed again on the new session. The first
        provider of a new chain becomes the active one. ``secrets`` (the new configuration's) are
        masked from now on, as well as the old ones: an error of the session being closed may
        still quote them.
        """
        self.secrets = tuple(dict.fromkeys([*self.secrets, *secrets]))
        chain = [providers] if not isinstance(providers, Sequence) else list(providers)
        old = self.provider.name
        self.chain = [ProviderHealth(p) for p in chain]
        self.active = 0
        self._switch_to = None
        self._unhealthy_since = None
        self._limit_retries = 0
        self._clear_refusals()
        self._chain_changed.set()
        self._chain_changed = trio.Event()
        if self.provider.name != old:
            self._announce()
        self.config = config
        self._backoff = Backoff(config.backoff_initial, config.backoff_max, self._rng)
        self._restart = True
        self._wake.set()
        if not self.in_session:
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
        gave_up: UpstreamGaveUp | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_preferred)
            task_status.started()
            try:
                await self._run()
            except UpstreamGaveUp as exc:
                gave_up = exc  # raised bare, not wrapped in the nursery's group
            nursery.cancel_scope.cancel()
        if gave_up is not None:
            raise gave_up

    async def _run(self) -> None:
        """The session loop: attempt, note how it ended, then fail back, reload, give up, fail over
        or wait and retry. Kept whole on purpose: each branch is a step of one decision, in order."""
        failures = 0
        self._unhealthy_since = trio.current_time()
        async with self._send:
            while not self._stop.is_set():
                self.attempts += 1
                error: BaseException | None = None
                auth_error: BaseException | None = None
                try:
                    with self._connect_scope:
                        self._arm_failover()
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
                if not self._restart and self._switch_to is None:
                    self._report_loss(auth_error or error)
                if self._switch_to is not None:
                    # The prober found a preferred provider healthy: fail back to it now.
                    self._fail_back(self._switch_to)
                    failures = 0
                    continue
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
                if isinstance(error, ConnectionLimit) and self._limit_retries >= self.config.limit_retries:
                    # Not our own lingering connection after all: another process holds the key.
                    auth_error, error = error, None
                self._note_failure(error, auth_error)
                if self.config.max_retries and failures >= self.config.max_retries:
                    self.state = UpstreamState.FAILED
                    log.error(
                        "[GIVE UP] %d consecutive attempts failed (last: %s); stopping", failures, self.last_error
                    )
                    raise UpstreamGaveUp(self.last_error)
                if self.failover and self._failover_due():
                    self._fail_over()
                    continue
                await self._wait_before_next(self._next_delay(error, auth_error))
                if self._stop.is_set():
                    break
                if self._switch_to is not None:
                    self._fail_back(self._switch_to)
                    failures = 0
                    continue
                if self.failover and self._failover_due():
                    self._fail_over()
                    continue
                self.reconnects += 1
                self._connect_scope = trio.CancelScope()
                self._restart = False
                self._wake = trio.Event()
        self.state = UpstreamState.STOPPED
        for health in self.chain:
            health.state = ProviderState.STOPPED
        log.info("[STOP] upstream closed")

    def _report_loss(self, lost: BaseException | None) -> None:
        """Tell the hub's clients the session ended (``stale`` for a stall, else ``down``)."""
        if isinstance(lost, StaleFeed):
            self._stalled = True
        kind = "stale" if isinstance(lost, StaleFeed) else "down"
        self._emit(kind, self._describe(lost) if lost is not None else "connection ended")

    def _note_failure(self, error: BaseException | None, auth_error: BaseException | None) -> None:
        """The upstream's state and error, and its provider's health, after a failed or ended session."""
        health = self.chain[self.active]
        if auth_error is not None:
            self.state = UpstreamState.AUTH_FAILED
            self.last_error = self._describe(auth_error)
            health.auth_failed_at = trio.current_time()
        elif error is None and self._failover_due():
            self.state = UpstreamState.BACKOFF
            self.last_error = f"no healthy connection for {self.config.failover_after:g}s"
        else:
            self.state = UpstreamState.BACKOFF
            self.last_error = self._describe(error) if error is not None else "connection ended"
        health.state, health.last_error = ProviderState(self.state), self.last_error

    def _next_delay(self, error: BaseException | None, auth_error: BaseException | None) -> float:
        """The wait before the next attempt (logged): the auth cool-down, or by the error's class."""
        if auth_error is not None:
            # Slow and slightly jittered, so a fleet with one bad key does not sync up.
            delay = self.config.auth_retry_delay * self._rng.uniform(0.9, 1.1)
            log.error("[AUTH] %s; state auth_failed, next attempt in %.0fs (check the API key)", self.last_error, delay)
            return delay
        delay = self._retry_delay(error)
        log.warning(
            "[RECONNECT] upstream lost: %s; retrying in %.2fs (attempt %d)", self.last_error, delay, self.attempts + 1
        )
        return delay

    async def _wait_before_next(self, delay: float) -> None:
        """Wait ``delay``, or less: until stop() or restart(), or until a failover is due."""
        self.next_attempt_at = trio.current_time() + delay
        wait_until = self.next_attempt_at
        if self.failover and self._unhealthy_since is not None:
            wait_until = min(wait_until, self._unhealthy_since + self.config.failover_after)
        with trio.move_on_at(wait_until):
            await self._wake.wait()  # stop() ends the wait; so does restart()
        self.next_attempt_at = None

    def _retry_delay(self, error: BaseException | None) -> float:
        """The wait before the next attempt after ``error``, by its class (auth is the caller's).

        A connection limit is retried quickly (``limit_retry_delay`` x n, ``limit_retries``
        times: the caller turns the next one into an auth cool-down); a rate limit waits at
        least its ``Retry-After`` (else ``rate_limit_delay``); anything else takes the backoff.
        """
        if isinstance(error, ConnectionLimit):
            self._limit_retries += 1
            return self.config.limit_retry_delay * self._limit_retries
        delay = self._backoff.next_delay()
        if isinstance(error, RateLimited):
            wait = error.retry_after if error.retry_after is not None else self.config.rate_limit_delay
            delay = max(delay, wait)
        return delay

    # ------------------------------------------------------------------ failover
    def _failover_due(self) -> bool:
        since = self._unhealthy_since
        return since is not None and trio.current_time() - since >= self.config.failover_after

    def _arm_failover(self) -> None:
        """With a chain, a connect or login that hangs is cut when failover is due."""
        if self.failover and self._unhealthy_since is not None:
            self._connect_scope.deadline = self._unhealthy_since + self.config.failover_after

    def _fail_over(self) -> None:
        """Switch to the next provider of the chain (wrapping round to the most preferred)."""
        old = self.chain[self.active]
        target = (self.active + 1) % len(self.chain)
        reason = f"{old.provider.name} unhealthy for {self.config.failover_after:g}s ({self.last_error or self.state})"
        held = self._guard_flap(old)
        self._switch(target, reason)
        if held:
            old.state = ProviderState.HELD_OFF

    def _fail_back(self, target: int) -> None:
        """Switch back to the preferred provider ``target`` (its probe delivered for ``failback_after``)."""
        self._switch(target, self.switch_reason)
        self.chain[target].failed_back_at = trio.current_time()

    def _guard_flap(self, health: ProviderHealth) -> bool:
        """The flap guard, as ``health`` is left: True when it is now held off from probes.

        A provider the relay failed back to whose failure began within ``failback_flap_window``
        of that failback is not probed again for ``failback_after · 2^(n-1)`` seconds (at most
        ``failback_holdoff_max``), n counting such failures in a row; one that held for the
        window is forgiven (n starts again). Only failbacks count: the provider the relay started
        on, or reached by failing over, has proved nothing yet.
        """
        back_at, health.failed_back_at = health.failed_back_at, None
        if back_at is None:
            return False
        config = self.config
        now = trio.current_time()
        failed_at = self._unhealthy_since if self._unhealthy_since is not None else now
        if failed_at - back_at >= config.failback_flap_window:
            health.flaps = 0
            return False
        health.flaps += 1
        hold = min(config.failback_holdoff_max, config.failback_after * 2.0 ** min(health.flaps - 1, 64))
        health.held_until = now + hold
        log.warning(
            "[FAILOVER] %s failed %.0fs after a failback (%d in a row); not probed for %gs",
            health.provider.name,
            failed_at - back_at,
            health.flaps,
            hold,
        )
        return True

    def _switch(self, target: int, reason: str) -> None:
        old = self.chain[self.active]
        if old.state is not ProviderState.AUTH_FAILED:
            old.state = ProviderState.STANDBY
        self.active = target
        self._switch_to = None
        self._limit_retries = 0
        self._clear_refusals()
        self.switches += 1
        self.switch_reason = reason
        self._backoff.reset()
        self._unhealthy_since = trio.current_time()
        self._connect_scope = trio.CancelScope()
        self._restart = False
        self._wake = trio.Event()
        self._chain_changed.set()
        self._chain_changed = trio.Event()
        log.warning("[FAILOVER] %s -> %s: %s", old.provider.name, self.provider.name, reason)
        self._announce()
        self._signal = "failover"
        if self.on_event is not None:
            self.on_event("failover", self.provider.name, f"{old.provider.name} -> {self.provider.name}: {reason}")

    def _describe(self, exc: BaseException) -> str:
        """A provider error as text for people: its message, every secret masked (mask_secrets)."""
        text = str(exc) if isinstance(exc, AuthFailed) else _describe(exc)
        return mask_secrets(text, self.secrets)

    def _emit(self, signal: str, reason: str) -> None:
        """Report a change of what clients should believe (only changes: not every retry)."""
        if signal == self._signal or (signal == "down" and self._signal == "stale"):
            return
        self._signal = signal
        if self.on_event is not None:
            self.on_event(signal, self.provider.name, reason)

    def _announce(self) -> None:
        """Tell the hub which provider the next batches come from (in order with the data)."""
        try:
            self._send.send_nowait(ProviderSwitched(self.provider.name))
        except trio.WouldBlock:
            # The channel is full of the old provider's data; the first batch waits anyway, so
            # the marker is sent by the reader before its first batch instead.
            self._marker_pending = True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _probe_preferred(self) -> None:
        """While a less preferred provider is active, probe the preferred ones in order.

        A probe (:meth:`_probe`) must prove that its provider delivers; the first that does for
        ``failback_after`` triggers the switch back. Failed probes are retried under their own
        backoff, capped at ``failback_probe_interval`` so that a provider coming back is probed
        within seconds; a provider that rejected the key waits ``auth_retry_delay`` first, and
        one held off by the flap guard waits out its hold-off.
        """
        backoff = self._probe_backoff()
        while True:
            changed = self._chain_changed
            if self.active == 0 or self._switch_to is not None:
                await changed.wait()
                backoff = self._probe_backoff()
                continue
            with trio.CancelScope() as scope:
                # A switch (or a reload) while probing makes this probe moot.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_on, changed, scope)
                    index = await self._probe_round()
                    nursery.cancel_scope.cancel()
            if scope.cancelled_caught:
                continue
            if index is not None:
                health = self.chain[index]
                self._switch_to = index
                self.switch_reason = f"{health.provider.name} healthy again for {self.config.failback_after:g}s"
                self._wake.set()  # ends the active session cleanly (or the backoff wait)
                if not self.in_session:
                    self._connect_scope.cancel()
                await changed.wait()
                backoff = self._probe_backoff()
                continue
            with trio.move_on_at(self._next_probe_at(backoff)):
                await changed.wait()

    def _probe_backoff(self) -> Backoff:
        return Backoff(self.config.backoff_initial, self.config.failback_probe_interval, self._rng)

    def _next_probe_at(self, backoff: Backoff) -> float:
        """After a round in which no provider passed: the backoff's delay, or later if none may be probed yet."""
        now = trio.current_time()
        allowed = min(h.probe_allowed_at(self.config.auth_retry_delay) for h in self.chain[: self.active])
        return max(now + backoff.next_delay(), allowed)

    async def _probe_round(self) -> int | None:
        """Probe each provider preferred to the active one; the first that holds up, or None."""
        for index in range(self.active):
            health = self.chain[index]
            if health.probe_allowed_at(self.config.auth_retry_delay) > trio.current_time():
                continue
            health.held_until = None
            if await self._probe(health):
                return index
        return None

    def _probe_sample(self) -> list[str]:
        """Up to ``failback_probe_symbols`` wanted symbols; each probe takes the next ones (sorted, wrapping).

        Rotating means a sample that happens to be quiet (a halted stock) does not keep a healthy
        provider out for ever: the next probe asks for other symbols.
        """
        wanted = sorted(self.demand.wanted)
        if not wanted:
            return []
        n = min(self.config.failback_probe_symbols, len(wanted))
        start = (self._probe_turn * n) % len(wanted)
        self._probe_turn += 1
        return (wanted[start:] + wanted[:start])[:n]

    async def _probe(self, health: ProviderHealth) -> bool:
        """One probe session: log in, subscribe a sample of the wanted symbols, prove delivery.

        It passes when the provider has delivered for ``failback_after`` (see :meth:`_prove`);
        a login or a heartbeat proves nothing. The session is closed either way: the switch
        back opens a session of its own.
        """
        provider = health.provider
        health.probes += 1
        health.state = ProviderState.PROBING
        sample = self._probe_sample()
        try:
            async with provider.session(ignore_malformed, ignore_refused) as session:
                if sample:
                    await session.subscribe(sample)
                    log.info("[FAILOVER] probing %s with %s", provider.name, _short(sample))
                await self._prove(health, session, bool(sample))
                health.state = ProviderState.HEALTHY
                return True
        except AuthFailed as exc:
            health.auth_failed_at = trio.current_time()
            health.state, health.last_error = ProviderState.AUTH_FAILED, self._describe(exc)
        except StaleFeed as exc:
            health.state, health.last_error = ProviderState.STALE, self._describe(exc)
        except RETRYABLE as exc:
            health.state, health.last_error = ProviderState.DOWN, self._describe(exc)
        health.healthy_since = None
        log.info("[FAILOVER] probe of %s failed: %s", provider.name, health.last_error)
        return False

    async def _prove(self, health: ProviderHealth, session: Session, sampled: bool) -> None:
        """Return once the probe session has delivered for ``failback_after``; raise if it does not.

        With a sample subscribed: the first update must come within ``stale_after`` (providers
        with heartbeats, ``detects_stale``) or ``failback_after`` (the others, which may be
        quiet), then ``failback_after`` counts from that update, and for ``detects_stale``
        providers no stretch of ``stale_after`` may pass without an update (heartbeats do not
        count). With nothing wanted there is nothing to sample and nobody misses a price:
        staying up for ``failback_after`` (for providers that ping, with the pings answered) is
        all a probe can prove, and silence is allowed, since FMP need not send anything to an
        idle session.
        """
        config = self.config
        if not sampled:
            health.healthy_since = trio.current_time()
            with trio.move_on_after(config.failback_after):
                while True:
                    await session.receive()
            return
        detects_stale = health.provider.detects_stale
        first_within = config.stale_after if detects_stale else config.failback_after
        with trio.move_on_after(first_within) as silent:
            while not await session.receive():
                pass
        if silent.cancelled_caught:
            raise StaleFeed(f"probe: no data in {first_within:g}s")
        health.healthy_since = last = trio.current_time()
        gap = config.stale_after if detects_stale else math.inf
        with trio.move_on_after(config.failback_after):
            while True:
                with trio.move_on_at(last + gap) as silent:
                    batch = await session.receive()
                if silent.cancelled_caught:
                    raise StaleFeed(f"probe: no data for {gap:g}s")
                if batch:
                    last = trio.current_time()

    def _disconnected(self) -> None:
        if self._unhealthy_since is None:
            self._unhealthy_since = trio.current_time()
        self.connected_at = None
        self.connected_since = None
        self.subscribed = set()

    async def _attempt(self) -> None:
        self.state = UpstreamState.CONNECTING
        log.info("[CONNECT] connecting to %s", self.provider.describe())
        async with self.provider.session(self._malformed, self._refused) as session:
            now = trio.current_time()
            self.connected_at = now
            self.connected_since = time.time()
            self.last_message_at = now
            self._active_since = now
            self.subscribed = set()
            self._limit_retries = 0
            self._connect_scope.deadline = math.inf
            if not self.provider.detects_stale:
                # Nothing proves a quiet provider alive but the connection itself. One that sends
                # heartbeats is healthy from its first message (see _read).
                self._unhealthy_since = None
            health = self.chain[self.active]
            if self._stalled and self.provider.detects_stale:
                # The last session stalled: logging in again proves nothing. Stay "stale" (and
                # keep clients told so) until data flows; _read ends this.
                self.state = UpstreamState.STALE
                health.state, health.auth_failed_at = ProviderState.STALE, None
                log.info("[CONNECT] connected to %s; stale until data flows again", self.provider.describe())
            else:
                self._stalled = False
                self.state = UpstreamState.CONNECTED
                self.last_error = ""
                health.state, health.last_error, health.auth_failed_at = ProviderState.CONNECTED, "", None
                self._emit("up", "")
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
        if self._marker_pending:
            await send.send(ProviderSwitched(self.provider.name))
            self._marker_pending = False
        seen = self.trade_ids.seen
        while True:
            batch = await session.receive()
            self.last_message_at = trio.current_time()
            for i, update in enumerate(batch):
                if update.trade_id is not None and seen(update.symbol, update.trade_id):
                    before = len(batch)
                    batch = _without_duplicates(batch, i, seen)
                    self.stats.duplicate_trades += before - len(batch)
                    break
            if batch:
                if self._unhealthy_since is not None:
                    self._unhealthy_since = None  # data flows: healthy (see also _watch_stale)
                if self._stalled:  # in a session, stalled means state STALE: data ends it
                    self._flowing("data flows again")
                # May wait when the hub is behind: backpressure towards the provider is fine.
                await send.send(batch)

    def _flowing(self, why: str) -> None:
        """A stale session is healthy again: report it connected, and tell the clients."""
        self._stalled = False
        self.state = UpstreamState.CONNECTED
        self.last_error = ""
        self.chain[self.active].state, self.chain[self.active].last_error = ProviderState.CONNECTED, ""
        self._emit("up", "")
        log.info("[CONNECT] %s: %s", self.provider.name, why)

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
            if self.refused:
                for symbol in [s for s in self.refused if s not in wanted]:
                    del self.refused[symbol]  # demand changed: asked for again if wanted again
            add = sorted(wanted - self.subscribed - self.refused.keys())
            remove = sorted(self.subscribed - wanted)
            if add:
                await session.subscribe(add)
                if not self.subscribed:
                    self._active_since = trio.current_time()
                    self._subscribing.set()
                    self._subscribing = trio.Event()
                # Those refused during the call (no spelling for them, say) are not subscribed.
                self.subscribed.update(s for s in add if s not in self.refused)
                log.info("[SUBSCRIBE] %d symbol(s): %s", len(add), _short(add))
            if remove:
                await session.unsubscribe(remove)
                self.subscribed.difference_update(remove)
                for symbol in remove:
                    self.trade_ids.forget(symbol)
                log.info("[UNSUBSCRIBE] %d symbol(s): %s", len(remove), _short(remove))
            if not wanted and self.state == UpstreamState.STALE:
                self._flowing("nothing is wanted any more, so no data is missing")
            with trio.move_on_at(demand.next_expiry()):
                await changed.wait()

    def _refused(self, symbols: Sequence[str], reason: str) -> None:
        """The session's refusal sink: keep these symbols out of requests and tell their clients."""
        reason = mask_secrets(reason, self.secrets)[:200]
        wanted = self.demand.wanted
        self.subscribed.difference_update(symbols)
        new = [s for s in dict.fromkeys(symbols) if s in wanted and s not in self.refused]
        if not new:
            return
        for symbol in new:
            self.refused[symbol] = reason
        log.warning("[REFUSED] %s refused %d symbol(s): %s (%s)", self.provider.name, len(new), _short(new), reason)
        if self.refusals is not None:
            self.refusals.symbols_refused(new, self.provider.name, reason)

    def _clear_refusals(self) -> None:
        """Another provider (a failover, a reload): it may serve what this one refused."""
        if self.refused:
            cleared = sorted(self.refused)
            self.refused.clear()
            if self.refusals is not None:
                self.refusals.refusals_cleared(cleared)

    async def _watch_stale(self) -> None:
        """End the session when a subscribed feed goes silent; see :meth:`_check_silence`."""
        while True:
            subscribing = self._subscribing
            deadline = self._check_silence(trio.current_time())
            with trio.move_on_at(deadline):
                await subscribing.wait()  # the first subscribe starts the silence clock anew

    def _check_silence(self, now: float) -> float:
        """Raise :class:`StaleFeed` when the session must end; else when to look again.

        Silence is no frame at all (heartbeats count) while symbols are subscribed, measured
        from the last frame or the first subscribe. Silent for ``stale_after``: stale, reconnect.
        With a failover chain, silent for ``failover_after`` (when that is shorter) ends it with
        failover due, so a stall is left ``failover_after`` after its last frame whatever
        ``stale_after`` is; and a session that has carried no data since a failure (heartbeats
        alone do not count) is left ``failover_after`` after that failure (or after its first
        subscribe, when it was idle until then). An idle session
        (nothing subscribed) may be silent: FMP need not send anything then. It counts as
        healthy once it has stayed up for ``stale_after``.
        """
        config = self.config
        since = max(self.last_message_at or 0.0, self._active_since)
        unhealthy = self._unhealthy_since
        if not self.subscribed:
            if unhealthy is not None and self.connected_at is not None:
                proven = self.connected_at + config.stale_after
                if now < proven:
                    return proven
                self._unhealthy_since = None
            return math.inf
        cutoff = math.inf
        if self.failover and unhealthy is not None:
            cutoff = unhealthy + config.failover_after
            if self._active_since >= cutoff:
                # Idle until failover would have been due: nobody missed data, and the symbols
                # wanted now get failover_after of their own to arrive.
                cutoff = self._active_since + config.failover_after
            if now >= cutoff:
                log.warning("[STALE] no data from %s since it failed; failing over", self.provider.name)
                raise StaleFeed(f"no data for {now - unhealthy:g}s")
        silence = min(config.stale_after, config.failover_after) if self.failover else config.stale_after
        if now >= since + silence:
            # Stale since the last frame: that is when failover's clock starts.
            if unhealthy is None:
                self._unhealthy_since = since
            log.warning("[STALE] no message for %gs with %d symbol(s) subscribed", silence, len(self.subscribed))
            raise StaleFeed(f"feed silent for {silence:g}s")
        return min(since + silence, cutoff)


def _without_duplicates(batch: list[Update], first: int, seen: Callable[[str, str], bool]) -> list[Update]:
    """``batch`` without the duplicate at ``first`` and the later ones (the ids before it were checked)."""
    kept = batch[:first]
    for update in batch[first + 1 :]:
        if update.trade_id is None or not seen(update.symbol, update.trade_id):
            kept.append(update)
    return kept


async def cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once ``event`` is set (run it in a nursery inside that scope)."""
    await event.wait()
    scope.cancel()


def _short(symbols: Sequence[str], limit: int = 10) -> str:
    shown = ",".join(symbols[:limit])
    return shown + (f",… (+{len(symbols) - limit})" if len(symbols) > limit else "")
