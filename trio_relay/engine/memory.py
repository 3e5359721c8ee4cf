"""The single-relay engine (``engine.backend = "memory"``): this process holds the upstream.

The :class:`Upstream` reads the provider into a bounded channel that the hub drains; the hub
numbers every update in its own epoch (one per run). No shared cache, no fleet.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import trio

from ..config import Config
from ..hub import Hub, Stats
from ..model import PriceState
from ..providers.base import Provider
from ..upstream import Item, Upstream, UpstreamView

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .schemas import FleetHealth, FleetStatus

__all__ = ["MemoryEngine"]


class MemoryEngine:
    """One relay, one upstream connection: the :class:`Upstream` feeding the hub."""

    def __init__(self, config: Config, hub: Hub, providers: Sequence[Provider], stats: Stats) -> None:
        self.hub = hub
        # Upstream → hub, in frames. When full, the upstream reader waits (backpressure towards
        # the provider, whose own buffer absorbs it); the hub side never waits on clients.
        send, self._receive = trio.open_memory_channel[Item](config.upstream.queue_size)
        self.upstream = Upstream(list(providers), hub.demand, send, config.upstream, stats, secrets=config.secrets())
        self.upstream.on_event = hub.upstream_event
        self.upstream.refusals = hub

    @property
    def view(self) -> UpstreamView:
        return self.upstream

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The hub drains the channel the upstream fills; both end when the upstream is stopped."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.hub.consume, self._receive)
            await nursery.start(self.upstream.run)
            task_status.started()

    async def cached_states(self, symbols: Sequence[str] | None = None) -> dict[str, PriceState] | None:
        return None  # the hub's own cache is the only one

    def fleet_health(self) -> FleetHealth | None:
        return None

    def fleet_status(self) -> FleetStatus | None:
        return None

    def metrics(self) -> Iterable[Metric]:
        return ()
