"""trio_relay: one upstream market-data WebSocket, cached and fanned out to many clients."""

from .config import Config, ConfigError, load_config
from .daemon import Relay, run_relay
from .model import PriceState, Update

__all__ = ["Config", "ConfigError", "load_config", "Relay", "run_relay", "PriceState", "Update"]
__version__ = "0.1.0"
