"""The upstream task in virtual time: backoff, resets, staleness, auth, re-subscribe, linger.

Every test runs under ``MockClock(autojump_threshold=0)`` against a real loopback peer (the fake
FMP server, or a plain TCP listener that refuses the upgrade or just closes), so hours of
reconnects pass in milliseconds and every delay is checked exactly: with
``rng=random.Random(SEED)`` the upstream's jitter is a known sequence, and a connect or a frame
over loopback takes no virtual time.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from conftest import FMP_KEY

from trio_relay.config import Config, load_config
from trio_relay.hub import Demand, Stats
from trio_relay.model import Update
from trio_relay.providers.fmp import FmpProvider
from trio_relay.testing.fake_fmp import MALFORMED_FRAMES, FakeFmpServer
from trio_relay.upstream import Upstream, UpstreamGaveUp, UpstreamState

SEED = 1234
BAD_KEY = "bad-key-7d41e09b3c58a2f6"  # long and unique, so a leak would be found by grep
EXACT = 1e-6  # virtual seconds: loopback I/O takes no virtual time, so delays match exactly
GUARD = 3600.0  # virtual seconds any one test may take


def make_config(url: str, *, api_key: str = FMP_KEY, **upstream: Any) -> Config:
    """An FMP config pointed at ``url``, with ``upstream`` settings overridden."""
    return load_config(
        environ={},
        overrides={
            "upstream": {"provider": "fmp", "unsubscribe_linger": 0.0, **upstream},
            "fmp": {"api_key": api_key, "url": url, "login_timeout": 1.0},
        },
        dotenv=None,
    )


def backoff_delays(n: int, initial: float, maximum: float, seed: int = SEED) -> list[float]:
    """The first ``n`` delays the upstream must draw: full jitter under a capped doubling ceiling."""
    rng = random.Random(seed)
    return [rng.uniform(0, min(maximum, initial * 2**i)) for i in range(n)]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


class Sink:
    """Drains the upstream → hub channel (the hub's place in these tests), noting what came."""

    def __init__(self) -> None:
        self.updates = 0
        self.symbols: set[str] = set()  # bounded by the symbols subscribed; a test may reset it

    async def drain(self, receive: trio.MemoryReceiveChannel[list[Update]]) -> None:
        async with receive:
            async for batch in receive:
                self.updates += len(batch)
                self.symbols.update(u.symbol for u in batch)


# A peer refusing the WebSocket upgrade: the attempt fails at once, in no virtual time.
REFUSE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class TcpPeer:
    """A plain TCP peer: accepts, optionally answers the upgrade request with ``reply``, closes.

    ``accepts`` holds the trio time of every accepted connection.
    """

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.url = ""
        self.accepts: list[float] = []
        self._changed = trio.Event()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepts.append(trio.current_time())
        self._changed.set()
        self._changed = trio.Event()
        async with stream:
            if self.reply:
                # Read the whole request first: closing with unread data would reset the
                # connection and could discard the reply before the client reads it.
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    request += chunk
                await stream.send_all(self.reply)

    async def wait_accepts(self, n: int) -> None:
        while len(self.accepts) < n:
            await self._changed.wait()


@asynccontextmanager
async def tcp_peer(reply: bytes = b"") -> AsyncIterator[TcpPeer]:
    peer = TcpPeer(reply)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), peer._handle, 0)
        peer.url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        yield peer
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def run_upstream(url: str, *, api_key: str = FMP_KEY, **upstream: Any) -> AsyncIterator[tuple[Upstream, Sink]]:
    """Run an :class:`Upstream` (seeded jitter) for the block; stop it cleanly at the end."""
    config = make_config(url, api_key=api_key, **upstream)
    cfg = config.upstream
    # Bounded like the daemon's channel; the sink never falls behind, so it never fills.
    send, receive = trio.open_memory_channel[list[Update]](cfg.queue_size)
    provider = FmpProvider(config.fmp, connect_timeout=cfg.connect_timeout)
    demand = Demand(cfg.unsubscribe_linger, cfg.pinned)
    up = Upstream(provider, demand, send, cfg, Stats(), rng=random.Random(SEED))
    sink = Sink()
    # Virtual time: a test whose condition never comes fails at once instead of hanging.
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.drain, receive)
            await nursery.start(up.run)
            yield up, sink
            up.stop()


@asynccontextmanager
async def fake_fmp(**kwargs: Any) -> AsyncIterator[FakeFmpServer]:
    async with FakeFmpServer.open(api_keys=[FMP_KEY], **kwargs) as fake:
        yield fake


