"""The hub: where an upstream update becomes a client message (see :mod:`.core`).

One module per concept: :mod:`.core` (the :class:`Hub`: cache, seq, routing, resume, status
signals), :mod:`.outbox` (a client's bounded, conflating queue), :mod:`.client` (a client as the
hub sees it, and the close codes), :mod:`.demand` (reference-counted upstream demand), and
:mod:`.stats` (counters and the latency histogram). The names other packages use are
re-exported here.
"""

from .client import (
    CLOSE_GOING_AWAY,
    CLOSE_GRACE,
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOKEN_EXPIRED,
    Client,
)
from .core import RECONNECT_HINT_MS, Hub, SubscriptionError, new_epoch
from .demand import Demand
from .outbox import Outbox
from .stats import LatencyHistogram, Stats

__all__ = [
    "Hub",
    "Client",
    "Outbox",
    "Demand",
    "Stats",
    "LatencyHistogram",
    "SubscriptionError",
    "new_epoch",
    "RECONNECT_HINT_MS",
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TOKEN_EXPIRED",
    "CLOSE_GRACE",
]
