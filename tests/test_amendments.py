"""Breaks, cancels and corrections: the hub's trade memory and what the cache then holds.

The providers' mappings are tested with each provider (test_alpaca, test_fmp_*); the end-to-end
paths through the local fake servers too. Here: the contract itself, on a hub.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio

from trio_relay.client import PriceUpdate
from trio_relay.config import ClientsConfig
from trio_relay.hub import Client, Demand, Hub, Stats
from trio_relay.hub.delivery import DeliveryOptions
from trio_relay.hub.trades import TRADE_MEMORY, TradeMemory
from trio_relay.model import Amend, AmendAction, AmendMatch, Update, ws_payload


@asynccontextmanager
async def open_hub(*symbols: str, linger: float = 0.0) -> AsyncIterator[Hub]:
    async with Hub.open(ClientsConfig(), Demand(linger=linger, pinned=list(symbols)), Stats()) as hub:
        yield hub


def trade(symbol: str, price: float, size: float, trade_id: str | None = None, ts: int = 1000) -> Update:
    return Update(symbol, "T", ts, last_price=price, last_size=size, trade_id=trade_id)


def cancel(symbol: str, trade_id: str | None, price: float, size: float, ts: int = 2000) -> Update:
    amend = Amend(action=AmendAction.CANCEL, trade_id=trade_id, price=price, size=size)
    return Update(symbol, "X", ts, last_price=price, last_size=size, amend=amend)


def correction(symbol: str, trade_id: str, price: float, size: float, new_price: float, new_size: float) -> Update:
    amend = Amend(
        action=AmendAction.CORRECTION, trade_id=trade_id, price=price, size=size,
        corrected_id=f"{trade_id}c", corrected_price=new_price, corrected_size=new_size,
    )  # fmt: skip
    return Update(symbol, "C", 2000, last_price=new_price, last_size=new_size, amend=amend)


async def subscribed(hub: Hub, symbol: str) -> Client:
    client = hub.connect()
    hub.subscribe(client, [symbol])
    await drain(client)
    return client


async def drain(client: Client) -> list[dict[str, Any]]:
    with trio.fail_after(1):
        return [json.loads(ws_payload(m)) for m in await client.outbox.get()]


async def test_cancelling_trades_newest_first_walks_back_to_nothing() -> None:
    async with open_hub("AAPL") as hub:
        client = await subscribed(hub, "AAPL")
        for i, price in enumerate((10.0, 11.0, 12.0)):
            hub.publish(trade("AAPL", price, i + 1, trade_id=str(i)))
        await drain(client)
        seen = []
        for i, price in ((2, 12.0), (1, 11.0), (0, 10.0)):
            hub.publish(cancel("AAPL", str(i), price, i + 1))
            (msg,) = await drain(client)
            seen.append((msg["amends"]["matched"], msg["last_price"], msg["last_size"]))
        # No valid trade left in memory: the relay says so rather than keep a void price.
        assert seen == [("last", 11.0, 2), ("last", 10.0, 1), ("last", None, None)]
        assert hub.cache["AAPL"].last_price is None


async def test_a_correction_of_an_earlier_trade_leaves_the_last_one_and_is_remembered() -> None:
    async with open_hub("MSFT") as hub:
        client = await subscribed(hub, "MSFT")
        hub.publish(trade("MSFT", 100.0, 5, trade_id="a"))
        hub.publish(trade("MSFT", 101.0, 6, trade_id="b"))
        hub.publish(correction("MSFT", "a", 100.0, 5, 100.5, 4))
        *_, msg = await drain(client)
        assert msg["data_type"] == "C" and msg["amends"]["matched"] == "earlier"
        assert (msg["last_price"], msg["last_size"]) == (101.0, 6)
        # Cancel "b": the corrected "a" (now id "ac") is the previous valid trade.
        hub.publish(cancel("MSFT", "b", 101.0, 6))
        (msg,) = await drain(client)
        assert (msg["last_price"], msg["last_size"]) == (100.5, 4)
        hub.publish(cancel("MSFT", "ac", 100.5, 4))
        (msg,) = await drain(client)
        assert msg["amends"]["matched"] == "last" and msg["last_price"] is None


async def test_an_amendment_is_its_own_frame_even_in_a_coalesced_backlog() -> None:
    """A backlog is coalesced to one frame per symbol; an amendment still reaches the client."""
    async with open_hub("IBM") as hub:
        hub.coalesce_above = 2
        client = await subscribed(hub, "IBM")
        send, receive = trio.open_memory_channel[Any](4)
        batch = [
            trade("IBM", 1.0, 1, "1"),
            trade("IBM", 2.0, 2, "2"),
            cancel("IBM", "2", 2.0, 2),
            trade("IBM", 3.0, 3, "3"),
        ]
        send.send_nowait(batch)
        send.close()
        await hub.consume(receive)
        got = await drain(client)
        assert [(m["data_type"], m["last_price"]) for m in got] == [("X", 1.0), ("T", 3.0)]
        assert hub.cache["IBM"].last_price == 3.0


async def test_the_memory_is_bounded_and_goes_with_the_symbol() -> None:
    async with open_hub(linger=0.0) as hub:
        client = hub.connect()
        hub.subscribe(client, ["TSLA"])
        for i in range(TRADE_MEMORY + 5):
            hub.publish(trade("TSLA", float(i), 1, trade_id=str(i)))
        await drain(client)
        # The oldest trades are forgotten: amending one changes nothing.
        hub.publish(cancel("TSLA", "0", 0.0, 1))
        (msg,) = await drain(client)
        assert msg["amends"]["matched"] == "unknown" and msg["last_price"] == float(TRADE_MEMORY + 4)
        assert len(hub.trades) == 1
        hub.unsubscribe(client, ["TSLA"])
        hub.demand.expire()
        assert len(hub.trades) == 0 and "TSLA" not in hub.cache


@pytest.mark.parametrize(
    ("amend", "expected"),
    [
        # Without ids (FMP), price and size decide, newest first.
        (Amend(action=AmendAction.BREAK, price=1.0, size=1), (AmendMatch.LAST, (2.0, 2))),
        (Amend(action=AmendAction.BREAK, price=1.0), (AmendMatch.LAST, (2.0, 2))),
        (Amend(action=AmendAction.BREAK, price=2.0, size=2), (AmendMatch.EARLIER, None)),
        (Amend(action=AmendAction.BREAK, price=9.0, size=1), (AmendMatch.UNKNOWN, None)),
        (Amend(action=AmendAction.CORRECTION, price=1.0, size=1, corrected_price=1.5), (AmendMatch.LAST, (1.5, 1))),
    ],
)
def test_matching_without_ids(amend: Amend, expected: tuple[AmendMatch, Any]) -> None:
    memory = TradeMemory()
    for price, size in ((2.0, 2), (1.0, 1), (1.0, 1)):
        memory.record(Update("X", "T", 1, last_price=price, last_size=size))
    if amend.action is AmendAction.BREAK and amend.price == 1.0:
        memory.amend("X", amend)  # the newest of the two identical prints first
    assert memory.amend("X", amend) == expected


async def test_the_python_client_reads_the_amendment() -> None:
    async with open_hub("AAPL") as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await drain(client)
        hub.publish(trade("AAPL", 10.0, 5, trade_id="t1"))
        hub.publish(cancel("AAPL", "t1", 10.0, 5))
        frames = await client.outbox.get()
    update = msgspec.json.decode(ws_payload(frames[-1]), type=PriceUpdate)
    assert update.data_type == "X" and update.amends is not None
    assert (update.amends.action, update.amends.trade_id, update.amends.matched) == (
        AmendAction.CANCEL,
        "t1",
        AmendMatch.LAST,
    )


async def test_a_client_with_delivery_options_gets_the_amendment_whole_and_at_once() -> None:
    """Rate caps, field lists and deltas never defer, trim or merge away an amendment."""
    async with open_hub("AAPL") as hub:
        client = hub.connect()
        options = DeliveryOptions(delta=True, max_rate=1.0, fields=("symbol", "last_price"))
        hub.subscribe(client, ["AAPL"], options=options)
        hub.publish(trade("AAPL", 10.0, 5, trade_id="a"))
        hub.publish(trade("AAPL", 11.0, 6, trade_id="b"))  # within the rate cap: deferred
        hub.publish(cancel("AAPL", "b", 11.0, 6))
        got = [json.loads(ws_payload(m)) for m in await client.outbox.get()]
    amendment = next(m for m in got if "amends" in m)
    assert amendment["last_price"] == 10.0 and "delta" not in amendment
    assert amendment["amends"]["trade_id"] == "b" and amendment["amends"]["matched"] == "last"
