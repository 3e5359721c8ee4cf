"""The provider interface, the errors a provider may raise, and what registers a provider.

A provider is one module: its protocol code, its settings section (an attrs class) and one
:class:`ProviderEntry` named ``ENTRY``, listed once in :mod:`trio_relay.providers.registry`.
Everything else (the config file's sections and environment variables, credentials checks,
secrets masking, the command line's choices, the daemon, the workers, the recorder) reads the
registry, so nothing else changes when a provider is added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from ..model import Update

if TYPE_CHECKING:
    from ..config import UpstreamConfig

__all__ = [
    "Provider",
    "Session",
    "ProviderError",
    "AuthFailed",
    "MalformedFrame",
    "MalformedSink",
    "ignore_malformed",
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


class MalformedFrame(Exception):
    """One upstream frame could not be understood; it is counted and skipped."""

    def __init__(self, reason: str, frame: str | bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frame = frame


MalformedSink = Callable[[MalformedFrame], None]


def ignore_malformed(_exc: MalformedFrame) -> None:
    """The sink that drops a malformed frame (for callers that count nothing, such as a probe)."""


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


class Provider(Protocol):
    name: str
    #: True when silence on a subscribed feed means a dead connection (providers with heartbeats).
    detects_stale: bool

    def session(self, on_malformed: MalformedSink) -> AbstractAsyncContextManager[Session]:
        """Connect and log in; the context's exit closes the connection cleanly."""
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
