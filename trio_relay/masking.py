"""The one function that masks secrets in text bound for a log line, /health, /status or a client.

Provider errors are the usual carrier: a vendor's refusal may quote the API key, a library's
exception may quote the URL it was given (with ``?apikey=...`` or ``user:password@``). Every such
text passes :func:`mask_secrets` with the configured secret values before it is stored or shown:
the upstream layer does it for every provider's error (:class:`~trio_relay.upstream.Upstream`),
the log filter for every record (:class:`~trio_relay.logsetup.RedactSecrets`), the history
backends for the database's errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote

__all__ = ["mask_secrets", "MASK"]

MASK: Final = "***"
# Shorter values would mask ordinary words in every message; real keys and passwords are longer.
_MIN_SECRET: Final = 6
_USERINFO: Final = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_QUERY_SECRET: Final = re.compile(
    r"(?<![A-Za-z0-9_])((?:api[_-]?key|apikey|token|access[_-]?token|secret|password|passwd|key)=)[^&\s\"']+",
    re.IGNORECASE,
)


def mask_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each secret (as is and URL-encoded), URL passwords and key-like query values masked.

    Longest secrets first, so a secret that contains another is masked whole.
    """
    forms: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET:
            forms.update((secret, quote(secret, safe=""), quote(secret)))
    for form in sorted(forms, key=len, reverse=True):
        if form in text:
            text = text.replace(form, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    return _QUERY_SECRET.sub(rf"\1{MASK}", text)
