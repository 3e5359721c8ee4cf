"""The ASGI application: the client WebSocket hot path in front of the Quart-Trio REST app."""

from __future__ import annotations

from typing import Any

import attrs

from ..config import Config
from ..hub import Hub
from ..upstream import Upstream
from .rest import create_rest_app
from .ws import WS_PATH, ClientProtocol

__all__ = ["RelayContext", "RelayApp", "create_app"]


@attrs.define
class RelayContext:
    """What the API needs from the daemon."""

    hub: Hub
    upstream: Upstream
    config: Config
    provider_name: str
    started_at: float


class RelayApp:
    """Routes the price WebSocket to :class:`ClientProtocol`, everything else to Quart."""

    def __init__(self, ctx: RelayContext) -> None:
        self.rest = create_rest_app(ctx)
        self.ws = ClientProtocol(ctx.hub, ctx.config.clients)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"].rstrip("/") == WS_PATH:
            await self.ws(scope, receive, send)
        else:
            await self.rest(scope, receive, send)  # type: ignore[arg-type]


def create_app(ctx: RelayContext) -> RelayApp:
    return RelayApp(ctx)
