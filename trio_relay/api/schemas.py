"""The bodies of /health, /health/live and /status, and of every REST error: one definition each.

The handlers (:mod:`.rest`) build these structs and encode them; the OpenAPI document
(:mod:`.openapi`) describes the very same types, so the document cannot drift from what the
relay sends.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from ..engine.schemas import FleetHealth, FleetStatus

__all__ = [
    "ErrorBody",
    "FailoverInfo",
    "HistoryHealth",
    "HistoryStatus",
    "Health",
    "Live",
    "ProviderInfo",
    "UpstreamInfo",
    "ClientInfo",
    "ClientsInfo",
    "MessageCounters",
    "CacheInfo",
    "Status",
]


class ErrorBody(msgspec.Struct, forbid_unknown_fields=True):
    """Every REST error: a code for programs and a message for people."""

    error: Annotated[str, Meta(description="machine-readable code, e.g. invalid_symbols, not_found, rate_limited")]
    message: Annotated[str, Meta(description="what went wrong, for people")]


class FailoverInfo(msgspec.Struct, forbid_unknown_fields=True):
    """The failover chain's position (only with several providers configured)."""

    active: Annotated[str, Meta(description="the provider serving now")]
    preferred: Annotated[str, Meta(description="the first provider of the chain")]
    on_preferred: bool
    switches: Annotated[int, Meta(description="provider switches since start")]
    reason: Annotated[str | None, Meta(description="why the last switch happened")]


class HistoryHealth(msgspec.Struct, forbid_unknown_fields=True):
    """The tick history writer, in short (only with history on)."""

    state: Annotated[Literal["ok", "degraded", "down"], Meta(description="down: the database cannot be used")]
    dropped: Annotated[int, Meta(description="updates not stored because the database was slow or down")]
    pending: Annotated[int, Meta(description="updates waiting for the database")]


class HistoryStatus(msgspec.Struct, forbid_unknown_fields=True):
    """The tick history writer (never shows a DSN or password)."""

    backend: str
    state: Literal["ok", "degraded", "down"]
    written: int
    dropped: int
    rejected: Annotated[int, Meta(description="rows the database refused (bad values)")]
    pending: int
    deleted: Annotated[int, Meta(description="rows removed by retention")]
    last_error: str | None


class Health(msgspec.Struct, forbid_unknown_fields=True):
    """The upstream's health: 200 when it is connected and fresh, 503 otherwise."""

    status: Literal["ok", "unavailable"]
    provider: Annotated[str, Meta(description="the active provider: fmp, finnhub, alpaca, polygon, sim, relay")]
    state: Annotated[str, Meta(description="starting, connecting, connected, backoff, auth_failed, stopped or failed")]
    last_message_age_s: Annotated[float | None, Meta(description="seconds since the last upstream frame")]
    reconnects: int
    clients: Annotated[int, Meta(description="WebSocket clients connected")]
    code: Annotated[
        str | UnsetType,
        Meta(description="only when not ready, for alert rules: stale, auth_failed, backoff, connecting..."),
    ] = UNSET
    reason: Annotated[str | UnsetType, Meta(description="only when not ready: why, in words")] = UNSET
    failover: FailoverInfo | UnsetType = UNSET
    history: HistoryHealth | UnsetType = UNSET
    fleet: Annotated[FleetHealth | UnsetType, Meta(description='only with engine.backend = "redis"')] = UNSET
    degraded: Annotated[
        list[str] | UnsetType, Meta(description='parts not working fully while prices flow, e.g. ["history"]')
    ] = UNSET
    note: Annotated[str | UnsetType, Meta(description="present while serving simulated data")] = UNSET
    refused: Annotated[
        list[str] | UnsetType,
        Meta(description="only when the provider refused some wanted symbols (the others are served): "
             "the first 100, sorted; reasons in /status"),
    ] = UNSET  # fmt: skip


class Live(msgspec.Struct, forbid_unknown_fields=True):
    """The process answers."""

    status: Literal["ok"]
    pid: int
    uptime_s: float
    client_ip: Annotated[str, Meta(description="the caller's address as the relay sees it")]


class ProviderInfo(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    active: bool
    state: Annotated[
        str,
        Meta(
            description="the active one's upstream state; for the others standby, probing, healthy, down, "
            "stale (its probe got no data), auth_failed, or held_off (flap guard)"
        ),
    ]
    source: Annotated[str, Meta(description="where it connects (never with a key)")]
    last_error: str | None
    probes: Annotated[
        int, Meta(description="failback probes so far (each subscribes a few wanted symbols and must get data)")
    ]


class UpstreamInfo(msgspec.Struct, forbid_unknown_fields=True):
    state: str
    source: str
    connected_since: Annotated[str | None, Meta(description="ISO 8601 UTC")]
    reconnects: int
    attempts: int
    last_error: str | None
    last_message_age_s: float | None
    subscribed: Annotated[list[str], Meta(description="symbols subscribed upstream now")]
    wanted: Annotated[list[str], Meta(description="symbols clients or pins want")]
    providers: list[ProviderInfo]
    refused: Annotated[
        dict[str, str],
        Meta(description="wanted symbols the provider refused, with its reason; not asked for again "
             "until nobody wants them or the provider changes"),
    ] = msgspec.field(default_factory=dict)  # fmt: skip


class ClientInfo(msgspec.Struct, forbid_unknown_fields=True):
    id: int
    remote: str
    symbols: Annotated[int, Meta(description="how many symbols it holds")]
    pending: Annotated[int, Meta(description="messages waiting in its queue")]
    sent: int
    conflated: Annotated[int, Meta(description="updates replaced by a newer one while it was behind")]
    batch: bool


class ClientsInfo(msgspec.Struct, forbid_unknown_fields=True):
    count: int
    total_connected: int
    slow_closed: Annotated[int, Meta(description="clients closed as slow consumers (4008)")]
    subscriptions: Annotated[list[ClientInfo], Meta(description="at most the first 1000 clients")]


class MessageCounters(msgspec.Struct, forbid_unknown_fields=True, rename={"in_": "in"}):
    in_: Annotated[int, Meta(description="updates received from the upstream")]
    out: Annotated[int, Meta(description="messages queued to clients")]
    dropped: int
    conflated: int
    coalesced: int
    malformed: Annotated[int, Meta(description="upstream frames that could not be decoded")]
    duplicate_trades: Annotated[int, Meta(description="upstream trades dropped as repeats of a recent trade id")]
    callback_errors: int
    callback_dropped: int


class CacheInfo(msgspec.Struct, forbid_unknown_fields=True):
    symbols: int


class Status(msgspec.Struct, forbid_unknown_fields=True):
    """The relay's whole state (admin scope with auth on: it lists every client)."""

    provider: str
    upstream: UpstreamInfo
    failover: FailoverInfo | None
    fleet: FleetStatus | None
    history: HistoryStatus | None
    pinned: list[str]
    clients: ClientsInfo
    messages: MessageCounters
    cache: CacheInfo
    pid: int
    started_at: Annotated[str | None, Meta(description="ISO 8601 UTC")]
    uptime_s: float
