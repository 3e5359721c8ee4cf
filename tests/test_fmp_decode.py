"""FMP frame decoding, field by field, and the epoch-unit normalisation it relies on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_relay.model import Amend, AmendAction, Update, normalize_epoch_ms
from trio_relay.providers import fmp
from trio_relay.providers.base import MalformedFrame
from trio_relay.providers.fmp import decode_frame

NOW_MS = 1_700_000_000_000
T_MS = 1_699_564_800_123  # 2023-11-09T21:20:00.123Z


def decode(obj: Any, now_ms: int = NOW_MS) -> Update | None:
    raw = obj if isinstance(obj, (str, bytes)) else json.dumps(obj)
    _frame, update = decode_frame(raw, now_ms)
    return update


# --------------------------------------------------------------------------- data frames


def test_trade_frame_field_by_field() -> None:
    frame = {"s": "aapl", "t": T_MS, "type": "T", "lp": 189.5, "ls": 100}
    assert decode(frame) == Update(symbol="AAPL", kind="T", timestamp=T_MS, last_price=189.5, last_size=100)


def test_quote_frame_field_by_field_including_as() -> None:
    frame = {"s": "msft", "t": T_MS, "type": "Q", "ap": 370.25, "as": 300, "bp": 370.2, "bs": 200}
    update = decode(frame)
    assert update == Update(
        symbol="MSFT",
        kind="Q",
        timestamp=T_MS,
        ask_price=370.25,
        ask_size=300,
        bid_price=370.2,
        bid_size=200,
    )
    assert update.last_price is None and update.last_size is None


def test_break_frame() -> None:
    update = decode({"s": "ibm", "t": T_MS, "type": "B", "lp": 150.0, "ls": 10})
    amend = Amend(action=AmendAction.BREAK, price=150.0, size=10)  # FMP has no trade ids
    assert update == Update("IBM", "B", T_MS, last_price=150.0, last_size=10, amend=amend)


def test_trade_ignores_quote_fields_and_quote_ignores_trade_fields() -> None:
    # FMP sends every field in every frame; the kind decides which ones are meaningful.
    full = {"s": "aapl", "t": T_MS, "lp": 1.5, "ls": 2, "ap": 1.6, "as": 3, "bp": 1.4, "bs": 4}
    trade = decode({**full, "type": "T"})
    assert trade is not None and trade.kind == "T"
    assert (trade.last_price, trade.last_size) == (1.5, 2)
    assert (trade.ask_price, trade.bid_price, trade.ask_size, trade.bid_size) == (None, None, None, None)
    quote = decode({**full, "type": "Q"})
    assert quote is not None and quote.kind == "Q"
    assert (quote.ask_price, quote.ask_size, quote.bid_price, quote.bid_size) == (1.6, 3, 1.4, 4)
    assert (quote.last_price, quote.last_size) == (None, None)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("aapl", "AAPL"),
        ("AAPL", "AAPL"),
        ("brk.b", "BRK.B"),
        ("btcusd", "BTCUSD"),
        ("eurusd=x", "EURUSD=X"),
        ("^gspc", "^GSPC"),
    ],
)
def test_symbol_is_upper_cased(raw: str, expected: str) -> None:
    update = decode({"s": raw, "t": T_MS, "type": "T", "lp": 1.0})
    assert update is not None and update.symbol == expected


@pytest.mark.parametrize(
    "t, expected",
    [
        (T_MS * 1_000_000 + 456_789, T_MS),  # ns, 19 digits (FMP stocks)
        (T_MS * 1_000 + 456, T_MS),  # µs, 16 digits
        (T_MS, T_MS),  # ms, 13 digits (FMP crypto/forex)
        (T_MS // 1000, T_MS // 1000 * 1000),  # s, 10 digits
        (1_699_564_800.5, 1_699_564_800_500),  # fractional seconds
    ],
    ids=["ns", "us", "ms", "s", "s-float"],
)
def test_timestamp_normalised_to_ms(t: int | float, expected: int) -> None:
    update = decode({"s": "aapl", "t": t, "type": "T", "lp": 1.0})
    assert update is not None and update.timestamp == expected
    assert isinstance(update.timestamp, int)


@pytest.mark.parametrize("frame_t", [None, 0, -5], ids=["null", "zero", "negative"])
def test_missing_or_unusable_timestamp_uses_now(frame_t: int | None) -> None:
    update = decode({"s": "aapl", "t": frame_t, "type": "T", "lp": 1.0}, now_ms=NOW_MS)
    assert update is not None and update.timestamp == NOW_MS
    update = decode({"s": "aapl", "type": "T", "lp": 1.0}, now_ms=NOW_MS + 7)
    assert update is not None and update.timestamp == NOW_MS + 7


def test_null_fields_are_none() -> None:
    update = decode({"s": "aapl", "t": T_MS, "type": "T", "lp": 10.0, "ls": None, "ap": None, "bp": None})
    assert update == Update("AAPL", "T", T_MS, last_price=10.0)
    update = decode({"s": "aapl", "t": T_MS, "type": "Q", "ap": None, "as": None, "bp": 9.9, "bs": None})
    assert update == Update("AAPL", "Q", T_MS, bid_price=9.9)
    update = decode({"s": "aapl", "t": T_MS, "type": "Q", "ap": 10.1, "as": 5, "bp": None, "bs": None})
    assert update == Update("AAPL", "Q", T_MS, ask_price=10.1, ask_size=5)


def test_integer_prices_are_accepted() -> None:
    update = decode({"s": "aapl", "t": T_MS, "type": "T", "lp": 190, "ls": 5})
    assert update is not None and update.last_price == 190


def test_unknown_extra_fields_are_ignored() -> None:
    update = decode({"s": "aapl", "t": T_MS, "type": "T", "lp": 1.0, "exchange": "NASDAQ", "conditions": [1]})
    assert update == Update("AAPL", "T", T_MS, last_price=1.0)


def test_bytes_frame_decodes() -> None:
    raw = json.dumps({"s": "aapl", "t": T_MS, "type": "T", "lp": 1.0}).encode()
    assert decode(raw) == Update("AAPL", "T", T_MS, last_price=1.0)


def test_frame_is_returned_with_its_raw_fields() -> None:
    frame, update = decode_frame('{"s":"aapl","t":1,"type":"Q","ap":2.0,"as":3}', NOW_MS)
    assert frame.s == "aapl" and frame.type == "Q" and frame.as_ == 3
    assert update is not None and update.ask_size == 3


# --------------------------------------------------------------------------- control frames


@pytest.mark.parametrize(
    "frame",
    [
        {"event": "heartbeat"},
        {"event": "heartbeat", "timestamp": NOW_MS},
        {"event": "login", "status": 200, "message": "Authenticated"},
        {"event": "login", "status": 401, "message": "Unauthorized"},
        {"event": "subscribe", "status": 200, "message": "subscribed to aapl"},
        {"event": "unsubscribe", "data": {"ticker": ["aapl"]}},
    ],
    ids=["heartbeat", "heartbeat-ts", "login-ok", "login-401", "subscribe", "unsubscribe"],
)
def test_control_frames_give_no_update(frame: dict[str, Any]) -> None:
    decoded, update = decode_frame(json.dumps(frame), NOW_MS)
    assert update is None
    assert decoded.event == frame["event"]
    if "status" in frame:
        assert decoded.status == frame["status"] and decoded.message == frame["message"]


# --------------------------------------------------------------------------- malformed frames


@pytest.mark.parametrize(
    "raw",
    [
        "this is not json",
        '{"s": "aapl", "type": "T"',  # truncated
        "",
        "[1, 2, 3]",  # a JSON array
        '"just a string"',
        "null",
        '{"s": 42, "t": 1, "type": "T", "lp": 1.0}',  # symbol of the wrong type
        '{"s": "aapl", "t": "yesterday", "type": "T", "lp": 1.0}',  # timestamp of the wrong type
        '{"s": "aapl", "t": 1, "type": "T", "lp": "cheap"}',  # price of the wrong type
        '{"s": "aapl", "t": 1, "type": "T", "lp": true}',  # a bool is not a price
        '{"s": "aapl", "t": 1, "type": 1, "lp": 1.0}',  # type of the wrong type
        '{"s": "aapl", "t": 1, "type": "Q", "bp": [1.0], "ap": 2.0}',
        '{"t": 1, "type": "T", "lp": 1.0}',  # missing s
        '{"s": "", "t": 1, "type": "T", "lp": 1.0}',  # empty s
        '{"s": null, "t": 1, "type": "T", "lp": 1.0}',
        '{"s": "not a symbol", "t": 1, "type": "T", "lp": 1.0}',  # invalid symbol
        '{"s": "aapl", "t": 1, "type": "Z", "lp": 1.0}',  # unknown type
        '{"s": "aapl", "t": 1, "lp": 1.0}',  # no type at all
        '{"s": "aapl", "t": 1, "type": "t", "lp": 1.0}',  # types are case-sensitive
        '{"s": "aapl", "t": 1, "type": "T", "ls": 100}',  # T without lp
        '{"s": "aapl", "t": 1, "type": "T", "lp": null}',
        '{"s": "aapl", "t": 1, "type": "B"}',  # B without lp
        '{"s": "aapl", "t": 1, "type": "Q", "as": 1, "bs": 2}',  # Q without prices
        '{"s": "aapl", "t": 1, "type": "Q", "ap": null, "bp": null}',
        "{}",
    ],
)
def test_malformed_frames_raise(raw: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        decode_frame(raw, NOW_MS)
    assert info.value.frame == raw  # the raw frame travels with the error (for the log)
    assert info.value.reason and str(info.value) == info.value.reason


def test_malformed_bytes_frame_keeps_the_bytes() -> None:
    raw = b"\xff\xfe not utf-8"
    with pytest.raises(MalformedFrame) as info:
        decode_frame(raw, NOW_MS)
    assert info.value.frame == raw


def test_malformed_reasons_are_specific() -> None:
    def reason(raw: str) -> str:
        with pytest.raises(MalformedFrame) as info:
            decode_frame(raw, NOW_MS)
        return info.value.reason

    assert "lp" in reason('{"s": "aapl", "type": "T"}')
    assert "unknown type" in reason('{"s": "aapl", "type": "X", "lp": 1}')
    assert "symbol" in reason('{"type": "T", "lp": 1}')
    assert "Q frame" in reason('{"s": "aapl", "type": "Q"}')


# --------------------------------------------------------------------------- the symbol memo


def decode_with(memo: fmp.SymbolMemo, obj: Any) -> Update | None:
    return decode_frame(json.dumps(obj), NOW_MS, memo)[1]


def test_memo_holds_valid_symbols_only() -> None:
    memo = fmp.SymbolMemo()
    for _ in range(2):  # the second time from the memo: the same answers
        assert decode_with(memo, {"s": "brk.b", "type": "T", "lp": 1.0}) == Update("BRK.B", "T", NOW_MS, last_price=1.0)
        assert decode_with(memo, {"s": "BRK.B", "type": "T", "lp": 1.0}) == Update("BRK.B", "T", NOW_MS, last_price=1.0)
        for bad in ["not a symbol", "a" * 21, "", None, "aapl;", "-aapl", "aapl\n"]:
            with pytest.raises(MalformedFrame, match="symbol"):
                decode_with(memo, {"s": bad, "type": "T", "lp": 1.0})
    assert memo.known == {"brk.b": "BRK.B", "BRK.B": "BRK.B"}  # bad symbols never enter


def test_memo_is_bounded_and_a_full_memo_still_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmp, "MAX_SYMBOL_MEMO", 3)
    memo = fmp.SymbolMemo()
    symbols = [f"s{i}" for i in range(10)]
    for _ in range(2):
        for s in symbols:
            update = decode_with(memo, {"s": s, "type": "T", "lp": 1.0})
            assert update is not None and update.symbol == s.upper()
        with pytest.raises(MalformedFrame, match="symbol"):
            decode_with(memo, {"s": "not a symbol", "type": "T", "lp": 1.0})
    assert memo.known == {"s0": "S0", "s1": "S1", "s2": "S2"}  # the first three, never more


# --------------------------------------------------------------------------- normalize_epoch_ms


@pytest.mark.parametrize(
    "t, expected",
    [
        # seconds: below 1e11
        (0, 0),
        (1, 1000),
        (1_699_564_800, 1_699_564_800_000),
        (99_999_999_999, 99_999_999_999_000),  # largest "seconds"
        (1.25, 1250),
        # milliseconds: [1e11, 1e14)
        (100_000_000_000, 100_000_000_000),  # smallest "milliseconds"
        (1_699_564_800_123, 1_699_564_800_123),
        (99_999_999_999_999, 99_999_999_999_999),  # largest
        # microseconds: [1e14, 1e17)
        (100_000_000_000_000, 100_000_000_000),  # smallest
        (1_699_564_800_123_456, 1_699_564_800_123),
        (99_999_999_999_999_999, 99_999_999_999_999),  # largest
        # nanoseconds: from 1e17
        (100_000_000_000_000_000, 100_000_000_000),  # smallest
        (1_699_564_800_123_456_789, 1_699_564_800_123),
        (1.6995648001234568e18, 1_699_564_800_123),  # ns as a float
    ],
)
def test_normalize_epoch_ms_unit_boundaries(t: int | float, expected: int) -> None:
    result = normalize_epoch_ms(t)
    assert result == expected
    assert type(result) is int


def test_normalize_epoch_ms_same_instant_in_every_unit() -> None:
    ms = 1_731_240_000_456
    assert normalize_epoch_ms(ms // 1000) == ms // 1000 * 1000
    assert normalize_epoch_ms(ms) == ms
    assert normalize_epoch_ms(ms * 1000 + 999) == ms
    assert normalize_epoch_ms(ms * 1_000_000 + 999_999) == ms


def _by_float_bounds(t: int | float) -> int:
    """The rule as first written: every bound a float (what the int branch must agree with)."""
    if t >= 1e17:
        return int(t // 1_000_000)
    if t >= 1e14:
        return int(t // 1_000)
    if t >= 1e11:
        return int(t)
    return int(t * 1000)


@given(
    st.one_of(
        st.integers(min_value=-(10**20), max_value=10**20),
        *(st.integers(min_value=b - 2, max_value=b + 2) for b in (10**11, 10**14, 10**17)),
    )
)
def test_normalize_epoch_ms_of_an_int_is_the_float_rules(t: int) -> None:
    result = normalize_epoch_ms(t)
    assert result == _by_float_bounds(t)
    assert type(result) is int
