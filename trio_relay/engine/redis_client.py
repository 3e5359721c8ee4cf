"""A client of the fleet's Redis, and which errors mean "Redis went away" (retried, never a crash).

Used by the fleet engine and by ``trio-relay archive``; holds no state of its own.
"""

from __future__ import annotations

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from ..config import EngineConfig

__all__ = ["REDIS_ERRORS", "REDIS_FAILURES", "describe_failure", "is_redis_failure", "redis_client"]

# Errors that mean "Redis is unreachable or went away", not a bug of ours.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    coredis.exceptions.RedisError,
    OSError,
    TimeoutError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)

# ...and a Redis command that took longer than engine.timeout.
REDIS_FAILURES: tuple[type[BaseException], ...] = (*REDIS_ERRORS, trio.TooSlowError)


def is_redis_failure(exc: BaseException, also: tuple[type[BaseException], ...] = ()) -> bool:
    """Redis went away or timed out (every leaf of a group, or one of ``also``): retried, never a crash."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_redis_failure(e, also) for e in exc.exceptions)
    return isinstance(exc, (*REDIS_FAILURES, *also))


def describe_failure(exc: BaseException) -> str:
    """``Type: message`` of the first leaf of ``exc`` (never a URL's password: coredis shows none)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def redis_client(config: EngineConfig, name: str) -> coredis.Redis[bytes]:
    """A client of the fleet's Redis, to use as ``async with``. No retries of its own: a failure
    ends the caller's session, which reports it and retries with backoff."""
    return coredis.Redis.from_url(
        config.redis_url,
        decode_responses=False,
        connect_timeout=config.timeout,
        stream_timeout=None,  # pub/sub and XREADGROUP BLOCK wait for as long as they need
        retry_policy=NoRetryPolicy(),
        client_name=name,
    )
