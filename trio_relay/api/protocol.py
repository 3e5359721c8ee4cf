"""The client protocol as data: parse and validate client actions, build replies. No I/O.

In the spirit of h11 and wsproto: this module knows what a client may say and what the relay
answers, never how bytes arrive or leave. :func:`decode_message` turns one text message into a
JSON object, :func:`parse_action` turns that object into one typed action (or raises
:class:`ProtocolError` with the ``code`` and message the client sees), and :func:`error_reply` /
:func:`rate_limited_reply` build the error frames. The transports (:mod:`.ws`, :mod:`.sse`) read
bytes and write frames; :mod:`.sessions` applies actions to the hub.

Every parser raises before anything changes, so a refused action leaves no trace.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

import attrs

from ..bars import INTERVALS
from ..hub.delivery import DeliveryOptions, OptionsError, parse_options
from ..jsonbody import JsonError, decode_json
from ..model import SYMBOL_RE, control

__all__ = [
    "Action",
    "AlertCreate",
    "AlertDelete",
    "AlertList",
    "Auth",
    "Channel",
    "ListSubscriptions",
    "Ping",
    "ProtocolError",
    "Subscribe",
    "Unsubscribe",
    "decode_message",
    "error_reply",
    "flag",
    "parse_action",
    "parse_symbols",
    "rate_limited_reply",
]


class ProtocolError(Exception):
    """A client message the relay refuses; ``code`` and ``message`` are safe to show it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Channel(enum.StrEnum):
    """What a subscription delivers."""

    TICKS = "ticks"  # price_update messages (the default)
    BARS = "bars"  # live OHLCV bars of one interval
    PORTFOLIO = "portfolio"  # live valuations of one of the user's portfolios


def parse_symbols(raw: object, max_per_request: int, field: str = "symbols") -> list[str]:
    """Validate a list of symbols: upper-cased, de-duplicated, format-checked, capped."""
    if raw is None:
        raise ProtocolError("missing_field", f"'{field}' is required: a list of symbols, e.g. [\"AAPL\"]")
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise ProtocolError("invalid_symbols", f"'{field}' must be a list of strings")
    if not raw:
        raise ProtocolError("invalid_symbols", f"'{field}' must not be empty")
    if len(raw) > max_per_request:
        raise ProtocolError("too_many_symbols", f"at most {max_per_request} symbols per request (got {len(raw)})")
    symbols = list(dict.fromkeys(s.strip().upper() for s in raw))
    bad = [s for s in symbols if not SYMBOL_RE.match(s)]
    if bad:
        shown = ", ".join(repr(s[:24]) for s in bad[:5])
        raise ProtocolError(
            "invalid_symbols",
            f"invalid symbol(s): {shown}; a symbol is 1-20 of A-Z 0-9 . - / ^ = starting with a letter, a digit or ^",
        )
    return symbols


def flag(value: object) -> bool:
    """A boolean option as JSON (``true``) or as a query string (``1``, ``true``, ``yes``)."""
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes"))


# ---------------------------------------------------------------------- the actions


@attrs.frozen
class Subscribe:
    """``subscribe``: ticks of ``symbols`` (with their delivery options), bars, or a portfolio.

    ``batch`` is None when the message did not say (the connection keeps its mode).
    ``since``/``epoch``: a resume (the last seq seen per symbol). ``options``: the delivery
    options of these symbols (None: the defaults; see :mod:`trio_relay.hub.delivery`).
    """

    channel: Channel
    symbols: list[str] = attrs.field(factory=list)
    interval: str | None = None
    since: dict[str, int] | None = None
    epoch: str | None = None
    batch: bool | None = None
    portfolio: object = None
    options: DeliveryOptions | None = None


@attrs.frozen
class Unsubscribe:
    """``unsubscribe``: no update of ``symbols`` (or the portfolio) follows the ack."""

    channel: Channel
    symbols: list[str] = attrs.field(factory=list)
    interval: str | None = None
    portfolio: object = None


@attrs.frozen
class Ping:
    """``ping`` → ``pong``."""


@attrs.frozen
class ListSubscriptions:
    """``list`` → ``subscriptions`` (the symbols, their options, the bars)."""


@attrs.frozen
class Auth:
    """``auth``: the first authentication or a refresh; the token is checked by the session."""

    token: object


@attrs.frozen
class AlertCreate:
    """``alert_create``: a rule for the alert service (answered once its checks are done)."""

    rule: dict[str, object]


@attrs.frozen
class AlertDelete:
    """``alert_delete``: remove one of the user's rules."""

    id: str


@attrs.frozen
class AlertList:
    """``alerts``: the user's rules."""


Action = Subscribe | Unsubscribe | Ping | ListSubscriptions | Auth | AlertCreate | AlertDelete | AlertList

#: Actions that count against the subscribe rate limit (checked before the message is validated).
SUBSCRIPTION_ACTIONS: Final = frozenset({"subscribe", "unsubscribe"})


def decode_message(text: str, max_depth: int) -> dict[str, object]:
    """One client message as a JSON object, or :class:`ProtocolError`."""
    try:
        msg = decode_json(text, max_depth)
    except JsonError as exc:
        message = "message is not valid JSON" if exc.code == "invalid_json" else exc.message
        raise ProtocolError(exc.code, message) from None
    if not isinstance(msg, dict):
        raise ProtocolError(
            "invalid_message", 'message must be a JSON object like {"action":"subscribe","symbols":["AAPL"]}'
        )
    return msg


