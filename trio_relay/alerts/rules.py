"""Alert rules and fired alerts: the msgspec types, their JSON, and the validation of a new rule.

This module is the alerts' converter (STYLE: "structure at the edge"): a client's JSON becomes a
typed :data:`Rule` in :func:`parse_rule`, which either returns a valid rule or raises
:class:`RuleError` with a stable ``code`` and a message meant for the person who wrote the rule.
Inside the relay only the typed objects travel.

A rule's JSON (what a client sends; ``type`` and ``symbol`` always, the rest per type)::

    {"type": "above", "symbol": "AAPL", "level": 280, "field": "last",
     "name": "AAPL breakout", "one_shot": false, "cooldown_s": 600,
     "webhook": "https://hooks.example.com/x"}

and what the relay returns adds ``id``, ``owner``, ``created_at`` and the runtime fields
``state`` (``armed`` | ``active`` | ``cooling`` | ``fired``), ``fired_at`` and ``fire_count``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import urlsplit

import msgspec

from ..jsonbody import JsonError, decode_json
from ..model import SYMBOL_RE
from .targets import WebhookPolicy, WebhookRefused

__all__ = [
    "Rule",
    "AboveRule",
    "BelowRule",
    "MoveRule",
    "SpreadRule",
    "StaleRule",
    "FiredAlert",
    "RuleError",
    "parse_rule",
    "rule_params",
    "decode_rule",
    "encode_rule",
    "RULE_TYPES",
    "ARMED",
    "ACTIVE",
    "COOLING",
    "FIRED",
]

RULE_TYPES: Final = ("above", "below", "move", "spread", "stale")
PRICE_FIELDS: Final = ("last", "bid", "ask", "mid")

# Runtime states of a rule (see the package docstring for the state machine).
ARMED: Final = "armed"  # waits for the condition to be false (price on the near side) once
ACTIVE: Final = "active"  # the next update where the condition holds fires
COOLING: Final = "cooling"  # fired, re-arming rule: waits for cooldown_s
FIRED: Final = "fired"  # fired, one-shot: done for good

PriceField: TypeAlias = Literal["last", "bid", "ask", "mid"]

# Bounds a rule must respect: beyond them a value is a typo, not an intention.
MAX_PRICE: Final = 1e12
MAX_WINDOW_S: Final = 86_400.0  # a move is measured over at most a day
MAX_STALE_S: Final = 7 * 86_400.0
MAX_COOLDOWN_S: Final = 30 * 86_400.0
MAX_PCT: Final = 1_000.0
MAX_SPREAD_BPS: Final = 100_000.0
MAX_NAME: Final = 100
MAX_URL: Final = 2_048
MAX_DEPTH: Final = 32  # a rule is a flat object; raw JSON given to parse_rule nests no deeper than this


class RuleError(ValueError):
    """A rule was refused. ``code`` is stable (for programs), ``message`` says why (for people).

    Codes: ``invalid_json``, ``missing_field``, ``unknown_type``, ``unknown_field``,
    ``invalid_value``, ``invalid_symbol``, ``invalid_webhook``, ``webhook_host_not_allowed``,
    ``rule_limit``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RuleError({self.code!r}, {self.message!r})"


class _RuleBase(msgspec.Struct, kw_only=True, tag_field="type"):
    id: str
    owner: str
    symbol: str
    name: str | None = None
    one_shot: bool = True
    cooldown_s: float = 0.0
    webhook: str | None = None
    created_at: int = 0  # wall clock, UTC epoch ms
    # Set by the relay: the rule keeps its symbol subscribed upstream (created by a user who may
    # pin: an admin, or anyone with auth off). Otherwise it fires only while the symbol is wanted.
    pins: bool = False
    # Runtime, kept by the engine and stored by AlertStore when the rule is saved or fires.
    state: str = ARMED
    # When it last fired, in the time the rule's cooldown is counted in: the firing update's
    # event timestamp (stale rules: the engine clock at the check), epoch ms.
    fired_at: int | None = None
    fire_count: int = 0


