"""Fleets of relays in one process against the real Redis (``engine.backend = "redis"``).

Each test gets its own fleet prefix (``fleet_prefix``: skipped without Redis, a failure in CI,
keys deleted afterwards). Redis keeps its TTLs on its own clock, so these tests run in real time
with short TTLs (1 s); they never sleep for a fixed time: they wait for WebSocket messages, for
the fake FMP server's state, or (for expiries on the Redis side) poll a condition with
:func:`eventually`, every wait bounded by ``trio.fail_after``. A Redis "outage" is a
:class:`TcpGate` between the relays and Redis, cut and reopened.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import coredis
import httpx
import msgspec
import pytest
import trio
import trio.testing
from conftest import FMP_KEY, REDIS_HOST, REDIS_PORT, JsonWsClient, api, fmp_sections, make_config, redis_command

from trio_relay.archive import Archiver
from trio_relay.config import ConfigError
from trio_relay.daemon import Relay
from trio_relay.engine.fleet_view import FleetUpstream
from trio_relay.engine.redis import _ACQUIRE, _PUBLISH, FleetBatch, RedisEngine, fleet_keys, shard_of
from trio_relay.history import HistoryStore, HistoryWriter, make_backend
from trio_relay.history.sqlite import SqliteBackend
from trio_relay.model import Update
from trio_relay.testing.fake_fmp import FakeFmpServer, fmp_frame
from trio_relay.testing.tcpgate import TcpGate

POLL_INTERVAL = 0.02  # seconds between two looks at a condition only Redis's clock changes
TTL = 1.0  # lock_ttl and demand_ttl of every relay unless a test says otherwise
WAIT = 5.0  # the bound of an ordinary wait (an election, a subscription, a few prices)
SYMBOLS = ["AAPL", "MSFT"]
# Fields that must be the same on every relay for one (symbol, seq): the whole state but the
# time this relay's hub cached it.
SAME_EVERYWHERE = (
    "symbol", "seq", "epoch", "timestamp", "data_type", "provider",
    "last_price", "last_size", "bid_price", "bid_size", "ask_price", "ask_size",
)  # fmt: skip


def fleet(prefix: str, node: str, **more: Any) -> dict[str, Any]:
    """The ``engine`` section of one relay of the fleet ``prefix``."""
    return {"backend": "redis", "prefix": prefix, "node_id": node, "lock_ttl": TTL, "demand_ttl": TTL, **more}


def engine_of(relay: Relay) -> RedisEngine:
    upstream = relay.upstream
    assert isinstance(upstream, FleetUpstream)
    return upstream.engine


def holders(relays: list[Relay]) -> list[Relay]:
    return [r for r in relays if engine_of(r).role == "holder"]


async def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it holds (for state that only Redis's clock changes)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(POLL_INTERVAL)


async def demand_published(prefix: str, nodes: str, symbols: list[str]) -> None:
    """Wait until each of ``nodes`` published a demand of ``symbols``: each listens to their channels.

    (A relay subscribes the channels of what its clients want before it publishes that demand;
    until then an update may reach it only as the current state read from the cache.)
    """
    keys = fleet_keys(prefix)
    wanted = json.dumps(sorted(symbols), separators=(",", ":")).encode()
    await eventually(lambda: all(wanted in redis_command("GET", keys.demand_prefix + node) for node in nodes))


async def the_holder(relays: list[Relay], timeout: float = WAIT) -> Relay:
    """Wait until one of ``relays`` holds the upstream and it is connected; that relay."""

    def one_connected() -> bool:
        held = holders(relays)
        return len(held) == 1 and held[0].upstream.state == "connected"

    await eventually(one_connected, timeout)
    return holders(relays)[0]


class Feed:
    """A client's messages, read when a test waits for something (the socket queues the rest)."""

    def __init__(self, client: JsonWsClient) -> None:
        self.client = client
        self.messages: list[dict[str, Any]] = []
        self.prices: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, ws_connect: Callable[..., Any], relay: Relay, symbols: list[str]) -> Feed:
        feed = cls(await ws_connect(relay))
        if symbols:
            await feed.subscribe(symbols)
        return feed

    async def subscribe(self, symbols: list[str]) -> None:
        await self.client.send({"action": "subscribe", "symbols": symbols})
        await self.read_until(lambda: any(m.get("type") == "subscribed" for m in self.messages[-1:]))

    async def unsubscribe(self, symbols: list[str]) -> None:
        await self.client.send({"action": "unsubscribe", "symbols": symbols})
        await self.read_until(lambda: any(m.get("type") == "unsubscribed" for m in self.messages[-1:]))

    async def read_until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                msg = await self.client.recv()
                assert isinstance(msg, dict), msg
                self.messages.append(msg)
                if msg.get("type") == "price_update":
                    self.prices.append(msg)
                elif msg.get("type") == "error":
                    raise AssertionError(f"the relay answered an error: {msg}")

    async def more_prices(self, symbols: list[str], n: int, timeout: float = WAIT) -> None:
        """Read until each of ``symbols`` has ``n`` more price updates than now."""
        target = {s: self.count(s) + n for s in symbols}
        await self.read_until(lambda: all(self.count(s) >= target[s] for s in symbols), timeout)

    def of(self, symbol: str) -> list[dict[str, Any]]:
        return [p for p in self.prices if p["symbol"] == symbol]

    def count(self, symbol: str) -> int:
        return sum(1 for p in self.prices if p["symbol"] == symbol)

    def seqs(self, symbol: str) -> list[int]:
        return [p["seq"] for p in self.of(symbol)]

    def last_seq(self, symbol: str) -> int:
        seqs = self.seqs(symbol)
        return seqs[-1] if seqs else 0

    def statuses(self, state: str) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages
            if m.get("type") == "status" and m.get("scope") == "upstream" and m.get("state") == state
        ]

    def assert_in_order(self, symbol: str, *, contiguous: bool = True) -> None:
        """Seqs strictly rising (nothing twice, nothing back) in one epoch; without gaps if ``contiguous``."""
        prices = self.of(symbol)
        assert prices, f"no price update of {symbol}"
        seqs = [p["seq"] for p in prices]
        assert all(b > a for a, b in zip(seqs, seqs[1:])), f"{symbol} seqs repeat or step back: {seqs}"
        if contiguous:
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{symbol} seqs have gaps: {seqs}"
        assert len({p["epoch"] for p in prices}) == 1, f"{symbol} changed epoch: {sorted({p['epoch'] for p in prices})}"


