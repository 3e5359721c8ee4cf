"""JSON responses of the REST routes: bodies encoded with msgspec, errors as {"error", "message"}."""

from __future__ import annotations

import msgspec
from quart import Response, g

from ..auth import Security
from ..entitlements import Entitlement, EntitlementError, entitlement_for

__all__ = ["PREFIX", "json_response", "error_response", "entitlement", "entitlement_error"]

#: Where the REST routes live (the health, status, pins, cache, history, alerts, portfolios).
PREFIX = "/api/v2/realtime"

_encoder = msgspec.json.Encoder()


def json_response(body: object, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status=status, mimetype="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    """Every REST error: a code for programs and a message for people."""
    return json_response({"error": code, "message": message}, status)


def entitlement(security: Security) -> Entitlement:
    """The calling request's :class:`~trio_relay.entitlements.Entitlement` (its token, the live config)."""
    return entitlement_for(g.principal, security.config)


def entitlement_error(exc: EntitlementError) -> Response:
    return error_response(exc.status, exc.code, exc.message)
