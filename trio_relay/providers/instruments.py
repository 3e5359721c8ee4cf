"""What the simulated market knows about a symbol: its asset class, a reference level, its tick.

The levels are round figures near where these instruments traded in late 2025, so that a person
who knows prices does not blink at AAPL, MSFT, NVDA, BTCUSD, EURUSD or ^GSPC. A symbol not in the
tables still gets a plausible profile: ``^XYZ`` is an index in the thousands, a pair of ISO
currencies (``EURSEK``, ``GBP/JPY``, ``USDMXN=X``) is a forex cross computed from the USD values
below, a known coin against USD/USDT/USDC/EUR is crypto, and anything else is a stock whose level
is derived from its name alone (the same on every run, between 8 and 400).

Pure data and pure functions: no clock, no randomness of its own (a symbol's profile never
depends on the simulator's seed).
"""

from __future__ import annotations

import enum
import hashlib
import math
from typing import Final

import attrs

__all__ = ["AssetClass", "Instrument", "instrument"]


class AssetClass(enum.StrEnum):
    EQUITY = "equity"
    INDEX = "index"  # a computed level: trades (values) only, no bid/ask, no size
    CRYPTO = "crypto"
    FOREX = "forex"


@attrs.frozen
class Instrument:
    asset: AssetClass
    level: float  # a reference close
    tick: float  # the smallest price increment
    daily_vol: float  # standard deviation of one day's log return


# Stocks and ETFs: reference close, daily volatility.
_EQUITIES: Final[dict[str, tuple[float, float]]] = {
    "AAPL": (278.0, 0.015),
    "MSFT": (485.0, 0.014),
    "NVDA": (182.0, 0.028),
    "GOOGL": (318.0, 0.018),
    "GOOG": (319.0, 0.018),
    "AMZN": (229.0, 0.018),
    "META": (645.0, 0.022),
    "TSLA": (438.0, 0.035),
    "BRK.B": (502.0, 0.009),
    "BRK-B": (502.0, 0.009),
    "JPM": (312.0, 0.013),
    "V": (331.0, 0.011),
    "MA": (552.0, 0.012),
    "AVGO": (385.0, 0.03),
    "AMD": (215.0, 0.032),
    "NFLX": (94.0, 0.022),
    "ORCL": (198.0, 0.03),
    "INTC": (40.5, 0.03),
    "IBM": (305.0, 0.014),
    "CSCO": (78.0, 0.012),
    "CRM": (245.0, 0.02),
    "ADBE": (345.0, 0.02),
    "COST": (905.0, 0.011),
    "WMT": (112.0, 0.011),
    "HD": (352.0, 0.013),
    "KO": (70.5, 0.008),
    "PEP": (148.0, 0.01),
    "PG": (149.0, 0.009),
    "JNJ": (206.0, 0.009),
    "UNH": (330.0, 0.02),
    "XOM": (118.0, 0.013),
    "DIS": (112.0, 0.014),
    "BA": (205.0, 0.02),
    "PLTR": (181.0, 0.04),
    "COIN": (265.0, 0.045),
    "UBER": (86.0, 0.022),
    "PYPL": (61.5, 0.02),
    "SPY": (683.0, 0.009),
    "QQQ": (615.0, 0.012),
    "IWM": (251.0, 0.013),
    "DIA": (476.0, 0.008),
}

_INDICES: Final[dict[str, tuple[float, float]]] = {
    "^GSPC": (6_840.0, 0.009),
    "^DJI": (47_700.0, 0.008),
    "^IXIC": (23_250.0, 0.012),
    "^NDX": (25_500.0, 0.012),
    "^RUT": (2_510.0, 0.013),
    "^VIX": (16.8, 0.06),
    "^FTSE": (9_720.0, 0.007),
    "^GDAXI": (24_050.0, 0.009),
    "^N225": (50_400.0, 0.012),
    "^STOXX50E": (5_720.0, 0.009),
}

# What one unit is worth in USD: the forex crosses are computed from these.
_USD_VALUE: Final[dict[str, float]] = {
    "USD": 1.0,
    "EUR": 1.1650,
    "GBP": 1.3320,
    "JPY": 1 / 155.40,
    "CHF": 1 / 0.8030,
    "AUD": 0.6620,
    "NZD": 0.5760,
    "CAD": 1 / 1.3820,
    "SEK": 1 / 9.3200,
    "NOK": 1 / 10.120,
    "DKK": 1 / 6.4100,
    "MXN": 1 / 18.250,
    "CNH": 1 / 7.0700,
    "HKD": 1 / 7.7800,
    "SGD": 1 / 1.2950,
    "ZAR": 1 / 17.150,
    "TRY": 1 / 42.50,
    "PLN": 1 / 3.6600,
}

_COINS: Final[dict[str, float]] = {
    "BTC": 92_400.0,
    "ETH": 3_120.0,
    "SOL": 138.0,
    "XRP": 2.08,
    "BNB": 885.0,
    "DOGE": 0.1480,
    "ADA": 0.4210,
    "LTC": 82.5,
    "AVAX": 13.9,
    "DOT": 2.21,
    "LINK": 13.8,
}
_COIN_QUOTES: Final = {"USD": 1.0, "USDT": 1.0, "USDC": 1.0, "EUR": _USD_VALUE["EUR"]}


def _crypto(symbol: str) -> Instrument | None:
    for quote, usd in _COIN_QUOTES.items():
        base = symbol.removesuffix(quote)
        if base != symbol and base in _COINS:
            level = _COINS[base] / usd
            # Exchanges quote big coins in cents and small ones to four significant figures.
            tick = min(0.01, 10.0 ** (math.floor(math.log10(level)) - 4))
            return Instrument(AssetClass.CRYPTO, level, tick, 0.03 if base in ("BTC", "ETH") else 0.045)
    return None


def _forex(symbol: str) -> Instrument | None:
    base, quote = symbol[:3], symbol[3:]
    if len(symbol) != 6 or base not in _USD_VALUE or quote not in _USD_VALUE or base == quote:
        return None
    level = _USD_VALUE[base] / _USD_VALUE[quote]
    # Five decimals (a tenth of a pip), three for a yen or another big-number quote currency.
    tick = 0.001 if level >= 20 else 0.00001
    return Instrument(AssetClass.FOREX, level, tick, 0.005)


def _hashed(symbol: str, lo: float, hi: float) -> float:
    """A level between lo and hi (log-uniform) that depends on the symbol's name only."""
    digest = hashlib.sha256(symbol.encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))), 2)


def instrument(symbol: str) -> Instrument:
    """The simulated market's profile of ``symbol`` (an upper-case relay symbol)."""
    if symbol in _EQUITIES:
        level, vol = _EQUITIES[symbol]
        return Instrument(AssetClass.EQUITY, level, 0.01, vol)
    if symbol.startswith("^"):
        level, vol = _INDICES.get(symbol) or (_hashed(symbol, 1_000, 20_000), 0.01)
        return Instrument(AssetClass.INDEX, level, 0.01, vol)
    # BTC/USD, BTC-USD, EUR/USD and Yahoo's EURUSD=X name the same instruments as BTCUSD, EURUSD.
    plain = symbol.removesuffix("=X").replace("/", "").replace("-", "")
    found = _crypto(plain) or _forex(plain)
    if found is not None:
        return found
    level = _hashed(symbol, 8, 400)
    return Instrument(AssetClass.EQUITY, level, 0.01, 0.02)
