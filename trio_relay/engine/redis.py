"""The fleet engine (``engine.backend = "redis"``): many relays, one Redis, ONE upstream connection.

Every relay of a fleet (same Redis, same ``engine.prefix``) runs this engine instead of holding
the upstream itself:

- **Election.** Relays race for the lock ``<prefix>:holder`` (``SET NX PX lock_ttl`` in a script,
  renewed every ``lock_ttl / 3``). Its value is ``"<epoch>|<token>|<node>#<instance>"``: each
  acquisition takes a new fencing token from ``<prefix>:fence`` within the Redis's epoch
  ``<prefix>:epoch`` (created with the first lock of a Redis, so gone with its data). The winner
  runs the ordinary :class:`Upstream`.
- **Sequence truth.** Messages of a holder compare by (epoch, token): within an epoch the newest
  token wins; an epoch never seen is new (Redis lost its data) and is adopted; an epoch left is
  stale. The hub of each relay takes seq and epoch from the updates; a new epoch restarts its
  numbering and is announced to its clients.
- **Heartbeat.** The holder publishes its upstream's status every ``lock_ttl / HEARTBEATS``; a
  relay that hears none for ``HOLDER_SILENCE × lock_ttl`` tells its clients the upstream is down.
- **Demand.** Every relay writes the symbols its clients want (its hub's ``demand.wanted``,
  pins included) to ``<prefix>:demand:<node>`` with a ``demand_ttl`` expiry, refreshed every
  ``demand_ttl / 3``: a relay that dies stops wanting anything when its key expires. The holder
  subscribes upstream to the union (an unwanted symbol lingers ``upstream.unsubscribe_linger``).
- **Fan-out.** The holder numbers each update (per symbol, in the fleet's epoch) and publishes it
  ONCE, through a Lua script that first checks the lock still holds its token: a holder that lost
  the lock can publish nothing more (the fencing). Updates go out on ``engine.shards`` channels
  by a hash of the symbol; the same script writes each symbol's merged state to the shared cache
  ``<prefix>:cache`` and, when ``stream_maxlen > 0``, appends each update to the stream
  ``<prefix>:ticks``. Every relay (the holder too) takes the updates from its subscriptions and
  hands them to its own hub, so outboxes, batching and conflation work as on a single relay, and
  the seq a client sees is the same on every relay.
- **Delivery at most once.** A relay drops an update whose seq it already passed on (a cache
  read racing the live channel, a batch from an older fencing token), and a client that resumed
  with ``since`` gets nothing at or below it: one update reaches one client at most once, also
  across a takeover, and nothing is replayed that the client saw.
- **Losing Redis.** A relay that cannot reach Redis keeps its clients, tells them the upstream
  is down (reason: Redis unreachable), reports ``redis_down`` in /health and /status, and
  reconnects with backoff; on its return it publishes its demand again and re-reads the cache
  for every wanted symbol, so each client gets the current price of everything it follows.
  A holder that loses Redis stops holding at once (it could not renew the lock).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, cast

import attrs
import coredis
import coredis.exceptions
import msgspec
import trio
from coredis.retry import NoRetryPolicy
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import Config, EngineConfig, UpstreamConfig
from ..hub import Demand, Hub, Stats, new_epoch
from ..model import AMENDS, Encoder, PriceState, ProviderSwitched, Update
from ..providers.base import Provider
from ..upstream import Backoff, Item, Upstream, UpstreamState
from .fleet_view import FleetUpstream
from .redis_client import REDIS_ERRORS, REDIS_FAILURES, describe_failure, is_redis_failure, redis_client
from .schemas import FleetHealth, FleetRole, FleetStatus, RedisState

__all__ = ["RedisEngine", "FleetBatch", "fleet_keys", "shard_of"]

log = logging.getLogger("trio_relay.fleet")

# The holder's heartbeat (its status, published) goes out every lock_ttl / HEARTBEATS; a relay
# that hears none for HOLDER_SILENCE × lock_ttl tells its clients the upstream is down (so within
# about lock_ttl of losing the holder, while the lock itself lives lock_ttl).
HEARTBEATS = 4
HOLDER_SILENCE = 0.75
# Epochs a relay remembers having left: a message of one of them is stale, never a new epoch.
RETIRED_EPOCHS = 16

# Most updates published in one script call (the Lua stack and the reply stay small).
MAX_BATCH = 2000
# The holder publishes at most once per interval, so a busy feed goes out in batches (seconds).
PUBLISH_INTERVAL = 0.002

# The lock's value is "<epoch>|<token>|<node>#<instance>". The epoch is created with the first
# lock of a Redis (it is gone with the data), so a fencing token compares within one epoch and a
# Redis that lost its data (the counter back at 0) starts a new epoch instead of fencing the fleet
# out. A lock that already names this very process (ARGV[3]: "|<node>#<instance>") is a grab whose
# caller gave up waiting (Redis was paused): it is handed back, so the caller holds it at once
# instead of nobody holding it for a whole lock_ttl.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then
  if string.sub(held, -string.len(ARGV[3])) == ARGV[3] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])  -- a whole lock_ttl before its first renewal
    return held
  end
  return false
end
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[3], epoch)
end
local token = redis.call('INCR', KEYS[2])
local value = epoch .. '|' .. token .. ARGV[3]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# The holder's status (and, if ARGV[5] is not empty, a control message): fenced like a publish.
_ANNOUNCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""

# ARGV: lock value, #channels, #cache entries, stream cap, then channel/payload pairs, cache
# field/value pairs, stream symbol/update pairs. Refused (0) unless the lock holds our token.
_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local i = 5
for _ = 1, tonumber(ARGV[2]) do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
  i = i + 2
end
local n = tonumber(ARGV[3])
if n > 0 then
  redis.call('HSET', KEYS[2], unpack(ARGV, i, i + 2 * n - 1))
  i = i + 2 * n
end
local cap = tonumber(ARGV[4])
if cap > 0 then
  while i < #ARGV do
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', cap, '*', 'symbol', ARGV[i], 'update', ARGV[i + 1])
    i = i + 2
  end
end
return 1
"""

