"""The command line's manners: complete help, a version, no reST markup in what people read."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from trio_relay import __version__
from trio_relay.cli import _parser

COMMANDS = ["serve", "watch", "record", "archive", "fake-fmp"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_top_level_help_lists_every_command_in_plain_text() -> None:
    text = _parser().format_help()
    for command in COMMANDS:
        assert f"    {command} " in text, text
    assert "`" not in text and "--version" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_every_command_says_what_it_does(command: str) -> None:
    parser = _subparsers()[command]
    undocumented = [
        a.option_strings or [a.dest]
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert undocumented == []
    assert "`" not in parser.format_help()


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "trio_relay", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"trio-relay {__version__}"
    assert __version__ != "0+unknown"  # read from the installed package's metadata
