"""Every provider the relay knows, in one list: add a provider here and nowhere else.

Each entry (a :class:`~trio_relay.providers.base.ProviderEntry`, the ``ENTRY`` of its module)
says the provider's name, its settings section, how to build it and which secrets it needs. The
configuration reads its sections and credentials from here, the command line its choices, the
daemon and the recorder build providers through :func:`make_provider`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from . import alpaca, finnhub, fmp, polygon, relay, replay, sim
from .base import Provider, ProviderEntry

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["ENTRIES", "entry", "names", "default_settings", "make_provider", "make_providers"]

#: name -> entry, in the order they are documented. Read-only: nothing registers at run time.
ENTRIES: Mapping[str, ProviderEntry] = MappingProxyType(
    {e.name: e for e in (sim.ENTRY, fmp.ENTRY, finnhub.ENTRY, alpaca.ENTRY, polygon.ENTRY, relay.ENTRY, replay.ENTRY)}
)
_ALIASES: Mapping[str, str] = MappingProxyType({alias: e.name for e in ENTRIES.values() for alias in e.aliases})


def entry(name: str) -> ProviderEntry | None:
    """The entry of ``name`` or of one of its aliases (``massive`` → polygon); None if unknown."""
    return ENTRIES.get(_ALIASES.get(name, name))


def names(*, aliases: bool = False) -> list[str]:
    """Every provider name (and, with ``aliases``, every other name they answer to)."""
    return [*ENTRIES, *(_ALIASES if aliases else ())]


def default_settings() -> dict[str, Any]:
    """Each provider's section with its defaults (no key set anywhere)."""
    return {name: e.settings() for name, e in ENTRIES.items()}


def make_provider(config: Config, name: str | None = None) -> Provider:
    """The provider ``name`` (default: the first of the config's chain) built from its section."""
    found = entry(name or config.provider)
    if found is None:
        raise ValueError(f"unknown provider {name!r}")
    return found.build(config.providers[found.name], config.upstream)


def make_providers(config: Config) -> list[Provider]:
    """The failover chain, in priority order (one provider without failover)."""
    return [make_provider(config, name) for name in config.provider_chain]
