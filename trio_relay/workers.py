"""Several worker processes behind ONE upstream connection (``server.workers > 1``).

This process runs the *feeder*: a relay that holds the provider connection and serves only the
workers, on a private loopback port. Each worker is a separate process running an ordinary relay
whose provider is ``relay`` (the feeder's price socket, batched), listening on the public port
with SO_REUSEPORT so the kernel spreads client connections across workers. Demand flows up the
same way it does from clients: a worker subscribes the feeder to what its clients want, and the
feeder subscribes the provider to the union. The same seam can carry other hosts later.

The feeder supervises its workers: a worker that dies is restarted (after a short pause), and
shutdown sends SIGTERM to every worker (each closes its clients with 1001) before the feeder stops.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from typing import Any

import attrs
import trio

from .config import AuthConfig, Config, EngineConfig, LimitsConfig
from .daemon import SHUTDOWN_GRACE, Relay, run_relay
from .logsetup import configure_logging
from .providers import registry
from .providers.relay import RelayConfig
from .runtime import serve_until_signalled
from .startup import bind_problem

__all__ = ["run_workers", "Workers"]

log = logging.getLogger("trio_relay.workers")

RESTART_PAUSE = 1.0


def _worker_config(config: Config, port: int, feeder_url: str) -> Config:
    return attrs.evolve(
        config,
        server=attrs.evolve(config.server, port=port, workers=1, reuse_port=True),
        upstream=attrs.evolve(config.upstream, provider="relay", providers=[], pinned=[]),
        # A worker never sees a provider's key: every section at its defaults, but its upstream.
        providers=registry.default_settings() | {"relay": RelayConfig(url=feeder_url)},
        # In a fleet (engine "redis") the feeder is this machine's member; its workers take
        # from it like from any upstream.
        engine=EngineConfig(),
    )


def _feeder_config(config: Config) -> Config:
    return attrs.evolve(
        config,
        # Private, on loopback, plain: the workers do TLS, origins and auth for their clients.
        server=attrs.evolve(
            config.server,
            host="127.0.0.1",
            port=0,
            workers=1,
            reuse_port=False,
            tls_certfile="",
            tls_keyfile="",
            allowed_origins=[],
        ),
        auth=AuthConfig(),
        # A worker asks for everything its clients want: no per-client symbol cap or request
        # rate between us.
        clients=attrs.evolve(config.clients, max_symbols_per_client=1_000_000, outbox_size=4096),
        limits=LimitsConfig(
            messages_per_second=1e6,
            messages_burst=1_000_000,
            subscribes_per_second=1e6,
            subscribes_burst=1_000_000,
            connections_per_ip=0,
            connections_per_user=0,
        ),
    )


def _worker_main(config: Config) -> None:
    """Entry point of a worker process (spawned, so it starts from a clean interpreter)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the feeder, which stops us
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)  # only the feeder talks to systemd
    configure_logging(config.logging.level, fmt=config.logging.format)
    trio.run(serve_until_signalled, config, run_relay)


@attrs.define(eq=False)
class Workers:
    """The running feeder and its workers, as handed to the CLI or a test."""

    port: int
    http_url: str
    feeder: Relay
    processes: dict[int, Any]
    _shutdown: trio.Event

    def shutdown(self) -> None:
        self._shutdown.set()

    @property
    def config(self) -> Config:
        return self.feeder.config

    def reload(self, new: Config) -> list[str]:
        """Apply to the feeder (pins, upstream settings); workers keep theirs until a restart."""
        changes = self.feeder.reload(_feeder_config(new))
        changes = [c for c in changes if not c.startswith("server settings")]
        return [*changes, "worker processes keep their client settings until restarted"]

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values() if p.pid is not None]


async def _stop(proc: Any) -> None:
    """SIGTERM (the worker closes its clients with 1001), then SIGKILL if it lingers."""
    if proc.is_alive():
        proc.terminate()
        with trio.move_on_after(SHUTDOWN_GRACE):
            await trio.lowlevel.wait_readable(proc.sentinel)
        if proc.is_alive():
            log.warning("[WORKER] pid %s did not stop in %.0fs; killing it", proc.pid, SHUTDOWN_GRACE)
            proc.kill()
    await trio.to_thread.run_sync(proc.join)


async def _supervise(index: int, config: Config, workers: Workers, stopping: trio.Event) -> None:
    ctx = multiprocessing.get_context("spawn")
    while not stopping.is_set():
        proc = ctx.Process(target=_worker_main, args=(config,), name=f"trio-relay-worker-{index}", daemon=True)
        await trio.to_thread.run_sync(proc.start)
        workers.processes[index] = proc
        log.info("[WORKER] %d started (pid %s)", index, proc.pid)
        try:
            await trio.lowlevel.wait_readable(proc.sentinel)
            await trio.to_thread.run_sync(proc.join)
        finally:
            with trio.CancelScope(shield=True):
                await _stop(proc)
        if stopping.is_set():
            break
        log.error(
            "[WORKER] %d (pid %s) exited with code %s; restarting in %.0fs",
            index,
            proc.pid,
            proc.exitcode,
            RESTART_PAUSE,
        )
        with trio.move_on_after(RESTART_PAUSE):
            await stopping.wait()


async def run_workers(config: Config, *, task_status: trio.TaskStatus[Workers] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the feeder and ``config.server.workers`` worker processes until shutdown."""
    host, port = config.server.host, config.server.port
    # Hold the public port for the workers (port 0 picks one); this socket never listens.
    reserve = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserve.bind((host, port))
    except OSError as exc:
        reserve.close()
        raise bind_problem(host, port, exc) from None
    port = reserve.getsockname()[1]
    shutdown = trio.Event()
    stopping = trio.Event()
    with reserve:
        async with trio.open_nursery() as nursery:
            feeder = await nursery.start(run_relay, _feeder_config(config))
            worker_config = _worker_config(config, port, feeder.ws_url)
            scheme = "https" if config.server.tls_certfile else "http"
            url = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
            workers = Workers(port, url, feeder, {}, shutdown)
            async with trio.open_nursery() as supervisors:
                for i in range(config.server.workers):
                    supervisors.start_soon(_supervise, i, worker_config, workers, stopping)
                log.info(
                    "[START] %d worker processes share %s (one upstream connection, held by pid %d)",
                    config.server.workers,
                    url,
                    os.getpid(),
                )
                task_status.started(workers)
                await shutdown.wait()
                log.info("[SHUTDOWN] stopping %d workers", len(workers.processes))
                stopping.set()
                supervisors.cancel_scope.cancel()  # each supervisor SIGTERMs its worker, shielded
            feeder.shutdown()
