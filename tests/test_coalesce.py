"""A backlog found by the hub is routed as each symbol's latest state, once; nothing is lost from the cache."""

from __future__ import annotations

import json

import trio

from trio_relay.config import ClientsConfig
from trio_relay.hub import Demand, Hub, Stats
from trio_relay.model import Update, ws_payload

SYMBOLS = ["A", "B", "C", "D", "E"]


def _updates(n: int) -> list[Update]:
    out = []
    for i in range(n):
        s = SYMBOLS[i % len(SYMBOLS)]
        if i % 2:
            out.append(Update(s, "T", 1_000 + i, last_price=100.0 + i, last_size=i))
        else:
            out.append(Update(s, "Q", 1_000 + i, bid_price=99.0 + i, bid_size=1, ask_price=101.0 + i, ask_size=1))
    return out


async def _run(coalesce_above: int, batches: list[list[Update]]) -> tuple[Hub, list[dict[str, object]], list[Update]]:
    seen: list[Update] = []
    async with Hub.open(
        ClientsConfig(outbox_size=10_000), Demand(0, SYMBOLS), Stats(), coalesce_above=coalesce_above
    ) as hub:
        hub.add_callback(seen.append)
        client = hub.connect()
        hub.subscribe(client, SYMBOLS)
        await client.outbox.get()  # the ack
        send, receive = trio.open_memory_channel[list[Update]](len(batches))
        for batch in batches:
            send.send_nowait(batch)  # all queued before the hub runs: one backlog
        send.close()
        await hub.consume(receive)
        got = [json.loads(ws_payload(f)) for f in await client.outbox.get()]
    return hub, got, seen


async def test_backlog_is_routed_once_per_symbol_with_the_merged_latest_state():
    updates = _updates(100)
    hub, got, seen = await _run(10, [updates[:40], updates[40:]])
    assert [m["symbol"] for m in got] == SYMBOLS  # one message per symbol
    for m in got:
        mine = [u for u in updates if u.symbol == m["symbol"]]
        last_trade = [u for u in mine if u.kind == "T"][-1]
        last_quote = [u for u in mine if u.kind == "Q"][-1]
        assert m["seq"] == len(mine) == hub.cache[m["symbol"]].seq
        assert m["last_price"] == last_trade.last_price and m["bid_price"] == last_quote.bid_price
        assert m["timestamp"] == mine[-1].timestamp
    assert hub.stats.coalesced == 95 and hub.stats.updates_in == 100
    assert seen == updates  # callbacks still see every update


async def test_below_the_threshold_every_update_is_routed():
    updates = _updates(20)
    hub, got, _ = await _run(1000, [updates])
    assert [m["seq"] for m in got if m["symbol"] == "A"] == [1, 2, 3, 4]
    assert len(got) == 20 and hub.stats.coalesced == 0


async def test_a_break_is_never_coalesced_away():
    updates = _updates(30)
    brk = Update("A", "B", 5_000, last_price=1.0, last_size=7)
    hub, got, _ = await _run(5, [updates[:15] + [brk] + updates[15:]])
    breaks = [m for m in got if m["data_type"] == "B"]
    assert len(breaks) == 1 and breaks[0]["amends"]["price"] == 1.0 and breaks[0]["amends"]["size"] == 7
    assert hub.cache["A"].last_price != 1.0  # the break did not become the last trade