def same_fields(price: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(price[k] for k in SAME_EVERYWHERE)


@pytest.fixture
async def redis(fleet_prefix: str) -> AsyncIterator[coredis.Redis[bytes]]:
    """A client of the real Redis for the test's own reads and writes."""
    async with coredis.Redis(host=REDIS_HOST, port=REDIS_PORT, decode_responses=False) as client:
        yield client


@pytest.fixture
async def quiet_fmp() -> AsyncIterator[FakeFmpServer]:
    """A fake FMP server that sends only what the test injects (:func:`tick`)."""
    async with FakeFmpServer.open(api_keys=[FMP_KEY], rate=0.0, heartbeat_interval=1.0) as server:
        yield server


async def tick(fake: FakeFmpServer, symbols: list[str], price: float) -> None:
    """One trade of each of ``symbols`` at ``price``, sent on the holder's upstream connection."""
    now_ms = time.time_ns() // 1_000_000
    for symbol in symbols:
        await fake.inject(fmp_frame(Update(symbol=symbol, kind="T", timestamp=now_ms, last_price=price, last_size=1.0)))


@pytest.fixture
async def gate(nursery: trio.Nursery) -> TcpGate:
    """A cuttable proxy in front of the real Redis."""
    gate = TcpGate(REDIS_HOST, REDIS_PORT)
    await nursery.start(gate.run)
    return gate


# ---------------------------------------------------------------------------------- 1. one holder


async def test_one_holder_one_upstream_and_the_same_sequence_on_every_relay(
    fleet_prefix: str, fake_fmp: FakeFmpServer, start_relay: Any, ws_connect: Any
) -> None:
    relays = [await start_relay(engine=fleet(fleet_prefix, node), **fmp_sections(fake_fmp)) for node in "abc"]
    holder = await the_holder(relays)
    feeds = [await Feed.open(ws_connect, relay, SYMBOLS) for relay in relays]
    with trio.fail_after(WAIT):
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == set(SYMBOLS))
    for feed in feeds:
        await feed.more_prices(SYMBOLS, 1)
    # A window of seqs every client saw: from the latest first seq, 30 updates on.
    for symbol in SYMBOLS:
        start = max(feed.seqs(symbol)[0] for feed in feeds)
        for feed in feeds:
            await feed.read_until(lambda: feed.last_seq(symbol) >= start + 30)  # noqa: B023 (awaited here)
        window = [[same_fields(p) for p in feed.of(symbol) if start <= p["seq"] <= start + 30] for feed in feeds]
        assert len(window[0]) == 31
        assert window[0] == window[1] == window[2]
    for feed in feeds:
        for symbol in SYMBOLS:
            feed.assert_in_order(symbol)
    # ONE upstream connection, the holder's; nobody else ever logged in.
    assert holders(relays) == [holder]
    assert [engine_of(r).upstream is not None for r in relays] == [r is holder for r in relays]
    assert len(fake_fmp.connections) == 1 and fake_fmp.logins == 1
    assert {engine_of(r).epoch for r in relays} == {feeds[0].prices[0]["epoch"]}
    assert all(engine_of(r).stale_batches == 0 for r in relays)


# ---------------------------------------------------------------------------------- 2. demand


