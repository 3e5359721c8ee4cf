"""The hub: the single place where an upstream update becomes a client message.

For each update it merges the symbol's cache entry, bumps its sequence number, encodes the
``price_update`` frame ONCE and hands that same string to the :class:`Outbox` of every
subscribed client. It never awaits a client: an outbox that is full conflates to the latest
update per symbol, and a client whose sender makes no progress for ``stall_timeout`` is closed.

Demand for upstream symbols is reference-counted in :class:`Demand`: a symbol is wanted while a
client subscribes to it, while it is pinned (REST or config), or for ``linger`` seconds after
the last client left.
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import logging
import math
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import msgspec
import trio

from .barchannel import BarChannel
from .config import ClientsConfig
from .model import BREAK, Encoder, PriceState, Update, control, ws_payload

if TYPE_CHECKING:
    from .entitlements import Entitlement

__all__ = ["Hub", "Outbox", "Client", "Demand", "Stats", "SubscriptionError"]

log = logging.getLogger("trio_relay.hub")

# WebSocket close codes the hub uses.
CLOSE_GOING_AWAY = 1001  # shutdown
CLOSE_POLICY = 1008  # too many unread replies
CLOSE_SLOW_CONSUMER = 4008  # no progress for stall_timeout
CLOSE_TOKEN_EXPIRED = 4001  # the client's token expired (auth on)

# Evicted symbols whose last seq is remembered (to carry numbering on when they come back).
MAX_EVICTED_SEQS = 100_000

# Suggested wait before a client reconnects after a shutdown (a restart takes about this long).
RECONNECT_HINT_MS = 1000

# Seconds a write in progress may still take once its client is being closed.
CLOSE_GRACE = 1.0

SyncCallback = Callable[[Update], object]
AsyncCallback = Callable[[Update], Awaitable[object]]


class SubscriptionError(Exception):
    """A subscribe request breaks a limit; nothing was changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.define
class Stats:
    """Message counters shown by /status (and later metrics)."""

    updates_in: int = 0  # normalized updates the hub received
    messages_out: int = 0  # price_update messages handed to client outboxes
    dropped: int = 0  # updates for unwanted symbols + updates lost with a closed client
    conflated: int = 0  # updates replaced by a newer one in a full outbox (closed clients)
    coalesced: int = 0  # backlogged upstream updates merged into a later one before routing
    malformed: int = 0  # upstream frames that could not be decoded
    duplicates: int = 0  # numbered updates (relay, fleet) whose seq was already passed on
    callback_errors: int = 0
    callback_dropped: int = 0  # updates an async callback was too slow to take
    slow_clients_closed: int = 0
    clients_total: int = 0


class _Seq(msgspec.Struct):
    seq: int


_SEQ_DECODER = msgspec.json.Decoder(_Seq)


def _seq_of(frame: bytes) -> int:
    """The seq of a routed price_update frame (read back only on a resume)."""
    return _SEQ_DECODER.decode(ws_payload(frame)).seq


def new_epoch() -> str:
    """A short id for one run's sequence space: start time plus randomness, e.g. ``6745c1a0-9f3b2c``."""
    return f"{int(time.time()):x}-{secrets.token_hex(3)}"


