"""``trio-relay fake-fmp``: the fake FMP server as a command, with fault commands on stdin."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import trio

from .fake_fmp import FakeFmpServer

__all__ = ["FAKE_COMMANDS", "run_fake_fmp"]


FAKE_COMMANDS = "drop | stall | resume | mute | unmute | idle-silent on|off | malformed [N] | status"


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
            elif cmd == "mute":
                server.deliver = False
                print("muted: logins, acknowledgements and heartbeats, but no data until 'unmute'", flush=True)
            elif cmd == "unmute":
                server.deliver = True
                print("unmuted: data flows again", flush=True)
            elif cmd == "idle-silent":
                server.idle_silent = bool(rest) and rest[0].lower() == "on"
                what = "no heartbeat" if server.idle_silent else "heartbeats"
                print(
                    f"idle-silent {'on' if server.idle_silent else 'off'}: {what} while nothing is subscribed",
                    flush=True,
                )
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


async def run_fake_fmp(args: argparse.Namespace) -> None:
    """Serve until SIGINT/SIGTERM; with a terminal (or ``--control``) read fault commands."""
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