async def test_fleet_demand_follows_every_relay_and_forgets_the_gone(
    fleet_prefix: str, fake_fmp: FakeFmpServer, start_relay: Any, ws_connect: Any
) -> None:
    keys = fleet_keys(fleet_prefix)
    a = await start_relay(engine=fleet(fleet_prefix, "a"), **fmp_sections(fake_fmp))
    assert await the_holder([a]) is a
    b = await start_relay(engine=fleet(fleet_prefix, "b"), **fmp_sections(fake_fmp))
    upstream = engine_of(a).upstream
    assert upstream is not None and engine_of(b).role == "follower"

    # A symbol only the follower's client wants: the holder subscribes it, the client gets prices.
    feed = await Feed.open(ws_connect, b, ["NFLX"])
    with trio.fail_after(WAIT):
        await fake_fmp.wait_until(lambda: "NFLX" in fake_fmp.subscriptions)
    await eventually(lambda: "NFLX" in upstream.subscribed)
    await feed.more_prices(["NFLX"], 5)
    feed.assert_in_order("NFLX")
    # Unsubscribed: the holder drops it (linger 0).
    await feed.unsubscribe(["NFLX"])
    with trio.fail_after(WAIT):
        await fake_fmp.wait_until(lambda: "NFLX" not in fake_fmp.subscriptions)
    await eventually(lambda: "NFLX" not in upstream.subscribed)

    # A relay that stops cleanly withdraws its demand at once, not after its demand_ttl (30 s).
    c = await start_relay(engine=fleet(fleet_prefix, "c", demand_ttl=30.0), **fmp_sections(fake_fmp, pinned=["AMD"]))
    with trio.fail_after(WAIT):
        await fake_fmp.wait_until(lambda: "AMD" in fake_fmp.subscriptions)
    c.shutdown()
    with trio.fail_after(TTL * 2):
        await fake_fmp.wait_until(lambda: "AMD" not in fake_fmp.subscriptions)
    assert redis_command("EXISTS", keys.demand_prefix + "c") == b":0\r\n"
    assert redis_command("SISMEMBER", keys.nodes, "c") == b":0\r\n"

    # A relay that died leaves its demand key behind: honoured until it expires, then dropped.
    redis_command("SET", keys.demand_prefix + "ghost", '["GHOST"]', "PX", "1500")
    redis_command("SADD", keys.nodes, "ghost")
    redis_command("PUBLISH", keys.control, '{"t":"demand"}')
    with trio.fail_after(WAIT):
        await fake_fmp.wait_until(lambda: ("subscribe", ("GHOST",)) in fake_fmp.history)
        await fake_fmp.wait_until(lambda: ("unsubscribe", ("GHOST",)) in fake_fmp.history)
    assert "GHOST" not in fake_fmp.subscriptions
    assert redis_command("SISMEMBER", keys.nodes, "ghost") == b":0\r\n"  # forgotten with its key
    assert fake_fmp.logins == 1  # all along, one upstream connection


# ---------------------------------------------------------------------------------- 3. takeover


async def test_clean_takeover_continues_the_sequence(fleet_prefix: str, start_relay: Any, ws_connect: Any) -> None:
    # A lock_ttl of 10 s: the lock is never left to expire here, so only the old holder's
    # "released" message can explain a takeover within a second or two.
    engine = {"lock_ttl": 10.0}
    a = await start_relay(engine=fleet(fleet_prefix, "a", **engine))
    assert await the_holder([a]) is a
    b = await start_relay(engine=fleet(fleet_prefix, "b", **engine))
    c = await start_relay(engine=fleet(fleet_prefix, "c", **engine))
    feeds = [await Feed.open(ws_connect, relay, SYMBOLS) for relay in (b, c)]
    for feed in feeds:
        await feed.more_prices(SYMBOLS, 10)
    epoch = feeds[0].prices[0]["epoch"]
    assert engine_of(b).epoch == engine_of(c).epoch == epoch
    old_token = engine_of(a).token
    duplicates = [engine_of(r).duplicates for r in (b, c)]

    a.shutdown()
    with trio.fail_after(2.5):  # well under the 3.3 s a follower waits between two tries
        new = await the_holder([b, c])
    assert engine_of(new).token > old_token
    assert engine_of(a).role == "follower"
    for feed in feeds:
        await feed.more_prices(SYMBOLS, 20)
    for feed in feeds:
        for symbol in SYMBOLS:
            # No seq twice, none back, none missing: the new holder numbers on from the cache.
            feed.assert_in_order(symbol)
            assert {p["epoch"] for p in feed.of(symbol)} == {epoch}
    assert {engine_of(r).epoch for r in (b, c)} == {epoch}
    # ...and none of the new holder's updates repeated a seq (which receivers would have dropped,
    # hiding the repeat from clients but losing those updates).
    assert [engine_of(r).duplicates for r in (b, c)] == duplicates


# ---------------------------------------------------------------------------------- 4. fencing


