"""Client-facing symbols ↔ each provider's own symbols, by explicit tables (never by guessing).

Clients always use one spelling, whichever provider serves it:
- stocks and ETFs as the exchange ticker, upper-case (``AAPL``, ``BRK.B``);
- crypto pairs as BASE+QUOTE with no separator (``BTCUSD``, ``ETHUSD``), as FMP spells them;
- forex pairs the same way (``EURUSD``, ``USDJPY``).

Each provider spells crypto and forex differently (Finnhub ``COINBASE:BTC-USD`` and
``OANDA:EUR_USD``, Alpaca ``BTC/USD``, Polygon/Massive ``BTC-USD`` and ``EUR/USD``, FMP
``btcusd``). The pairs known here are listed in :data:`CRYPTO_PAIRS` and :data:`FOREX_PAIRS`; a
deployment adds or overrides entries per provider with its config section's ``symbols`` table
(client symbol = provider symbol). A crypto or forex symbol that is in no table is NOT sent to a
provider that needs a mapping for it: the adapter logs it once and the symbol gets no data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

__all__ = ["CRYPTO_PAIRS", "FOREX_PAIRS", "SymbolMap"]

# Client symbol → (base, quote).
CRYPTO_PAIRS: dict[str, tuple[str, str]] = {
    f"{base}{quote}": (base, quote)
    for quote in ("USD",)
    for base in (
        "BTC",
        "ETH",
        "SOL",
        "XRP",
        "DOGE",
        "ADA",
        "AVAX",
        "LINK",
        "DOT",
        "LTC",
        "BCH",
        "UNI",
        "AAVE",
        "XLM",
        "ATOM",
        "ALGO",
        "SHIB",
        "PEPE",
        "USDT",
        "USDC",
    )  # fmt: skip
} | {"ETHBTC": ("ETH", "BTC"), "BTCUSDT": ("BTC", "USDT"), "ETHUSDT": ("ETH", "USDT")}

FOREX_PAIRS: dict[str, tuple[str, str]] = {
    f"{base}{quote}": (base, quote)
    for base, quote in (
        ("EUR", "USD"),
        ("GBP", "USD"),
        ("USD", "JPY"),
        ("USD", "CHF"),
        ("AUD", "USD"),
        ("USD", "CAD"),
        ("NZD", "USD"),
        ("EUR", "GBP"),
        ("EUR", "JPY"),
        ("GBP", "JPY"),
        ("EUR", "CHF"),
        ("USD", "CNH"),
        ("USD", "MXN"),
        ("USD", "SEK"),
        ("USD", "NOK"),
        ("USD", "HKD"),
        ("USD", "SGD"),
        ("USD", "ZAR"),
        ("USD", "TRY"),
        ("XAU", "USD"),
    )  # fmt: skip
}

Format = Callable[[str, str], str]


class SymbolMap:
    """Two dictionaries built once: client symbol → provider symbol, and back.

    ``stocks`` says how symbols in no table are treated: ``"identity"`` passes them through
    unchanged (stock tickers are the same everywhere), ``None`` refuses them (a crypto-only or
    forex-only connection).
    """

    def __init__(
        self,
        *,
        crypto: Format | None = None,
        forex: Format | None = None,
        extra: Mapping[str, str] | None = None,
        stocks: str | None = "identity",
        native_case: Callable[[str], str] = str.upper,
    ) -> None:
        self._to_native: dict[str, str] = {}
        if crypto is not None:
            self._to_native.update((sym, crypto(b, q)) for sym, (b, q) in CRYPTO_PAIRS.items())
        if forex is not None:
            self._to_native.update((sym, forex(b, q)) for sym, (b, q) in FOREX_PAIRS.items())
        self._to_native.update((k.upper(), v) for k, v in (extra or {}).items())
        self._case = native_case
        self._from_native = {native_case(v): k for k, v in self._to_native.items()}
        self._identity = stocks == "identity"
        # A pair symbol this map does not serve must not pass as a stock ticker.
        self._pairs = set(CRYPTO_PAIRS) | set(FOREX_PAIRS)

    def to_native(self, symbol: str) -> str | None:
        """The provider's symbol for a client symbol, or None when this provider has none."""
        native = self._to_native.get(symbol)
        if native is not None:
            return native
        if self._identity and symbol not in self._pairs:
            return symbol
        return None

    def to_client(self, native: str) -> str | None:
        """The client symbol for a symbol in a provider's frame, or None when it is not ours."""
        found = self._from_native.get(self._case(native))
        if found is not None:
            return found
        if self._identity:
            return native.upper()
        return None

    def split(self, symbols: Iterable[str]) -> tuple[list[str], list[str]]:
        """(provider symbols for those that map, client symbols that do not)."""
        mapped: list[str] = []
        missing: list[str] = []
        for sym in symbols:
            native = self.to_native(sym)
            if native is None:
                missing.append(sym)
            else:
                mapped.append(native)
        return mapped, missing
