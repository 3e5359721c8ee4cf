"""OHLCV bars: the aggregation (:mod:`.builder`, pure) and the WebSocket bars channel (:mod:`.channel`).

Only the pure part is re-exported here: the history API and the benchmarks use it without the
hub; the channel (which the hub runs) is imported as ``trio_relay.bars.channel``.
"""

from .builder import (
    DEFAULT_GRACE_MS,
    DEFAULT_LATENESS_MS,
    INTERVALS,
    Bar,
    BarBuilder,
    BarsPageResult,
    BudgetExceeded,
    Lateness,
    TradeRow,
    bars_from_sorted_trades,
    bars_from_trades,
)

__all__ = [
    "INTERVALS",
    "DEFAULT_GRACE_MS",
    "DEFAULT_LATENESS_MS",
    "Lateness",
    "Bar",
    "BarBuilder",
    "TradeRow",
    "BarsPageResult",
    "BudgetExceeded",
    "bars_from_trades",
    "bars_from_sorted_trades",
]
