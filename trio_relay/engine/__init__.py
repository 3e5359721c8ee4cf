"""Engines: where a relay gets its prices from and shares them (``engine.backend``).

An :class:`Engine` is the one seam between a relay and its source of prices, in the shape of
Centrifuge's ``Broker``: a small interface with one implementation per backend, chosen once at
start (:func:`open_engine`). Nothing above it asks which backend runs.

- ``memory`` (:mod:`trio_relay.engine.memory`): this process holds the upstream connection.
- ``redis`` (:mod:`trio_relay.engine.redis`): a fleet of relays on one Redis; one of them
  (elected, fenced) holds the upstream and publishes every update once.

An engine owns: who holds the upstream (its :attr:`Engine.view` is the upstream as this relay
sees it, for /health, /status and metrics), publishing and receiving updates (it feeds the hub,
which numbers nothing itself in a fleet), the shared cache, the fleet's demand, and the status it
reports (:meth:`Engine.fleet_health`, :meth:`Engine.fleet_status`, :meth:`Engine.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import trio

from ..config import Config
from ..hub import Hub, Stats
from ..model import PriceState
from ..providers.base import Provider
from ..upstream import UpstreamView

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .schemas import FleetHealth, FleetStatus

__all__ = ["Engine", "open_engine"]


class Engine(Protocol):
    """Where a relay's prices come from; run with :meth:`run` in the supervisor's nursery."""

    @property
    def view(self) -> UpstreamView:
        """The upstream as this relay sees it (its ``stop()`` ends :meth:`run` cleanly)."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Feed the hub until the view is stopped; started() once the engine is running."""
        ...

    async def cached_states(self, symbols: Sequence[str] | None = None) -> dict[str, PriceState] | None:
        """The shared cache (of ``symbols``, or all); None: no shared cache, use the hub's own."""
        ...

    def fleet_health(self) -> FleetHealth | None:
        """The ``fleet`` part of /health (None: a single relay)."""
        ...

    def fleet_status(self) -> FleetStatus | None:
        """The ``fleet`` part of /status (None: a single relay)."""
        ...

    def metrics(self) -> Iterable[Metric]:
        """The engine's own Prometheus metric families (none for a single relay)."""
        ...


def open_engine(config: Config, hub: Hub, providers: Sequence[Provider], stats: Stats) -> Engine:
    """The engine ``config.engine.backend`` names, feeding ``hub`` (the one place that chooses)."""
    if config.engine.backend == "redis":
        from .redis import RedisEngine

        return RedisEngine(config, hub, providers, stats)
    from .memory import MemoryEngine

    return MemoryEngine(config, hub, providers, stats)
