"""Providers built from the configuration: the one place that maps a provider name to its class.

Each provider module is imported only when it is used, so a relay on the simulator never loads
the network providers' code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .base import Provider

__all__ = ["make_provider", "make_providers"]


def make_provider(config: Config, name: str | None = None) -> Provider:
    """The provider ``name`` (default: the first of the config's chain) built from its section."""
    name = name or config.provider
    timeout = config.upstream.connect_timeout
    if name == "sim":
        from .sim import SimProvider

        return SimProvider(config.sim)
    if name == "fmp":
        from .fmp import FmpProvider

        return FmpProvider(config.fmp, connect_timeout=timeout)
    if name == "finnhub":
        from .finnhub import FinnhubProvider

        return FinnhubProvider(config.finnhub, connect_timeout=timeout)
    if name == "alpaca":
        from .alpaca import AlpacaProvider

        return AlpacaProvider(config.alpaca, connect_timeout=timeout)
    if name == "polygon":
        from .polygon import PolygonProvider

        return PolygonProvider(config.polygon, connect_timeout=timeout)
    if name == "relay":
        from .relay import RelayProvider

        return RelayProvider(config.relay.url, connect_timeout=timeout)
    if name == "replay":
        from .replay import ReplayProvider

        return ReplayProvider(config.replay)
    raise ValueError(f"unknown provider {name!r}")


def make_providers(config: Config) -> list[Provider]:
    """The failover chain, in priority order (one provider without failover)."""
    return [make_provider(config, name) for name in config.provider_chain]
