"""Command line: ``trio-relay serve`` runs the daemon; the other subcommands are its tools.

``serve`` (the relay), ``watch`` (live prices in a terminal), ``record`` (ticks to a file for
``--provider replay``), ``archive`` (a fleet's tick stream into the history) and ``fake-fmp``
(a local server speaking FMP's protocol, for demos and tests).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from .config import Config, ConfigError, load_config
from .logsetup import configure_logging
from .recording import add_record_parser
from .systemd import Notifier, run_watchdog, watchdog_interval

__all__ = ["main"]

log = logging.getLogger("trio_relay.cli")


def _parser() -> argparse.ArgumentParser:
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
        choices=["auto", "sim", "fmp", "finnhub", "alpaca", "polygon", "massive", "relay", "replay"],
        help="upstream provider (default: fmp if FMP_API_KEY is set, else sim; relay = another trio-relay)",
    )
    serve.add_argument("--upstream-url", help="the provider's WebSocket URL (FMP override, or the upstream relay's price socket)")
    serve.add_argument("--replay-file", help='for --provider replay: a recording (default "demo", the one shipped)')
    serve.add_argument("--speed", type=float, help="for --provider replay: playback speed (10 = ten times faster)")
    serve.add_argument("--loop", action="store_true", default=None, help="for --provider replay: start again at the end")
    serve.add_argument("--workers", type=int, help="worker processes sharing one upstream connection (default 1)")
    serve.add_argument("--symbols", help="comma-separated symbols pinned upstream from the start")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default INFO)")

    fake = sub.add_parser("fake-fmp", help="run a local server that speaks FMP's protocol (for demos and tests)")
    fake.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    fake.add_argument("--port", type=int, default=8765, help="port to listen on (default: %(default)s)")
    fake.add_argument("--key", action="append", help="accepted API key (repeatable; default: demo-key)")
    fake.add_argument("--rate", type=float, default=5.0, help="frames per second per subscribed symbol (default: %(default)s)")
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
        section = {"relay": "relay", "finnhub": "finnhub", "alpaca": "alpaca", "polygon": "polygon", "massive": "polygon"}
        out.setdefault(section.get(args.provider or "", "fmp"), {})["url"] = args.upstream_url
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


def _tune_gc() -> None:
    """Keep Python's cyclic GC from stalling every client at once (the process is ours).

    What exists once the relay runs lives as long as the process: freeze it out of the
    collector's scans. And collect young objects less often: the hot path allocates little that
    can form cycles. Measured at 1,000 clients and 100,000 updates/s: latency p99 from 94 ms to
    6-24 ms.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def serve_until_signalled(config: Config, reload: Callable[[], Config] | None = None) -> None:
    """Run the relay (or the feeder and its workers) until SIGINT/SIGTERM, then shut down cleanly.

    SIGHUP calls ``reload()`` (the config file and flags, read again) and applies the result
    without dropping clients; a config that does not load is refused and the old one stays.
    """
    from .daemon import run_relay
    from .workers import run_workers

    runner: Any = run_workers if config.server.workers > 1 else run_relay
    notifier = Notifier()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(runner, config)
            _tune_gc()
            hub_relay = relay.feeder if config.server.workers > 1 else relay  # who holds the upstream

            def status() -> str:
                hub = hub_relay.hub
                return f"upstream {hub_relay.upstream.state}; {len(hub.clients)} clients; {len(hub.cache)} symbols"

            notifier.notify("READY=1", f"STATUS={status()}", f"MAINPID={os.getpid()}")
            watchdog = trio.CancelScope()
            interval = watchdog_interval()
            if notifier.enabled and interval:
                log.info("[SYSTEMD] watchdog pings every %.1fs while the hub makes progress", interval)

                async def ping() -> None:
                    with watchdog:
                        await run_watchdog(notifier, interval, hub_relay.hub.making_progress, status)

                nursery.start_soon(ping)
            # If the relay fails on its own, the nursery cancels this wait.
            async for signum in signals:
                if signum == signal.SIGHUP:
                    _reload(relay, reload, notifier)
                    continue
                log.info("[SIGNAL] %s received; shutting down", signal.Signals(signum).name)
                notifier.notify("STOPPING=1", "STATUS=shutting down")
                watchdog.cancel()
                relay.shutdown()
                break
    notifier.close()


