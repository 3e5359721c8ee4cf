"""Failover between providers, in virtual time, against a real fake FMP that is killed and revived.

The chain is ``fmp`` (the fake FMP server on loopback) then ``sim`` (the embedded simulator).
Killing the fake means leaving its ``async with`` (its listener and every connection close);
reviving it means opening a new one on the same port. Under ``MockClock(autojump_threshold=0)``
every switch happens at an exact virtual time.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import pytest
import trio
import trio.testing
from conftest import FMP_KEY

from trio_relay.config import Config, load_config
from trio_relay.hub import Demand, Stats
from trio_relay.model import ProviderSwitched
from trio_relay.providers.registry import make_providers
from trio_relay.testing.base import FakeServer
from trio_relay.testing.fake_finnhub import FakeFinnhubServer
from trio_relay.testing.fake_fmp import FakeFmpServer
from trio_relay.upstream import Item, Upstream, UpstreamState

SEED = 99
EXACT = 1e-6  # virtual seconds: loopback I/O takes none
GUARD = 3600.0


# The timings most tests use; a test passing defaults=True gets the shipped defaults instead.
TIMINGS = {
    "backoff_initial": 0.5,
    "backoff_max": 2.0,
    "failover_after": 10.0,
    "failback_after": 60.0,
    "stale_after": 5.0,
}


def make_config(url: str, *, defaults: bool = False, **upstream: Any) -> Config:
    return load_config(
        environ={},
        overrides={
            "upstream": {
                "providers": ["fmp", "sim"],
                "unsubscribe_linger": 0.0,
                "pinned": ["AAPL"],
                **({} if defaults else TIMINGS),
                **upstream,
            },
            "fmp": {"api_key": FMP_KEY, "url": url, "login_timeout": 1.0},
            "sim": {"rate": 2.0},
        },
        dotenv=None,
    )


class Sink:
    """The hub's place: records which provider each update came from, in channel order."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sources: list[str] = [source]  # the sequence of providers seen, in order
        self.counts: dict[str, int] = {}
        self.last_data_at: dict[str, float] = {}  # provider → trio time of its last batch
        self._changed = trio.Event()

    async def drain(self, receive: trio.MemoryReceiveChannel[Item]) -> None:
        async with receive:
            async for item in receive:
                if isinstance(item, ProviderSwitched):
                    self.source = item.provider
                    self.sources.append(item.provider)
                else:
                    self.counts[self.source] = self.counts.get(self.source, 0) + len(item)
                    self.last_data_at[self.source] = trio.current_time()
                self._changed.set()
                self._changed = trio.Event()

    async def wait_data_from(self, name: str, at_least: int = 1) -> None:
        while self.counts.get(name, 0) < at_least:
            await self._changed.wait()


@asynccontextmanager
async def run_upstream(url: str, *, defaults: bool = False, **upstream: Any) -> AsyncIterator[tuple[Upstream, Sink]]:
    config = make_config(url, defaults=defaults, **upstream)
    cfg = config.upstream
    send, receive = trio.open_memory_channel[Item](cfg.queue_size)
    up = Upstream(make_providers(config), Demand(0.0, cfg.pinned), send, cfg, Stats(), rng=random.Random(SEED))
    sink = Sink(up.provider.name)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.drain, receive)
            await nursery.start(up.run)
            yield up, sink
            up.stop()


