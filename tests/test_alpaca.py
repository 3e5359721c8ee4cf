"""The Alpaca provider: decoding field by field, error mapping, symbol mapping, and the real relay
against the fake Alpaca server over loopback (plus login timing under MockClock)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from conftest import api, wait_state

from trio_relay.model import Amend, AmendAction, Update
from trio_relay.providers.alpaca import AlpacaConfig, AlpacaProvider, AlpacaSession, rfc3339_ms
from trio_relay.providers.base import AuthFailed, ConnectionLimit, MalformedFrame, ProviderError, ignore_refused
from trio_relay.testing.fake_alpaca import (
    MALFORMED_FRAMES,
    FakeAlpacaServer,
    cancel_msg,
    correction_msg,
    frame,
    quote_msg,
    trade_msg,
)

KEY_ID = "AKTEST5f3a9c2e71d4b8a6"  # long and unique, so a leak would be found by grep
SECRET = "sk-9d8c7b6a5f4e3d2c1b0a99887766"
T = "2021-02-22T15:51:44.208123456Z"
T_MS = 1_614_009_104_208


# =========================================================================== helpers


class StubWs:
    """Stands in for the WebSocket below a session: records what it would send."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def receive_batch(self) -> list[str]:
        raise AssertionError("not used")


def make_session(
    feed: str = "iex",
    *,
    symbols: dict[str, str] | None = None,
    provider: AlpacaProvider | None = None,
    on_refused: Any = ignore_refused,
) -> tuple[AlpacaSession, StubWs, list[MalformedFrame]]:
    provider = provider or AlpacaProvider(
        AlpacaConfig(key_id=KEY_ID, secret_key=SECRET, feed=feed, symbols=symbols or {})
    )  # type: ignore[arg-type]
    ws = StubWs()
    bad: list[MalformedFrame] = []
    session = AlpacaSession(
        ws, provider.symbols, bad.append, warned=provider._warned, secrets=(KEY_ID, SECRET), on_refused=on_refused
    )
    return session, ws, bad


def decode(session: AlpacaSession, *messages: dict[str, Any]) -> list[Update]:
    return session.process([frame(*messages)])


def alpaca_sections(fake: FakeAlpacaServer, *, feed: str = "iex", **upstream: Any) -> dict[str, dict[str, Any]]:
    return {
        "upstream": {"provider": "alpaca", "unsubscribe_linger": 0.0, **upstream},
        "alpaca": {"key_id": KEY_ID, "secret_key": SECRET, "url": fake.url, "feed": feed, "auth_timeout": 2.0},
    }


@pytest.fixture
async def fake_alpaca():
    async with FakeAlpacaServer.open(credentials={KEY_ID: SECRET}, rate=50.0) as server:
        yield server


@pytest.fixture
async def fake_crypto():
    async with FakeAlpacaServer.open(credentials={KEY_ID: SECRET}, rate=50.0, crypto=True) as server:
        yield server


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# =========================================================================== timestamps


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2021-02-22T15:51:44.208Z", T_MS),
        ("2021-02-22T15:51:44.208123456Z", T_MS),  # ns: cut to ms
        ("2021-02-22T15:51:44.208999999Z", T_MS),  # floored, never rounded up
        ("2021-02-22T15:51:44.208123Z", T_MS),
        ("2021-02-22T15:51:44.2Z", T_MS - 8),
        ("2021-02-22T15:51:44Z", T_MS - 208),  # no fraction
        ("2021-02-22T15:51:44.208+00:00", T_MS),
        ("2021-02-22T11:51:44.208-04:00", T_MS),
        ("2021-02-22T21:21:44.208+05:30", T_MS),
        ("1970-01-01T00:00:00Z", 0),
    ],
)
def test_rfc3339_to_epoch_ms(text: str, expected: int) -> None:
    result = rfc3339_ms(text)
    assert result == expected and type(result) is int


@pytest.mark.parametrize("text", ["yesterday", "2021-02-30T00:00:00Z", "2021-02-22T25:00:00Z", ""])
def test_rfc3339_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        rfc3339_ms(text)


def test_rfc3339_without_zone_is_refused() -> None:
    with pytest.raises(TypeError):
        rfc3339_ms("2021-02-22T15:51:44.208")


# =========================================================================== data messages


def test_stock_trade_field_by_field() -> None:
    session, _, bad = make_session()
    updates = decode(session, trade_msg("AAPL", 189.45, 100, T, trade_id=52983525029461))
    assert updates == [Update("AAPL", "T", T_MS, last_price=189.45, last_size=100, trade_id="52983525029461")]
    assert type(updates[0].last_size) is int  # sizes pass through as sent (shares)
    assert bad == []


def test_stock_quote_field_by_field_sizes_in_shares() -> None:
    session, _, _ = make_session()
    updates = decode(session, quote_msg("MSFT", 370.2, 300, 370.25, 1200, T))
    assert updates == [Update("MSFT", "Q", T_MS, ask_price=370.25, ask_size=1200, bid_price=370.2, bid_size=300)]
    assert updates[0].last_price is None and updates[0].last_size is None