def _reload(relay: Any, reload: Callable[[], Config] | None, notifier: Notifier) -> None:
    if reload is None:
        log.warning("[RELOAD] SIGHUP ignored: nothing to reload from")
        return
    notifier.notify("RELOADING=1")
    try:
        new = reload()
    except ConfigError as exc:
        log.error("[RELOAD] rejected, keeping the running configuration: %s", exc)
    else:
        secrets = [*relay.config.secrets(), *new.secrets()]
        configure_logging(new.logging.level, secrets=secrets, fmt=new.logging.format)
        try:
            changes = relay.reload(new)
        except ConfigError as exc:  # e.g. a replay file that does not load
            log.error("[RELOAD] rejected, keeping the running configuration: %s", exc)
        else:
            log.info("[RELOAD] applied: %s", "; ".join(changes) or "nothing changed")
    notifier.notify("READY=1")


FAKE_COMMANDS = "drop | stall | resume | malformed [N] | status"


async def _fake_control(server: Any, stream: trio.abc.ReceiveStream) -> None:
    """Read fault commands, one per line, and apply them to the fake server."""
    buffer = b""
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            words = raw.decode(errors="replace").split()
            if not words:
                continue
            cmd, rest = words[0].lower(), words[1:]
            if cmd == "drop":
                print(f"dropped {await server.drop_all()} connection(s)", flush=True)
            elif cmd == "stall":
                server.stall()
                print("stalled: sending nothing (no data, no heartbeats) until 'resume'", flush=True)
            elif cmd == "resume":
                server.resume()
                print("resumed", flush=True)
            elif cmd == "malformed":
                count = int(rest[0]) if rest and rest[0].isdigit() else 6
                server.send_malformed(count)
                print(f"queued {count} malformed frame(s)", flush=True)
            elif cmd == "status":
                print(
                    f"connections={len(server.connections)} logins={server.logins} "
                    f"failed_logins={server.failed_logins} subscribed={sorted(server.subscriptions)} "
                    f"frames_sent={server.frames_sent}",
                    flush=True,
                )
            else:
                print(f"unknown command {cmd!r}; commands: {FAKE_COMMANDS}", flush=True)


async def _fake_fmp(args: argparse.Namespace) -> None:
    from .testing.fake_fmp import FakeFmpServer

    server = FakeFmpServer(api_keys=args.key or ["demo-key"], rate=args.rate, seed=args.seed)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, args.host, args.port)
            print(f"fake FMP server listening on {server.url} (keys: {len(server.api_keys)})", flush=True)
            if sys.stdin is not None and sys.stdin.isatty() or args.control:
                print(f"commands on stdin: {FAKE_COMMANDS}", flush=True)
                nursery.start_soon(_fake_control, server, trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _archive(args: argparse.Namespace) -> int:
    from .archive import run_archive

    overrides = {"logging": {"level": args.log_level}} if args.log_level else {}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"trio-relay: {exc}", file=sys.stderr)
        return 2
    if config.history.backend == "off":
        print("trio-relay: config error: history.backend: 'off' leaves nothing to archive into", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, secrets=config.secrets(), fmt=config.logging.format)
    trio.run(partial(run_archive, config, group=args.group, consumer=args.consumer))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "record":
        from .recording import run_record

        return run_record(args)
    if args.command == "watch":
        from .watch import main as watch_main

        return watch_main(args)
    if args.command == "fake-fmp":
        configure_logging("INFO")
        trio.run(_fake_fmp, args)
        return 0
    if args.command == "archive":
        return _archive(args)
    try:
        config = load_config(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"trio-relay: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, secrets=config.secrets(), fmt=config.logging.format)
    from .upstream import UpstreamGaveUp

    code = 0
    try:
        trio.run(serve_until_signalled, config, lambda: load_config(args.config, overrides=_overrides(args)))
    except* UpstreamGaveUp as group:
        log.error("[EXIT] upstream gave up: %s", group.exceptions[0])
        code = 1
    except* ConfigError as group:
        # Found while starting (e.g. TLS files that do not load): same exit as a bad config.
        print(f"trio-relay: {group.exceptions[0]}", file=sys.stderr)
        code = 2
    return code
