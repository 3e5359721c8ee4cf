"""The front door: the one public listening socket of the relay.

Each connection's request head is read here. A WebSocket upgrade for the price socket is served
natively by :class:`~trio_relay.api.ws.ClientProtocol` (the hot path: thousands of clients,
every frame counts); anything else (REST, health checks, unknown paths) is relayed byte for byte
to the Quart-Trio app, which Hypercorn serves on a private Unix socket. REST is light traffic,
so one extra local hop there costs nothing that matters.
"""

from __future__ import annotations

import logging

import attrs
import trio
from quart_trio import QuartTrio

from ..config import Config
from ..hub import Hub
from ..upstream import Upstream
from .rest import create_rest_app
from .ws import WS_PATH, ClientProtocol

__all__ = ["RelayContext", "FrontDoor", "create_rest_app"]

log = logging.getLogger("trio_relay.api.front")

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0  # a client that cannot send its request head in this time is dropped


@attrs.define
class RelayContext:
    """What the API needs from the daemon."""

    hub: Hub
    upstream: Upstream
    config: Config
    started_at: float

    @property
    def provider_name(self) -> str:
        """The active provider (it changes on a failover)."""
        return self.upstream.provider.name


def _wants_price_socket(head: bytes) -> bool:
    line, _, headers = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    path = parts[1].split(b"?", 1)[0].rstrip(b"/").decode("latin-1")
    if path != WS_PATH:
        return False
    for header in headers.split(b"\r\n"):
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


class FrontDoor:
    def __init__(self, ctx: RelayContext, backend_socket: str) -> None:
        self.rest: QuartTrio = create_rest_app(ctx)
        self.ws = ClientProtocol(ctx.hub)
        self.backend_socket = backend_socket

    async def handle(self, stream: trio.SocketStream) -> None:
        """One accepted connection, for its whole life."""
        try:
            head = b""
            with trio.move_on_after(HEAD_TIMEOUT):
                while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                    chunk = await stream.receive_some(MAX_HEAD)
                    if not chunk:
                        return
                    head += chunk
            if b"\r\n\r\n" not in head:
                return  # too slow or too big: not a client we want to spend a task on
            if _wants_price_socket(head):
                await self.ws.serve(stream, head)
            else:
                await self._relay_to_rest(stream, head)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; grouped when it happened inside a connection's nursery
        except* Exception as group:
            # One connection's failure must never take the relay (and every other client) down.
            log.error("[CONNECTION] handler failed; connection dropped", exc_info=group)
        finally:
            await trio.aclose_forcefully(stream)

    async def _relay_to_rest(self, stream: trio.SocketStream, head: bytes) -> None:
        try:
            backend = await trio.open_unix_socket(self.backend_socket)
        except OSError as exc:
            log.error("[REST] cannot reach the REST server: %s", exc)
            body = b'{"error":"unavailable","message":"REST server not reachable"}'
            await stream.send_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        async with backend:
            await backend.send_all(head)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, stream, backend, nursery.cancel_scope)
                nursery.start_soon(_pump, backend, stream, nursery.cancel_scope)


async def _pump(src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream, scope: trio.CancelScope) -> None:
    try:
        while True:
            data = await src.receive_some(65536)
            if not data:
                await dst.send_eof()
                return
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        scope.cancel()  # one side is gone: end both directions
