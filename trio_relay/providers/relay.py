"""Another trio-relay as the upstream: the seam for worker processes (and, later, other hosts).

The session speaks the relay's own client protocol: ``{"action":"subscribe","symbols":[...]}``
over the price WebSocket in batch mode (``?batch=1``), and turns each ``price_update`` back into
an :class:`~trio_relay.model.Update`. The message carries the symbol's merged state, so the update
holds every field; merging it again downstream gives the same state.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import msgspec

from ..model import Update
from ..settings import ws_url
from .base import MalformedFrame, MalformedSink, ProviderEntry, RefusalSink, ignore_malformed, ignore_refused
from .wsclient import WsClient

__all__ = ["RelayConfig", "ENTRY", "RelayProvider"]


@attrs.frozen
class RelayConfig:
    # The price WebSocket of another trio-relay to use as the upstream (provider "relay"),
    # e.g. "ws://127.0.0.1:8000/api/v2/realtime/ws/prices".
    url: str = attrs.field(default="", validator=ws_url)


log = logging.getLogger("trio_relay.providers.relay")

CHUNK = 50  # the upstream relay's default max_symbols_per_request


class _Message(msgspec.Struct, gc=False):
    type: str
    symbol: str | None = None
    timestamp: int | None = None
    data_type: str | None = None
    last_price: float | None = None
    last_size: float | None = None
    ask_price: float | None = None
    ask_size: float | None = None
    bid_price: float | None = None
    bid_size: float | None = None
    code: str | None = None
    message: str | None = None
    provider: str | None = None
    seq: int = 0
    epoch: str | None = None


_DECODER = msgspec.json.Decoder(list[_Message])


class RelaySession:
    def __init__(self, ws: WsClient, on_malformed: MalformedSink) -> None:
        self._ws = ws
        self._on_malformed = on_malformed

    async def _send(self, action: str, symbols: Sequence[str]) -> None:
        for i in range(0, len(symbols), CHUNK):
            chunk = list(symbols[i : i + CHUNK])
            await self._ws.send_text(msgspec.json.encode({"action": action, "symbols": chunk}).decode())

    async def subscribe(self, symbols: Sequence[str]) -> None:
        await self._send("subscribe", symbols)

    async def unsubscribe(self, symbols: Sequence[str]) -> None:
        await self._send("unsubscribe", symbols)

    async def receive(self) -> list[Update]:
        updates: list[Update] = []
        for raw in await self._ws.receive_batch():
            try:
                messages = _DECODER.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._on_malformed(MalformedFrame(f"not a batch of relay messages: {exc}", raw))
                continue
            for m in messages:
                if m.type == "price_update" and m.symbol and m.timestamp is not None and m.data_type:
                    updates.append(
                        Update(
                            m.symbol,
                            m.data_type,
                            m.timestamp,
                            last_price=m.last_price,
                            last_size=m.last_size,
                            ask_price=m.ask_price,
                            ask_size=m.ask_size,
                            bid_price=m.bid_price,
                            bid_size=m.bid_size,
                            merged=True,
                            provider=m.provider or None,
                            seq=m.seq,
                            epoch=m.epoch or None,
                        )
                    )
                elif m.type == "error":
                    log.warning("[UPSTREAM RELAY] error %s: %s", m.code, m.message)
        return updates


class RelayProvider:
    name = "relay"
    detects_stale = False  # a quiet market is quiet upstream too; the socket's own errors count

    def __init__(self, url: str, connect_timeout: float = 30.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout

    def describe(self) -> str:
        return f"upstream relay at {self.url}"

    @asynccontextmanager
    async def session(
        self, on_malformed: MalformedSink = ignore_malformed, on_refused: RefusalSink = ignore_refused
    ) -> AsyncIterator[RelaySession]:
        url = self.url + ("&" if "?" in self.url else "?") + "batch=1"
        async with WsClient.open(url, connect_timeout=self.connect_timeout) as ws:
            yield RelaySession(ws, on_malformed)


def _check(settings: RelayConfig) -> str | None:
    return None if settings.url else "url: provider 'relay' needs the URL of the upstream relay's price socket"


ENTRY = ProviderEntry(
    name="relay",
    settings=RelayConfig,
    build=lambda settings, upstream: RelayProvider(settings.url, connect_timeout=upstream.connect_timeout),
    check=_check,
)
