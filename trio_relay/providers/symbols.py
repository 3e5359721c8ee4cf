"""Client-facing symbols ↔ each provider's own symbols: by rule for pairs, tables for exceptions.

Clients always use one spelling, whichever provider serves it:
- stocks and ETFs as the exchange ticker, upper-case (``AAPL``, ``BRK.B``);
- crypto pairs as BASE+QUOTE with no separator (``BTCUSD``, ``ETHUSD``), as FMP spells them;
- forex pairs the same way (``EURUSD``, ``USDJPY``).

Each provider spells crypto and forex differently (Finnhub ``COINBASE:BTC-USD`` and
``OANDA:EUR_USD``, Alpaca ``BTC/USD``, Polygon/Massive ``BTC-USD`` and ``EUR/USD``, FMP
``btcusd``). The pairs known here are listed in :data:`CRYPTO_PAIRS` and :data:`FOREX_PAIRS`; a
deployment adds or overrides entries per provider with its config section's ``symbols`` table
(client symbol = provider symbol).

A connection that serves only pairs (Alpaca's crypto feed, Polygon's crypto and forex clusters)
also maps by rule (:class:`PairRule`): ``BATUSD`` is ``BAT`` + ``USD`` when ``USD`` is one of the
quote currencies that vendor lists, the longest one first (``ETHUSDT`` is ETH/USDT, not
ETHUSD + T). Tables win over the rule: they hold the exceptions. A mixed socket (Finnhub, whose
stock tickers could end in USD too) keeps tables only. A symbol with no spelling is NOT sent: the
adapter logs it once and reports it refused to its clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

__all__ = ["CRYPTO_PAIRS", "FOREX_PAIRS", "FOREX_CURRENCIES", "SymbolMap", "PairRule"]

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

#: ISO 4217 codes a forex pair's two sides are taken from (the majors and the usual crosses).
FOREX_CURRENCIES: tuple[str, ...] = (
    "USD", "EUR", "JPY", "GBP", "CHF", "CAD", "AUD", "NZD", "CNH", "CNY", "HKD", "SGD", "SEK", "NOK", "DKK",
    "MXN", "ZAR", "TRY", "PLN", "CZK", "HUF", "ILS", "INR", "KRW", "BRL", "RUB", "THB", "TWD", "XAU", "XAG",
)  # fmt: skip

Format = Callable[[str, str], str]


class PairRule:
    """Pairs by rule: client ``BASEQUOTE`` ↔ the vendor's ``BASE{separator}QUOTE``.

    ``quotes`` are the quote currencies the vendor lists; ``bases`` (optional) restricts the base
    side too (forex: both sides are currencies). A base is 2-10 letters or digits. ``excluded``
    client symbols are never pairs of this rule (a crypto rule excludes the forex pairs: EURUSD
    is no coin).
    """

    def __init__(
        self,
        separator: str,
        quotes: tuple[str, ...],
        bases: tuple[str, ...] | None = None,
        excluded: Iterable[str] = (),
    ) -> None:
        self.separator = separator
        self._excluded = frozenset(excluded)
        self._quotes = tuple(sorted(quotes, key=len, reverse=True))  # longest first: USDT before USD
        self._quote_set = frozenset(quotes)
        self._bases = frozenset(bases) if bases is not None else None

    def _base_ok(self, base: str) -> bool:
        if self._bases is not None:
            return base in self._bases
        return 2 <= len(base) <= 10 and base.isalnum()

    def split(self, symbol: str) -> tuple[str, str] | None:
        """``BATUSD`` → ("BAT", "USD"); None when it is no pair of this rule."""
        if symbol in self._excluded:
            return None
        for quote in self._quotes:
            if symbol.endswith(quote):
                base = symbol[: -len(quote)]
                if self._base_ok(base):
                    return base, quote
        return None

    def to_native(self, symbol: str) -> str | None:
        pair = self.split(symbol)
        return None if pair is None else f"{pair[0]}{self.separator}{pair[1]}"

    def to_client(self, native: str) -> str | None:
        base, sep, quote = native.upper().partition(self.separator)
        if not sep or quote not in self._quote_set or not self._base_ok(base) or base + quote in self._excluded:
            return None
        return base + quote


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
        rule: PairRule | None = None,
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
        self._rule = rule
        # A pair symbol this map does not serve must not pass as a stock ticker.
        self._pairs = set(CRYPTO_PAIRS) | set(FOREX_PAIRS)

    def to_native(self, symbol: str) -> str | None:
        """The provider's symbol for a client symbol, or None when this provider has none."""
        native = self._to_native.get(symbol)
        if native is not None:
            return native
        if self._rule is not None:
            return self._rule.to_native(symbol)
        if self._identity and symbol not in self._pairs:
            return symbol
        return None

    def to_client(self, native: str) -> str | None:
        """The client symbol for a symbol in a provider's frame, or None when it is not ours."""
        found = self._from_native.get(self._case(native))
        if found is not None:
            return found
        if self._rule is not None:
            return self._rule.to_client(native)
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
