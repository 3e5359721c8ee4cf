"""The Finnhub adapter: frame decoding field by field, the session over a real loopback socket
(in virtual time where time matters), and the whole relay against the fake Finnhub server."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from conftest import api, wait_state

from trio_relay.config import UpstreamConfig
from trio_relay.hub import Demand, Stats
from trio_relay.model import Update
from trio_relay.providers.base import AuthFailed, MalformedFrame, ProviderError, RateLimited
from trio_relay.providers.finnhub import (
    RATE_LIMIT_WAIT,
    FinnhubConfig,
    FinnhubDecoder,
    FinnhubProvider,
    FinnhubSession,
    decode_frame,
    finnhub_symbols,
)
from trio_relay.providers.symbols import SymbolMap
from trio_relay.providers.wsclient import WsClient
from trio_relay.testing.fake_finnhub import MALFORMED_FRAMES, FakeFinnhubServer, trade_frame
from trio_relay.upstream import Upstream

KEY = "fh-test-key-3b9e71c4d2a8"  # long and unique, so a leak would be found by grep
BAD_KEY = "fh-wrong-key-9f8e7d6c5b4a"
NOW_MS = 1_700_000_000_000
T_MS = 1_699_564_800_123  # 2023-11-09T21:20:00.123Z
EXACT = 1e-6  # virtual seconds: loopback I/O takes no virtual time
GUARD = 3600.0  # virtual seconds a MockClock test may take before it fails instead of hanging
PRICE_KEYS = ("symbol", "timestamp", "data_type", "last_price", "last_size")


def decoder(**config: Any) -> FinnhubDecoder:
    return FinnhubDecoder(finnhub_symbols(FinnhubConfig(**config)))


def feed(dec: FinnhubDecoder, *frames: Any, now_ms: int = NOW_MS) -> tuple[list[Update], list[MalformedFrame]]:
    bad: list[MalformedFrame] = []
    raws = [f if isinstance(f, (str, bytes)) else json.dumps(f) for f in frames]
    return dec.decode_batch(raws, bad.append, now_ms), bad


def trades(*elements: dict[str, Any]) -> dict[str, Any]:
    return {"type": "trade", "data": list(elements)}


def price(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: msg[k] for k in PRICE_KEYS}


# =========================================================================== decoding


def test_trade_element_field_by_field() -> None:
    updates, bad = feed(decoder(), trades({"s": "AAPL", "p": 189.45, "t": T_MS, "v": 100, "c": ["1", "12"]}))
    assert updates == [Update("AAPL", "T", T_MS, last_price=189.45, last_size=100)]
    assert bad == []
    assert type(updates[0].timestamp) is int and updates[0].timestamp == T_MS  # t is already ms


def test_crypto_volume_is_kept_fractional_and_zero_volume_is_a_price_update() -> None:
    updates, _ = feed(
        decoder(),
        trades(
            {"s": "COINBASE:BTC-USD", "p": 7296.89, "t": T_MS, "v": 0.011467, "c": ["1", "8"]},
            {"s": "OANDA:EUR_USD", "p": 1.08345, "t": T_MS + 1, "v": 0},
            {"s": "MSFT", "p": 370, "t": T_MS + 2},  # no v, no c, integer price
        ),
    )
    assert updates == [
        Update("BTCUSD", "T", T_MS, last_price=7296.89, last_size=0.011467),
        Update("EURUSD", "T", T_MS + 1, last_price=1.08345, last_size=None),
        Update("MSFT", "T", T_MS + 2, last_price=370.0, last_size=None),
    ]


def test_one_frame_many_symbols_and_many_frames_in_one_batch() -> None:
    first = trades(
        {"s": "AAPL", "p": 1.5, "t": T_MS, "v": 10},
        {"s": "COINBASE:ETH-USD", "p": 2000.25, "t": T_MS, "v": 0.5},
        {"s": "AAPL", "p": 1.51, "t": T_MS + 5, "v": 20},
        {"s": "OANDA:USD_JPY", "p": 149.875, "t": T_MS + 6, "v": 0},
    )
    second = trades({"s": "COINBASE:ETH-BTC", "p": 0.0525, "t": T_MS + 9, "v": 3})
    updates, bad = feed(decoder(), first, {"type": "ping"}, second)
    assert [(u.symbol, u.timestamp, u.last_price, u.last_size) for u in updates] == [
        ("AAPL", T_MS, 1.5, 10),
        ("ETHUSD", T_MS, 2000.25, 0.5),
        ("AAPL", T_MS + 5, 1.51, 20),
        ("USDJPY", T_MS + 6, 149.875, None),
        ("ETHBTC", T_MS + 9, 0.0525, 3),
    ]
    assert {u.kind for u in updates} == {"T"} and bad == []


def test_malformed_frame_in_a_batch_is_reported_and_the_rest_decodes() -> None:
    good = trades({"s": "AAPL", "p": 1.5, "t": T_MS, "v": 10})
    updates, bad = feed(decoder(), good, "not json", trades({"s": "IBM", "p": 2.5, "t": T_MS, "v": 1}))
    assert [u.symbol for u in updates] == ["AAPL", "IBM"]
    assert len(bad) == 1 and bad[0].frame == "not json" and "JSON" in bad[0].reason


@pytest.mark.parametrize(
    "t, expected",
    [(T_MS, T_MS), (T_MS // 1000, T_MS // 1000 * 1000), (T_MS * 1_000_000, T_MS), (0, NOW_MS), (-1, NOW_MS)],
    ids=["ms", "s", "ns", "zero", "negative"],
)
def test_timestamp_is_epoch_ms(t: int, expected: int) -> None:
    updates, _ = feed(decoder(), trades({"s": "AAPL", "p": 1.0, "t": t, "v": 1}))
    assert [u.timestamp for u in updates] == [expected]


@pytest.mark.parametrize(
    "client, native",
    [
        ("BTCUSD", "COINBASE:BTC-USD"),
        ("ETHBTC", "COINBASE:ETH-BTC"),
        ("BTCUSDT", "COINBASE:BTC-USDT"),
        ("EURUSD", "OANDA:EUR_USD"),
        ("XAUUSD", "OANDA:XAU_USD"),
        ("USDJPY", "OANDA:USD_JPY"),
        ("AAPL", "AAPL"),
        ("BRK.B", "BRK.B"),
    ],
)
def test_symbol_map_both_ways(client: str, native: str) -> None:
    symbols = finnhub_symbols(FinnhubConfig())
    assert symbols.to_native(client) == native
    assert symbols.to_client(native) == client
    updates, _ = feed(FinnhubDecoder(symbols), trades({"s": native, "p": 1.0, "t": T_MS, "v": 1}))
    assert [u.symbol for u in updates] == [client]


def test_config_symbols_override_the_builtin_table(all_logs: pytest.LogCaptureFixture) -> None:
    dec = decoder(symbols={"BTCUSD": "BINANCE:BTCUSDT", "SPX500": "OANDA:SPX500_USD"})
    assert dec.symbols.to_native("BTCUSD") == "BINANCE:BTCUSDT"
    assert dec.symbols.to_native("SPX500") == "OANDA:SPX500_USD"
    updates, bad = feed(
        dec,
        trades(
            {"s": "BINANCE:BTCUSDT", "p": 64000.5, "t": T_MS, "v": 0.25},
            {"s": "COINBASE:BTC-USD", "p": 64001.0, "t": T_MS, "v": 1},  # no longer ours: skipped
            {"s": "OANDA:SPX500_USD", "p": 5000.1, "t": T_MS, "v": 0},
        ),
    )
    assert updates == [
        Update("BTCUSD", "T", T_MS, last_price=64000.5, last_size=0.25),
        Update("SPX500", "T", T_MS, last_price=5000.1),
    ]
    assert bad == []
    skipped = [r for r in all_logs.records if "COINBASE:BTC-USD" in r.getMessage()]
    assert [r.levelno for r in skipped] == [logging.DEBUG]  # silently, at debug


def test_unknown_venue_symbol_is_skipped_not_malformed() -> None:
    updates, bad = feed(decoder(), trades({"s": "BINANCE:ETHUSDT", "p": 1.0, "t": T_MS, "v": 1}))
    assert updates == [] and bad == []


# --------------------------------------------------------------------------- duplicates


def test_exact_duplicate_trades_are_dropped_per_symbol() -> None:
    dec = decoder()
    trade = {"s": "AAPL", "p": 189.5, "t": T_MS, "v": 100}
    # The 2020 incident: every trade three times, in one frame or across frames.
    updates, _ = feed(dec, trades(trade, trade), trades(trade))
    assert updates == [Update("AAPL", "T", T_MS, last_price=189.5, last_size=100)]
    assert dec.duplicates == 2
    # The same (t, p, v) on another symbol is another trade; any field changed is a new trade.
    updates, _ = feed(
        dec,
        trades(
            {**trade, "s": "MSFT"},
            {**trade, "v": 101},
            {**trade, "v": 101, "p": 189.51},
            {**trade, "v": 101, "p": 189.51, "t": T_MS + 1},
        ),
    )
    assert [(u.symbol, u.last_price, u.last_size, u.timestamp) for u in updates] == [
        ("MSFT", 189.5, 100, T_MS),
        ("AAPL", 189.5, 101, T_MS),
        ("AAPL", 189.51, 101, T_MS),
        ("AAPL", 189.51, 101, T_MS + 1),
    ]
    assert dec.duplicates == 2
    # A repeat of an older (not the last) trade is not a duplicate of the last one.
    updates, _ = feed(dec, trades(trade))
    assert len(updates) == 1 and dec.duplicates == 2


def test_duplicate_filter_forgets_an_unsubscribed_symbol() -> None:
    dec = decoder()
    frame = trades({"s": "AAPL", "p": 1.0, "t": T_MS, "v": 1})
    assert len(feed(dec, frame)[0]) == 1
    assert feed(dec, frame)[0] == []
    dec.forget("AAPL")
    assert len(feed(dec, frame)[0]) == 1


# --------------------------------------------------------------------------- control frames


@pytest.mark.parametrize(
    "frame",
    [{"type": "ping"}, {"type": "news", "data": [{"headline": "x"}]}, {"type": "pr", "data": []}],
    ids=["ping", "news", "pr"],
)
def test_control_frames_give_no_update_and_no_warning(
    frame: dict[str, Any], all_logs: pytest.LogCaptureFixture
) -> None:
    updates, bad = feed(decoder(), frame)
    assert updates == [] and bad == []
    assert [r for r in all_logs.records if r.levelno >= logging.WARNING] == []


def test_invalid_symbol_error_is_a_warning_once_per_symbol(all_logs: pytest.LogCaptureFixture) -> None:
    dec = decoder()
    dec.subscribed.update({"AAPL", "OANDA:EUR_USD"})
    feed(dec, {"type": "error", "msg": "Invalid symbol OANDA:EUR_USD"})
    feed(dec, {"type": "error", "msg": "Invalid symbol OANDA:EUR_USD"})
    feed(dec, {"type": "error", "msg": "Invalid symbol"})  # the 2020 text names no symbol
    warnings = [r.getMessage() for r in all_logs.records if r.levelno == logging.WARNING]
    assert warnings == [
        "[SUBSCRIBE] Finnhub says invalid symbol OANDA:EUR_USD (client symbol EURUSD); it gets no data",
        "[SUBSCRIBE] Finnhub: Invalid symbol (it does not say which symbol)",
    ]
    assert dec.subscribed == {"AAPL"}  # an invalid symbol is not counted as subscribed
    assert [r for r in all_logs.records if r.levelno >= logging.ERROR] == []


def test_too_many_symbols_is_an_error_naming_the_count(all_logs: pytest.LogCaptureFixture) -> None:
    dec = decoder()
    dec.subscribed.update(f"S{i}" for i in range(51))
    feed(dec, {"type": "error", "msg": "Subscribing to too many symbols"})
    feed(dec, {"type": "error", "msg": "Subscribing to too many symbols"})
    errors = [r.getMessage() for r in all_logs.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "too many symbols (51 asked for on this connection" in errors[0]
    assert dec.too_many == 2


def test_unknown_error_text_is_a_warning(all_logs: pytest.LogCaptureFixture) -> None:
    updates, bad = feed(decoder(), {"type": "error", "msg": "Something new went wrong"})
    assert updates == [] and bad == []
    assert [(r.levelno, r.getMessage()) for r in all_logs.records if r.levelno >= logging.WARNING] == [
        (logging.WARNING, "[PROVIDER] Finnhub error: Something new went wrong")
    ]


@pytest.mark.parametrize(
    "raw",
    [
        *MALFORMED_FRAMES,
        "",
        "null",
        '{"type": "trade", "data": {"s": "AAPL", "p": 1.0, "t": 1}}',  # data not a list
        '{"type": "trade", "data": [{"s": "AAPL", "t": 1, "v": 1}]}',  # no price
        '{"type": "trade", "data": [{"s": "AAPL", "p": 1.0, "v": 1}]}',  # no time
        '{"type": "trade", "data": [{"s": "AAPL", "p": true, "t": 1}]}',  # a bool is not a price
        '{"type": "trade", "data": [{"s": "AAPL", "p": 1.0, "t": "now"}]}',
        '{"type": "trade", "data": [{"s": "AAPL", "p": 1.0, "t": 1, "v": "lots"}]}',
        '{"type": "trade", "data": [{"s": 42, "p": 1.0, "t": 1}]}',
        '{"type": "error", "msg": 7}',
        '{"type": 1}',
        '{"type": "Trade", "data": []}',  # types are case-sensitive
    ],
)
def test_malformed_frames_raise(raw: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        decode_frame(raw)
    assert info.value.frame == raw and info.value.reason
    updates, bad = feed(decoder(), raw)
    assert updates == [] and [b.frame for b in bad] == [raw]


# =========================================================================== secrets


def test_describe_and_errors_never_show_the_token() -> None:
    provider = FinnhubProvider(FinnhubConfig(api_key=KEY, url="wss://user:pw@ws.example.test:8443/ws"))
    assert provider.describe() == "Finnhub at wss://ws.example.test:8443/ws"
    assert FinnhubProvider(FinnhubConfig(api_key=KEY)).describe() == "Finnhub at wss://ws.finnhub.io"
    plain = FinnhubProvider(FinnhubConfig(api_key=KEY, url="ws://127.0.0.1:9"))
    assert KEY not in repr(plain.config) and KEY not in repr(plain) and KEY not in plain.describe()
    assert provider.scrub(f"GET /ws?token={KEY}&x=1 failed for {KEY}") == "GET /ws?token=***&x=1 failed for ***"


# =========================================================================== session over loopback


@pytest.fixture
async def fake() -> AsyncIterator[FakeFinnhubServer]:
    async with FakeFinnhubServer.open(api_keys=[KEY], rate=50.0, ping_interval=1.0) as server:
        yield server


@pytest.fixture
async def quiet_fake() -> AsyncIterator[FakeFinnhubServer]:
    """No simulated trades: only what a test injects (and pings)."""
    async with FakeFinnhubServer.open(api_keys=[KEY], rate=0.0, ping_interval=1.0) as server:
        yield server


def provider_for(fake: FakeFinnhubServer, key: str = KEY, **kwargs: Any) -> FinnhubProvider:
    return FinnhubProvider(FinnhubConfig(api_key=key, url=fake.url), **kwargs)


async def test_key_is_url_encoded_in_the_token() -> None:
    key = "a+b/c&d=e f%"
    async with FakeFinnhubServer.open(api_keys=[key], rate=0.0) as fake:
        with trio.fail_after(5):
            async with provider_for(fake, key).session():
                await fake.wait_until(lambda: fake.connections_total == 1)
    assert fake.received_tokens == [key] and fake.rejected == 0


@pytest.mark.parametrize(
    "status, error, text",
    [
        (401, AuthFailed, "Finnhub rejected the API key (HTTP 401 on the upgrade)"),
        (403, AuthFailed, "Finnhub rejected the API key (HTTP 403 on the upgrade)"),
        (429, RateLimited, "Finnhub refused the connection: HTTP 429 (too many requests)"),
        (503, ProviderError, "Finnhub refused the upgrade with HTTP 503"),
    ],
)
async def test_handshake_statuses_map_to_errors(status: int, error: type[Exception], text: str) -> None:
    async with FakeFinnhubServer.open(api_keys=[KEY], reject_status=status) as fake:
        with trio.fail_after(5), pytest.raises(ProviderError) as info:
            async with provider_for(fake).session():
                pass
    assert type(info.value) is error and str(info.value) == text
    assert fake.rejected == 1 and fake.received_tokens == [KEY]
    if status == 429:  # no Retry-After: Finnhub's limits are per minute
        assert isinstance(info.value, RateLimited) and info.value.retry_after == RATE_LIMIT_WAIT == 60.0


@pytest.mark.parametrize(("header", "wait"), [("7", 7.0), ("0", 0.0), ("99999", 3600.0), ("soon", 60.0)])
async def test_429_honours_retry_after(header: str, wait: float) -> None:
    async with FakeFinnhubServer.open(api_keys=[KEY], reject_status=429, retry_after=header) as fake:
        with trio.fail_after(5), pytest.raises(RateLimited) as info:
            async with provider_for(fake).session():
                pass
    assert info.value.retry_after == wait  # capped at an hour; unreadable: the documented minute


async def test_429_makes_the_upstream_wait_at_least_the_retry_after(autojump_clock) -> None:
    """Not the 0.1-0.5 s backoff: the next attempt comes Retry-After seconds later."""
    async with FakeFinnhubServer.open(api_keys=[KEY], reject_status=429, retry_after="42") as fake:
        config = UpstreamConfig(provider="finnhub", backoff_initial=0.1, backoff_max=0.5)
        send, _receive = trio.open_memory_channel[Any](4)
        up = Upstream(provider_for(fake), Demand(0.0), send, config, Stats())
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                await nursery.start(up.run)
                await fake.wait_until(lambda: fake.rejected == 1)
                first = trio.current_time()
                await fake.wait_until(lambda: fake.rejected == 2)
                gap = trio.current_time() - first
                up.stop()
    assert 42.0 <= gap < 42.5


async def test_connect_refused_error_has_no_token() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = FinnhubProvider(FinnhubConfig(api_key=KEY, url=f"ws://127.0.0.1:{port}"))
    with trio.fail_after(5), pytest.raises(ProviderError) as info:
        async with provider.session():
            pass
    assert str(info.value).startswith(f"cannot connect to 127.0.0.1:{port}")
    assert KEY not in str(info.value) and "token" not in str(info.value)


async def test_unmapped_symbol_is_not_sent_and_is_logged_once(quiet_fake, all_logs) -> None:
    # The built-in Finnhub map passes stock tickers through, so only a map without that fallback
    # has unmapped symbols; the session must then not send them.
    symbols = SymbolMap(forex=lambda b, q: f"OANDA:{b}_{q}", stocks=None)
    with trio.fail_after(5):
        async with WsClient.open(f"{quiet_fake.url}?token={KEY}", connect_timeout=5) as ws:
            session = FinnhubSession(ws, FinnhubDecoder(symbols), lambda _e: None)
            await session.subscribe(["EURUSD", "AAPL"])
            await session.subscribe(["AAPL", "GBPUSD"])
            await quiet_fake.wait_until(lambda: len(quiet_fake.history) == 2)
    assert quiet_fake.history == [("subscribe", "OANDA:EUR_USD"), ("subscribe", "OANDA:GBP_USD")]
    warnings = [r.getMessage() for r in all_logs.records if r.levelno == logging.WARNING]
    assert warnings == ["[SUBSCRIBE] finnhub has no symbol for AAPL; add it to [finnhub.symbols]"]


async def test_session_subscribes_one_message_per_symbol(quiet_fake) -> None:
    with trio.fail_after(5):
        async with provider_for(quiet_fake).session() as session:
            await session.subscribe(["AAPL", "BTCUSD", "EURUSD"])
            await session.unsubscribe(["BTCUSD"])
            await quiet_fake.wait_until(lambda: len(quiet_fake.history) == 4)
            assert quiet_fake.subscriptions == {"AAPL", "OANDA:EUR_USD"}
            assert session.decoder.subscribed == {"AAPL", "OANDA:EUR_USD"}
    assert quiet_fake.history == [
        ("subscribe", "AAPL"),
        ("subscribe", "COINBASE:BTC-USD"),
        ("subscribe", "OANDA:EUR_USD"),
        ("unsubscribe", "COINBASE:BTC-USD"),
    ]


# --------------------------------------------------------------------------- virtual time


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_pings_keep_a_quiet_session_alive_and_are_not_answered(autojump_clock) -> None:
    with trio.fail_after(GUARD):
        async with FakeFinnhubServer.open(api_keys=[KEY], rate=0.0, ping_interval=60.0) as fake:
            async with provider_for(fake, silence_timeout=150.0).session() as session:
                await session.subscribe(["AAPL"])
                start = trio.current_time()
                for _ in range(20):  # 20 minutes of pings and nothing else
                    assert await session.receive() == []
                assert trio.current_time() - start == pytest.approx(20 * 60.0, abs=EXACT)
                assert fake.pings_sent == 20 and fake.connections_total == 1
        assert fake.history == [("subscribe", "AAPL")]  # no pong or anything else was sent


async def test_total_silence_ends_a_subscribed_session(autojump_clock) -> None:
    with trio.fail_after(GUARD):
        async with FakeFinnhubServer.open(api_keys=[KEY], rate=0.0, ping_interval=60.0) as fake:
            async with provider_for(fake, silence_timeout=150.0).session() as session:
                await session.subscribe(["AAPL"])
                assert await session.receive() == []  # one ping
                fake.stall()
                heard = trio.current_time()
                with pytest.raises(ProviderError) as info:
                    while True:
                        await session.receive()
                assert trio.current_time() - heard == pytest.approx(150.0, abs=EXACT)
        assert str(info.value) == "Finnhub sent nothing, not even a ping, for 150s"


async def test_silence_counts_only_while_something_is_subscribed(autojump_clock) -> None:
    with trio.fail_after(GUARD):
        async with FakeFinnhubServer.open(api_keys=[KEY], rate=0.0, ping_interval=60.0) as fake:
            fake.stall()
            async with provider_for(fake, silence_timeout=150.0).session() as session:
                failed_at: list[float] = []

                async def read() -> None:
                    try:
                        await session.receive()
                    except ProviderError:
                        failed_at.append(trio.current_time())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)  # waiting in receive() while nothing is subscribed
                    await trio.sleep(1000.0)  # virtual time (MockClock)
                    assert failed_at == []
                    subscribed_at = trio.current_time()
                    await session.subscribe(["AAPL"])  # re-arms the waiting receive()
        assert failed_at == [pytest.approx(subscribed_at + 150.0, abs=EXACT)]


# =========================================================================== the relay


def sections(fake: FakeFinnhubServer, key: str = KEY, **upstream: Any) -> dict[str, dict[str, Any]]:
    return {
        "upstream": {"provider": "finnhub", "unsubscribe_linger": 0.0, **upstream},
        "finnhub": {"api_key": key, "url": fake.url},
    }


def leaked(texts: list[str], secret: str) -> list[str]:
    return [t for t in texts if secret in t]


async def test_relay_connects_with_the_token_and_never_shows_it(start_relay, fake, http, all_logs):
    relay = await start_relay(**sections(fake))
    with trio.fail_after(10):
        await wait_state(relay, "connected")
        status = await http.get(api(relay, "/status"))
    assert fake.received_tokens == [KEY] and fake.connections_total == 1 and fake.rejected == 0
    assert status.json()["upstream"]["source"] == f"Finnhub at {fake.url}"
    assert relay.upstream.provider.detects_stale is False
    assert leaked([status.text, all_logs.text, *[r.getMessage() for r in all_logs.records]], KEY) == []


async def test_wrong_key_is_auth_failed_and_never_logged(start_relay, fake, http, all_logs):
    relay = await start_relay(**sections(fake, BAD_KEY))
    with trio.fail_after(10):
        await wait_state(relay, "auth_failed")
        health = await http.get(api(relay, "/health"))
        status = await http.get(api(relay, "/status"))
    assert fake.rejected == 1 and fake.received_tokens == [BAD_KEY] and fake.connections_total == 0
    assert health.status_code == 503 and health.json()["state"] == "auth_failed"
    assert "HTTP 401" in health.json()["reason"]
    assert status.json()["upstream"]["last_error"] == "Finnhub rejected the API key (HTTP 401 on the upgrade)"
    texts = [health.text, status.text, all_logs.text, *[r.getMessage() for r in all_logs.records]]
    assert leaked(texts, BAD_KEY) == []
    assert any("[AUTH]" in r.getMessage() and r.levelno == logging.ERROR for r in all_logs.records)


@pytest.mark.parametrize(
    "status, state, error",
    [
        (403, "auth_failed", "Finnhub rejected the API key (HTTP 403 on the upgrade)"),
        (429, "backoff", "Finnhub refused the connection: HTTP 429 (too many requests)"),
    ],
)
async def test_relay_state_for_each_refused_upgrade(start_relay, http, status, state, error):
    async with FakeFinnhubServer.open(api_keys=[KEY], reject_status=status) as fake:
        relay = await start_relay(**sections(fake, backoff_initial=5.0, backoff_max=5.0))
        with trio.fail_after(10):
            await wait_state(relay, state)
            body = (await http.get(api(relay, "/status"))).json()
    assert body["upstream"]["state"] == state and body["upstream"]["last_error"] == error
    assert fake.rejected == 1


async def test_upstream_subscriptions_follow_demand_in_finnhub_spelling(start_relay, fake, ws_connect):
    relay = await start_relay(**sections(fake))
    a = await ws_connect(relay)
    b = await ws_connect(relay)
    with trio.fail_after(10):
        await a.request({"action": "subscribe", "symbols": ["AAPL", "BTCUSD"]}, "subscribed")
        await fake.wait_until(lambda: fake.subscriptions == {"AAPL", "COINBASE:BTC-USD"})
        await b.request({"action": "subscribe", "symbols": ["BTCUSD", "EURUSD"]}, "subscribed")
        await fake.wait_until(lambda: fake.subscriptions == {"AAPL", "COINBASE:BTC-USD", "OANDA:EUR_USD"})
        # BTCUSD is still wanted by b: only AAPL goes.
        await a.request({"action": "unsubscribe", "symbols": ["AAPL", "BTCUSD"]}, "unsubscribed")
        await fake.wait_until(lambda: fake.subscriptions == {"COINBASE:BTC-USD", "OANDA:EUR_USD"})
        await b.ws.aclose()
        await fake.wait_until(lambda: fake.subscriptions == set())
    assert fake.history == [
        ("subscribe", "AAPL"),
        ("subscribe", "COINBASE:BTC-USD"),
        ("subscribe", "OANDA:EUR_USD"),
        ("unsubscribe", "AAPL"),
        ("unsubscribe", "COINBASE:BTC-USD"),
        ("unsubscribe", "OANDA:EUR_USD"),
    ]


async def test_batched_trades_reach_clients_normalised(start_relay, quiet_fake, ws_connect):
    relay = await start_relay(**sections(quiet_fake))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL", "BTCUSD", "EURUSD"]}, "subscribed")
        await quiet_fake.wait_until(lambda: len(quiet_fake.subscriptions) == 3)
        await quiet_fake.inject(
            trade_frame(
                [
                    ("AAPL", 189.45, T_MS, 100),
                    ("COINBASE:BTC-USD", 64000.5, T_MS + 1, 0.011467),
                    ("OANDA:EUR_USD", 1.08345, T_MS + 2, 0),
                ],
                ["1", "12"],
            )
        )
        got = [await client.recv() for _ in range(3)]
    assert [price(m) for m in got] == [
        {"symbol": "AAPL", "timestamp": T_MS, "data_type": "T", "last_price": 189.45, "last_size": 100},
        {"symbol": "BTCUSD", "timestamp": T_MS + 1, "data_type": "T", "last_price": 64000.5, "last_size": 0.011467},
        {"symbol": "EURUSD", "timestamp": T_MS + 2, "data_type": "T", "last_price": 1.08345, "last_size": None},
    ]
    assert all(m["type"] == "price_update" and m["bid_price"] is None and m["ask_price"] is None for m in got)


async def test_simulated_stream_frames_hold_several_symbols(start_relay, fake, ws_connect):
    relay = await start_relay(**sections(fake))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL", "ETHUSD", "GBPUSD"]}, "subscribed")
        seen: dict[str, dict[str, Any]] = {}
        while len(seen) < 3:
            msg = await client.recv()
            seen[msg["symbol"]] = msg
    assert fake.frames_sent < fake.trades_sent  # several trades per frame
    assert seen["GBPUSD"]["last_size"] is None  # OANDA sends prices, v=0
    assert seen["ETHUSD"]["last_size"] > 0 and seen["AAPL"]["data_type"] == "T"


async def test_config_symbols_map_both_ways_through_the_relay(start_relay, quiet_fake, ws_connect):
    cfg = sections(quiet_fake)
    cfg["finnhub"]["symbols"] = {"BTCUSD": "BINANCE:BTCUSDT"}
    relay = await start_relay(**cfg)
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["BTCUSD"]}, "subscribed")
        await quiet_fake.wait_until(lambda: quiet_fake.subscriptions == {"BINANCE:BTCUSDT"})
        await quiet_fake.inject(
            trade_frame([("COINBASE:BTC-USD", 1.0, T_MS, 1), ("BINANCE:BTCUSDT", 64000.5, T_MS, 2)])
        )
        msg = await client.recv()
    assert price(msg) == {
        "symbol": "BTCUSD",
        "timestamp": T_MS,
        "data_type": "T",
        "last_price": 64000.5,
        "last_size": 2,
    }
    assert relay.hub.stats.malformed == 0


async def test_triplicated_trades_reach_clients_once(start_relay, quiet_fake, ws_connect):
    relay = await start_relay(**sections(quiet_fake))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await quiet_fake.wait_until(lambda: quiet_fake.subscriptions == {"AAPL"})
        frame = trade_frame([("AAPL", 189.45, T_MS, 100)])
        for _ in range(3):
            await quiet_fake.inject(frame)
        await quiet_fake.inject(trade_frame([("AAPL", 189.46, T_MS + 1, 100)]))
        first = await client.recv()
        second = await client.recv()
    assert (first["last_price"], second["last_price"]) == (189.45, 189.46)
    assert second["seq"] == first["seq"] + 1  # nothing in between: the repeats never reached the hub


async def test_drop_reconnects_and_resubscribes_in_finnhub_spelling(start_relay, fake, ws_connect, http):
    relay = await start_relay(**sections(fake, backoff_initial=0.05, backoff_max=0.2, pinned=["EURUSD"]))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["BTCUSD"]}, "subscribed")
        before, _ = await client.recv_until(lambda m: m.get("symbol") == "BTCUSD")
        await fake.wait_until(lambda: fake.subscriptions == {"COINBASE:BTC-USD", "OANDA:EUR_USD"})
        assert await fake.drop_all() == 1
        await fake.wait_until(
            lambda: fake.connections_total == 2 and fake.subscriptions == {"COINBASE:BTC-USD", "OANDA:EUR_USD"}
        )
        after, _ = await client.recv_until(lambda m: m.get("symbol") == "BTCUSD" and m["seq"] > before["seq"] + 5)
        status = (await http.get(api(relay, "/status"))).json()
    assert status["upstream"]["reconnects"] == 1 and status["upstream"]["state"] == "connected"
    assert fake.received_tokens == [KEY, KEY]


async def test_second_connection_with_the_key_drops_both_and_the_relay_recovers(start_relay, fake, ws_connect):
    relay = await start_relay(**sections(fake, backoff_initial=0.05, backoff_max=0.2))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await fake.wait_until(lambda: fake.subscriptions == {"AAPL"})
        async with WsClient.open(f"{fake.url}?token={KEY}", connect_timeout=5):  # someone else, same key
            await fake.wait_until(lambda: fake.kicked == 2)
        await fake.wait_until(lambda: fake.connections_total == 3 and fake.subscriptions == {"AAPL"})
        await wait_state(relay, "connected")
        # Data flows again: a trade streamed on the new connection reaches the client.
        sent = fake.trades_sent
        await fake.wait_until(lambda: fake.trades_sent > sent)
        _s, p, t, _v = fake.last_trade["AAPL"]
        await client.recv_until(lambda m: m.get("symbol") == "AAPL" and (m["timestamp"], m["last_price"]) == (t, p))
    assert relay.upstream.reconnects == 1 and relay.upstream.state == "connected"


async def test_finnhub_error_frames_keep_the_session(start_relay, ws_connect, all_logs):
    async with FakeFinnhubServer.open(api_keys=[KEY], rate=50.0, invalid={"NOPE"}, max_symbols=2) as fake:
        relay = await start_relay(**sections(fake))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["AAPL", "NOPE", "MSFT", "TSLA"]}, "subscribed")
            await fake.wait_until(lambda: len(fake.errors_sent) == 2)
            await fake.inject('{"type":"error","msg":"Unexpected maintenance"}')
            while not any("maintenance" in r.getMessage() for r in all_logs.records):
                await client.recv()
            first, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
            await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > first["seq"])
    assert fake.errors_sent == ["Invalid symbol NOPE", "Subscribing to too many symbols"]
    assert fake.connections_total == 1 and relay.upstream.reconnects == 0
    logged = [(r.levelno, r.getMessage()) for r in all_logs.records if r.name == "trio_relay.providers.finnhub"]
    assert (logging.WARNING, "[SUBSCRIBE] Finnhub says invalid symbol NOPE; it gets no data") in logged
    assert (logging.WARNING, "[PROVIDER] Finnhub error: Unexpected maintenance") in logged
    errors = [m for level, m in logged if level == logging.ERROR]
    # AAPL and MSFT taken, NOPE refused as invalid, TSLA over the limit: 3 asked for.
    assert errors == [
        "[SUBSCRIBE] Finnhub refused a subscription: too many symbols (3 asked for on this connection; "
        "the plan's limit is lower, so some symbols get no data)"
    ]


async def test_malformed_frames_are_counted_and_the_feed_goes_on(start_relay, fake, ws_connect, http):
    relay = await start_relay(**sections(fake))
    client = await ws_connect(relay)
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await fake.wait_until(lambda: "AAPL" in fake.subscriptions)
        fake.send_malformed(len(MALFORMED_FRAMES))
        first, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL")
        while relay.hub.stats.malformed < len(MALFORMED_FRAMES):
            await client.recv()
        later, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m["seq"] > first["seq"])
        status = (await http.get(api(relay, "/status"))).json()
    assert status["messages"]["malformed"] == len(MALFORMED_FRAMES) == 8
    assert status["upstream"]["reconnects"] == 0 and fake.connections_total == 1


async def test_invalid_and_over_the_limit_symbols_are_refused_to_their_clients(start_relay, ws_connect, http):
    """Invalid symbol X names X; "too many symbols" names none: the newest subscription is the one refused."""
    async with FakeFinnhubServer.open(api_keys=[KEY], rate=50.0, invalid={"NOPE"}, max_symbols=2) as fake:
        relay = await start_relay(**sections(fake))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["AAPL", "NOPE", "MSFT", "TSLA"]}, "subscribed")
            refusals: dict[str, str] = {}
            while len(refusals) < 2:
                msg, _ = await client.recv_until(lambda m: m.get("type") == "status" and m.get("state") == "refused")
                refusals.update((s, msg["reason"]) for s in msg["symbols"])
            health = await http.get(api(relay, "/health"))
            await client.recv_until(lambda m: m.get("symbol") == "MSFT")
        assert relay.upstream.subscribed == {"AAPL", "MSFT"} and fake.subscriptions == {"AAPL", "MSFT"}
    assert refusals == {
        "NOPE": "Finnhub: Invalid symbol NOPE",
        "TSLA": "Finnhub: subscribing to too many symbols (the plan's limit)",
    }
    assert health.status_code == 200 and health.json()["refused"] == ["NOPE", "TSLA"]


async def test_whole_share_sizes_stay_integers(start_relay, ws_connect):
    async with FakeFinnhubServer.open(api_keys=[KEY], rate=50.0) as fake:
        relay = await start_relay(**sections(fake))
        client = await ws_connect(relay)
        with trio.fail_after(10):
            await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
            msg, _ = await client.recv_until(lambda m: m.get("symbol") == "AAPL" and m.get("last_size"))
    assert type(msg["last_size"]) is int  # JSON 100, not 100.0: decoded as an int
