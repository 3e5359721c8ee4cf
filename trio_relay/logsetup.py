"""Logging in the spec's format, with every known secret masked on the way out."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

import msgspec

from .masking import mask_secrets

__all__ = ["configure_logging", "RedactSecrets", "JsonFormatter", "LOG_FORMAT"]

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


class RedactSecrets(logging.Filter):
    """Replaces each secret in a record's final text (message and traceback) with ``***``.

    Defence in depth: no code path logs a key on purpose, but an exception text from a library
    could quote one.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Very short "secrets" would mask ordinary words; real keys are long.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def _mask(self, text: str) -> str:
        return mask_secrets(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = self._mask(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._mask(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return msgspec.json.encode(entry).decode()


def configure_logging(
    level: str = "INFO", secrets: Iterable[str] = (), stream: object = None, fmt: str = "text"
) -> logging.Handler:
    """Install one stderr handler on the root logger (replacing earlier ones of ours)."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT))
    handler.addFilter(RedactSecrets(secrets))
    handler.set_name("trio_relay")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "trio_relay":
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # coredis reports each script's first load (a NOSCRIPT retry) at INFO: not news for operators.
    logging.getLogger("coredis").setLevel(logging.WARNING)
    # Hypercorn serves REST on a private loopback port behind the front door; its INFO line
    # "Running on http://127.0.0.1:<private port>" would be the log's first address and the
    # wrong one. Its warnings and errors still come through.
    logging.getLogger("hypercorn.error").setLevel(logging.WARNING)
    return handler
