"""Portfolios: positions per user, persisted, valued live at the relay's prices.

* :mod:`~trio_relay.portfolio.model`: :class:`Position`, :class:`Portfolio`, validation
  (:func:`make_position`, :func:`check_name`) raising :class:`PortfolioError` ``(code, message)``.
* :class:`PortfolioStore`: create / list / get / delete portfolios and put / delete positions, in
  the relay's SQLite file (:class:`~trio_relay.appstore.AppStore`, tables ``pf_*``).
* :func:`valuate`: market value, cost, unrealised P&L and day change per position and in total
  (formulas and rounding in :mod:`~trio_relay.portfolio.valuation`); :class:`DayOpen`: the first
  price of each symbol in the UTC day, which "day change" is relative to.
* :class:`PortfolioStreamer`: a client's throttled stream of valuations.

Wiring (the daemon)::

    store = PortfolioStore(app_store, config.portfolio)
    await store.migrate()
    day_open = DayOpen()

    def track_day_open(update: Update) -> None:  # sync hub callback: runs after the cache merge
        state = hub.cache.get(update.symbol)
        if state is not None:
            day_open.observe(state)

    hub.add_callback(track_day_open)
    # per subscribed client: PortfolioStreamer(portfolio, send, prices=hub.cache,
    #     day_open=day_open, interval=config.portfolio.update_interval), run in the client's nursery
"""

from __future__ import annotations

from .model import MAX_QUANTITY, NAME_RE, Portfolio, PortfolioError, Position, check_name, check_symbol, make_position
from .store import PortfolioStore
from .streamer import PortfolioStreamer
from .valuation import DECIMALS, DayOpen, PositionValue, Totals, Valuation, price_of, valuate

__all__ = [
    "Position",
    "Portfolio",
    "PortfolioError",
    "make_position",
    "check_name",
    "check_symbol",
    "MAX_QUANTITY",
    "NAME_RE",
    "PortfolioStore",
    "valuate",
    "price_of",
    "Valuation",
    "PositionValue",
    "Totals",
    "DayOpen",
    "DECIMALS",
    "PortfolioStreamer",
]
