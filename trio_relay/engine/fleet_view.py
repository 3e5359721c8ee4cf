"""The upstream as one relay of a fleet sees it (:class:`FleetUpstream`), for /health, /status, metrics.

On the holder it is the running :class:`~trio_relay.upstream.Upstream`; on a follower it is what
the holder last published (its heartbeat), with this relay's own Redis state on top. It reads the
engine's fields and never changes them (``stop``/``restart`` are passed to the engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from ..config import UpstreamConfig
from ..providers.base import Provider
from ..upstream import NamedProvider, ProviderHealth, Upstream, UpstreamState
from .schemas import FleetHealth, FleetPublished, FleetReceived, FleetRole, FleetStatus, RedisState, RedisStatus

if TYPE_CHECKING:
    from .redis import RedisEngine

__all__ = ["FleetUpstream", "NO_HOLDER", "REDIS_DOWN"]

# Upstream states a follower reports when it cannot see a working holder.
REDIS_DOWN = "redis_down"
NO_HOLDER = "no_holder"


class _RemoteProvider:
    """Names the holder's provider on a relay that does not hold the upstream."""

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self._description = description

    def describe(self) -> str:
        return self._description


class FleetUpstream:
    """The upstream as this relay sees it, for /health, /status and metrics.

    On the holder it is the running :class:`Upstream`; on any other relay it is what the holder
    last published, with Redis's own state on top (``redis_down`` when this relay lost Redis,
    ``no_holder`` while the fleet elects one).
    """

    def __init__(self, engine: RedisEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> RedisEngine:
        return self._engine

    @property
    def _local(self) -> Upstream | None:
        return self._engine.upstream

    @property
    def state(self) -> str:
        engine = self._engine
        if engine.redis_state != RedisState.UP:
            return REDIS_DOWN if engine.redis_state == RedisState.DOWN else UpstreamState.CONNECTING
        if self._local is not None:
            return self._local.state
        status = engine.holder_status
        return str(status.get("state", NO_HOLDER)) if status else NO_HOLDER

    @property
    def provider(self) -> NamedProvider:
        if self._local is not None:
            return self._local.provider
        status = self._engine.holder_status or {}
        name = str(status.get("provider") or (self._engine.providers[0].name if self._engine.providers else "?"))
        node = status.get("node")
        source = f"{status.get('source', name)} (held by fleet node {node})" if node else f"{name} (no fleet holder)"
        return _RemoteProvider(name, source)

    @property
    def chain(self) -> list[ProviderHealth]:
        return self._local.chain if self._local is not None else []

    @property
    def active(self) -> int:
        return self._local.active if self._local is not None else 0

    @property
    def failover(self) -> bool:
        return self._local.failover if self._local is not None else False

    @property
    def switches(self) -> int:
        if self._local is not None:
            return self._local.switches
        return int((self._engine.holder_status or {}).get("switches", 0))

    @property
    def switch_reason(self) -> str:
        return self._local.switch_reason if self._local is not None else ""

    @property
    def connected_since(self) -> float | None:
        if self._local is not None:
            return self._local.connected_since
        value = (self._engine.holder_status or {}).get("connected_since")
        return float(value) if value is not None else None

    @property
    def reconnects(self) -> int:
        if self._local is not None:
            return self._local.reconnects
        return int((self._engine.holder_status or {}).get("reconnects", 0))

    @property
    def attempts(self) -> int:
        if self._local is not None:
            return self._local.attempts
        return int((self._engine.holder_status or {}).get("attempts", 0))

    @property
    def last_error(self) -> str:
        engine = self._engine
        if engine.redis_state == RedisState.DOWN:
            return f"Redis unreachable: {engine.redis_error}"
        if self._local is not None:
            return self._local.last_error
        if engine.holder_status is None:
            return "no relay of the fleet holds the upstream" if engine.redis_state == RedisState.UP else ""
        return str(engine.holder_status.get("last_error", ""))

    @property
    def subscribed(self) -> set[str]:
        if self._local is not None:
            return self._local.subscribed
        return set((self._engine.holder_status or {}).get("subscribed", ()))

    @property
    def refused(self) -> dict[str, str]:
        """The holder's refused symbols, when this relay is the holder (others do not see them yet)."""
        return self._local.refused if self._local is not None else {}

    def message_age(self) -> float | None:
        """Since this relay last received a fleet message (the holder's own included)."""
        at = self._engine.last_batch_at
        return None if at is None else trio.current_time() - at

    def is_fresh(self) -> bool:
        engine = self._engine
        if engine.redis_state != RedisState.UP:
            return False
        if self._local is not None:
            return self._local.is_fresh()
        status = engine.holder_status
        return bool(status and status.get("state") == UpstreamState.CONNECTED and status.get("fresh", True))

    def stop(self) -> None:
        self._engine.stop()

    def restart(
        self, providers: Provider | Sequence[Provider], config: UpstreamConfig, secrets: Sequence[str] = ()
    ) -> None:
        chain = [providers] if not isinstance(providers, Sequence) else list(providers)
        self._engine.restart(chain, config, secrets)

    def fleet_status(self) -> FleetStatus:
        """The ``fleet`` part of /status."""
        engine = self._engine
        status = engine.holder_status or {}
        holding = engine.role == FleetRole.HOLDER
        return FleetStatus(
            backend="redis",
            node=engine.node,
            prefix=engine.config.prefix,
            role=engine.role,
            redis=self.redis_status(),
            holder=engine.node if holding else status.get("node"),
            token=engine.token if holding else status.get("token"),
            terms_held=engine.terms,
            epoch=engine.epoch,
            fleet_symbols=len(engine.fleet_symbols) if holding else None,
            received=FleetReceived(
                batches=engine.batches_in,
                duplicates_dropped=engine.duplicates,
                stale_token_dropped=engine.stale_batches,
                malformed=engine.malformed,
            ),
            published=FleetPublished(batches=engine.batches_out, updates=engine.updates_out),
            stream=engine.keys.stream if engine.config.stream_maxlen else None,
        )

    def redis_status(self) -> RedisStatus:
        engine = self._engine
        return RedisStatus(
            state=engine.redis_state,
            error=engine.redis_error or None,
            since=engine.redis_since,
            outages=engine.redis_outages,
        )

    def fleet_health(self) -> FleetHealth:
        """The ``fleet`` part of /health."""
        engine = self._engine
        holder = engine.node if engine.role == FleetRole.HOLDER else (engine.holder_status or {}).get("node")
        return FleetHealth(node=engine.node, role=engine.role, holder=holder, redis=self.redis_status())
