"""SIGHUP in a real process: a changed config is applied without dropping clients, a bad one refused."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import trio
import trio_websocket
from conftest import FMP_KEY

from trio_relay.testing.fake_fmp import FakeFmpServer


def _config(path, url: str, pinned: list[str], max_per_request: int = 50) -> None:
    path.write_text(
        f'[upstream]\nprovider = "fmp"\nunsubscribe_linger = 0.0\npinned = {pinned!r}\n'
        f'[fmp]\nurl = "{url}"\nlogin_timeout = 1.0\n'
        f"[clients]\nmax_symbols_per_request = {max_per_request}\n".replace("'", '"')
    )


async def _read_until(stream, pattern: bytes, log: bytearray) -> None:
    while not re.search(pattern, bytes(log)):
        chunk = await stream.receive_some(65536)
        assert chunk, bytes(log).decode()[-2000:]
        log += chunk


async def test_sighup_applies_pins_limits_and_provider_and_refuses_a_bad_config(fake_fmp, tmp_path):
    config = tmp_path / "relay.toml"
    _config(config, fake_fmp.url, ["IBM"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIO_RELAY_", "FMP_"))}
    env["FMP_API_KEY"] = FMP_KEY
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_relay", "serve", "--port", "0", "--config", str(config)],
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    log = bytearray()
    try:
        async with FakeFmpServer.open(api_keys=[FMP_KEY], rate=50.0, heartbeat_interval=1.0) as second:
            with trio.fail_after(30):
                await _read_until(proc.stderr, rb"client WebSocket: (ws://\S+)", log)
                url = re.search(rb"client WebSocket: (ws://\S+)", bytes(log)).group(1).decode()
                await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"IBM"})
                async with trio_websocket.open_websocket_url(url) as ws:
                    await ws.send_message('{"action":"subscribe","symbols":["AAPL","MSFT"]}')
                    assert "subscribed" in await ws.get_message()
                    await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"IBM", "AAPL", "MSFT"})

                    # 1. Pins and limits change: applied live, the client stays.
                    _config(config, fake_fmp.url, ["TSLA"], max_per_request=1)
                    proc.send_signal(signal.SIGHUP)
                    await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"TSLA", "AAPL", "MSFT"})
                    await _read_until(
                        proc.stderr, rb"\[RELOAD\] applied: pinned \+TSLA; pinned -IBM; client limits", log
                    )
                    await ws.send_message('{"action":"subscribe","symbols":["A","B"]}')
                    while '"too_many_symbols"' not in (reply := await ws.get_message()):
                        pass
                    assert "at most 1" in reply

                    # 2. A broken config is refused; nothing changes.
                    config.write_text("[upstream]\nstale_after = -5\n")
                    proc.send_signal(signal.SIGHUP)
                    await _read_until(proc.stderr, rb"\[RELOAD\] rejected.*upstream.stale_after", log)

                    # 3. New provider settings: the upstream moves, clients keep their subscriptions.
                    _config(config, second.url, ["TSLA"], max_per_request=1)
                    proc.send_signal(signal.SIGHUP)
                    await second.wait_until(lambda: second.subscriptions == {"TSLA", "AAPL", "MSFT"})
                    await fake_fmp.wait_until(lambda: not fake_fmp.connections)
                    while '"price_update"' not in await ws.get_message():
                        pass
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert FMP_KEY.encode() not in log
    assert b"Traceback" not in log