async def wait_active(up: Upstream, name: str, state: str = UpstreamState.CONNECTED) -> float:
    """Wait until ``name`` is the active provider in ``state``; the virtual time it happened."""
    await up.wait_for(lambda: up.provider.name == name and up.state == state)
    return trio.current_time()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_rejected_key_fails_over_and_is_not_probed_before_auth_retry_delay(autojump_clock):
    async with FakeFmpServer.open(api_keys=[FMP_KEY], heartbeat_interval=1.0) as fake:
        async with run_upstream(fake.url, auth_retry_delay=300.0) as (up, sink):
            await fake.wait_until(lambda: fake.subscriptions == {"AAPL"})
            await sink.wait_data_from("fmp")
            assert up.provider.name == "fmp" and up.switches == 0
            # The session is kicked out and the key refused from now on.
            fake.api_keys = set()
            killed_at = trio.current_time()
            await fake.drop_all()
            switched_at = await wait_active(up, "sim")
            assert switched_at - killed_at == pytest.approx(10.0, abs=EXACT)
            await sink.wait_data_from("sim")
            assert up.switches == 1 and up.subscribed == {"AAPL"}
            assert up.switch_reason.startswith("fmp unhealthy for 10s (FMP rejected the API key")
            assert up.chain[0].state == UpstreamState.AUTH_FAILED
            assert sink.sources == ["fmp", "sim"]
            # No probe hammers the provider that refused the key before auth_retry_delay...
            refused = fake.failed_logins
            await trio.sleep_until(killed_at + 299.0)  # virtual time (MockClock)
            assert fake.failed_logins == refused and up.chain[0].probes == 0
            # ...then it is probed again, refused, and the relay stays on sim.
            await fake.wait_until(lambda: fake.failed_logins == refused + 1)
            assert trio.current_time() - killed_at == pytest.approx(300.0, abs=1.0)
            assert up.provider.name == "sim" and up.chain[0].probes == 1


async def _revive_and_wait_failback(up: Upstream, sink: Sink, port: int) -> None:
    async with FakeFmpServer.open(port=port, api_keys=[FMP_KEY], heartbeat_interval=1.0) as fake:
        await fake.wait_until(lambda: fake.logins >= 1)
        probe_logged_in = trio.current_time()
        # The probe subscribes a sample of what is wanted and must get data for it.
        await fake.wait_until(lambda: fake.subscriptions == {"AAPL"})
        back_at = await wait_active(up, "fmp")
        # failback_after counts from the probe's first update (a fraction of a tick after its login).
        first_data = up.chain[0].healthy_since
        assert first_data is not None and 0 < first_data - probe_logged_in < 0.1
        assert back_at - first_data == pytest.approx(60.0, abs=EXACT)
        await fake.wait_until(lambda: fake.subscriptions == {"AAPL"})
        await sink.wait_data_from("fmp", sink.counts["fmp"] + 1)
        assert sink.sources == ["fmp", "sim", "fmp"]
        assert up.switches == 2 and up.switch_reason == "fmp healthy again for 60s"
        # The probe's connection was closed; only the active one remains.
        assert len(fake.connections) == 1


