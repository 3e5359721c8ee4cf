"""Log formats, and secrets masked in every line whatever the format."""

from __future__ import annotations

import io
import json
import logging

import pytest

from trio_relay.logsetup import configure_logging

SECRET = "sk-live-0123456789abcdef"


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _emit(log: logging.Logger) -> None:
    log.info("[CONNECT] connecting with key %s", SECRET)
    try:
        raise ValueError(f"provider said: bad key {SECRET}")
    except ValueError:
        log.exception("[AUTH] failed")


def test_json_lines_parse_and_never_hold_the_secret(restore_root):
    stream = io.StringIO()
    configure_logging("INFO", secrets=[SECRET], stream=stream, fmt="json")
    _emit(logging.getLogger("trio_relay.test"))
    lines = stream.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["level"] for e in entries] == ["INFO", "ERROR"]
    assert entries[0]["logger"] == "trio_relay.test" and entries[0]["msg"] == "[CONNECT] connecting with key ***"
    assert entries[0]["ts"].endswith("+00:00") and "ValueError" in entries[1]["exc"]
    assert SECRET not in stream.getvalue()


def test_text_format_is_the_specs_and_masks_the_secret(restore_root):
    stream = io.StringIO()
    configure_logging("INFO", secrets=[SECRET], stream=stream)
    _emit(logging.getLogger("trio_relay.upstream"))
    first = stream.getvalue().splitlines()[0]
    assert " - trio_relay.upstream - INFO - [CONNECT] connecting with key ***" in first
    assert SECRET not in stream.getvalue()


def test_every_configured_secret_is_masked(restore_root):
    from trio_relay.config import load_config

    values = {
        "FMP_API_KEY": "fmp-0123456789abcdef",
        "FINNHUB_API_KEY": "fh-0123456789abcdef",
        "APCA_API_KEY_ID": "apca-id-0123456789",
        "APCA_API_SECRET_KEY": "apca-sk-0123456789",
        "POLYGON_API_KEY": "pg-0123456789abcdef",
        "TRIO_RELAY_AUTH_SECRET": "jwt-secret-0123456789abcdef-0123456789",
    }
    config = load_config(environ=values, dotenv=None)
    assert sorted(config.secrets()) == sorted(values.values())
    stream = io.StringIO()
    configure_logging("INFO", secrets=config.secrets(), stream=stream)
    log = logging.getLogger("trio_relay.test")
    for value in values.values():
        log.info("leaking %s", value)
    assert all(line.endswith("leaking ***") for line in stream.getvalue().splitlines())
    assert not any(value in stream.getvalue() for value in values.values())
