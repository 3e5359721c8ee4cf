"""trio_relay.client against the real daemon (real sockets, the sim provider), and its backoff in virtual time."""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from conftest import make_config

from trio_relay import client
from trio_relay.client import PriceUpdate, RelayError, Status, TokenExpired
from trio_relay.daemon import Relay, run_relay

SECRET = "client-test-secret-0123456789abcdef"  # 35 chars


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Ceiling(random.Random):
    """A jitter source that always picks the top of the range: the backoff's worst case, exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


def make_token(lifetime: float = 3600.0, sub: str = "alice") -> str:
    # A float exp: the relay closes at that instant (PyJWT checks whole seconds, hence leeway 1).
    return jwt.encode({"sub": sub, "exp": time.time() + lifetime}, SECRET, algorithm="HS256")


def auth_on(**auth: Any) -> dict[str, dict[str, Any]]:
    return {"auth": {"enabled": True, "secret": SECRET, "leeway": 1, **auth}}


def the_client(relay: Relay) -> Any:
    """The relay's only connected client (as the hub sees it)."""
    [only] = relay.hub.clients.values()
    return only


async def wait_until(check: Callable[[], bool]) -> None:
    """Wait until ``check()`` holds, re-checked whenever every task is blocked (no timer)."""
    while not check():
        await trio.testing.wait_all_tasks_blocked()


def per_symbol(updates: list[PriceUpdate]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for u in updates:
        out.setdefault(u.symbol, []).append(u.seq)
    return out


# --------------------------------------------------------------------------- updates, subscriptions


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "per-message"])
async def test_typed_updates_arrive_for_the_subscribed_symbols(start_relay, batch):
    relay = await start_relay()
    events: list[Any] = []
    with trio.fail_after(5):
        async with client.connect(relay.ws_url, ["aapl", "MSFT"], batch=batch) as feed:
            async for event in feed:
                events.append(event)
                if {"AAPL", "MSFT"} <= set(feed.latest):
                    break
            assert feed.connected and feed.upstream_state == "up" and feed.symbols == ["AAPL", "MSFT"]
            assert the_client(relay).batch is batch
    assert events[0] == Status(scope="client", state="connected")
    updates = [e for e in events if isinstance(e, PriceUpdate)]
    assert {u.symbol for u in updates} == {"AAPL", "MSFT"}
    for u in updates:
        assert u.provider == "sim" and u.epoch == relay.hub.epoch and u.seq >= 1 and u.data_type in ("T", "Q")
        assert isinstance(u.timestamp, int) and u.cached_at.endswith("Z")
        assert u.last_price is not None or (u.bid_price is not None and u.ask_price is not None)
    assert feed.latest["AAPL"] == [u for u in updates if u.symbol == "AAPL"][-1]


async def test_subscribe_and_unsubscribe_while_running(start_relay):
    relay = await start_relay()
    seen_after_unsubscribe: list[PriceUpdate] = []
    with trio.fail_after(5):
        async with client.connect(relay.ws_url, ["AAPL"]) as feed:
            async for event in feed:
                if isinstance(event, PriceUpdate) and event.symbol == "AAPL":
                    break
            await feed.subscribe(["msft", "AAPL"])  # AAPL again: nothing new
            async for event in feed:
                if isinstance(event, PriceUpdate) and event.symbol == "MSFT":
                    break
            await feed.unsubscribe(["AAPL"])
            assert feed.symbols == ["MSFT"] and "AAPL" not in feed.latest
            async for event in feed:
                if isinstance(event, PriceUpdate):
                    seen_after_unsubscribe.append(event)
                    if len(seen_after_unsubscribe) == 5:
                        break
            await wait_until(lambda: the_client(relay).symbols == {"MSFT"})
    assert {u.symbol for u in seen_after_unsubscribe} == {"MSFT"}


# --------------------------------------------------------------------------- reconnect and resume


