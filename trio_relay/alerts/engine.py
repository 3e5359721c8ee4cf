"""The alert engine: every rule indexed by symbol, evaluated on each update of its symbol.

Cost model. :meth:`AlertEngine.on_update` starts with one dict lookup; a symbol without rules
costs that and nothing else. For a watched symbol each *signal* the update can move (a trade:
the last price; a quote: bid, ask, mid, spread; either: move windows) is computed once, and
the rules on one signal are a sorted index of thresholds: while the value stays between the
nearest thresholds an update costs two comparisons, else finding the rules that fire or arm is
two bisections. 1000 price rules on a symbol cost about what 10 do, plus the rules that
actually change state (bench/alerts.py).

Every rule but ``stale`` is a threshold on a signal: ``above`` (price >= level), ``below``
(price <= level), ``move`` (move % >= pct, or <= pct when pct is negative), ``spread`` (spread >
max). A rule is in one of four states (``Rule.state``)::

    armed   --condition false-->  active  --condition true-->  fired (one-shot, for good)
                                                           \\-> cooling (re-arming rule)
    cooling --cooldown_s passed--> active if the latest value is on the near side, else armed

so a rule fires exactly once per crossing (the first update where the condition holds after
one where it did not, however far the price jumped), never on every tick beyond, and a rule
created or re-armed while the condition already holds waits for the price to come back first.
"""

from __future__ import annotations

import heapq
import logging
import math
import secrets
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable, Iterable, KeysView, Mapping
from operator import attrgetter
from typing import Any, Final

import trio

from ..config import AlertsConfig
from ..model import QUOTE, TRADE, PriceState, Update, mid_price, wall_ms
from .rules import (
    ACTIVE,
    ARMED,
    COOLING,
    FIRED,
    AboveRule,
    BelowRule,
    FiredAlert,
    MoveRule,
    Rule,
    RuleError,
    SpreadRule,
    StaleRule,
    parse_rule,
    rule_params,
)
from .targets import webhook_policy

__all__ = ["AlertEngine"]

log = logging.getLogger(__name__)

_INF: Final = float("inf")
_NEG_INF: Final = float("-inf")
# A move window is kept as at most this many slots (each the lowest and highest price seen in
# window/_SLOTS of event time), so its memory is bounded whatever the update rate and the
# window edge is exact to window/_SLOTS (300 s: 1.2 s).
_SLOTS: Final = 256


# ---------------------------------------------------------------------------------- values
def _mid(s: PriceState) -> float | None:
    bid, ask = s.bid_price, s.ask_price
    if bid is None or ask is None:
        return None
    # In decimal: "mid >= 40.15" holds for 40.1/40.2, and a fired alert shows 40.15.
    return mid_price(bid, ask)


_FIELD: Final[dict[str, Callable[[PriceState], float | None]]] = {
    "last": attrgetter("last_price"),
    "bid": attrgetter("bid_price"),
    "ask": attrgetter("ask_price"),
    "mid": _mid,
}


# ---------------------------------------------------------------------------------- indexes
class _Trigger:
    """A rule's place in the engine: its threshold and the index that holds it."""

    __slots__ = ("rule", "level", "n", "ready", "index", "dead")

    def __init__(self, rule: Rule, level: float, n: int) -> None:
        self.rule = rule
        self.level = level  # in its index's terms: the rule fires when the index value >= level
        self.n = n  # unique: orders equal levels, so tuples never compare triggers
        self.ready = 0  # cooling: when the cooldown is over (event time, ms; stale: engine clock)
        self.index: _Index | None = None
        self.dead = False