def test_quote_side_with_zero_price_is_empty() -> None:
    session, _, _ = make_session()
    updates = decode(session, quote_msg("IBM", 0, 0, 150.5, 100, T), quote_msg("IBM", 150.4, 200, 0, 0, T))
    assert updates == [
        Update("IBM", "Q", T_MS, ask_price=150.5, ask_size=100),
        Update("IBM", "Q", T_MS, bid_price=150.4, bid_size=200),
    ]


def test_crypto_trade_and_quote_map_to_client_symbols() -> None:
    session, _, bad = make_session("crypto")
    updates = decode(
        session,
        trade_msg("BTC/USD", 43000.5, 0.0125, T, crypto=True),
        quote_msg("ETH/USD", 2300.1, 1.5, 2300.3, 0.25, T, crypto=True),
    )
    assert updates == [
        Update("BTCUSD", "T", T_MS, last_price=43000.5, last_size=0.0125, trade_id="1"),
        Update("ETHUSD", "Q", T_MS, ask_price=2300.3, ask_size=0.25, bid_price=2300.1, bid_size=1.5),
    ]
    assert bad == []


def test_correction_names_the_original_trade_and_the_corrected_one() -> None:
    session, _, _ = make_session()
    msg = correction_msg(
        "AAPL", original_price=189.45, original_size=100, corrected_price=189.5, corrected_size=90, t=T,
        original_id=7, corrected_id=8,
    )  # fmt: skip
    amend = Amend(
        action=AmendAction.CORRECTION, trade_id="7", price=189.45, size=100,
        corrected_id="8", corrected_price=189.5, corrected_size=90,
    )  # fmt: skip
    assert decode(session, msg) == [Update("AAPL", "C", T_MS, last_price=189.5, last_size=90, amend=amend)]


@pytest.mark.parametrize("action", ["C", "E"])
def test_cancel_and_error_name_the_void_trade(action: str) -> None:
    """alpaca-py's TradeCancel: ``a`` is C (cancel) or E (error); both void trade ``i``."""
    session, _, bad = make_session()
    updates = decode(session, cancel_msg("AAPL", trade_id=52983525029461, price=189.45, size=100, t=T, action=action))
    amend = Amend(action=AmendAction.CANCEL, trade_id="52983525029461", price=189.45, size=100)
    assert updates == [Update("AAPL", "X", T_MS, last_price=189.45, last_size=100, amend=amend)]
    assert bad == []


def test_status_luld_and_bars_give_nothing() -> None:
    session, _, bad = make_session()
    messages = [
        {"T": "s", "S": "AAPL", "sc": "H", "sm": "Trading Halt", "rc": "T12", "rm": "News", "t": T, "z": "C"},
        {"T": "l", "S": "AAPL", "u": 200.1, "d": 180.2, "i": "B", "t": T, "z": "C"},
        {
            "T": "b",
            "S": "AAPL",
            "o": 189.0,
            "h": 190.0,
            "l": 188.5,
            "c": 189.4,
            "v": 12000,
            "t": T,
            "n": 90,
            "vw": 189.3,
        },
        {
            "T": "u",
            "S": "AAPL",
            "o": 189.0,
            "h": 190.0,
            "l": 188.5,
            "c": 189.4,
            "v": 12500,
            "t": T,
            "n": 95,
            "vw": 189.3,
        },
        {
            "T": "d",
            "S": "AAPL",
            "o": 185.0,
            "h": 190.0,
            "l": 184.5,
            "c": 189.4,
            "v": 9e6,
            "t": T,
            "n": 9e4,
            "vw": 188.0,
        },
        {"T": "i", "S": "AAPL", "p": 189.4, "t": T, "z": "C"},
    ]
    assert decode(session, *messages) == []
    assert bad == []


def test_batched_frame_gives_every_update_in_order() -> None:
    session, _, bad = make_session()
    updates = decode(
        session,
        quote_msg("AAPL", 189.4, 100, 189.5, 200, T),
        trade_msg("AAPL", 189.45, 50, T),
        {"T": "b", "S": "AAPL", "o": 1.0, "h": 1.0, "l": 1.0, "c": 1.0, "v": 1, "t": T},
        trade_msg("MSFT", 370.0, 10, "2021-02-22T15:51:45Z"),
        correction_msg("AAPL", original_price=189.45, original_size=50, corrected_price=189.46, corrected_size=50, t=T),
    )
    assert [(u.symbol, u.kind, u.timestamp, u.last_price) for u in updates] == [
        ("AAPL", "Q", T_MS, None),
        ("AAPL", "T", T_MS, 189.45),
        ("MSFT", "T", T_MS - 208 + 1000, 370.0),
        ("AAPL", "C", T_MS, 189.46),
    ]
    assert bad == []


def test_several_frames_in_one_read() -> None:
    session, _, _ = make_session()
    raws = [frame(trade_msg("A", 1.0, 1, T)), frame({"T": "success", "msg": "ok"}), frame(trade_msg("B", 2.0, 2, T))]
    updates = session.process(raws)
    assert [(u.symbol, u.last_price) for u in updates] == [("A", 1.0), ("B", 2.0)]