# Every live relay's demand (a JSON list each); forgets the relays whose key expired.
_DEMAND_UNION = """
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local d = redis.call('GET', ARGV[1] .. node)
  if d then table.insert(out, d) else redis.call('SREM', KEYS[1], node) end
end
return out
"""


class FleetBatch(msgspec.Struct, array_like=True, gc=False):
    """One published message: updates of one shard, numbered in ``epoch``, under fencing ``token``."""

    token: int
    epoch: str
    updates: list[Update]


@attrs.frozen
class FleetKeys:
    holder: str
    fence: str
    epoch: str
    cache: str
    status: str
    nodes: str
    demand_prefix: str
    stream: str
    control: str
    shard_prefix: str


def fleet_keys(prefix: str) -> FleetKeys:
    """Every key and channel of the fleet ``prefix`` (also for tests and tools)."""
    return FleetKeys(
        holder=f"{prefix}:holder",
        fence=f"{prefix}:fence",
        epoch=f"{prefix}:epoch",
        cache=f"{prefix}:cache",
        status=f"{prefix}:upstream",
        nodes=f"{prefix}:nodes",
        demand_prefix=f"{prefix}:demand:",
        stream=f"{prefix}:ticks",
        control=f"{prefix}:control",
        shard_prefix=f"{prefix}:u:",
    )


def shard_of(symbol: str, shards: int) -> int:
    return zlib.crc32(symbol.encode()) % shards


def _default_node_id() -> str:
    return f"{socket.gethostname().split('.')[0][:32]}-{os.getpid()}-{os.urandom(2).hex()}"


class _LockLost(Exception):
    pass


