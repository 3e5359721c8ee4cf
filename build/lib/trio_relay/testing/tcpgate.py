"""A loopback TCP proxy that a test can cut and reopen: a database or Redis "going away".

Closed, it hangs up on every new connection; :meth:`TcpGate.cut` also ends every connection
through it, as a network failure or a server restart would.
"""

from __future__ import annotations

import trio

__all__ = ["TcpGate"]


class TcpGate:
    """Proxies 127.0.0.1:<port> to ``host:port``; ``open`` says whether it lets connections through."""

    def __init__(self, host: str, port: int, *, open: bool = True) -> None:
        self.target = (host, port)
        self.open = open
        self.port = 0
        self.connections = 0  # accepted while open, since the start
        self._scopes: set[trio.CancelScope] = set()

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        """Close the gate and every connection through it."""
        self.open = False
        for scope in list(self._scopes):
            scope.cancel()

    def reopen(self) -> None:
        self.open = True

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.open:
                return
            self.connections += 1
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with await trio.open_tcp_stream(*self.target) as server, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
                except OSError:
                    pass  # the target is down: the client sees its connection closed
                finally:
                    self._scopes.discard(scope)

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            async for data in src:
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # either side hung up: the connection is over
        done.cancel()