async def test_a_dropped_client_reconnects_and_resumes_without_gap_or_repeat(start_relay):
    # Pinned: the relay keeps their history while this, their only client, is away.
    relay = await start_relay(sim={"rate": 200.0}, upstream={"pinned": ["AAPL", "MSFT"]})
    updates: list[PriceUpdate] = []
    resumed: list[PriceUpdate] = []  # after the second "connected"
    statuses: list[Status] = []
    with trio.fail_after(5):
        # Ceiling(): the reconnect waits exactly 0.1 s, so ~20 updates per symbol are missed and replayed.
        async with client.connect(relay.ws_url, ["AAPL", "MSFT"], backoff_initial=0.1, rng=Ceiling()) as feed:
            async for event in feed:
                if isinstance(event, Status):
                    statuses.append(event)
                    continue
                updates.append(event)
                if len(updates) == 10:
                    the_client(relay).close(4008, "slow")
                if len(statuses) == 3:
                    resumed.append(event)
                    if len(resumed) >= 60 and len(per_symbol(resumed)) == 2:
                        break
    client_states = [(s.state, s.reason, s.retry_after_ms) for s in statuses if s.scope == "client"]
    assert client_states == [
        ("connected", None, None),
        ("disconnected", "closed 4008: slow", 100),
        ("connected", None, None),
    ]
    assert {u.epoch for u in updates} == {relay.hub.epoch}
    for symbol, seqs in per_symbol(updates).items():
        # Nothing missed, nothing twice: every seq from the first snapshot on, in order.
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), symbol


async def test_a_symbol_the_relay_forgot_is_a_gap_and_its_restarted_numbering_is_accepted(start_relay):
    """Nobody else wants AAPL and the linger is 0: the relay drops its cache and history when this
    client goes (and today numbers it from 1 again, in the same epoch). The resume says so
    (``recovered: false``); the feed flags the gap and yields what follows, whatever its seq."""
    relay = await start_relay(sim={"rate": 200.0})
    before: list[PriceUpdate] = []
    after: list[PriceUpdate] = []
    gaps: list[Status] = []
    with trio.fail_after(5):
        async with client.connect(relay.ws_url, ["AAPL"], backoff_initial=0.05, rng=Ceiling()) as feed:
            async for event in feed:
                if isinstance(event, Status) and event.state == "gap":
                    gaps.append(event)
                elif isinstance(event, PriceUpdate) and not gaps:
                    before.append(event)
                    if event.seq >= 20 and len(before) >= 2 and feed.reconnects == 0 and relay.hub.clients:
                        the_client(relay).close(4008, "slow")
                elif isinstance(event, PriceUpdate):
                    after.append(event)
                    if len(after) == 5:
                        break
    assert [g.symbols for g in gaps] == [["AAPL"]]
    assert {u.epoch for u in before + after} == {relay.hub.epoch}
    assert before[-1].seq >= 20
    assert [u.seq for u in after] == list(range(after[0].seq, after[0].seq + 5))  # none dropped, in order


async def test_a_relay_restart_on_the_same_port_is_a_gap_then_updates_resume(start_relay, nursery):
    old_gone = trio.Event()

    async def run_old(task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED) -> None:
        await run_relay(make_config(upstream={"pinned": ["AAPL"]}), task_status=task_status)
        old_gone.set()

    old: Relay = await nursery.start(run_old)
    events: list[Any] = []
    with trio.fail_after(8):
        async with client.connect(old.ws_url, ["AAPL"], backoff_initial=0.05, backoff_max=0.2) as feed:
            async for event in feed:
                events.append(event)
                if isinstance(event, PriceUpdate):
                    break
            old.shutdown()
            await old_gone.wait()  # its port is free once run_relay has returned
            new = await start_relay(server={"port": old.port}, upstream={"pinned": ["AAPL"]})
            async for event in feed:
                events.append(event)
                if isinstance(event, PriceUpdate) and event.epoch == new.hub.epoch:
                    break
    assert new.hub.epoch != old.hub.epoch
    statuses = [(e.scope, e.state) for e in events if isinstance(e, Status)]
    # The relay's notice, the drop, maybe refused attempts while nothing listens, the new relay, the gap.
    assert statuses[:3] == [("client", "connected"), ("relay", "closing"), ("client", "disconnected")]
    assert statuses[-2:] == [("client", "connected"), ("client", "gap")]
    assert set(statuses[3:-2]) <= {("client", "disconnected")}
    drop = next(e for e in events if isinstance(e, Status) and e.state == "disconnected")
    assert drop.reason is not None and drop.reason.startswith("closed 1001")
    assert drop.retry_after_ms is not None and drop.retry_after_ms >= 1000  # the relay's hint, plus jitter
    gap = next(e for e in events if isinstance(e, Status) and e.state == "gap")
    assert gap.symbols == ["AAPL"] and gap.epoch == new.hub.epoch
    assert events[-1].epoch == new.hub.epoch and feed.reconnects == 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("when", ["at start", "at runtime"])
