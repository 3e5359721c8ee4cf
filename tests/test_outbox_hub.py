"""Unit tests of the hub: outboxes (order, conflation, replies), cache, demand, callbacks, stalls."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trio_relay.config import ClientsConfig
from trio_relay.hub import Client, Demand, Hub, Outbox, Stats, SubscriptionError
from trio_relay.model import Update, control, ws_payload

SYMBOLS20 = [f"S{i:02d}" for i in range(20)]


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def open_hub(
    *, pinned: list[str] | tuple[str, ...] = (), linger: float = 0.0, **clients: Any
) -> AsyncIterator[Hub]:
    async with Hub.open(ClientsConfig(**clients), Demand(linger=linger, pinned=list(pinned)), Stats()) as hub:
        yield hub


def trade(symbol: str, price: float, size: float = 100, ts: int = 1_700_000_000_000) -> Update:
    return Update(symbol, "T", ts, last_price=price, last_size=size)


def quote(symbol: str, bid: float, ask: float, ts: int = 1_700_000_000_000) -> Update:
    return Update(symbol, "Q", ts, bid_price=bid, bid_size=100, ask_price=ask, ask_size=200)


async def drain(client: Client) -> list[dict[str, Any]]:
    """Take everything pending (must not block: there has to be something)."""
    with trio.fail_after(1):
        return [json.loads(ws_payload(m)) for m in await client.outbox.get()]


def prices(messages: list[dict[str, Any]], symbol: str | None = None) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "price_update" and (symbol is None or m["symbol"] == symbol)]


# --------------------------------------------------------------------------- Outbox alone


async def test_outbox_below_capacity_keeps_every_message_in_order() -> None:
    outbox = Outbox(capacity=10)
    sent = [("A" if i % 2 else "B", f"m{i}") for i in range(10)]
    for key, msg in sent:
        outbox.put(key, msg)
    assert len(outbox) == 10
    assert await outbox.get() == [m for _k, m in sent]
    assert len(outbox) == 0
    assert outbox.conflated == 0


async def test_outbox_full_conflates_to_latest_per_key() -> None:
    outbox = Outbox(capacity=4)
    for i in range(4):
        outbox.put("A", f"A{i}")
    outbox.put("B", "B0")  # the 5th frame: switch to one pending frame per key
    outbox.put("A", "A4")
    outbox.put("B", "B1")
    assert len(outbox) == 2
    assert await outbox.get() == ["A4", "B1"]
    assert outbox.conflated == 5  # A0..A3 and B0 replaced
    # After a take it queues in order again.
    outbox.put("A", "A5")
    outbox.put("A", "A6")
    assert await outbox.get() == ["A5", "A6"]


async def test_outbox_get_waits_for_a_put() -> None:
    outbox = Outbox(capacity=4)
    got: list[list[str]] = []

    async def reader() -> None:
        got.append(await outbox.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and outbox.idle
        outbox.put("A", "x")
    assert got == [["x"]]
    assert not outbox.idle


async def test_outbox_replies_survive_conflation() -> None:
    outbox = Outbox(capacity=4)
    replies = []
    for i in range(200):
        outbox.put("A", f"A{i}")
        if i % 70 == 0:
            replies.append(f"reply{i}")
            assert outbox.put_control(replies[-1])
    items = await outbox.get()
    assert [m for m in items if m.startswith("reply")] == replies
    assert [m for m in items if m.startswith("A")] == ["A199"]


async def test_outbox_discard_in_both_modes() -> None:
    outbox = Outbox(capacity=10)
    for i in range(3):
        outbox.put("A", f"A{i}")
        outbox.put("B", f"B{i}")
    outbox.discard({"A"})
    assert await outbox.get() == ["B0", "B1", "B2"]
    for i in range(30):
        outbox.put("A", f"A{i}")
        outbox.put("B", f"B{i}")
    outbox.discard({"A"})
    assert await outbox.get() == ["B29"]


# --------------------------------------------------------------------------- Outbox via the Hub


async def test_outbox_in_order_below_capacity_via_hub() -> None:
    async with open_hub(outbox_size=64) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL", "MSFT"])
        assert await drain(client) == [{"type": "subscribed", "symbols": ["AAPL", "MSFT"]}]
        for i in range(30):
            hub.publish(trade("AAPL" if i % 3 else "MSFT", 100 + i))
        got = await drain(client)
    assert len(got) == 30
    assert [m["last_price"] for m in got] == [100 + i for i in range(30)]
    assert [m["seq"] for m in prices(got, "AAPL")] == list(range(1, 21))
    assert [m["seq"] for m in prices(got, "MSFT")] == list(range(1, 11))


async def test_slow_reader_gets_latest_of_every_symbol_bounded_and_in_seq_order() -> None:
    capacity = 64
    rng = random.Random(1234)
    async with open_hub(outbox_size=capacity, pinned=SYMBOLS20) as hub:
        client = hub.connect()
        hub.subscribe(client, SYMBOLS20)
        outbox = client.outbox
        last_seq: dict[str, int] = {}
        published: dict[str, int] = {s: 0 for s in SYMBOLS20}
        last_price: dict[str, float] = {}
        total_received = 0
        pending_replies = 1  # the subscribe ack
        for round_no in range(30):
            # Bursts from tiny (stays ordered) to thousands (conflates).
            burst = rng.choice([5, 40, 63, 64, 65, 500, 3000])
            for i in range(burst):
                symbol = rng.choice(SYMBOLS20)
                price = round(rng.uniform(10, 1000), 2)
                hub.publish(trade(symbol, price))
                published[symbol] += 1
                last_price[symbol] = price
                if round_no % 5 == 0 and i % 100 == 0:
                    hub.send_control(client, control("pong"))
                    pending_replies += 1
                assert len(outbox) <= max(capacity, len(SYMBOLS20) + pending_replies)
            got = await drain(client)
            assert len(got) - len(prices(got)) == pending_replies  # no reply lost
            pending_replies = 0
            for msg in prices(got):
                symbol, seq = msg["symbol"], msg["seq"]
                assert seq > last_seq.get(symbol, 0), f"{symbol}: seq {seq} after {last_seq.get(symbol)}"
                last_seq[symbol] = seq
                total_received += 1
            # Whatever was dropped on the way, the reader now holds the newest of every symbol.
            for symbol in SYMBOLS20:
                assert last_seq.get(symbol, 0) == published[symbol], symbol
            if burst > capacity:
                # Conflated: one frame per symbol published in the burst, never a backlog.
                assert len(prices(got)) <= len(SYMBOLS20)
        final = {m["symbol"]: m for m in prices(got)}
        assert hub.stats.updates_in == sum(published.values())
    # The last burst's frames carry the latest price of each symbol it touched.
    for symbol, msg in final.items():
        assert msg["last_price"] == last_price[symbol]
        assert msg["seq"] == published[symbol]
    assert total_received < sum(published.values())  # conflation really happened
    assert client.outbox.conflated > 0


async def test_slow_reader_len_bound_with_many_symbols() -> None:
    # More symbols than capacity: the bound is the number of distinct symbols (+ replies).
    symbols = [f"X{i}" for i in range(50)]
    async with open_hub(outbox_size=8, pinned=symbols) as hub:
        client = hub.connect()
        hub.subscribe(client, symbols)
        for i in range(5000):
            hub.publish(trade(symbols[i % 50], 1 + i))
            assert len(client.outbox) <= max(8, 50 + 1)
        got = await drain(client)
    assert got[0] == {"type": "subscribed", "symbols": symbols}
    assert {m["symbol"] for m in prices(got)} == set(symbols)
    assert len(prices(got)) == 50
    assert all(m["seq"] == 100 for m in prices(got))


async def test_replies_are_never_conflated_away() -> None:
    async with open_hub(outbox_size=8) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])  # the ack is reply #1
        for i in range(300):
            hub.publish(trade("AAPL", 1 + i))
            if i in (10, 150, 290):
                hub.send_control(client, control("pong", n=i))
        got = await drain(client)
    assert client.close_code is None
    replies = [m for m in got if m["type"] != "price_update"]
    assert replies == [
        {"type": "subscribed", "symbols": ["AAPL"]},
        {"type": "pong", "n": 10},
        {"type": "pong", "n": 150},
        {"type": "pong", "n": 290},
    ]
    assert [m["seq"] for m in prices(got)] == [300]


async def test_too_many_unread_replies_close_the_client_1008() -> None:
    async with open_hub(outbox_size=4) as hub:
        client = hub.connect()
        for _ in range(4):
            hub.send_control(client, control("pong"))
        assert client.close_code is None
        # Reading resets the count of unread replies.
        assert len(await drain(client)) == 4
        for _ in range(4):
            hub.send_control(client, control("pong"))
        assert client.close_code is None
        hub.send_control(client, control("pong"))
        assert client.close_code == 1008
        assert client.cancel_scope.cancel_called
        # The replies that were accepted are still there, the rejected one is not.
        assert len(await drain(client)) == 4


# --------------------------------------------------------------------------- unsubscribe


@pytest.mark.parametrize("burst", [3, 500], ids=["ordered", "conflating"])
async def test_unsubscribe_discards_pending_then_acks(burst: int) -> None:
    async with open_hub(outbox_size=16, pinned=["AAPL"]) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL", "MSFT"])
        await drain(client)
        for i in range(burst):
            hub.publish(trade("AAPL", 100 + i))
            hub.publish(trade("MSFT", 200 + i))
        assert hub.unsubscribe(client, ["aapl".upper()]) == ["AAPL"]
        for i in range(burst):
            hub.publish(trade("AAPL", 300 + i))  # still wanted (pinned), no longer for this client
        hub.publish(trade("MSFT", 999))
        got = await drain(client)
        assert prices(got, "AAPL") == []
        ack = {"type": "unsubscribed", "symbols": ["AAPL"]}
        assert got.count(ack) == 1
        msft = prices(got, "MSFT")
        assert len(got) == len(msft) + 1
        assert msft[-1]["last_price"] == 999 and msft[-1]["seq"] == burst + 1
        if burst < 16:
            # Not conflating: exact order, the ack exactly where unsubscribe was called.
            assert got == msft[:burst] + [ack] + msft[burst:]
        else:
            # Conflating: one (the latest) MSFT frame; its slot may precede the ack.
            assert len(msft) == 1
        hub.publish(trade("AAPL", 1.0))
        hub.publish(trade("MSFT", 2.0))
        later = await drain(client)
        assert [m["symbol"] for m in later] == ["MSFT"]
        assert client.symbols == {"MSFT"}
        assert hub.subscriber_count("AAPL") == 0


async def test_unsubscribe_of_unknown_symbol_still_acks() -> None:
    async with open_hub() as hub:
        client = hub.connect()
        assert hub.unsubscribe(client, ["NOPE"]) == []
        assert await drain(client) == [{"type": "unsubscribed", "symbols": ["NOPE"]}]


# --------------------------------------------------------------------------- subscribe snapshot


async def test_subscribe_queues_ack_then_cached_snapshot() -> None:
    async with open_hub(pinned=["AAPL", "MSFT"]) as hub:
        hub.publish(trade("AAPL", 150.25, ts=1_700_000_000_123))
        hub.publish(quote("AAPL", 150.2, 150.3))
        client = hub.connect()
        assert hub.subscribe(client, ["AAPL", "MSFT", "AAPL"]) == ["AAPL", "MSFT"]
        got = await drain(client)
        assert got[0] == {"type": "subscribed", "symbols": ["AAPL", "MSFT"]}
        # AAPL has a cached price, MSFT has none: only AAPL's snapshot follows the ack.
        assert len(got) == 2
        snap = got[1]
        cached = hub.cache["AAPL"]
        assert snap["type"] == "price_update" and snap["symbol"] == "AAPL"
        assert snap["seq"] == cached.seq == 2
        assert snap["last_price"] == 150.25 and snap["bid_price"] == 150.2 and snap["ask_price"] == 150.3
        assert snap["data_type"] == "Q"
        # The next live update continues the sequence.
        hub.publish(trade("AAPL", 151.0))
        assert [m["seq"] for m in await drain(client)] == [3]
        # Subscribing again to a symbol it already has sends the ack but no second snapshot.
        assert hub.subscribe(client, ["AAPL"]) == []
        assert await drain(client) == [{"type": "subscribed", "symbols": ["AAPL"]}]


async def test_symbol_without_cache_gets_only_the_ack() -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.subscribe(client, ["IBM"])
        assert await drain(client) == [{"type": "subscribed", "symbols": ["IBM"]}]
        assert hub.snapshot("IBM") is None


async def test_per_client_symbol_cap_raises_and_changes_nothing() -> None:
    async with open_hub(max_symbols_per_client=3) as hub:
        client = hub.connect()
        hub.subscribe(client, ["A", "B"])
        await drain(client)
        with pytest.raises(SubscriptionError) as info:
            hub.subscribe(client, ["C", "D"])
        assert info.value.code == "symbol_limit"
        assert client.symbols == {"A", "B"}
        assert "C" not in hub.demand.wanted and "D" not in hub.demand.wanted
        assert hub.subscriber_count("C") == 0
        assert len(client.outbox) == 0  # no ack queued
        # Exactly at the cap is fine; repeats of held symbols do not count.
        assert hub.subscribe(client, ["A", "C"]) == ["C"]
        assert client.symbols == {"A", "B", "C"}
        with pytest.raises(SubscriptionError):
            hub.subscribe(client, ["Z"])


# --------------------------------------------------------------------------- cache merging


async def test_trade_then_quote_merge_into_one_state() -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await drain(client)
        hub.publish(trade("AAPL", 150.0, size=10, ts=1000))
        hub.publish(quote("AAPL", 149.9, 150.1, ts=2000))
        got = await drain(client)
    first, second = got
    assert first["data_type"] == "T" and first["last_price"] == 150.0 and first["bid_price"] is None
    assert second["data_type"] == "Q" and second["timestamp"] == 2000
    assert second["last_price"] == 150.0 and second["last_size"] == 10
    assert (second["bid_price"], second["bid_size"], second["ask_price"], second["ask_size"]) == (
        149.9,
        100,
        150.1,
        200,
    )
    state = hub.cache["AAPL"]
    assert (state.last_price, state.bid_price, state.ask_price) == (150.0, 149.9, 150.1)


async def test_one_sided_quote_keeps_other_side() -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        hub.publish(quote("AAPL", 10.0, 10.2))
        hub.publish(Update("AAPL", "Q", 1, bid_price=10.1, bid_size=5))
        state = hub.cache["AAPL"]
        assert (state.bid_price, state.bid_size, state.ask_price, state.ask_size) == (10.1, 5, 10.2, 200)
        hub.publish(Update("AAPL", "Q", 2, ask_price=10.3, ask_size=7))
        assert (state.bid_price, state.bid_size, state.ask_price, state.ask_size) == (10.1, 5, 10.3, 7)


async def test_break_of_an_unknown_trade_is_delivered_and_changes_no_price() -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await drain(client)
        hub.publish(trade("AAPL", 150.0, size=10, ts=1000))
        hub.publish(Update("AAPL", "B", 1500, last_price=149.0, last_size=7))  # an old recording: no amend
        hub.publish(quote("AAPL", 150.1, 150.2, ts=2000))
        got = await drain(client)
        brk = got[1]
        assert brk["data_type"] == "B" and brk["timestamp"] == 1500
        assert brk["amends"]["action"] == "break" and brk["amends"]["matched"] == "unknown"
        assert (brk["amends"]["price"], brk["amends"]["size"]) == (149.0, 7)
        assert brk["last_price"] == 150.0 and brk["last_size"] == 10  # the state: unchanged
        assert [m["seq"] for m in got] == [1, 2, 3]
        assert "amends" not in got[2] and got[2]["last_price"] == 150.0 and got[2]["last_size"] == 10
        state = hub.cache["AAPL"]
        assert state.last_price == 150.0 and state.last_size == 10 and state.seq == 3
        # A new subscriber's snapshot is the state (no amends).
        other = hub.connect()
        hub.subscribe(other, ["AAPL"])
        snap = (await drain(other))[1]
        assert snap["last_price"] == 150.0 and snap["seq"] == 3 and "amends" not in snap


async def test_seq_increases_by_one_per_update_per_symbol() -> None:
    async with open_hub(pinned=["A", "B"]) as hub:
        kinds = [trade("A", 1), quote("B", 1, 2), Update("A", "B", 1, last_price=1), quote("A", 1, 2), trade("B", 3)]
        for u in kinds:
            hub.publish(u)
        assert hub.cache["A"].seq == 3
        assert hub.cache["B"].seq == 2


# --------------------------------------------------------------------------- demand and eviction


async def test_updates_for_unwanted_symbols_are_dropped_and_not_cached() -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await drain(client)
        hub.publish(trade("TSLA", 1.0))
        hub.publish(trade("AAPL", 2.0))
        assert hub.stats.dropped == 1
        assert hub.stats.updates_in == 2
        assert hub.stats.messages_out == 1
        assert "TSLA" not in hub.cache
        assert hub.snapshot("TSLA") is None
        assert [m["symbol"] for m in await drain(client)] == ["AAPL"]


async def test_cache_evicted_when_demand_ends() -> None:
    async with open_hub() as hub:
        a, b = hub.connect(), hub.connect()
        hub.subscribe(a, ["AAPL"])
        hub.subscribe(b, ["AAPL"])
        hub.publish(trade("AAPL", 1.0))
        assert hub.snapshot("AAPL") is not None
        hub.unsubscribe(a, ["AAPL"])
        assert "AAPL" in hub.cache  # b still wants it
        hub.disconnect(b)
        assert "AAPL" not in hub.cache
        assert "AAPL" not in hub.demand.wanted
        hub.publish(trade("AAPL", 2.0))
        assert "AAPL" not in hub.cache
        assert hub.stats.dropped >= 1


async def test_unpin_evicts_cache() -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        hub.publish(trade("AAPL", 1.0))
        assert hub.unpin(["AAPL", "MSFT"]) == ["AAPL"]
        assert "AAPL" not in hub.cache


async def test_disconnect_counts_pending_as_dropped() -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        for i in range(3):
            hub.publish(trade("AAPL", i + 1))
        hub.disconnect(client)
        assert hub.stats.dropped == 4  # the ack and three updates never sent
        assert client.id not in hub.clients
        hub.disconnect(client)  # idempotent
        assert hub.stats.dropped == 4


# --------------------------------------------------------------------------- callbacks


async def test_sync_callback_sees_every_update_until_unregistered() -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        seen: list[Update] = []
        unregister = hub.add_callback(seen.append)
        updates = [trade("AAPL", 1.0), quote("AAPL", 1, 2), trade("TSLA", 3.0)]
        for u in updates:
            hub.publish(u)
        assert seen == updates[:2]  # an unwanted symbol's update is dropped before the callbacks
        unregister()
        hub.publish(trade("AAPL", 4.0))
        assert len(seen) == 2
        unregister()  # idempotent


async def test_raising_sync_callback_is_logged_counted_and_harmless(caplog: pytest.LogCaptureFixture) -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await drain(client)
        seen: list[Update] = []

        def broken(update: Update) -> None:
            raise RuntimeError("boom")

        hub.add_callback(broken)
        hub.add_callback(seen.append)
        with caplog.at_level(logging.ERROR, logger="trio_relay.hub"):
            for i in range(3):
                hub.publish(trade("AAPL", 1.0 + i))
        assert hub.stats.callback_errors == 3
        assert len(seen) == 3
        assert [m["last_price"] for m in await drain(client)] == [1.0, 2.0, 3.0]
        records = [r for r in caplog.records if r.name == "trio_relay.hub" and r.exc_info]
        assert len(records) == 3
        assert isinstance(records[0].exc_info[1], RuntimeError)


async def test_async_callback_runs_in_its_own_task() -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        seen: list[Update] = []
        tasks: set[trio.lowlevel.Task] = set()
        done = trio.Event()

        async def on_update(update: Update) -> None:
            tasks.add(trio.lowlevel.current_task())
            await trio.lowlevel.checkpoint()
            seen.append(update)
            if len(seen) == 5:
                done.set()

        unregister = hub.add_callback(on_update)
        updates = [trade("AAPL", float(i + 1)) for i in range(5)]
        for u in updates:
            hub.publish(u)
        assert seen == []  # publish never runs it inline
        with trio.fail_after(1):
            await done.wait()
        assert seen == updates
        assert len(tasks) == 1 and trio.lowlevel.current_task() not in tasks
        unregister()
        hub.publish(trade("AAPL", 99.0))
        await trio.testing.wait_all_tasks_blocked()
        assert len(seen) == 5


async def test_raising_async_callback_is_counted_and_keeps_running() -> None:
    async with open_hub(pinned=["AAPL"]) as hub:
        calls: list[float] = []
        third = trio.Event()

        async def flaky(update: Update) -> None:
            calls.append(update.last_price or 0)
            if len(calls) == 3:
                third.set()
            if len(calls) == 1:
                raise ValueError("first one fails")

        hub.add_callback(flaky)
        for i in range(3):
            hub.publish(trade("AAPL", float(i)))
        with trio.fail_after(1):
            await third.wait()
        assert hub.stats.callback_errors == 1
        assert calls == [0.0, 1.0, 2.0]


async def test_slow_async_callback_never_blocks_publish() -> None:
    queue_size = 4
    async with open_hub(pinned=["AAPL"], outbox_size=256) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await drain(client)
        never = trio.Event()
        entered = trio.Event()

        async def stuck(update: Update) -> None:
            entered.set()
            await never.wait()

        hub.add_callback(stuck, queue_size=queue_size)
        hub.publish(trade("AAPL", 0.0))
        with trio.fail_after(1):
            await entered.wait()  # it holds update 0 and will never finish it
        n = queue_size + 10
        with trio.fail_after(1):  # publish is synchronous; this guards against a hang anyway
            for i in range(1, n + 1):
                hub.publish(trade("AAPL", float(i)))
        assert hub.stats.callback_dropped == n - queue_size
        got = await drain(client)
        assert [m["last_price"] for m in got] == [float(i) for i in range(n + 1)]


# --------------------------------------------------------------------------- stall reaper


async def test_stuck_sender_is_closed_after_stall_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with open_hub(pinned=["AAPL"], stall_timeout=10.0) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await client.outbox.get()  # the sender took the ack and is now "sending" forever
        hub.publish(trade("AAPL", 1.0))
        start = trio.current_time()
        await trio.sleep(9.5)  # virtual time (MockClock)
        assert client.close_code is None
        await trio.sleep(2.0)  # virtual time (MockClock)
        assert client.close_code == 4008
        assert hub.stats.slow_clients_closed == 1
        assert client.cancel_scope.cancel_called
        await trio.sleep(100)  # virtual time (MockClock)
        assert hub.stats.slow_clients_closed == 1  # counted once
        assert trio.current_time() - start >= 111


async def test_progressing_or_idle_clients_are_not_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with open_hub(pinned=["AAPL"], stall_timeout=10.0) as hub:
        busy = hub.connect()
        idle = hub.connect()
        hub.subscribe(busy, ["AAPL"])
        hub.subscribe(idle, ["MSFT"])

        async def idle_sender() -> None:
            while True:
                items = await idle.outbox.get()  # MSFT never trades: waits in get() ("idle")
                idle.outbox.progressed(len(items))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(idle_sender)
            await busy.outbox.get()
            for i in range(60):
                # Each send takes 4 s (slow but moving): never 10 s without progress.
                hub.publish(trade("AAPL", float(i)))
                await trio.sleep(4)  # virtual time (MockClock)
                busy.outbox.progressed()
                await busy.outbox.get()
            nursery.cancel_scope.cancel()
        assert busy.close_code is None
        assert idle.close_code is None
        assert hub.stats.slow_clients_closed == 0


async def test_progress_within_one_batch_keeps_client_alive(autojump_clock: trio.testing.MockClock) -> None:
    # A sender working through one big batch calls only progressed() (no get()) between frames.
    async with open_hub(pinned=["AAPL"], stall_timeout=10.0, outbox_size=256) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        for i in range(30):
            hub.publish(trade("AAPL", float(i)))
        batch = await client.outbox.get()
        assert len(batch) == 31
        hub.publish(trade("AAPL", 99.0))  # more is pending meanwhile
        for _ in batch:
            await trio.sleep(6)  # virtual time (MockClock)
            client.outbox.progressed()
        assert client.close_code is None
        assert client.outbox.sent == 31
        # Then it stops making progress altogether.
        await trio.sleep(12)  # virtual time (MockClock)
        assert client.close_code == 4008


async def test_client_that_never_started_reading_is_idle(autojump_clock: trio.testing.MockClock) -> None:
    # Outbox.idle starts True: a handler that has not yet run its sender is not "stalled".
    async with open_hub(pinned=["AAPL"], stall_timeout=5.0) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await trio.sleep(60)  # virtual time (MockClock)
        assert client.close_code is None


# --------------------------------------------------------------------------- Demand


async def test_demand_refcounts_across_two_clients() -> None:
    demand = Demand(linger=0)
    removed: list[str] = []
    demand.on_removed = removed.append
    demand.acquire(["AAPL", "MSFT"])  # client 1
    demand.acquire(["AAPL"])  # client 2
    assert demand.refcount("AAPL") == 2 and demand.wanted == {"AAPL", "MSFT"}
    demand.release(["AAPL"])
    assert demand.refcount("AAPL") == 1 and "AAPL" in demand.wanted
    demand.release(["AAPL", "MSFT"])
    assert demand.wanted == set()
    assert sorted(removed) == ["AAPL", "MSFT"]
    demand.release(["AAPL"])  # an extra release never goes negative
    assert demand.refcount("AAPL") == 0
    assert removed.count("AAPL") == 1


async def test_demand_refcounts_through_the_hub() -> None:
    async with open_hub() as hub:
        a, b = hub.connect(), hub.connect()
        hub.subscribe(a, ["AAPL"])
        hub.subscribe(b, ["AAPL", "MSFT"])
        assert hub.demand.refcount("AAPL") == 2
        assert hub.subscriber_count("AAPL") == 2
        hub.disconnect(a)
        assert hub.demand.refcount("AAPL") == 1 and "AAPL" in hub.demand.wanted
        hub.unsubscribe(b, ["AAPL"])
        assert hub.demand.wanted == {"MSFT"}


async def test_demand_pin_and_unpin() -> None:
    demand = Demand(linger=0, pinned=["SPY"])
    assert demand.wanted == {"SPY"} and demand.pinned == frozenset({"SPY"})
    demand.pin(["QQQ"])
    demand.acquire(["QQQ"])
    assert demand.wanted == {"SPY", "QQQ"}
    assert demand.unpin(["QQQ", "NOPE"]) == ["QQQ"]
    assert "QQQ" in demand.wanted  # still held by a client
    demand.release(["QQQ"])
    assert "QQQ" not in demand.wanted
    demand.acquire(["SPY"])
    demand.release(["SPY"])
    assert "SPY" in demand.wanted  # pinned outlives its subscribers
    assert demand.unpin(["SPY"]) == ["SPY"]
    assert demand.wanted == set() and demand.pinned == frozenset()


async def test_demand_changed_event_fires_on_change() -> None:
    demand = Demand(linger=0)
    event = demand.changed_event()
    demand.acquire(["AAPL"])
    assert event.is_set()
    event = demand.changed_event()
    demand.acquire(["AAPL"])  # no change to `wanted`
    assert not event.is_set()
    demand.release(["AAPL"])
    assert not event.is_set()  # still one reference left
    demand.release(["AAPL"])
    assert event.is_set()


async def test_demand_linger_until_expire(autojump_clock: trio.testing.MockClock) -> None:
    demand = Demand(linger=5.0)
    removed: list[str] = []
    demand.on_removed = removed.append
    demand.acquire(["AAPL"])
    start = trio.current_time()
    demand.release(["AAPL"])
    assert "AAPL" in demand.wanted
    assert demand.next_expiry() == start + 5.0
    await trio.sleep(4.0)  # virtual time (MockClock)
    demand.expire()
    assert "AAPL" in demand.wanted and removed == []
    await trio.sleep(1.0)  # virtual time (MockClock)
    demand.expire()
    assert "AAPL" not in demand.wanted and removed == ["AAPL"]
    assert demand.next_expiry() == float("inf")


async def test_demand_reacquire_during_linger_cancels_removal(autojump_clock: trio.testing.MockClock) -> None:
    demand = Demand(linger=5.0)
    demand.acquire(["AAPL"])
    demand.release(["AAPL"])
    await trio.sleep(3.0)  # virtual time (MockClock)
    demand.acquire(["AAPL"])
    assert demand.next_expiry() == float("inf")
    await trio.sleep(10.0)  # virtual time (MockClock)
    demand.expire()
    assert "AAPL" in demand.wanted and demand.refcount("AAPL") == 1


async def test_hub_keeps_cache_while_lingering(autojump_clock: trio.testing.MockClock) -> None:
    async with open_hub(linger=5.0) as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        hub.publish(trade("AAPL", 1.0))
        hub.unsubscribe(client, ["AAPL"])
        hub.publish(trade("AAPL", 2.0))  # still wanted while it lingers: cached
        assert hub.cache["AAPL"].last_price == 2.0
        await trio.sleep(5.0)  # virtual time (MockClock)
        hub.demand.expire()
        assert "AAPL" not in hub.cache


async def test_stopped_outbox_gives_nothing_more_even_with_frames_pending() -> None:
    outbox = Outbox(8)
    outbox.put("A", b"a1")
    outbox.stop()
    assert await outbox.get() == []  # the sender ends after its current write, pending or not
    waiting = Outbox(8)
    got: list[list[bytes]] = []
    async with trio.open_nursery() as nursery:

        async def sender() -> None:
            got.append(await waiting.get())

        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        waiting.stop()
    assert got == [[]]


# --------------------------------------------------------------------------- numbered updates


def numbered(symbol: str, price: float, seq: int, epoch: str = "fleet-1") -> Update:
    return Update(symbol, "T", 1_700_000_000_000 + seq, last_price=price, last_size=1, seq=seq, epoch=epoch)


@pytest.mark.parametrize("coalesce_above", [0, 1])
async def test_a_numbered_update_already_passed_on_never_reaches_a_client_twice(coalesce_above: int) -> None:
    """An upstream relay's or the fleet's numbering: a re-read state (same seq) or an older one is dropped."""
    async with open_hub() as hub:
        hub.coalesce_above = coalesce_above
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await drain(client)  # the ack
        send, receive = trio.open_memory_channel[Any](10)
        # All queued before the hub runs: one consume turn (coalesced when coalesce_above = 1).
        send.send_nowait([numbered("AAPL", 1.0, 1), numbered("AAPL", 2.0, 2)])
        send.send_nowait([numbered("AAPL", 2.0, 2), numbered("AAPL", 1.0, 1)])  # again, and older
        send.send_nowait([numbered("AAPL", 3.0, 3)])
        send.close()
        await hub.consume(receive)
        got = [(m["seq"], m["last_price"]) for m in prices(await drain(client))]
    # One frame per update passed on; a coalesced turn routes the newest state once.
    assert got == ([(3, 3.0)] if coalesce_above else [(1, 1.0), (2, 2.0), (3, 3.0)])
    assert hub.stats.duplicates == 2


async def test_a_new_epoch_numbers_afresh() -> None:
    async with open_hub() as hub:
        client = hub.connect()
        hub.subscribe(client, ["AAPL"])
        await drain(client)
        hub.publish(numbered("AAPL", 1.0, 5))
        hub.publish(numbered("AAPL", 9.0, 1, epoch="fleet-2"))  # the fleet's sequence space changed
        got = [(m["seq"], m["last_price"], m["epoch"]) for m in prices(await drain(client))]
    assert got == [(5, 1.0, "fleet-1"), (1, 9.0, "fleet-2")]
    assert hub.stats.duplicates == 0