class _Index:
    """The rules on one value of a signal, as sorted thresholds; a rule fires when value >= level.

    Every comparison is expressed that way: "below L" is -price >= -L, a fall of 5 % is
    -price / high >= -0.95, "wider than L" is spread >= the float after L. Sorted by level, the active rules
    that fire at a value are a prefix of ``active`` and the armed rules that activate (their
    condition is false) a suffix of ``armed``. While ``lo <= value < hi`` and no cooldown is
    due (``ts < wake``), an update changes nothing, and the signals skip :meth:`process`.
    """

    __slots__ = ("active", "armed", "cooling", "last", "lo", "hi", "wake", "changed")

    def __init__(self) -> None:
        self.active: list[tuple[float, int, _Trigger]] = []  # fire when value >= level
        self.armed: list[tuple[float, int, _Trigger]] = []  # activate when value < level
        self.cooling: list[tuple[int, int, _Trigger]] = []  # heap by ready time
        self.last: float | None = None  # the value at the latest update
        self.lo = _NEG_INF  # highest armed level
        self.hi = _INF  # lowest active level
        self.wake = _INF  # earliest end of a cooldown
        # The engine's list of rules whose state changed without firing (armed -> active, a
        # cooldown's end): the caller saves them, so the next crossing survives a restart.
        self.changed: list[Rule] | None = None

    def __len__(self) -> int:
        cooling = sum(1 for ready, _, t in self.cooling if not t.dead and t.rule.state == COOLING and t.ready == ready)
        return len(self.active) + len(self.armed) + cooling

    def _bounds(self) -> None:
        self.lo = self.armed[-1][0] if self.armed else _NEG_INF
        self.hi = self.active[0][0] if self.active else _INF
        self.wake = self.cooling[0][0] if self.cooling else _INF

    def add(self, trig: _Trigger, value: float | None) -> None:
        """Index ``trig``: cooling stays cooling; else active if ``value`` is on the near side."""
        trig.index = self
        rule = trig.rule
        if rule.state == COOLING:
            trig.ready = (rule.fired_at or 0) + int(rule.cooldown_s * 1000)
            heapq.heappush(self.cooling, (trig.ready, trig.n, trig))
        elif (value is not None and value < trig.level) or (value is None and rule.state == ACTIVE):
            # Unknown value: a stored "active" rule stays active (it saw the near side before the
            # restart, so the first update beyond the threshold is a crossing and fires).
            rule.state = ACTIVE
            insort(self.active, (trig.level, trig.n, trig))
        else:
            rule.state = ARMED
            insort(self.armed, (trig.level, trig.n, trig))
        self._bounds()

    def remove(self, trig: _Trigger) -> None:
        state = trig.rule.state
        if state in (ACTIVE, ARMED):
            entries = self.active if state == ACTIVE else self.armed
            i = bisect_left(entries, (trig.level, trig.n))
            if i < len(entries) and entries[i][2] is trig:
                del entries[i]
        trig.dead = True  # a cooling entry is skipped when it comes out of the heap
        self._bounds()

    def process(self, value: float, ts: int) -> list[_Trigger] | None:
        """Move the rules on for ``value`` at event time ``ts``; the rules that fire (None: none)."""
        if ts >= self.wake:
            self._rearm(ts)
        active = self.active
        fired: list[_Trigger] | None = None
        if active and active[0][0] <= value:
            i = bisect_right(active, (value, _INF))
            fired = [t for _, _, t in active[:i]]
            del active[:i]
        armed = self.armed
        if armed and armed[-1][0] > value:
            i = bisect_right(armed, (value, _INF))
            moved = armed[i:]
            del armed[i:]
            changed = self.changed
            for _, _, t in moved:
                t.rule.state = ACTIVE
                if changed is not None:
                    changed.append(t.rule)
            active.extend(moved)
            active.sort()  # two sorted runs: linear
        self.last = value
        if fired:
            cooling = self.cooling
            for t in fired:
                rule = t.rule
                rule.fired_at = ts
                rule.fire_count += 1
                if rule.one_shot:
                    rule.state = FIRED
                else:
                    rule.state = COOLING
                    t.ready = ts + int(rule.cooldown_s * 1000)
                    heapq.heappush(cooling, (t.ready, t.n, t))
        self._bounds()
        return fired

    def _rearm(self, ts: int) -> None:
        cooling, last = self.cooling, self.last
        while cooling and cooling[0][0] <= ts:
            ready, _, t = heapq.heappop(cooling)
            if t.dead or t.rule.state != COOLING or t.ready != ready:
                continue
            # The cooldown ended at or before this update: the value "then" is the previous
            # one. On the near side, the rule is active at once (this update may fire it).
            if last is not None and last < t.level:
                t.rule.state = ACTIVE
                insort(self.active, (t.level, t.n, t))
            else:
                t.rule.state = ARMED
                insort(self.armed, (t.level, t.n, t))
            if self.changed is not None:
                self.changed.append(t.rule)