async def test_kill_and_revive_round_trip(autojump_clock):
    port = 0
    up: Upstream | None = None
    async with trio.open_nursery() as outer:
        # The fake lives in its own task so that it can be killed (cancelled) and revived.
        killed = trio.Event()
        ready: list[FakeFmpServer] = []

        async def first_fake(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with FakeFmpServer.open(api_keys=[FMP_KEY], heartbeat_interval=1.0) as fake:
                ready.append(fake)
                task_status.started()
                await killed.wait()

        await outer.start(first_fake)
        fake = ready[0]
        port = fake.port
        async with run_upstream(fake.url) as (up, sink):
            await sink.wait_data_from("fmp")
            killed_at = trio.current_time()
            killed.set()
            switched_at = await wait_active(up, "sim")
            assert switched_at - killed_at == pytest.approx(10.0, abs=EXACT)
            await sink.wait_data_from("sim")
            await trio.sleep(30.0)  # virtual time (MockClock): down for a while; probes fail
            assert up.provider.name == "sim" and up.chain[0].probes >= 2
            await _revive_and_wait_failback(up, sink, port)


async def test_a_silent_provider_fails_over_at_failover_after_from_its_last_message(autojump_clock):
    """Stalled (connects and logs in, then sends nothing): stale at 5 s, switched at exactly 10 s."""
    async with FakeFmpServer.open(api_keys=[FMP_KEY], heartbeat_interval=1.0) as fake:
        async with run_upstream(fake.url) as (up, sink):
            await sink.wait_data_from("fmp")
            fake.stall()
            await trio.sleep(0.5)  # virtual time (MockClock): the stall is in force
            last = up.last_message_at
            assert last is not None
            switched_at = await wait_active(up, "sim")
            # The reconnect after the stale verdict logs in but hears nothing: still down.
            assert fake.logins == 2
            assert switched_at - last == pytest.approx(10.0, abs=EXACT)
            assert "fmp unhealthy for 10s" in up.switch_reason


async def test_a_flapping_preferred_provider_is_not_switched_back(autojump_clock):
    """Probes that drop before failback_after never bring fmp back; one that holds does."""
    async with FakeFmpServer.open(api_keys=[FMP_KEY], heartbeat_interval=1.0) as fake:
        async with run_upstream(fake.url) as (up, sink):
            await sink.wait_data_from("fmp")
            await fake.drop_all()
            fake.api_keys = set()  # refused while down
            await wait_active(up, "sim")
            fake.api_keys = {FMP_KEY}
            for i in range(3):
                # Each probe is killed 30 s into its 60 s trial.
                await fake.wait_until(lambda: fake.logins >= 2 + i)
                await trio.sleep(30.0)  # virtual time (MockClock)
                assert up.provider.name == "sim"
                await fake.drop_all()
            assert up.chain[0].probes == 3 and up.switches == 1
            await fake.wait_until(lambda: fake.logins >= 5)
            held_from = trio.current_time()
            back_at = await wait_active(up, "fmp")
            assert back_at - held_from == pytest.approx(60.0, abs=0.1)
            assert back_at - up.chain[0].healthy_since == pytest.approx(60.0, abs=EXACT)
            assert up.switches == 2


def price_from(message: dict[str, Any], provider: str) -> bool:
    return message.get("type") == "price_update" and message["provider"] == provider


async def test_clients_keep_their_connection_across_failover_and_failback(start_relay, ws_connect, http):
    """The real daemon: fmp → sim → fmp while a client stays subscribed; /status and /health say why."""
    from conftest import api

    async with FakeFmpServer.open(api_keys=[FMP_KEY], rate=50.0, heartbeat_interval=0.2) as fake:
        relay = await start_relay(
            upstream={
                "providers": ["fmp", "sim"],
                "failover_after": 0.3,
                "failback_after": 0.5,
                "backoff_initial": 0.05,
                "backoff_max": 0.1,
                "auth_retry_delay": 0.2,
            },
            fmp={"api_key": FMP_KEY, "url": fake.url, "login_timeout": 0.5},
        )
        client = await ws_connect(relay)
        with trio.fail_after(15):
            await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
            first, _ = await client.recv_until(lambda m: price_from(m, "fmp"))
            health = (await http.get(api(relay, "/health"))).json()
            assert health["provider"] == "fmp" and health["failover"]["on_preferred"] is True
            # fmp goes down (connections dropped, logins refused).
            fake.api_keys = set()
            await fake.drop_all()
            failed_over, before_sim = await client.recv_until(lambda m: price_from(m, "sim"))
            status = (await http.get(api(relay, "/status"))).json()
            health = (await http.get(api(relay, "/health"))).json()
            # fmp comes back: after failback_after of a healthy probe the relay returns to it.
            fake.api_keys = {FMP_KEY}
            back, seen = await client.recv_until(lambda m: price_from(m, "fmp"))
    assert first["seq"] < failed_over["seq"] < back["seq"]  # one sequence across providers
    assert {m["provider"] for m in seen if m.get("type") == "price_update"} == {"sim"}
    # The client was told: the upstream went down, then failed over to sim (then came back up).
    signals = [(m["state"], m["provider"]) for m in before_sim if m.get("type") == "status"]
    assert signals[:2] == [("down", "fmp"), ("failover", "sim")]
    assert all(m["symbols"] == ["AAPL"] for m in before_sim if m.get("type") == "status")
    back_signals = [(m["state"], m["provider"]) for m in seen if m.get("type") == "status"]
    assert back_signals[-2:] == [("failover", "fmp"), ("up", "fmp")]
    assert status["provider"] == "sim" and status["failover"]["active"] == "sim"
    assert status["failover"]["reason"].startswith("fmp unhealthy for 0.3s")
    assert [(p["name"], p["active"]) for p in status["upstream"]["providers"]] == [("fmp", False), ("sim", True)]
    assert status["upstream"]["providers"][0]["state"] == "auth_failed"
    assert health["status"] == "ok" and health["provider"] == "sim"
    assert health["failover"] == {
        "active": "sim",
        "preferred": "fmp",
        "on_preferred": False,
        "switches": 1,
        "reason": status["failover"]["reason"],
    }
    assert relay.upstream.switches == 2 and relay.upstream.switch_reason == "fmp healthy again for 0.5s"


async def test_fmp_to_finnhub_and_back_when_the_fmp_server_dies_and_revives(start_relay, ws_connect, nursery):
    """Two real provider protocols: the FMP server is killed (listener gone) and revived on its port."""

    finnhub_key = "fh-failover-key-51c9"
    kill = trio.Event()
    fmp_servers: list[FakeFmpServer] = []

    async def run_fmp(
        port: int, stop: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with FakeFmpServer.open(port=port, api_keys=[FMP_KEY], rate=50.0, heartbeat_interval=0.2) as fake:
            fmp_servers.append(fake)
            task_status.started()
            await stop.wait()

    await nursery.start(run_fmp, 0, kill)
    port = fmp_servers[0].port
    async with FakeFinnhubServer.open(api_keys=[finnhub_key], rate=50.0) as finnhub:
        relay = await start_relay(
            upstream={
                "providers": ["fmp", "finnhub"],
                "failover_after": 0.3,
                "failback_after": 0.5,
                "backoff_initial": 0.05,
                "backoff_max": 0.1,
            },
            fmp={"api_key": FMP_KEY, "url": fmp_servers[0].url, "login_timeout": 0.5},
            finnhub={"api_key": finnhub_key, "url": finnhub.url},
        )
        client = await ws_connect(relay)
        with trio.fail_after(15):
            await client.request({"action": "subscribe", "symbols": ["AAPL", "BTCUSD"]}, "subscribed")
            await client.recv_until(lambda m: price_from(m, "fmp"))
            assert finnhub.connections_total == 0  # the standby provider is not touched while fmp is fine
            kill.set()  # the FMP server is gone: its listener and every connection close
            await finnhub.wait_until(lambda: finnhub.subscriptions == {"AAPL", "COINBASE:BTC-USD"})
            btc, _ = await client.recv_until(lambda m: price_from(m, "finnhub") and m["symbol"] == "BTCUSD")
            aapl, _ = await client.recv_until(lambda m: price_from(m, "finnhub") and m["symbol"] == "AAPL")
            # FMP comes back on the same port; after failback_after the relay returns to it.
            await nursery.start(run_fmp, port, trio.Event())
            revived = fmp_servers[1]
            await revived.wait_until(lambda: revived.subscriptions == {"AAPL", "BTCUSD"})
            back, _ = await client.recv_until(lambda m: price_from(m, "fmp"))
            await finnhub.wait_until(lambda: not finnhub.connections)
    assert btc["last_price"] > 0 and aapl["last_price"] > 0
    assert relay.upstream.switches == 2 and relay.upstream.provider.name == "fmp"
    assert len(relay.hub.clients) == 1  # the same client connection all along


# ---------------------------------------------------------------------- failback that proves delivery
F = TypeVar("F", bound=FakeServer[Any])


class FakeHost(Generic[F]):
    """A fake provider server that can be killed (listener and connections gone) and revived on its port."""

    def __init__(self, nursery: trio.Nursery, server: type[F], key: str = FMP_KEY) -> None:
        self._nursery = nursery
        self._server = server
        self._key = key
        self._stop = trio.Event()
        self.port = 0

    async def start(self, *, deliver: bool = True, **kwargs: Any) -> F:
        self._stop = trio.Event()
        fake: F = await self._nursery.start(self._serve, self._stop, deliver, kwargs)
        self.port = fake.port
        return fake

    async def _serve(
        self, stop: trio.Event, deliver: bool, kwargs: dict[str, Any], task_status: trio.TaskStatus[F]
    ) -> None:
        async with self._server.open(port=self.port, api_keys=[self._key], **kwargs) as fake:
            fake.deliver = deliver  # before any connection can stream (no checkpoint since it listens)
            task_status.started(fake)
            await stop.wait()

    def kill(self) -> None:
        self._stop.set()


async def test_defaults_fail_back_to_an_fmp_that_is_silent_when_idle(autojump_clock):
    """Shipped timings; an FMP that sends nothing to an idle session. The probe subscribes, gets data, returns."""
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, FakeFmpServer)
        fake = await host.start(idle_silent=True)
        async with run_upstream(fake.url, defaults=True) as (up, sink):
            await sink.wait_data_from("fmp")
            killed_at = trio.current_time()
            host.kill()
            assert await wait_active(up, "sim") - killed_at == pytest.approx(10.0, abs=EXACT)
            await trio.sleep(120.0)  # virtual time (MockClock): down for two minutes; probes fail at connect
            assert up.provider.name == "sim" and up.chain[0].probes >= 10
            healthy_at = trio.current_time()
            fake = await host.start(idle_silent=True)
            await fake.wait_until(lambda: fake.subscriptions == {"AAPL"})  # the probe asks for a sample
            probe_at = trio.current_time()
            back_at = await wait_active(up, "fmp")
            first_data = up.chain[0].healthy_since
            await sink.wait_data_from("fmp", sink.counts["fmp"] + 1)
            gap = sink.last_data_at["fmp"] - back_at  # from the switch to fmp's first update
            nursery.cancel_scope.cancel()
    # Back within failback_after + failback_probe_interval of the server becoming healthy.
    assert probe_at - healthy_at <= 5.0
    assert first_data is not None and back_at - first_data == pytest.approx(60.0, abs=EXACT)
    assert up.switches == 2 and sink.sources == ["fmp", "sim", "fmp"]
    assert gap < 0.1
    print(
        f"\nidle-silent FMP: healthy -> probe {probe_at - healthy_at:.3f}s, -> back {back_at - healthy_at:.3f}s,"
        f" switch -> first fmp update {gap:.3f}s"
    )


async def test_with_nothing_wanted_a_silent_idle_fmp_is_proven_by_staying_up(autojump_clock):
    """Nothing to sample: the probe may be silent for all of failback_after (FMP owes an idle session nothing)."""
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, FakeFmpServer)
        fake = await host.start(idle_silent=True)
        async with run_upstream(fake.url, defaults=True, pinned=[]) as (up, sink):
            await wait_active(up, "fmp")
            await trio.sleep(100.0)  # virtual time: idle and silent for longer than stale_after, still fine
            assert up.provider.name == "fmp" and up.state == UpstreamState.CONNECTED and up.switches == 0
            host.kill()
            await wait_active(up, "sim")
            fake = await host.start(idle_silent=True)
            healthy_at = trio.current_time()
            back_at = await wait_active(up, "fmp")
            assert fake.frames_sent == 0  # not a frame was sent to the probe, nor heartbeats
            nursery.cancel_scope.cancel()
    assert 60.0 <= back_at - healthy_at <= 65.0


