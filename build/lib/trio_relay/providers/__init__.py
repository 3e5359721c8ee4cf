"""Provider adapters: each knows one vendor's wire protocol and nothing else.

A provider opens a :class:`~trio_relay.providers.base.Session` (connect + log in); the session
subscribes, unsubscribes and turns frames into normalized :class:`~trio_relay.model.Update`
batches. Retry, backoff, staleness and demand live in :mod:`trio_relay.upstream`.
"""

from .base import AuthFailed, MalformedFrame, Provider, ProviderError, Session

__all__ = ["AuthFailed", "MalformedFrame", "Provider", "ProviderError", "Session"]