# ---------------------------------------------------------------------------------- signals
_Firing = tuple[_Trigger, float | None, float, float | None]  # trigger, price, value, reference


class _Signal:
    """A quantity computed once per update, and up to two indexes of the rules on it: ``a``
    (on the value: above, rises, spread) and ``b`` (on its negation: below, falls)."""

    __slots__ = ("a", "b")
    # The update kinds that can change the value: the others skip the signal. A cooldown that
    # ends meanwhile is then handled at the next update that does: the value did not move, so
    # the outcome is the same.
    kinds: tuple[str, ...] = (TRADE, QUOTE)

    def __init__(self) -> None:
        self.a: _Index | None = None
        self.b: _Index | None = None

    def index(self, key: str) -> _Index:
        idx = self.a if key == "a" else self.b
        if idx is None:
            idx = _Index()
            if key == "a":
                self.a = idx
            else:
                self.b = idx
        return idx

    def prune(self) -> bool:
        """Drop empty indexes; False if none is left."""
        if self.a is not None and not len(self.a):
            self.a = None
        if self.b is not None and not len(self.b):
            self.b = None
        return self.a is not None or self.b is not None

    def evaluate(self, state: PriceState, ts: int, out: list[_Firing]) -> None:
        raise NotImplementedError

    def peek(self, state: PriceState, key: str) -> float | None:
        """Index ``key``'s value from ``state`` alone (a rule being added), None if unknown."""
        raise NotImplementedError


class _PriceSignal(_Signal):
    """One price field: ``a`` holds the above rules, ``b`` the below rules."""

    __slots__ = ("get", "kinds")

    def __init__(self, field: str) -> None:
        super().__init__()
        self.get = _FIELD[field]
        self.kinds = (TRADE,) if field == "last" else (QUOTE,)

    def evaluate(self, state: PriceState, ts: int, out: list[_Firing]) -> None:
        price = self.get(state)
        if price is None:
            return
        idx = self.a
        if idx is not None:
            if idx.lo <= price < idx.hi and ts < idx.wake:
                idx.last = price
            else:
                fired = idx.process(price, ts)
                if fired:
                    out.extend((t, price, price, None) for t in fired)
        idx = self.b
        if idx is not None:
            neg = -price
            if idx.lo <= neg < idx.hi and ts < idx.wake:
                idx.last = neg
            else:
                fired = idx.process(neg, ts)
                if fired:
                    out.extend((t, price, price, None) for t in fired)

    def peek(self, state: PriceState, key: str) -> float | None:
        price = self.get(state)
        return None if price is None else price if key == "a" else -price


class _SpreadSignal(_Signal):
    """ask - bid, absolute or in basis points of mid; one index (``a``)."""

    __slots__ = ("bps", "quote", "mid", "spread")
    kinds = (QUOTE,)

    def __init__(self, bps: bool) -> None:
        super().__init__()
        self.bps = bps
        self.quote: tuple[float | None, float | None] = (None, None)
        self.mid = 0.0
        self.spread: float | None = None

    def value(self, state: PriceState) -> float | None:
        """The spread (and ``self.mid``); None when a side is unknown (or mid <= 0 for bps)."""
        bid, ask = state.bid_price, state.ask_price
        if (bid, ask) == self.quote:
            return self.spread
        self.quote = (bid, ask)
        if bid is None or ask is None:
            self.spread = None
            return None
        mid = self.mid = (bid + ask) / 2
        if not self.bps:
            self.spread = round(ask - bid, 9)  # 100.12 - 100.00 is 0.12000000000000455
        else:
            self.spread = round((ask - bid) / mid * 10_000, 6) if mid > 0 else None
        return self.spread

    def evaluate(self, state: PriceState, ts: int, out: list[_Firing]) -> None:
        idx = self.a
        spread = self.value(state)
        if idx is None or spread is None:
            return
        if idx.lo <= spread < idx.hi and ts < idx.wake:
            idx.last = spread
        else:
            fired = idx.process(spread, ts)
            if fired:
                out.extend((t, self.mid, spread, None) for t in fired)

    def peek(self, state: PriceState, key: str) -> float | None:
        return self.value(state)