async def login_times(fake: FakeFmpServer, n: int, *, drop: bool) -> list[float]:
    """Wait for ``n`` successful logins, noting when each happened; ``drop`` kills each at once."""
    times = []
    for i in range(1, n + 1):
        await fake.wait_until(lambda: fake.logins >= i)
        times.append(trio.current_time())
        if drop:
            await fake.drop_all()
    return times


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# ---------------------------------------------------------------------------------- backoff


async def test_backoff_schedule_is_capped_doubling_with_full_jitter(autojump_clock):
    """Gaps between failed attempts are exactly uniform(0, min(max, initial·2ⁿ)) from the seeded rng."""
    n = 12
    expected = backoff_delays(n - 1, initial=0.5, maximum=30.0)
    # Without the cap the same draws would differ from attempt 7 on (ceilings 32, 64...).
    assert backoff_delays(n - 1, initial=0.5, maximum=math.inf)[6:] != pytest.approx(expected[6:])
    async with tcp_peer(REFUSE) as peer:
        async with run_upstream(peer.url, backoff_initial=0.5, backoff_max=30.0) as (up, _):
            for k in range(n - 1):
                await peer.wait_accepts(k + 1)
                accepted = peer.accepts[k]
                # Half-way through the wait: still backing off, the next attempt not yet made.
                await trio.sleep_until(accepted + expected[k] / 2)
                assert up.state == UpstreamState.BACKOFF
                assert up.reconnects == k
                assert up.next_attempt_at == pytest.approx(accepted + expected[k], abs=EXACT)
                assert len(peer.accepts) == k + 1
            await peer.wait_accepts(n)
            assert up.reconnects == n - 1
    assert gaps(peer.accepts) == pytest.approx(expected, abs=EXACT)


@pytest.mark.parametrize("connected_for, stable", [(61.0, True), (59.0, False)])
async def test_backoff_resets_only_after_a_stable_connection(autojump_clock, connected_for, stable):
    """After backoff_reset_after seconds up, a drop retries within backoff_initial; a shorter one keeps growing."""
    async with fake_fmp() as fake:
        async with run_upstream(fake.url, backoff_initial=0.5, backoff_max=30.0, backoff_reset_after=60.0) as (up, _):
            # Four connections dropped at once: delays drawn under ceilings 0.5, 1, 2, 4.
            quick = await login_times(fake, 4, drop=True)
            await fake.wait_until(lambda: fake.logins >= 5)
            quick.append(trio.current_time())
            await trio.sleep(connected_for)
            dropped_at = trio.current_time()
            await fake.drop_all()
            await fake.wait_until(lambda: fake.logins >= 6)
            retry = trio.current_time() - dropped_at
            assert up.reconnects == 5
    draws = random.Random(SEED)
    grown = [draws.uniform(0, c) for c in (0.5, 1, 2, 4)]
    assert gaps(quick) == pytest.approx(grown, abs=EXACT)
    ceiling = 0.5 if stable else 8.0
    assert retry == pytest.approx(draws.uniform(0, ceiling), abs=EXACT)
    if stable:
        assert retry < 0.5
    else:
        assert retry > 0.5  # this seed's draw shows the grown ceiling


async def test_peer_closing_before_the_handshake_fails_at_once_then_backs_off(autojump_clock):
    """A peer that accepts and closes at once: each attempt fails immediately, then waits the backoff."""
    n = 5
    expected = backoff_delays(n - 1, initial=0.5, maximum=30.0)
    async with tcp_peer() as peer:
        async with run_upstream(peer.url, connect_timeout=5.0, backoff_initial=0.5, backoff_max=30.0) as (up, _):
            await peer.wait_accepts(1)
            await trio.sleep(expected[0] / 2)
            assert up.state == UpstreamState.BACKOFF
            assert up.last_error.startswith("connection closed (code 1006")  # EOF or reset
            await peer.wait_accepts(n)
    # Not connect_timeout: the EOF is noticed at once (trio-websocket 0.12 waited for the timeout).
    assert gaps(peer.accepts) == pytest.approx(expected, abs=EXACT)


# ---------------------------------------------------------------------------------- staleness


