"""trio_relay: one upstream market-data WebSocket, cached and fanned out to many clients.

The names below load on first use, so ``import trio_relay.client`` (or ``trio-relay watch``)
does not pay for the daemon's imports (Quart, PyJWT...).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config, ConfigError, load_config
    from .daemon import Relay, run_relay
    from .model import PriceState, Update

__all__ = ["Config", "ConfigError", "load_config", "Relay", "run_relay", "PriceState", "Update"]
try:
    __version__ = version("trio-relay")  # one source: pyproject.toml's [project] version
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_WHERE = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "Relay": "daemon",
    "run_relay": "daemon",
    "PriceState": "model",
    "Update": "model",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'trio_relay' has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