@pytest.mark.parametrize(
    ("fault", "timings", "why"),
    [
        ("mute", {}, "probe: no data in 30s"),  # heartbeats, no data: defaults
        ("mute", {"stale_after": 90.0}, "probe: no data in 90s"),  # stale_after >= failback_after
        ("stall", {}, "probe: no data in 30s"),  # nothing at all
        ("stall", {"stale_after": 90.0}, "probe: no data in 90s"),
    ],
)
async def test_a_preferred_provider_that_logs_in_but_delivers_nothing_is_never_switched_back_to(
    autojump_clock, fault, timings, why
):
    async with FakeFmpServer.open(api_keys=[FMP_KEY], heartbeat_interval=1.0) as fake:
        async with run_upstream(fake.url, defaults=True, **timings) as (up, sink):
            await sink.wait_data_from("fmp")
            if fault == "mute":
                fake.deliver = False
                await fake.drop_all()  # the session ends; every one after it logs in and heartbeats
            else:
                fake.stall()
            await wait_active(up, "sim")
            left_at = trio.current_time()
            await trio.sleep(1800.0)  # virtual time: half an hour of probes
            assert up.provider.name == "sim" and up.switches == 1 and sink.sources == ["fmp", "sim"]
            assert up.chain[0].probes >= 20
            assert up.chain[0].last_error == why
            assert up.chain[0].state in (UpstreamState.STALE, "probing")
            # Every probe subscribed the sample; none was ever switched back to.
            assert ("subscribe", ("AAPL",)) in fake.history[1:]
            # Once it delivers, it is back within failback_after + failback_probe_interval: a probe
            # waiting for its first update gets it now, or the next probe starts within 5 s.
            fake.deliver = True
            fake.resume()
            healthy_at = trio.current_time()
            back_at = await wait_active(up, "fmp")
    assert 60.0 <= back_at - healthy_at <= 60.0 + 5.0 + 0.1
    print(
        f"\n{fault} {timings}: {up.chain[0].probes} probes failed in 30 min; delivering -> back {back_at - healthy_at:.3f}s"
    )
    assert back_at - left_at > 1800.0