async def test_an_error_answering_a_subscribe_is_raised_from_the_iterator(start_relay, when):
    relay = await start_relay()
    initial = ["AAPL", "BAD SYMBOL!"] if when == "at start" else ["AAPL"]
    with trio.fail_after(5):
        with pytest.raises(RelayError) as info:  # not an ExceptionGroup: the block unwraps it
            async with client.connect(relay.ws_url, initial) as feed:
                async for event in feed:
                    if isinstance(event, PriceUpdate):
                        await feed.subscribe(["BAD SYMBOL!"])
    assert info.value.code == "invalid_symbols" and info.value.action == "subscribe"
    assert "BAD SYMBOL!" in info.value.message


async def test_a_rate_limited_request_is_sent_again_later(start_relay, caplog):
    caplog.set_level(logging.DEBUG, logger="trio_relay.client")
    relay = await start_relay(limits={"subscribes_burst": 1, "subscribes_per_second": 20.0})
    with trio.fail_after(5):
        async with client.connect(relay.ws_url, ["AAPL"]) as feed:
            async for event in feed:
                if isinstance(event, PriceUpdate):
                    break  # connected, and the burst is spent
            for symbol in ("MSFT", "IBM", "TSLA"):
                await feed.subscribe([symbol])  # each one over the limit at first
            async for _ in feed:
                if set(feed.latest) == {"AAPL", "MSFT", "IBM", "TSLA"}:
                    break
    assert any("rate_limited" in r.getMessage() for r in caplog.records)
    assert feed.reconnects == 0


@pytest.mark.parametrize("symbols", [[], ["AAPL"]], ids=["idle", "subscribing"])
async def test_no_token_ends_the_feed_not_a_retry_loop(start_relay, symbols):
    relay = await start_relay(**auth_on(auth_timeout=0.2))
    with trio.fail_after(5):
        with pytest.raises(RelayError) as info:
            async with client.connect(relay.ws_url, symbols) as feed:
                async for _ in feed:
                    pass
    assert info.value.code == "unauthenticated" and feed.reconnects == 0
    if symbols:  # the error answering the subscribe
        assert info.value.action == "subscribe" and info.value.close_code is None
    else:  # the relay's own timeout: an error frame, then a policy close (1008)
        assert info.value.close_code == 1008


# --------------------------------------------------------------------------- auth


async def test_a_token_callable_authenticates_and_refreshes_before_expiry(start_relay):
    relay = await start_relay(**auth_on())
    issued: list[float] = []

    async def fresh_token() -> str:
        issued.append(trio.current_time())
        return make_token(lifetime=0.4)  # refreshed halfway, every ~0.2 s

    with trio.fail_after(5):
        async with client.connect(relay.ws_url, ["AAPL"], token=fresh_token) as feed:
            async for event in feed:
                assert not (isinstance(event, Status) and event.scope == "client" and event.state != "connected")
                if isinstance(event, PriceUpdate) and trio.current_time() > issued[0] + 0.5:
                    break  # an update the first token would no longer have been good for
            assert the_client(relay).user == "alice"
    assert feed.reconnects == 0 and len(issued) >= 3