async def test_an_old_holder_is_fenced_off(
    fleet_prefix: str, start_relay: Any, ws_connect: Any, redis: coredis.Redis[bytes]
) -> None:
    keys = fleet_keys(fleet_prefix)
    a = await start_relay(engine=fleet(fleet_prefix, "a"))
    assert await the_holder([a]) is a
    old_value = await redis.get(keys.holder)
    epoch_held = await redis.get(keys.epoch)
    assert epoch_held is not None
    # "<epoch>|<token>|<node>#<instance>": the fencing token compares within the Redis's epoch.
    assert old_value.startswith(f"{epoch_held.decode()}|{engine_of(a).token}|a#".encode())
    b = await start_relay(engine=fleet(fleet_prefix, "b"))
    c = await start_relay(engine=fleet(fleet_prefix, "c"))
    feeds = [await Feed.open(ws_connect, relay, ["AAPL"]) for relay in (b, c)]
    for feed in feeds:
        await feed.more_prices(["AAPL"], 3)
    a.shutdown()
    new = await the_holder([b, c])
    new_value = await redis.get(keys.holder)
    assert new_value is not None and new_value != old_value
    old_token, new_token = int(old_value.split(b"|")[1]), engine_of(new).token
    assert new_token > old_token
    epoch = feeds[0].prices[0]["epoch"]
    # A receiver knows the newest token from the batches it got: wait for one of the new
    # holder's (the old one had published everything before it released the lock).
    cached = await redis.hget(keys.cache, "AAPL")
    assert cached is not None
    taken_over_at = json.loads(cached)["seq"]
    for feed in feeds:
        await feed.read_until(lambda: feed.last_seq("AAPL") > taken_over_at)  # noqa: B023 (awaited here)

    # What a late publish of the old holder would send: a poison update under the NEW token.
    channel = f"{keys.shard_prefix}{shard_of('AAPL', engine_of(b).config.shards)}"
    poison = Update(symbol="AAPL", kind="T", timestamp=time.time_ns() // 1_000_000, last_price=999999.0, last_size=1.0)
    poison.seq, poison.epoch = 10**9, epoch

    def publish_args(value: bytes, token: int) -> list[bytes | str | int]:
        payload = msgspec.msgpack.encode(FleetBatch(token, epoch, [poison]))
        return [value, 1, 0, 0, channel, payload]

    script_keys = [keys.holder, keys.cache, keys.stream]
    assert await redis.eval(_PUBLISH, keys=script_keys, args=publish_args(old_value, new_token)) == 0
    assert await redis.eval(_PUBLISH, keys=script_keys, args=[new_value, 0, 0, 0]) == 1  # the holder's own value passes

    # A batch of an older token published raw on the shard channel: every receiver drops it.
    stale_before = [engine_of(r).stale_batches for r in (b, c)]
    assert await redis.publish(channel, msgspec.msgpack.encode(FleetBatch(old_token, epoch, [poison]))) == 2
    await eventually(lambda: [engine_of(r).stale_batches for r in (b, c)] == [n + 1 for n in stale_before])
    for feed in feeds:
        await feed.more_prices(["AAPL"], 5)  # the live feed goes on (a 10**9 seq would have stopped it)
        feed.assert_in_order("AAPL")
        assert all(p["last_price"] != 999999.0 and p["seq"] < 10**9 for p in feed.prices)
    assert all(engine_of(r).hub.snapshot("AAPL").last_price != 999999.0 for r in (b, c))  # type: ignore[union-attr]


async def test_the_lock_is_fenced_by_epoch_and_a_late_grab_is_handed_back(
    fleet_prefix: str, redis: coredis.Redis[bytes]
) -> None:
    """_ACQUIRE against the real Redis: what a relay whose call timed out, or a Redis that lost its
    data, leaves behind."""
    keys = fleet_keys(fleet_prefix)
    script_keys = [keys.holder, keys.fence, keys.epoch]

    async def acquire(owner: str, epoch: str) -> bytes | None:
        value: Any = await redis.eval(_ACQUIRE, keys=script_keys, args=["n", 60_000, owner, epoch])
        return value  # type: ignore[no-any-return]

    first = await acquire("|a#1111", "epoch-1")
    assert first == b"epoch-1|1|a#1111"
    # A grab whose caller gave up (Redis was paused) ran anyway: the same process asking again
    # gets it back at once; any other process (another relay, or this relay restarted) does not.
    await redis.pexpire(keys.holder, 50)
    assert await acquire("|a#1111", "epoch-x") == first
    assert await redis.pttl(keys.holder) > 50_000  # and it has a whole lock_ttl again
    assert await acquire("|a#2222", "epoch-x") is None
    assert await acquire("|b#3333", "epoch-x") is None
    # The lock expires; the next holder's token is higher, in the same epoch.
    await redis.delete([keys.holder])
    assert await acquire("|b#3333", "epoch-x") == b"epoch-1|2|b#3333"
    # Redis lost its data (fence counter, epoch and lock gone): a new epoch, numbering from 1,
    # never "token 1 is older than 2" (which would fence the whole fleet out).
    await redis.delete([keys.holder, keys.fence, keys.epoch])
    assert await acquire("|c#4444", "epoch-2") == b"epoch-2|1|c#4444"


async def test_garbage_on_the_fleets_channels_is_counted_and_skipped(
    fleet_prefix: str, start_relay: Any, ws_connect: Any, redis: coredis.Redis[bytes], http: httpx.AsyncClient
) -> None:
    """Whoever else writes to the fleet's channels and keys cannot stop a relay: counted, skipped."""
    keys = fleet_keys(fleet_prefix)
    a = await start_relay(engine=fleet(fleet_prefix, "a"))
    assert await the_holder([a]) is a
    b = await start_relay(engine=fleet(fleet_prefix, "b"))
    on_b = await Feed.open(ws_connect, b, ["AAPL"])
    await on_b.more_prices(["AAPL"], 2)
    channel = f"{keys.shard_prefix}{shard_of('AAPL', engine_of(b).config.shards)}"
    assert await redis.publish(channel, b"\x93not msgpack") == 1  # b listens (a has no clients)
    assert await redis.publish(keys.control, b"{not json") == 2
    assert await redis.publish(keys.control, b'["t"]') == 2
    await redis.hset(keys.cache, {"MSFT": b"{broken"})
    await eventually(lambda: engine_of(b).malformed >= 3)
    await on_b.subscribe(["MSFT"])  # its cache entry does not decode: read live instead
    await on_b.more_prices(["AAPL", "MSFT"], 3)
    on_b.assert_in_order("AAPL")
    response = await http.get(api(b, "/status"))
    assert response.json()["fleet"]["received"]["malformed"] == engine_of(b).malformed >= 4
    assert engine_of(b).redis_state == "up" and holders([a, b]) == [a]


# ---------------------------------------------------------------------------------- 5. losing Redis


async def test_losing_redis_keeps_clients_and_recovers(
    fleet_prefix: str,
    quiet_fmp: FakeFmpServer,
    gate: TcpGate,
    start_relay: Any,
    ws_connect: Any,
    http: httpx.AsyncClient,
) -> None:
    fake = quiet_fmp
    gated = fleet(fleet_prefix, "a", redis_url=f"redis://{gate.url_host}/0")
    a = await start_relay(engine=gated, **fmp_sections(fake))
    assert await the_holder([a]) is a
    b = await start_relay(engine={**gated, "node_id": "b"}, **fmp_sections(fake))
    c = await start_relay(engine=fleet(fleet_prefix, "c"), **fmp_sections(fake))  # keeps Redis
    # NVDA gets no update while a and b are away: reading it again must not repeat it.
    wanted = [*SYMBOLS, "NVDA"]
    on_a, on_b, on_c = feeds = [await Feed.open(ws_connect, relay, wanted) for relay in (a, b, c)]
    await demand_published(fleet_prefix, "abc", wanted)
    with trio.fail_after(WAIT):
        await fake.wait_until(lambda: fake.subscriptions == set(wanted))
    for n in range(3):
        await tick(fake, wanted, 100.0 + n)
    for feed in feeds:
        await feed.read_until(lambda: all(feed.last_seq(s) == 3 for s in wanted))  # noqa: B023 (awaited here)

    gate.cut()  # a (the holder) and b lose Redis; c does not
    for feed in (on_a, on_b):
        await feed.read_until(lambda: bool(feed.statuses("down")))  # noqa: B023 (awaited here)
        down = feed.statuses("down")[-1]
        assert "Redis" in down["reason"] and sorted(down["symbols"]) == sorted(wanted)
    await eventually(lambda: engine_of(a).redis_state == engine_of(b).redis_state == "down")
    for relay in (a, b):
        response = await http.get(api(relay, "/health"))
        body = response.json()
        assert response.status_code == 503, body
        assert body["state"] == body["code"] == "redis_down"
        assert body["fleet"]["redis"]["state"] == "down" and body["fleet"]["redis"]["error"]
        assert body["clients"] == 1  # its client stays
    # The holder could not renew its lock: it let the upstream go, and c took over when the lock expired.
    assert await the_holder([a, b, c], timeout=WAIT) is c
    assert engine_of(a).upstream is None
    with trio.fail_after(WAIT):
        await fake.wait_until(lambda: fake.logins == 2 and len(fake.connections) == 1)
        await fake.wait_until(lambda: fake.subscriptions == set(wanted))
    for n in range(2):
        await tick(fake, SYMBOLS, 200.0 + n)  # a's and b's clients miss these
    await on_c.read_until(lambda: all(on_c.last_seq(s) == 5 for s in SYMBOLS))

    gate.reopen()
    await eventually(lambda: engine_of(a).redis_state == engine_of(b).redis_state == "up", timeout=8.0)
    for relay in (a, b):
        await eventually(lambda: relay.upstream.is_fresh())  # noqa: B023 (awaited here)
        response = await http.get(api(relay, "/health"))
        assert response.status_code == 200, response.json()
        assert response.json()["fleet"]["redis"]["outages"] == 1
        assert response.json()["fleet"]["holder"] == "c"
    # Back, a and b read the cache again: their clients get the current state of each symbol
    # (seq 5, as c's client got it), nothing twice; then the live feed again.
    for feed in (on_a, on_b):
        await feed.read_until(lambda: all(feed.last_seq(s) == 5 for s in SYMBOLS))  # noqa: B023 (awaited here)
        assert feed.statuses("up")
    await tick(fake, wanted, 300.0)
    for feed in feeds:
        await feed.read_until(lambda: all(feed.last_seq(s) == 6 for s in SYMBOLS) and feed.last_seq("NVDA") == 4)  # noqa: B023
    for feed in feeds:
        assert feed.seqs("NVDA") == [1, 2, 3, 4]
        assert [p["last_price"] for p in feed.of("NVDA")] == [100.0, 101.0, 102.0, 300.0]
    for symbol in SYMBOLS:
        assert on_c.seqs(symbol) == [1, 2, 3, 4, 5, 6]
        for feed in (on_a, on_b):
            assert feed.seqs(symbol) == [1, 2, 3, 5, 6]
            assert same_fields(feed.of(symbol)[3]) == same_fields(on_c.of(symbol)[4])  # the state of seq 5
            feed.assert_in_order(symbol, contiguous=False)
    assert fake.logins == 2 and len(fake.connections) == 1


async def test_the_holders_upstream_state_reaches_every_relay(
    fleet_prefix: str, fake_fmp: FakeFmpServer, start_relay: Any, ws_connect: Any, http: httpx.AsyncClient
) -> None:
    """The provider refuses the key: every relay's clients hear it, and every /health says why."""
    fake = fake_fmp
    sections = fmp_sections(fake, auth_retry_delay=1.0)
    a = await start_relay(engine=fleet(fleet_prefix, "a"), **sections)
    assert await the_holder([a]) is a
    b = await start_relay(engine=fleet(fleet_prefix, "b"), **sections)
    on_b = await Feed.open(ws_connect, b, SYMBOLS)
    await on_b.more_prices(SYMBOLS, 1)

    fake.api_keys.clear()  # the key is revoked, and the connection drops
    await fake.drop_all()
    await on_b.read_until(lambda: bool(on_b.statuses("down")))
    down = on_b.statuses("down")[-1]
    assert down["provider"] == "fmp" and sorted(down["symbols"]) == SYMBOLS
    await eventually(lambda: a.upstream.state == "auth_failed")
    # The holder's status reaches the others at each change it signals, and every lock_ttl / 3.
    await eventually(lambda: b.upstream.state == "auth_failed", timeout=TTL)
    assert not b.upstream.is_fresh()
    response = await http.get(api(b, "/health"))
    body = response.json()
    assert response.status_code == 503, body
    # The follower reports the holder's state; its own Redis is fine.
    assert body["state"] == body["code"] == "auth_failed"
    assert body["fleet"] == {**body["fleet"], "role": "follower", "holder": "a"}
    assert body["fleet"]["redis"]["state"] == "up"

    fake.api_keys.add(FMP_KEY)  # the key works again: the holder logs in at its next attempt
    await on_b.read_until(lambda: bool(on_b.statuses("up")), timeout=2 * WAIT)
    seen = on_b.count(SYMBOLS[0])
    await on_b.more_prices(SYMBOLS, 1)
    assert on_b.count(SYMBOLS[0]) > seen
    await eventually(lambda: b.upstream.is_fresh())
    response = await http.get(api(b, "/health"))
    assert response.status_code == 200, response.json()
    assert holders([a, b]) == [a]  # a provider's trouble is not a reason to change holders
    for symbol in SYMBOLS:
        on_b.assert_in_order(symbol, contiguous=False)


# ---------------------------------------------------------------------------------- 6. shared cache


async def test_the_cache_is_shared(
    fleet_prefix: str, quiet_fmp: FakeFmpServer, start_relay: Any, ws_connect: Any, http: httpx.AsyncClient
) -> None:
    fake = quiet_fmp
    a = await start_relay(engine=fleet(fleet_prefix, "a"), **fmp_sections(fake))
    b = await start_relay(engine=fleet(fleet_prefix, "b"), **fmp_sections(fake))
    await the_holder([a, b])
    on_a = await Feed.open(ws_connect, a, ["AAPL"])
    on_b = await Feed.open(ws_connect, b, ["AAPL", "MSFT"])  # only b's client wants MSFT
    await demand_published(fleet_prefix, "a", ["AAPL"])
    await demand_published(fleet_prefix, "b", ["AAPL", "MSFT"])
    with trio.fail_after(WAIT):
        await fake.wait_until(lambda: fake.subscriptions == {"AAPL", "MSFT"})
    for n in range(2):
        await tick(fake, ["AAPL", "MSFT"], 50.0 + n)
    await on_a.read_until(lambda: on_a.last_seq("AAPL") == 2)
    await on_b.read_until(lambda: on_b.last_seq("AAPL") == on_b.last_seq("MSFT") == 2)

    on_relay = [await http.get(api(relay, "/cache")) for relay in (a, b)]
    for response in on_relay:
        assert response.status_code == 200
        assert response.headers["X-Cache-Source"] == "fleet"
    data = on_relay[0].json()["data"]
    assert on_relay[1].json()["data"] == data
    assert sorted(data) == ["AAPL", "MSFT"]
    assert same_fields(data["MSFT"]) == same_fields(on_b.of("MSFT")[-1])
    assert a.hub.snapshot("MSFT") is None  # a's answer came from Redis
    for relay in (a, b):
        response = await http.get(api(relay, "/cache/MSFT"))
        assert response.status_code == 200 and response.headers["X-Cache-Source"] == "fleet"
        assert response.json() == data["MSFT"]
        assert (await http.get(api(relay, "/cache/NOPE"))).status_code == 404

    # A client on a, where nobody had MSFT: the cached state first, then the live ones.
    await on_a.subscribe(["MSFT"])
    await on_a.read_until(lambda: on_a.last_seq("MSFT") == 2)
    assert same_fields(on_a.of("MSFT")[0]) == same_fields(data["MSFT"])
    await tick(fake, ["MSFT"], 60.0)
    await on_a.read_until(lambda: on_a.last_seq("MSFT") == 3)
    assert on_a.seqs("MSFT") == [2, 3]
    assert on_a.of("MSFT")[1]["last_price"] == 60.0


# ---------------------------------------------------------------------------------- 7. the stream


async def test_the_stream_keeps_about_stream_maxlen_updates(
    fleet_prefix: str, start_relay: Any, ws_connect: Any, redis: coredis.Redis[bytes]
) -> None:
    cap = 200
    node_entries = int((await redis.config_get(["stream-node-max-entries"]))[b"stream-node-max-entries"])
    stream = fleet_keys(fleet_prefix).stream
    a = await start_relay(engine=fleet(fleet_prefix, "a", stream_maxlen=cap), sim={"rate": 200.0})
    engine = engine_of(a)
    await the_holder([a])
    feed = await Feed.open(ws_connect, a, ["AAPL", "MSFT", "NVDA"])
    await feed.more_prices(["AAPL"], 1)
    first = await redis.xlen(stream)
    assert 0 < first
    await eventually(lambda: engine.updates_out >= 3 * (cap + node_entries), timeout=10.0)
    length = await redis.xlen(stream)
    # MAXLEN ~ trims whole macro nodes: between the cap and the cap plus one node.
    assert cap <= length <= cap + node_entries, length
    entries = await redis.xrevrange(stream, count=30)
    assert len(entries) == 30
    seqs: dict[str, list[int]] = {}  # newest first
    for entry in entries:
        fields = entry.field_values
        assert set(fields) == {b"symbol", b"update"}
        raw_symbol = fields[b"symbol"]
        symbol = raw_symbol.decode() if isinstance(raw_symbol, bytes) else raw_symbol
        update = json.loads(fields[b"update"])
        assert update["symbol"] == symbol and symbol in ("AAPL", "MSFT", "NVDA")
        assert update["epoch"] == engine.epoch
        seqs.setdefault(symbol, []).append(update["seq"])
    for symbol, newest_first in seqs.items():  # every update of each symbol, in order
        assert newest_first == list(range(newest_first[0], newest_first[0] - len(newest_first), -1)), symbol


async def test_the_archiver_writes_the_stream_into_the_history_once_and_acknowledges_it(
    fleet_prefix: str,
    quiet_fmp: FakeFmpServer,
    start_relay: Any,
    ws_connect: Any,
    redis: coredis.Redis[bytes],
    nursery: trio.Nursery,
    tmp_path: Any,
) -> None:
    """``trio-relay archive``: what a crashed archiver read and did not write is written by the next."""
    fake, keys = quiet_fmp, fleet_keys(fleet_prefix)
    a = await start_relay(engine=fleet(fleet_prefix, "a", stream_maxlen=10_000), **fmp_sections(quiet_fmp))
    await the_holder([a])
    feed = await Feed.open(ws_connect, a, SYMBOLS)
    with trio.fail_after(WAIT):
        await fake.wait_until(lambda: fake.subscriptions == set(SYMBOLS))
    for n in range(5):
        await tick(fake, SYMBOLS, 100.0 + n)
    await feed.read_until(lambda: all(feed.last_seq(s) == 5 for s in SYMBOLS))
    await redis.xadd(keys.stream, {"symbol": "AAPL", "update": "not json"})  # somebody else's garbage

    # A first archiver whose database cannot be opened (its data_dir is a file): it reads, cannot
    # write, so it acknowledges nothing; then it dies.
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    config = make_config(engine=fleet(fleet_prefix, "x"), history={"backend": "sqlite", "data_dir": str(blocked)})
    broken_writer = HistoryWriter(SqliteBackend(str(blocked)), shutdown_timeout=0)
    first = Archiver(config, broken_writer, consumer="arc")
    async with trio.open_nursery() as crashing:
        await crashing.start(broken_writer.run)
        crashing.start_soon(first.run)
        await eventually(lambda: first.read == 11 and broken_writer.state == "down")
        crashing.cancel_scope.cancel()  # the archiver dies
    # Acknowledged in order: not even the garbage (after the unwritten updates) was.
    assert first.acked == 0 and first.malformed == 1
    assert (await redis.xpending(keys.stream, "history")).pending == 11

    # The next archiver (same consumer name) reads its pending entries first, then new ones.
    good = make_config(engine=fleet(fleet_prefix, "x"), history={"backend": "sqlite", "data_dir": str(tmp_path / "db")})
    backend = make_backend(good.history)
    assert backend is not None
    writer = HistoryWriter.from_config(good.history, backend)
    second = Archiver(good, writer, consumer="arc")
    async with trio.open_nursery() as inner:
        await inner.start(writer.run)
        inner.start_soon(second.run)
        await tick(fake, SYMBOLS, 200.0)
        await eventually(lambda: second.acked == 13, timeout=2 * WAIT)  # 11 pending + 2 new
        assert second.malformed == 1
        inner.cancel_scope.cancel()
    assert (await redis.xpending(keys.stream, "history")).pending == 0
    async with HistoryStore(backend) as store:
        for symbol in SYMBOLS:
            ticks, _ = await store.ticks(symbol, 0, 2**62)
            assert [t.last_price for t in ticks] == [100.0, 101.0, 102.0, 103.0, 104.0, 200.0]
            stream_prices = [p["last_price"] for p in feed.of(symbol)]
            assert stream_prices[:5] == [100.0, 101.0, 102.0, 103.0, 104.0]
            assert all(t.recv_ms > 0 for t in ticks)


# ---------------------------------------------------------------------------------- 8. config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("redis_url", "http://127.0.0.1:6379/0"),
        ("redis_url", "redis://:s3cret-pw@127.0.0.1:notaport/0"),
        ("prefix", "has space"),
        ("prefix", ""),
        ("lock_ttl", 0.5),
        ("demand_ttl", 0),
    ],
)
def test_bad_engine_settings_fail_at_load(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(engine={"backend": "redis", key: value})
    assert f"engine.{key}" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)


