"""The supervisor: builds every component and owns every long-lived task of the process.

Reading :func:`run_relay` tells the whole story:

- the hub (``Hub.open``) owns the stall reaper and the async-callback runners;
- ``hub.consume`` drains the bounded upstream → hub channel;
- ``upstream.run`` holds the provider connection (reconnecting under backoff);
- ``front.run_app`` runs the Quart-Trio REST app's lifespan;
- ``serve_front`` owns the public socket: an h11 edge (:class:`~trio_relay.api.FrontDoor`) that
  serves the price WebSocket natively and calls the REST app for every other request (TLS, when
  configured, ends there too).

Shutdown (``Relay.shutdown()``, SIGINT/SIGTERM in the CLI): close every client with 1001, stop the
HTTP server, close the upstream cleanly, and cancel whatever is left after ``SHUTDOWN_GRACE``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

import attrs
import trio

from .alerts import AlertEngine, AlertStore, WebhookSender
from .alerts.service import AlertService
from .api import WS_PATH, FrontDoor, RelayContext
from .api.app import tls_context
from .appstore import AppStore
from .auth import Security
from .bars import Lateness
from .config import BarsConfig, Config, ConfigError, timing_warnings
from .engine import Engine, open_engine
from .history import HistoryBackend, HistoryStore, HistoryWriter, QueryBudget, make_backend
from .hub import CLOSE_GOING_AWAY, Demand, Hub, Stats
from .model import wall_ms
from .portfolio import PortfolioStore
from .portfolio.service import PortfolioService
from .providers.base import PreviousCloses, Provider
from .providers.registry import make_providers
from .startup import bind_problem, check_data_dirs
from .upstream import UpstreamView

__all__ = ["Relay", "run_relay", "SHUTDOWN_GRACE"]

log = logging.getLogger("trio_relay.daemon")

# Everything must be down this long after a shutdown request (the spec asks for < 5 s).
SHUTDOWN_GRACE = 4.0
# Of which the tick history writer gets this long to write what is pending.
HISTORY_DRAIN = 1.0


@attrs.define(eq=False)
class Relay:
    """A running relay, as handed to whoever started it (the CLI, a test)."""

    config: Config
    hub: Hub
    engine: Engine
    binds: list[str]
    _shutdown: trio.Event
    security: Security | None = None
    history_writer: HistoryWriter | None = None
    edge: FrontDoor | None = None  # the public listener's edge (its connection table: tests, status)

    @property
    def upstream(self) -> UpstreamView:
        """The upstream as this relay sees it (its own, or the fleet holder's)."""
        return self.engine.view

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

    def reload(self, new: Config) -> list[str]:
        """Apply a new configuration without dropping clients; returns what changed.

        Live: pinned symbols, client limits, linger, coalescing, and the provider settings (the
        upstream reconnects at once with them; clients stay and everything wanted is subscribed
        again). ``server`` settings need a restart and are kept as they are.
        """
        old = self.config
        changes: list[str] = []
        # Built first: a provider that cannot be made (a replay file that does not load) refuses
        # the whole reload before anything changed.
        providers = make_providers(new) if _upstream_settings(new) != _upstream_settings(old) else None
        if new.server != old.server:
            changes.append("server settings need a restart: kept as they were")
            new = attrs.evolve(new, server=old.server)
        if new.engine != old.engine:
            changes.append("engine settings need a restart: kept as they were")
            new = attrs.evolve(new, engine=old.engine)
        if new.bars != old.bars:
            # Live bars and /bars share one lateness rule: changed in both at once, at a restart.
            changes.append("bars settings need a restart: kept as they were")
            new = attrs.evolve(new, bars=old.bars)
        hub = self.hub
        added = [s for s in new.upstream.pinned if s not in old.upstream.pinned]
        removed = [s for s in old.upstream.pinned if s not in new.upstream.pinned]
        if added:
            hub.pin(added)
            changes.append(f"pinned +{','.join(added)}")
        if removed:
            hub.unpin(removed)
            changes.append(f"pinned -{','.join(removed)}")
        if new.clients != old.clients:
            hub.config = new.clients
            if new.clients.resume_history != old.clients.resume_history:
                hub.set_resume_history(new.clients.resume_history)
            for client in hub.clients.values():
                client.outbox.capacity = new.clients.outbox_size
            changes.append("client limits")
        hub.demand.linger = new.upstream.unsubscribe_linger
        hub.coalesce_above = new.upstream.coalesce_above
        if providers is not None:
            self.upstream.restart(providers, new.upstream, new.secrets())
            changes.append(f"upstream settings (reconnecting to {self.upstream.provider.describe()})")
        if self.security is not None and (
            new.auth != old.auth or new.limits != old.limits or new.server.allowed_origins != old.server.allowed_origins
        ):
            self.security.update(new)
            changes.append("auth, limits and origins (for new connections and requests)")
        if new.logging != old.logging:
            changes.append("logging")
        self.config = new
        return changes


def _upstream_settings(config: Config) -> tuple[object, ...]:
    """Everything whose change needs a new upstream session (pins do not)."""
    return (attrs.evolve(config.upstream, pinned=[]), config.provider_chain, config.providers)


def _listening_socket(config: Config) -> socket.socket:
    """The public socket. Accepted connections inherit TCP_NODELAY and TCP_USER_TIMEOUT.

    TCP_USER_TIMEOUT makes the kernel abort a connection whose sent data stays unacknowledged,
    zero-window probes included, for ``stall_timeout``: a peer that vanished without a FIN is
    released even when no write of ours is pending to notice it.
    """
    host, port = config.server.host, config.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if config.server.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(config.clients.stall_timeout * 1000))
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise bind_problem(host, port, exc) from None
    return sock


