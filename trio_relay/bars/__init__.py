"""OHLCV bars: the aggregation (:mod:`.builder`, pure) and the WebSocket bars channel (:mod:`.channel`).

Only the pure part is re-exported here: the history API and the benchmarks use it without the
hub; the channel (which the hub runs) is imported as ``trio_relay.bars.channel``.
"""

from .builder import (
    INTERVALS,
    Bar,
    BarBuilder,
    BarsPageResult,
    BudgetExceeded,
    TradeRow,
    bars_from_sorted_trades,
    bars_from_trades,
)

__all__ = [
    "INTERVALS",
    "Bar",
    "BarBuilder",
    "TradeRow",
    "BarsPageResult",
    "BudgetExceeded",
    "bars_from_trades",
    "bars_from_sorted_trades",
]
