"""Configuration: attrs classes, one cattrs converter, TOML file < environment < command line.

Precedence (lowest first): built-in defaults, the TOML file, ``TRIO_RELAY_<SECTION>_<KEY>``
environment variables (and ``FMP_API_KEY``), command-line flags. A ``.env`` file in the working
directory is read as if its lines were environment variables (the real environment wins).

Every problem is reported as :class:`ConfigError` whose message names the key, e.g.
``config error: server.port: must be between 0 and 65535 (got 70000)``.
"""

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from .providers import registry
from .settings import ConfigError
from .settings import FieldError as _FieldError
from .settings import non_negative as _non_negative
from .settings import port as _port
from .settings import positive as _positive

__all__ = [
    "Config",
    "ConfigError",
    "ServerConfig",
    "UpstreamConfig",
    "ClientsConfig",
    "AuthConfig",
    "HistoryConfig",
    "BarsConfig",
    "AlertsConfig",
    "PortfolioConfig",
    "LimitsConfig",
    "LoggingConfig",
    "load_config",
    "run_label",
    "read_dotenv",
    "timing_warnings",
]

ENV_PREFIX = "TRIO_RELAY_"


def _provider_name(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    if value != "auto" and registry.entry(value) is None:
        choices = ", ".join(repr(n) for n in ["auto", *registry.names(aliases=True)])
        raise _FieldError(attr.name, f"must be one of {choices}")


def _redis_url(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise _FieldError(attr.name, "not a valid redis:// URL") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise _FieldError(attr.name, "must be redis://host:port/db or rediss://host:port/db")


def _key_prefix(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value):
        raise _FieldError(attr.name, f"{value!r} must be 1 to 64 letters, digits, or _ . : -")


def _node_id(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    if value and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise _FieldError(attr.name, f"{value!r} must be 1 to 64 letters, digits, or _ . -")


def _at_least_one_second(_inst: object, attr: "attrs.Attribute[Any]", value: float) -> None:
    if value < 1:
        raise _FieldError(attr.name, f"must be at least 1 (seconds), got {value!r}")


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8000, validator=_port)
    # Seconds open REST requests get to finish when the daemon stops.
    graceful_timeout: float = attrs.field(default=3.0, validator=_non_negative)
    # Worker processes serving clients. With more than one, this process holds the ONE upstream
    # connection and feeds the workers over loopback; they share the port (SO_REUSEPORT).
    workers: int = attrs.field(default=1, validator=_positive)
    # Bind with SO_REUSEPORT (set for workers; lets several processes share the port).
    reuse_port: bool = False
    # TLS: with both set, the port serves https:// and wss:// (PEM files; the key is never logged).
    tls_certfile: str = ""
    tls_keyfile: str = ""
    # Origins allowed to open the price WebSocket from a browser (cross-site WebSocket hijacking),
    # e.g. ["https://app.example.com"]. Empty: any origin while auth is off, same host only
    # while it is on. Non-browser clients send no Origin and are not affected.
    allowed_origins: list[str] = attrs.Factory(list)
    # Host header values (name, or name:port) the relay answers to; others get 421 (DNS
    # rebinding). Empty: the loopback names and the bind address, or any host on a wildcard
    # bind (0.0.0.0, ::); "*" = any.
    allowed_hosts: list[str] = attrs.Factory(list)
    # The edge's bounds (each applies to every connection, before any route runs):
    # seconds to receive a request head: a new connection's first (TLS handshake included), or
    # the rest of a later one once its first byte came: 408 and closed;
    head_timeout: float = attrs.field(default=10.0, validator=_positive)
    # seconds a kept-alive connection may wait for the first byte of its next request: closed;
    keepalive_timeout: float = attrs.field(default=30.0, validator=_positive)
    # seconds a REST request may take from its head to the end of its response: 408/503, closed;
    request_timeout: float = attrs.field(default=30.0, validator=_positive)
    # open connections in all (checked at accept; when full, the longest-idle connection is closed
    # to make room, and without one the newcomer is refused). Never above the file limit.
    max_connections: int = attrs.field(default=10000, validator=_positive)
    # bytes of request line + headers: 431;
    max_header_size: int = attrs.field(default=16384, validator=_positive)
    # header fields per request: 431.
    max_headers: int = attrs.field(default=100, validator=_positive)


@attrs.frozen
class UpstreamConfig:
    # "auto": fmp when an FMP API key is set, else the embedded simulator.
    # Any name of providers/registry.py (or an alias: "massive" for "polygon").
    provider: str = attrs.field(default="auto", validator=_provider_name)
    # Failover: providers in priority order (e.g. ["fmp", "finnhub"]); when set, it replaces
    # ``provider``. The relay uses the first healthy one and returns to a preferred one once that
    # has been healthy for ``failback_after`` seconds.
    providers: list[str] = attrs.Factory(list)
    # Seconds the active provider may be down (or stale) before the relay fails over.
    failover_after: float = attrs.field(default=10.0, validator=_positive)
    # Seconds a preferred provider must prove itself before failing back: a background probe
    # session subscribes a sample of the wanted symbols and must receive data throughout (no gap
    # longer than stale_after, for providers with heartbeats).
    failback_after: float = attrs.field(default=60.0, validator=_positive)
    # How many wanted symbols the probe subscribes (a different sample at each probe).
    failback_probe_symbols: int = attrs.field(default=3, validator=_positive)
    # Longest wait between two probes of a preferred provider that is down (jittered backoff up to this).
    failback_probe_interval: float = attrs.field(default=5.0, validator=_positive)
    # Flap guard: a provider failed back to that fails again within this many seconds is not
    # probed again for a hold-off: failback_after, doubled at each such failure, at most
    # failback_holdoff_max. It is forgiven once it holds for failback_flap_window.
    failback_flap_window: float = attrs.field(default=600.0, validator=_positive)
    failback_holdoff_max: float = attrs.field(default=3600.0, validator=_positive)
    connect_timeout: float = attrs.field(default=30.0, validator=_positive)
    # No frame at all (heartbeats count) for this long while symbols are subscribed: reconnect.
    stale_after: float = attrs.field(default=30.0, validator=_positive)
    backoff_initial: float = attrs.field(default=0.5, validator=_positive)
    backoff_max: float = attrs.field(default=30.0, validator=_positive)
    # A connection that stayed up this long resets the backoff to its initial value.
    backoff_reset_after: float = attrs.field(default=60.0, validator=_non_negative)
    # Wait after a rejected API key before trying again (never hammer a provider with a bad key).
    auth_retry_delay: float = attrs.field(default=300.0, validator=_positive)
    # "Connection limit" answers (Alpaca 406, Polygon max_connections) are usually our own previous
    # connection, still held by the vendor after a blip: retried this many times, the n-th after
    # limit_retry_delay * n seconds, before waiting auth_retry_delay like a rejected key.
    limit_retries: int = attrs.field(default=10, validator=_non_negative)
    limit_retry_delay: float = attrs.field(default=0.5, validator=_positive)
    # Least wait after an HTTP 429 without a Retry-After (a provider may document a longer one).
    rate_limit_delay: float = attrs.field(default=60.0, validator=_positive)
    # 0 = retry forever. Otherwise the daemon exits (non-zero) after this many failed attempts.
    max_retries: int = attrs.field(default=0, validator=_non_negative)
    # Seconds a symbol stays subscribed upstream after its last client left (avoids churn).
    unsubscribe_linger: float = attrs.field(default=5.0, validator=_non_negative)
    # Bound of the upstream → hub channel (in frames); when full the upstream reader waits.
    queue_size: int = attrs.field(default=1024, validator=_positive)
    # Symbols subscribed upstream from the start, whatever the clients want.
    pinned: list[str] = attrs.Factory(list)
    # When the hub finds more than this many upstream updates waiting at once (it is behind), it
    # routes each symbol's latest state once instead of every update (all still reach the cache).
    # 0 = never coalesce.
    coalesce_above: int = attrs.field(default=5000, validator=_non_negative)
    # A replay, or a provider whose URL is on this machine (a local fake server), keeps its tick
    # history, alerts and portfolios in <data_dir>/<run> (data/replay, data/fmp-local...) instead
    # of data_dir itself, so that they never mix with the live relay's. false: share them.
    separate_data: bool = True


@attrs.frozen
class ClientsConfig:
    max_symbols_per_request: int = attrs.field(default=50, validator=_positive)
    max_symbols_per_client: int = attrs.field(default=500, validator=_positive)
    # Pending updates per client before its outbox conflates to the latest update per symbol.
    outbox_size: int = attrs.field(default=256, validator=_positive)
    # A client with pending data that completes no send for this long is closed (code 4008).
    stall_timeout: float = attrs.field(default=30.0, validator=_positive)
    # Largest text frame accepted from a client, in bytes.
    max_message_size: int = attrs.field(default=65536, validator=_positive)
    # Frames one client message may be split into (continuation frames): 1008 beyond.
    max_frames_per_message: int = attrs.field(default=64, validator=_positive)
    # Updates kept per symbol so a client that reconnects can resume where it left off
    # ("since" in its subscribe). Memory: about 370 bytes per kept update per symbol. 0 = no resume.
    resume_history: int = attrs.field(default=128, validator=_non_negative)
    # A subscribed symbol with no update for this long is reported stale to its clients (a
    # {"type":"status"} message), and fresh again at its next update. 0 = never.
    symbol_stale_after: float = attrs.field(default=60.0, validator=_non_negative)
    # An SSE stream with nothing to send for this long gets a comment line, so proxies and the
    # browser see it is alive.
    sse_heartbeat: float = attrs.field(default=15.0, validator=_positive)


def _identifier(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,39}", value):
        raise _FieldError(attr.name, f"must be a plain SQL name: letters, digits, _ (got {value!r:.50})")


def _networks(_inst: object, attr: "attrs.Attribute[Any]", value: list[str]) -> None:
    import ipaddress

    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise _FieldError(attr.name, f'{item!r} is not a network like "10.0.0.0/8" or "::1/128"') from None


@attrs.frozen
class HistoryConfig:
    # Tick history (every update, for /history, /bars and bars rebuilt after a restart):
    # "sqlite" (embedded, a file in data_dir), "postgres" (postgres_dsn), or "off".
    backend: Literal["sqlite", "postgres", "off"] = "sqlite"
    # Where the SQLite file lives (created if missing). A relative path is taken from
    # $STATE_DIRECTORY when set (systemd's StateDirectory=), else from the working directory.
    data_dir: str = "data"
    # e.g. "postgresql://relay@127.0.0.1:5432/ticks". May hold a password: never logged or shown.
    postgres_dsn: str = attrs.field(default="", repr=False)
    # The table (created if missing), in either backend.
    table: str = attrs.field(default="ticks", validator=_identifier)
    # Ticks older than this many days are deleted (checked every few minutes). 0 = keep forever.
    retention_days: float = attrs.field(default=7.0, validator=_non_negative)
    # Updates waiting for the database. When it is slow or down and this fills, new updates are
    # dropped (counted, /health says degraded): live relaying never waits on the database.
    queue_size: int = attrs.field(default=200_000, validator=_positive)
    # Most updates written in one transaction, and the longest a written update waits. A commit
    # writes out every page the batch touched (SQLite: one index page per symbol at least), so
    # fewer, larger transactions cost less per row, the more so with many symbols (issue 25).
    batch_size: int = attrs.field(default=50_000, validator=_positive)
    flush_interval: float = attrs.field(default=0.5, validator=_positive)
    # Queries (/history, /bars) run in worker threads, each on a database connection of its own:
    # at most query_concurrency at once; a request waits at most query_queue_timeout seconds for
    # a free one, then gets 503 history_busy (with Retry-After).
    query_concurrency: int = attrs.field(default=2, validator=_positive)
    query_queue_timeout: float = attrs.field(default=5.0, validator=_positive)
    # Work per request: a /bars page reads at most query_max_rows trades for at most
    # query_timeout seconds; past either it ends early ("truncated": true, next_start resumes
    # there), or, before one whole bar was read, 422 query_too_large. (A /history page is
    # one index range of at most `limit`, 10,000, rows.)
    query_timeout: float = attrs.field(default=5.0, validator=_positive)
    query_max_rows: int = attrs.field(default=1_000_000, validator=_positive)


@attrs.frozen
class BarsConfig:
    # The lateness rule of bars, live and over history alike (docs/api.md, "Live bars"). A trade
    # counts in its bar if the relay received it before the bar's end + grace + the interval's
    # lateness, and it is stamped at most `grace` ahead of the relay's clock; otherwise it is left
    # out of that interval's bars everywhere. Seconds.
    grace: float = attrs.field(default=2.0, validator=_non_negative)
    lateness_1s: float = attrs.field(default=1.0, validator=_non_negative)
    lateness_1m: float = attrs.field(default=5.0, validator=_non_negative)
    lateness_5m: float = attrs.field(default=10.0, validator=_non_negative)
    lateness_1h: float = attrs.field(default=30.0, validator=_non_negative)


@attrs.frozen
class AlertsConfig:
    # Price alerts and portfolios (REST and WebSocket). Their rules, fired alerts and positions
    # live in data_dir/app.sqlite3 and survive restarts.
    enabled: bool = True
    data_dir: str = "data"
    # Per user (the token's "sub"; everyone is "anonymous" with auth off).
    max_rules_per_user: int = attrs.field(default=200, validator=_positive)
    # Webhooks: an alert rule may name an http(s) URL to POST fired alerts to. Hosts allowed
    # ([] = any; set it on a shared relay: a webhook is a request the relay makes for a user).
    webhook_allowed_hosts: list[str] = attrs.Factory(list)
    # Whatever the list above, a webhook reaches public addresses only: its host is resolved (at
    # creation and at every attempt, which then connects to the address vetted) and refused when
    # any address is loopback, private, link-local (the cloud metadata address), multicast,
    # reserved, unspecified, or an IPv6 form of one. Exceptions, for receivers inside your network
    # on purpose: host names trusted whatever they resolve to, and networks (CIDR) trusted.
    webhook_trusted_hosts: list[str] = attrs.Factory(list)
    webhook_trusted_networks: list[str] = attrs.field(factory=list, validator=_networks)
    webhook_timeout: float = attrs.field(default=5.0, validator=_positive)
    # Attempts per alert (capped exponential backoff between them), then it is given up (counted).
    webhook_attempts: int = attrs.field(default=5, validator=_positive)
    # Fired alerts waiting for their webhook; beyond, new ones are dropped (counted), never blocking.
    webhook_queue: int = attrs.field(default=1000, validator=_positive)


@attrs.frozen
class PortfolioConfig:
    max_portfolios_per_user: int = attrs.field(default=20, validator=_positive)
    max_positions_per_portfolio: int = attrs.field(default=500, validator=_positive)
    # A portfolio subscriber gets at most one valuation per this many seconds.
    update_interval: float = attrs.field(default=0.5, validator=_positive)


@attrs.frozen
class AuthConfig:
    # JWT authentication of WebSocket clients and REST calls. It may be off only while the relay
    # listens on a loopback address, unless allow_insecure says so explicitly.
    enabled: bool = False
    # Accepted algorithms: HS256/HS384/HS512 with `secret`, or RS256/ES256... with `public_key_file`.
    algorithms: list[str] = attrs.Factory(lambda: ["HS256"])
    # The HMAC secret (HS*). Prefer TRIO_RELAY_AUTH_SECRET in the environment; never logged.
    secret: str = attrs.field(default="", repr=False)
    # PEM public key for RS*/ES*/PS* tokens.
    public_key_file: str = ""
    # Required "iss" and "aud" claims (empty: not checked).
    issuer: str = ""
    audience: str = ""
    # Seconds of clock skew tolerated on exp/nbf/iat.
    leeway: float = attrs.field(default=30.0, validator=_non_negative)
    # A WebSocket client without a token in the URL or header must send
    # {"action":"auth","token":...} within this many seconds, else it is closed (1008).
    auth_timeout: float = attrs.field(default=10.0, validator=_positive)
    # The scope (in the "scope" claim, space-separated, or the "scopes" list) REST pins need.
    admin_scope: str = "relay:admin"
    # Start on a non-loopback address with auth off anyway (a loud warning is logged).
    allow_insecure: bool = False


@attrs.frozen
class LimitsConfig:
    # Client messages per second per WebSocket connection (token bucket: rate and burst).
    messages_per_second: float = attrs.field(default=50.0, validator=_positive)
    messages_burst: int = attrs.field(default=200, validator=_positive)
    # Subscribe/unsubscribe requests per second per connection (a subset of the messages).
    subscribes_per_second: float = attrs.field(default=10.0, validator=_positive)
    subscribes_burst: int = attrs.field(default=50, validator=_positive)
    # Over-limit messages in a row (each answered with a rate_limited error) before a 1008 close.
    strikes: int = attrs.field(default=10, validator=_positive)
    # JSON from clients (WebSocket messages, REST bodies) nested deeper than this is refused
    # (error invalid_json / 400 json_too_deep) before it is decoded. Real messages nest 3 or 4 deep.
    json_max_depth: int = attrs.field(default=32, validator=_positive)
    # Open connections per client address (counted from accept, before any request: HTTP 429 and
    # close beyond; an IPv6 client counts by its /64) and WebSocket connections per authenticated
    # user. 0 = no cap.
    connections_per_ip: int = attrs.field(default=1000, validator=_non_negative)
    connections_per_user: int = attrs.field(default=20, validator=_non_negative)
    # REST requests per second per client IP (token bucket); over it: 429 with Retry-After.
    rest_per_second: float = attrs.field(default=20.0, validator=_positive)
    rest_burst: int = attrs.field(default=40, validator=_positive)


@attrs.frozen
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "text": the spec's "2024-11-10 12:00:00,000 - logger - LEVEL - message"; "json": one object per line.
    format: Literal["text", "json"] = "text"


@attrs.frozen
class EngineConfig:
    # Where the relay gets its prices from and shares them. "memory": this process holds the
    # upstream connection itself (one relay, no other service needed). "redis": a fleet of relays
    # sharing one Redis: one of them (elected) holds the upstream connection and publishes every
    # update once; every relay delivers it to its own clients. See docs/fleet.md.
    backend: Literal["memory", "redis"] = "memory"
    # redis://[:password@]host:port/db (rediss:// for TLS). May hold a password: never logged or shown.
    redis_url: str = attrs.field(default="redis://127.0.0.1:6379/0", repr=False, validator=_redis_url)
    # Relays with the same prefix on the same Redis form one fleet (every key and channel starts with it).
    prefix: str = attrs.field(default="trio-relay", validator=_key_prefix)
    # This relay's name in the fleet ("" = host-pid-random): shown in /status and the holder's log lines.
    node_id: str = attrs.field(default="", validator=_node_id)
    # The holder's lock lives this long unless renewed (every lock_ttl / 3). A holder that dies is
    # replaced within about lock_ttl + lock_ttl / 3; its silence (no heartbeat, sent every
    # lock_ttl / 4) is reported to every relay's clients after 0.75 x lock_ttl.
    lock_ttl: float = attrs.field(default=3.0, validator=_at_least_one_second)
    # Each relay's published demand lives this long unless refreshed (every demand_ttl / 3): the
    # symbols of a relay that died stop being held upstream after it (plus upstream.unsubscribe_linger).
    demand_ttl: float = attrs.field(default=10.0, validator=_at_least_one_second)
    # Updates are published on this many channels (by a hash of the symbol); a relay listens only
    # to the channels of the symbols its clients want. Each channel's message costs a receiving
    # relay one hub turn: keep 1 unless the relays want mostly different symbols of a large set.
    shards: int = attrs.field(default=1, validator=_positive)
    # Durable tick log: every update also appended to the Redis stream <prefix>:ticks, trimmed to
    # about stream_maxlen entries (0 = no stream).
    stream_maxlen: int = attrs.field(default=0, validator=_non_negative)
    # Connecting to Redis and each command: give up after this long (then retry with backoff).
    timeout: float = attrs.field(default=2.0, validator=_positive)


@attrs.frozen
class Config:
    server: ServerConfig = attrs.Factory(ServerConfig)
    upstream: UpstreamConfig = attrs.Factory(UpstreamConfig)
    clients: ClientsConfig = attrs.Factory(ClientsConfig)
    history: HistoryConfig = attrs.Factory(HistoryConfig)
    bars: BarsConfig = attrs.Factory(BarsConfig)
    alerts: AlertsConfig = attrs.Factory(AlertsConfig)
    portfolio: PortfolioConfig = attrs.Factory(PortfolioConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)
    limits: LimitsConfig = attrs.Factory(LimitsConfig)
    logging: LoggingConfig = attrs.Factory(LoggingConfig)
    engine: EngineConfig = attrs.Factory(EngineConfig)
    # Every registered provider's section (``[fmp]``, ``[sim]``...), by provider name. Read as
    # ``config.fmp``; the file and the environment name them as sections of their own.
    providers: dict[str, Any] = attrs.Factory(registry.default_settings)

    def __getattr__(self, name: str) -> Any:
        """``config.fmp``: a provider's section (only reached for names that are not fields)."""
        if name != "providers":  # not yet set while attrs builds the instance
            section = self.providers.get(name)
            if section is not None:
                return section
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def provider(self) -> str:
        """The provider actually used: ``auto`` resolved by the presence of an FMP key."""
        return self.provider_chain[0]

    def secrets(self) -> list[str]:
        """Every secret value set (provider keys, the JWT secret): masked in every log line."""
        values = (
            *(
                getattr(self.providers[name], credential.key)
                for name, entry in registry.ENTRIES.items()
                for credential in entry.credentials
            ),
            self.auth.secret,
            self.history.postgres_dsn,
            _dsn_password(self.history.postgres_dsn),
            _url_password(self.engine.redis_url),
        )
        return [v for v in values if v]

    @property
    def provider_chain(self) -> list[str]:
        """The providers in priority order (one unless failover is configured)."""
        if self.upstream.providers:
            return [_canonical_provider(p) for p in self.upstream.providers]
        if self.upstream.provider == "auto":
            return ["fmp" if self.fmp.api_key else "sim"]
        return [_canonical_provider(self.upstream.provider)]


def _url_password(url: str) -> str:
    """The password inside a redis:// URL ("" if none): masked in logs."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return ""
    return unquote(password) if password else ""


def _dsn_password(dsn: str) -> str:
    """The password inside a PostgreSQL DSN ("" if none): masked in logs on its own too."""
    if not dsn:
        return ""
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        return str(conninfo_to_dict(dsn).get("password") or "")
    except Error:
        return ""


def _canonical_provider(name: str) -> str:
    found = registry.entry(name)
    return found.name if found is not None else name


# Strict scalar hooks: TOML, environment strings and flags all arrive here; none is coerced silently.
def _structure_bool(value: object, _t: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _structure_int(value: object, _t: type) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {value!r}") from None


def _structure_float(value: object, _t: type) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None


def _structure_str(value: object, _t: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _structure_secret(value: object, _t: type) -> str:
    # Never echo the value: a mistyped key (e.g. unquoted digits in TOML) is still a secret.
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got a value of type {type(value).__name__}")
    return value


def _make_converter() -> cattrs.Converter:
    """A converter that takes each section strictly (unknown keys and wrong types are errors)."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(str, _structure_str)
    structure_str_list = conv.get_structure_hook(list[str])

    def structure_list(value: object, t: Any) -> list[str]:
        # cattrs would iterate a string: pinned = "SPY" must not become ["S", "P", "Y"].
        if not isinstance(value, list):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return structure_str_list(value, t)  # type: ignore[no-any-return]

    conv.register_structure_hook_func(lambda t: t == list[str], structure_list)

    def structure_str_map(value: object, _t: Any) -> dict[str, str]:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError("expected a table of strings (client symbol = provider symbol)")
        return {k.upper(): v for k, v in value.items()}

    conv.register_structure_hook_func(lambda t: t == dict[str, str], structure_str_map)
    secret = override(struct_hook=_structure_secret)
    overrides: dict[type, dict[str, Any]] = {
        AuthConfig: {"secret": secret},
        HistoryConfig: {"postgres_dsn": secret},
    }
    for entry in registry.ENTRIES.values():
        attrs.resolve_types(entry.settings)  # a provider module may postpone its annotations
        overrides[entry.settings] = {c.key: secret for c in entry.credentials}
    sections = (ServerConfig, UpstreamConfig, *(e.settings for e in registry.ENTRIES.values()))
    # Sections first: Config's hook resolves theirs when it is made.
    later = (
        ClientsConfig,
        HistoryConfig,
        BarsConfig,
        AlertsConfig,
        PortfolioConfig,
        AuthConfig,
        LimitsConfig,
        LoggingConfig,
    )
    for cls in (*sections, *later, Config):
        conv.register_structure_hook(
            cls, make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, **overrides.get(cls, {}))
        )
    return conv


_CONVERTER = _make_converter()  # stateless after construction


def config_sections() -> dict[str, type]:
    """Every section of the file and the environment: the relay's own, then each provider's."""
    own = {f.name: f.type for f in attrs.fields(Config) if f.name != "providers"}
    return own | {name: entry.settings for name, entry in registry.ENTRIES.items()}


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file (comments, blanks and ``export`` allowed)."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return values
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _env_value(raw: str, field_type: Any) -> object:
    """An environment string shaped for its field: lists are comma-separated."""
    if get_origin(field_type) is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _merge(base: dict[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> None:
    for section, values in overrides.items():
        base.setdefault(section, {})
        if not isinstance(base[section], dict):
            raise ConfigError(f"config error: {section}: must be a table")
        base[section].update(values)


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, _FieldError):
        return f"{exc.field}\x00{exc.problem}"
    if get_origin(type_) is Literal:
        choices = ", ".join(repr(c) for c in get_args(type_))
        return f"must be one of {choices}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown key(s): {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, (ValueError, TypeError)) and str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


def _format_cattrs_error(exc: Exception, path: str = "config") -> str:
    messages = cattrs.transform_error(exc, path=path, format_exception=_describe)
    cleaned = []
    for msg in messages:
        # "must be > 0 @ config.upstream" → "upstream.stale_after: must be > 0"
        text, _, where = msg.rpartition(" @ ")
        key = where.removeprefix("config").lstrip(".")
        field, sep, problem = text.partition("\x00")
        if sep:
            key, text = f"{key}.{field}".lstrip("."), problem
        cleaned.append(f"{key or 'config'}: {text}")
    return "config error: " + "; ".join(cleaned)


# The vendors' own variables (FMP_API_KEY...): (variable, section, key), from the registry.
VENDOR_ENV = tuple(
    (var, name, credential.key)
    for name, entry in registry.ENTRIES.items()
    for credential in entry.credentials
    for var in credential.env
)


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    dotenv: Path | None = Path(".env"),
) -> Config:
    """Build the configuration; raise :class:`ConfigError` naming the bad key.

    The layers in order, one step each (file, .env, environment, flags, then the checks across
    sections): a little over 60 lines, read top to bottom as the precedence rule.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config error: file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from None

    env: dict[str, str] = dict(read_dotenv(dotenv)) if dotenv is not None else {}
    env.update(os.environ if environ is None else environ)

    sections = config_sections()
    from_env: dict[str, dict[str, Any]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section, cls in sections.items():
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                fields = {f.name: f.type for f in attrs.fields(cls)}
                if key not in fields:
                    raise ConfigError(f"config error: {name}: unknown key {section}.{key}")
                from_env.setdefault(section, {})[key] = _env_value(value, fields[key])
                break
        else:
            raise ConfigError(f"config error: {name}: unknown section (known: {', '.join(sections)})")
    # The vendors' own conventional variables, when the TRIO_RELAY_ form is not set.
    for var, section, key in VENDOR_ENV:
        if env.get(var) and key not in from_env.get(section, {}):
            from_env.setdefault(section, {})[key] = env[var]

    _merge(data, from_env)
    if overrides:
        _merge(data, overrides)
    if "providers" in data:  # the field that holds the provider sections is not a section
        raise ConfigError("config error: providers: unknown section (a provider's settings go in its own, e.g. [fmp])")
    try:
        provider_data = {name: data.pop(name) for name in registry.ENTRIES if name in data}
        config = _CONVERTER.structure(data, Config)
        providers = {
            name: _structure_section(provider_data.get(name, {}), entry.settings, name)
            for name, entry in registry.ENTRIES.items()
        }
    except ConfigError:
        raise
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            raise ConfigError(_format_cattrs_error(exc)) from None
        raise ConfigError(f"config error: {exc}") from None
    config = attrs.evolve(config, providers=providers)
    return _validate(_resolve_data_dirs(_separate_run_data(config), env.get("STATE_DIRECTORY", "")))


def run_label(config: Config) -> str | None:
    """The name of a run that must not share the live relay's state, or None for a live run.

    ``replay`` for a replay; ``<provider>-local`` for a provider whose URL is on this machine
    (a ``trio-relay fake-fmp`` or another local fake). Not the ``relay`` provider: the workers of
    one relay reach it on loopback and are the live relay.
    """
    name = config.provider
    if name == "replay":
        return "replay"
    url = getattr(config.providers.get(name), "url", "") or ""
    if name == "relay" or not isinstance(url, str) or not url:
        return None
    host = urlsplit(url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    return f"{name}-local" if local else None


def _separate_run_data(config: Config) -> Config:
    """A replay or local-fake run gets ``<data_dir>/<run>`` for each data_dir left at its default.

    A data_dir the operator changed is theirs: kept as set. ``upstream.separate_data = false``
    turns this off.
    """
    label = run_label(config) if config.upstream.separate_data else None
    if label is None:
        return config

    def own(path: str, default: object) -> str:
        return os.path.join(path, label) if path == default else path

    history_default = attrs.fields(HistoryConfig).data_dir.default
    alerts_default = attrs.fields(AlertsConfig).data_dir.default
    return attrs.evolve(
        config,
        history=attrs.evolve(config.history, data_dir=own(config.history.data_dir, history_default)),
        alerts=attrs.evolve(config.alerts, data_dir=own(config.alerts.data_dir, alerts_default)),
    )


def _resolve_data_dirs(config: Config, state_directory: str) -> Config:
    """Relative ``data_dir`` settings live under systemd's ``$STATE_DIRECTORY`` when it is set.

    Under the shipped unit (``StateDirectory=trio-relay``, ``ProtectSystem=strict``, no working
    directory) the only writable place is ``/var/lib/trio-relay``: a relative ``data`` resolved
    against the working directory (``/``) would be read-only. systemd may list several
    directories separated by ``:``; the first is ours. An absolute ``data_dir`` is kept as set.
    """
    base = state_directory.split(":")[0]
    if not base:
        return config

    def under(path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(base, path)

    return attrs.evolve(
        config,
        history=attrs.evolve(config.history, data_dir=under(config.history.data_dir)),
        alerts=attrs.evolve(config.alerts, data_dir=under(config.alerts.data_dir)),
    )


def _structure_section(data: object, settings: type, name: str) -> Any:
    """One provider's section, its errors named ``<name>.<key>`` like the relay's own."""
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {name}: must be a table")
    try:
        return _CONVERTER.structure(data, settings)
    except cattrs.BaseValidationError as exc:
        raise ConfigError(_format_cattrs_error(exc, path=f"config.{name}")) from None


def _check_provider(config: Config, name: str) -> None:
    """Its credentials are set, and its own check (if any) finds nothing wrong."""
    entry = registry.ENTRIES[name]
    settings = config.providers[name]
    for credential in entry.credentials:
        if not getattr(settings, credential.key):
            var = credential.env[0] if credential.env else f"{ENV_PREFIX}{name.upper()}_{credential.key.upper()}"
            raise ConfigError(
                f"config error: {name}.{credential.key}: provider {name!r} needs it "
                f"(set {var} in the environment or in .env)"
            )
    problem = entry.check(settings) if entry.check is not None else None
    if problem:
        raise ConfigError(f"config error: {name}.{problem}")


HMAC_ALGORITHMS = {"HS256", "HS384", "HS512"}
KEY_ALGORITHMS = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"}


def _check_security(config: Config) -> None:
    server, auth = config.server, config.auth
    if bool(server.tls_certfile) != bool(server.tls_keyfile):
        raise ConfigError("config error: server.tls_keyfile: TLS needs both server.tls_certfile and server.tls_keyfile")
    for key in ("tls_certfile", "tls_keyfile"):
        path = getattr(server, key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"config error: server.{key}: file not found: {path}")
    for origin in server.allowed_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(
                f"config error: server.allowed_origins: {origin!r} is not an origin like https://app.example.com"
            )
    for host in server.allowed_hosts:
        if host != "*" and not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?", host):
            raise ConfigError(
                f"config error: server.allowed_hosts: {host!r} is not a host name like relay.example.com (or name:port)"
            )
    for alg in auth.algorithms:
        if alg not in HMAC_ALGORITHMS | KEY_ALGORITHMS:
            raise ConfigError(
                f"config error: auth.algorithms: unsupported algorithm {alg!r} ('none' is never accepted)"
            )
    if not auth.enabled:
        if not is_loopback(server.host) and not auth.allow_insecure:
            raise ConfigError(
                f"config error: auth.enabled: the relay would listen on {server.host} (not loopback) with "
                "authentication off, so anyone who can reach the port could subscribe and pin symbols; "
                "turn auth on, or set auth.allow_insecure = true to accept that"
            )
        return
    if not auth.algorithms:
        raise ConfigError("config error: auth.algorithms: at least one algorithm is needed")
    if HMAC_ALGORITHMS & set(auth.algorithms) and KEY_ALGORITHMS & set(auth.algorithms):
        raise ConfigError(
            "config error: auth.algorithms: mix HMAC (HS*) and public-key algorithms in one relay is refused"
        )
    if HMAC_ALGORITHMS & set(auth.algorithms):
        if len(auth.secret) < 32:
            raise ConfigError(
                "config error: auth.secret: HS* tokens need a secret of at least 32 characters "
                "(set TRIO_RELAY_AUTH_SECRET in the environment or in .env)"
            )
    elif not auth.public_key_file:
        raise ConfigError("config error: auth.public_key_file: RS*/ES* tokens need the issuer's public key (PEM)")
    elif not os.path.isfile(auth.public_key_file):
        raise ConfigError(f"config error: auth.public_key_file: file not found: {auth.public_key_file}")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def timing_warnings(config: Config) -> list[str]:
    """Upstream timings that load but weaken failover or failback: one line each, naming the keys.

    Orderings that cannot work at all are :class:`ConfigError` in :func:`load_config` instead
    (``failback_holdoff_max`` below ``failback_after``). Logged at start; empty for one provider.
    """
    up = config.upstream
    if len(config.provider_chain) < 2:
        return []
    warnings = []
    if up.stale_after >= up.failback_after:
        warnings.append(
            f"upstream.stale_after ({up.stale_after:g}s) >= upstream.failback_after ({up.failback_after:g}s): "
            "a failback probe then proves one update and failback_after without a disconnect, not data throughout; "
            "set stale_after below failback_after"
        )
    if up.failback_probe_interval >= up.failback_after:
        warnings.append(
            f"upstream.failback_probe_interval ({up.failback_probe_interval:g}s) >= upstream.failback_after "
            f"({up.failback_after:g}s): a preferred provider that comes back may wait longer for its probe "
            "than the probe lasts"
        )
    return warnings


def _validate(config: Config) -> Config:
    from .model import SYMBOL_RE

    pinned = [s.upper() for s in config.upstream.pinned]
    bad = [s for s in pinned if not SYMBOL_RE.match(s)]
    if bad:
        raise ConfigError(f"config error: upstream.pinned: invalid symbol(s) {', '.join(map(repr, bad))}")
    if config.upstream.backoff_max < config.upstream.backoff_initial:
        raise ConfigError("config error: upstream.backoff_max: must be >= upstream.backoff_initial")
    chain = config.upstream.providers
    for name in chain:
        if registry.entry(name) is None:
            choices = ", ".join(repr(c) for c in registry.names(aliases=True))
            raise ConfigError(f"config error: upstream.providers: unknown provider {name!r} (known: {choices})")
    if len(set(config.provider_chain)) != len(config.provider_chain):
        raise ConfigError("config error: upstream.providers: a provider is listed twice")
    for name in config.provider_chain:
        _check_provider(config, name)
    if len(config.provider_chain) > 1 and config.upstream.failback_holdoff_max < config.upstream.failback_after:
        raise ConfigError(
            "config error: upstream.failback_holdoff_max: must be >= upstream.failback_after (the first hold-off)"
        )
    _check_security(config)
    if config.history.backend == "postgres" and not config.history.postgres_dsn:
        raise ConfigError(
            "config error: history.postgres_dsn: backend 'postgres' needs a DSN "
            "(e.g. TRIO_RELAY_HISTORY_POSTGRES_DSN=postgresql://relay@127.0.0.1:5432/ticks)"
        )
    return attrs.evolve(config, upstream=attrs.evolve(config.upstream, pinned=pinned))