def parse_action(msg: Mapping[str, object], max_per_request: int) -> Action:
    """The typed action of a decoded message; :class:`ProtocolError` when it is not a valid one."""
    action = msg.get("action")
    if action is None:
        raise ProtocolError("missing_field", "'action' is required: subscribe, unsubscribe, ping or list")
    parser = _PARSERS.get(action) if isinstance(action, str) else None
    if parser is None:
        shown = action if isinstance(action, str) else repr(action)
        raise ProtocolError(
            "unknown_action",
            f"unknown action {shown[:40]!r}; expected subscribe, unsubscribe, ping, list, auth, alert_create, "
            "alert_delete or alerts",
        )
    return parser(msg, max_per_request)


def _channel(msg: Mapping[str, object]) -> Channel:
    channel = msg.get("channel", "ticks")
    if not isinstance(channel, str) or channel not in Channel.__members__.values():
        choices = ", ".join(c.value for c in Channel)
        raise ProtocolError("invalid_channel", f"'channel' must be one of {choices} (got {channel!r:.40})")
    return Channel(channel)


def _interval(msg: Mapping[str, object], *, required: bool) -> str | None:
    interval = msg.get("interval")
    if interval is None and not required:
        return None
    if interval not in INTERVALS:
        raise ProtocolError(
            "invalid_interval",
            f"'interval' must be one of {', '.join(INTERVALS)} for the bars channel (got {interval!r:.40})",
        )
    return str(interval)


def resume_fields(raw: object, epoch: object, symbols: list[str]) -> tuple[dict[str, int] | None, str | None]:
    """``since`` ({symbol: last seq seen}) and ``epoch`` of a resuming subscribe, validated."""
    if raw is None:
        return None, None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in raw.items()):
        raise ProtocolError("invalid_since", "'since' must be an object of symbol: last seq seen (an integer >= 0)")
    if not isinstance(epoch, str):
        raise ProtocolError("missing_field", "'epoch' is required with 'since': the epoch of the updates you saw")
    wanted = set(symbols)
    since = {k.strip().upper(): v for k, v in raw.items()}
    extra = [k for k in since if k not in wanted]
    if extra:
        raise ProtocolError("invalid_since", f"'since' names symbols not in 'symbols': {', '.join(extra[:5])}")
    return since, epoch


def delivery_options(msg: Mapping[str, object]) -> DeliveryOptions | None:
    """The ``max_rate``, ``fields`` and ``delta`` of a subscribe, validated (None: the defaults)."""
    try:
        return parse_options(msg.get("max_rate"), msg.get("fields"), msg.get("delta"))
    except OptionsError as exc:
        raise ProtocolError(exc.code, exc.message) from None


def _subscribe(msg: Mapping[str, object], max_per_request: int) -> Subscribe:
    if msg.get("channel") == "portfolio":
        return Subscribe(Channel.PORTFOLIO, portfolio=msg.get("portfolio"))
    symbols = parse_symbols(msg.get("symbols"), max_per_request)
    batch = flag(msg["batch"]) if "batch" in msg else None
    channel = _channel(msg)
    if channel is Channel.BARS:
        return Subscribe(channel, symbols, interval=_interval(msg, required=True), batch=batch)
    since, epoch = resume_fields(msg.get("since"), msg.get("epoch"), symbols)
    options = delivery_options(msg)
    return Subscribe(channel, symbols, since=since, epoch=epoch, batch=batch, options=options)


def _unsubscribe(msg: Mapping[str, object], max_per_request: int) -> Unsubscribe:
    if msg.get("channel") == "portfolio":
        return Unsubscribe(Channel.PORTFOLIO, portfolio=msg.get("portfolio"))
    symbols = parse_symbols(msg.get("symbols"), max_per_request)
    channel = _channel(msg)
    interval = _interval(msg, required=False) if channel is Channel.BARS else None
    return Unsubscribe(channel, symbols, interval=interval)


def _alert_create(msg: Mapping[str, object], _max: int) -> AlertCreate:
    rule = msg.get("rule")
    if not isinstance(rule, dict):
        raise ProtocolError("missing_field", '\'rule\' is required: an object, e.g. {"type":"above",...}')
    return AlertCreate(rule)


def _alert_delete(msg: Mapping[str, object], _max: int) -> AlertDelete:
    rule_id = msg.get("id")
    if not isinstance(rule_id, str):
        raise ProtocolError("missing_field", "'id' is required: the rule's id")
    return AlertDelete(rule_id)


# The client protocol's actions, one parser each.
_PARSERS: Final[Mapping[str, Callable[[Mapping[str, object], int], Action]]] = MappingProxyType(
    {
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "ping": lambda _msg, _max: Ping(),
        "list": lambda _msg, _max: ListSubscriptions(),
        "auth": lambda msg, _max: Auth(msg.get("token")),
        "alert_create": _alert_create,
        "alert_delete": _alert_delete,
        "alerts": lambda _msg, _max: AlertList(),
    }
)


# ---------------------------------------------------------------------- replies


def error_reply(code: str, message: str, action: object = None) -> dict[str, object]:
    """An ``error`` message; names the action when the client's message had a readable one."""
    fields: dict[str, object] = {"code": code, "message": message}
    if isinstance(action, str):
        fields["action"] = action
    return control("error", **fields)


def rate_limited_reply(wait: float, what: str, action: str | None = None) -> dict[str, object]:
    """A ``rate_limited`` error saying when to try again (``retry_after_ms``, at least 1)."""
    fields: dict[str, object] = {
        "code": "rate_limited",
        "message": f"too many {what}; slow down",
        "retry_after_ms": max(1, math.ceil(wait * 1000)),
    }
    if action is not None:
        fields["action"] = action  # known for subscribe/unsubscribe, not for a message never read
    return control("error", **fields)
