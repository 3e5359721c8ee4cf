"""What every configuration section is made of: the error type and the field validators.

A leaf module (it imports nothing of the package at load time), so a provider can define its own
settings section next to its protocol code without importing :mod:`trio_relay.config`, which
gathers the sections of every provider through the registry.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["ConfigError", "FieldError", "positive", "non_negative", "port", "ws_url", "no_query", "symbol_map"]


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""


class FieldError(ValueError):
    """Raised by a validator: carries the field name so the message can name the full key."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise FieldError(attr.name, f"must be > 0 (got {value!r})")


def non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise FieldError(attr.name, f"must be >= 0 (got {value!r})")


def port(_inst: object, attr: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise FieldError(attr.name, f"must be between 0 and 65535 (got {value!r})")


def ws_url(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    if value and not value.startswith(("ws://", "wss://")):
        raise FieldError(attr.name, f"must start with ws:// or wss:// (got {value!r})")


def no_query(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    if "?" in value:
        raise FieldError(attr.name, "must not have a query (put the token in api_key / FINNHUB_API_KEY)")


def symbol_map(_inst: object, attr: attrs.Attribute[Any], value: dict[str, str]) -> None:
    """A provider's extra symbol table: client-facing symbol → the provider's own spelling."""
    from .model import SYMBOL_RE

    for canonical, native in value.items():
        if not SYMBOL_RE.match(canonical):
            raise FieldError(attr.name, f"{canonical!r} is not a valid client-facing symbol")
        if not native or not isinstance(native, str):
            raise FieldError(attr.name, f"{canonical!r} maps to an empty provider symbol")
