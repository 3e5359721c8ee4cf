"""One connected WebSocket client, as the hub sees it, and the close codes the hub uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from ..model import CloseCode
from .outbox import Outbox

if TYPE_CHECKING:
    from ..entitlements import Entitlement
    from .delivery import DeliveryOptions

__all__ = ["Client", "CLOSE_GOING_AWAY", "CLOSE_POLICY", "CLOSE_SLOW_CONSUMER", "CLOSE_TOKEN_EXPIRED", "CLOSE_GRACE"]

# The close codes the hub uses (all of them are model.CloseCode; these names are kept for callers).
CLOSE_GOING_AWAY = CloseCode.GOING_AWAY
CLOSE_POLICY = CloseCode.POLICY
CLOSE_SLOW_CONSUMER = CloseCode.SLOW_CONSUMER
CLOSE_TOKEN_EXPIRED = CloseCode.TOKEN_EXPIRED

# Seconds a write in progress may still take once its client is being closed.
CLOSE_GRACE = 1.0


@attrs.define(eq=False)
class Client:
    """One connected WebSocket client, as the hub sees it."""

    id: int
    outbox: Outbox
    remote: str = ""
    symbols: set[str] = attrs.Factory(set)
    connected_at: float = 0.0
    close_code: int | None = None
    close_reason: str = ""
    # Symbols delivered with options (a rate cap, fields, deltas); the others get the shared frame.
    options: dict[str, DeliveryOptions] = attrs.Factory(dict)
    bars: set[tuple[str, str]] = attrs.Factory(set)  # (symbol, interval) of the bars channel
    user: str = ""  # the token's subject (auth on)
    max_symbols: int | None = None  # the token's own cap, below the relay's
    # What this connection's token may see (set once authenticated; None: not yet). Fired alerts
    # and portfolio valuations reaching this client go through it.
    entitlement: Entitlement | None = None
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    @property
    def batch(self) -> bool:
        """True when this client gets batched frames (JSON arrays); its outbox holds the mode."""
        return self.outbox.batch

    def close(self, code: int, reason: str) -> None:
        """Ask the client's handler to close the socket with ``code``; idempotent.

        The handler's reader stops at once; a write in progress gets ``CLOSE_GRACE`` seconds to
        finish, so the close frame follows a whole frame.
        """
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.cancel_scope.cancel()