async def test_a_token_that_expires_gets_4001_then_a_fresh_token_and_a_resume(start_relay):
    relay = await start_relay(**auth_on(), upstream={"pinned": ["AAPL"]})
    calls = 0

    async def token_source() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            return make_token(lifetime=0.3)
        if calls == 2:  # the refresh never comes through: the relay closes with 4001
            await trio.sleep_forever()
        return make_token()

    states: list[tuple[str, str | None]] = []
    with trio.fail_after(5):
        async with client.connect(relay.ws_url, ["AAPL"], token=token_source, backoff_initial=0.01) as feed:
            async for event in feed:
                if isinstance(event, Status) and event.scope == "client":
                    states.append((event.state, event.reason))
                elif isinstance(event, PriceUpdate) and len(states) == 3:
                    break  # an update on the new connection
    assert states == [("connected", None), ("disconnected", "closed 4001: token expired"), ("connected", None)]
    assert calls == 3


async def test_a_fixed_token_that_expires_raises_token_expired(start_relay):
    relay = await start_relay(**auth_on())
    with trio.fail_after(5):
        with pytest.raises(TokenExpired) as info:
            async with client.connect(relay.ws_url, ["AAPL"], token=make_token(lifetime=0.3)) as feed:
                async for _ in feed:
                    pass
    assert info.value.close_code == 4001 and info.value.code == "token_expired"


async def test_a_bad_token_is_raised_at_once(start_relay):
    relay = await start_relay(**auth_on())
    forged = jwt.encode({"sub": "mallory", "exp": time.time() + 60}, "x" * 40, algorithm="HS256")
    with trio.fail_after(5):
        with pytest.raises(RelayError) as info:
            async with client.connect(relay.ws_url, ["AAPL"], token=forged) as feed:
                async for _ in feed:
                    pass
    assert info.value.code == "unauthorized" and info.value.action == "auth"


# --------------------------------------------------------------------------- backoff, virtual time


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_reconnect_attempts_follow_the_capped_full_jitter_schedule(autojump_clock):
    url = f"ws://127.0.0.1:{closed_port()}/api/v2/realtime/ws/prices"
    attempts: list[float] = []
    waits: list[int | None] = []
    async with client.connect(url, ["AAPL"], backoff_initial=0.5, backoff_max=4.0, rng=random.Random(2024)) as feed:
        start = trio.current_time()
        async for event in feed:
            assert isinstance(event, Status) and event.state == "disconnected"
            assert event.reason is not None and event.reason.startswith("connect failed")
            attempts.append(trio.current_time() - start)
            waits.append(event.retry_after_ms)
            if len(attempts) == 10:
                break
        assert not feed.connected
    expected = random.Random(2024)
    delays = [expected.uniform(0, min(4.0, 0.5 * 2**n)) for n in range(10)]
    # Attempt n+1 starts when attempt n's wait is over: 0, d0, d0+d1...
    assert attempts == pytest.approx([sum(delays[:n]) for n in range(10)], abs=1e-9)
    assert waits == [int(-(-d * 1000 // 1)) for d in delays]
    assert max(delays[3:]) <= 4.0 < sum(delays)


async def test_backoff_grows_while_drops_come_quick_and_resets_after_a_connection_that_lasted(start_relay):
    relay = await start_relay(sim={"rate": 200.0})
    waits: list[int | None] = []
    connected_at = 0.0
    with trio.fail_after(5):
        async with client.connect(
            relay.ws_url, ["AAPL"], backoff_initial=0.01, backoff_reset_after=0.3, rng=Ceiling()
        ) as feed:
            async for event in feed:
                if isinstance(event, Status) and event.state == "connected":
                    connected_at = trio.current_time()
                    if len(waits) < 3:  # three drops right after connecting
                        await wait_until(lambda: len(relay.hub.clients) == 1)
                        the_client(relay).close(4008, "slow")
                elif isinstance(event, Status) and event.state == "disconnected":
                    waits.append(event.retry_after_ms)
                    if len(waits) == 4:
                        break
                elif (
                    isinstance(event, PriceUpdate) and trio.current_time() - connected_at >= 0.35 and relay.hub.clients
                ):
                    the_client(relay).close(4008, "slow")  # then one after a connection that lasted
    assert waits == [10, 20, 40, 10]
