"""The hub's merge of an update into the cache, checked against :meth:`PriceState.apply`.

``Hub.publish`` takes a short path for the common update (a trade or quote of a cached symbol)
and ``Hub._apply`` for the rest; these tests hold the cache, seq, provider, trade memory and
routed frame to a plain ``PriceState.apply`` over arbitrary update sequences, the updates that
take the general path (a first update, a whole state, an upstream's numbering) in between.
"""

from __future__ import annotations

import json

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_relay.config import ClientsConfig
from trio_relay.hub import Demand, Hub, Stats
from trio_relay.model import PriceState, Update, ws_payload

SYMBOLS = ["AAA", "BBB", "CCC"]

_price = st.one_of(st.none(), st.floats(min_value=0.01, max_value=1e6, allow_nan=False))
_size = st.one_of(st.none(), st.integers(min_value=0, max_value=10_000), st.floats(min_value=0, max_value=1e6))


@st.composite
def updates(draw: st.DrawFn) -> Update:
    kind = draw(st.sampled_from(["T", "Q"]))
    return Update(
        draw(st.sampled_from(SYMBOLS)),
        kind,
        draw(st.integers(min_value=1, max_value=2**62)),
        last_price=draw(_price),
        last_size=draw(_size),
        ask_price=draw(_price),
        ask_size=draw(_size),
        bid_price=draw(_price),
        bid_size=draw(_size),
        merged=draw(st.booleans()) and draw(st.booleans()),  # a quarter: whole states
        provider=draw(st.sampled_from([None, None, None, "other"])),
    )


def reference(state: PriceState | None, update: Update, seq: int, source: str, epoch: str) -> PriceState:
    """What the cache entry must be after ``update``: PriceState.apply on a copy."""
    new = (
        msgspec.structs.replace(state) if state is not None else PriceState(symbol=update.symbol, epoch=epoch, seq=seq)
    )
    new.provider = update.provider or source
    new.apply(update, "")
    return new


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(updates(), min_size=1, max_size=40), numbered=st.sets(st.integers(0, 39)))
def test_publish_merges_as_price_state_apply(batch: list[Update], numbered: set[int]) -> None:
    hub = Hub(ClientsConfig(resume_history=64), Demand(0, SYMBOLS), Stats(), source="fmp")
    expected: dict[str, PriceState] = {}
    trades: dict[str, list[Update]] = {}
    for i, update in enumerate(batch):
        if i in numbered:  # an upstream relay's numbering: a seq past the cached one
            update = msgspec.structs.replace(
                update, seq=expected[update.symbol].seq + 3 if update.symbol in expected else 5
            )
        expected[update.symbol] = reference(expected.get(update.symbol), update, 0, "fmp", hub.epoch)
        if update.kind == "T" and not update.merged:
            trades.setdefault(update.symbol, []).append(update)
        hub.publish(update)
        state = hub.cache[update.symbol]
        assert state.cached_at.endswith("Z")
        assert msgspec.structs.replace(state, cached_at="") == expected[update.symbol], update
        # The frame routed (and kept for resumes) is that state, encoded.
        frame = json.loads(ws_payload(hub._history[update.symbol][-1]))
        assert frame == json.loads(msgspec.json.encode(state))
    for symbol, kept in trades.items():
        assert list(hub.trades.by_symbol[symbol]) == kept[-16:]
    assert hub.stats.updates_in == len(batch)
