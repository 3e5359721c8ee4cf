"""Command line: ``trio-relay serve`` runs the daemon; the other subcommands are its tools.

``serve`` (the relay), ``watch`` (live prices in a terminal), ``record`` (ticks to a file for
``--provider replay``), ``archive`` (a fleet's tick stream into the history) and ``fake-fmp``
(a local server speaking FMP's protocol, for demos and tests).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import trio

from .config import ConfigError, load_config
from .logsetup import configure_logging
from .providers import registry
from .recording.record import add_record_parser

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    """The command line: every command and flag (long on purpose: one declaration per flag, in
    the order ``--help`` shows them, so it reads as the help does)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="trio-relay",
        description="Relay one upstream market-data WebSocket to many browser clients.",
        epilog="Run 'trio-relay COMMAND --help' for a command's options. Docs: README.md and docs/ in the project.",
    )
    parser.add_argument("--version", action="version", version=f"trio-relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    serve = sub.add_parser("serve", help="run the relay daemon")
    serve.add_argument("--config", help="TOML config file (see config/trio-relay.toml)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument(
        "--provider",
        choices=["auto", *registry.names(aliases=True)],
        help="upstream provider (default: fmp if FMP_API_KEY is set, else sim; relay = another trio-relay)",
    )
    serve.add_argument(
        "--upstream-url", help="the provider's WebSocket URL (FMP override, or the upstream relay's price socket)"
    )
    serve.add_argument("--replay-file", help='for --provider replay: a recording (default "demo", the one shipped)')
    serve.add_argument("--speed", type=float, help="for --provider replay: playback speed (10 = ten times faster)")
    serve.add_argument(
        "--loop", action="store_true", default=None, help="for --provider replay: start again at the end"
    )
    serve.add_argument("--workers", type=int, help="worker processes sharing one upstream connection (default 1)")
    serve.add_argument("--symbols", help="comma-separated symbols pinned upstream from the start")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default INFO)")

    fake = sub.add_parser("fake-fmp", help="run a local server that speaks FMP's protocol (for demos and tests)")
    fake.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    fake.add_argument("--port", type=int, default=8765, help="port to listen on (default: %(default)s)")
    fake.add_argument("--key", action="append", help="accepted API key (repeatable; default: demo-key)")
    fake.add_argument(
        "--rate", type=float, default=5.0, help="frames per second per subscribed symbol (default: %(default)s)"
    )
    fake.add_argument("--seed", type=int, default=7, help="random seed of the simulated prices (default: %(default)s)")
    fake.add_argument(
        "--control",
        action="store_true",
        help="read fault commands from stdin even when it is not a terminal (drop, stall, resume, malformed N, status)",
    )

    add_record_parser(sub)

    archive = sub.add_parser(
        "archive",
        help="write a fleet's tick stream (<engine.prefix>:ticks, engine.stream_maxlen > 0) into the tick history",
    )
    archive.add_argument("--config", help="TOML config file: [engine] redis_url and prefix, [history] the store")
    archive.add_argument("--group", default="history", help="the Redis consumer group (default: history)")
    archive.add_argument("--consumer", default="", help="this archiver's name in the group (default: the host name)")
    archive.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default INFO)")

    watch = sub.add_parser("watch", help="show live prices from a relay in a terminal table (Ctrl-C to quit)")
    watch.add_argument("symbols", nargs="+", help="symbols to watch: AAPL MSFT (or AAPL,MSFT)")
    watch.add_argument(
        "--url",
        default="ws://127.0.0.1:8000/api/v2/realtime/ws/prices",
        help="the relay's price WebSocket (default: %(default)s)",
    )
    watch.add_argument("--token", help="JWT for a relay with auth on (default: $TRIO_RELAY_TOKEN)")
    watch.add_argument("--batch", action="store_true", help="ask for batched frames (many symbols, high rates)")
    watch.add_argument("--count", type=int, metavar="N", help="exit after N price updates")
    watch.add_argument(
        "--give-up-after",
        type=float,
        metavar="SECONDS",
        help="exit with status 1 when the relay cannot be reached for this long (default: 10 with --count, else never; 0 = never)",
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if args.host is not None:
        out.setdefault("server", {})["host"] = args.host
    if args.port is not None:
        out.setdefault("server", {})["port"] = args.port
    if args.provider is not None:
        out.setdefault("upstream", {})["provider"] = args.provider
    if args.upstream_url is not None:
        # The named network provider's url; with no provider (or "auto") FMP's, auto's choice.
        entry = registry.entry(args.provider or "")
        out.setdefault(entry.name if entry is not None and entry.network else "fmp", {})["url"] = args.upstream_url
    if args.workers is not None:
        out.setdefault("server", {})["workers"] = args.workers
    for flag, key in (("replay_file", "file"), ("speed", "speed"), ("loop", "loop")):
        if getattr(args, flag, None) is not None:
            out.setdefault("replay", {})[key] = getattr(args, flag)
    if args.symbols is not None:
        out.setdefault("upstream", {})["pinned"] = [s for s in args.symbols.split(",") if s.strip()]
    if args.log_level is not None:
        out.setdefault("logging", {})["level"] = args.log_level
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "record":
        from .recording.record import run_record

        return run_record(args)
    if args.command == "watch":
        from .watch import main as watch_main

        return watch_main(args)
    if args.command == "fake-fmp":
        from .testing.fake_fmp_cli import run_fake_fmp

        configure_logging("INFO")
        trio.run(run_fake_fmp, args)
        return 0
    if args.command == "archive":
        from .archive import main as archive_main

        return archive_main(args)
    try:
        config = load_config(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"trio-relay: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, secrets=config.secrets(), fmt=config.logging.format)
    from .daemon import run_relay
    from .runtime import run_serve
    from .workers import run_workers

    runner = run_workers if config.server.workers > 1 else run_relay
    return run_serve(config, runner, lambda: load_config(args.config, overrides=_overrides(args)))
