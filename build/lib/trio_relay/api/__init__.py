"""HTTP and WebSocket front: translates requests to hub calls. No business rules live here."""

from .app import FrontDoor, RelayContext
from .ws import WS_PATH

__all__ = ["RelayContext", "FrontDoor", "WS_PATH"]