async def test_a_stall_fails_over_failover_after_from_the_last_data_with_default_stale_after(autojump_clock):
    """stale_after 30 (default) > failover_after 10: the switch still comes at exactly 10 s."""
    async with FakeFmpServer.open(api_keys=[FMP_KEY], heartbeat_interval=1.0) as fake:
        async with run_upstream(fake.url, defaults=True) as (up, sink):
            await sink.wait_data_from("fmp", 20)
            fake.stall()
            switched_at = await wait_active(up, "sim")
            last_data = sink.last_data_at["fmp"]
            assert switched_at - last_data == pytest.approx(10.0, abs=EXACT)
            assert up.switch_reason == "fmp unhealthy for 10s (feed silent for 10s)"
            print(f"\nstall: last data -> switch {switched_at - last_data:.6f}s")


async def test_an_idle_session_silent_past_stale_after_is_not_stale(autojump_clock):
    """Nothing subscribed: silence is normal (idle FMP); once a symbol is wanted, data is due as usual."""
    async with FakeFmpServer.open(api_keys=[FMP_KEY], idle_silent=True, heartbeat_interval=1.0) as fake:
        async with run_upstream(fake.url, defaults=True, pinned=[]) as (up, sink):
            await wait_active(up, "fmp")
            await trio.sleep(300.0)  # virtual time
            assert up.switches == 0 and up.state == UpstreamState.CONNECTED and fake.logins == 1
            up.demand.acquire(["MSFT"])
            await sink.wait_data_from("fmp")
            subscribed_at = trio.current_time()
            fake.stall()
            switched_at = await wait_active(up, "sim")
            assert switched_at - sink.last_data_at["fmp"] == pytest.approx(10.0, abs=EXACT)
            assert switched_at - subscribed_at <= 10.0 + EXACT


