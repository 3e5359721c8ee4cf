"""systemd ``Type=notify`` support without extra libraries: the sd_notify datagram protocol.

- ``READY=1`` once the relay listens and its upstream task runs, with a ``STATUS=`` line;
- ``STATUS=`` again whenever the upstream state changes;
- ``WATCHDOG=1`` every half ``WatchdogSec`` (``$WATCHDOG_USEC``), but only while the hub makes
  progress: a hub with upstream data waiting that has not taken any for a whole interval is
  wedged, the pings stop, and systemd restarts the service;
- ``STOPPING=1`` when shutdown begins.

Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

import trio

__all__ = ["Notifier", "watchdog_interval", "run_watchdog"]

log = logging.getLogger("trio_relay.systemd")


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for abstract)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:  # a full or vanished socket must not hurt the relay
            if not self._warned:
                self._warned = True
                log.warning("[SYSTEMD] cannot notify %s: %s", self._address.lstrip("\0"), exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of systemd's watchdog timeout, in seconds (None when no watchdog is set for us)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


async def run_watchdog(
    notifier: Notifier,
    interval: float,
    progressing: Callable[[], bool],
    status: Callable[[], str],
) -> None:
    """Ping every ``interval`` while ``progressing()``; send ``STATUS=`` when it changes."""
    last_status = ""
    wedged = False
    while True:
        current = status()
        if current != last_status:
            notifier.notify(f"STATUS={current}")
            last_status = current
        if progressing():
            notifier.notify("WATCHDOG=1")
            if wedged:
                log.warning("[SYSTEMD] hub making progress again; watchdog pings resumed")
            wedged = False
        elif not wedged:
            wedged = True
            log.error("[SYSTEMD] hub is not taking upstream data; watchdog pings stopped")
        await trio.sleep(interval)