def test_missing_timestamp_uses_now() -> None:
    session, _, _ = make_session()
    before = time.time_ns() // 1_000_000
    [update] = decode(session, {"T": "t", "S": "AAPL", "p": 1.5, "s": 3})
    assert before <= update.timestamp <= time.time_ns() // 1_000_000


def test_unknown_crypto_pair_is_skipped_silently() -> None:
    session, _, bad = make_session("crypto")
    assert decode(session, trade_msg("FOO/BAR", 1.0, 1.0, T, crypto=True)) == []
    assert bad == []


# =========================================================================== malformed


@pytest.mark.parametrize("raw", MALFORMED_FRAMES + ("", "null", "[1]", '[{"T": 5}]'))
def test_malformed_frames_are_reported_not_raised(raw: str) -> None:
    session, _, bad = make_session()
    assert session.process([raw]) == []
    assert len(bad) == 1 and bad[0].reason


@pytest.mark.parametrize(
    "message, reason",
    [
        ({"T": "t", "S": "AAPL", "s": 1, "t": T}, "trade without p"),
        ({"T": "t", "S": "AAPL", "p": None, "t": T}, "trade without p"),
        ({"T": "q", "S": "AAPL", "bs": 1, "as": 2, "t": T}, "quote without bp or ap"),
        ({"T": "c", "S": "AAPL", "op": 1.0, "t": T}, "correction without cp"),
        ({"T": "x", "S": "AAPL", "a": "C", "t": T}, "cancel without p or i"),
        ({"T": "t", "p": 1.0, "t": T}, "message without S"),
        ({"T": "t", "S": "AAPL", "p": 1.0, "t": "2021-02-22 nope"}, "bad timestamp"),
        ({"T": "t", "S": "AAPL", "p": 1.0, "t": "2021-02-22T15:51:44"}, "bad timestamp"),  # no zone
        ({"T": "t", "S": "not a symbol", "p": 1.0, "t": T}, "invalid symbol"),
        ({"T": "zz", "S": "AAPL"}, "unknown message type"),
    ],
)
def test_bad_message_is_reported_and_the_rest_of_the_frame_kept(message: dict[str, Any], reason: str) -> None:
    session, _, bad = make_session()
    updates = decode(session, trade_msg("A", 1.0, 1, T), message, trade_msg("B", 2.0, 2, T))
    assert [u.symbol for u in updates] == ["A", "B"]
    assert len(bad) == 1 and reason in bad[0].reason


def test_element_of_the_wrong_type_only_loses_itself() -> None:
    session, _, bad = make_session()
    raw = frame(
        trade_msg("A", 1.0, 1, T), {"T": "t", "S": "AAPL", "p": "cheap", "t": T}, quote_msg("B", 1.0, 1, 2.0, 2, T)
    )
    updates = session.process([raw])
    assert [(u.symbol, u.kind) for u in updates] == [("A", "T"), ("B", "Q")]
    assert len(bad) == 1 and '"cheap"' in str(bad[0].frame) and "A" not in str(bad[0].frame).replace("AAPL", "")


# =========================================================================== control messages


@pytest.mark.parametrize(
    "code, msg, error",
    [
        (402, "auth failed", AuthFailed),
        (406, "connection limit exceeded", AuthFailed),  # in a logged-in session: someone else took over
        (408, "v2 not enabled", AuthFailed),
        (409, "insufficient subscription", AuthFailed),
        (410, "invalid subscribe action for this feed", AuthFailed),
        (411, "insufficient scope", AuthFailed),
        (404, "auth timeout", ProviderError),
        (407, "slow client", ProviderError),
        (500, "internal error", ProviderError),
    ],
)
def test_fatal_errors_end_the_session(code: int, msg: str, error: type[ProviderError]) -> None:
    session, _, _ = make_session()
    with pytest.raises(ProviderError) as info:
        decode(session, {"T": "error", "code": code, "msg": msg})
    assert type(info.value) is error
    assert str(info.value) == f"Alpaca error {code}: {msg}"


@pytest.mark.parametrize(
    "code, level",
    [(400, logging.ERROR), (401, logging.WARNING), (403, logging.WARNING), (405, logging.ERROR), (499, logging.ERROR)],
)
def test_other_errors_are_logged_and_the_session_goes_on(
    code: int, level: int, all_logs: pytest.LogCaptureFixture
) -> None:
    session, _, _ = make_session()
    assert decode(session, {"T": "error", "code": code, "msg": "whatever"}, trade_msg("A", 1.0, 1, T)) == [
        Update("A", "T", T_MS, last_price=1.0, last_size=1, trade_id="1")
    ]
    [record] = [r for r in all_logs.records if f"error {code}" in r.getMessage()]
    assert record.levelno == level


def test_error_text_never_carries_the_secret() -> None:
    session, _, _ = make_session()
    with pytest.raises(AuthFailed) as info:
        decode(session, {"T": "error", "code": 402, "msg": f"auth failed for {KEY_ID}/{SECRET}"})
    assert KEY_ID not in str(info.value) and SECRET not in str(info.value)
    assert str(info.value) == "Alpaca error 402: auth failed for ***/***"


