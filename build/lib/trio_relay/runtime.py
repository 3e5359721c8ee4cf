"""Process concerns of ``trio-relay serve``: signals, systemd notification, GC tuning, exit codes.

:func:`run_serve` is what the command line calls once the configuration has loaded: it runs the
relay (or the feeder and its workers) until SIGINT/SIGTERM, applies SIGHUP reloads, talks to
systemd (READY, STATUS, WATCHDOG, STOPPING), and turns the ways a start can fail into an exit
code: 0 after a clean stop, 1 when the upstream gave up, 2 for an operator mistake (one line on
stderr, never a traceback). Worker processes run the same loop (``workers.worker_main``).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import trio

from .config import Config, ConfigError
from .logsetup import configure_logging
from .systemd import Notifier, run_watchdog, watchdog_interval

__all__ = ["Runner", "run_serve", "serve_until_signalled"]

log = logging.getLogger("trio_relay.runtime")


# ``daemon.run_relay`` or ``workers.run_workers``: started in a nursery, it hands over an
# object with ``shutdown()``, ``reload(config)`` and the hub/upstream of whoever holds the
# upstream. Passed in by the caller, so this module imports neither (no import cycle).
Runner = Callable[..., Any]


def run_serve(config: Config, runner: Runner, reload: Callable[[], Config] | None = None) -> int:
    """Run the daemon until a signal stops it; the process exit code."""
    from .upstream import UpstreamGaveUp

    code = 0
    try:
        trio.run(serve_until_signalled, config, runner, reload)
    except* UpstreamGaveUp as group:
        log.error("[EXIT] upstream gave up: %s", group.exceptions[0])
        code = 1
    except* ConfigError as group:
        # Found while starting (a port in use, an unwritable data directory, TLS files that do
        # not load): the same one line and exit code as a bad config file.
        print(f"trio-relay: {group.exceptions[0]}", file=sys.stderr)
        code = 2
    return code


def _tune_gc() -> None:
    """Keep Python's cyclic GC from stalling every client at once (the process is ours).

    What exists once the relay runs lives as long as the process: freeze it out of the
    collector's scans. And collect young objects less often: the hot path allocates little that
    can form cycles. Measured at 1,000 clients and 100,000 updates/s: latency p99 from 94 ms to
    6-24 ms.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def serve_until_signalled(config: Config, runner: Runner, reload: Callable[[], Config] | None = None) -> None:
    """Run the relay (or the feeder and its workers) until SIGINT/SIGTERM, then shut down cleanly.

    SIGHUP calls ``reload()`` (the config file and flags, read again) and applies the result
    without dropping clients; a config that does not load is refused and the old one stays.
    """
    notifier = Notifier()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(runner, config)
            _tune_gc()
            hub_relay = relay.feeder if config.server.workers > 1 else relay  # who holds the upstream

            def status() -> str:
                hub = hub_relay.hub
                return f"upstream {hub_relay.upstream.state}; {len(hub.clients)} clients; {len(hub.cache)} symbols"

            notifier.notify("READY=1", f"STATUS={status()}", f"MAINPID={os.getpid()}")
            watchdog = trio.CancelScope()
            interval = watchdog_interval()
            if notifier.enabled and interval:
                log.info("[SYSTEMD] watchdog pings every %.1fs while the hub makes progress", interval)

                async def ping() -> None:
                    with watchdog:
                        await run_watchdog(notifier, interval, hub_relay.hub.making_progress, status)

                nursery.start_soon(ping)
            # If the relay fails on its own, the nursery cancels this wait.
            async for signum in signals:
                if signum == signal.SIGHUP:
                    _reload(relay, reload, notifier)
                    continue
                log.info("[SIGNAL] %s received; shutting down", signal.Signals(signum).name)
                notifier.notify("STOPPING=1", "STATUS=shutting down")
                watchdog.cancel()
                relay.shutdown()
                break
    notifier.close()


def _reload(relay: Any, reload: Callable[[], Config] | None, notifier: Notifier) -> None:
    if reload is None:
        log.warning("[RELOAD] SIGHUP ignored: nothing to reload from")
        return
    notifier.notify("RELOADING=1")
    try:
        new = reload()
    except ConfigError as exc:
        log.error("[RELOAD] rejected, keeping the running configuration: %s", exc)
    else:
        secrets = [*relay.config.secrets(), *new.secrets()]
        configure_logging(new.logging.level, secrets=secrets, fmt=new.logging.format)
        try:
            changes = relay.reload(new)
        except ConfigError as exc:  # e.g. a replay file that does not load
            log.error("[RELOAD] rejected, keeping the running configuration: %s", exc)
        else:
            log.info("[RELOAD] applied: %s", "; ".join(changes) or "nothing changed")
    notifier.notify("READY=1")