async def run_relay(config: Config, *, task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the relay until :meth:`Relay.shutdown`; started() hands over the :class:`Relay`.

    The supervisor, a little over 60 lines on purpose: it reads top to bottom as the relay's
    lifetime, every long-lived task started in order in one nursery, then the shutdown's order.
    """
    stats = Stats()
    demand = Demand(config.upstream.unsubscribe_linger, config.upstream.pinned)
    providers = make_providers(config)
    history_backend = _history_backend(config)
    shutdown = trio.Event()
    ssl_context = tls_context(config.server)  # bad certificate or key files: fail before binding anything
    check_data_dirs(config)  # an unwritable data directory: one line now, not a traceback later
    listener = _listening_socket(config)
    try:
        lateness = bars_lateness(config.bars)  # one rule for the live bars and /bars
        hub_open = Hub.open(
            config.clients,
            demand,
            stats,
            coalesce_above=config.upstream.coalesce_above,
            source=providers[0].name,
            lateness=lateness,
        )
        async with hub_open as hub:
            # Chosen once, here: this relay's own upstream (memory) or a fleet's (redis).
            engine = open_engine(config, hub, providers, stats)
            hub.previous_close = _previous_closes(engine.view)
            ctx = RelayContext(hub=hub, engine=engine, config=config, started_at=time.time(), security=Security(config))
            app_store = await _open_app_services(config, hub, ctx)
            front = FrontDoor(ctx, ssl_context)
            async with trio.open_nursery() as nursery:
                # Portfolios and alerts run until shutdown ends them (they have no end of their own).
                services = trio.CancelScope()
                await nursery.start(_run_in, services, [ctx.portfolios, ctx.alerts])
                if history_backend is not None:
                    await _start_history(nursery, config, history_backend, hub, ctx, lateness)
                await nursery.start(engine.run)  # the hub gets updates from here on
                await nursery.start(front.run_app)
                host, port = listener.getsockname()[:2]
                scheme = "https" if ssl_context is not None else "http"
                bind = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
                front_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
                accepting = trio.CancelScope()  # the accept loop only
                connections = trio.CancelScope()  # every accepted connection's handler

                async def serve_front(
                    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
                ) -> None:
                    with connections:
                        async with trio.open_nursery() as handlers:
                            with accepting:
                                await trio.serve_listeners(
                                    front.handle, [front_listener], handler_nursery=handlers, task_status=task_status
                                )

                await nursery.start(serve_front)
                relay = Relay(config, hub, engine, [bind], shutdown, ctx.security, ctx.history_writer, front)
                _banner(relay, providers)
                task_status.started(relay)

                await shutdown.wait()
                nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
                accepting.cancel()
                await front_listener.aclose()  # new connections are refused from here on
                await _drain(config, ctx, front, services)
                connections.cancel()
                if ctx.history_store is not None:
                    with trio.move_on_after(0.5):
                        await ctx.history_store.aclose()
                if app_store is not None:
                    with trio.move_on_after(0.5):
                        await app_store.aclose()
    finally:
        listener.close()  # closed already once serving began; this is for a failed start
    log.info("[SHUTDOWN] done")


def _previous_closes(view: UpstreamView) -> Callable[[str], float | None]:
    """A symbol's previous close from the provider in use, where it knows one (else None)."""

    def previous_close(symbol: str) -> float | None:
        provider = view.provider
        return provider.previous_close(symbol) if isinstance(provider, PreviousCloses) else None

    return previous_close


async def _open_app_services(config: Config, hub: Hub, ctx: RelayContext) -> AppStore | None:
    """Portfolios and alerts (``alerts.enabled``), on their store, fed by the hub; the store or None."""
    if not config.alerts.enabled:
        return None
    app_store = AppStore(config.alerts.data_dir)
    portfolio_store = PortfolioStore(app_store, config.portfolio)
    await portfolio_store.migrate()
    ctx.portfolios = PortfolioService(hub, portfolio_store, config.portfolio.update_interval)
    hub.add_callback(ctx.portfolios.on_update)
    alert_store = AlertStore(app_store)
    await alert_store.migrate()

    def watch(symbol: str, on: bool) -> None:  # symbols with live rules stay wanted upstream
        (hub.demand.acquire if on else hub.demand.release)([symbol])

    # Auth off: every rule pins (see trio_relay.entitlements); on: admins' rules only.
    rules = AlertEngine(config.alerts, on_watch=watch, pin_all=not config.auth.enabled)
    rules.load(await alert_store.load())
    ctx.alerts = AlertService(
        hub, rules, alert_store, WebhookSender(config.alerts), held_elsewhere=portfolio_store.held_symbols
    )
    hub.add_callback(ctx.alerts.on_update)
    return app_store


async def _start_history(
    nursery: trio.Nursery, config: Config, backend: HistoryBackend, hub: Hub, ctx: RelayContext, lateness: Lateness
) -> None:
    """The tick history's writer (a task of ``nursery``, fed by the hub) and its query side."""
    writer = HistoryWriter.from_config(config.history, backend, shutdown_timeout=HISTORY_DRAIN)
    await nursery.start(writer.run)
    offer = writer.offer
    # The arrival time the live bars used too (one clock reading per hub turn); the
    # hub's source is the provider an update came from when it does not say.
    hub.add_callback(lambda update: offer(update, hub.received_ms or wall_ms(), hub.source))
    ctx.history_writer = writer
    h = config.history
    budget = QueryBudget(h.query_concurrency, h.query_queue_timeout, h.query_timeout, h.query_max_rows)
    ctx.history_store = HistoryStore(backend, budget, lateness)
    log.info("[START] tick history: %s", backend.description)


async def _drain(config: Config, ctx: RelayContext, front: FrontDoor, services: trio.CancelScope) -> None:
    """The orderly part of a shutdown, once no new connection is accepted.

    Every client is closed with 1001 (each handler finishes the frame it is writing, then sends
    the close), the upstream stops cleanly, the history and the alerts write what is pending
    (each within its bound), then the REST requests in flight get ``graceful_timeout``.
    """
    hub, upstream = ctx.hub, ctx.upstream
    log.info("[SHUTDOWN] closing %d client(s) with %d, stopping upstream", len(hub.clients), CLOSE_GOING_AWAY)
    front.begin_drain()  # idle connections close; each REST response says connection: close
    hub.close_all(CLOSE_GOING_AWAY, "server shutting down")
    upstream.stop()
    with trio.move_on_after(SHUTDOWN_GRACE / 2):
        await hub.wait_no_clients()
    if ctx.history_writer is not None:
        await ctx.history_writer.aclose()  # writes what is pending, within HISTORY_DRAIN
    if ctx.alerts is not None:
        with trio.move_on_after(HISTORY_DRAIN):
            await ctx.alerts.aclose()  # saves the rules and fired alerts still queued
    services.cancel()  # portfolios and alerts
    await front.drain(config.server.graceful_timeout)  # REST requests in flight finish
    front.stop_app()


async def _run_in(
    scope: trio.CancelScope,
    services: list[PortfolioService | AlertService | None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start each service's ``run`` inside ``scope``: cancelling the scope ends them all."""
    with scope:
        async with trio.open_nursery() as inner:
            for service in services:
                if service is not None:
                    await inner.start(service.run)
            task_status.started()


def bars_lateness(config: BarsConfig) -> Lateness:
    """The ``[bars]`` section as the lateness rule the live bars and ``/bars`` share."""
    allowed = {
        "1s": config.lateness_1s,
        "1m": config.lateness_1m,
        "5m": config.lateness_5m,
        "1h": config.lateness_1h,
    }
    return Lateness({name: round(seconds * 1000) for name, seconds in allowed.items()}, round(config.grace * 1000))


def _history_backend(config: Config) -> HistoryBackend | None:
    try:
        return make_backend(config.history)
    except ValueError as exc:  # a DSN that does not parse (its text is never shown: it may hold a password)
        raise ConfigError(
            f"config error: history.postgres_dsn: not a valid PostgreSQL DSN ({type(exc).__name__})"
        ) from None


def _banner(relay: Relay, providers: list[Provider]) -> None:
    log.info("[START] trio-relay listening on %s", relay.http_url)
    log.info("[START] client WebSocket: %s", relay.ws_url)
    if relay.config.server.tls_certfile:
        log.info("[START] TLS on (cert: %s)", relay.config.server.tls_certfile)
    log.info("[START] upstream: %s", providers[0].describe())
    for fallback in providers[1:]:
        log.info("[START] failover: %s", fallback.describe())
    config = relay.config
    for warning in timing_warnings(config):
        log.warning("[CONFIG] %s", warning)
    if not config.auth.enabled and config.auth.allow_insecure:
        log.warning("[SECURITY] ******************************************************************")
        log.warning("[SECURITY] Authentication is OFF on %s (auth.allow_insecure = true):", config.server.host)
        log.warning("[SECURITY] anyone who can reach this port can subscribe and pin upstream symbols.")
        log.warning("[SECURITY] ******************************************************************")
    elif config.auth.enabled:
        log.info("[START] auth: JWT (%s)", ", ".join(config.auth.algorithms))
    if relay.config.provider == "sim":
        log.warning("[SIM] ******************************************************************")
        log.warning("[SIM] No FMP_API_KEY set: serving SIMULATED market data, not real prices.")
        log.warning("[SIM] Set FMP_API_KEY (environment or .env) to relay Financial Modeling Prep.")
        log.warning("[SIM] ******************************************************************")
