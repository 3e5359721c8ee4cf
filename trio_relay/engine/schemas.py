"""The fleet's part of /health and /status, as msgspec Structs (the OpenAPI document uses them too).

A leaf module: the API describes the fleet from these types without importing the Redis engine.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = ["FleetHealth", "FleetPublished", "FleetReceived", "FleetRole", "FleetStatus", "RedisState", "RedisStatus"]


class RedisState(enum.StrEnum):
    """This relay's connection to the fleet's Redis."""

    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


class FleetRole(enum.StrEnum):
    """Whether this relay holds the fleet's upstream connection."""

    HOLDER = "holder"
    FOLLOWER = "follower"


class RedisStatus(msgspec.Struct, forbid_unknown_fields=True):
    """This relay's connection to the fleet's Redis (never shows the URL or its password)."""

    state: Annotated[str, Meta(description="connecting, up or down")]
    error: Annotated[str | None, Meta(description="why it is down")]
    since: Annotated[float | None, Meta(description="epoch seconds of the last change of state")]
    outages: Annotated[int, Meta(description="times Redis was lost since the start")]


class FleetHealth(msgspec.Struct, forbid_unknown_fields=True):
    """Which relay of the fleet this is, and who holds the upstream."""

    node: str
    role: Annotated[str, Meta(description="holder (holds the upstream connection) or follower")]
    holder: Annotated[str | None, Meta(description="the node holding the upstream (None: none known)")]
    redis: RedisStatus


class FleetReceived(msgspec.Struct, forbid_unknown_fields=True):
    batches: Annotated[int, Meta(description="fan-out messages received from Redis")]
    duplicates_dropped: Annotated[int, Meta(description="updates already passed on (cache read racing the live feed)")]
    stale_token_dropped: Annotated[
        int, Meta(description="messages of an older holder (fencing token below the newest)")
    ]
    malformed: int


class FleetPublished(msgspec.Struct, forbid_unknown_fields=True):
    batches: Annotated[int, Meta(description="fan-out messages published while this relay held the upstream")]
    updates: int


class FleetStatus(msgspec.Struct, forbid_unknown_fields=True):
    """The fleet engine (engine.backend = "redis"); null on a single relay."""

    backend: Literal["redis"]
    node: str
    prefix: str
    role: Annotated[str, Meta(description="holder or follower")]
    redis: RedisStatus
    holder: str | None
    token: Annotated[int | None, Meta(description="the holder's fencing token")]
    terms_held: Annotated[int, Meta(description="times this relay became the holder")]
    epoch: Annotated[str | None, Meta(description="the fleet's sequence space (seq compares within it)")]
    fleet_symbols: Annotated[int | None, Meta(description="holder only: symbols the whole fleet wants")]
    received: FleetReceived
    published: FleetPublished
    stream: Annotated[str | None, Meta(description="the Redis stream of every update (stream_maxlen > 0)")]