class RedisEngine:
    """One relay's part of the fleet. Run with :meth:`run`; :attr:`view` is its upstream status."""

    def __init__(self, config: Config, hub: Hub, providers: Sequence[Provider], stats: Stats) -> None:
        self.config: EngineConfig = config.engine
        self.upstream_config: UpstreamConfig = config.upstream
        self.secrets = config.secrets()  # masked out of the held upstream's errors
        self.hub = hub
        self.stats = stats
        self.providers = list(providers)
        self.node = self.config.node_id or _default_node_id()
        # Names this process in the lock's value, so it knows a lock its own late command took.
        self._owner = f"|{self.node}#{os.urandom(4).hex()}"
        self.keys = fleet_keys(self.config.prefix)
        self._view = FleetUpstream(self)
        self._channel0 = f"{self.keys.shard_prefix}0"
        # Redis connection state, for /health and /status.
        self.redis_state = RedisState.CONNECTING
        self.redis_error = ""
        self.redis_since: float | None = None  # wall clock of the last change
        self.redis_outages = 0
        # This relay's role; the lock's fencing token while it is the holder.
        self.role = FleetRole.FOLLOWER
        self.token = 0
        self.terms = 0  # times this relay became the holder
        self.upstream: Upstream | None = None  # the running upstream while holder
        self._redis: coredis.Redis[bytes] | None = None  # while connected (for REST reads)
        # What the holder last published about its upstream (None: no holder known).
        self.holder_status: dict[str, Any] | None = None
        self._holder_seen_at: float | None = None  # trio clock
        # Delivery state (every relay): the newest (epoch, fencing token) heard from a holder.
        self.epoch: str | None = None
        self._token_seen = 0
        self._retired: deque[str] = deque(maxlen=RETIRED_EPOCHS)
        self.last_batch_at: float | None = None  # trio clock
        self.batches_in = 0
        self.stale_batches = 0
        self.malformed = 0
        # Holder counters.
        self.batches_out = 0
        self.updates_out = 0
        self.fleet_symbols: set[str] = set()  # the union of the fleet's demand (holder)
        self._signal: tuple[str, str] | None = None  # last (signal, provider) given to the hub
        self._released = trio.Event()
        self._demand_changed = trio.Event()
        self._stop = trio.Event()
        self._stepped_down = trio.Event()
        self._hub_send, self._hub_receive = trio.open_memory_channel[Item](config.upstream.queue_size)
        self._events_send, self._events_receive = trio.open_memory_channel[tuple[str, str, str]](64)
        self._msgpack = msgspec.msgpack.Encoder()
        self._batch_decoder = msgspec.msgpack.Decoder(FleetBatch)
        self._json = msgspec.json.Encoder()
        self._state_decoder = msgspec.json.Decoder(PriceState)

    # ------------------------------------------------------------------ the Engine interface
    @property
    def view(self) -> FleetUpstream:
        return self._view

    def fleet_health(self) -> FleetHealth:
        return self._view.fleet_health()

    def fleet_status(self) -> FleetStatus:
        return self._view.fleet_status()

    def metrics(self) -> Iterator[Metric]:
        """This relay's part in the fleet, for /metrics."""
        yield GaugeMetricFamily(
            "trio_relay_fleet_redis_up",
            "1 while this relay is connected to the fleet's Redis",
            value=int(self.redis_state == RedisState.UP),
        )
        yield GaugeMetricFamily(
            "trio_relay_fleet_holder",
            "1 while this relay holds the fleet's upstream connection",
            value=int(self.role == FleetRole.HOLDER),
        )
        for name, doc, value in (
            ("fleet_redis_outages", "Times this relay lost Redis", self.redis_outages),
            ("fleet_terms", "Times this relay became the upstream holder", self.terms),
            ("fleet_batches_received", "Fan-out messages received from Redis", self.batches_in),
            ("fleet_duplicates_dropped", "Updates dropped because their seq was already passed on", self.duplicates),
            ("fleet_stale_token_dropped", "Fan-out messages of an older holder dropped", self.stale_batches),
            ("fleet_updates_published", "Updates published to the fleet while holding the upstream", self.updates_out),
        ):
            yield CounterMetricFamily(f"trio_relay_{name}", doc, value=value)

    @property
    def duplicates(self) -> int:
        """Updates dropped because this relay had already passed them on (counted by the hub)."""
        return self.hub.stats.duplicates

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Close the upstream cleanly (if held), release the lock, and make :meth:`run` return."""
        if self.upstream is not None:
            self.upstream.stop()
        self._stop.set()

    def restart(self, providers: Sequence[Provider], config: UpstreamConfig, secrets: Sequence[str] = ()) -> None:
        """New provider settings (reload): used from the next holding on, and now if holding."""
        self.providers = list(providers)
        self.upstream_config = config
        self.secrets = list(dict.fromkeys([*self.secrets, *secrets]))
        if self.upstream is not None:
            self.upstream.restart(providers, config, secrets)

    async def cached_states(self, symbols: Sequence[str] | None = None) -> dict[str, PriceState] | None:
        """The shared cache: of ``symbols``, or of every symbol the fleet wants (None: no Redis)."""
        redis = self._redis
        if redis is None:
            return None
        try:
            with trio.fail_after(self.config.timeout):
                if symbols is None:
                    symbols = sorted(await self._demand_union(redis))
                values = await redis.hmget(self.keys.cache, list(symbols)) if symbols else ()
        except REDIS_FAILURES:
            return None
        states: dict[str, PriceState] = {}
        for raw in values:
            if raw is None:
                continue
            try:
                state = self._state_decoder.decode(raw)
            except msgspec.DecodeError:
                continue
            if state.seq:
                states[state.symbol] = state
        return states

    async def _demand_union(self, redis: coredis.Redis[bytes]) -> set[str]:
        union_script = redis.register_script(_DEMAND_UNION)
        parts: Any = await union_script(keys=[self.keys.nodes], args=[self.keys.demand_prefix])
        union: set[str] = set()
        for part in cast("list[bytes]", parts):
            try:
                union.update(msgspec.json.decode(part, type=list[str]))
            except msgspec.DecodeError:
                self._malformed("demand entry")
        return union

    def channel(self, symbol: str) -> str:
        if self.config.shards == 1:
            return self._channel0  # the default: no hash per update
        return f"{self.keys.shard_prefix}{shard_of(symbol, self.config.shards)}"

    # ------------------------------------------------------------------ lifetime
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.hub.consume, self._hub_receive)
            nursery.start_soon(self._sessions)
            task_status.started()
            await self._stop.wait()
            if self.role == FleetRole.HOLDER:
                # The holder closes its upstream cleanly and hands the lock over (see _hold).
                with trio.move_on_after(1.0):
                    await self._stepped_down.wait()
            await self._withdraw_demand()
            nursery.cancel_scope.cancel()

    async def _withdraw_demand(self) -> None:
        """On a clean stop the fleet forgets this relay's demand at once (not after demand_ttl)."""
        redis = self._redis
        if redis is None:
            return
        with trio.move_on_after(0.5):
            try:
                await redis.delete([self.keys.demand_prefix + self.node])
                await redis.srem(self.keys.nodes, [self.node])
                await redis.publish(self.keys.control, b'{"t":"demand"}')
            except REDIS_FAILURES:
                pass  # it expires after demand_ttl anyway

    def _connect(self) -> coredis.Redis[bytes]:
        return redis_client(self.config, f"trio-relay:{self.node}")

    async def _sessions(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                async with self._connect() as redis:
                    with trio.fail_after(self.config.timeout):
                        await redis.ping()
                    self._redis_up()
                    backoff.reset()
                    self._redis = redis
                    try:
                        await self._session(redis)
                    finally:
                        self._redis = None
            except BaseException as exc:  # noqa: BLE001 (sorted right below)
                if not is_redis_failure(exc, also=(trio.Cancelled,)):
                    raise
                if isinstance(exc, BaseExceptionGroup):
                    cancelled, _ = exc.split(trio.Cancelled)
                    if cancelled is not None:
                        raise cancelled from None  # torn down (shutdown): a closed connection is no news
                elif isinstance(exc, trio.Cancelled):
                    raise
                self._redis_down(describe_failure(exc))
            delay = backoff.next_delay()
            await trio.sleep(delay)

    def _redis_up(self) -> None:
        if self.redis_state != RedisState.UP:
            if self.redis_state == RedisState.DOWN:
                log.warning("[FLEET] Redis is back (%s); node %s rejoins the fleet", self._where(), self.node)
            else:
                log.info("[FLEET] node %s joined the fleet %r on %s", self.node, self.config.prefix, self._where())
            self.redis_state, self.redis_error, self.redis_since = RedisState.UP, "", time.time()

    def _redis_down(self, error: str) -> None:
        if self.redis_state != RedisState.DOWN:
            self.redis_outages += 1
            self.redis_since = time.time()
            log.error("[FLEET] lost Redis (%s): %s; clients stay connected, retrying", self._where(), error)
        self.redis_state, self.redis_error = RedisState.DOWN, error
        self.holder_status = None
        self._give_signal("down", f"Redis unreachable ({error})")

    def _where(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self.config.redis_url)
        return f"{parts.hostname}:{parts.port or 6379}"  # never the password

    async def _session(self, redis: coredis.Redis[bytes]) -> None:
        self._released = trio.Event()
        pubsub = redis.pubsub(
            channels=[self.keys.control], retry_policy=NoRetryPolicy(), ignore_subscribe_messages=True
        )
        async with pubsub as ps:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, ps)
                nursery.start_soon(self._follow_demand, redis, ps)
                nursery.start_soon(self._watch_holder, redis)
                nursery.start_soon(self._elect, redis)

    # ------------------------------------------------------------------ every relay
    async def _read(self, ps: Any) -> None:
        control = self.keys.control.encode()
        while True:
            message = await ps.get_message()
            if message is None or message["type"] != "message":
                continue
            channel, data = message["channel"], message["data"]
            if channel == control:
                self._on_control(data)
            else:
                await self._on_batch(data)

    async def _on_batch(self, data: bytes) -> None:
        try:
            batch = self._batch_decoder.decode(data)
        except msgspec.DecodeError as exc:
            self._malformed(f"fan-out message ({exc})")
            return
        self.batches_in += 1
        if not self._current(batch.epoch, batch.token):
            self.stale_batches += 1  # an older holder's (the lock's script should have refused it)
            return
        self.last_batch_at = self._holder_seen_at = trio.current_time()
        # An update the hub already passed on (a cache read racing this feed) is dropped there;
        # the first update of a new epoch makes the hub restart its numbering (in order).
        await self._hub_send.send(batch.updates)

    def _malformed(self, what: str) -> None:
        """Counted, and logged (the first ten, then every thousandth): never fatal."""
        self.malformed += 1
        self.stats.malformed += 1
        if self.malformed <= 10 or self.malformed % 1000 == 0:
            log.warning("[FLEET] malformed %s skipped (%d so far)", what, self.malformed)

    def _current(self, epoch: str, token: int) -> bool:
        """Is a holder's message (its epoch, its fencing token) current? Adopts a new epoch.

        Within an epoch the newest token wins. An epoch this relay never had is a new one (Redis
        lost its data: the fencing counter started again): it is adopted, whatever its token. An
        epoch this relay left is stale.
        """
        if epoch == self.epoch:
            if token < self._token_seen:
                return False
            self._token_seen = token
            return True
        if epoch in self._retired:
            return False
        self._new_epoch(epoch)
        self._token_seen = token
        return True

    def _new_epoch(self, epoch: str) -> None:
        if self.epoch is not None:
            log.warning("[FLEET] the fleet's sequence space is now %s (was %s): numbering restarts", epoch, self.epoch)
            self._retired.append(self.epoch)
        self.epoch = epoch

    def _on_control(self, data: bytes) -> None:
        try:
            message = msgspec.json.decode(data)
            kind = message["t"]
        except (msgspec.DecodeError, KeyError, TypeError):
            self._malformed("control message")
            return
        if kind == "demand":
            self._demand_changed.set()
        elif kind == "released":
            self._released.set()
        elif kind == "upstream":
            status = message.get("status")
            if isinstance(status, dict):
                self._on_status(status)

    def _on_status(self, status: dict[str, Any]) -> None:
        """The holder's heartbeat: its upstream's state (ignored if from an older holder)."""
        try:
            current = self._current(str(status.get("epoch", "")), int(status.get("token", 0)))
        except (TypeError, ValueError):
            self._malformed("holder status")
            return
        if not current:
            return
        self.holder_status = status
        self._holder_seen_at = trio.current_time()
        self._give_signal(str(status.get("signal", "")), str(status.get("reason", "")), str(status.get("provider", "")))

    def _give_signal(self, signal: str, reason: str, provider: str | None = None) -> None:
        """Tell the hub's clients the fleet's upstream state (once per change)."""
        if signal not in ("up", "down", "stale", "failover"):
            return
        if provider is None:
            provider = self.view.provider.name
        if self._signal == (signal, provider) and signal != "failover":
            return
        if self._signal is None and signal == "up":
            self._signal = (signal, provider)  # nothing was wrong: clients need not hear it
            return
        self._signal = (signal, provider)
        self.hub.upstream_event(signal, provider, reason)

    async def _follow_demand(self, redis: coredis.Redis[bytes], ps: Any) -> None:
        """Publish this relay's demand; listen to (and read the cache of) what its clients want.

        Each session starts with nothing read: what came in while this relay was away is in the
        cache, so every wanted symbol is read again (the hub drops a state it already passed on).
        """
        subscribed: set[str] = set()  # shard channels
        primed: set[str] = set()  # symbols whose cached state was read in this session
        demand = self.hub.demand
        keys = self.keys
        published: set[str] | None = None
        ttl_ms = int(self.config.demand_ttl * 1000)
        next_beat = 0.0
        while True:
            demand.expire()  # a symbol whose last client left stops being wanted after the linger
            changed = demand.changed_event()
            wanted = set(demand.wanted)
            new = wanted - primed
            need = {self.channel(s) for s in wanted}
            with trio.fail_after(self.config.timeout):
                if need - subscribed:
                    await ps.subscribe(*sorted(need - subscribed))
                    subscribed |= need
                if subscribed - need:
                    await ps.unsubscribe(*sorted(subscribed - need))
                    subscribed &= need
            primed.clear()
            primed |= wanted
            if new:
                await self._prime(redis, sorted(new))
            now = trio.current_time()
            if wanted != published or now >= next_beat:
                with trio.fail_after(self.config.timeout):
                    await redis.set(keys.demand_prefix + self.node, self._json.encode(sorted(wanted)), px=ttl_ms)
                    await redis.sadd(keys.nodes, [self.node])
                    if wanted != published:
                        await redis.publish(keys.control, b'{"t":"demand"}')
                published = wanted
                next_beat = now + self.config.demand_ttl / 3
            with trio.move_on_at(min(next_beat, demand.next_expiry())):
                await changed.wait()

    async def _prime(self, redis: coredis.Redis[bytes], symbols: list[str]) -> None:
        """Hand the hub the cached state of newly wanted symbols (their subscribers' snapshot)."""
        for start in range(0, len(symbols), 1000):
            chunk = symbols[start : start + 1000]
            with trio.fail_after(self.config.timeout):
                values = await redis.hmget(self.keys.cache, chunk)
            updates: list[Update] = []
            for raw in values:
                if raw is None:
                    continue
                try:
                    state = self._state_decoder.decode(raw)
                except msgspec.DecodeError:
                    self._malformed("cache entry")
                    continue
                if self.epoch is None:
                    self._new_epoch(state.epoch)
                if state.epoch != self.epoch:
                    continue
                updates.append(_state_update(state))
            if updates:
                await self._hub_send.send(updates)

    async def _watch_holder(self, redis: coredis.Redis[bytes]) -> None:
        """Follow the holder's heartbeat; with none for HOLDER_SILENCE × lock_ttl, say so.

        The holder's status key gives a relay that joins the state at once; from then on the
        heartbeats (control messages, every lock_ttl / HEARTBEATS) keep it, and their absence is
        noticed on this relay's own clock: within about lock_ttl of the holder's death or freeze
        or the fleet losing it, the clients hear ``down`` and /health says 503.
        """
        with trio.fail_after(self.config.timeout):
            raw = await redis.get(self.keys.status)
        if raw is not None:
            try:
                status = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                self._malformed("holder status")
            else:
                if isinstance(status, dict):
                    self._on_status(status)
        silence = self.config.lock_ttl * HOLDER_SILENCE
        joined = trio.current_time()
        while True:
            seen = self._holder_seen_at if self._holder_seen_at is not None else joined
            now = trio.current_time()
            quiet = now - seen
            if quiet >= silence and (
                self.holder_status is not None or self._signal is None or self._signal[0] != "down"
            ):
                self.holder_status = None
                # The holder too: its clients' prices come back to it through Redis.
                self._give_signal("down", f"no heartbeat from the fleet's upstream holder for {quiet:.1f}s")
            # Wake when the silence would be long enough (a heartbeat meanwhile moves it on).
            await trio.sleep_until(seen + silence if quiet < silence else now + silence / 4)

    # ------------------------------------------------------------------ the holder
    async def _elect(self, redis: coredis.Redis[bytes]) -> None:
        acquire = redis.register_script(_ACQUIRE)
        ttl_ms = int(self.config.lock_ttl * 1000)
        while not self._stop.is_set():
            # Armed before trying: a "released" that comes while the attempt is on its way wakes
            # the wait below instead of being lost (which would cost a whole lock_ttl / 3).
            released = self._released = trio.Event()
            # If this times out (Redis paused) the script may still run later: the lock it takes
            # then names this process, and the next attempt takes it back (_ACQUIRE).
            with trio.fail_after(self.config.timeout):
                value: Any = await acquire(
                    keys=[self.keys.holder, self.keys.fence, self.keys.epoch],
                    args=[self.node, ttl_ms, self._owner, new_epoch()],
                )
            if value:
                await self._hold(redis, value.decode() if isinstance(value, bytes) else str(value))
                continue
            with trio.move_on_after(self.config.lock_ttl / 3):
                await released.wait()
        await trio.sleep_forever()

    async def _hold(self, redis: coredis.Redis[bytes], value: str) -> None:
        epoch, token_text, _owner = value.split("|", 2)
        token = int(token_text)
        self.role, self.token = FleetRole.HOLDER, token
        self._stepped_down = trio.Event()
        self.terms += 1
        self._current(epoch, token)
        # The first holder of a fleet is routine; any later one is a takeover, worth a warning.
        log.log(
            logging.INFO if token == 1 else logging.WARNING,
            "[FLEET] node %s now holds the upstream (epoch %s, fencing token %d)",
            self.node,
            epoch,
            token,
        )
        try:
            with trio.fail_after(self.config.timeout * 2):
                states = await self._load_states(redis, epoch)
            send, receive = trio.open_memory_channel[Item](self.upstream_config.queue_size)
            fleet_demand = Demand(self.upstream_config.unsubscribe_linger)
            upstream = Upstream(
                self.providers, fleet_demand, send, self.upstream_config, self.stats, secrets=self.secrets
            )
            upstream.on_event = self._on_upstream_event
            self.upstream = upstream
            async with trio.open_nursery() as nursery:

                async def run_upstream() -> None:
                    await upstream.run()  # returns on stop() (shutdown)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(self._keep_lock, redis, value)
                nursery.start_soon(self._fleet_demand, redis, fleet_demand)
                nursery.start_soon(self._publish, redis, value, receive, states, epoch)
                nursery.start_soon(self._announce, redis, value, upstream)
                nursery.start_soon(run_upstream)
        except _LockLost as exc:
            log.error("[FLEET] node %s lost the upstream lock (%s); stepping down", self.node, exc)
        except BaseExceptionGroup as group:
            lost, rest = group.split(_LockLost)
            if rest is not None:
                raise rest from None
            if lost is not None:
                log.error("[FLEET] node %s lost the upstream lock; stepping down", self.node)
        finally:
            self.upstream = None
            self.role, self.token = FleetRole.FOLLOWER, 0
            self.fleet_symbols = set()
            released = await self._release(redis, value)
            self._stepped_down.set()
            if released:
                log.info("[FLEET] node %s released the upstream lock", self.node)
        if self._stop.is_set():
            await trio.sleep_forever()  # shutting down: do not take the lock again

    async def _release(self, redis: coredis.Redis[bytes], value: str) -> bool:
        """Give the lock up if it is still ours (shielded, at most a second); True if it was."""
        with trio.CancelScope(shield=True), trio.move_on_after(min(1.0, self.config.timeout)):
            try:
                release = redis.register_script(_RELEASE)
                return bool(
                    await release(
                        keys=[self.keys.holder, self.keys.status],
                        args=[value, self.keys.control, b'{"t":"released"}'],
                    )
                )
            except REDIS_ERRORS:
                pass
        return False

    async def _load_states(self, redis: coredis.Redis[bytes], epoch: str) -> dict[str, PriceState]:
        """The cache, to number on from it: a takeover never repeats or steps back a seq."""
        states: dict[str, PriceState] = {}
        for raw in (await redis.hgetall(self.keys.cache)).values():
            try:
                state = self._state_decoder.decode(raw)
            except msgspec.DecodeError:
                continue
            if state.epoch == epoch:
                states[state.symbol] = state
        return states

    async def _keep_lock(self, redis: coredis.Redis[bytes], value: str) -> None:
        renew = redis.register_script(_RENEW)
        ttl = self.config.lock_ttl
        ttl_ms = int(ttl * 1000)
        while True:
            await trio.sleep(ttl / 3)
            with trio.fail_after(ttl / 3):
                kept: Any = await renew(keys=[self.keys.holder], args=[value, ttl_ms])
            if not kept:
                raise _LockLost("the lock expired or another relay holds it")

    async def _fleet_demand(self, redis: coredis.Redis[bytes], fleet_demand: Demand) -> None:
        while True:
            self._demand_changed = trio.Event()
            with trio.fail_after(self.config.timeout):
                union = await self._demand_union(redis)
            added, removed = union - self.fleet_symbols, self.fleet_symbols - union
            if added:
                fleet_demand.pin(sorted(added))
            if removed:
                fleet_demand.unpin(sorted(removed))  # lingers unsubscribe_linger, as on one relay
            self.fleet_symbols = union
            with trio.move_on_after(self.config.demand_ttl / 3):
                await self._demand_changed.wait()

    def _on_upstream_event(self, signal: str, provider: str, reason: str) -> None:
        try:
            self._events_send.send_nowait((signal, provider, reason))
        except trio.WouldBlock:
            pass  # the status key, rewritten each renewal, carries the latest state anyway

    def _status(self, upstream: Upstream, signal: str, reason: str) -> dict[str, Any]:
        return {
            "node": self.node,
            "epoch": self.epoch,
            "token": self.token,
            "state": upstream.state,
            "fresh": upstream.is_fresh(),
            "signal": signal,
            "reason": reason,
            "provider": upstream.provider.name,
            "source": upstream.provider.describe(),
            "connected_since": upstream.connected_since,
            "reconnects": upstream.reconnects,
            "attempts": upstream.attempts,
            "last_error": upstream.last_error,
            "subscribed": sorted(upstream.subscribed),
            "switches": upstream.switches,
            "at": time.time(),
        }

    async def _announce(self, redis: coredis.Redis[bytes], value: str, upstream: Upstream) -> None:
        """Keep the holder's status in Redis; pass each up/down/stale/failover on to the fleet."""
        announce = redis.register_script(_ANNOUNCE)
        ttl_ms = int(self.config.lock_ttl * 1000)  # it dies with the lock
        # A new holder is not "up" until its upstream session is: the fleet's clients hear "down"
        # (connecting) then "up", also on a clean takeover.
        if upstream.state == UpstreamState.CONNECTED:
            signal, reason = "up", ""
        else:
            signal, reason = "down", f"fleet node {self.node} took over the upstream and is connecting"
        event: tuple[str, str, str] | None = None
        while True:
            if event is not None and event[0]:
                signal, _provider, reason = event
            status = self._status(upstream, signal, reason)
            # Every round is a heartbeat (published): followers judge the holder alive by them.
            message = self._json.encode({"t": "upstream", "status": status})
            if signal == "failover":
                signal = "up"  # told once; the heartbeats after it carry the state
            with trio.fail_after(self.config.timeout):
                kept: Any = await announce(
                    keys=[self.keys.holder, self.keys.status],
                    args=[value, self._json.encode(status), ttl_ms, self.keys.control, message],
                )
            if not kept:
                raise _LockLost("the status was refused: the lock no longer holds this relay's token")
            event = None
            with trio.move_on_after(self.config.lock_ttl / HEARTBEATS):
                event = await self._events_receive.receive()

    async def _publish(
        self,
        redis: coredis.Redis[bytes],
        value: str,
        receive: trio.MemoryReceiveChannel[Item],
        states: dict[str, PriceState],
        epoch: str,
    ) -> None:
        """Number, then publish every upstream update once (refused if the lock is no longer ours)."""
        script = redis.register_script(_PUBLISH)
        keys = [self.keys.holder, self.keys.cache, self.keys.stream]
        now_iso = Encoder().now_iso
        provider = self.upstream.provider.name if self.upstream is not None else ""
        pace = Pacer(PUBLISH_INTERVAL)
        async with receive:
            while True:
                try:
                    item: Item = await receive.receive()
                except trio.EndOfChannel:
                    return
                # Busy: what comes in the rest of the interval goes in the same publish (each
                # costs ~0.5 ms of the client library's time). A quiet feed waits for nothing.
                await pace.wait()
                updates, provider = _take_batch(item, receive, provider)
                if not updates:
                    continue
                args = self._script_args(value, updates, states, epoch, provider, now_iso())
                with trio.fail_after(self.config.lock_ttl / 3):
                    accepted: Any = await script(keys=keys, args=args)
                if not accepted:
                    raise _LockLost("a publish was refused: the lock no longer holds this relay's token")
                self.batches_out += 1
                self.updates_out += len(updates)

    def _script_args(
        self,
        value: str,
        updates: list[Update],
        states: dict[str, PriceState],
        epoch: str,
        provider: str,
        cached_at: str,
    ) -> list[str | bytes | int]:
        """Number ``updates`` on from ``states`` (merged into them), as the publish script's ARGV."""
        cap = self.config.stream_maxlen
        encode, jencode = self._msgpack.encode, self._json.encode
        shards: dict[str, list[Update]] = {}
        changed: dict[str, PriceState] = {}
        for update in updates:
            symbol = update.symbol
            state = states.get(symbol)
            if state is None:
                state = states[symbol] = PriceState(symbol=symbol, epoch=epoch)
            update.seq = state.seq + 1
            update.epoch = epoch
            if update.kind in AMENDS:
                # An amendment of an earlier trade: each relay's hub applies it with its own
                # trade memory; the shared state keeps its last trade until the next.
                state.seq = update.seq
            else:
                state.apply(update, cached_at)
            state.provider = update.provider or provider
            changed[symbol] = state
            channel = self.channel(symbol)
            shard = shards.get(channel)
            if shard is None:
                shard = shards[channel] = []
            shard.append(update)
        args: list[str | bytes | int] = [value, len(shards), len(changed), cap]
        for channel, shard in shards.items():
            args += [channel, encode(FleetBatch(self.token, epoch, shard))]
        for symbol, state in changed.items():
            args += [symbol, jencode(state)]
        if cap:
            for update in updates:
                args += [update.symbol, jencode(update)]
        return args