def test_success_and_subscription_messages_give_nothing() -> None:
    session, _, bad = make_session()
    assert decode(session, {"T": "success", "msg": "authenticated"}) == []
    assert decode(session, {"T": "subscription", "trades": ["AAPL"], "quotes": ["AAPL"], "bars": []}) == []
    assert bad == []


# =========================================================================== subscriptions


async def test_subscribe_and_unsubscribe_messages() -> None:
    session, ws, _ = make_session()
    await session.subscribe(["AAPL", "MSFT"])
    await session.unsubscribe(["AAPL"])
    assert ws.sent == [
        {"action": "subscribe", "trades": ["AAPL", "MSFT"], "quotes": ["AAPL", "MSFT"]},
        {"action": "unsubscribe", "trades": ["AAPL"], "quotes": ["AAPL"]},
    ]
    assert session.wanted == {"MSFT"}


async def test_large_subscriptions_are_chunked() -> None:
    session, ws, _ = make_session()
    symbols = [f"S{i:03d}" for i in range(450)]
    await session.subscribe(symbols)
    assert [len(m["trades"]) for m in ws.sent] == [200, 200, 50]
    assert [s for m in ws.sent for s in m["quotes"]] == symbols


async def test_crypto_feed_maps_pairs_and_refuses_stocks_once(all_logs: pytest.LogCaptureFixture) -> None:
    provider = AlpacaProvider(
        AlpacaConfig(key_id=KEY_ID, secret_key=SECRET, feed="crypto", symbols={"DOGEUSDT": "DOGE/USDT"})
    )
    session, ws, _ = make_session(provider=provider)
    await session.subscribe(["BTCUSD", "ETHBTC", "DOGEUSDT", "AAPL"])
    again, ws2, _ = make_session(provider=provider)  # a later session of the same provider
    await again.subscribe(["AAPL"])
    assert ws.sent == [
        {
            "action": "subscribe",
            "trades": ["BTC/USD", "ETH/BTC", "DOGE/USDT"],
            "quotes": ["BTC/USD", "ETH/BTC", "DOGE/USDT"],
        }
    ]
    assert ws2.sent == []
    warnings = [r.getMessage() for r in all_logs.records if r.levelno == logging.WARNING]
    assert warnings == ["[SUBSCRIBE] alpaca has no symbol for AAPL; add it to [alpaca.symbols]"]
    assert decode(session, trade_msg("DOGE/USDT", 0.08, 1000.0, T, crypto=True)) == [
        Update("DOGEUSDT", "T", T_MS, last_price=0.08, last_size=1000.0, trade_id="1")
    ]
    await session.unsubscribe(["ETHBTC", "AAPL"])
    assert ws.sent[-1] == {"action": "unsubscribe", "trades": ["ETH/BTC"], "quotes": ["ETH/BTC"]}


async def test_stock_feed_refuses_crypto_pairs(all_logs: pytest.LogCaptureFixture) -> None:
    session, ws, _ = make_session("sip")
    await session.subscribe(["BTCUSD", "AAPL"])
    assert ws.sent == [{"action": "subscribe", "trades": ["AAPL"], "quotes": ["AAPL"]}]
    assert "[SUBSCRIBE] alpaca has no symbol for BTCUSD; add it to [alpaca.symbols]" in all_logs.text


async def test_symbol_limit_keeps_the_session_and_forgets_that_request(all_logs: pytest.LogCaptureFixture) -> None:
    session, ws, _ = make_session()
    await session.subscribe(["AAPL", "MSFT"])
    await session.subscribe(["TSLA", "NVDA"])
    decode(session, {"T": "subscription", "trades": ["AAPL", "MSFT"], "quotes": ["AAPL", "MSFT"]})
    assert decode(session, {"T": "error", "code": 405, "msg": "symbol limit exceeded"}) == []
    assert session.wanted == {"AAPL", "MSFT"}
    [record] = [r for r in all_logs.records if r.levelno == logging.ERROR]
    assert (
        record.getMessage()
        == "[SUBSCRIBE] Alpaca error 405 (symbol limit exceeded): not subscribed upstream: TSLA,NVDA"
    )
    # Never subscribed upstream, so nothing to unsubscribe.
    await session.unsubscribe(["TSLA"])
    assert len(ws.sent) == 2


async def test_symbols_missing_from_the_reply_are_warned_about(all_logs: pytest.LogCaptureFixture) -> None:
    session, _, _ = make_session()
    await session.subscribe(["AAPL", "ZZZZ"])
    decode(session, {"T": "subscription", "trades": ["AAPL"], "quotes": ["AAPL"], "corrections": ["AAPL"]})
    warnings = [r.getMessage() for r in all_logs.records if r.levelno == logging.WARNING]
    assert warnings == ["[SUBSCRIBE] Alpaca did not subscribe 1 symbol(s) we asked for: ZZZZ"]


