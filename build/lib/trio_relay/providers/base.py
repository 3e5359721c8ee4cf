"""The provider interface and the errors a provider may raise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from ..model import Update

__all__ = ["Provider", "Session", "ProviderError", "AuthFailed", "MalformedFrame", "MalformedSink"]


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
