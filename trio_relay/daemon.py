"""The supervisor: builds every component and owns every long-lived task of the process.

Reading :func:`run_relay` tells the whole story:

- the hub (``Hub.open``) owns the stall reaper and the async-callback runners;
- ``hub.consume`` drains the bounded upstream → hub channel;
- ``upstream.run`` holds the provider connection (reconnecting under backoff);
- ``hypercorn.trio.serve`` serves the ASGI app (client WebSocket + REST).

Shutdown (``Relay.shutdown()``, SIGINT/SIGTERM in the CLI): close every client with 1001, stop the
HTTP server, close the upstream cleanly, and cancel whatever is left after ``SHUTDOWN_GRACE``.
"""

from __future__ import annotations

import logging
import socket
import time
from functools import partial

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from .api import RelayContext, WS_PATH, create_app
from .config import Config
from .hub import CLOSE_GOING_AWAY, Demand, Hub, Stats
from .model import Update
from .providers.base import Provider
from .upstream import Upstream

__all__ = ["Relay", "run_relay", "make_provider", "SHUTDOWN_GRACE"]

log = logging.getLogger("trio_relay.daemon")

# Everything must be down this long after a shutdown request (the spec asks for < 5 s).
SHUTDOWN_GRACE = 4.0


def make_provider(config: Config) -> Provider:
    name = config.provider
    if name == "sim":
        from .providers.sim import SimProvider

        return SimProvider(config.sim)
    if name == "fmp":
        from .providers.fmp import FmpProvider

        return FmpProvider(config.fmp, connect_timeout=config.upstream.connect_timeout)
    raise ValueError(f"unknown provider {name!r}")


@attrs.define(eq=False)
class Relay:
    """A running relay, as handed to whoever started it (the CLI, a test)."""

    config: Config
    hub: Hub
    upstream: Upstream
    binds: list[str]
    _shutdown: trio.Event

    @property
    def port(self) -> int:
        return int(self.binds[0].rsplit(":", 1)[1])

    @property
    def http_url(self) -> str:
        return self.binds[0]

    @property
    def ws_url(self) -> str:
        return self.binds[0].replace("http://", "ws://", 1).replace("https://", "wss://", 1) + WS_PATH

    def shutdown(self) -> None:
        self._shutdown.set()


def _listening_fd(config: Config) -> int:
    """Bind the server socket ourselves so its accepted connections carry TCP_USER_TIMEOUT.

    Hypercorn shields its socket writes from cancellation, so a peer that stops reading would
    pin its connection's sender forever. With TCP_USER_TIMEOUT (inherited by accepted sockets)
    the kernel aborts a connection whose sent data stays unacknowledged, zero-window probes
    included, for ``stall_timeout``; the blocked write then fails and the client is released.
    """
    host, port = config.server.host, config.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(config.clients.stall_timeout * 1000))
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock.detach()  # hypercorn owns the descriptor from here on


def _hypercorn_config(config: Config, fd: int) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    hc.bind = [f"fd://{fd}"]
    hc.graceful_timeout = config.server.graceful_timeout
    hc.websocket_max_message_size = config.clients.max_message_size
    hc.accesslog = None  # monitoring polls /health often; access lines would drown the journal
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def run_relay(config: Config, *, task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the relay until :meth:`Relay.shutdown`; started() hands over the :class:`Relay`."""
    stats = Stats()
    demand = Demand(config.upstream.unsubscribe_linger, config.upstream.pinned)
    provider = make_provider(config)
    # Upstream → hub, in frames. When full, the upstream reader waits (backpressure towards the
    # provider, whose own buffer absorbs it); the hub side never waits on clients.
    send, receive = trio.open_memory_channel[list[Update]](config.upstream.queue_size)
    shutdown = trio.Event()
    stop_server = trio.Event()
    async with Hub.open(config.clients, demand, stats) as hub:
        upstream = Upstream(provider, demand, send, config.upstream, stats)
        ctx = RelayContext(hub=hub, upstream=upstream, config=config, provider_name=config.provider, started_at=time.time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.consume, receive)
            await nursery.start(upstream.run)
            binds = await nursery.start(
                partial(
                    hypercorn.trio.serve,
                    create_app(ctx),  # type: ignore[arg-type]
                    _hypercorn_config(config, _listening_fd(config)),
                    shutdown_trigger=stop_server.wait,
                )
            )
            relay = Relay(config, hub, upstream, binds, shutdown)
            _banner(relay, provider)
            task_status.started(relay)

            await shutdown.wait()
            log.info("[SHUTDOWN] closing %d client(s) with %d, stopping upstream", len(hub.clients), CLOSE_GOING_AWAY)
            nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
            hub.close_all(CLOSE_GOING_AWAY, "server shutting down")
            stop_server.set()
            upstream.stop()
    log.info("[SHUTDOWN] done")


def _banner(relay: Relay, provider: Provider) -> None:
    log.info("[START] trio-relay listening on %s", relay.http_url)
    log.info("[START] client WebSocket: %s", relay.ws_url)
    log.info("[START] upstream: %s", provider.describe())
    if relay.config.provider == "sim":
        log.warning("[SIM] ******************************************************************")
        log.warning("[SIM] No FMP_API_KEY set: serving SIMULATED market data, not real prices.")
        log.warning("[SIM] Set FMP_API_KEY (environment or .env) to relay Financial Modeling Prep.")
        log.warning("[SIM] ******************************************************************")
