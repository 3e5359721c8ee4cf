"""Who may do what: JWT verification, per-user symbol rights, token buckets, connection caps.

Tokens are verified with PyJWT against the configured algorithms only (``none`` is never
accepted, and an HMAC secret can never verify an RS/ES token or the reverse: the relay takes one
family). ``exp`` and ``sub`` are required; ``iss``/``aud`` are checked when configured. Claims
the relay reads:

- ``sub``: the user (connection caps per user, logs).
- ``scope`` (space-separated string) or ``scopes`` (list): ``auth.admin_scope`` allows the REST
  routes that change what the relay holds upstream (pins) and ``/status``.
- ``symbols``: patterns the user may subscribe to (``["AAPL", "MSFT", "BTC*"]``; ``*`` = all).
  Absent: all symbols.
- ``max_symbols``: how many symbols one connection of this user may hold (never more than the
  relay's own ``clients.max_symbols_per_client``).

A token never appears in a log line, an error message or a response.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives import serialization

from .config import AuthConfig, Config, ConfigError

__all__ = [
    "AuthError",
    "Authenticator",
    "Principal",
    "Security",
    "TokenBucket",
    "ConnectionCounter",
    "bearer_token",
    "OPEN",
    "BROWSER_HEADER",
    "BROWSER_PARAM",
    "open_principal",
]

ANONYMOUS = "anonymous"


class AuthError(Exception):
    """A token was refused. ``reason`` is safe to show to the client (it never holds the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class Principal:
    """An authenticated user (or the anonymous one when auth is off)."""

    subject: str
    scopes: frozenset[str] = frozenset()
    symbol_patterns: tuple[str, ...] | None = None  # None: every symbol
    max_symbols: int | None = None
    expires_at: float | None = None  # Unix time; None: never (auth off)
    _pattern: re.Pattern[str] | None = attrs.field(default=None, eq=False, repr=False)

    def may_subscribe(self, symbol: str) -> bool:
        return self._pattern is None or self._pattern.match(symbol) is not None

    def refused(self, symbols: Iterable[str]) -> list[str]:
        """The symbols this user may not subscribe to."""
        return [s for s in symbols if not self.may_subscribe(s)]

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


OPEN = Principal(ANONYMOUS, frozenset({"*"}))  # auth off: everything allowed

# Auth off, a browser may name itself with a random id it keeps (the dashboard does): the WebSocket
# query parameter ``browser`` or the REST header below. Its alerts and portfolios are then its own.
BROWSER_PARAM = "browser"
BROWSER_HEADER = "X-Relay-Browser"
_BROWSER_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def open_principal(browser_id: str | None) -> Principal:
    """Who a request is with auth off: :data:`OPEN`, or a browser's own owner when it names one.

    The owner is ``browser:`` and a hash of the id, so the id itself (whoever knows it sees that
    browser's alerts) is never in a log, in ``/status`` or in a store. Privacy between browsers,
    not security: with auth off anyone may present any id; turn auth on to tell users apart.
    Raises :class:`AuthError` for an id that is not 16-64 of ``A-Z a-z 0-9 _ -``.
    """
    if not browser_id:
        return OPEN
    if not _BROWSER_ID.match(browser_id):
        raise AuthError(f"{BROWSER_PARAM} must be 16-64 of A-Z a-z 0-9 _ - (a random id the browser keeps)")
    digest = hashlib.sha256(browser_id.encode()).hexdigest()[:16]
    return Principal(f"browser:{digest}", frozenset({"*"}))


def _compile(patterns: tuple[str, ...] | None) -> re.Pattern[str] | None:
    if patterns is None or "*" in patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p.upper())})" for p in patterns))


class Authenticator:
    """Verifies tokens for one relay's [auth] settings. Immutable after construction."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.enabled = config.enabled
        self._key: Any = ""
        if config.enabled:
            if config.public_key_file:
                # Parsed once: PyJWT would parse a PEM on every verify (~100 µs).
                try:
                    self._key = serialization.load_pem_public_key(Path(config.public_key_file).read_bytes())
                except (OSError, ValueError, TypeError) as exc:
                    problem = exc.strerror if isinstance(exc, OSError) else "not a PEM public key"
                    raise ConfigError(
                        f"config error: auth.public_key_file: {config.public_key_file}: {problem}"
                    ) from None
            else:
                self._key = config.secret
        self._options: jwt.types.Options = {"require": ["exp", "sub"]}

    def __repr__(self) -> str:
        return f"Authenticator(enabled={self.enabled}, algorithms={self.config.algorithms})"

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; :class:`AuthError` saying why otherwise."""
        if not self.enabled:
            return OPEN
        config = self.config
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=list(config.algorithms),
                audience=config.audience or None,
                issuer=config.issuer or None,
                leeway=config.leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token has the wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token has the wrong issuer") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise AuthError("token is malformed") from None
        return principal_from(claims)


