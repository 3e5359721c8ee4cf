"""Health and status: ``/health`` (and ``/health/ready``, ``/health/live``), ``/status``, ``/metrics``.

For monitoring: ``/health*`` and ``/metrics`` are never behind a token and never rate limited
(the edge's guard lets them through); ``/status`` needs the admin scope with auth on, since it
lists every client. Bodies are the structs of :mod:`.schemas`.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from ..upstream import UpstreamState
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import make_registry, render
from .responses import PREFIX, json_response
from .schemas import (
    CacheInfo,
    ClientInfo,
    ClientsInfo,
    FailoverInfo,
    Health,
    HistoryHealth,
    HistoryStatus,
    Live,
    MessageCounters,
    ProviderInfo,
    Status,
    UpstreamInfo,
)

if TYPE_CHECKING:
    from ..hub import Hub
    from ..upstream import UpstreamView
    from .app import RelayContext

__all__ = ["register_health"]

MAX_CLIENTS_LISTED = 1000


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# Refused symbols listed in /health (it must stay small: monitors poll it); /status lists them all.
MAX_REFUSED_SHOWN = 100


def health_body(ctx: RelayContext) -> tuple[Health, bool]:
    """The /health body, and whether the upstream is fresh (200) or not (503)."""
    hub, upstream = ctx.hub, ctx.upstream
    fresh = upstream.is_fresh()
    age = upstream.message_age()
    body = Health(
        status="ok" if fresh else "unavailable",
        provider=ctx.provider_name,
        state=upstream.state,
        last_message_age_s=_round(age),
        reconnects=upstream.reconnects,
        clients=len(hub.clients),
    )
    if not fresh:
        # "code" is for machines (alert rules), "reason" for people.
        body.code = UpstreamState.STALE if upstream.state == UpstreamState.CONNECTED else upstream.state
        if upstream.state == UpstreamState.CONNECTED:
            body.reason = f"stale: no upstream message for {age or 0:.0f}s"
        elif upstream.state == UpstreamState.AUTH_FAILED:
            body.reason = f"auth_failed: {upstream.last_error}"
        elif upstream.last_error:
            body.reason = f"{upstream.state}: {upstream.last_error}"
        else:
            body.reason = upstream.state
    if upstream.failover:
        body.failover = failover_info(upstream)
    fleet = ctx.engine.fleet_health()
    if fleet is not None:
        body.fleet = fleet
    writer = ctx.history_writer
    if writer is not None:
        # Live relaying does not depend on the database: a slow or down one degrades, never 503s.
        body.history = HistoryHealth(state=writer.state, dropped=writer.dropped, pending=writer.pending)
        if writer.state != "ok":
            body.degraded = ["history"]
    refused = upstream.refused
    if refused:
        body.refused = sorted(refused)[:MAX_REFUSED_SHOWN]
    if ctx.provider_name == "sim":
        body.note = "simulated market data (no FMP_API_KEY set)"
    return body, fresh


def failover_info(upstream: UpstreamView) -> FailoverInfo:
    """The failover part of /health and /status."""
    chain = upstream.chain
    return FailoverInfo(
        active=upstream.provider.name,
        preferred=chain[0].provider.name,
        on_preferred=upstream.active == 0,
        switches=upstream.switches,
        reason=upstream.switch_reason or None,
    )


def _upstream_info(ctx: RelayContext) -> UpstreamInfo:
    hub, upstream = ctx.hub, ctx.upstream
    return UpstreamInfo(
        state=upstream.state,
        source=upstream.provider.describe(),
        connected_since=_iso(upstream.connected_since),
        reconnects=upstream.reconnects,
        attempts=upstream.attempts,
        last_error=upstream.last_error or None,
        last_message_age_s=_round(upstream.message_age()),
        subscribed=sorted(upstream.subscribed),
        wanted=sorted(hub.demand.wanted),
        refused=dict(sorted(upstream.refused.items())),
        providers=[
            ProviderInfo(
                name=h.provider.name,
                active=i == upstream.active,
                state=upstream.state if i == upstream.active else h.state,
                source=h.provider.describe(),
                last_error=(upstream.last_error if i == upstream.active else h.last_error) or None,
                probes=h.probes,
            )
            for i, h in enumerate(upstream.chain)
        ],
    )


def _clients_info(hub: Hub) -> ClientsInfo:
    clients = list(hub.clients.values())
    stats = hub.stats
    return ClientsInfo(
        count=len(clients),
        total_connected=stats.clients_total,
        slow_closed=stats.slow_clients_closed,
        subscriptions=[
            ClientInfo(
                id=c.id,
                remote=c.remote,
                symbols=len(c.symbols),
                pending=len(c.outbox),
                sent=c.outbox.sent,
                conflated=c.outbox.conflated,
                batch=c.batch,
            )
            for c in clients[:MAX_CLIENTS_LISTED]
        ],
    )


def _message_counters(hub: Hub) -> MessageCounters:
    stats = hub.stats
    return MessageCounters(
        in_=stats.updates_in,
        out=stats.messages_out,
        dropped=stats.dropped,
        conflated=hub.conflated_total(),
        coalesced=stats.coalesced,
        malformed=stats.malformed,
        duplicate_trades=stats.duplicate_trades,
        callback_errors=stats.callback_errors,
        callback_dropped=stats.callback_dropped,
    )


def status_body(ctx: RelayContext) -> Status:
    """The /status body: upstream and failover chain, pins, every client (the first ones), counters."""
    hub, upstream, writer = ctx.hub, ctx.upstream, ctx.history_writer
    return Status(
        provider=ctx.provider_name,
        upstream=_upstream_info(ctx),
        failover=failover_info(upstream) if upstream.failover else None,
        fleet=ctx.engine.fleet_status(),
        history=msgspec.convert(writer.status(), HistoryStatus) if writer is not None else None,
        pinned=sorted(hub.demand.pinned),
        clients=_clients_info(hub),
        messages=_message_counters(hub),
        cache=CacheInfo(symbols=len(hub.cache)),
        pid=os.getpid(),
        started_at=_iso(ctx.started_at),
        uptime_s=round(time.time() - ctx.started_at, 1),
    )


def register_health(app: QuartTrio, ctx: RelayContext) -> None:
    """Add the health, status and metrics routes to ``app`` (their bodies are built above)."""

    @app.get(PREFIX + "/health")
    async def health() -> Response:
        """Upstream health: 200 when it is connected and fresh, 503 with the reason otherwise.

        For monitoring: never behind a token, never rate limited. Same body as /health/ready.
        """
        body, fresh = health_body(ctx)
        return json_response(body, 200 if fresh else 503)

    @app.get(PREFIX + "/health/ready")
    async def ready() -> Response:
        """Ready to serve prices: the upstream is connected and fresh (always, for the simulator)."""
        body, fresh = health_body(ctx)
        return json_response(body, 200 if fresh else 503)

    registry = make_registry(ctx)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics: upstream, messages, clients, latency (no per-client or per-symbol labels)."""
        return Response(render(registry), content_type=METRICS_CONTENT_TYPE)

    @app.get(PREFIX + "/health/live")
    async def live() -> Response:
        """The process answers (its event loop runs), whatever the upstream does."""
        ip = ctx.client_ip(request.scope.get("client"))  # the real client's, through the front door
        return json_response(
            Live(status="ok", pid=os.getpid(), uptime_s=round(time.time() - ctx.started_at, 1), client_ip=ip)
        )

    @app.get(PREFIX + "/status")
    async def status() -> Response:
        """The relay's state: upstream and failover chain, pins, every client, message counters.

        With auth on it needs the admin scope (it lists every client).
        """
        return json_response(status_body(ctx))
