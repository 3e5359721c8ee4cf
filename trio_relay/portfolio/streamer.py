"""Throttled valuations of one client's portfolio, for the WebSocket ``portfolio`` channel.

The hub calls :meth:`PortfolioStreamer.notify` (sync, never waits) when a symbol of the portfolio
changes; :meth:`PortfolioStreamer.run`, a task in a nursery the caller owns (the client's), sends
the valuations::

    streamer = PortfolioStreamer(portfolio, send, prices=hub.cache, day_open=day_open,
                                 interval=config.portfolio.update_interval)
    await nursery.start(streamer.run)        # returns once the first valuation is sent
    # route hub changes of streamer.symbols to streamer.notify; after an edit,
    # streamer.set_portfolio(new) (and re-route if streamer.symbols changed)

Throttle: the first change after a quiet period opens a window of ``interval`` seconds; changes
within it are coalesced; when it ends, ONE valuation of the then-current prices is sent. So a
change is reflected at most ``interval`` (plus the time ``send`` takes) later, and two valuations
are always at least ``interval`` apart (apart from the first, sent at once). While ``send`` waits
(a slow client), changes keep coalescing: the streamer never queues more than one valuation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import trio

from ..model import PriceState
from .model import Portfolio
from .valuation import Valuation, valuate

__all__ = ["PortfolioStreamer"]


class PortfolioStreamer:
    """One client's subscription to one portfolio: coalesces changes, sends valuations.

    ``send`` gets each :class:`~trio_relay.portfolio.valuation.Valuation` (e.g. encodes it into the
    client's outbox); an exception from it ends :meth:`run`. ``prices`` and ``day_open`` are read
    when a valuation is made, not copied. ``entitled``: as for :func:`valuate`.
    """

    def __init__(
        self,
        portfolio: Portfolio,
        send: Callable[[Valuation], Awaitable[object]],
        *,
        prices: Mapping[str, PriceState],
        day_open: Mapping[str, float],
        interval: float,
        entitled: Callable[[str], bool] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 (got {interval})")
        self._portfolio = portfolio
        self._symbols = portfolio.symbols
        self._send = send
        self._prices = prices
        self._day_open = day_open
        self._entitled = entitled  # None: every symbol (see valuate())
        self.interval = interval
        self._changed = trio.Event()
        self.sent = 0  # valuations sent so far

    @property
    def portfolio(self) -> Portfolio:
        return self._portfolio

    @property
    def symbols(self) -> frozenset[str]:
        """The symbols whose changes matter (the hub should route these to :meth:`notify`)."""
        return self._symbols

    def notify(self, symbol: str) -> None:
        """``symbol``'s price changed. Sync and O(1): safe to call from the hub's hot path.

        A symbol the portfolio does not hold is ignored.
        """
        if symbol in self._symbols:
            self._changed.set()

    def set_portfolio(self, portfolio: Portfolio) -> None:
        """The portfolio was edited: value the new one (throttled like a price change)."""
        self._portfolio = portfolio
        self._symbols = portfolio.symbols
        self._changed.set()

    def valuate(self) -> Valuation:
        """A valuation at the current prices (what :meth:`run` sends)."""
        return valuate(self._portfolio, self._prices, self._day_open, entitled=self._entitled)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send a valuation now, then one per window of changes, until cancelled."""
        await self._deliver()
        task_status.started()
        while True:
            await self._changed.wait()
            await trio.sleep(self.interval)  # the window: later changes ride along
            # No checkpoint between here and the valuation: a change from now on is a new window.
            self._changed = trio.Event()
            await self._deliver()

    async def _deliver(self) -> None:
        valuation = self.valuate()
        self.sent += 1
        await self._send(valuation)
