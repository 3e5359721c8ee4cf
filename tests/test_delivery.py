"""Per-subscription delivery options (hub/delivery.py): rate cap, fields, deltas, one feed per option set.

Hub-level, in virtual time (MockClock): a symbol ticks 100 times a second for seconds and the
test reads exactly what each client's outbox was given.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trio_relay.config import ClientsConfig
from trio_relay.hub import Client, Demand, Hub, Stats
from trio_relay.hub.delivery import PRICE_FIELDS, DeliveryOptions, OptionsError, parse_options
from trio_relay.model import Update, ws_payload


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def open_hub(**clients: Any) -> AsyncIterator[Hub]:
    async with Hub.open(ClientsConfig(**clients), Demand(linger=0.0), Stats()) as hub:
        yield hub


def trade(symbol: str, price: float, size: float = 100, ts: int = 1_700_000_000_000) -> Update:
    return Update(symbol, "T", ts, last_price=price, last_size=size)


def quote(symbol: str, bid: float, ask: float) -> Update:
    return Update(symbol, "Q", 1_700_000_000_000, bid_price=bid, bid_size=100, ask_price=ask, ask_size=200)


def take(client: Client) -> list[dict[str, Any]]:
    """Everything pending in the client's outbox, decoded (without waiting)."""
    out: list[dict[str, Any]] = []
    outbox = client.outbox
    if len(outbox):
        # get() returns at once when something is pending.
        out = [json.loads(ws_payload(m)) for m in _take_now(outbox)]
    return out


def _take_now(outbox: Any) -> list[bytes]:
    frames: list[bytes] = []

    async def one() -> None:
        frames.extend(await outbox.get())

    # A coroutine that does not need to wait runs to completion on its first send.
    coro = one()
    try:
        coro.send(None)
    except StopIteration:
        pass
    else:  # pragma: no cover - only if get() had to wait
        coro.close()
        raise AssertionError("outbox.get() would block")
    return frames


def prices(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "price_update"]


# --------------------------------------------------------------------------- validation


def test_options_are_validated_with_a_clear_code() -> None:
    assert parse_options(None, None, None) is None
    assert parse_options(None, list(PRICE_FIELDS), False) is None  # every field: the defaults
    opts = parse_options(4, ["last_price", "symbol"], True)
    assert opts == DeliveryOptions(4.0, ("symbol", "last_price", "seq", "epoch"), True)
    for bad, code in [
        ((0, None, None), "invalid_max_rate"),
        ((1000, None, None), "invalid_max_rate"),
        ((True, None, None), "invalid_max_rate"),
        (("4", None, None), "invalid_max_rate"),
        ((None, [], None), "invalid_fields"),
        ((None, ["price"], None), "invalid_fields"),
        ((None, "last_price", None), "invalid_fields"),
        ((None, None, "yes"), "invalid_delta"),
    ]:
        with pytest.raises(OptionsError) as info:
            parse_options(*bad)
        assert info.value.code == code, bad


# --------------------------------------------------------------------------- rate cap


async def test_max_rate_2_on_a_symbol_ticking_100_per_second(autojump_clock: trio.testing.MockClock) -> None:
    """≤ 2 updates a second, and the last one received is never more than 0.5 s behind the latest."""
    async with open_hub() as hub:
        capped = hub.connect()
        hub.subscribe(capped, ["AAPL"], options=DeliveryOptions(max_rate=2))
        take(capped)
        received: list[tuple[float, float]] = []  # (arrival, price)
        published: list[tuple[float, float]] = []
        start = trio.current_time()
        for i in range(500):  # 5 s at 100/s
            price = 100 + i * 0.01
            hub.publish(trade("AAPL", price))
            now = trio.current_time()
            published.append((now, price))
            received += [(now, m["last_price"]) for m in prices(take(capped))]
            # What the client holds is never older than 0.5 s: the price it has was current
            # at most 0.5 s ago.
            held = received[-1][1] if received else None
            if held is not None:
                current_at = max(t for t, p in published if p == held)
                superseded = [t for t, p in published if t > current_at]
                assert not superseded or now - superseded[0] <= 0.5 + 1e-9
            await trio.sleep(0.01)
        await trio.sleep(0.6)  # the burst's last update arrives within 1/max_rate
        received += [(trio.current_time(), m["last_price"]) for m in prices(take(capped))]
        assert received[-1][1] == published[-1][1]
        for second in range(5):
            window = [t for t, _ in received if start + second <= t < start + second + 1]
            assert len(window) <= 2, (second, window)
        assert len(received) >= 9  # and it did get about 2 a second


async def test_a_burst_then_silence_still_delivers_the_last_state(autojump_clock: trio.testing.MockClock) -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"], options=DeliveryOptions(max_rate=1))
        hub.publish(trade("AAPL", 1.0))
        assert [m["last_price"] for m in prices(take(client))] == [1.0]
        for p in (2.0, 3.0, 4.0):
            hub.publish(trade("AAPL", p))
        assert prices(take(client)) == []  # deferred, not dropped
        await trio.sleep(0.99)
        assert prices(take(client)) == []
        await trio.sleep(0.02)
        assert [m["last_price"] for m in prices(take(client))] == [4.0]
        await trio.sleep(5)
        assert prices(take(client)) == []  # nothing new: nothing sent


# --------------------------------------------------------------------------- fields and deltas


