"""Live OHLCV bars over the client WebSocket: the ``bars`` channel.

``{"action":"subscribe","symbols":["AAPL"],"channel":"bars","interval":"1m"}`` subscribes a client
to the symbol's 1-minute bars:

* the bar in progress (``complete:false``) at most once a second while it changes (conflated:
  the newest replaces an unsent older one);
* each bar once when it closes (a trade of a later interval, or the clock passed its end):
  ``complete:true`` if its lateness window has passed already, else ``complete:false``;
* the bar again, ``amended:true``, each time a late trade within the lateness window changes it
  (or adds a bar behind those sent);
* the bar once more with ``complete:true`` when its lateness window passes, if it was sent
  incomplete: from then on it equals the bar ``GET /bars`` returns for the same interval.

Closed, amended and complete bars are never conflated away. Which trades count is
:class:`~trio_relay.bars.Lateness` (``[bars]`` in the config), the same rule as the history's
bars; a trade's arrival time is the hub's ``received_ms``, the value the history stores with it.

A symbol's bars of an interval are built from the trades the relay sees once someone subscribes
to that interval of it; a bar is sent only if no trade of its interval can have been missed, i.e.
its interval starts at or after the first trade seen since (a bar built from half an interval's
trades would lie). Earlier bars
come from ``GET /api/v2/realtime/bars/{symbol}``, built from the tick history.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import trio

from ..model import TRADE, Update, control, wall_ms, ws_text_frame
from .builder import INTERVALS, Bar, BarBuilder, Lateness

if TYPE_CHECKING:
    from ..hub import Client, Hub, Outbox

__all__ = ["BarChannel"]

log = logging.getLogger("trio_relay.bars")

_encoder = msgspec.json.Encoder()
_NO_TRADE_YET = 1 << 62  # later than any bar: nothing is whole before the first trade


class BarChannel:
    """Bar subscriptions and the :class:`BarBuilder` of each interval that feeds them; owned by the hub.

    A trade costs the intervals someone wants of its symbol, not all four: one builder per
    interval, fed only the symbols subscribed in it.
    """

    def __init__(self, hub: Hub, lateness: Lateness | None = None) -> None:
        self.hub = hub
        self.builders = {interval: BarBuilder((interval,), lateness) for interval in INTERVALS}
        # The wall clock (UTC epoch ms) that closes and completes bars; a test may replace it.
        self.clock: Callable[[], int] = wall_ms
        self.subs: dict[tuple[str, str], set[Outbox]] = {}
        # Symbol → interval → event time (epoch ms) from which its bars are whole: the first
        # trade seen since someone wanted that interval of it. The hub reads the symbols.
        self.symbols: dict[str, dict[str, int]] = {}
        self._sent_open: dict[tuple[str, str], Bar] = {}
        self._keys = itertools.count()

    # ------------------------------------------------------------------ subscriptions
    def subscribe(self, client: Client, symbols: list[str], interval: str) -> list[str]:
        """Subscribe ``client`` to ``interval`` bars of ``symbols``; the symbols that were new."""
        pairs = [(s, interval) for s in dict.fromkeys(symbols) if (s, interval) not in client.bars]
        self.hub.check_capacity(client, len(pairs))
        outbox = client.outbox
        for pair in pairs:
            client.bars.add(pair)
            self.subs.setdefault(pair, set()).add(outbox)
            self.symbols.setdefault(pair[0], {}).setdefault(interval, _NO_TRADE_YET)
        self.hub.demand.acquire([s for s, _ in pairs])
        self.hub.send_control(
            client, control("subscribed", symbols=list(dict.fromkeys(symbols)), channel="bars", interval=interval)
        )
        for symbol, _ in pairs:
            bar = self.builders[interval].current(symbol, interval)
            if bar is not None and self._whole(bar):
                outbox.put(self._open_key(symbol, interval), self._frame(bar))
        return [s for s, _ in pairs]

    def unsubscribe(self, client: Client, symbols: list[str], interval: str | None) -> list[tuple[str, str]]:
        """Drop ``client``'s bars of ``symbols`` (every interval when ``interval`` is None)."""
        wanted = set(symbols)
        pairs = [p for p in client.bars if p[0] in wanted and (interval is None or p[1] == interval)]
        self._remove(client, pairs)
        client.outbox.discard({self._key_prefix(s, i) for s, i in pairs} | {self._open_key(s, i) for s, i in pairs})
        self.hub.send_control(
            client,
            control("unsubscribed", symbols=list(dict.fromkeys(symbols)), channel="bars", interval=interval),
        )
        return pairs

    def disconnect(self, client: Client) -> None:
        self._remove(client, list(client.bars))

    def _remove(self, client: Client, pairs: list[tuple[str, str]]) -> None:
        for pair in pairs:
            client.bars.discard(pair)
            outboxes = self.subs.get(pair)
            if outboxes is not None:
                outboxes.discard(client.outbox)
                if not outboxes:
                    del self.subs[pair]
                    self._sent_open.pop(pair, None)
        self.hub.demand.release([s for s, _ in pairs])
        for symbol, interval in pairs:
            wanted = self.symbols.get(symbol)
            if (symbol, interval) not in self.subs and wanted is not None and interval in wanted:
                del wanted[interval]
                self.builders[interval].forget(symbol)
                if not wanted:
                    del self.symbols[symbol]

    # ------------------------------------------------------------------ data
    def feed(self, update: Update) -> None:
        """A trade of a symbol someone wants bars of (the hub calls it only for those)."""
        if update.kind != TRADE:
            return
        # received_ms is 0 only for a hub fed by direct publish() calls (tests): the clock then.
        recv_ms = self.hub.received_ms or self.clock()
        wanted = self.symbols[update.symbol]
        for interval, whole_from in wanted.items():
            if whole_from == _NO_TRADE_YET:
                wanted[interval] = update.timestamp
            for bar in self.builders[interval].add(update, recv_ms):
                self._send_closed(bar)

    @property
    def late(self) -> int:
        """Trades the lateness rule left out of a bar (counted once per interval built)."""
        return sum(builder.late for builder in self.builders.values())

    async def run(self) -> None:
        """Once a second: close the bars the clock has passed, complete the final ones, send the changed open bars."""
        while True:
            await trio.sleep(1.0)
            if not self.symbols:
                continue
            now = self.clock()
            for builder in self.builders.values():
                for bar in builder.flush(now):
                    self._send_closed(bar)
            for (symbol, interval), outboxes in self.subs.items():
                current = self.builders[interval].current(symbol, interval)
                if current is None or not self._whole(current) or self._sent_open.get((symbol, interval)) == current:
                    continue
                self._sent_open[(symbol, interval)] = current
                frame = self._frame(current)
                key = self._open_key(symbol, interval)
                for outbox in outboxes:
                    outbox.put(key, frame)  # one pending per pair: conflated to the newest

    def _send_closed(self, bar: Bar) -> None:
        """A closed, amended or complete bar: to every subscriber, never conflated."""
        outboxes = self.subs.get((bar.symbol, bar.interval))
        if not outboxes or not self._whole(bar):
            return
        frame = self._frame(bar)
        key = (self._key_prefix(bar.symbol, bar.interval), next(self._keys))  # never conflated
        for outbox in outboxes:
            outbox.put(key, frame)
        self.hub.stats.messages_out += len(outboxes)

    def _whole(self, bar: Bar) -> bool:
        return bar.start_ms >= self.symbols.get(bar.symbol, {}).get(bar.interval, _NO_TRADE_YET)

    @staticmethod
    def _frame(bar: Bar) -> bytes:
        return ws_text_frame(_encoder.encode(bar))

    @staticmethod
    def _key_prefix(symbol: str, interval: str) -> str:
        return f"bar:{symbol}:{interval}"

    @staticmethod
    def _open_key(symbol: str, interval: str) -> str:
        return f"bar-open:{symbol}:{interval}"
