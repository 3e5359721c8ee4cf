"""JSON from clients (REST bodies, WebSocket messages), decoded with a bound on nesting depth.

``[[[[...]]]]`` ten thousand deep is a few kilobytes that make a recursive decoder (msgspec's,
and every consumer of its result) exhaust the stack: a ``RecursionError`` where a client error
belongs. :func:`decode_json` refuses anything nested deeper than ``limits.json_max_depth`` with
:class:`JsonError` before decoding it; every client-facing decode goes through it.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

__all__ = ["JsonError", "decode_json", "json_depth"]

# A string (escapes included) or one bracket: what a depth count needs to see.
_TOKENS: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_DECODER: Final = msgspec.json.Decoder()


class JsonError(ValueError):
    """Not JSON, or nested too deep; ``code`` (``invalid_json`` or ``json_too_deep``) and the message are safe to show."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def json_depth(data: bytes, stop_after: int) -> int:
    """The deepest nesting of arrays and objects in ``data`` (counting stops past ``stop_after``)."""
    if data.count(b"[") + data.count(b"{") <= stop_after:
        return 0  # cannot be deeper: the usual case costs two C-speed counts
    depth = deepest = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_after:
                    break
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def decode_json(data: bytes | str, max_depth: int) -> Any:
    """``data`` decoded; :class:`JsonError` if it is not JSON or nests deeper than ``max_depth``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if json_depth(raw, max_depth) > max_depth:
        raise JsonError("json_too_deep", f"JSON nested deeper than {max_depth} levels (limits.json_max_depth)")
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        raise JsonError("invalid_json", f"invalid JSON: {exc}") from None
    except RecursionError:  # only with a max_depth above what the stack allows
        raise JsonError("json_too_deep", "JSON nested too deep") from None