async def test_silent_feed_reconnects_at_stale_after(autojump_clock):
    """With a symbol subscribed, no frame at all for stale_after reconnects, exactly then plus the first backoff."""
    first_delay = backoff_delays(1, initial=0.5, maximum=30.0)[0]
    async with fake_fmp(rate=0.0, heartbeat_interval=1.0, tick=0.5) as fake:
        async with run_upstream(fake.url, pinned=["AAPL"], stale_after=5.0, backoff_initial=0.5) as (up, _):
            await fake.wait_until(lambda: "AAPL" in fake.subscriptions)
            # Half-way between two heartbeats (they come every second from the login): no frame
            # is in flight, so the last one the upstream saw is the last it will see.
            await trio.sleep(3.5)  # virtual time (MockClock)
            last = up.last_message_at
            assert last is not None and last < trio.current_time()
            fake.stall()
            await trio.sleep_until(last + 5.0 + first_delay / 2)
            assert up.state == UpstreamState.BACKOFF
            assert up.last_error == "feed silent for 5s"
            assert fake.logins == 1
            await fake.wait_until(lambda: fake.logins == 2)
            silent_for = trio.current_time() - last
            assert fake.connections_total == 2
    assert 5.0 <= silent_for <= 5.0 + 0.5
    assert silent_for == pytest.approx(5.0 + first_delay, abs=EXACT)


async def test_a_stalled_feed_stays_stale_across_reconnects_until_data_flows(autojump_clock):
    """A provider that keeps answering logins but sends nothing is never reported connected.

    Each reconnect logs in again; none of them counts as "up" (state, is_fresh, the signal to
    clients) until a tick arrives. Then the clients hear "up" once.
    """
    async with fake_fmp(rate=2.0, heartbeat_interval=1.0, tick=0.5) as fake:
        async with run_upstream(fake.url, pinned=["AAPL"], stale_after=5.0, backoff_initial=0.5, backoff_max=2.0) as (
            up,
            sink,
        ):
            signals: list[str] = []
            up.on_event = lambda signal, _provider, _reason: signals.append(signal)
            while sink.updates == 0:
                await trio.sleep(0.1)  # virtual time
            assert up.state == UpstreamState.CONNECTED and up.is_fresh()
            assert signals == ["up"]
            signals.clear()
            states: list[str] = []
            fresh_seen: list[bool] = []

            async def record() -> None:
                while True:
                    last = up.state
                    await up.wait_for(lambda: up.state != last)
                    states.append(up.state)
                    fresh_seen.append(up.is_fresh())

            async with trio.open_nursery() as watcher:
                watcher.start_soon(record)
                fake.stall()
                stalled_at = trio.current_time()
                # Five reconnects' worth of stall: logins keep being answered.
                await fake.wait_until(lambda: fake.logins >= 6)
                assert trio.current_time() - stalled_at >= 5 * 5.0
                assert UpstreamState.STALE in states
                assert UpstreamState.CONNECTED not in states
                assert not any(fresh_seen)
                assert not up.is_fresh()
                assert signals == ["stale"]  # told once; a reconnect is not "up"
                updates = sink.updates
                fake.resume()
                await up.wait_for(lambda: up.state == UpstreamState.CONNECTED)
                await trio.testing.wait_all_tasks_blocked()  # the batch that did it reaches the sink
                assert sink.updates > updates  # connected because data came, not because of a login
                assert up.is_fresh()
                assert signals == ["stale", "up"]
                watcher.cancel_scope.cancel()


async def test_heartbeats_alone_keep_a_quiet_feed_alive(autojump_clock):
    """A subscribed feed with heartbeats but no data is never declared stale."""
    async with fake_fmp(rate=0.0, heartbeat_interval=1.0, tick=0.5) as fake:
        async with run_upstream(fake.url, pinned=["AAPL"], stale_after=5.0) as (up, sink):
            await fake.wait_until(lambda: "AAPL" in fake.subscriptions)
            await trio.sleep(20 * 5.0)
            assert up.state == UpstreamState.CONNECTED
            assert up.is_fresh()
            assert up.reconnects == 0
            assert sink.updates == 0  # really no data: only heartbeats kept it alive
    assert fake.logins == 1 and fake.connections_total == 1


# ---------------------------------------------------------------------------------- auth