class Outbox:
    """A client's bounded queue of encoded WebSocket frames (bytes, shared between clients).

    Up to ``capacity`` frames queue in order. When full it switches to conflation: one pending
    frame per symbol (the latest), so its size is bounded by the client's symbol count, and the
    client always gets the newest price of every symbol it wants, never a backlog. Replies
    (acks, errors, pongs) are never conflated; more than ``capacity`` unread replies is a
    protocol abuse and :meth:`put_control` returns False.
    """

    __slots__ = (
        "capacity",
        "_queue",
        "_latest",
        "_lot",
        "_controls",
        "_keys",
        "conflated",
        "sent",
        "idle",
        "last_progress",
        "stopped",
        "finishing",
        "oldest",
        "_taken_oldest",
        "latency",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queue: deque[tuple[object, bytes]] = deque()
        self._latest: OrderedDict[object, bytes] | None = None  # not None while conflating
        self._lot = trio.lowlevel.ParkingLot()
        self._controls = 0
        self._keys = itertools.count()
        self.conflated = 0
        self.sent = 0
        self.idle = True  # the sender is waiting for data (so it cannot be stalled)
        self.last_progress = trio.current_time()
        self.stopped = False
        self.finishing = False  # set by finish(): hand out what is pending, then stop
        self.oldest = 0.0  # when the oldest pending frame was queued (trio clock)
        self._taken_oldest = 0.0
        self.latency: LatencyHistogram | None = None  # set by the hub: queued → written

    def __len__(self) -> int:
        return len(self._queue) if self._latest is None else len(self._latest)

    def put(self, key: object, msg: bytes) -> None:
        """Queue ``msg`` for symbol ``key``; never blocks."""
        latest = self._latest
        if latest is None:
            queue = self._queue
            if len(queue) < self.capacity:
                if not queue:
                    self.oldest = trio.current_time()  # for the relay-latency histogram
                queue.append((key, msg))
                if self._lot:
                    self._lot.unpark()
                return
            latest = self._latest = OrderedDict()
            for k, m in queue:
                if k in latest:
                    self.conflated += 1
                latest[k] = m
            queue.clear()
        if key in latest:
            self.conflated += 1
        latest[key] = msg
        if self._lot:
            self._lot.unpark()

    def put_control(self, msg: bytes) -> bool:
        """Queue a reply; False if the client already has ``capacity`` unread replies."""
        if self._controls >= self.capacity:
            return False
        self._controls += 1
        # An int key never equals a symbol, so a reply is never conflated away.
        self.put(-1 - next(self._keys), msg)
        return True

    def put_replay(self, symbol: str, msg: bytes) -> None:
        """Queue a replayed update: in order, never conflated (bounded by the resume history)."""
        self.put((symbol, next(self._keys)), msg)

    def discard(self, symbols: set[str]) -> None:
        """Forget pending updates of ``symbols`` (called on unsubscribe, before its ack)."""

        def of(key: object) -> bool:
            return key in symbols or (type(key) is tuple and key[0] in symbols)

        if self._latest is not None:
            for k in [k for k in self._latest if of(k)]:
                del self._latest[k]
        else:
            self._queue = deque((k, m) for k, m in self._queue if not of(k))

    async def get(self, limit: int = 0) -> list[bytes]:
        """Wait for pending frames and take them in order: all of them, or at most ``limit``.

        A sender that writes one frame at a time should take one at a time: what it leaves
        here can still be conflated, what it took can only go stale in its hands.
        """
        if self.stopped:
            return []
        if not (self._queue or self._latest):
            if self.finishing:
                self.stopped = True
                return []
            self.idle = True
            while not (self._queue or self._latest):
                await self._lot.park()
                if self.stopped or (self.finishing and not (self._queue or self._latest)):
                    self.stopped = True
                    return []
        self.idle = False
        self.last_progress = now = trio.current_time()
        self._taken_oldest = self.oldest
        self.oldest = now  # what stays behind was queued no earlier than... close enough
        latest = self._latest
        if latest is not None:
            if limit and len(latest) > limit:
                pairs = [latest.popitem(last=False) for _ in range(limit)]
            else:
                pairs = list(latest.items())
                self._latest = None
        else:
            queue = self._queue
            if limit and len(queue) > limit:
                pairs = [queue.popleft() for _ in range(limit)]
            else:
                pairs = list(queue)
                queue.clear()
        if self._controls:
            self._controls -= sum(1 for k, _m in pairs if type(k) is int)
        return [m for _k, m in pairs]

    def stop(self) -> None:
        """No more sending: :meth:`get` returns ``[]`` from now on, pending frames or not."""
        self.stopped = True
        self._lot.unpark_all()

    def finish(self) -> None:
        """Hand out what is pending (a last error or notice before a close), then stop."""
        self.finishing = True
        self._lot.unpark_all()

    def progressed(self, n: int = 1) -> None:
        """The sender delivered ``n`` frames (the oldest of them queued at ``_taken_oldest``)."""
        self.sent += n
        self.last_progress = now = trio.current_time()
        if self.latency is not None:
            self.latency.observe(now - self._taken_oldest)


class LatencyHistogram:
    """Cumulative-bucket histogram, cheap enough for the hot path (one bisect per flush)."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.BUCKETS), "+Inf"), self.counts):
            total += n
            out.append((bound, total))
        return out


@attrs.define(eq=False)
class Client:
    """One connected WebSocket client, as the hub sees it."""

    id: int
    outbox: Outbox
    batch: bool = False
    remote: str = ""
    symbols: set[str] = attrs.Factory(set)
    connected_at: float = 0.0
    close_code: int | None = None
    close_reason: str = ""
    bars: set[tuple[str, str]] = attrs.Factory(set)  # (symbol, interval) of the bars channel
    user: str = ""  # the token's subject (auth on)
    max_symbols: int | None = None  # the token's own cap, below the relay's
    # What this connection's token may see (set once authenticated; None: not yet). Fired alerts
    # and portfolio valuations reaching this client go through it.
    entitlement: Entitlement | None = None
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    def close(self, code: int, reason: str) -> None:
        """Ask the client's handler to close the socket with ``code``; idempotent.

        The handler's reader stops at once; a write in progress gets ``CLOSE_GRACE`` seconds to
        finish, so the close frame follows a whole frame.
        """
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.cancel_scope.cancel()


class Demand:
    """Reference-counted upstream demand: client subscriptions, pins, and a linger period."""

    def __init__(self, linger: float, pinned: Iterable[str] = ()) -> None:
        self.linger = linger
        self._refs: Counter[str] = Counter()
        self._pinned: set[str] = set(pinned)
        self._lingering: dict[str, float] = {}  # symbol → trio time it stops being wanted
        self.wanted: set[str] = set(self._pinned)
        self._changed = trio.Event()
        self.on_removed: Callable[[str], None] | None = None

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    def refcount(self, symbol: str) -> int:
        return self._refs[symbol]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _add(self, symbols: Iterable[str]) -> None:
        changed = False
        for s in symbols:
            self._lingering.pop(s, None)
            if s not in self.wanted:
                self.wanted.add(s)
                changed = True
        if changed:
            self._notify()

    def _maybe_release(self, symbols: Iterable[str]) -> None:
        now = trio.current_time()
        removed = []
        for s in symbols:
            if self._refs[s] > 0 or s in self._pinned or s not in self.wanted:
                continue
            if self.linger > 0:
                self._lingering[s] = now + self.linger
            else:
                removed.append(s)
        self._remove(removed)
        if self._lingering:
            self._notify()  # the reconciler re-computes its next deadline

    def _remove(self, symbols: list[str]) -> None:
        for s in symbols:
            self.wanted.discard(s)
            self._refs.pop(s, None)
            if self.on_removed is not None:
                self.on_removed(s)
        if symbols:
            self._notify()

    def acquire(self, symbols: Iterable[str]) -> None:
        symbols = list(symbols)
        for s in symbols:
            self._refs[s] += 1
        self._add(symbols)

    def release(self, symbols: Iterable[str]) -> None:
        symbols = list(symbols)
        for s in symbols:
            if self._refs[s] > 0:
                self._refs[s] -= 1
        self._maybe_release(symbols)

    def pin(self, symbols: Iterable[str]) -> None:
        symbols = list(symbols)
        self._pinned.update(symbols)
        self._add(symbols)

    def unpin(self, symbols: Iterable[str]) -> list[str]:
        """Unpin; returns the symbols that were pinned."""
        was = [s for s in symbols if s in self._pinned]
        self._pinned.difference_update(was)
        self._maybe_release(was)
        return was

    def expire(self) -> None:
        """Drop lingering symbols whose time is up."""
        now = trio.current_time()
        done = [s for s, t in self._lingering.items() if t <= now]
        for s in done:
            del self._lingering[s]
        self._remove(done)

    def next_expiry(self) -> float:
        return min(self._lingering.values(), default=math.inf)

    def changed_event(self) -> trio.Event:
        """An event set at the next change of :attr:`wanted` (take it before reading ``wanted``)."""
        return self._changed


class Hub:
    """Cache, sequence numbers, routing to outboxes, callbacks. Open with :meth:`open`."""

    def __init__(
        self,
        config: ClientsConfig,
        demand: Demand,
        stats: Stats | None = None,
        *,
        coalesce_above: int = 5000,
        source: str = "",
    ) -> None:
        self.config = config
        # The provider the updates come from (the upstream names a new one on a failover).
        self.source = source
        self.coalesce_above = coalesce_above
        self.demand = demand
        self.stats = stats if stats is not None else Stats()
        self.cache: dict[str, PriceState] = {}
        # Names this run's sequence space: a client may resume with "since" only within it.
        self.epoch = new_epoch()
        # Per symbol, the last ``resume_history`` frames routed (for resume). Only the frames: a
        # resume (rare) reads their seq back, so the hot path makes no tuple per update.
        self._history: dict[str, deque[bytes]] = {}
        self._keep = config.resume_history
        # The last seq of each symbol evicted in this epoch: numbering carries on from it when
        # the symbol comes back, so a seq never repeats or steps back within an epoch.
        self._evicted_seq: dict[str, int] = {}
        self._seq_floor = 0  # new symbols start above it: it covers the evicted seqs forgotten
        # Clients that resumed ahead of this relay (a fleet relay that did not follow the symbol,
        # or lags the holder by a few ms): symbol → outbox → the seq it has. Nothing at or below
        # it is routed to that outbox; the entry goes at the first update past it.
        self._floors: dict[str, dict[Outbox, int]] = {}
        self.stale_symbols: set[str] = set()  # subscribed symbols reported stale to clients
        # The upstream's last state signal while it is not "up" (sent to new subscribers too).
        self.upstream_status: dict[str, Any] | None = None
        self.clients: dict[int, Client] = {}
        self._subs: dict[str, set[Outbox]] = {}
        self.bars = BarChannel(self)
        self._enc = Encoder()
        self._ids = itertools.count(1)
        self._sync_callbacks: list[SyncCallback] = []
        self._async_callbacks: dict[int, trio.MemorySendChannel[Update]] = {}
        self._nursery: trio.Nursery | None = None
        self._no_clients = trio.Event()
        self._receive: trio.MemoryReceiveChannel[list[Update] | str] | None = None
        self.latency = LatencyHistogram()  # queued in an outbox → written to the socket, per flush
        self._turns = 0  # consume turns taken (the watchdog's measure of progress)
        self._turns_seen = 0
        demand.on_removed = self._evict

    # ----------------------------------------------------------------- lifetime
    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: ClientsConfig,
        demand: Demand,
        stats: Stats | None = None,
        *,
        coalesce_above: int = 5000,
        source: str = "",
    ) -> AsyncIterator[Hub]:
        """Run the hub's own tasks (stall reaper, async callbacks) for the block's duration."""
        hub = cls(config, demand, stats, coalesce_above=coalesce_above, source=source)
        async with trio.open_nursery() as nursery:
            hub._nursery = nursery
            nursery.start_soon(hub._reap_stalled)
            nursery.start_soon(hub._watch_symbols)
            nursery.start_soon(hub.bars.run)
            try:
                yield hub
            finally:
                hub._nursery = None
                nursery.cancel_scope.cancel()

    async def consume(self, receive: trio.MemoryReceiveChannel[list[Update] | str]) -> None:
        """Publish every batch from the upstream channel until it is closed.

        Each turn takes everything already queued: with thousands of client senders each taking
        one scheduler turn per round, ingesting one frame per turn would let the cache fall
        behind the feed. A turn that finds more than ``coalesce_above`` updates waiting is a
        backlog: every update still goes into the cache (and to callbacks), but each symbol's
        resulting state is encoded and routed once, so fan-out work stays proportional to the
        symbols that changed, not to the size of the backlog.
        """
        self._receive = receive
        async with receive:
            while True:
                try:
                    first = await receive.receive()
                except trio.EndOfChannel:
                    return
                self._turns += 1
                batches: list[list[Update]] = []
                total = 0
                item: list[Update] | str = first
                ended = False
                while True:
                    if isinstance(item, str):
                        # Everything before the switch is published under the old name.
                        self._publish_all(batches, total)
                        batches, total = [], 0
                        self.source = item
                    else:
                        batches.append(item)
                        total += len(item)
                    try:
                        item = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    except trio.EndOfChannel:
                        ended = True
                        break
                self._publish_all(batches, total)
                if ended:
                    return

    def _publish_all(self, batches: list[list[Update]], total: int) -> None:
        if self.coalesce_above and total > self.coalesce_above:
            self._publish_coalesced(batches, total)
        else:
            publish = self.publish
            for batch in batches:
                for update in batch:
                    publish(update)

    def making_progress(self) -> bool:
        """True if the hub took upstream data since the last call, or none is waiting for it.

        False means updates are queued and the hub has not taken any since the last call: it is
        wedged (the systemd watchdog stops pinging, so systemd restarts the service).
        """
        progressed = self._turns != self._turns_seen
        self._turns_seen = self._turns
        waiting = self._receive is not None and self._receive.statistics().current_buffer_used > 0
        return progressed or not waiting

    # ----------------------------------------------------------------- hot path
    def publish(self, update: Update) -> None:
        """Cache, number, encode once, route. Never blocks."""
        self.stats.updates_in += 1
        if update.symbol not in self.demand.wanted:
            self.stats.dropped += 1  # late data for a symbol nobody wants any more
            return
        if update.seq and self._delivered(update):
            return
        state = self._apply(update)
        if state is not None:
            frame = self._enc.price_update(state)
            self._route(update.symbol, frame, state.seq)
            if self._keep:
                history = self._history.get(update.symbol)
                if history is None:
                    history = self._history[update.symbol] = deque(maxlen=self._keep)
                history.append(frame)
        bar_symbols = self.bars.symbols
        if bar_symbols and update.symbol in bar_symbols:
            self.bars.feed(update)
        if self._sync_callbacks:
            self._run_sync_callbacks(update)
        if self._async_callbacks:
            self._feed_async_callbacks(update)

    def _publish_coalesced(self, batches: list[list[Update]], total: int) -> None:
        self.stats.updates_in += total
        changed: dict[str, PriceState] = {}
        wanted = self.demand.wanted
        for batch in batches:
            for update in batch:
                if update.symbol not in wanted:
                    self.stats.dropped += 1
                    continue
                if update.seq and self._delivered(update):
                    continue
                state = self._apply(update)
                if state is not None:
                    changed[update.symbol] = state
                if self.bars.symbols and update.symbol in self.bars.symbols:
                    self.bars.feed(update)
                if self._sync_callbacks:
                    self._run_sync_callbacks(update)
                if self._async_callbacks:
                    self._feed_async_callbacks(update)
        self.stats.coalesced += total - len(changed)
        encode = self._enc.price_update
        for symbol, state in changed.items():
            frame = encode(state)
            self._route(symbol, frame, state.seq)
            if self._keep:
                self._remember(symbol, frame)

    def _delivered(self, update: Update) -> bool:
        """An upstream relay's (or fleet's) numbered update this hub already passed on: dropped.

        A state read again after a reconnect, or a cache read racing the live feed, then never
        reaches a client twice.
        """
        state = self.cache.get(update.symbol)
        if state is not None and update.seq <= state.seq and (update.epoch is None or update.epoch == self.epoch):
            self.stats.duplicates += 1
            return True
        return False

    def _apply(self, update: Update) -> PriceState | None:
        """Merge a wanted symbol's update into the cache; the state to send (None: already routed)."""
        symbol = update.symbol
        state = self.cache.get(symbol)
        if update.epoch is not None and update.epoch != self.epoch:
            self._adopt_epoch(update.epoch)
        if state is None:
            seq = self._evicted_seq.pop(symbol, self._seq_floor)
            state = self.cache[symbol] = PriceState(symbol=symbol, epoch=self.epoch, seq=seq)
        state.provider = update.provider or self.source
        if update.kind == BREAK:
            # A break corrects an earlier print; it does not become the last trade. It is
            # routed at once, on its own: it must never be coalesced away.
            state.seq = update.seq or state.seq + 1
            frame = self._enc.price_update(
                msgspec.structs.replace(
                    state,
                    data_type=BREAK,
                    timestamp=update.timestamp,
                    last_price=update.last_price,
                    last_size=update.last_size,
                    cached_at=self._enc.now_iso(),
                )
            )
            self._route(symbol, frame, state.seq)
            if self._keep:
                self._remember(symbol, frame)
            return None
        state.apply(update, self._enc.now_iso())
        return state

    def _remember(self, symbol: str, frame: bytes) -> None:
        history = self._history.get(symbol)
        if history is None:
            history = self._history[symbol] = deque(maxlen=self._keep)
        history.append(frame)

    def _adopt_epoch(self, epoch: str) -> None:
        """Take an upstream's sequence space (a worker's feeder, a fleet's new epoch).

        Numbering restarts for every symbol: a cached state keeps its prices but has no seq in
        the new epoch until its next update (so it is no snapshot meanwhile), the resume history
        and the resume floors go, and every client with symbols is told (``status`` of scope
        ``relay``, state ``epoch``): a seq it keeps compares only within its old epoch.
        """
        log.info("[EPOCH] sequence space %s (was %s)", epoch, self.epoch)
        old, self.epoch = self.epoch, epoch
        self._history.clear()
        self._evicted_seq.clear()
        self._floors.clear()
        self._seq_floor = 0
        for state in self.cache.values():
            state.epoch = epoch
            state.seq = 0
        notice = self._enc.encode(
            control("status", scope="relay", state="epoch", epoch=epoch, previous=old,
                    reason="the sequence space restarted: seq numbering starts again in this epoch")
        )  # fmt: skip
        for client in list(self.clients.values()):
            if client.symbols and not client.outbox.put_control(notice):
                client.close(CLOSE_POLICY, "too many unread replies")

    def set_resume_history(self, size: int) -> None:
        """A new history length (reload): the kept frames are trimmed or given room to grow."""
        self._keep = size
        self._history = {s: deque(h, maxlen=size) for s, h in self._history.items()} if size else {}

    def _route(self, symbol: str, msg: bytes, seq: int) -> None:
        outboxes = self._subs.get(symbol)
        if outboxes:
            floors = self._floors.get(symbol) if self._floors else None
            if floors is not None:
                self._route_above(symbol, msg, seq, outboxes, floors)
                return
            for outbox in outboxes:
                outbox.put(symbol, msg)
            self.stats.messages_out += len(outboxes)

    def _route_above(self, symbol: str, msg: bytes, seq: int, outboxes: set[Outbox], floors: dict[Outbox, int]) -> None:
        """Route to each outbox unless it resumed at or beyond ``seq`` (it has that update)."""
        for outbox in outboxes:
            floor = floors.get(outbox)
            if floor is not None:
                if seq <= floor:
                    self.stats.duplicates += 1
                    continue
                del floors[outbox]  # past it: this client is level with the relay
            outbox.put(symbol, msg)
            self.stats.messages_out += 1
        if not floors:
            del self._floors[symbol]

    # ----------------------------------------------------------------- callbacks
    def _run_sync_callbacks(self, update: Update) -> None:
        for cb in list(self._sync_callbacks):
            try:
                cb(update)
            except Exception:
                self.stats.callback_errors += 1
                log.exception("[CALLBACK] %r raised; update of %s skipped for it", cb, update.symbol)

    def _feed_async_callbacks(self, update: Update) -> None:
        for send in self._async_callbacks.values():
            try:
                send.send_nowait(update)
            except trio.WouldBlock:
                self.stats.callback_dropped += 1

    def add_callback(self, fn: SyncCallback | AsyncCallback, *, queue_size: int = 1024) -> Callable[[], None]:
        """Call ``fn(update)`` for every update; returns a function that unregisters it.

        A sync ``fn`` runs inline and must be quick. An async ``fn`` runs in its own task fed by
        a channel of ``queue_size`` updates: when it falls that far behind, updates are dropped
        for it (counted in ``callback_dropped``) so it can never stall delivery. Exceptions are
        logged and counted; they never reach the hub.
        """
        if _is_async(fn):
            if self._nursery is None:
                raise RuntimeError("the hub is not open")
            key = next(self._ids)
            send, receive = trio.open_memory_channel[Update](queue_size)
            scope = trio.CancelScope()
            self._async_callbacks[key] = send
            self._nursery.start_soon(self._run_async_callback, fn, receive, scope)  # type: ignore[arg-type]

            def unregister_async() -> None:
                self._async_callbacks.pop(key, None)
                scope.cancel()

            return unregister_async
        self._sync_callbacks.append(fn)

        def unregister_sync() -> None:
            if fn in self._sync_callbacks:
                self._sync_callbacks.remove(fn)

        return unregister_sync

    async def _run_async_callback(
        self, fn: AsyncCallback, receive: trio.MemoryReceiveChannel[Update], scope: trio.CancelScope
    ) -> None:
        with scope:
            async with receive:
                async for update in receive:
                    try:
                        await fn(update)
                    except Exception:
                        self.stats.callback_errors += 1
                        log.exception("[CALLBACK] %r raised; update of %s skipped for it", fn, update.symbol)

    # ----------------------------------------------------------------- clients
    def connect(self, *, batch: bool = False, remote: str = "") -> Client:
        outbox = Outbox(self.config.outbox_size)
        outbox.latency = self.latency
        client = Client(
            id=next(self._ids),
            outbox=outbox,
            batch=batch,
            remote=remote,
            connected_at=trio.current_time(),
        )
        self.clients[client.id] = client
        self.stats.clients_total += 1
        return client

    def disconnect(self, client: Client) -> None:
        if self.clients.pop(client.id, None) is None:
            return
        if not self.clients:
            self._no_clients.set()
            self._no_clients = trio.Event()
        self._unsubscribe(client, list(client.symbols))
        self.bars.disconnect(client)
        self.stats.dropped += len(client.outbox)
        self.stats.conflated += client.outbox.conflated

    def subscribe(
        self,
        client: Client,
        symbols: list[str],
        *,
        since: dict[str, int] | None = None,
        epoch: str | None = None,
    ) -> list[str]:
        """Add ``symbols`` to the client's set; queue the ack and the cached snapshot of each.

        With ``since`` (the last seq the client saw, per symbol, in ``epoch``), a symbol whose
        missed updates are all still in its history gets exactly those, in order, instead of a
        snapshot; the ack then says ``"recovered": true``. When the epoch differs (the relay
        restarted) or the gap is older than the history, the client gets the snapshot and
        ``"recovered": false`` with the symbols concerned in ``"unrecovered"``.

        Raises :class:`SubscriptionError` (and changes nothing) past the per-client cap.
        Returns the symbols that were new for this client.
        """
        new = [s for s in dict.fromkeys(symbols) if s not in client.symbols]
        self.check_capacity(client, len(new))
        outbox = client.outbox
        for s in new:
            client.symbols.add(s)
            self._subs.setdefault(s, set()).add(outbox)
        self.demand.acquire(new)
        replay: dict[str, list[bytes]] = {}
        unrecovered: list[str] = []
        if since is not None:
            for s in new:
                if s in since:
                    frames = self._missed(s, since[s]) if epoch == self.epoch else None
                    if frames is None:
                        unrecovered.append(s)
                        if epoch == self.epoch and since[s] > self._seq_of_state(s):
                            # Ahead of this relay in the same sequence: whatever comes here at
                            # or below since (a cached state, a lagging feed) it already has.
                            self._floors.setdefault(s, {})[outbox] = since[s]
                    else:
                        replay[s] = frames
        ack: dict[str, Any] = {"symbols": list(dict.fromkeys(symbols))}
        if since is not None:
            ack["epoch"] = self.epoch
            ack["recovered"] = not unrecovered
            if unrecovered:
                ack["unrecovered"] = unrecovered
        self.send_control(client, control("subscribed", **ack))
        for s in new:
            frames = replay.get(s)
            if frames is not None:
                for frame in frames:
                    outbox.put_replay(s, frame)
                continue
            state = self.cache.get(s)
            if state is not None and state.seq and state.seq > self._floors.get(s, {}).get(outbox, 0):
                outbox.put(s, self._enc.price_update(state))
        stale = [s for s in new if s in self.stale_symbols]
        if stale:
            self.send_control(client, self._symbol_status("stale", stale))
        if self.upstream_status is not None and new:
            self.send_control(client, {**self.upstream_status, "symbols": new})
        return new

    def check_capacity(self, client: Client, more: int) -> None:
        """Raise :class:`SubscriptionError` if ``more`` subscriptions (ticks or bars) exceed the cap."""
        cap = self.config.max_symbols_per_client
        if client.max_symbols is not None:
            cap = min(cap, client.max_symbols)
        held = len(client.symbols) + len(client.bars)
        if held + more > cap:
            raise SubscriptionError(
                "symbol_limit",
                f"subscribing {more} more symbol(s) would exceed the limit of {cap} per client (currently {held})",
            )

    def _seq_of_state(self, symbol: str) -> int:
        state = self.cache.get(symbol)
        return state.seq if state is not None else 0

    def _missed(self, symbol: str, seen: int) -> list[bytes] | None:
        """The frames routed after seq ``seen``; None when some may be gone from the history."""
        state = self.cache.get(symbol)
        if state is None or not state.seq:
            return [] if seen == 0 else None
        if seen >= state.seq:
            return [] if seen == state.seq else None  # ahead of us: not our sequence
        history = self._history.get(symbol)
        if not history or _seq_of(history[0]) > seen + 1:
            return None
        return [frame for frame in history if _seq_of(frame) > seen]

    def unsubscribe(self, client: Client, symbols: list[str]) -> list[str]:
        """Remove symbols; pending updates of them are discarded before the ack is queued."""
        removed = self._unsubscribe(client, symbols)
        client.outbox.discard(set(removed))
        self.send_control(client, control("unsubscribed", symbols=list(dict.fromkeys(symbols))))
        return removed

    def _unsubscribe(self, client: Client, symbols: list[str]) -> list[str]:
        removed = [s for s in dict.fromkeys(symbols) if s in client.symbols]
        for s in removed:
            client.symbols.discard(s)
            floors = self._floors.get(s)
            if floors is not None:
                floors.pop(client.outbox, None)
                if not floors:
                    del self._floors[s]
            outboxes = self._subs.get(s)
            if outboxes is not None:
                outboxes.discard(client.outbox)
                if not outboxes:
                    del self._subs[s]
        self.demand.release(removed)
        return removed

    def send_control(self, client: Client, message: dict[str, Any]) -> None:
        """Queue a reply to one client; a client that never reads its replies is closed."""
        if not client.outbox.put_control(self._enc.encode(message)):
            client.close(CLOSE_POLICY, "too many unread replies")

    async def wait_no_clients(self) -> None:
        """Return once no client is connected."""
        if self.clients:
            await self._no_clients.wait()

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down") -> None:
        """Close every client; on a shutdown (1001) each first gets a status saying to come back."""
        notice = None
        if code == CLOSE_GOING_AWAY:
            notice = self._enc.encode(
                control(
                    "status",
                    scope="relay",
                    state="closing",
                    reason=reason,
                    reconnect=True,
                    epoch=self.epoch,
                    retry_after_ms=RECONNECT_HINT_MS,
                )
            )
        for client in list(self.clients.values()):
            if notice is not None:
                client.outbox.put_control(notice)
            client.close(code, reason)

    # ----------------------------------------------------------------- state signals
    def upstream_event(self, state: str, provider: str, reason: str = "") -> None:
        """Tell every subscribed client that the upstream went down, stale, failed over or up.

        ``state`` is ``up``, ``down``, ``stale`` or ``failover``; each client's message lists the
        symbols of its own that are concerned (all of them: one upstream serves them all).
        """
        message: dict[str, Any] = control("status", scope="upstream", state=state, provider=provider)
        if reason:
            message["reason"] = reason
        self.upstream_status = None if state == "up" else message
        for client in list(self.clients.values()):
            if client.symbols:
                self.send_control(client, {**message, "symbols": sorted(client.symbols)})

    def _symbol_status(self, state: str, symbols: list[str]) -> dict[str, Any]:
        return control(
            "status", scope="symbols", state=state, symbols=symbols, stale_after=self.config.symbol_stale_after
        )

    async def _watch_symbols(self) -> None:
        """Flag subscribed symbols with no update for ``symbol_stale_after`` (and unflag them).

        Reads each symbol's seq once per round instead of timing every update: the hot path
        pays nothing, and a flag comes at most a quarter of the limit (or 1 s) late.
        """
        seen: dict[str, int] = {}
        changed_at: dict[str, float] = {}
        while True:
            limit = self.config.symbol_stale_after  # read each round: a reload may change it
            await trio.sleep(min(1.0, limit / 4) if limit else 1.0)
            if not limit:
                if self.stale_symbols:
                    self._notify_symbols("fresh", set(self.stale_symbols))
                    self.stale_symbols.clear()
                seen.clear()
                changed_at.clear()
                continue
            now = trio.current_time()
            went_stale: set[str] = set()
            came_back: set[str] = set()
            cache = self.cache
            for symbol in self._subs:
                state = cache.get(symbol)
                seq = state.seq if state is not None else 0
                if seen.get(symbol) != seq:
                    if symbol in seen and symbol in self.stale_symbols:
                        came_back.add(symbol)
                    seen[symbol] = seq
                    changed_at[symbol] = now
                elif now - changed_at[symbol] >= limit and symbol not in self.stale_symbols:
                    went_stale.add(symbol)
            for symbol in [s for s in seen if s not in self._subs]:
                del seen[symbol], changed_at[symbol]
                self.stale_symbols.discard(symbol)
            self.stale_symbols -= came_back
            self.stale_symbols |= went_stale
            if went_stale:
                self._notify_symbols("stale", went_stale)
            if came_back:
                self._notify_symbols("fresh", came_back)

    def _notify_symbols(self, state: str, symbols: set[str]) -> None:
        for client in list(self.clients.values()):
            mine = client.symbols & symbols
            if mine:
                self.send_control(client, self._symbol_status(state, sorted(mine)))

    # ----------------------------------------------------------------- pins, cache
    def pin(self, symbols: list[str]) -> None:
        self.demand.pin(symbols)

    def unpin(self, symbols: list[str]) -> list[str]:
        return self.demand.unpin(symbols)

    def snapshot(self, symbol: str) -> PriceState | None:
        state = self.cache.get(symbol)
        return state if state is not None and state.seq else None

    def _evict(self, symbol: str) -> None:
        # Nobody wants it upstream any more: its price would only go stale.
        state = self.cache.pop(symbol, None)
        if state is not None and state.seq:
            self._evicted_seq[symbol] = state.seq
            if len(self._evicted_seq) > MAX_EVICTED_SEQS:
                # Bounded: forget the oldest half; every symbol now starts above their seqs.
                forget = list(self._evicted_seq)[: MAX_EVICTED_SEQS // 2]
                self._seq_floor = max(self._seq_floor, *(self._evicted_seq.pop(s) for s in forget))
        self._history.pop(symbol, None)
        self.stale_symbols.discard(symbol)

    def subscriber_count(self, symbol: str) -> int:
        return len(self._subs.get(symbol, ()))

    def conflated_total(self) -> int:
        return self.stats.conflated + sum(c.outbox.conflated for c in self.clients.values())

    # ----------------------------------------------------------------- stalls
    async def _reap_stalled(self) -> None:
        while True:
            timeout = self.config.stall_timeout  # read each round: a reload may change it
            await trio.sleep(min(1.0, timeout / 4))
            now = trio.current_time()
            for client in list(self.clients.values()):
                outbox = client.outbox
                if not outbox.idle and now - outbox.last_progress > timeout and client.close_code is None:
                    self.stats.slow_clients_closed += 1
                    log.warning(
                        "[SLOW] client %d (%s) made no progress for %.0fs with %d pending; closing",
                        client.id,
                        client.remote,
                        now - outbox.last_progress,
                        len(outbox),
                    )
                    client.close(CLOSE_SLOW_CONSUMER, f"slow consumer: no progress for {timeout:g}s")
                    # Stop routing to it now: its socket write may stay blocked until the kernel
                    # gives up on the peer (TCP_USER_TIMEOUT), and it must not hold demand.
                    self.disconnect(client)


def _is_async(fn: object) -> bool:
    # An object whose __call__ is "async def" is an async callback too.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