class AboveRule(_RuleBase, kw_only=True, tag="above"):
    """Fires when ``field`` goes from below ``level`` to ``level`` or above."""

    level: float
    field: PriceField = "last"


class BelowRule(_RuleBase, kw_only=True, tag="below"):
    """Fires when ``field`` goes from above ``level`` to ``level`` or below."""

    level: float
    field: PriceField = "last"


class MoveRule(_RuleBase, kw_only=True, tag="move"):
    """Fires on a move of ``pct`` percent within ``window_s`` seconds of event time.

    ``pct > 0``: the price is at least ``pct`` % above the lowest price of the window;
    ``pct < 0``: at least ``-pct`` % below the highest price of the window.
    """

    pct: float
    window_s: float
    field: PriceField = "last"


class SpreadRule(_RuleBase, kw_only=True, tag="spread"):
    """Fires when ask - bid is wider than ``max_spread`` (absolute) or ``max_spread_bps`` of mid."""

    max_spread: float | None = None
    max_spread_bps: float | None = None


class StaleRule(_RuleBase, kw_only=True, tag="stale"):
    """Fires when the symbol had no update for ``seconds`` (see ``AlertEngine.check_stale``)."""

    seconds: float


Rule: TypeAlias = AboveRule | BelowRule | MoveRule | SpreadRule | StaleRule

_TYPES: Final[dict[str, type[Rule]]] = {
    "above": AboveRule,
    "below": BelowRule,
    "move": MoveRule,
    "spread": SpreadRule,
    "stale": StaleRule,
}


class FiredAlert(msgspec.Struct, kw_only=True):
    """One firing of a rule: what clients, the store and webhooks receive (``type`` "alert").

    ``price`` is the price the rule looked at (spread: the mid; stale: the last trade, if any),
    ``value`` the measured quantity (above/below: the price; move: the move in %; spread: the
    spread, absolute or in bps as the rule says; stale: seconds without an update).
    ``timestamp`` is the event time of the update that fired it (stale: of the last update seen,
    0 if none); ``fired_at`` the relay's wall clock, both UTC epoch ms.
    """

    type: str = "alert"
    id: str
    rule_id: str
    owner: str
    symbol: str
    name: str | None = None
    rule: dict[str, Any]
    price: float | None
    value: float | None
    fired_at: int
    timestamp: int
    message: str


_COMMON: Final = frozenset({"type", "symbol", "name", "one_shot", "cooldown_s", "webhook"})
_SERVER: Final = ("id", "owner", "created_at", "state", "fired_at", "fire_count", "pins")
_SPECIFIC: Final[dict[str, tuple[str, ...]]] = {
    "above": ("level", "field"),
    "below": ("level", "field"),
    "move": ("pct", "window_s", "field"),
    "spread": ("max_spread", "max_spread_bps"),
    "stale": ("seconds",),
}
_REQUIRED: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "above": (("level", "the price to cross"),),
    "below": (("level", "the price to cross"),),
    "move": (("pct", "the move in percent, e.g. 2.0 or -2.0"), ("window_s", "the window in seconds")),
    "spread": (),
    "stale": (("seconds", "how long without an update"),),
}


def rule_params(rule: Rule) -> dict[str, Any]:
    """The rule's type and its type-specific parameters (the ``rule`` of a :class:`FiredAlert`)."""
    params: dict[str, Any] = {"type": _tag(rule)}
    for key in _SPECIFIC[params["type"]]:
        value = getattr(rule, key)
        if value is not None:
            params[key] = value
    return params


def _tag(rule: Rule) -> str:
    tag = type(rule).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Rule)


def encode_rule(rule: Rule) -> bytes:
    """The rule as JSON, runtime fields included."""
    return _encoder.encode(rule)


def decode_rule(data: bytes | str) -> Rule:
    """A rule from :func:`encode_rule`'s JSON (stored rules; not for client input: see parse_rule)."""
    rule: Rule = _decoder.decode(data)
    return rule