async def test_fields_keep_symbol_seq_and_epoch() -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"], options=parse_options(None, ["last_price"], None))
        hub.publish(trade("AAPL", 10.0))
        [msg] = prices(take(client))
        assert list(msg) == ["type", "symbol", "last_price", "seq", "epoch"]
        assert msg["last_price"] == 10.0 and msg["epoch"] == hub.epoch


def merge(held: dict[str, dict[str, Any]], msg: dict[str, Any]) -> None:
    """What a client does: a delta updates what it holds, a full message replaces it."""
    symbol = msg["symbol"]
    if msg.get("delta"):
        assert symbol in held, "a delta came before any full message"
        held[symbol].update({k: v for k, v in msg.items() if k != "delta"})
    else:
        held[symbol] = dict(msg)


async def test_delta_sends_only_what_changed_and_the_client_rebuilds_the_state() -> None:
    async with open_hub(outbox_size=8) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"], options=DeliveryOptions(delta=True))
        hub.publish(trade("AAPL", 10.0))
        hub.publish(quote("AAPL", 9.9, 10.1))
        hub.publish(quote("AAPL", 9.9, 10.2))
        first, second, third = prices(take(client))
        assert "delta" not in first
        assert second["delta"] is True and {"bid_price", "ask_price", "data_type"} <= set(second)
        assert "last_price" not in second
        assert "bid_price" not in third and third["ask_price"] == 10.2
        assert len(json.dumps(third)) < len(json.dumps(first))


async def test_delta_survives_conflation_breaks_and_option_changes() -> None:
    """Whatever the outbox did (conflate, replay, break), the merged view equals the latest state."""
    async with open_hub(outbox_size=4) as hub:
        client = hub.connect()
        reader = hub.connect()  # the same symbol with default options: the truth
        hub.subscribe(client, ["AAPL", "MSFT"], options=DeliveryOptions(delta=True))
        hub.subscribe(reader, ["AAPL", "MSFT"])
        held: dict[str, dict[str, Any]] = {}
        truth: dict[str, dict[str, Any]] = {}
        for round_ in range(30):
            for i in range(round_ % 7):  # bursts past the outbox's capacity: it conflates
                hub.publish(trade("AAPL", 100 + round_ + i / 10, size=i + 1))
                hub.publish(quote("MSFT", 50 + i, 51 + round_))
            if round_ % 5 == 4:
                hub.publish(Update("AAPL", "B", 1, last_price=1.0, last_size=1.0))  # a trade break
                hub.publish(trade("AAPL", 200 + round_))
            if round_ == 10:
                hub.subscribe(client, ["MSFT"], options=DeliveryOptions(delta=True, fields=("symbol", "bid_price")))
            if round_ == 20:
                hub.subscribe(client, ["MSFT"], options=DeliveryOptions(delta=True))
            for msg in prices(take(client)):
                if msg.get("data_type") != "B":
                    merge(held, msg)
            for msg in prices(take(reader)):
                if msg["data_type"] != "B":
                    truth[msg["symbol"]] = msg
            for symbol, state in truth.items():
                fields = set(held[symbol]) - {"cached_at"}
                assert {k: state[k] for k in fields} == {k: held[symbol][k] for k in fields}, (round_, symbol)


async def test_one_encoding_per_option_set_not_per_client() -> None:
    async with open_hub() as hub:
        clients = [hub.connect() for _ in range(50)]
        options = DeliveryOptions(fields=("symbol", "last_price"))
        for c in clients:
            hub.subscribe(c, ["AAPL"], options=options)
        assert len(hub.delivery.routes["AAPL"]) == 1  # one feed for fifty clients
        hub.publish(trade("AAPL", 1.0))
        frames = {id(f) for c in clients for f in _take_now(c.outbox) if b"price_update" in f}
        assert len(frames) == 1  # the same bytes object in every outbox


async def test_later_subscribe_changes_options_and_list_shows_them() -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL", "MSFT"])
        hub.publish(trade("AAPL", 1.0))
        take(client)
        hub.subscribe(client, ["AAPL"], options=DeliveryOptions(max_rate=4, fields=("symbol", "last_price")))
        ack, snapshot = take(client)
        assert ack["options"] == {"max_rate": 4.0, "fields": ["symbol", "last_price", "seq", "epoch"]}
        assert list(snapshot) == ["type", "symbol", "last_price", "seq", "epoch"]  # fresh, under the new options
        assert client.options == {"AAPL": DeliveryOptions(4.0, ("symbol", "last_price"))}
        assert hub.subscriber_count("AAPL") == 1
        hub.subscribe(client, ["AAPL"])  # back to the defaults
        assert client.options == {} and hub.subscriber_count("AAPL") == 1
        assert "AAPL" not in hub.delivery.routes
        hub.unsubscribe(client, ["AAPL", "MSFT"])
        assert hub.subscriber_count("AAPL") == 0


async def test_resume_with_a_rate_cap_replays_the_latest_missed_state() -> None:
    async with open_hub() as hub:
        first = hub.connect()
        hub.subscribe(first, ["AAPL"])
        for p in range(1, 6):
            hub.publish(trade("AAPL", float(p)))
        client = hub.connect()
        hub.subscribe(
            client, ["AAPL"], since={"AAPL": 2}, epoch=hub.epoch, options=DeliveryOptions(max_rate=1, delta=True)
        )
        ack, *rest = take(client)
        assert ack["recovered"] is True
        assert [(m["seq"], m["last_price"], "delta" in m) for m in rest] == [(5, 5.0, False)]
