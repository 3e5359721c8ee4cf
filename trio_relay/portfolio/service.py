"""Live portfolio valuations for WebSocket clients (the ``portfolio`` channel), owned by the daemon.

``{"action":"subscribe","channel":"portfolio","portfolio":"main"}`` streams the user's portfolio
``main`` valued at the relay's prices: ``{"type":"portfolio",...}`` at once, then at most once per
``portfolio.update_interval`` while a held symbol moves. Its symbols are wanted upstream while
someone watches it. An edit over REST reaches the streams of that portfolio at once.

Each stream is a task in this service's nursery, with its own cancel scope: it ends when its
client unsubscribes or disconnects, or the portfolio is deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import trio

from ..model import Update, control, ws_text_frame
from .model import Portfolio, PortfolioError
from .store import PortfolioStore
from .streamer import PortfolioStreamer
from .valuation import DayOpen, Valuation

if TYPE_CHECKING:
    from ..hub import Client, Hub

__all__ = ["PortfolioService", "owner_of"]

log = logging.getLogger("trio_relay.portfolio")

_encoder = msgspec.json.Encoder()


def owner_of(client: Client) -> str:
    """Whose portfolios a connection sees: its token's subject, or "anonymous" with auth off."""
    return client.user or "anonymous"


class _Stream:
    __slots__ = ("client", "name", "scope", "streamer", "routed")

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self.scope = trio.CancelScope()
        self.streamer: PortfolioStreamer | None = None
        self.routed: frozenset[str] = frozenset()  # symbols it is indexed (and wanted) under


class PortfolioService:
    def __init__(self, hub: Hub, store: PortfolioStore, update_interval: float) -> None:
        self.hub = hub
        self.store = store
        self.update_interval = update_interval
        self.day_open = DayOpen()
        self._streams: dict[tuple[int, str], _Stream] = {}
        self._by_symbol: dict[str, set[_Stream]] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ hub side
    def on_update(self, update: Update) -> None:
        """Hub callback (every update, after the cache merge): day opens, and streams to wake."""
        state = self.hub.cache.get(update.symbol)
        if state is not None:
            self.day_open.observe(state)
        streams = self._by_symbol.get(update.symbol)
        if streams:
            for stream in streams:
                if stream.streamer is not None:
                    stream.streamer.notify(update.symbol)

    # ------------------------------------------------------------------ client side
    def subscribe(self, client: Client, name: str) -> None:
        key = (client.id, name)
        if key in self._streams:
            self.hub.send_control(client, control("subscribed", channel="portfolio", portfolio=name))
            return
        if self._nursery is None:
            raise PortfolioError("unavailable", "portfolios are not running")
        stream = self._streams[key] = _Stream(client, name)
        self._nursery.start_soon(self._serve, stream)

    def unsubscribe(self, client: Client, name: str) -> None:
        stream = self._streams.get((client.id, name))
        if stream is not None:
            stream.scope.cancel()
        self.hub.send_control(client, control("unsubscribed", channel="portfolio", portfolio=name))

    def disconnect(self, client: Client) -> None:
        for (client_id, _name), stream in list(self._streams.items()):
            if client_id == client.id:
                stream.scope.cancel()

    def changed(self, owner: str, name: str, portfolio: Portfolio | None) -> None:
        """A REST edit (None: deleted): live streams of that portfolio follow at once."""
        for stream in list(self._streams.values()):
            if stream.name != name or owner_of(stream.client) != owner:
                continue
            if portfolio is None:
                self.hub.send_control(
                    stream.client, control("error", code="not_found", message=f"portfolio {name!r} was deleted")
                )
                stream.scope.cancel()
            elif stream.streamer is not None:
                self._route(stream, portfolio.symbols)
                stream.streamer.set_portfolio(portfolio)

    # ------------------------------------------------------------------ one stream
    async def _serve(self, stream: _Stream) -> None:
        client, name = stream.client, stream.name
        try:
            with stream.scope:
                portfolio = await self.store.get(owner_of(client), name)
                if portfolio is None:
                    self.hub.send_control(
                        client,
                        control("error", code="not_found", message=f"no portfolio {name!r}", action="subscribe"),
                    )
                    return
                frame_key = f"portfolio:{name}"

                async def send(valuation: Valuation) -> None:
                    # One pending valuation per portfolio: a slow client gets the newest.
                    client.outbox.put(frame_key, ws_text_frame(_encoder.encode(valuation)))

                stream.streamer = PortfolioStreamer(
                    portfolio,
                    send,
                    prices=self.hub.cache,
                    day_open=self.day_open,
                    interval=self.update_interval,
                    entitled=self._allows(client),
                )
                self._route(stream, portfolio.symbols)
                self.hub.send_control(client, control("subscribed", channel="portfolio", portfolio=name))
                await stream.streamer.run()
        finally:
            self._route(stream, frozenset())
            self._streams.pop((client.id, name), None)

    @staticmethod
    def _allows(client: Client) -> Callable[[str], bool]:
        """The client's entitlement check, as of each call (a refreshed token applies at once;
        nothing is allowed before the client authenticated)."""

        def allows(symbol: str) -> bool:
            entitlement = client.entitlement
            return entitlement is not None and entitlement.allows(symbol)

        return allows

    def _route(self, stream: _Stream, new: frozenset[str]) -> None:
        """Index ``stream`` under the symbols ``new`` (instead of its current ones); demand follows.

        Only the symbols the client's token allows: a portfolio never makes the relay want (nor
        the client see) a symbol the token does not allow.
        """
        allows = self._allows(stream.client)
        new = frozenset(s for s in new if allows(s))
        old = stream.routed
        stream.routed = new
        for symbol in old - new:
            streams = self._by_symbol.get(symbol)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._by_symbol[symbol]
        for symbol in new - old:
            self._by_symbol.setdefault(symbol, set()).add(stream)
        self.hub.demand.acquire(sorted(new - old))
        self.hub.demand.release(sorted(old - new))
