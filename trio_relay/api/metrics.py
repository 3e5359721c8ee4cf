"""Prometheus metrics, read from the relay's own counters at scrape time.

Nothing is instrumented per update: a collector turns the hub's, the upstream's and the outboxes'
state into metric families when Prometheus asks. Label cardinality is bounded: no per-client or
per-symbol labels; the upstream state is one gauge per possible state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..upstream import UpstreamState

if TYPE_CHECKING:
    from .app import RelayContext

__all__ = ["RelayCollector", "render"]

QUEUE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STATES = [state.value for state in UpstreamState]


class RelayCollector(Collector):
    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        """Every family, read from the live objects at scrape time (nothing is kept in between)."""
        yield from self._build()
        yield from self._upstream()
        yield from self._edge()
        yield from self._history()
        yield from self._counters()
        yield from self.ctx.engine.metrics()
        yield from self._clients()

    def _build(self) -> Iterator[Metric]:
        from .. import __version__

        info = GaugeMetricFamily("trio_relay_build_info", "Build information", labels=["version", "provider"])
        info.add_metric([__version__, self.ctx.provider_name], 1)
        yield info
        yield GaugeMetricFamily("trio_relay_start_time_seconds", "Start time (Unix epoch)", value=self.ctx.started_at)

    def _upstream(self) -> Iterator[Metric]:
        upstream = self.ctx.upstream
        yield GaugeMetricFamily(
            "trio_relay_upstream_up", "1 when the upstream is connected and fresh", value=int(upstream.is_fresh())
        )
        state = GaugeMetricFamily(
            "trio_relay_upstream_state", "Upstream state (1 for the current one)", labels=["state"]
        )
        for name in STATES:
            state.add_metric([name], int(upstream.state == name))
        yield state
        age = upstream.message_age()
        yield GaugeMetricFamily(
            "trio_relay_upstream_last_message_age_seconds",
            "Seconds since the last upstream frame",
            value=age if age is not None else float("nan"),
        )
        yield GaugeMetricFamily(
            "trio_relay_upstream_symbols", "Symbols subscribed upstream", value=len(upstream.subscribed)
        )
        active = GaugeMetricFamily(
            "trio_relay_upstream_provider_active",
            "1 for the provider in use (failover chain order)",
            labels=["provider"],
        )
        for i, health in enumerate(upstream.chain):
            active.add_metric([health.provider.name], int(i == upstream.active))
        yield active

    def _edge(self) -> Iterator[Metric]:
        edge = self.ctx.edge
        if edge is None:
            return
        yield GaugeMetricFamily("trio_relay_edge_connections", "Open connections on the public port", value=edge.open)
        yield GaugeMetricFamily(
            "trio_relay_edge_connections_idle",
            "Of which waiting for a request head (evictable)",
            value=edge.idle_count,
        )
        yield GaugeMetricFamily(
            "trio_relay_edge_max_connections", "The connection cap in effect", value=edge.max_connections
        )
        refused = CounterMetricFamily(
            "trio_relay_edge_refused", "Connections refused at accept, before any request", labels=["reason"]
        )
        for admission, count in edge.refused_by.items():
            refused.add_metric([admission.value], count)
        yield refused
        yield CounterMetricFamily(
            "trio_relay_edge_evicted",
            "Idle connections closed to make room at the connection cap",
            value=edge.evicted,
        )
        rejected = CounterMetricFamily(
            "trio_relay_edge_rejected",
            "Requests the edge answered with an error (400, 408, 421, 431...)",
            labels=["status"],
        )
        for status, count in sorted(edge.rejected.items()):
            rejected.add_metric([str(status)], count)
        yield rejected

    def _history(self) -> Iterator[Metric]:
        writer = self.ctx.history_writer
        if writer is None:
            return
        yield CounterMetricFamily(
            "trio_relay_history_written", "Updates written to the tick history", value=writer.written
        )
        yield CounterMetricFamily(
            "trio_relay_history_dropped",
            "Updates the tick history could not take (database slow or down)",
            value=writer.dropped,
        )
        yield GaugeMetricFamily("trio_relay_history_pending", "Updates waiting for the database", value=writer.pending)
        history_state = GaugeMetricFamily(
            "trio_relay_history_state", "Tick history writer state (1 for the current one)", labels=["state"]
        )
        for name in ("ok", "degraded", "down"):
            history_state.add_metric([name], int(writer.state == name))
        yield history_state

    def _counters(self) -> Iterator[Metric]:
        hub, upstream = self.ctx.hub, self.ctx.upstream
        stats = hub.stats
        for name, doc, value in (
            ("upstream_reconnects", "Upstream reconnections", upstream.reconnects),
            ("upstream_failovers", "Switches between providers of the failover chain", upstream.switches),
            ("updates_in", "Normalized upstream updates received by the hub", stats.updates_in),
            ("messages_out", "price_update messages handed to client queues", stats.messages_out),
            ("dropped", "Updates dropped (unwanted symbol, or lost with a closed client)", stats.dropped),
            ("conflated", "Updates replaced by a newer one in a full client queue", hub.conflated_total()),
            ("coalesced", "Backlogged upstream updates merged before routing", stats.coalesced),
            ("malformed", "Upstream frames that could not be decoded", stats.malformed),
            ("duplicate_trades", "Upstream trades dropped as repeats of a recent trade id", stats.duplicate_trades),
            ("callback_errors", "Exceptions raised by update callbacks", stats.callback_errors),
            ("callback_dropped", "Updates a slow async callback missed", stats.callback_dropped),
            ("slow_clients_closed", "Clients closed for making no progress", stats.slow_clients_closed),
            ("bars_late", "Trades the bars' lateness rule left out of a live bar (once per interval)", hub.bars.late),
            ("clients_connected", "Client connections accepted", stats.clients_total),
            (
                "flush_rounds",
                "Rounds of the single writer loop over the clients with pending frames",
                hub.flusher.rounds,
            ),
            ("flush_writes", "Non-blocking client socket writes made by the single writer loop", hub.flusher.writes),
            ("flush_deferred", "Of those, writes the socket did not take whole (a slow reader)", hub.flusher.deferred),
        ):
            yield CounterMetricFamily(f"trio_relay_{name}", doc, value=value)

    def _clients(self) -> Iterator[Metric]:
        hub = self.ctx.hub
        clients = list(hub.clients.values())
        yield GaugeMetricFamily("trio_relay_clients", "Connected WebSocket clients", value=len(clients))
        yield GaugeMetricFamily("trio_relay_cached_symbols", "Symbols in the cache", value=len(hub.cache))
        depths = sorted(len(c.outbox) for c in clients)
        buckets, i = [], 0
        for bound in QUEUE_BUCKETS:
            while i < len(depths) and depths[i] <= bound:
                i += 1
            buckets.append((str(bound), i))
        buckets.append(("+Inf", len(depths)))
        yield HistogramMetricFamily(
            "trio_relay_client_queue_depth",
            "Pending messages per client (at scrape time)",
            buckets=buckets,
            sum_value=sum(depths),
        )
        latency = hub.latency
        yield HistogramMetricFamily(
            "trio_relay_delivery_latency_seconds",
            "Oldest message of a flush: queued for a client until written to its socket",
            buckets=latency.cumulative(),
            sum_value=latency.sum,
        )


def make_registry(ctx: RelayContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)  # one per app: no process-global state
    registry.register(RelayCollector(ctx))
    return registry


# The text exposition format that generate_latest writes, named exactly once: Prometheus 2.x
# and strict scrapers read "text/plain; version=0.0.4". (prometheus_client's CONTENT_TYPE_LATEST
# says version=1.0.0, which older servers do not know, and a mimetype= response would append a
# second charset to it.)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
