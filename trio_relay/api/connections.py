"""Admission at the edge: how many connections the relay holds, and which to let go first.

Checked at accept, before a byte of the request is read (the nginx ``limit_conn`` / Envoy
overload-manager way), so a peer that opens sockets and sends nothing cannot hold more than
its share:

- per client address (``limits.connections_per_ip``; an IPv6 client counts by its /64, since
  one host commonly owns the whole prefix): beyond it the newcomer is refused (429);
- in all (``server.max_connections``, never above what the file-descriptor limit allows): when
  full, the connection that has been idle the longest (waiting for a request head, or kept alive
  between requests) is closed to make room, like nginx reusing keep-alive connections when it
  runs out; only when no connection is idle is the newcomer refused (503).

A served WebSocket or a REST request in progress is never evicted: only idle connections are,
and each of those is also bounded in time by the head and keep-alive timeouts.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import resource

import trio

from ..auth import ConnectionCounter

__all__ = ["Admission", "ConnectionTable", "Entry", "address_key", "file_limit"]

log = logging.getLogger("trio_relay.api.connections")

# Descriptors kept for everything that is not a client connection: the listener, the upstream,
# Redis, the databases, log files, worker pipes, and a connection being evicted while its
# replacement is already open.
RESERVED_FDS = 64


class Admission(enum.Enum):
    """What :meth:`ConnectionTable.admit` decided for a new connection."""

    ADMITTED = "admitted"
    PER_ADDRESS = "per_address"  # the address holds limits.connections_per_ip already: 429
    FULL = "full"  # server.max_connections reached and nothing idle to close: 503


def address_key(ip: str) -> str:
    """The key a client address is counted under: the address, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


def file_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (within the hard limit); returns it.

    A default soft limit of 1,024 would make the kernel refuse accepts long before any
    configured connection cap is reached.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("[EDGE] cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


class Entry:
    """One admitted connection: its address key, and the cancel scope that evicts it."""

    __slots__ = ("key", "scope", "released")

    def __init__(self, key: str) -> None:
        self.key = key
        self.scope = trio.CancelScope()  # cancelled: the connection is closed to make room
        self.released = False


class ConnectionTable:
    """Counts the edge's connections and keeps the idle ones in least-recently-active order.

    All methods are synchronous: admission happens in the accepted connection's own task before
    it reads anything, and nothing here ever waits.
    """

    def __init__(self, max_connections: int, per_address: ConnectionCounter) -> None:
        limit = file_limit(max_connections + RESERVED_FDS) - RESERVED_FDS
        if limit < max_connections:
            log.warning(
                "[EDGE] server.max_connections = %d exceeds what the open-file limit allows; using %d",
                max_connections,
                max(limit, 1),
            )
        self.max_connections = max(1, min(max_connections, limit))
        self.per_address = per_address  # Security.per_ip: its cap follows a reload
        self.open = 0
        self.evicted = 0  # idle connections closed to make room (a sign of a flood)
        self.refused = 0
        self.refused_by: dict[Admission, int] = {Admission.PER_ADDRESS: 0, Admission.FULL: 0}
        # The edge's own error answers (400, 408, 421, 431...) by status: a handful of keys.
        self.rejected: dict[int, int] = {}
        # Insertion-ordered: the first entry has been idle the longest.
        self._idle: dict[Entry, None] = {}
        self._quiet = trio.Event()  # set whenever nothing is busy (see wait_quiet)
        self._closed = trio.Event()  # set at each release (see wait_open_at_most)

    def admit(self, ip: str) -> tuple[Admission, Entry | None]:
        """Decide for a newly accepted connection from ``ip``; an admitted one starts idle."""
        key = address_key(ip)
        if not self.per_address.acquire(key):
            self.refused += 1
            self.refused_by[Admission.PER_ADDRESS] += 1
            return Admission.PER_ADDRESS, None
        if self.open >= self.max_connections:
            if not self._idle:
                self.per_address.release(key)
                self.refused += 1
                self.refused_by[Admission.FULL] += 1
                return Admission.FULL, None
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.scope.cancel()  # its handler closes the socket at its next checkpoint
            self.evicted += 1
            self._release(oldest)
        self.open += 1
        entry = Entry(key)
        self._idle[entry] = None
        return Admission.ADMITTED, entry

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def idle(self, entry: Entry) -> None:
        """``entry`` waits for a request head: it may be evicted, most recently idle last."""
        if not entry.released:
            self._idle.pop(entry, None)
            self._idle[entry] = None
            if len(self._idle) == self.open:
                self._quiet.set()

    def busy(self, entry: Entry) -> None:
        """``entry`` is serving a request or a WebSocket: never evicted while so."""
        self._idle.pop(entry, None)

    def release(self, entry: Entry) -> None:
        """The connection is closed (idempotent)."""
        self._idle.pop(entry, None)
        self._release(entry)

    def _release(self, entry: Entry) -> None:
        if entry.released:
            return
        entry.released = True
        self.open -= 1
        self.per_address.release(entry.key)
        if len(self._idle) == self.open:
            self._quiet.set()
        self._closed.set()

    def close_idle(self) -> None:
        """Close every idle connection now (shutdown: nothing more will be served)."""
        for entry in list(self._idle):
            entry.scope.cancel()

    async def wait_open_at_most(self, n: int) -> None:
        """Return once at most ``n`` connections are open (each release wakes it)."""
        while self.open > n:
            self._closed = trio.Event()
            await self._closed.wait()

    async def wait_quiet(self) -> None:
        """Return once no connection is busy (each one is idle, or none is open)."""
        while len(self._idle) != self.open:
            self._quiet = trio.Event()
            await self._quiet.wait()