def _take_batch(first: Item, receive: trio.MemoryReceiveChannel[Item], provider: str) -> tuple[list[Update], str]:
    """``first`` and what is already queued behind it (up to ``MAX_BATCH``), and the provider by then.

    Updates that came without a provider name get the one in effect when they arrived.
    """
    updates: list[Update] = []
    item = first
    while True:
        if isinstance(item, ProviderSwitched):
            provider = item.provider
        else:
            for update in item:
                if update.provider is None:
                    update.provider = provider
            updates.extend(item)
        if len(updates) >= MAX_BATCH:
            break
        try:
            item = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return updates, provider


class Pacer:
    """At most one go per ``interval``: :meth:`wait` returns at once unless the last go was sooner."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = -math.inf

    async def wait(self) -> None:
        if trio.current_time() < self._next:
            await trio.sleep_until(self._next)
        else:
            await trio.lowlevel.checkpoint()
        self._next = trio.current_time() + self.interval


def _state_update(state: PriceState) -> Update:
    """A cached state as an update that, applied to nothing, gives that state back."""
    return Update(
        symbol=state.symbol,
        kind=state.data_type,
        timestamp=state.timestamp,
        last_price=state.last_price,
        last_size=state.last_size,
        ask_price=state.ask_price,
        ask_size=state.ask_size,
        bid_price=state.bid_price,
        bid_size=state.bid_size,
        merged=True,
        provider=state.provider or None,
        seq=state.seq,
        epoch=state.epoch,
    )