def test_describe_names_the_feed_never_the_key() -> None:
    stocks = AlpacaProvider(AlpacaConfig(key_id=KEY_ID, secret_key=SECRET, feed="sip"))
    crypto = AlpacaProvider(AlpacaConfig(key_id=KEY_ID, secret_key=SECRET, feed="crypto", crypto_location="us-1"))
    assert stocks.describe() == "Alpaca sip at wss://stream.data.alpaca.markets/v2/sip"
    assert crypto.describe() == "Alpaca crypto/us-1 at wss://stream.data.alpaca.markets/v1beta3/crypto/us-1"
    assert stocks.detects_stale is False and stocks.name == "alpaca"
    for text in (stocks.describe(), repr(stocks.config)):
        assert KEY_ID not in text and SECRET not in text


# =========================================================================== the relay, end to end


async def test_login_and_subscriptions_follow_demand(start_relay, fake_alpaca, ws_connect):
    relay = await start_relay(**alpaca_sections(fake_alpaca))
    a = await ws_connect(relay)
    b = await ws_connect(relay)
    with trio.fail_after(10):
        await a.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
        await fake_alpaca.wait_until(lambda: fake_alpaca.subscriptions == {"AAPL", "MSFT"})
        await b.request({"action": "subscribe", "symbols": ["MSFT", "TSLA"]}, "subscribed")
        await fake_alpaca.wait_until(lambda: fake_alpaca.subscriptions == {"AAPL", "MSFT", "TSLA"})
        await a.request({"action": "unsubscribe", "symbols": ["AAPL", "MSFT"]}, "unsubscribed")
        await fake_alpaca.wait_until(lambda: fake_alpaca.subscriptions == {"MSFT", "TSLA"})
        await b.ws.aclose()
        await fake_alpaca.wait_until(lambda: fake_alpaca.subscriptions == set())
    assert fake_alpaca.quote_subscriptions == set()
    assert fake_alpaca.history == [
        ("subscribe", ("AAPL", "MSFT"), ("AAPL", "MSFT")),
        ("subscribe", ("TSLA",), ("TSLA",)),
        ("unsubscribe", ("AAPL",), ("AAPL",)),
        ("unsubscribe", ("MSFT", "TSLA"), ("MSFT", "TSLA")),
    ]
    assert fake_alpaca.received_credentials == [(KEY_ID, SECRET)] and fake_alpaca.logins == 1


async def test_trades_quotes_and_corrections_reach_clients_normalised(start_relay, fake_alpaca, ws_connect):
    relay = await start_relay(**alpaca_sections(fake_alpaca))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await fake_alpaca.wait_until(lambda: "AAPL" in fake_alpaca.subscriptions)
        fake_alpaca.stall()  # only the frames below from now on
        await fake_alpaca.inject(frame(trade_msg("AAPL", 1189.45, 137, T, trade_id=41)))
        trade, _ = await client.recv_until(lambda m: m.get("last_price") == 1189.45)
        await fake_alpaca.inject(frame(quote_msg("AAPL", 1189.4, 300, 1189.5, 1200, "2021-02-22T15:51:45.5Z")))
        quote, _ = await client.recv_until(lambda m: m.get("bid_price") == 1189.4)
        await fake_alpaca.send_correction(
            "AAPL", original_price=1189.45, original_size=137, corrected_price=1189.47, corrected_size=130,
            t="2021-02-22T15:51:46.000000001Z", original_id=41, corrected_id=42,
        )  # fmt: skip
        correction, _ = await client.recv_until(lambda m: m.get("data_type") == "C")
    assert (trade["symbol"], trade["data_type"], trade["timestamp"], trade["last_size"]) == ("AAPL", "T", T_MS, 137)
    assert "amends" not in trade and "amends" not in quote  # only amendments carry it
    assert (quote["data_type"], quote["timestamp"]) == ("Q", T_MS - 208 + 1500)
    assert (quote["bid_price"], quote["bid_size"], quote["ask_price"], quote["ask_size"]) == (1189.4, 300, 1189.5, 1200)
    assert quote["last_price"] == 1189.45  # the cached state keeps the last trade
    # A correction names the trade it amends and what it becomes; that trade was the last one,
    # so the state (and the cache) now hold the corrected values.
    assert correction["amends"] == {
        "action": "correction", "trade_id": "41", "price": 1189.45, "size": 137, "corrected_id": "42",
        "corrected_price": 1189.47, "corrected_size": 130, "matched": "last",
    }  # fmt: skip
    assert (correction["timestamp"], correction["last_price"], correction["last_size"]) == (
        T_MS - 208 + 2000,
        1189.47,
        130,
    )
    assert correction["bid_price"] == 1189.4 and correction["seq"] == quote["seq"] + 1
    snapshot = relay.hub.snapshot("AAPL")
    assert snapshot is not None and (snapshot.last_price, snapshot.last_size) == (1189.47, 130)


