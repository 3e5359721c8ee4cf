"""HTTP and WebSocket front: translates requests to hub calls. No business rules live here."""

from .app import RelayContext, create_app
from .ws import WS_PATH

__all__ = ["RelayContext", "create_app", "WS_PATH"]
