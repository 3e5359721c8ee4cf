"""The Polygon/Massive provider: frame decoding field by field, symbols, and the relay against the
fake Polygon server over real loopback sockets (login, demand, markets, faults, secrets)."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from conftest import api, wait_state

from trio_relay.config import Config, load_config
from trio_relay.hub import Demand, Stats
from trio_relay.model import Update
from trio_relay.providers.base import AuthFailed, ConnectionLimit, ErrorClass, MalformedFrame, ProviderError
from trio_relay.providers.polygon import (
    MAX_SUBSCRIBE_BYTES,
    STATUSES,
    FrameDecoder,
    PolygonEvent,
    PolygonProvider,
    polygon_symbols,
)
from trio_relay.testing.fake_polygon import MAX_CONNECTIONS_MESSAGE, FakePolygonServer
from trio_relay.upstream import Upstream, UpstreamState

KEY = "poly-test-key-9b2e41c7d03f"  # long and unique, so a leak would be found by grep
BAD_KEY = "poly-wrong-key-61fa0e2d94c8"
NOW_MS = 1_700_000_000_000
T_MS = 1_699_564_800_123  # 2023-11-09T21:20:00.123Z


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def decoder(market: str = "stocks", extra: dict[str, str] | None = None) -> FrameDecoder:
    return FrameDecoder(polygon_symbols(market, extra))


def decode(
    frame: Any, market: str = "stocks", now_ms: int = NOW_MS
) -> tuple[list[Update], list[PolygonEvent], list[MalformedFrame]]:
    raw = frame if isinstance(frame, (str, bytes)) else json.dumps(frame)
    out: list[Update] = []
    bad: list[MalformedFrame] = []
    statuses = decoder(market).decode(raw, now_ms, out, bad.append)
    return out, list(statuses), bad


def polygon_config(url: str = "ws://127.0.0.1:1/stocks", **polygon: Any) -> Config:
    return load_config(
        environ={},
        overrides={"upstream": {"provider": "polygon"}, "polygon": {"api_key": KEY, "url": url, **polygon}},
        dotenv=None,
    )


@asynccontextmanager
async def fake_polygon(**kwargs: Any) -> AsyncIterator[FakePolygonServer]:
    kwargs.setdefault("api_keys", [KEY])
    async with FakePolygonServer.open(**kwargs) as fake:
        yield fake


def sections(fake: FakePolygonServer, api_key: str = KEY, symbols: dict[str, str] | None = None, **upstream: Any):
    return {
        "upstream": {"provider": "polygon", "unsubscribe_linger": 0.0, **upstream},
        "polygon": {"api_key": api_key, "url": fake.url, "market": fake.market, "auth_timeout": 2.0,
                    "symbols": symbols or {}},
    }  # fmt: skip


# =========================================================================== decoding


def test_stock_trade_every_field() -> None:
    event = {"ev": "T", "sym": "AAPL", "x": 4, "i": "52983525029461", "z": 3, "p": 189.45, "s": 100,
             "c": [12, 37], "t": T_MS, "q": 1063, "trfi": 202, "trft": T_MS - 5}  # fmt: skip
    updates, statuses, bad = decode([event])
    assert updates == [Update("AAPL", "T", T_MS, last_price=189.45, last_size=100, trade_id="4:52983525029461")]
    assert statuses == [] and bad == []


def test_stock_quote_sizes_are_round_lots_turned_into_shares() -> None:
    event = {"ev": "Q", "sym": "MSFT", "bx": 11, "bp": 370.2, "bs": 3, "ax": 12, "ap": 370.25, "as": 7,
             "c": 1, "i": [604], "t": T_MS, "q": 50385480, "z": 3}  # fmt: skip
    updates, _, bad = decode([event])
    assert updates == [Update("MSFT", "Q", T_MS, ask_price=370.25, ask_size=700, bid_price=370.2, bid_size=300)]
    assert bad == []
    assert updates[0].last_price is None and updates[0].last_size is None


def test_stock_quote_one_side_only() -> None:
    updates, _, _ = decode([{"ev": "Q", "sym": "IBM", "bp": 150.5, "bs": 1, "t": T_MS}])
    assert updates == [Update("IBM", "Q", T_MS, bid_price=150.5, bid_size=100)]


def test_crypto_trade_and_quote_sizes_are_taken_as_given() -> None:
    frame = [
        {
            "ev": "XT",
            "pair": "BTC-USD",
            "p": 43250.5,
            "t": T_MS,
            "s": 0.0125,
            "c": [2],
            "i": "987",
            "x": 1,
            "r": T_MS + 4,
        },
        {"ev": "XQ", "pair": "ETH-USD", "bp": 2250.1, "bs": 0.5, "ap": 2250.3, "as": 12.25, "t": T_MS + 1, "x": 1},
    ]
    updates, _, bad = decode(frame, market="crypto")
    assert updates == [
        Update("BTCUSD", "T", T_MS, last_price=43250.5, last_size=0.0125, trade_id="1:987"),
        Update("ETHUSD", "Q", T_MS + 1, ask_price=2250.3, ask_size=12.25, bid_price=2250.1, bid_size=0.5),
    ]
    assert bad == []


def test_forex_quote_has_the_pair_in_p_and_no_sizes() -> None:
    updates, _, bad = decode(
        [{"ev": "C", "p": "EUR/USD", "x": 48, "a": 1.0857, "b": 1.0856, "t": T_MS}], market="forex"
    )
    assert updates == [Update("EURUSD", "Q", T_MS, ask_price=1.0857, bid_price=1.0856)]
    assert updates[0].ask_size is None and updates[0].bid_size is None and bad == []


@pytest.mark.parametrize(
    "t, expected",
    [(T_MS, T_MS), (T_MS // 1000, T_MS // 1000 * 1000), (T_MS * 1_000_000, T_MS), (None, NOW_MS), (0, NOW_MS)],
    ids=["ms", "s (the overview page's claim)", "ns", "missing", "zero"],
)
def test_timestamp_unit(t: int | None, expected: int) -> None:
    event: dict[str, Any] = {"ev": "T", "sym": "AAPL", "p": 1.5, "s": 1}
    if t is not None:
        event["t"] = t
    updates, _, _ = decode([event])
    assert updates[0].timestamp == expected and type(updates[0].timestamp) is int


def test_batched_frame_mixing_channels_statuses_and_aggregates() -> None:
    frame = [
        {"ev": "status", "status": "success", "message": "subscribed to: T.AAPL"},
        {"ev": "T", "sym": "AAPL", "p": 190.0, "s": 5, "t": T_MS},
        {"ev": "A", "sym": "AAPL", "v": 100, "av": 5000, "op": 189.0, "vw": 189.9, "o": 189.5, "c": 190.0,
         "h": 190.1, "l": 189.4, "a": 189.7, "z": 50, "s": T_MS - 1000, "e": T_MS},
        {"ev": "Q", "sym": "MSFT", "bp": 370.0, "bs": 2, "ap": 370.1, "as": 1, "t": T_MS + 1},
        {"ev": "AM", "sym": "MSFT", "v": 1, "s": T_MS, "e": T_MS + 60_000, "otc": True},
        {"ev": "LULD", "T": "AAPL", "h": 200.0, "l": 180.0, "i": [1], "z": 3, "t": T_MS},
        {"ev": "T", "sym": "MSFT", "p": 370.05, "s": 10, "t": T_MS + 2},
        {"ev": "status", "status": "success", "message": "subscribed to: Q.MSFT"},
    ]  # fmt: skip
    updates, statuses, bad = decode(frame)
    assert updates == [
        Update("AAPL", "T", T_MS, last_price=190.0, last_size=5),
        Update("MSFT", "Q", T_MS + 1, ask_price=370.1, ask_size=100, bid_price=370.0, bid_size=200),
        Update("MSFT", "T", T_MS + 2, last_price=370.05, last_size=10),
    ]
    assert [(s.status, s.message) for s in statuses] == [
        ("success", "subscribed to: T.AAPL"),
        ("success", "subscribed to: Q.MSFT"),
    ]
    assert bad == []


def test_aggregates_only_frame_gives_nothing() -> None:
    frame = [{"ev": "AM", "sym": "AAPL", "v": 1, "o": 1.0, "c": 1.0, "h": 1.0, "l": 1.0, "s": T_MS, "e": T_MS}]
    assert decode(frame) == ([], [], [])


def test_event_for_a_symbol_that_is_not_ours_is_skipped_silently() -> None:
    # DOGE-XYZ is in no table and XYZ is no quote currency: not malformed, just nothing for our clients.
    frame = [{"ev": "XT", "pair": "DOGE-XYZ", "p": 0.08, "s": 10, "t": T_MS},
             {"ev": "XT", "pair": "BTC-USD", "p": 43000.0, "s": 1, "t": T_MS}]  # fmt: skip
    updates, _, bad = decode(frame, market="crypto")
    assert updates == [Update("BTCUSD", "T", T_MS, last_price=43000.0, last_size=1)] and bad == []


def test_extra_symbols_table_maps_both_ways() -> None:
    symbols = polygon_symbols("crypto", {"BTCEUR": "BTC-EUR"})
    assert symbols.to_native("BTCEUR") == "BTC-EUR" and symbols.to_client("BTC-EUR") == "BTCEUR"
    out: list[Update] = []
    FrameDecoder(symbols).decode('[{"ev":"XT","pair":"BTC-EUR","p":40000,"s":2,"t":%d}]' % T_MS, NOW_MS, out)
    assert out == [Update("BTCEUR", "T", T_MS, last_price=40000, last_size=2)]


@pytest.mark.parametrize(
    "market, client, native",
    [
        ("stocks", "AAPL", "AAPL"),
        ("stocks", "BRK.B", "BRK.B"),
        ("stocks", "BTCUSD", None),  # a pair on the stocks cluster
        ("stocks", "EURUSD", None),
        ("crypto", "BTCUSD", "BTC-USD"),
        ("crypto", "ETHBTC", "ETH-BTC"),
        ("crypto", "AAPL", None),  # a stock on the crypto cluster
        ("crypto", "EURUSD", None),
        ("forex", "EURUSD", "EUR/USD"),
        ("forex", "USDJPY", "USD/JPY"),
        ("forex", "AAPL", None),
        ("forex", "BTCUSD", None),
    ],
)
def test_symbol_map_per_market(market: str, client: str, native: str | None) -> None:
    symbols = polygon_symbols(market)
    assert symbols.to_native(client) == native
    if native is not None:
        assert symbols.to_client(native) == client


@pytest.mark.parametrize(
    "frame, reason",
    [
        ("this is not json", "not JSON"),
        ('[{"ev":"T","sym":"AAPL"', "not JSON"),  # truncated
        ('{"ev":"T","sym":"AAPL","p":1.0}', "not a JSON array"),  # an object, not an array
        ('"text"', "not a JSON array"),
        ("[1]", "unexpected field type"),
        ("[null]", "unexpected field type"),
        ('[{"ev":"T","sym":"AAPL","p":true}]', "unexpected field type"),  # a bool is not a price
        ('[{"ev":"T","sym":42,"p":1.0}]', "unexpected field type"),
        ('[{"ev":"Q","sym":"AAPL","bp":[1.0],"ap":2.0}]', "unexpected field type"),
        ('[{"ev":"T","sym":"AAPL","p":1.0,"t":"yesterday"}]', "unexpected field type"),
        ('[{"ev":"T","sym":"AAPL","s":100}]', "T event without a numeric p"),
        ('[{"ev":"T","sym":"AAPL","p":"cheap"}]', "T event without a numeric p"),
        ('[{"ev":"T","p":1.0}]', "event without a symbol"),
        ('[{"ev":"T","sym":"","p":1.0}]', "event without a symbol"),
        ('[{"ev":"T","sym":"not a symbol","p":1.0}]', "invalid symbol"),
        ('[{"ev":"Q","sym":"AAPL","bs":1,"as":2}]', "Q event without bp or ap"),
        ('[{"sym":"AAPL","p":1.0}]', "event without ev"),
    ],
)
def test_malformed_frames_are_reported_with_a_reason(frame: str, reason: str) -> None:
    updates, statuses, bad = decode(frame)
    assert updates == [] and statuses == []
    assert len(bad) == 1 and bad[0].reason.startswith(reason)


@pytest.mark.parametrize(
    "frame, reason",
    [
        ('[{"ev":"XT","p":1.0,"s":1}]', "event without a symbol"),
        ('[{"ev":"XQ","pair":"BTC-USD","bs":1}]', "XQ event without bp or ap"),
    ],
)
def test_malformed_crypto_events(frame: str, reason: str) -> None:
    _, _, bad = decode(frame, market="crypto")
    assert [b.reason for b in bad] == [reason]


@pytest.mark.parametrize(
    "frame, reason",
    [
        ('[{"ev":"C","p":1.08,"a":1.1,"b":1.0}]', "C event whose p is not a pair"),
        ('[{"ev":"C","p":"EUR/USD","x":48}]', "C event without a or b"),
        ('[{"ev":"C","a":1.1,"b":1.0}]', "event without a symbol"),
    ],
)
def test_malformed_forex_events(frame: str, reason: str) -> None:
    _, _, bad = decode(frame, market="forex")
    assert [b.reason for b in bad] == [reason]


def test_a_bad_event_does_not_lose_the_good_ones_of_its_frame() -> None:
    frame = (
        '[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":%d},'
        '{"ev":"Q","sym":"AAPL","bp":"cheap"},'  # wrong type: the whole-frame decode fails
        "7,"
        '{"ev":"T","sym":"MSFT","s":1},'  # no price
        '{"ev":"status","status":"success","message":"subscribed to: T.MSFT"},'
        '{"ev":"Q","sym":"MSFT","bp":2.0,"bs":4,"t":%d}]'
    ) % (T_MS, T_MS)
    updates, statuses, bad = decode(frame)
    assert updates == [
        Update("AAPL", "T", T_MS, last_price=1.5, last_size=1),
        Update("MSFT", "Q", T_MS, bid_price=2.0, bid_size=400),
    ]
    assert [s.message for s in statuses] == ["subscribed to: T.MSFT"]
    reasons = [b.reason.split(":")[0] for b in bad]
    assert reasons == ["unexpected field type", "unexpected field type", "T event without a numeric p"]
    # Each error carries the bad event alone, for the log.
    assert json.loads(bad[0].frame) == {"ev": "Q", "sym": "AAPL", "bp": "cheap"}
    assert bad[1].frame == "7"
    assert json.loads(bad[2].frame) == {"ev": "T", "sym": "MSFT", "s": 1}


def test_other_events_reusing_our_field_names_are_skipped_not_malformed() -> None:
    # A crypto level-2 book event: its "a"/"b" are lists; it is not ours, so it is not an error.
    frame = [
        {"ev": "XL2", "pair": "BTC-USD", "t": T_MS, "r": T_MS, "x": 1, "b": [[43000.0, 0.5]], "a": [[43001.0, 1.0]]},
        {"ev": "XT", "pair": "BTC-USD", "p": 43000.5, "s": 0.5, "t": T_MS},
    ]
    updates, _, bad = decode(frame, market="crypto")
    assert updates == [Update("BTCUSD", "T", T_MS, last_price=43000.5, last_size=0.5)] and bad == []


def test_bytes_frame_decodes() -> None:
    updates, _, _ = decode(b'[{"ev":"T","sym":"AAPL","p":2.5,"s":3,"t":%d}]' % T_MS)
    assert updates == [Update("AAPL", "T", T_MS, last_price=2.5, last_size=3)]


# =========================================================================== statuses, secrets


def test_status_messages_log_levels_and_fatal_ones(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_relay.providers.polygon")
    provider = PolygonProvider(polygon_config().polygon)
    assert provider.check_status(PolygonEvent("status", status="success", message="subscribed to: T.AAPL")) == "success"
    assert provider.check_status(PolygonEvent("status", status="maintenance", message="restart soon")) == "maintenance"
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [
        (logging.DEBUG, "[STATUS] success: subscribed to: T.AAPL"),
        (logging.INFO, "[STATUS] Polygon says maintenance: restart soon"),
    ]
    # A server echoing the key: it is masked in what we raise.
    with pytest.raises(AuthFailed) as failed:
        provider.check_status(PolygonEvent("status", status="auth_failed", message=f"bad key {KEY}"))
    assert str(failed.value) == "Polygon rejected the API key (auth_failed: bad key ***)"
    with pytest.raises(ConnectionLimit) as limit:
        provider.check_status(PolygonEvent("status", status="max_connections", message=MAX_CONNECTIONS_MESSAGE))
    assert "connection limit" in str(limit.value) and MAX_CONNECTIONS_MESSAGE in str(limit.value)


@pytest.mark.parametrize(
    ("status", "message", "error"),
    [
        ("auth_failed", "authentication failed", AuthFailed),
        # The older wording (alpacahq/Alpaca-API #68): an auth failure, not a login timeout.
        ("error", "authentication failed", AuthFailed),
        ("error", "Not authorized", AuthFailed),
        ("max_connections", MAX_CONNECTIONS_MESSAGE, ConnectionLimit),
        ("auth_timeout", "no auth", ProviderError),
        ("force_disconnect", "maintenance", ProviderError),
        ("slow_consumer", "too slow", ProviderError),
        ("error", "something else", None),
        ("success", "subscribed to: T.AAPL", None),
    ],
)
def test_every_status_class_maps_to_the_relays_answer(status: str, message: str, error: type | None) -> None:
    """The STATUSES table, row by row: which exception (so which wait) each status gives."""
    provider = PolygonProvider(polygon_config().polygon)
    event = PolygonEvent("status", status=status, message=message)
    if error is None:
        assert provider.check_status(event) == status
        return
    with pytest.raises(ProviderError) as info:
        provider.check_status(event)
    assert type(info.value) is error
    assert STATUSES.get(status, ErrorClass.AUTH if error is AuthFailed else None) is not None


async def test_the_older_auth_failure_wording_is_auth_failed_not_a_timeout(start_relay) -> None:
    async with fake_polygon(rate=0.0, auth_failure={"status": "error", "message": "authentication failed"}) as fake:
        relay = await start_relay(**sections(fake, api_key="wrong"))
        with trio.fail_after(10):
            await wait_state(relay, "auth_failed")
    assert relay.upstream.last_error == "Polygon rejected the API key (error: authentication failed)"


def test_provider_identity_and_no_secret_anywhere() -> None:
    config = polygon_config("wss://socket.massive.com/crypto", market="crypto")
    provider = PolygonProvider(config.polygon)
    assert provider.name == "polygon" and provider.detects_stale is False
    assert provider.describe() == "Polygon/Massive crypto (real-time) at wss://socket.massive.com/crypto"
    delayed_config = load_config(environ={}, overrides={"polygon": {"api_key": KEY, "delayed": True}}, dotenv=None)
    delayed = PolygonProvider(delayed_config.polygon)
    assert delayed.describe() == "Polygon/Massive stocks (delayed) at wss://delayed.massive.com/stocks"
    for text in (provider.describe(), repr(provider), repr(config.polygon), repr(config), delayed.describe()):
        assert KEY not in text


# =========================================================================== sessions against the fake


async def test_subscriptions_are_chunked_below_32_kib() -> None:
    tickers = [f"Z{i:05d}" for i in range(3000)]  # 6000 entries, ~50 KiB of params
    received: list[Update] = []

    async def read(session: Any) -> None:
        # Like the upstream's reader: the acknowledgements (6000 of them) must be read.
        while True:
            received.extend(await session.receive())

    async with fake_polygon(rate=0.0) as fake:
        provider = PolygonProvider(polygon_config(fake.url).polygon)
        with trio.fail_after(10):
            async with provider.session() as session, trio.open_nursery() as nursery:
                nursery.start_soon(read, session)
                await session.subscribe(tickers)
                expected = {f"{ch}.{t}" for t in tickers for ch in ("T", "Q")}
                await fake.wait_until(lambda: fake.subscriptions == expected)
                assert 1 < len(fake.history) <= 3
                assert fake.largest_message < MAX_SUBSCRIBE_BYTES
                assert fake.largest_message > MAX_SUBSCRIBE_BYTES - 100  # chunks are filled, not tiny
                # Both channels of a ticker, in order, each entry once.
                entries = [e for _action, chunk in fake.history for e in chunk]
                assert entries[:4] == ["T.Z00000", "Q.Z00000", "T.Z00001", "Q.Z00001"] and len(entries) == 6000
                await session.unsubscribe(tickers[:1500])
                await fake.wait_until(lambda: len(fake.subscriptions) == 3000)
                assert fake.subscriptions == {f"{ch}.{t}" for t in tickers[1500:] for ch in ("T", "Q")}
                nursery.cancel_scope.cancel()
    assert received == []  # acknowledgements only


async def test_login_waits_for_auth_success_within_auth_timeout(autojump_clock) -> None:
    async with fake_polygon(auth_reply=False) as fake:
        provider = PolygonProvider(polygon_config(fake.url, auth_timeout=5.0).polygon)
        start = trio.current_time()
        with pytest.raises(ProviderError) as info:
            async with provider.session():
                pass
        assert trio.current_time() - start == pytest.approx(5.0, abs=1e-6)
    assert not isinstance(info.value, AuthFailed)
    assert str(info.value) == "no auth_success from Polygon within 5s"
    assert fake.received_keys == [KEY]


async def test_connection_limit_waits_auth_retry_delay_never_a_hot_loop(autojump_clock) -> None:
    """Over the per-key limit the NEW connection is refused: a few quick retries, then auth_retry_delay."""
    async with fake_polygon(rate=0.0, max_connections=1) as fake:
        config = load_config(
            environ={},
            overrides={
                "upstream": {
                    "provider": "polygon",
                    "backoff_initial": 0.1,
                    "backoff_max": 0.5,
                    "auth_retry_delay": 300.0,
                    "limit_retries": 3,
                    "limit_retry_delay": 0.25,
                },
                "polygon": {"api_key": KEY, "url": fake.url},
            },
            dotenv=None,
        )
        holder = PolygonProvider(config.polygon)
        async with holder.session():  # another process already holds the account's one connection
            send, _receive = trio.open_memory_channel[list[Update]](16)  # no data: never filled
            up = Upstream(
                PolygonProvider(config.polygon), Demand(0.0), send, config.upstream, Stats(), rng=random.Random(5)
            )
            with trio.fail_after(3600):
                async with trio.open_nursery() as nursery:
                    await nursery.start(up.run)
                    await fake.wait_until(lambda: fake.refused_over_limit == 1)
                    first = trio.current_time()
                    # Retried after 0.25, 0.5 and 0.75 s (limit_retry_delay x n), then the cool-down.
                    await fake.wait_until(lambda: fake.refused_over_limit == 4)
                    quick = trio.current_time() - first
                    await wait_state_idle(up, UpstreamState.AUTH_FAILED)
                    refused_at = trio.current_time()
                    assert "connection limit" in up.last_error and KEY not in up.last_error
                    await fake.wait_until(lambda: fake.refused_over_limit == 5)
                    gap = trio.current_time() - refused_at
                    up.stop()
    assert quick == pytest.approx(0.25 + 0.5 + 0.75, abs=1e-6)
    rng = random.Random(5)
    expected = 300.0 * rng.uniform(0.9, 1.1)
    assert gap == pytest.approx(expected, abs=1e-6)
    assert fake.connections_total == 6 and fake.logins == 1


async def wait_state_idle(up: Upstream, state: str) -> None:
    while up.state != state:
        await trio.testing.wait_all_tasks_blocked()


# =========================================================================== the relay end to end


async def test_login_ok(start_relay, http) -> None:
    async with fake_polygon() as fake:
        relay = await start_relay(**sections(fake))
        with trio.fail_after(10):
            await wait_state(relay, "connected")
            status = (await http.get(api(relay, "/status"))).json()
    assert fake.logins == 1 and fake.failed_logins == 0 and fake.received_keys == [KEY]
    assert status["upstream"]["state"] == "connected"
    assert KEY not in json.dumps(status)


async def test_bad_key_is_auth_failed_and_never_logged(start_relay, http, all_logs) -> None:
    async with fake_polygon() as fake:
        relay = await start_relay(**sections(fake, api_key=BAD_KEY))
        with trio.fail_after(10):
            await fake.wait_until(lambda: fake.failed_logins == 1)
            await wait_state(relay, "auth_failed")
            health = await http.get(api(relay, "/health"))
            status = await http.get(api(relay, "/status"))
    assert health.status_code == 503
    assert health.json()["reason"] == "auth_failed: Polygon rejected the API key (auth_failed: authentication failed)"
    assert relay.upstream.reconnects == 0 and fake.connections_total == 1  # waiting the long auth delay
    assert fake.received_keys == [BAD_KEY]
    for text in [
        health.text,
        status.text,
        relay.upstream.last_error,
        *[r.getMessage() for r in all_logs.records],
        all_logs.text,
    ]:
        assert BAD_KEY not in text
    assert any("[AUTH]" in r.getMessage() and r.levelno == logging.ERROR for r in all_logs.records)


async def test_subscriptions_follow_client_demand(start_relay, ws_connect) -> None:
    async with fake_polygon(rate=0.0) as fake:
        relay = await start_relay(**sections(fake))
        a = await ws_connect(relay)
        b = await ws_connect(relay)
        with trio.fail_after(10):
            await a.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
            await fake.wait_until(lambda: fake.subscriptions == {"T.AAPL", "Q.AAPL", "T.MSFT", "Q.MSFT"})
            await b.request({"action": "subscribe", "symbols": ["MSFT", "BRK.B"]}, "subscribed")
            await fake.wait_until(
                lambda: fake.subscriptions == {"T.AAPL", "Q.AAPL", "T.MSFT", "Q.MSFT", "T.BRK.B", "Q.BRK.B"}
            )
            await a.request({"action": "unsubscribe", "symbols": ["AAPL", "MSFT"]}, "unsubscribed")
            await fake.wait_until(lambda: fake.subscriptions == {"T.MSFT", "Q.MSFT", "T.BRK.B", "Q.BRK.B"})
            await b.ws.aclose()
            await fake.wait_until(lambda: fake.subscriptions == set())
    assert fake.history == [
        ("subscribe", ("T.AAPL", "Q.AAPL", "T.MSFT", "Q.MSFT")),
        ("subscribe", ("T.BRK.B", "Q.BRK.B")),
        ("unsubscribe", ("T.AAPL", "Q.AAPL")),
        ("unsubscribe", ("T.BRK.B", "Q.BRK.B", "T.MSFT", "Q.MSFT")),
    ]


async def test_stock_events_reach_clients_normalised(start_relay, ws_connect) -> None:
    async with fake_polygon(rate=0.0) as fake:
        relay = await start_relay(**sections(fake))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
            await fake.wait_until(lambda: len(fake.subscriptions) == 4)
            # One frame, several events (and an aggregate and a status in between).
            await fake.inject(json.dumps([
                {"ev": "T", "sym": "AAPL", "i": "7", "x": 4, "p": 189.45, "s": 37, "c": [37], "t": T_MS, "q": 1, "z": 3},
                {"ev": "AM", "sym": "AAPL", "v": 10, "o": 1.0, "c": 1.0, "h": 1.0, "l": 1.0, "s": T_MS, "e": T_MS},
                {"ev": "Q", "sym": "MSFT", "bx": 11, "bp": 370.2, "bs": 3, "ax": 12, "ap": 370.25, "as": 12,
                 "c": 1, "i": [604], "t": T_MS + 5, "q": 2, "z": 3},
                {"ev": "status", "status": "success", "message": "subscribed to: Q.MSFT"},
                {"ev": "Q", "sym": "AAPL", "bp": 189.4, "bs": 1, "ap": 189.5, "as": 2, "t": T_MS + 9},
            ]))  # fmt: skip
            got = {}
            while len(got) < 3:
                msg = await client.recv()
                if msg.get("type") == "price_update":
                    got[(msg["symbol"], msg["seq"])] = msg
    aapl_t, msft_q, aapl_q = got[("AAPL", 1)], got[("MSFT", 1)], got[("AAPL", 2)]
    assert (aapl_t["data_type"], aapl_t["timestamp"], aapl_t["last_price"], aapl_t["last_size"]) == (
        "T",
        T_MS,
        189.45,
        37,
    )
    assert (msft_q["data_type"], msft_q["timestamp"]) == ("Q", T_MS + 5)
    assert (msft_q["bid_price"], msft_q["bid_size"], msft_q["ask_price"], msft_q["ask_size"]) == (
        370.2,
        300,
        370.25,
        1200,
    )
    assert msft_q["last_price"] is None
    assert (aapl_q["bid_size"], aapl_q["ask_size"], aapl_q["last_price"]) == (100, 200, 189.45)
    assert relay.hub.stats.malformed == 0


async def test_crypto_symbols_both_ways_and_unmapped_not_sent(start_relay, ws_connect, all_logs) -> None:
    async with fake_polygon(market="crypto", rate=0.0) as fake:
        relay = await start_relay(**sections(fake, symbols={"BTCEUR": "BTC-EUR"}))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request(
                {"action": "subscribe", "symbols": ["BTCUSD", "AAPL", "BTCEUR", "EURUSD"]}, "subscribed"
            )
            await fake.wait_until(
                lambda: fake.subscriptions == {"XT.BTC-USD", "XQ.BTC-USD", "XT.BTC-EUR", "XQ.BTC-EUR"}
            )
            await fake.inject(json.dumps([
                {"ev": "XT", "pair": "BTC-USD", "p": 43250.5, "t": T_MS, "s": 0.0125, "c": [1], "i": "1", "x": 1, "r": T_MS},
                {"ev": "XQ", "pair": "BTC-EUR", "bp": 40000.5, "bs": 0.25, "ap": 40001.0, "as": 1.5, "t": T_MS + 1},
            ]))  # fmt: skip
            trade, _ = await client.recv_until(lambda m: m.get("symbol") == "BTCUSD")
            quote, _ = await client.recv_until(lambda m: m.get("symbol") == "BTCEUR")
    assert fake.history == [("subscribe", ("XT.BTC-EUR", "XQ.BTC-EUR", "XT.BTC-USD", "XQ.BTC-USD"))]
    assert (trade["data_type"], trade["timestamp"], trade["last_price"], trade["last_size"]) == (
        "T",
        T_MS,
        43250.5,
        0.0125,
    )
    assert (quote["bid_price"], quote["bid_size"], quote["ask_price"], quote["ask_size"]) == (
        40000.5,
        0.25,
        40001.0,
        1.5,
    )
    warned = sorted(
        r.getMessage() for r in all_logs.records if r.levelno == logging.WARNING and "[SUBSCRIBE]" in r.getMessage()
    )
    assert warned == [
        "[SUBSCRIBE] polygon has no symbol for AAPL on the crypto cluster; add it to [polygon.symbols]",
        "[SUBSCRIBE] polygon has no symbol for EURUSD on the crypto cluster; add it to [polygon.symbols]",
    ]


async def test_forex_symbols_both_ways_and_the_stream_flows(start_relay, ws_connect) -> None:
    async with fake_polygon(market="forex", rate=50.0) as fake:
        relay = await start_relay(**sections(fake))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["EURUSD", "USDJPY"]}, "subscribed")
            await fake.wait_until(lambda: fake.subscriptions == {"C.EUR/USD", "C.USD/JPY"})
            simulated, _ = await client.recv_until(lambda m: m.get("symbol") == "USDJPY")
            await fake.inject('[{"ev":"C","p":"EUR/USD","x":48,"a":1.0857,"b":1.0856,"t":%d}]' % T_MS)
            quote, _ = await client.recv_until(lambda m: m.get("symbol") == "EURUSD" and m["timestamp"] == T_MS)
    assert simulated["data_type"] == "Q" and simulated["bid_price"] < simulated["ask_price"]
    assert simulated["bid_size"] is None and simulated["last_price"] is None
    assert (quote["data_type"], quote["ask_price"], quote["bid_price"], quote["ask_size"]) == (
        "Q",
        1.0857,
        1.0856,
        None,
    )


async def test_simulated_stocks_stream_gives_share_sizes(start_relay, ws_connect) -> None:
    async with fake_polygon(rate=100.0) as fake:
        relay = await start_relay(**sections(fake))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
            quote, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m.get("data_type") == "Q")
    # The fake sends SimMarket's share sizes as round lots; the relay turns them back into shares.
    assert quote["bid_size"] % 100 == 0 and quote["bid_size"] >= 100 and quote["ask_size"] >= 100


async def test_reconnect_resubscribes_and_warns_unmapped_once(start_relay, ws_connect, http, all_logs) -> None:
    async with fake_polygon(rate=50.0) as fake:
        relay = await start_relay(**sections(fake, backoff_initial=0.05, backoff_max=0.2, pinned=["IBM"]))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await fake.wait_until(lambda: fake.subscriptions == {"T.IBM", "Q.IBM"})
            await client.request({"action": "subscribe", "symbols": ["AAPL", "BTCUSD"]}, "subscribed")
            before, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
            wanted = {"T.AAPL", "Q.AAPL", "T.IBM", "Q.IBM"}
            await fake.wait_until(lambda: fake.subscriptions == wanted)
            assert await fake.drop_all() == 1
            await fake.wait_until(lambda: fake.logins == 2 and fake.subscriptions == wanted)
            after, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > before["seq"] + 5)
            status = (await http.get(api(relay, "/status"))).json()
    assert after["type"] == "price_update"
    assert status["upstream"]["reconnects"] == 1 and status["upstream"]["state"] == "connected"
    assert fake.connections_total == 2
    # Everything again on the new connection; BTCUSD (a pair, on the stocks cluster) never sent.
    assert fake.history == [
        ("subscribe", ("T.IBM", "Q.IBM")),
        ("subscribe", ("T.AAPL", "Q.AAPL")),
        ("subscribe", ("T.AAPL", "Q.AAPL", "T.IBM", "Q.IBM")),
    ]
    # It was wanted on both connections; the warning came once.
    warned = [r for r in all_logs.records if "no symbol for BTCUSD" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


async def test_connection_limit_refusing_the_new_connection_is_auth_failed(start_relay, http) -> None:
    async with fake_polygon(rate=0.0, max_connections=1, limit_drops="new") as fake:
        holder = PolygonProvider(polygon_config(fake.url).polygon)
        async with holder.session():
            relay = await start_relay(**sections(fake, limit_retries=2, limit_retry_delay=0.01))
            with trio.fail_after(10):
                await wait_state(relay, "auth_failed")
                health = (await http.get(api(relay, "/health"))).json()
    assert health["reason"] == (
        "auth_failed: Polygon connection limit reached: another connection uses this API key "
        f"(max_connections: {MAX_CONNECTIONS_MESSAGE})"
    )
    assert fake.refused_over_limit == 3 and fake.logins == 1  # two quick retries first


async def test_a_lingering_own_connection_is_outlived_by_quick_retries(start_relay) -> None:
    """After a blip the vendor may still count our old connection: quick retries get back in."""
    async with fake_polygon(rate=0.0, max_connections=1, limit_drops="new") as fake:
        holder = PolygonProvider(polygon_config(fake.url).polygon)
        async with trio.open_nursery() as nursery:
            held = trio.Event()

            async def lingering() -> None:
                async with holder.session():
                    held.set()
                    await fake.wait_until(lambda: fake.refused_over_limit >= 2)

            nursery.start_soon(lingering)
            await held.wait()
            relay = await start_relay(**sections(fake, limit_retries=20, limit_retry_delay=0.02))
            with trio.fail_after(10):
                await wait_state(relay, "connected")
            assert fake.refused_over_limit >= 2 and fake.logins == 2
            # Connected within the deadline: it never waited auth_retry_delay (300 s by default).


async def test_connection_limit_kicking_out_the_old_connection_is_auth_failed(start_relay) -> None:
    async with fake_polygon(rate=0.0, max_connections=1, limit_drops="old") as fake:
        relay = await start_relay(**sections(fake))
        with trio.fail_after(10):
            await wait_state(relay, "connected")
            intruder = PolygonProvider(polygon_config(fake.url).polygon)
            async with intruder.session():  # the same key logs in elsewhere: the relay is kicked out
                # Kicked out of a logged-in session: not its own lingering connection, so no quick
                # retries (they would kick the other one out in turn): it waits auth_retry_delay.
                await wait_state(relay, "auth_failed")
                assert fake.logins == 2 and fake.refused_over_limit == 1
                assert "connection limit" in relay.upstream.last_error
                assert relay.upstream.reconnects == 0


async def test_malformed_frames_are_counted_and_the_feed_goes_on(start_relay, ws_connect, http) -> None:
    async with fake_polygon(rate=50.0) as fake:
        relay = await start_relay(**sections(fake))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
            first, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
            for raw in ("not json", '{"ev":"T"}', '[{"ev":"T","sym":"AAPL","p":"x"}]', '[{"ev":"Q","sym":"AAPL"}, 3]'):
                await fake.inject(raw)
            while relay.hub.stats.malformed < 5:
                await client.recv()
            later, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > first["seq"] + 3)
            status = (await http.get(api(relay, "/status"))).json()
    assert status["messages"]["malformed"] == 5
    assert status["upstream"]["reconnects"] == 0 and fake.connections_total == 1
    assert later["type"] == "price_update"