async def test_symbols_wanted_after_an_idle_reconnect_get_failover_after_to_arrive(autojump_clock):
    """Dropped while idle, reconnected, idle past failover_after: a first subscribe is not failed over at once."""
    async with FakeFmpServer.open(api_keys=[FMP_KEY], idle_silent=True, heartbeat_interval=1.0) as fake:
        async with run_upstream(fake.url, defaults=True, pinned=[]) as (up, sink):
            await wait_active(up, "fmp")
            await fake.drop_all()
            await fake.wait_until(lambda: fake.logins == 2)
            await trio.sleep(12.0)  # virtual time: idle (and silent) past failover_after since the drop
            up.demand.acquire(["MSFT"])
            await sink.wait_data_from("fmp")
            await trio.sleep(60.0)  # virtual time
            assert up.provider.name == "fmp" and up.switches == 0 and up.state == UpstreamState.CONNECTED
            # A feed that then says nothing at all is still left failover_after after its last frame
            # (a heartbeat may follow the last data by one of the fake's 0.02 s ticks).
            fake.stall()
            await trio.sleep(1.0)  # virtual time: the stall is in force
            last_frame = up.last_message_at
            assert last_frame is not None
            switched_at = await wait_active(up, "sim")
            assert switched_at - last_frame == pytest.approx(10.0, abs=EXACT)
            assert switched_at - sink.last_data_at["fmp"] == pytest.approx(10.0, abs=0.05)


