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

import inspect
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from ..bars import Lateness
from ..bars.channel import BarChannel
from ..config import ClientsConfig
from ..model import (
    AMENDS,
    CANCEL,
    CORRECTION,
    QUOTE,
    TRADE,
    Amend,
    AmendAction,
    AmendedState,
    Encoder,
    PriceState,
    ProviderSwitched,
    Update,
    UpstreamItem,
    control,
    wall_ms,
    ws_payload,
)
from .client import CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_SLOW_CONSUMER, Client
from .delivery import Delivery, DeliveryOptions
from .demand import Demand
from .flusher import Flusher
from .outbox import Outbox
from .stats import LatencyHistogram, Stats
from .trades import TradeMemory

__all__ = ["Hub", "SubscriptionError", "new_epoch", "RECONNECT_HINT_MS"]

log = logging.getLogger("trio_relay.hub")

# Evicted symbols whose last seq is remembered (to carry numbering on when they come back).
MAX_EVICTED_SEQS = 100_000

# Suggested wait before a client reconnects after a shutdown (a restart takes about this long).
RECONNECT_HINT_MS = 1000

SyncCallback = Callable[[Update], object]
AsyncCallback = Callable[[Update], Awaitable[object]]


class SubscriptionError(Exception):
    """A subscribe request breaks a limit; nothing was changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Seq(msgspec.Struct):
    seq: int


_SEQ_DECODER = msgspec.json.Decoder(_Seq)


_STATE_DECODER = msgspec.json.Decoder(PriceState)


def _state_of(frame: bytes) -> PriceState:
    """The state a routed price_update frame carries (read back only to replay it with options)."""
    return _STATE_DECODER.decode(ws_payload(frame))


def _seq_of(frame: bytes) -> int:
    """The seq of a routed price_update frame (read back only on a resume)."""
    return _SEQ_DECODER.decode(ws_payload(frame)).seq


def _bare_amend(update: Update) -> Amend:
    """The amendment an update without one stands for (a recording or history replayed).

    A break or cancel voids the trade it carries; a bare correction names no original, so it
    can only be reported (``matched: "unknown"``).
    """
    if update.kind == CORRECTION:
        return Amend(action=AmendAction.CORRECTION, corrected_price=update.last_price, corrected_size=update.last_size)
    action = AmendAction.CANCEL if update.kind == CANCEL else AmendAction.BREAK
    return Amend(action=action, price=update.last_price, size=update.last_size)


def new_epoch() -> str:
    """A short id for one run's sequence space: start time plus randomness, e.g. ``6745c1a0-9f3b2c``."""
    return f"{int(time.time()):x}-{secrets.token_hex(3)}"


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
        lateness: Lateness | None = None,
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
        # Wanted symbols the provider refused → the status sent about them (new subscribers get it
        # too); they go when nobody wants them (_evict) or the provider changes. Bounded by demand.
        self.refused: dict[str, dict[str, Any]] = {}
        # The upstream's last state signal while it is not "up" (sent to new subscribers too).
        self.upstream_status: dict[str, Any] | None = None
        # symbol -> its previous close, where the provider knows one (set by the daemon): the
        # subscribe ack carries it, so a client can show the change on the day.
        self.previous_close: Callable[[str], float | None] | None = None
        self.clients: dict[int, Client] = {}
        # symbol → the outboxes of its subscribers without options: per-frame clients get the
        # shared frame, batched ones (_bsubs) the shared payload (sliced once per update).
        self._subs: dict[str, set[Outbox]] = {}
        self._bsubs: dict[str, set[Outbox]] = {}
        # When the batch being published was received (wall clock, UTC epoch ms): set once per
        # turn, and what the bars and the history take as each update's arrival time.
        self.received_ms = 0
        self.bars = BarChannel(self, lateness)
        # Subscriptions with delivery options (rate cap, fields, deltas): one feed per option set.
        self.delivery = Delivery(self.cache, self.stats)
        # The last few trades of each cached symbol: what a break, cancel or correction amends.
        self.trades = TradeMemory()
        self._recent_trades = self.trades.by_symbol
        self._enc = Encoder()
        # Its two methods of the hot path, bound once (not per update).
        self._now_iso = self._enc.now_iso
        self._price_frame = self._enc.price_update
        self._ids = itertools.count(1)
        self._sync_callbacks: list[SyncCallback] = []
        self._async_callbacks: dict[int, trio.MemorySendChannel[Update]] = {}
        self._nursery: trio.Nursery | None = None
        self._no_clients = trio.Event()
        self._receive: trio.MemoryReceiveChannel[UpstreamItem] | None = None
        self.latency = LatencyHistogram()  # queued in an outbox → written to the socket, per flush
        # Writes the frames of every direct-mode outbox (native WebSocket clients) after each turn.
        self.flusher = Flusher()
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
        lateness: Lateness | None = None,
    ) -> AsyncIterator[Hub]:
        """Run the hub's own tasks (stall reaper, async callbacks) for the block's duration."""
        hub = cls(config, demand, stats, coalesce_above=coalesce_above, source=source, lateness=lateness)
        async with trio.open_nursery() as nursery:
            hub._nursery = nursery
            nursery.start_soon(hub._reap_stalled)
            nursery.start_soon(hub._watch_symbols)
            nursery.start_soon(hub.bars.run)
            nursery.start_soon(hub.delivery.run)
            nursery.start_soon(hub.flusher.run)
            try:
                yield hub
            finally:
                hub._nursery = None
                nursery.cancel_scope.cancel()

    async def consume(self, receive: trio.MemoryReceiveChannel[UpstreamItem]) -> None:
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
                item: UpstreamItem = first
                ended = False
                while True:
                    if isinstance(item, ProviderSwitched):
                        # Everything before the switch is published under the old name.
                        self._publish_all(batches, total)
                        batches, total = [], 0
                        self.source = item.provider
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
        self.received_ms = wall_ms()  # once per turn, not per update
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
        """Cache, number, encode once, route. Never blocks.

        The common update (a trade or quote of a cached symbol, without an upstream's epoch or a
        whole state) skips :meth:`_apply`'s other cases: :meth:`PriceState.apply` and the trade
        memory's append. Every other update goes through :meth:`_apply`. (Repeating apply's
        branches here saved 0.18 µs more per update, ~8 % of this method; not worth two copies of
        the merge.)
        """
        self.stats.updates_in += 1
        symbol = update.symbol
        if symbol not in self.demand.wanted:
            self.stats.dropped += 1  # late data for a symbol nobody wants any more
            return
        if update.seq and self._delivered(update):
            return
        kind = update.kind
        state = self.cache.get(symbol)
        if state is None or update.merged or update.epoch is not None or (kind != QUOTE and kind != TRADE):
            state = self._apply(update)
        else:
            state.provider = update.provider or self.source
            state.apply(update, self._now_iso())
            if kind == TRADE:
                recent = self._recent_trades.get(symbol)
                if recent is None:
                    recent = self.trades.start(symbol)
                recent.append(update)
        if state is not None:
            frame = self._price_frame(state)
            outboxes = self._subs.get(symbol)
            batched = self._bsubs.get(symbol)
            if outboxes or batched:  # _route, inlined (one call less per update)
                self._route_to(symbol, frame, state.seq, outboxes, batched)
            routes = self.delivery.routes
            if routes and symbol in routes:
                self.delivery.publish(symbol, state)
            if self._keep:
                history = self._history.get(symbol)
                if history is None:
                    history = self._history[symbol] = deque(maxlen=self._keep)
                history.append(frame)
        bar_symbols = self.bars.symbols
        if bar_symbols and symbol in bar_symbols:
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
        routes = self.delivery.routes
        for symbol, state in changed.items():
            frame = encode(state)
            self._route(symbol, frame, state.seq)
            if routes and symbol in routes:
                self.delivery.publish(symbol, state)
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
        kind = update.kind
        if kind == TRADE:
            if not update.merged:
                # The trade memory (hub/trades.py), inlined: one lookup and one append per trade.
                recent = self._recent_trades.get(symbol)
                if recent is None:
                    recent = self.trades.start(symbol)
                recent.append(update)
        elif kind in AMENDS:
            if not update.merged:
                self._amend(state, update)
                return None
            self.trades.forget(symbol)  # an upstream relay's state after its own amendment
        state.apply(update, self._enc.now_iso())
        return state

    def _amend(self, state: PriceState, update: Update) -> None:
        """Apply a break, cancel or correction to the cache and route its frame at once.

        The amended trade is looked up in the trade memory: if it was the cached last trade, the
        state's last trade becomes the previous valid one (break, cancel) or the corrected one.
        The frame is the state after that plus ``amends``; it is routed on its own, never
        coalesced with other updates of the batch, so each amendment reaches the clients.
        """
        amend = update.amend or _bare_amend(update)
        matched, last = self.trades.amend(state.symbol, amend)
        if last is not None:
            state.last_price, state.last_size = last
        state.seq = update.seq or state.seq + 1
        state.timestamp = update.timestamp
        state.data_type = update.kind
        state.cached_at = self._enc.now_iso()
        amended = AmendedState(**msgspec.structs.asdict(state), amends=msgspec.structs.replace(amend, matched=matched))
        frame = self._enc.encode(amended)
        self._route(state.symbol, frame, state.seq)
        if state.symbol in self.delivery.routes:
            self.delivery.publish_break(state.symbol, amended)
        if self._keep:
            self._remember(state.symbol, frame)

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
        """Hand ``msg`` (the frame of ``symbol`` numbered ``seq``) to its plain subscribers."""
        outboxes = self._subs.get(symbol)
        batched = self._bsubs.get(symbol)
        if outboxes or batched:
            self._route_to(symbol, msg, seq, outboxes, batched)

    def _route_to(
        self, symbol: str, msg: bytes, seq: int, outboxes: set[Outbox] | None, batched: set[Outbox] | None
    ) -> None:
        """:meth:`_route` once the subscribers are known: per-frame ``outboxes``, ``batched`` ones."""
        floors = self._floors.get(symbol) if self._floors else None
        if floors is not None:
            self._route_above(symbol, msg, seq, floors)
            return
        # The hot loop: one push per subscriber, of bytes shared by all of them.
        if outboxes:
            for outbox in outboxes:
                outbox.push(symbol, msg)
            self.stats.messages_out += len(outboxes)
        if batched:
            payload = ws_payload(msg)
            for outbox in batched:
                outbox.push(symbol, payload)
            self.stats.messages_out += len(batched)

    def _route_above(self, symbol: str, msg: bytes, seq: int, floors: dict[Outbox, int]) -> None:
        """Route to each outbox unless it resumed at or beyond ``seq`` (it has that update)."""
        for outbox in [*self._subs.get(symbol, ()), *self._bsubs.get(symbol, ())]:
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
        outbox = Outbox(self.config.outbox_size, batch=batch)
        outbox.latency = self.latency
        client = Client(
            id=next(self._ids),
            outbox=outbox,
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
        options: DeliveryOptions | None = None,
    ) -> list[str]:
        """Add ``symbols`` to the client's set; queue the ack and the cached snapshot of each.

        With ``since`` (the last seq the client saw, per symbol, in ``epoch``), a symbol whose
        missed updates are all still in its history gets exactly those, in order, instead of a
        snapshot; the ack then says ``"recovered": true``. When the epoch differs (the relay
        restarted) or the gap is older than the history, the client gets the snapshot and
        ``"recovered": false`` with the symbols concerned in ``"unrecovered"``.

        ``options`` (None: the defaults) become the delivery options of every symbol named:
        a symbol already subscribed with other options switches to these and gets a fresh
        snapshot under them (see :mod:`.delivery`; under a rate cap a resume replays only the
        latest missed state).

        Raises :class:`SubscriptionError` (and changes nothing) past the per-client cap.
        Returns the symbols that were new for this client.
        """
        new = [s for s in dict.fromkeys(symbols) if s not in client.symbols]
        self.check_capacity(client, len(new))
        changed = [s for s in dict.fromkeys(symbols) if s in client.symbols and client.options.get(s) != options]
        outbox = client.outbox
        for s in changed:
            self._unroute(client, s)
            outbox.discard({s})
        for s in new:
            client.symbols.add(s)
        for s in new + changed:
            self._add_route(client, s, options)
        self.demand.acquire(new)
        replay, unrecovered = self._replays(client, new, since, epoch)
        ack: dict[str, Any] = {"symbols": list(dict.fromkeys(symbols))}
        if options is not None:
            ack["options"] = options.as_json()
        if self.previous_close is not None:
            closes = {s: c for s in ack["symbols"] if (c := self.previous_close(s)) is not None}
            if closes:
                ack["prev_close"] = closes
        if since is not None:
            ack["epoch"] = self.epoch
            ack["recovered"] = not unrecovered
            if unrecovered:
                ack["unrecovered"] = unrecovered
        self.send_control(client, control("subscribed", **ack))
        for s in new + changed:
            self._catch_up(outbox, s, replay.get(s), options)
        self._tell_status(client, new)
        return new

    def _catch_up(
        self, outbox: Outbox, symbol: str, frames: list[bytes] | None, options: DeliveryOptions | None
    ) -> None:
        """A new subscriber's first messages of ``symbol``: the missed ``frames``, else the snapshot."""
        if frames is not None:
            if options is not None:
                frames = self.delivery.frames_for(options, [_state_of(f) for f in frames])
            for frame in frames:
                outbox.put_replay(symbol, frame)
            return
        state = self.cache.get(symbol)
        if state is not None and state.seq and state.seq > self._floors.get(symbol, {}).get(outbox, 0):
            if options is None:
                outbox.put(symbol, self._enc.price_update(state))
            else:
                outbox.put_replay(symbol, self.delivery.snapshot(options, state))

    def _tell_status(self, client: Client, new: list[str]) -> None:
        """What a new subscriber of ``new`` must know at once: stale symbols, the upstream, refusals."""
        stale = [s for s in new if s in self.stale_symbols]
        if stale:
            self.send_control(client, self._symbol_status("stale", stale))
        if self.upstream_status is not None and new:
            self.send_control(client, {**self.upstream_status, "symbols": new})
        if self.refused:
            for s in new:
                message = self.refused.get(s)
                if message is not None:
                    self.send_control(client, {**message, "symbols": [s]})

    def _replays(
        self, client: Client, new: list[str], since: dict[str, int] | None, epoch: str | None
    ) -> tuple[dict[str, list[bytes]], list[str]]:
        """A resume's missed frames per symbol, and the symbols it cannot recover."""
        replay: dict[str, list[bytes]] = {}
        unrecovered: list[str] = []
        if since is None:
            return replay, unrecovered
        for s in new:
            if s in since:
                frames = self._missed(s, since[s]) if epoch == self.epoch else None
                if frames is None:
                    unrecovered.append(s)
                    if epoch == self.epoch and since[s] > self._seq_of_state(s):
                        # Ahead of this relay in the same sequence: whatever comes here at
                        # or below since (a cached state, a lagging feed) it already has.
                        self._floors.setdefault(s, {})[client.outbox] = since[s]
                else:
                    replay[s] = frames
        return replay, unrecovered

    def set_batch(self, client: Client, batch: bool) -> None:
        """Switch a client to batched frames (JSON arrays) or back; nothing pending is lost."""
        if batch == client.batch:
            return
        plain = [s for s in client.symbols if s not in client.options]
        for symbol in plain:
            self._unroute(client, symbol)  # from the set of the old form...
        client.outbox.set_batch(batch)
        for symbol in plain:
            self._add_route(client, symbol, None)  # ...to the set of the new one

    def _add_route(self, client: Client, symbol: str, options: DeliveryOptions | None) -> None:
        if options is None:
            subs = self._bsubs if client.outbox.batch else self._subs
            subs.setdefault(symbol, set()).add(client.outbox)
        else:
            client.options[symbol] = options
            self.delivery.add(symbol, options, client.outbox)

    def _unroute(self, client: Client, symbol: str) -> None:
        options = client.options.pop(symbol, None)
        if options is not None:
            self.delivery.remove(symbol, options, client.outbox)
            return
        subs = self._bsubs if client.outbox.batch else self._subs
        outboxes = subs.get(symbol)
        if outboxes is not None:
            outboxes.discard(client.outbox)
            if not outboxes:
                del subs[symbol]

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
            self._unroute(client, s)
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

    def symbols_refused(self, symbols: list[str], provider: str, reason: str) -> None:
        """The provider refused these symbols: tell each client holding some of them, and later ones.

        ``{"type":"status","scope":"symbols","state":"refused","symbols":[...],"provider":..,"reason":..}``
        """
        message = control("status", scope="symbols", state="refused", provider=provider, reason=reason)
        for symbol in symbols:
            self.refused[symbol] = message
        self._notify_each(set(symbols), message)

    def refusals_cleared(self, symbols: list[str]) -> None:
        """Asked for again (another provider): ``state: "retrying"`` to the clients holding them."""
        for symbol in symbols:
            self.refused.pop(symbol, None)
        self._notify_each(set(symbols), control("status", scope="symbols", state="retrying"))

    def _notify_each(self, symbols: set[str], message: dict[str, Any]) -> None:
        for client in list(self.clients.values()):
            mine = sorted(client.symbols & symbols)
            if mine:
                self.send_control(client, {**message, "symbols": mine})

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
            subscribed = self._subs.keys() | self._bsubs.keys() | self.delivery.routes.keys()
            for symbol in subscribed:
                state = cache.get(symbol)
                seq = state.seq if state is not None else 0
                if seen.get(symbol) != seq:
                    if symbol in seen and symbol in self.stale_symbols:
                        came_back.add(symbol)
                    seen[symbol] = seq
                    changed_at[symbol] = now
                elif now - changed_at[symbol] >= limit and symbol not in self.stale_symbols:
                    went_stale.add(symbol)
            for symbol in [s for s in seen if s not in subscribed]:
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
        self.trades.forget(symbol)
        self.refused.pop(symbol, None)
        self.stale_symbols.discard(symbol)

    def subscriber_count(self, symbol: str) -> int:
        plain = len(self._subs.get(symbol, ())) + len(self._bsubs.get(symbol, ()))
        return plain + self.delivery.subscriber_count(symbol)

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