async def test_a_cancelled_last_trade_gives_way_to_the_previous_valid_one(start_relay, fake_alpaca, ws_connect):
    """Cancel the last trade: the state goes back to the one before; cancel an older one: no change."""
    relay = await start_relay(**alpaca_sections(fake_alpaca))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await fake_alpaca.wait_until(lambda: "AAPL" in fake_alpaca.subscriptions)
        fake_alpaca.stall()
        await fake_alpaca.inject(
            frame(
                trade_msg("AAPL", 2001.0, 10, T, trade_id=901),
                trade_msg("AAPL", 2002.0, 20, T, trade_id=902),
                trade_msg("AAPL", 2003.0, 30, T, trade_id=903),
            )
        )
        await client.recv_until(lambda m: m.get("last_price") == 2003.0)
        await fake_alpaca.send_cancel("AAPL", trade_id=903, price=2003.0, size=30, t=T)
        last, _ = await client.recv_until(lambda m: m.get("data_type") == "X")
        await fake_alpaca.send_cancel("AAPL", trade_id=901, price=2001.0, size=10, t=T, action="E")
        earlier, _ = await client.recv_until(lambda m: m.get("data_type") == "X")
        await fake_alpaca.send_cancel("AAPL", trade_id=5, price=1.0, size=1, t=T)
        unknown, _ = await client.recv_until(lambda m: m.get("data_type") == "X")
    assert last["amends"]["matched"] == "last" and last["amends"]["trade_id"] == "903"
    assert (last["last_price"], last["last_size"]) == (2002.0, 20)  # the previous valid trade
    assert earlier["amends"]["matched"] == "earlier" and earlier["last_price"] == 2002.0
    assert unknown["amends"]["matched"] == "unknown" and unknown["last_price"] == 2002.0
    snapshot = relay.hub.snapshot("AAPL")
    assert snapshot is not None and (snapshot.last_price, snapshot.last_size, snapshot.data_type) == (2002.0, 20, "X")


async def test_batched_frames_deliver_every_message(start_relay, fake_alpaca, ws_connect):
    relay = await start_relay(**alpaca_sections(fake_alpaca))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT", "TSLA"]}, "subscribed")
        # The fake's own stream: several messages per array.
        await fake_alpaca.wait_until(lambda: fake_alpaca.messages_sent >= 2 * fake_alpaca.frames_sent > 0)
        fake_alpaca.stall()
        await fake_alpaca.inject(
            frame(trade_msg("AAPL", 1001.0, 1, T), trade_msg("MSFT", 1002.0, 2, T), trade_msg("TSLA", 1003.0, 3, T))
        )
        seen: dict[str, Any] = {}
        while len(seen) < 3:
            msg = await client.recv()
            if (msg.get("last_price") or 0) > 1000:
                seen[msg["symbol"]] = (msg["last_price"], msg["last_size"])
    assert seen == {"AAPL": (1001.0, 1), "MSFT": (1002.0, 2), "TSLA": (1003.0, 3)}


async def test_crypto_symbols_mapped_both_ways(start_relay, fake_crypto, ws_connect, all_logs):
    relay = await start_relay(**alpaca_sections(fake_crypto, feed="crypto"))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["BTCUSD", "AAPL"]}, "subscribed")
        await fake_crypto.wait_until(lambda: fake_crypto.subscriptions == {"BTC/USD"})
        streamed, _ = await client.recv_until(lambda m: m.get("symbol") == "BTCUSD")
        fake_crypto.stall()
        await fake_crypto.inject(frame(trade_msg("BTC/USD", 43000.5, 0.0125, T, crypto=True)))
        msg, _ = await client.recv_until(lambda m: m.get("last_price") == 43000.5)
    assert (msg["symbol"], msg["last_size"], msg["timestamp"]) == ("BTCUSD", 0.0125, T_MS)
    assert fake_crypto.history == [("subscribe", ("BTC/USD",), ("BTC/USD",))]  # AAPL never went upstream
    assert all_logs.text.count("alpaca has no symbol for AAPL") == 1


async def test_wrong_key_reports_auth_failed_and_never_logs_the_secret(start_relay, fake_alpaca, http, all_logs):
    sections = alpaca_sections(fake_alpaca)
    sections["alpaca"]["secret_key"] = "sk-wrong-0f1e2d3c4b5a69788796"
    relay = await start_relay(**sections)
    with trio.fail_after(10):
        await wait_state(relay, "auth_failed")
        health = await http.get(api(relay, "/health"))
        status = await http.get(api(relay, "/status"))
    assert health.status_code == 503 and health.json()["state"] == "auth_failed"
    assert relay.upstream.last_error == "Alpaca error 402: auth failed"
    assert fake_alpaca.failed_logins == 1 and fake_alpaca.errors_sent == [402]
    # The relay did send the credentials upstream...
    assert fake_alpaca.received_credentials == [(KEY_ID, "sk-wrong-0f1e2d3c4b5a69788796")]
    # ...and they appear nowhere else.
    for text in [health.text, status.text, all_logs.text, *[r.getMessage() for r in all_logs.records]]:
        assert "sk-wrong-0f1e2d3c4b5a69788796" not in text and KEY_ID not in text
    assert any("[AUTH]" in r.getMessage() and r.levelno == logging.ERROR for r in all_logs.records)


