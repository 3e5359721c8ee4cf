"""Client symbols ↔ provider symbols: explicit tables, both ways, and what is refused."""

from __future__ import annotations

import pytest

from trio_relay.config import load_config
from trio_relay.providers.alpaca import AlpacaConfig, AlpacaProvider
from trio_relay.providers.polygon import PolygonConfig, polygon_symbols
from trio_relay.providers.symbols import CRYPTO_PAIRS, FOREX_PAIRS, SymbolMap
from trio_relay.settings import ConfigError


def finnhub_like() -> SymbolMap:
    return SymbolMap(
        crypto=lambda b, q: f"COINBASE:{b}-{q}",
        forex=lambda b, q: f"OANDA:{b}_{q}",
        extra={"btcusdt": "BINANCE:BTCUSDT", "ETHUSD": "KRAKEN:ETHUSD"},
    )


def test_tables_map_both_ways() -> None:
    m = finnhub_like()
    assert m.to_native("BTCUSD") == "COINBASE:BTC-USD"
    assert m.to_native("EURUSD") == "OANDA:EUR_USD"
    assert m.to_client("COINBASE:BTC-USD") == "BTCUSD"
    assert m.to_client("OANDA:EUR_USD") == "EURUSD"
    # Extra entries override the built-in table, and map back.
    assert m.to_native("ETHUSD") == "KRAKEN:ETHUSD" and m.to_client("KRAKEN:ETHUSD") == "ETHUSD"
    assert m.to_native("BTCUSDT") == "BINANCE:BTCUSDT" and m.to_client("BINANCE:BTCUSDT") == "BTCUSDT"


def test_stocks_pass_through_unchanged() -> None:
    m = finnhub_like()
    assert m.to_native("AAPL") == "AAPL" and m.to_native("BRK.B") == "BRK.B"
    assert m.to_client("AAPL") == "AAPL" and m.to_client("msft") == "MSFT"


def test_a_pair_this_provider_has_no_spelling_for_is_refused_not_guessed() -> None:
    crypto_only = SymbolMap(crypto=lambda b, q: f"{b}/{q}")  # e.g. Alpaca: no forex
    assert crypto_only.to_native("EURUSD") is None  # a known forex pair must not pass as a stock
    assert crypto_only.to_native("BTCUSD") == "BTC/USD"
    assert crypto_only.split(["BTCUSD", "EURUSD", "AAPL"]) == (["BTC/USD", "AAPL"], ["EURUSD"])


def test_a_crypto_only_connection_refuses_stocks() -> None:
    m = SymbolMap(crypto=lambda b, q: f"{b}-{q}", stocks=None)
    assert m.to_native("AAPL") is None and m.to_client("AAPL") is None
    assert m.to_native("ETHBTC") == "ETH-BTC" and m.to_client("ETH-BTC") == "ETHBTC"


def test_case_of_native_symbols_is_folded_when_reading_frames() -> None:
    m = SymbolMap(crypto=lambda b, q: f"{b}-{q}", native_case=str.upper)
    assert m.to_client("btc-usd") == "BTCUSD"


def test_every_table_entry_round_trips() -> None:
    m = finnhub_like()
    for symbol in [*CRYPTO_PAIRS, *FOREX_PAIRS]:
        native = m.to_native(symbol)
        assert native is not None and m.to_client(native) == symbol


# --------------------------------------------------------------------------- pairs by rule


@pytest.mark.parametrize(
    ("client", "native"),
    [
        ("BATUSD", "BAT/USD"),  # a documented pair in no table
        ("ETHUSDT", "ETH/USDT"),  # the longest quote first, not ETHUSD + T
        ("UNIBTC", "UNI/BTC"),
        ("AAVEUSDC", "AAVE/USDC"),
        ("ETHBTC", "ETH/BTC"),  # the table and the rule agree
    ],
)
def test_alpaca_crypto_pairs_by_rule(client: str, native: str) -> None:
    symbols = AlpacaProvider(AlpacaConfig(feed="crypto")).symbols
    assert symbols.to_native(client) == native
    assert symbols.to_client(native) == client


def test_rules_refuse_what_is_no_pair_and_tables_win() -> None:
    symbols = AlpacaProvider(AlpacaConfig(feed="crypto", symbols={"XBTUSD": "BTC/USD"})).symbols
    assert symbols.to_native("AAPL") is None  # a stock on the crypto feed
    assert symbols.to_native("BTCEUR") is None  # EUR is no Alpaca quote currency
    assert symbols.to_native("XBTUSD") == "BTC/USD"  # the exception table wins
    assert symbols.to_client("BTC/EUR") is None and symbols.to_client("AAPL") is None
    assert symbols.to_native("EURUSD") is None  # a forex pair is no coin


def test_polygon_pairs_forex_and_indices_by_rule() -> None:
    crypto = polygon_symbols("crypto")
    assert crypto.to_native("SOLEUR") == "SOL-EUR" and crypto.to_client("SOL-EUR") == "SOLEUR"
    forex = polygon_symbols("forex")
    assert forex.to_native("EURSEK") == "EUR/SEK" and forex.to_client("EUR/SEK") == "EURSEK"
    assert forex.to_native("BTCUSD") is None  # BTC is no currency of the forex rule
    indices = polygon_symbols("indices")
    assert indices.to_native("^SPX") == "I:SPX" and indices.to_client("I:NDX") == "^NDX"
    assert indices.to_native("AAPL") is None


def test_polygon_clusters_and_delayed_hosts_as_the_vendor_lists_them() -> None:
    assert PolygonConfig(market="indices", delayed=True).resolved_url == "wss://delayed.massive.com/indices"
    assert PolygonConfig(cluster="business").resolved_url == "wss://business.massive.com/stocks"
    assert PolygonConfig(cluster="launchpad", market="crypto").resolved_url == "wss://launchpad.massive.com/crypto"
    with pytest.raises(ConfigError, match="unknown Polygon/Massive cluster 'nowhere'"):
        PolygonConfig(cluster="nowhere")
    with pytest.raises(ConfigError, match="crypto in real time only"):
        load_config(environ={}, overrides={"upstream": {"provider": "polygon"},
                    "polygon": {"api_key": "k", "market": "crypto", "delayed": True}}, dotenv=None)  # fmt: skip
