"""The provider interface, the errors a provider may raise, and what registers a provider.

A provider is one module: its protocol code, its settings section (an attrs class) and one
:class:`ProviderEntry` named ``ENTRY``, listed once in :mod:`trio_relay.providers.registry`.
Everything else (the config file's sections and environment variables, credentials checks,
secrets masking, the command line's choices, the daemon, the workers, the recorder) reads the
registry, so nothing else changes when a provider is added.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from ..model import Update

if TYPE_CHECKING:
    from ..config import UpstreamConfig

__all__ = [
    "Provider",
    "Session",
    "ProviderError",
    "AuthFailed",
    "ConnectionLimit",
    "RateLimited",
    "ErrorClass",
    "error_for",
    "MalformedFrame",
    "MalformedSink",
    "ignore_malformed",
    "RefusalSink",
    "ignore_refused",
    "Credential",
    "ProviderEntry",
]


class ProviderError(Exception):
    """The provider reported an error that ends this connection; the upstream task retries."""


class AuthFailed(ProviderError):
    """The provider rejected our credentials (or kicked this session out).

    Retrying at the normal backoff would only hammer the provider with a bad key, so the
    upstream task reports ``auth_failed`` and waits ``auth_retry_delay``. The message never
    contains the key.
    """


class ConnectionLimit(ProviderError):
    """The provider says the key already holds its allowed connections (Alpaca 406, Polygon
    ``max_connections``).

    Right after a network blip this is usually our own previous connection, which the vendor
    has not noticed is gone yet; alpaca-trade-api-go retries it quickly (150 ms x the failures
    so far). So the upstream retries it ``limit_retries`` times after ``limit_retry_delay`` x n
    before treating it like a refused key (``auth_retry_delay``): another process using the key
    is not fought every few seconds.
    """


class RateLimited(ProviderError):
    """Too many requests (HTTP 429 on the upgrade): the next attempt waits at least ``retry_after``.

    ``retry_after`` is the server's ``Retry-After`` when it sent one, else None and the upstream
    waits the provider's documented minimum (or ``rate_limit_delay``).
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ErrorClass(enum.StrEnum):
    """What a provider's error means for the relay; each provider maps its errors in one table."""

    AUTH = "auth"  # credentials, plan or feed entitlement: AuthFailed, wait auth_retry_delay
    CONNECTION_LIMIT = "connection_limit"  # ConnectionLimit: a few quick retries, then auth_retry_delay
    RATE_LIMIT = "rate_limit"  # RateLimited: wait Retry-After (or the documented minimum)
    RETRY = "retry"  # ProviderError: this connection ends, reconnect at the normal backoff
    SYMBOLS = "symbols"  # the request's symbols are refused (on_refused); the session goes on
    NOTICE = "notice"  # logged; the session goes on


def error_for(cls: ErrorClass, text: str) -> ProviderError | None:
    """The exception that ends the session for an error of class ``cls`` (None: it goes on)."""
    if cls is ErrorClass.AUTH:
        return AuthFailed(text)
    if cls is ErrorClass.CONNECTION_LIMIT:
        return ConnectionLimit(text)
    if cls is ErrorClass.RATE_LIMIT:
        return RateLimited(text)
    if cls is ErrorClass.RETRY:
        return ProviderError(text)
    return None


class MalformedFrame(Exception):
    """One upstream frame could not be understood; it is counted and skipped."""

    def __init__(self, reason: str, frame: str | bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frame = frame


MalformedSink = Callable[[MalformedFrame], None]


def ignore_malformed(_exc: MalformedFrame) -> None:
    """The sink that drops a malformed frame (for callers that count nothing, such as a probe)."""


#: ``on_refused(client_symbols, reason)``: the provider will not serve these symbols on this
#: connection (plan's symbol limit, unknown symbol, entitlement, or no provider spelling for it),
#: while the connection and its other symbols go on. ``reason`` never contains a secret.
RefusalSink = Callable[[Sequence[str], str], None]


def ignore_refused(_symbols: Sequence[str], _reason: str) -> None:
    """The sink that ignores refusals (for callers that subscribe nothing, such as a probe)."""


class Session(Protocol):
    """One logged-in connection. Methods raise the transport's errors when it drops."""

    async def subscribe(self, symbols: Sequence[str]) -> None: ...

    async def unsubscribe(self, symbols: Sequence[str]) -> None: ...

    async def receive(self) -> list[Update]:
        """The updates of the next frame(s) read (empty for heartbeats and control frames).

        A frame it cannot decode goes to the session's ``on_malformed`` sink and is skipped;
        fatal provider messages raise :class:`AuthFailed` / :class:`ProviderError`.
        """
        ...


@runtime_checkable
class PreviousCloses(Protocol):
    """A provider that knows each symbol's previous close (the simulated market does).

    The relay hands it to clients in the ``subscribed`` ack (``prev_close``), so a front-end can
    show the change on the day. Vendors' streams carry no previous close: for them it is absent.
    """

    def previous_close(self, symbol: str) -> float | None: ...


class Provider(Protocol):
    name: str
    #: True when silence on a subscribed feed means a dead connection (providers with heartbeats).
    detects_stale: bool

    def session(
        self, on_malformed: MalformedSink = ..., on_refused: RefusalSink = ...
    ) -> AbstractAsyncContextManager[Session]:
        """Connect and log in; the context's exit closes the connection cleanly.

        A symbol the provider refuses goes to ``on_refused`` (the session goes on); one it never
        serves must be reported there too, so that its clients are not left waiting.
        """
        ...

    def describe(self) -> str:
        """Where it connects, for logs and /status (never includes a secret)."""
        ...


@attrs.frozen
class Credential:
    """A secret a provider needs: a key of its settings section and the vendor's own variables."""

    key: str  # e.g. "api_key": [fmp] api_key, TRIO_RELAY_FMP_API_KEY
    env: tuple[str, ...] = ()  # e.g. ("FMP_API_KEY",): read when the TRIO_RELAY_ form is not set


@attrs.frozen
class ProviderEntry:
    """How the relay finds one provider: its name, settings section, factory and secrets."""

    #: As in ``upstream.provider`` and ``--provider``; also the name of its config section.
    name: str
    #: The attrs class of its ``[name]`` section (defaults make a valid, key-less section).
    settings: type[Any]
    #: ``build(settings, upstream)``: the provider, from its section and the upstream settings.
    build: Callable[[Any, UpstreamConfig], Provider]
    #: Secrets it cannot start without (checked at start, masked everywhere, never shown).
    credentials: tuple[Credential, ...] = ()
    #: Other names accepted for it (``massive`` for ``polygon``).
    aliases: tuple[str, ...] = ()
    #: A network provider: ``--upstream-url`` sets its ``url`` and ``record --raw`` can tap it.
    network: bool = True
    #: A problem with its settings that the section's own validators cannot see (``None``: fine).
    check: Callable[[Any], str | None] | None = None