async def test_the_flap_guard_holds_off_a_provider_that_fails_soon_after_a_failback(autojump_clock):
    """Fails again right after each failback: held off 60 s, then 120 s; forgiven after the window."""
    async with FakeFmpServer.open(api_keys=[FMP_KEY], heartbeat_interval=1.0) as fake:
        async with run_upstream(fake.url, defaults=True) as (up, sink):
            fmp = up.chain[0]
            await sink.wait_data_from("fmp")
            fake.stall()
            await wait_active(up, "sim")
            fake.resume()
            # The first failover is not a flap (the relay started on fmp): probed at once.
            assert fmp.flaps == 0 and fmp.held_until is None
            holds = []
            for n in (1, 2):
                await wait_active(up, "fmp")
                await sink.wait_data_from("fmp", sink.counts["fmp"] + 1)
                fake.stall()  # fails again at once
                left_at = await wait_active(up, "sim")
                fake.resume()
                assert fmp.flaps == n and fmp.state == "held_off"
                probes = fmp.probes
                logins = fake.logins
                await fake.wait_until(lambda: fake.logins > logins)
                holds.append(trio.current_time() - left_at)
                assert fmp.probes == probes + 1
            assert holds == [pytest.approx(60.0, abs=EXACT), pytest.approx(120.0, abs=EXACT)]
            # Held for longer than failback_flap_window after a failback: forgiven.
            await wait_active(up, "fmp")
            await trio.sleep(601.0)  # virtual time
            fake.stall()
            left_at = await wait_active(up, "sim")
            fake.resume()
            assert fmp.flaps == 0 and fmp.held_until is None and fmp.state != "held_off"
            logins = fake.logins
            await fake.wait_until(lambda: fake.logins > logins)
            assert trio.current_time() - left_at <= 5.0
    print(f"\nflap guard hold-offs: {holds}")


async def test_the_daemon_warns_at_start_about_timings_that_weaken_failback(start_relay, caplog):
    """One [CONFIG] line naming the keys, logged with the start banner."""
    caplog.set_level("WARNING", logger="trio_relay.daemon")
    await start_relay(upstream={"providers": ["sim", "fmp"], "stale_after": 90.0}, fmp={"api_key": FMP_KEY})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[CONFIG]")]
    assert len(lines) == 1
    assert lines[0].startswith("[CONFIG] upstream.stale_after (90s) >= upstream.failback_after (60s)")


async def test_a_quiet_provider_that_delivers_nothing_is_not_switched_back_to(autojump_clock):
    """Finnhub (no heartbeat, may be quiet): its probe needs an update within failback_after, pings do not count."""
    key = "fh-failback-key-20d7"
    with trio.fail_after(GUARD):
        back_at, healthy_at = await _quiet_provider_round_trip(key)
    # A probe waiting for its first update gets it now, or the next one starts within 5 s.
    assert 60.0 <= back_at - healthy_at <= 65.1
    print(f"\nquiet provider: delivering -> back {back_at - healthy_at:.3f}s")


async def _quiet_provider_round_trip(key: str) -> tuple[float, float]:
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, FakeFinnhubServer, key)
        fake = await host.start(ping_interval=10.0)
        config = load_config(
            environ={},
            overrides={
                "upstream": {"providers": ["finnhub", "sim"], "unsubscribe_linger": 0.0, "pinned": ["AAPL"]},
                "finnhub": {"api_key": key, "url": fake.url},
                "sim": {"rate": 2.0},
            },
            dotenv=None,
        )
        send, receive = trio.open_memory_channel[Item](config.upstream.queue_size)
        up = Upstream(
            make_providers(config), Demand(0.0, ["AAPL"]), send, config.upstream, Stats(), rng=random.Random(SEED)
        )
        sink = Sink("finnhub")
        nursery.start_soon(sink.drain, receive)
        await nursery.start(up.run)
        await sink.wait_data_from("finnhub")
        host.kill()
        await wait_active(up, "sim")
        fake = await host.start(ping_interval=10.0, deliver=False)
        await trio.sleep(1200.0)  # virtual time: twenty minutes of probes that get pings and no data
        assert up.provider.name == "sim" and up.switches == 1
        assert up.chain[0].probes >= 15 and up.chain[0].last_error == "probe: no data in 60s"
        assert fake.pings_sent > 0
        fake.deliver = True
        healthy_at = trio.current_time()
        back_at = await wait_active(up, "finnhub")
        await sink.wait_data_from("finnhub", sink.counts["finnhub"] + 1)
        nursery.cancel_scope.cancel()
    return back_at, healthy_at