def principal_from(claims: Mapping[str, Any]) -> Principal:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthError("token 'sub' must be a non-empty string")
    scopes: set[str] = set()
    if isinstance(claims.get("scope"), str):
        scopes.update(claims["scope"].split())
    if isinstance(claims.get("scopes"), list):
        scopes.update(s for s in claims["scopes"] if isinstance(s, str))
    raw = claims.get("symbols")
    patterns: tuple[str, ...] | None = None
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
            raise AuthError("token 'symbols' must be a list of symbol patterns")
        patterns = tuple(p.upper() for p in raw)
    max_symbols = claims.get("max_symbols")
    if max_symbols is not None and (type(max_symbols) is not int or max_symbols < 0):
        raise AuthError("token 'max_symbols' must be a non-negative integer")
    exp = claims.get("exp")
    return Principal(
        subject,
        frozenset(scopes),
        patterns,
        max_symbols,
        float(exp) if isinstance(exp, (int, float)) else None,
        _compile(patterns),
    )


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; :meth:`take` spends one if it can."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 if a token was spent; otherwise the seconds until one will be available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class ConnectionCounter:
    """Open connections per key (IP or user), capped; entries vanish at zero (bounded memory)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap  # 0 = no cap
        self.counts: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        n = self.counts.get(key, 0)
        if self.cap and n >= self.cap:
            return False
        self.counts[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self.counts.get(key, 0) - 1
        if n > 0:
            self.counts[key] = n
        else:
            self.counts.pop(key, None)


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _allowed_hosts(listed: Iterable[str], bind: str) -> frozenset[str] | None:
    """The Host names the relay answers to; None: any (the list has "*", or a wildcard bind)."""
    hosts = [h.lower() for h in listed]
    if "*" in hosts:
        return None
    if not hosts:
        if bind in ("0.0.0.0", "::", ""):
            return None  # every address of the machine: its names are not known here
        hosts = [*_LOOPBACK_NAMES, f"[{bind}]" if ":" in bind else bind]
    return frozenset(hosts)


class Security:
    """The relay's security settings and shared counters, used by the WebSocket and REST sides.

    One instance per relay, owned by its :class:`~trio_relay.api.app.RelayContext`; a reload
    swaps the settings in place (:meth:`update`), keeping the live counters.
    """

    MAX_REST_BUCKETS = 10_000  # idle (full) buckets are dropped beyond this many IPs

    def __init__(self, config: Config) -> None:
        self.update(config)
        self.per_ip = ConnectionCounter(config.limits.connections_per_ip)
        self.per_user = ConnectionCounter(config.limits.connections_per_user)
        self._rest: dict[str, TokenBucket] = {}

    def update(self, config: Config) -> None:
        self.config = config
        self.limits = config.limits
        self.auth = Authenticator(config.auth)
        self.allowed_origins = frozenset(o.rstrip("/") for o in config.server.allowed_origins)
        self.allowed_hosts = _allowed_hosts(config.server.allowed_hosts, config.server.host)
        if hasattr(self, "per_ip"):
            self.per_ip.cap = config.limits.connections_per_ip
            self.per_user.cap = config.limits.connections_per_user

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """May a browser page from ``origin`` open the price socket or write through REST?

        ``host`` is the request's Host header. The relay's own pages (same host and port) and
        the ``server.allowed_origins`` may, whether auth is on or off: with auth off, a page on
        any site could otherwise use a visitor's network position to reach a relay on their
        loopback. A request without ``Origin`` is not from a browser page and is allowed.
        """
        if origin is None:
            return True  # not a browser (browsers always send Origin on a WebSocket upgrade)
        origin = origin.rstrip("/")
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        return host is not None and origin.split("://", 1)[-1] == host

    def host_allowed(self, host: str | None) -> bool:
        """Is ``host`` (a Host header: name or name:port) one the relay serves?

        The check against DNS rebinding: a page on evil.example whose name is made to resolve to
        127.0.0.1 reaches the relay as "same origin", but its requests say ``Host: evil.example``.
        """
        if self.allowed_hosts is None:
            return True
        if host is None:
            return False
        host = host.lower()
        if host in self.allowed_hosts:
            return True
        name, _, port = host.rpartition(":")
        if name and port.isdigit() and not name.endswith(":"):  # name:port, [v6]:port
            return name in self.allowed_hosts
        return False

    def rest_allowed(self, ip: str, now: float) -> float:
        """0.0 if this IP may make a REST request now, else the seconds to wait."""
        bucket = self._rest.get(ip)
        if bucket is None:
            if len(self._rest) >= self.MAX_REST_BUCKETS:
                self._rest = {k: b for k, b in self._rest.items() if not b.full(now)}
            bucket = self._rest[ip] = TokenBucket(self.limits.rest_per_second, self.limits.rest_burst, now)
        return bucket.take(now)