async def test_rejected_key_waits_auth_retry_delay_and_never_leaks(autojump_clock, caplog):
    """A rejected key: state auth_failed, retries only after auth_retry_delay ±10%, key in no log or error."""
    caplog.set_level(logging.DEBUG)
    jitter = random.Random(SEED)
    expected = [300.0 * jitter.uniform(0.9, 1.1) for _ in range(2)]
    async with fake_fmp() as fake:
        async with run_upstream(fake.url, api_key=BAD_KEY, auth_retry_delay=300.0, backoff_initial=0.5) as (up, _):
            failed_at = []
            for i in range(1, 4):
                await fake.wait_until(lambda: fake.failed_logins >= i)
                failed_at.append(trio.current_time())
                if i == 1:
                    await trio.sleep(
                        100.0
                    )  # far past any normal backoff, well short of the delay  # virtual time (MockClock)
                    assert up.state == UpstreamState.AUTH_FAILED
                    assert "rejected" in up.last_error and "Unauthorized" in up.last_error
                    assert up.next_attempt_at == pytest.approx(failed_at[0] + expected[0], abs=EXACT)
                    assert fake.failed_logins == 1
            last_error = up.last_error
    assert gaps(failed_at) == pytest.approx(expected, abs=EXACT)
    assert all(270.0 <= gap <= 330.0 for gap in gaps(failed_at))
    assert fake.logins == 0
    assert fake.received_keys == [BAD_KEY] * 3  # the key really went out, on the login frame only
    assert any("[AUTH]" in r.getMessage() for r in caplog.records)
    assert all(BAD_KEY not in r.getMessage() for r in caplog.records)
    assert BAD_KEY not in caplog.text
    assert BAD_KEY not in last_error


# ---------------------------------------------------------------------------------- demand


async def test_reconnect_resubscribes_pinned_and_client_symbols(autojump_clock):
    """After a drop, the new connection is subscribed to every symbol still wanted, in one go."""
    async with fake_fmp() as fake:
        async with run_upstream(fake.url, pinned=["AAPL"]) as (up, sink):
            await fake.wait_until(lambda: "AAPL" in fake.subscriptions)
            up.demand.acquire(["MSFT", "TSLA", "GOOG"])
            await fake.wait_until(lambda: fake.subscriptions == {"AAPL", "MSFT", "TSLA", "GOOG"})
            up.demand.release(["GOOG"])  # no longer wanted: must not come back after the drop
            await fake.wait_until(lambda: "GOOG" not in fake.subscriptions)
            before = len(fake.history)
            await fake.drop_all()
            await fake.wait_until(lambda: fake.logins == 2 and len(fake.history) > before)
            assert fake.history[before:] == [("subscribe", ("AAPL", "MSFT", "TSLA"))]
            assert fake.subscriptions == {"AAPL", "MSFT", "TSLA"}
            sink.symbols = set()
            await trio.sleep(1.0)  # virtual time (MockClock)
            assert sink.symbols == {"AAPL", "MSFT", "TSLA"}  # data flows again for all of them
            assert up.subscribed == {"AAPL", "MSFT", "TSLA"}
            assert up.reconnects == 1


async def test_release_unsubscribes_exactly_after_the_linger(autojump_clock):
    """The last release sends the upstream unsubscribe unsubscribe_linger seconds later, not before."""
    async with fake_fmp() as fake:
        async with run_upstream(fake.url, unsubscribe_linger=5.0) as (up, _):
            up.demand.acquire(["AAPL"])
            await fake.wait_until(lambda: "AAPL" in fake.subscriptions)
            await trio.sleep(2.0)  # virtual time (MockClock)
            released = trio.current_time()
            up.demand.release(["AAPL"])
            await fake.wait_until(lambda: ("unsubscribe", ("AAPL",)) in fake.history)
            assert trio.current_time() == pytest.approx(released + 5.0, abs=EXACT)
            assert fake.subscriptions == set()
    assert fake.history == [("subscribe", ("AAPL",)), ("unsubscribe", ("AAPL",))]


async def test_reacquire_within_the_linger_causes_no_churn(autojump_clock):
    """Re-acquiring a lingering symbol keeps the upstream subscription untouched; the next release lingers afresh."""
    async with fake_fmp() as fake:
        async with run_upstream(fake.url, unsubscribe_linger=5.0) as (up, _):
            up.demand.acquire(["AAPL"])
            await fake.wait_until(lambda: "AAPL" in fake.subscriptions)
            up.demand.release(["AAPL"])
            await trio.sleep(3.0)  # virtual time (MockClock)
            up.demand.acquire(["AAPL"])
            await trio.sleep(4 * 5.0)
            assert fake.history == [("subscribe", ("AAPL",))]
            released = trio.current_time()
            up.demand.release(["AAPL"])
            await fake.wait_until(lambda: ("unsubscribe", ("AAPL",)) in fake.history)
            assert trio.current_time() == pytest.approx(released + 5.0, abs=EXACT)
    assert fake.history == [("subscribe", ("AAPL",)), ("unsubscribe", ("AAPL",))]


