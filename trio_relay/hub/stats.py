"""What the hub counts: message counters (/status, /metrics) and the delivery-latency histogram."""

from __future__ import annotations

import bisect

import attrs

__all__ = ["Stats", "LatencyHistogram"]


@attrs.define
class Stats:
    """Message counters shown by /status (and later metrics)."""

    updates_in: int = 0  # normalized updates the hub received
    messages_out: int = 0  # price_update messages handed to client outboxes
    dropped: int = 0  # updates for unwanted symbols + updates lost with a closed client
    conflated: int = 0  # updates replaced by a newer one in a full outbox (closed clients)
    coalesced: int = 0  # backlogged upstream updates merged into a later one before routing
    malformed: int = 0  # upstream frames that could not be decoded
    duplicates: int = 0  # numbered updates (relay, fleet) whose seq was already passed on
    duplicate_trades: int = 0  # upstream trades dropped because their trade id was just seen
    callback_errors: int = 0
    callback_dropped: int = 0  # updates an async callback was too slow to take
    slow_clients_closed: int = 0
    clients_total: int = 0


class LatencyHistogram:
    """Cumulative-bucket histogram, cheap enough for the hot path (one bisect per flush)."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.BUCKETS), "+Inf"), self.counts):
            total += n
            out.append((bound, total))
        return out