async def test_the_redis_password_is_never_shown(
    fleet_prefix: str, start_relay: Any, ws_connect: Any, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.socket.socket() as sock:  # a port where nothing listens
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    password = "s3cret-pw"
    a = await start_relay(engine=fleet(fleet_prefix, "a", redis_url=f"redis://:{password}@127.0.0.1:{port}/0"))
    await eventually(lambda: engine_of(a).redis_state == "down")
    feed = await Feed.open(ws_connect, a, ["AAPL"])
    await feed.read_until(lambda: bool(feed.statuses("down")))  # its clients are told, too
    health = await http.get(api(a, "/health"))
    status = await http.get(api(a, "/status"))
    assert health.status_code == 503 and health.json()["code"] == "redis_down"
    assert status.json()["fleet"]["redis"]["state"] == "down" and status.json()["fleet"]["redis"]["error"]
    assert f"127.0.0.1:{port}" in caplog.text  # the error is reported, with where
    for text in (health.text, status.text, caplog.text, json.dumps(feed.messages), repr(a.config)):
        assert password not in text


async def test_the_archiver_rides_out_a_redis_outage(
    fleet_prefix: str,
    quiet_fmp: FakeFmpServer,
    start_relay: Any,
    ws_connect: Any,
    gate: TcpGate,
    tmp_path: Any,
) -> None:
    fake = quiet_fmp
    a = await start_relay(engine=fleet(fleet_prefix, "a", stream_maxlen=10_000), **fmp_sections(quiet_fmp))
    await the_holder([a])
    feed = await Feed.open(ws_connect, a, SYMBOLS)
    with trio.fail_after(WAIT):
        await fake.wait_until(lambda: fake.subscriptions == set(SYMBOLS))
    config = make_config(
        engine=fleet(fleet_prefix, "x", redis_url=f"redis://{gate.url_host}/0"),
        history={"backend": "sqlite", "data_dir": str(tmp_path)},
    )
    backend = make_backend(config.history)
    assert backend is not None
    writer = HistoryWriter.from_config(config.history, backend)
    archiver = Archiver(config, writer)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        nursery.start_soon(archiver.run)
        await tick(fake, SYMBOLS, 1.0)
        await eventually(lambda: archiver.acked == 2)
        gate.cut()
        await eventually(lambda: archiver.redis_state == "down")
        await tick(fake, SYMBOLS, 2.0)  # into the stream while the archiver is away
        await feed.read_until(lambda: all(feed.last_seq(s) == 2 for s in SYMBOLS))
        gate.reopen()
        await eventually(lambda: archiver.redis_state == "up" and archiver.acked == 4, timeout=2 * WAIT)
        nursery.cancel_scope.cancel()
    async with HistoryStore(backend) as store:
        for symbol in SYMBOLS:
            ticks, _ = await store.ticks(symbol, 0, 2**62)
            assert [t.last_price for t in ticks] == [1.0, 2.0]  # each once


def test_archive_refuses_a_config_without_history(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from trio_relay.cli import main

    path = tmp_path / "archive.toml"
    path.write_text('[history]\nbackend = "off"\n')
    assert main(["archive", "--config", str(path)]) == 2
    assert "history.backend" in capsys.readouterr().err


async def test_the_publish_pacer_batches_only_a_busy_feed(autojump_clock: trio.testing.MockClock) -> None:
    # virtual time (MockClock)
    from trio_relay.engine.redis import Pacer

    pace = Pacer(0.002)
    start = trio.current_time()
    await pace.wait()  # a first publish goes at once
    assert trio.current_time() == start
    await pace.wait()  # right after: waits out the interval
    assert trio.current_time() == start + 0.002
    await trio.sleep(1.0)  # virtual time (MockClock): a quiet feed
    before = trio.current_time()
    await pace.wait()
    assert trio.current_time() == before  # waits for nothing


def test_nothing_outside_the_engine_asks_which_backend_runs() -> None:
    """The Engine seam: only trio_relay/engine/ (and open_engine's one choice) knows the backends."""
    from pathlib import Path

    import trio_relay

    root = Path(trio_relay.__file__).parent
    asking = ("FleetUpstream", "RedisEngine", "MemoryEngine", 'backend == "redis"', 'backend == "memory"')
    offenders = [
        f"{path.relative_to(root)}: {needle}"
        for path in root.rglob("*.py")
        if "engine" not in path.relative_to(root).parts[:1]
        for needle in asking
        if needle in path.read_text()
    ]
    assert offenders == []
