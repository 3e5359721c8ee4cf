"""JSON responses of the REST routes: bodies encoded with msgspec, errors as {"error", "message"}."""

from __future__ import annotations

import msgspec
from quart import Response

__all__ = ["json_response", "error_response"]

_encoder = msgspec.json.Encoder()


def json_response(body: object, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status=status, mimetype="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    """Every REST error: a code for programs and a message for people."""
    return json_response({"error": code, "message": message}, status)