@pytest.mark.parametrize(
    "code, msg, state",
    [
        (406, "connection limit exceeded", "auth_failed"),  # after limit_retries quick retries
        (408, "v2 not enabled", "auth_failed"),
        (409, "insufficient subscription", "auth_failed"),
        (410, "invalid subscribe action for this feed", "auth_failed"),
        (411, "insufficient scope", "auth_failed"),
        (404, "auth timeout", "backoff"),
        (407, "slow client", "backoff"),
        (500, "internal error", "backoff"),
    ],
)
async def test_documented_errors_at_login_map_to_relay_states(start_relay, code, msg, state):
    async with FakeAlpacaServer.open(credentials={KEY_ID: SECRET}, auth_error=(code, msg)) as fake:
        # A long backoff keeps the relay in "backoff" once it gets there.
        relay = await start_relay(
            **alpaca_sections(fake, backoff_initial=60.0, backoff_max=60.0, limit_retries=2, limit_retry_delay=0.01)
        )
        with trio.fail_after(10):
            await wait_state(relay, state)
        assert relay.upstream.last_error == f"Alpaca error {code}: {msg}"
        assert fake.errors_sent == [code] * (3 if code == 406 else 1)


async def test_kicked_mid_session_by_connection_limit(start_relay, fake_alpaca, ws_connect):
    relay = await start_relay(**alpaca_sections(fake_alpaca))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await client.recv_until(lambda m: m.get("symbol") == "AAPL")
        await fake_alpaca.send_error(406, "connection limit exceeded")
        await wait_state(relay, "auth_failed")
    assert relay.upstream.last_error == "Alpaca error 406: connection limit exceeded"


async def test_symbol_limit_keeps_the_connection(start_relay, ws_connect, all_logs):
    async with FakeAlpacaServer.open(credentials={KEY_ID: SECRET}, rate=50.0, symbol_limit=2) as fake:
        relay = await start_relay(**alpaca_sections(fake))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
            await fake.wait_until(lambda: fake.subscriptions == {"AAPL", "MSFT"})
            await client.request({"action": "subscribe", "symbols": ["TSLA"]}, "subscribed")
            await fake.wait_until(lambda: 405 in fake.errors_sent)
            first, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
            later, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > first["seq"])
        assert fake.subscriptions == {"AAPL", "MSFT"} and fake.connections_total == 1
        assert relay.upstream.state == "connected" and relay.upstream.reconnects == 0
        assert "[SUBSCRIBE] Alpaca error 405 (symbol limit exceeded): not subscribed upstream: TSLA" in all_logs.text


async def test_drop_reconnects_and_resubscribes(start_relay, fake_alpaca, ws_connect, http):
    relay = await start_relay(**alpaca_sections(fake_alpaca, backoff_initial=0.05, backoff_max=0.2, pinned=["IBM"]))
    client = await ws_connect(relay)
    with trio.fail_after(15):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        before, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
        await fake_alpaca.wait_until(lambda: fake_alpaca.subscriptions == {"AAPL", "IBM"})
        assert await fake_alpaca.drop_all() == 1
        await fake_alpaca.wait_until(lambda: fake_alpaca.logins == 2 and fake_alpaca.subscriptions == {"AAPL", "IBM"})
        after, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > before["seq"] + 5)
        status = (await http.get(api(relay, "/status"))).json()
    assert status["upstream"]["reconnects"] == 1 and status["upstream"]["state"] == "connected"
    assert fake_alpaca.connections_total == 2 and 406 not in fake_alpaca.errors_sent
    assert fake_alpaca.quote_subscriptions == {"AAPL", "IBM"}


async def test_malformed_frames_are_counted_not_fatal(start_relay, fake_alpaca, ws_connect, http):
    relay = await start_relay(**alpaca_sections(fake_alpaca))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        first, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
        for raw in MALFORMED_FRAMES:
            await fake_alpaca.inject(raw)
        while relay.hub.stats.malformed < len(MALFORMED_FRAMES):
            await client.recv()
        await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > first["seq"] + 3)
        status = (await http.get(api(relay, "/status"))).json()
    assert status["messages"]["malformed"] == len(MALFORMED_FRAMES) == 6
    assert status["upstream"]["reconnects"] == 0 and fake_alpaca.connections_total == 1


# =========================================================================== login timing (virtual time)


def _provider(fake: FakeAlpacaServer, **config: Any) -> AlpacaProvider:
    return AlpacaProvider(AlpacaConfig(key_id=KEY_ID, secret_key=SECRET, url=fake.url, **config))


async def test_server_auth_timeout_is_a_provider_error(autojump_clock):
    async with FakeAlpacaServer.open(credentials={KEY_ID: SECRET}, auth_deadline=5.0, ignore_auth=True) as fake:
        start = trio.current_time()
        with pytest.raises(ProviderError) as info:
            async with _provider(fake, auth_timeout=10.0).session():
                pass
        assert trio.current_time() - start == pytest.approx(5.0, abs=1e-6)
    assert type(info.value) is ProviderError and str(info.value) == "Alpaca error 404: auth timeout"


async def test_no_auth_reply_times_out_at_auth_timeout(autojump_clock):
    async with FakeAlpacaServer.open(credentials={KEY_ID: SECRET}, auth_deadline=60.0, ignore_auth=True) as fake:
        start = trio.current_time()
        with pytest.raises(ProviderError) as info:
            async with _provider(fake, auth_timeout=10.0).session():
                pass
        assert trio.current_time() - start == pytest.approx(10.0, abs=1e-6)
    assert str(info.value) == "no auth reply within 10s (no authenticated)"
    assert fake.received_credentials == [(KEY_ID, SECRET)]