# ---------------------------------------------------------------------------------- giving up


async def test_max_retries_gives_up_after_that_many_failures(autojump_clock):
    """With max_retries=3, run raises UpstreamGaveUp right after the third consecutive failed attempt."""
    async with tcp_peer(REFUSE) as peer:
        with pytest.RaisesGroup(pytest.RaisesExc(UpstreamGaveUp, match="HTTP 503")):
            async with run_upstream(peer.url, max_retries=3) as (up, _):
                await trio.sleep_forever()
        gave_up_at = trio.current_time()
    assert len(peer.accepts) == 3
    assert up.attempts == 3
    assert up.state == UpstreamState.FAILED
    assert gave_up_at == pytest.approx(peer.accepts[-1], abs=EXACT)  # no last backoff wait


async def test_max_retries_zero_never_gives_up(autojump_clock):
    """With max_retries=0 the upstream keeps retrying (50 failed attempts and counting)."""
    async with tcp_peer(REFUSE) as peer:
        async with run_upstream(peer.url, max_retries=0, backoff_max=2.0) as (up, _):
            await peer.wait_accepts(50)
            assert up.attempts == 50
            assert up.reconnects == 49
            assert up.state != UpstreamState.FAILED
    assert up.state == UpstreamState.STOPPED


# ---------------------------------------------------------------------------------- malformed


async def test_malformed_frames_are_counted_and_the_connection_stays(autojump_clock):
    """Malformed frames count in Stats.malformed; the same connection keeps delivering updates."""
    async with fake_fmp(rate=20.0, heartbeat_interval=1.0) as fake:
        async with run_upstream(fake.url, pinned=["AAPL"]) as (up, sink):
            await fake.wait_until(lambda: "AAPL" in fake.subscriptions)
            await trio.sleep(1.0)  # virtual time (MockClock)
            assert sink.updates > 0 and up.stats.malformed == 0
            fake.send_malformed()
            await trio.sleep(0.5)  # virtual time (MockClock)
            assert up.stats.malformed == len(MALFORMED_FRAMES)
            after = sink.updates
            await trio.sleep(1.0)  # virtual time (MockClock)
            assert sink.updates >= after + 10  # 20 a second on the same connection
            assert up.state == UpstreamState.CONNECTED
            assert up.reconnects == 0
            assert up.stats.malformed == len(MALFORMED_FRAMES)
    assert fake.connections_total == 1 and fake.logins == 1


class BlackHole:
    """A TCP peer that accepts and then says nothing: a connect that would hang until its timeout."""

    def __init__(self) -> None:
        self.url = ""
        self.accepted = trio.Event()
        self.accepts: list[float] = []

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepts.append(trio.current_time())
        self.accepted.set()
        async with stream:
            await trio.sleep_forever()


async def test_silent_peer_times_out_the_connect_and_retries(autojump_clock):
    """A peer that accepts TCP but never answers the upgrade costs connect_timeout, then backoff."""
    hole = BlackHole()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), hole._handle, 0)
        hole.url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with run_upstream(hole.url, connect_timeout=5.0, backoff_initial=0.5, backoff_max=1.0) as (up, _):
            while len(hole.accepts) < 3:
                hole.accepted = trio.Event()
                await hole.accepted.wait()
            assert up.last_error == "connect timed out after 5s"
        expected = backoff_delays(2, 0.5, 1.0)
        assert gaps(hole.accepts) == pytest.approx([5.0 + d for d in expected], abs=EXACT)
        nursery.cancel_scope.cancel()


async def test_stop_abandons_a_connect_in_progress(autojump_clock):
    """stop() during a hanging connect returns at once, not after connect_timeout."""
    hole = BlackHole()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), hole._handle, 0)
        hole.url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        config = make_config(hole.url, connect_timeout=30.0)
        send, receive = trio.open_memory_channel[list[Update]](1)
        up = Upstream(FmpProvider(config.fmp, connect_timeout=30.0), Demand(0, []), send, config.upstream, Stats())
        async with receive:
            with trio.fail_after(GUARD):
                async with trio.open_nursery() as inner:
                    await inner.start(up.run)
                    await hole.accepted.wait()
                    assert up.state == UpstreamState.CONNECTING
                    start = trio.current_time()
                    up.stop()
            assert trio.current_time() - start < 0.01
        assert up.state == UpstreamState.STOPPED
        nursery.cancel_scope.cancel()
