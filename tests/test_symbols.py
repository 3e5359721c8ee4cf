"""Client symbols ↔ provider symbols: explicit tables, both ways, and what is refused."""

from __future__ import annotations

from trio_relay.providers.symbols import CRYPTO_PAIRS, FOREX_PAIRS, SymbolMap


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