def parse_rule(
    data: bytes | str | Mapping[str, Any],
    *,
    owner: str,
    rule_id: str,
    created_at: int,
    allowed_hosts: Sequence[str] = (),
    pins: bool = False,
    policy: WebhookPolicy | None = None,
) -> Rule:
    """A new rule from a client's JSON (or the decoded object), validated; :class:`RuleError` if not.

    ``allowed_hosts``: the webhook hosts allowed (empty: any). The symbol is upper-cased.
    """
    obj = _rule_object(data)
    kind = _check_shape(obj)
    raw_symbol = obj["symbol"]
    symbol = raw_symbol.strip().upper() if isinstance(raw_symbol, str) else ""
    if not SYMBOL_RE.match(symbol):
        raise RuleError("invalid_symbol", f"invalid symbol {raw_symbol!r}")

    fields: dict[str, Any] = dict(obj)
    fields.update(id=rule_id, owner=owner, symbol=symbol, created_at=created_at, pins=pins)
    _check_numbers(kind, fields)
    _check_options(fields)
    webhook = fields.get("webhook")
    if webhook is not None:
        fields["webhook"] = check_webhook(webhook, allowed_hosts, policy)
    try:
        return msgspec.convert(fields, type=_TYPES[kind])
    except msgspec.ValidationError as e:  # anything the checks above did not name
        raise RuleError("invalid_value", _readable(str(e))) from None


def _rule_object(data: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    """The rule as a mapping (decoded with the depth limit when it is JSON text)."""
    if isinstance(data, (bytes, str)):
        try:
            obj = decode_json(data, MAX_DEPTH)
        except JsonError as e:
            raise RuleError(e.code, e.message) from None
    else:
        obj = data
    if not isinstance(obj, Mapping):
        raise RuleError("invalid_json", "a rule must be a JSON object")
    return obj


def _check_shape(obj: Mapping[str, Any]) -> str:
    """The rule's type, once its keys are known: the type's own, none set by the relay, none missing."""
    kind = obj.get("type")
    if kind is None:
        raise RuleError("missing_field", f"'type' is required (one of: {', '.join(RULE_TYPES)})")
    if not isinstance(kind, str) or kind not in _TYPES:
        raise RuleError("unknown_type", f"unknown rule type {kind!r} (expected one of: {', '.join(RULE_TYPES)})")
    for key in _SERVER:
        if key in obj:
            raise RuleError("unknown_field", f"'{key}' is set by the relay, not by the client")
    allowed = _COMMON.union(_SPECIFIC[kind])
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise RuleError(
            "unknown_field",
            f"unknown field {unknown[0]!r} for {_a(kind)} rule (allowed: {', '.join(sorted(allowed - {'type'}))})",
        )
    if "symbol" not in obj:
        raise RuleError("missing_field", f"{_a(kind)} rule needs 'symbol'")
    for key, what in _REQUIRED[kind]:
        if obj.get(key) is None:
            raise RuleError("missing_field", f"{_a(kind)} rule needs {key!r} ({what})")
    return kind


def _check_options(fields: Mapping[str, Any]) -> None:
    """name, one_shot, cooldown_s and field: the options every rule type may have."""
    name = fields.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
        raise RuleError("invalid_value", f"name must be a string of at most {MAX_NAME} characters")
    if "one_shot" in fields and not isinstance(fields["one_shot"], bool):
        raise RuleError("invalid_value", f"one_shot must be true or false, got {fields['one_shot']!r}")
    if fields.get("one_shot", True) and fields.get("cooldown_s"):
        raise RuleError("invalid_value", "cooldown_s applies to re-arming rules: set one_shot to false")
    if "field" in fields and fields["field"] not in PRICE_FIELDS:
        raise RuleError("invalid_value", f"field must be one of {', '.join(PRICE_FIELDS)}, got {fields['field']!r}")


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind!r}"