class _MoveSignal(_Signal):
    """Move over a sliding window of event time: ``a`` on price / the window's low (a rise of
    2 % is >= 1.02), ``b`` on -price / its high (a fall of 2 % is -price / high >= -0.98).
    Ratios, not percentages, so that a move exactly at the limit compares exactly (both sides
    are the correctly rounded quotient). The window is two monotonic deques of (slot, price):
    O(1) per update, at most ``_SLOTS`` + 1 entries each."""

    __slots__ = (
        "get",
        "window_ms",
        "slot_ms",
        "slots",
        "lows",
        "highs",
        "last_ts",
        "last_slot",
        "price",
        "rise",
        "fall",
    )

    def __init__(self, field: str, window_ms: int) -> None:
        super().__init__()
        self.get = _FIELD[field]
        self.window_ms = window_ms
        self.slot_ms = max(1, window_ms // _SLOTS)
        self.slots = window_ms // self.slot_ms  # the window, in whole slots
        self.lows: deque[tuple[int, float]] = deque()  # increasing prices: lows[0] is the low
        self.highs: deque[tuple[int, float]] = deque()  # decreasing prices: highs[0] is the high
        self.last_ts = 0
        self.last_slot = -1
        self.price = 0.0
        self.rise = 0.0
        self.fall = 0.0

    def evaluate(self, state: PriceState, ts: int, out: list[_Firing]) -> None:
        # Every update, whatever its kind: time passing moves the window (that can only make
        # a move smaller: it never fires, but it arms rules that must see the next jump).
        price = self.get(state)
        if price is None or price <= 0:
            return
        if ts < self.last_ts:
            ts = self.last_ts  # a late event does not move the window back
        self.last_ts = ts
        slot = ts // self.slot_ms
        lows, highs = self.lows, self.highs
        if slot != self.last_slot or price != self.price:  # else the window is unchanged
            self.last_slot, self.price = slot, price
            edge = slot - self.slots  # slots before it are out of the window
            if self.a is not None:  # each side's deque is kept only while it has rules
                while lows and lows[0][0] < edge:
                    lows.popleft()
                while lows and lows[-1][1] >= price:
                    lows.pop()
                if not lows or lows[-1][0] != slot:  # same slot, lower price: this one adds nothing
                    lows.append((slot, price))
                self.rise = price / lows[0][1]
            if self.b is not None:
                while highs and highs[0][0] < edge:
                    highs.popleft()
                while highs and highs[-1][1] <= price:
                    highs.pop()
                if not highs or highs[-1][0] != slot:
                    highs.append((slot, price))
                self.fall = -price / highs[0][1]
        idx = self.a
        if idx is not None:
            rise = self.rise
            if idx.lo <= rise < idx.hi and ts < idx.wake:
                idx.last = rise
            else:
                fired = idx.process(rise, ts)
                if fired:
                    pct = round((rise - 1) * 100, 6)
                    out.extend((t, price, pct, lows[0][1]) for t in fired)
        idx = self.b
        if idx is not None:
            fall = self.fall
            if idx.lo <= fall < idx.hi and ts < idx.wake:
                idx.last = fall
            else:
                fired = idx.process(fall, ts)
                if fired:
                    pct = round((-fall - 1) * 100, 6)
                    out.extend((t, price, pct, highs[0][1]) for t in fired)

    def index(self, key: str) -> _Index:
        if (self.a if key == "a" else self.b) is None:  # a new side: its window starts now
            (self.lows if key == "a" else self.highs).clear()
            self.last_slot = -1
        return super().index(key)

    def peek(self, state: PriceState, key: str) -> float | None:
        price = self.get(state)
        if price is None or price <= 0:
            return None
        if key == "a":
            low = min(self.lows[0][1], price) if self.lows else price  # no history: no move yet
            return price / low
        high = max(self.highs[0][1], price) if self.highs else price
        return -price / high


class _Watch:
    """Everything the engine keeps for one symbol with rules."""

    __slots__ = ("signals", "by_kind", "stale", "seen", "last_ts", "last_price", "count")

    def __init__(self, now: int) -> None:
        self.signals: dict[tuple[Any, ...], _Signal] = {}
        # The signals an update of each kind can move (a merged update: all of them).
        self.by_kind: dict[str, list[_Signal]] = {TRADE: [], QUOTE: []}
        self.stale: list[_Trigger] = []
        self.seen = now  # engine clock of the last update (stale rules count from here)
        self.last_ts = 0  # event time of the last update
        self.last_price: float | None = None
        self.count = 0  # live rules (not fired one-shot ones)

    def index_signals(self) -> None:
        signals = list(self.signals.values())
        self.by_kind = {kind: [s for s in signals if kind in s.kinds] for kind in (TRADE, QUOTE)}


# ---------------------------------------------------------------------------------- engine
class AlertEngine:
    """All alert rules, indexed by symbol; evaluates them on updates and on clock checks.

    Synchronous and quick: made to be called from the hub's sync callback (:meth:`on_update`)
    and a periodic task (:meth:`check_stale`). It does no I/O: the caller stores rules and
    fired alerts (:class:`~trio_relay.alerts.store.AlertStore`) and hands fired alerts with a
    webhook to the :class:`~trio_relay.alerts.webhook.WebhookSender`.

    ``clock`` gives UTC epoch ms (wall clock by default): ``created_at``, ``fired_at``, and the
    arrival times that :meth:`check_stale` compares. Tests pass one driven by Trio's clock.
    Cooldowns of update-driven rules count in event time (update timestamps), like move windows.

    ``on_watch(symbol, True)`` is called when a symbol gets its first live rule that pins (one
    that can still fire, with ``rule.pins``, or any with ``pin_all``) and ``on_watch(symbol,
    False)`` when it has none left (deleted, or one-shot rules that fired): the relay keeps those
    symbols subscribed upstream (the hub passes on no update of a symbol nobody wants). Rules that
    do not pin (a non-admin's: see :mod:`trio_relay.entitlements`) are evaluated on whatever
    updates flow. :attr:`symbols` is every symbol with a live rule.
    """

    def __init__(
        self,
        config: AlertsConfig,
        *,
        clock: Callable[[], int] = wall_ms,
        on_watch: Callable[[str, bool], None] | None = None,
        pin_all: bool = False,
    ) -> None:
        self.config = config  # replace it on reload: limits and hosts apply to new rules
        self._clock = clock
        self._on_watch = on_watch
        # Auth off: every rule pins (its creator is the operator), stored ones from before `pins` too.
        self._pin_all = pin_all
        self._pinning: dict[str, int] = {}  # symbol -> live rules that pin it (entries vanish at 0)
        self._watches: dict[str, _Watch] = {}
        self._stale_watches: dict[str, _Watch] = {}
        self._triggers: dict[str, _Trigger] = {}
        self._by_owner: dict[str, dict[str, Rule]] = {}
        self._n = 0
        self.fired_total = 0
        # Rules whose state changed without firing since take_changed(): emptied by each call.
        self._changed: list[Rule] = []

    # ------------------------------------------------------------------ rules
    def create(
        self,
        owner: str,
        data: bytes | str | Mapping[str, Any],
        *,
        cache: Mapping[str, PriceState] | None = None,
        pins: bool = False,
        admit: Callable[[Rule], None] | None = None,
    ) -> Rule:
        """Validate a client's rule, give it an id and index it; :class:`RuleError` if refused.

        ``cache`` (``hub.cache``): the symbol's current state says which side of its threshold
        the rule starts on: on the near side it is ``active`` at once, else (or unknown) ``armed``.
        The caller saves the returned rule (``AlertStore.save_rule``). ``pins``: the rule keeps
        its symbol subscribed upstream. ``admit(rule)`` is called once the rule is valid and
        before it is indexed: raising refuses it (the entitlement check).
        """
        if not owner:
            raise RuleError("invalid_value", "a rule needs an owner")
        limit = self.config.max_rules_per_user
        if len(self._by_owner.get(owner, ())) >= limit:
            raise RuleError("rule_limit", f"at most {limit} alert rules per user: delete one first")
        rule_id = secrets.token_hex(5)
        while rule_id in self._triggers:
            rule_id = secrets.token_hex(5)
        rule = parse_rule(
            data,
            owner=owner,
            rule_id=rule_id,
            created_at=self._clock(),
            allowed_hosts=self.config.webhook_allowed_hosts,
            pins=pins,
            policy=webhook_policy(self.config),
        )
        if admit is not None:
            admit(rule)
        self.add(rule, current=None if cache is None else cache.get(rule.symbol))
        return rule

    def add(self, rule: Rule, *, current: PriceState | None = None) -> None:
        """Index a valid rule (one loaded from the store; no limit applies). Replaces one with its id.

        A stored ``fired`` (one-shot) rule stays fired, a ``cooling`` one finishes its cooldown;
        ``armed`` or ``active`` restart from ``current`` (None: armed, as after a restart the
        engine cannot know where the price went meanwhile).
        """
        if rule.id in self._triggers:
            self._remove(rule.id)
        self._n += 1
        trig = _Trigger(rule, _level(rule), self._n)
        self._triggers[rule.id] = trig
        self._by_owner.setdefault(rule.owner, {})[rule.id] = rule
        if rule.state == FIRED:
            return  # a fired one-shot rule is listed, never evaluated again
        symbol = rule.symbol
        watch = self._watches.get(symbol)
        if watch is None:
            watch = self._watches[symbol] = _Watch(self._clock())
        watch.count += 1
        if rule.pins or self._pin_all:
            n = self._pinning.get(symbol, 0)
            self._pinning[symbol] = n + 1
            if not n and self._on_watch is not None:
                self._on_watch(symbol, True)
        if isinstance(rule, StaleRule):
            if not watch.stale:
                watch.seen = self._clock()
            if rule.state == COOLING:
                trig.ready = (rule.fired_at or 0) + int(rule.cooldown_s * 1000)
            else:
                rule.state = ACTIVE
            watch.stale.append(trig)
            self._stale_watches[symbol] = watch
            return
        key, side = _signal_key(rule)
        signal = watch.signals.get(key)
        if signal is None:
            signal = watch.signals[key] = _make_signal(key)
            watch.index_signals()
        idx = signal.index(side)
        idx.changed = self._changed
        value = idx.last if idx.last is not None else signal.peek(current, side) if current is not None else None
        idx.add(trig, value)

    def load(self, rules: Iterable[Rule]) -> None:
        """Index stored rules (at start: ``engine.load(await store.load())``)."""
        for rule in rules:
            self.add(rule)

    def remove(self, owner: str, rule_id: str) -> Rule | None:
        """Delete ``owner``'s rule ``rule_id``; the rule, or None if they have no such rule."""
        rules = self._by_owner.get(owner)
        if rules is None or rule_id not in rules:
            return None
        return self._remove(rule_id)

    def _remove(self, rule_id: str) -> Rule:
        trig = self._triggers.pop(rule_id)
        rule = trig.rule
        rules = self._by_owner[rule.owner]
        del rules[rule_id]
        if not rules:
            del self._by_owner[rule.owner]
        if rule.state != FIRED:  # a fired one-shot rule has already left its watch
            if isinstance(rule, StaleRule):
                self._watches[rule.symbol].stale.remove(trig)
            elif trig.index is not None:
                trig.index.remove(trig)
            self._retire(rule)
        trig.dead = True
        return rule

    def _retire(self, rule: Rule) -> None:
        """A live rule left (deleted, or a one-shot rule fired): drop what is now empty."""
        symbol = rule.symbol
        if rule.pins or self._pin_all:
            n = self._pinning[symbol] - 1
            if n:
                self._pinning[symbol] = n
            else:
                del self._pinning[symbol]
                if self._on_watch is not None:
                    self._on_watch(symbol, False)
        watch = self._watches[symbol]
        watch.count -= 1
        if not watch.stale:
            self._stale_watches.pop(symbol, None)
        for key, signal in list(watch.signals.items()):
            if not signal.prune():
                del watch.signals[key]
                watch.index_signals()
        if not watch.count:
            del self._watches[symbol]

    def rules(self, owner: str) -> list[Rule]:
        """``owner``'s rules, oldest first."""
        return list(self._by_owner.get(owner, {}).values())

    def get(self, rule_id: str) -> Rule | None:
        """Any rule by id (e.g. the rule of a fired alert, for its webhook)."""
        trig = self._triggers.get(rule_id)
        return None if trig is None else trig.rule

    def __len__(self) -> int:
        return len(self._triggers)

    @property
    def symbols(self) -> KeysView[str]:
        """The symbols with live rules (a live view): the ones the engine evaluates."""
        return self._watches.keys()

    @property
    def pinned_symbols(self) -> KeysView[str]:
        """The symbols with live rules that pin (a live view): the relay keeps them subscribed."""
        return self._pinning.keys()

    def owner_symbols(self, owner: str) -> set[str]:
        """The distinct symbols of ``owner``'s live rules (what counts against their symbol budget)."""
        return {r.symbol for r in self._by_owner.get(owner, {}).values() if r.state != FIRED}

    # ------------------------------------------------------------------ evaluation
    def on_update(self, update: Update, state: PriceState) -> list[FiredAlert]:
        """Evaluate ``update``'s symbol's rules against ``state`` (its cache entry after the merge).

        Returns the alerts that fired (usually none). One dict lookup when the symbol has no rules.
        """
        watch = self._watches.get(update.symbol)
        if watch is None:
            return []
        ts = update.timestamp
        if watch.stale:
            watch.seen = self._clock()
            watch.last_ts = ts
            watch.last_price = state.last_price
        # A break corrects an old print (the state's prices did not move): no signal runs.
        signals = watch.signals.values() if update.merged else watch.by_kind.get(update.kind)
        if not signals:
            return []
        firings: list[_Firing] = []
        for signal in signals:
            signal.evaluate(state, ts, firings)
        if not firings:
            return []
        alerts = [self._alert(f, ts, state) for f in firings]
        for trig, _, _, _ in firings:
            if trig.rule.state == FIRED:
                self._retire(trig.rule)
        return alerts

    def take_changed(self) -> list[Rule]:
        """The live rules whose state changed without firing since the last call (armed -> active,
        a cooldown that ended), for the caller to save: what decides the next crossing then
        survives a restart. Each rule at most once; empty for almost every update."""
        if not self._changed:
            return []
        latest = {rule.id: rule for rule in self._changed}  # rules are not hashable: by id
        self._changed.clear()
        return [
            rule
            for rule_id, rule in latest.items()
            if (t := self._triggers.get(rule_id)) is not None and t.rule is rule
        ]

    def check_stale(self, now_ms: int | None = None) -> list[FiredAlert]:
        """Fire the stale rules whose symbol had no update for their ``seconds`` (engine clock).

        Call it every second or so (:meth:`run_stale_checks` does); ``now_ms`` defaults to the
        engine clock. A stale rule fires once per silence; a re-arming one re-arms when an update
        has arrived since it fired and its cooldown (engine clock) has passed.
        """
        now = self._clock() if now_ms is None else now_ms
        alerts: list[FiredAlert] = []
        done: list[_Trigger] = []
        for symbol, watch in self._stale_watches.items():
            silent = now - watch.seen
            for trig in watch.stale:
                rule = trig.rule
                if rule.state == COOLING and watch.seen > (rule.fired_at or 0) and now >= trig.ready:
                    rule.state = ACTIVE
                if rule.state == ACTIVE and silent >= trig.level:
                    rule.fired_at = now
                    rule.fire_count += 1
                    if rule.one_shot:
                        rule.state = FIRED
                        done.append(trig)
                    else:
                        rule.state = COOLING
                        trig.ready = now + int(rule.cooldown_s * 1000)
                    alerts.append(
                        self._make(
                            rule,
                            watch.last_price,
                            silent / 1000,
                            watch.last_ts,
                            f"{symbol} had no update for {silent / 1000:.0f}s (limit {_num(trig.level / 1000)}s)",
                        )
                    )
        for trig in done:
            self._watches[trig.rule.symbol].stale.remove(trig)
            self._retire(trig.rule)
        return alerts

    async def run_stale_checks(
        self,
        deliver: Callable[[list[FiredAlert]], None],
        *,
        interval: float = 1.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call :meth:`check_stale` every ``interval`` seconds; ``deliver`` gets what fired."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            if self._stale_watches:
                alerts = self.check_stale()
                if alerts:
                    deliver(alerts)

    # ------------------------------------------------------------------ alerts
    def _alert(self, firing: _Firing, ts: int, state: PriceState) -> FiredAlert:
        trig, price, value, ref = firing
        rule = trig.rule
        symbol = rule.symbol
        if isinstance(rule, (AboveRule, BelowRule)):
            side = "above" if isinstance(rule, AboveRule) else "below"
            message = f"{symbol} {rule.field} crossed {side} {_price(rule.level)} at {_price(value)}"
        elif isinstance(rule, MoveRule):
            verb = "rose" if value >= 0 else "fell"
            message = (
                f"{symbol} {rule.field} {verb} {abs(value):.2f}% within {_duration(rule.window_s)} "
                f"(from {_price(ref)} to {_price(price)})"
            )
        else:
            assert isinstance(rule, SpreadRule)
            quotes = f"(bid {_price(state.bid_price)}, ask {_price(state.ask_price)})"
            if rule.max_spread is not None:
                message = f"{symbol} spread {_price(value)} is wider than {_price(rule.max_spread)} {quotes}"
            else:
                message = f"{symbol} spread {value:.1f} bps is wider than {_num(rule.max_spread_bps)} bps {quotes}"
        return self._make(rule, price, value, ts, message)

    def _make(self, rule: Rule, price: float | None, value: float | None, ts: int, message: str) -> FiredAlert:
        self.fired_total += 1
        return FiredAlert(
            id=secrets.token_hex(6),
            rule_id=rule.id,
            owner=rule.owner,
            symbol=rule.symbol,
            name=rule.name,
            rule=rule_params(rule),
            price=price,
            value=value,
            fired_at=self._clock(),
            timestamp=ts,
            message=message,
        )


def _level(rule: Rule) -> float:
    """The rule's threshold in its index's terms (fires when the index value >= it)."""
    if isinstance(rule, AboveRule):
        return rule.level
    if isinstance(rule, BelowRule):
        return -rule.level
    if isinstance(rule, MoveRule):
        ratio = round(1 + rule.pct / 100, 12)  # 2.0 -> 1.02, -2.0 -> 0.98: exactly the floats price/low gives
        return ratio if rule.pct > 0 else -ratio
    if isinstance(rule, SpreadRule):  # strictly wider: the next float up
        return math.nextafter(rule.max_spread if rule.max_spread is not None else rule.max_spread_bps or 0.0, _INF)
    return rule.seconds * 1000


def _signal_key(rule: Rule) -> tuple[tuple[Any, ...], str]:
    """(the signal the rule watches, its index on it: "a" the value, "b" the negated value)."""
    if isinstance(rule, (AboveRule, BelowRule)):
        return ("price", rule.field), "a" if isinstance(rule, AboveRule) else "b"
    if isinstance(rule, MoveRule):
        return ("move", rule.field, int(rule.window_s * 1000)), "a" if rule.pct > 0 else "b"
    assert isinstance(rule, SpreadRule)
    return ("spread", "abs" if rule.max_spread is not None else "bps"), "a"


def _make_signal(key: tuple[Any, ...]) -> _Signal:
    if key[0] == "price":
        return _PriceSignal(key[1])
    if key[0] == "move":
        return _MoveSignal(key[1], key[2])
    return _SpreadSignal(key[1] == "bps")


def _price(p: float | None) -> str:
    """190 -> 190.00, 190.05 -> 190.05, 1.08345 -> 1.08345."""
    if p is None:
        return "-"
    return f"{p:.2f}" if round(p, 2) == p else f"{p:.10g}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