async def test_fake_closes_a_silent_client_at_its_auth_deadline(autojump_clock):
    async with FakeAlpacaServer.open(auth_deadline=7.0) as fake:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.connect_websocket_url(nursery, fake.url)
            start = trio.current_time()
            assert json.loads(await ws.get_message()) == [{"T": "success", "msg": "connected"}]
            assert json.loads(await ws.get_message()) == [{"T": "error", "code": 404, "msg": "auth timeout"}]
            assert trio.current_time() - start == pytest.approx(7.0, abs=1e-6)
            with pytest.raises(trio_websocket.ConnectionClosed):
                await ws.get_message()


async def test_second_session_hits_the_connection_limit(autojump_clock):
    async with FakeAlpacaServer.open(credentials={KEY_ID: SECRET}) as fake:
        provider = _provider(fake)
        async with provider.session() as session:
            await session.subscribe(["AAPL"])
            with pytest.raises(ConnectionLimit) as info:  # at login: maybe our own lingering connection
                async with provider.session():
                    pass
            assert str(info.value) == "Alpaca error 406: connection limit exceeded"
            await fake.wait_until(lambda: fake.subscriptions == {"AAPL"})
        await fake.wait_until(lambda: not fake.connections)
        async with provider.session():  # the first one is gone: room again
            assert fake.logins == 2


async def test_a_refused_symbol_is_told_kept_out_of_reconnects_and_shown(start_relay, ws_connect, http):
    """The issue's bad day: a 405 on one symbol must not take the others down at the next reconnect."""
    async with FakeAlpacaServer.open(credentials={KEY_ID: SECRET}, rate=50.0, symbol_limit=2) as fake:
        relay = await start_relay(**alpaca_sections(fake, backoff_initial=0.05, backoff_max=0.2))
        client = await ws_connect(relay)
        later_client = await ws_connect(relay)
        with trio.fail_after(15):
            await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
            await fake.wait_until(lambda: fake.subscriptions == {"AAPL", "MSFT"})
            await client.request({"action": "subscribe", "symbols": ["TSLA"]}, "subscribed")
            refused, _ = await client.recv_until(lambda m: m.get("type") == "status" and m.get("state") == "refused")
            health = await http.get(api(relay, "/health"))
            status = (await http.get(api(relay, "/status"))).json()
            # A reconnect asks for what is wanted minus what was refused: AAPL and MSFT stay served.
            assert await fake.drop_all() == 1
            await fake.wait_until(lambda: fake.logins == 2 and fake.subscriptions == {"AAPL", "MSFT"})
            first, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
            await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > first["seq"])
            # A newcomer asking for it hears at once why it gets nothing.
            await later_client.request({"action": "subscribe", "symbols": ["TSLA"]}, "subscribed")
            told, _ = await later_client.recv_until(lambda m: m.get("type") == "status")
            # Nobody wants it any more: forgotten, and asked for again when wanted again.
            await client.request({"action": "unsubscribe", "symbols": ["TSLA"]}, "unsubscribed")
            await later_client.request({"action": "unsubscribe", "symbols": ["TSLA"]}, "unsubscribed")
            await relay.upstream.wait_for(lambda: not relay.upstream.refused)
    reason = "Alpaca error 405: symbol limit exceeded"
    assert refused == {
        "type": "status", "scope": "symbols", "state": "refused", "provider": "alpaca", "reason": reason,
        "symbols": ["TSLA"],
    }  # fmt: skip
    assert told == refused
    assert health.status_code == 200 and health.json()["refused"] == ["TSLA"]
    assert status["upstream"]["refused"] == {"TSLA": reason}
    assert status["upstream"]["subscribed"] == ["AAPL", "MSFT"]
    subscribes = [trades for action, trades, _ in fake.history if action == "subscribe"]
    assert subscribes == [("AAPL", "MSFT"), ("TSLA",), ("AAPL", "MSFT")]  # TSLA never asked for again
    assert relay.hub.refused == {}


async def test_symbols_left_out_of_the_reply_and_unmapped_ones_are_refused() -> None:
    provider = AlpacaProvider(AlpacaConfig(key_id=KEY_ID, secret_key=SECRET, feed="crypto"))
    refusals: list[tuple[list[str], str]] = []
    session, _, _ = make_session(
        provider=provider, on_refused=lambda symbols, reason: refusals.append((list(symbols), reason))
    )
    await session.subscribe(["BTCUSD", "ETHUSD", "AAPL"])
    decode(session, {"T": "subscription", "trades": ["BTC/USD"], "quotes": ["BTC/USD"]})
    assert refusals == [
        (["AAPL"], "alpaca has no symbol for it on this feed"),
        (["ETHUSD"], "left out of Alpaca's subscription reply (unknown symbol or not in the plan)"),
    ]
    assert session.wanted == {"BTC/USD"}
