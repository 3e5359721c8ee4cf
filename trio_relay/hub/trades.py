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

import msgspec

from ..model import Amend, AmendAction, AmendMatch, Update

__all__ = ["TradeMemory", "TRADE_MEMORY", "LastTrade"]

#: Trades remembered per symbol. Vendors amend recent prints; an amendment of an older one is
#: reported as "unknown" and leaves the cache alone (the trade it names is no longer the last).
TRADE_MEMORY: Final = 16

#: The cache's last trade after an amendment: (price, size), both None when no valid one is left.
LastTrade = tuple[float | None, float | None]


class TradeMemory:
    """Per symbol, the last :data:`TRADE_MEMORY` trades (oldest first), as the updates themselves.

    The hot path is the hub's: ``recent = memory.by_symbol.get(symbol) or memory.start(symbol)``
    then ``recent.append(update)``, no call and no allocation per trade (the update is kept as it
    is: updates are never changed once published).
    """

    __slots__ = ("by_symbol",)

    def __init__(self) -> None:
        self.by_symbol: dict[str, deque[Update]] = {}

    def start(self, symbol: str) -> deque[Update]:
        """The (new, empty) memory of ``symbol``."""
        trades = self.by_symbol[symbol] = deque(maxlen=TRADE_MEMORY)
        return trades

    def record(self, update: Update) -> None:
        """Remember a trade (what the hub inlines)."""
        (self.by_symbol.get(update.symbol) or self.start(update.symbol)).append(update)

    def forget(self, symbol: str) -> None:
        """The symbol is no longer wanted: its trades go with its cache entry."""
        self.by_symbol.pop(symbol, None)

    def clear(self) -> None:
        self.by_symbol.clear()

    def __len__(self) -> int:
        return len(self.by_symbol)

    def amend(self, symbol: str, amend: Amend) -> tuple[AmendMatch, LastTrade | None]:
        """Apply ``amend``: where its trade was found, and the new last trade (None: unchanged)."""
        trades = self.by_symbol.get(symbol)
        index = self._find(trades, amend) if trades else None
        if trades is None or index is None:
            return AmendMatch.UNKNOWN, None
        last = index == len(trades) - 1
        if amend.action is AmendAction.CORRECTION:
            old = trades[index]
            trades[index] = msgspec.structs.replace(
                old,
                trade_id=amend.corrected_id or old.trade_id,
                last_price=amend.corrected_price if amend.corrected_price is not None else old.last_price,
                last_size=amend.corrected_size if amend.corrected_size is not None else old.last_size,
            )
        else:
            del trades[index]
        if not last:
            return AmendMatch.EARLIER, None
        if not trades:
            return AmendMatch.LAST, (None, None)
        newest = trades[-1]
        return AmendMatch.LAST, (newest.last_price, newest.last_size)

    @staticmethod
    def _find(trades: deque[Update], amend: Amend) -> int | None:
        """The index of the amended trade, newest first; None when it is not remembered."""
        for i in range(len(trades) - 1, -1, -1):
            trade = trades[i]
            if amend.trade_id is not None and trade.trade_id is not None:
                if trade.trade_id == amend.trade_id:
                    return i
            elif trade.last_price == amend.price and (amend.size is None or trade.last_size == amend.size):
                return i
        return None
