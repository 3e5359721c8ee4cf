"""`trio-relay fake-fmp` as a user runs it: a real process, driven over stdin and a WebSocket."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import trio
import trio_websocket


async def _read_until(stream: trio.abc.ReceiveStream, pattern: bytes, buffered: bytearray) -> re.Match[bytes]:
    while True:
        match = re.search(pattern, bytes(buffered))
        if match:
            del buffered[: match.end()]
            return match
        chunk = await stream.receive_some(4096)
        assert chunk, f"process ended; output so far: {bytes(buffered)!r}"
        buffered += chunk


async def test_fake_fmp_process_speaks_fmp_and_takes_fault_commands():
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "trio_relay",
            "fake-fmp",
            "--port",
            "0",
            "--key",
            "demo-key-123456",
            "--control",
            "--rate",
            "50",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    out = bytearray()
    try:
        with trio.fail_after(20):
            url = (await _read_until(proc.stdout, rb"listening on (ws://\S+) ", out)).group(1).decode()
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"event": "login", "data": {"apiKey": "demo-key-123456"}}))
                assert json.loads(await ws.get_message())["message"] == "Authenticated"
                await ws.send_message(json.dumps({"event": "subscribe", "data": {"ticker": ["aapl"]}}))
                frames = [json.loads(await ws.get_message()) for _ in range(5)]
                assert frames[0]["event"] == "subscribe"
                assert any(f.get("s") == "aapl" and f.get("type") in ("T", "Q") for f in frames[1:])
                await proc.stdin.send_all(b"status\n")
                assert b"['AAPL']" in (await _read_until(proc.stdout, rb"connections=1 [^\n]*\n", out)).group(0)
                await proc.stdin.send_all(b"drop\n")
                await _read_until(proc.stdout, rb"dropped 1 connection", out)
                try:
                    while True:
                        await ws.get_message()
                except trio_websocket.ConnectionClosed:
                    pass
            # A wrong key is refused the way FMP does it.
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"event": "login", "data": {"apiKey": "nope"}}))
                reply = json.loads(await ws.get_message())
                assert reply == {"event": "login", "status": 401, "message": "Unauthorized"}
    finally:
        proc.terminate()
        await proc.wait()