def check_webhook(url: object, allowed_hosts: Sequence[str] = (), policy: WebhookPolicy | None = None) -> str:
    """``url`` if it is an http(s) URL to an allowed host (empty ``allowed_hosts``: any), else RuleError.

    ``policy`` (default: public addresses only, nothing trusted) refuses a literal non-public
    address or a ``localhost`` name here; names are resolved by :meth:`WebhookPolicy.vet`.
    """
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise RuleError(
            "invalid_webhook", f"webhook must be an http:// or https:// URL of at most {MAX_URL} characters"
        )
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise RuleError("invalid_webhook", f"webhook {url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RuleError("invalid_webhook", f"webhook must be an http:// or https:// URL with a host, got {url!r}")
    host = parts.hostname.lower()
    if allowed_hosts and host not in {h.lower() for h in allowed_hosts}:
        raise RuleError(
            "webhook_host_not_allowed", f"webhook host {host!r} is not allowed (allowed: {', '.join(allowed_hosts)})"
        )
    try:
        (policy or WebhookPolicy()).check_url_host(host)
    except WebhookRefused as exc:
        raise RuleError("webhook_refused", str(exc)) from None
    return url


def _check_numbers(kind: str, fields: dict[str, Any]) -> None:
    def number(key: str) -> float | None:
        value = fields.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RuleError("invalid_value", f"{key} must be a number, got {value!r}")
        return float(value)

    cooldown = number("cooldown_s")
    if cooldown is not None and not 0 <= cooldown <= MAX_COOLDOWN_S:
        raise RuleError(
            "invalid_value", f"cooldown_s must be between 0 and {MAX_COOLDOWN_S:.0f} seconds, got {cooldown:g}"
        )
    if kind in ("above", "below"):
        level = number("level")
        assert level is not None
        if not 0 < level < MAX_PRICE:
            raise RuleError("invalid_value", f"level must be a positive price below {MAX_PRICE:g}, got {level:g}")
    elif kind == "move":
        pct, window = number("pct"), number("window_s")
        assert pct is not None and window is not None
        if pct == 0 or not -100 < pct <= MAX_PCT:
            raise RuleError(
                "invalid_value",
                f"pct must be non-zero, above -100 and at most {MAX_PCT:g} (2.0: a rise of 2% or more, "
                f"-2.0: a fall of 2% or more), got {pct:g}",
            )
        if not 1 <= window <= MAX_WINDOW_S:
            raise RuleError(
                "invalid_value", f"window_s must be between 1 and {MAX_WINDOW_S:.0f} seconds, got {window:g}"
            )
    elif kind == "spread":
        absolute, bps = number("max_spread"), number("max_spread_bps")
        if absolute is None and bps is None:
            raise RuleError(
                "missing_field",
                "a 'spread' rule needs 'max_spread' (absolute) or 'max_spread_bps' (basis points of mid)",
            )
        if absolute is not None and bps is not None:
            raise RuleError("invalid_value", "give either 'max_spread' or 'max_spread_bps', not both")
        if absolute is not None and not 0 < absolute < MAX_PRICE:
            raise RuleError(
                "invalid_value", f"max_spread must be a positive price below {MAX_PRICE:g}, got {absolute:g}"
            )
        if bps is not None and not 0 < bps <= MAX_SPREAD_BPS:
            raise RuleError(
                "invalid_value", f"max_spread_bps must be above 0 and at most {MAX_SPREAD_BPS:g}, got {bps:g}"
            )
    elif kind == "stale":
        seconds = number("seconds")
        assert seconds is not None
        if not 1 <= seconds <= MAX_STALE_S:
            raise RuleError("invalid_value", f"seconds must be between 1 and {MAX_STALE_S:.0f}, got {seconds:g}")


_AT = re.compile(r"^(?P<msg>.*) - at `\$\.(?P<key>[^`]+)`$")


def _readable(message: str) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.name`" as "name: expected `str`, got `int`"."""
    m = _AT.match(message)
    if m is None:
        return message
    msg = m["msg"]
    return f"{m['key']}: {msg[:1].lower()}{msg[1:]}"
