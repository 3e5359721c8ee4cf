"""A short memory of each symbol's last trades, so that an amendment can be applied to the cache.

A break or a cancel voids a trade; a correction changes its price or size. When the amended
trade is the cached last trade, the cache must then show the previous *valid* trade (or the
corrected one), which the hub can only know if it remembers a few trades per symbol. This module
is that memory: at most :data:`TRADE_MEMORY` trades per wanted symbol, forgotten with the symbol.

Matching: by the provider's trade id when both the amendment and the remembered trade have one;
otherwise (FMP gives no ids) by price and size, newest first. An amendment of a trade that is
not remembered changes nothing (``matched: "unknown"``).
"""

from __future__ import annotations

from collections import deque
from typing import Final

from ..model import Amend, AmendAction, AmendMatch

__all__ = ["TradeMemory", "TRADE_MEMORY", "LastTrade"]

#: Trades remembered per symbol. Vendors amend recent prints; an amendment of an older one is
#: reported as "unknown" and leaves the cache alone (the trade it names is no longer the last).
TRADE_MEMORY: Final = 16

#: (trade id or None, price, size) of one remembered trade.
_Trade = tuple[str | None, float | None, float | None]
#: The cache's last trade after an amendment: (price, size), both None when no valid one is left.
LastTrade = tuple[float | None, float | None]


class TradeMemory:
    """Per symbol, the last :data:`TRADE_MEMORY` trades (oldest first)."""

    __slots__ = ("_trades",)

    def __init__(self) -> None:
        self._trades: dict[str, deque[_Trade]] = {}

    def record(self, symbol: str, trade_id: str | None, price: float | None, size: float | None) -> None:
        """Remember a trade (the hot path: one dict lookup and one append)."""
        trades = self._trades.get(symbol)
        if trades is None:
            trades = self._trades[symbol] = deque(maxlen=TRADE_MEMORY)
        trades.append((trade_id, price, size))

    def forget(self, symbol: str) -> None:
        """The symbol is no longer wanted: its trades go with its cache entry."""
        self._trades.pop(symbol, None)

    def clear(self) -> None:
        self._trades.clear()

    def __len__(self) -> int:
        return len(self._trades)

    def amend(self, symbol: str, amend: Amend) -> tuple[AmendMatch, LastTrade | None]:
        """Apply ``amend``: where its trade was found, and the new last trade (None: unchanged)."""
        trades = self._trades.get(symbol)
        index = self._find(trades, amend) if trades else None
        if trades is None or index is None:
            return AmendMatch.UNKNOWN, None
        last = index == len(trades) - 1
        if amend.action is AmendAction.CORRECTION:
            old_id, old_price, old_size = trades[index]
            trades[index] = (
                amend.corrected_id or old_id,
                amend.corrected_price if amend.corrected_price is not None else old_price,
                amend.corrected_size if amend.corrected_size is not None else old_size,
            )
        else:
            del trades[index]
        if not last:
            return AmendMatch.EARLIER, None
        if not trades:
            return AmendMatch.LAST, (None, None)
        _id, price, size = trades[-1]
        return AmendMatch.LAST, (price, size)

    @staticmethod
    def _find(trades: deque[_Trade], amend: Amend) -> int | None:
        """The index of the amended trade, newest first; None when it is not remembered."""
        for i in range(len(trades) - 1, -1, -1):
            trade_id, price, size = trades[i]
            if amend.trade_id is not None and trade_id is not None:
                if trade_id == amend.trade_id:
                    return i
            elif price == amend.price and (amend.size is None or size == amend.size):
                return i
        return None
