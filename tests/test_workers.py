"""`trio-relay serve --workers 2` as a real process tree: one upstream connection, many workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import httpx
import trio
import trio_websocket
from conftest import FMP_KEY, close_code


async def test_two_workers_share_one_upstream_connection_and_stop_cleanly(fake_fmp, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIO_RELAY_", "FMP_"))}
    env["FMP_API_KEY"] = FMP_KEY
    env["TRIO_RELAY_UPSTREAM_UNSUBSCRIBE_LINGER"] = "0"
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "trio_relay",
            "serve",
            "--port",
            "0",
            "--workers",
            "2",
            "--provider",
            "fmp",
            "--upstream-url",
            fake_fmp.url,
        ],
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    log = b""
    try:
        with trio.fail_after(30):
            while True:
                chunk = await proc.stderr.receive_some(65536)
                assert chunk, f"exited early: {log.decode()}"
                log += chunk
                match = re.search(rb"share (http://\S+) ", log)
                # Both workers are up once each has announced its client WebSocket.
                if match and log.count(b"[START] client WebSocket") >= 3:  # the feeder's + 2 workers'
                    break
            base = match.group(1).decode()
            ws_url = base.replace("http://", "ws://") + "/api/v2/realtime/ws/prices"
            pids: set[int] = set()
            # No keep-alive: every request is a new connection, so the kernel spreads them.
            no_reuse = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=5, limits=no_reuse) as http, trio.open_nursery() as nursery:
                clients = []
                for i in range(16):
                    ws = await trio_websocket.connect_websocket_url(nursery, ws_url)
                    await ws.send_message('{"action":"subscribe","symbols":["AAPL","MSFT"]}')
                    clients.append(ws)
                first_prices = []
                for ws in clients:
                    while '"price_update"' not in (message := await ws.get_message()):
                        pass
                    first_prices.append(json.loads(message))
                # Every worker passes on the feeder's numbering and provider: a client can
                # resume on whichever worker it reaches next time.
                assert len({m["epoch"] for m in first_prices}) == 1
                assert {m["provider"] for m in first_prices} == {"fmp"}
                await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL", "MSFT"})
                clients_seen: dict[int, int] = {}
                for _ in range(40):
                    status = (await http.get(base + "/api/v2/realtime/status")).json()
                    pids.add(status["pid"])
                    clients_seen[status["pid"]] = status["clients"]["count"]
                assert fake_fmp.connections_total == 1, "only the feeder may hold a provider connection"
                assert len(pids) == 2, f"requests should reach both workers, saw pids {pids}"
                assert proc.pid not in pids
                assert sum(clients_seen.values()) == len(clients) and all(clients_seen.values())
                proc.send_signal(signal.SIGTERM)
                codes = []
                for ws in clients:
                    codes.append(await close_code(ws))
                assert codes == [1001] * len(clients)
                assert await proc.wait() == 0
                nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log += await proc.stderr.receive_some(65536)
    assert b"Traceback" not in log, log.decode()[-3000:]
    assert FMP_KEY.encode() not in log


def test_in_a_fleet_only_the_feeder_joins_it() -> None:
    """engine "redis" with workers: the feeder is the machine's fleet member; workers read from it."""
    from conftest import make_config

    from trio_relay.workers import _feeder_config, _worker_config

    config = make_config(engine={"backend": "redis", "node_id": "web-1"}, server={"workers": 2})
    assert _feeder_config(config).engine.backend == "redis"
    worker = _worker_config(config, 8000, "ws://127.0.0.1:9/api/v2/realtime/ws/prices")
    assert worker.engine.backend == "memory"
    assert worker.provider == "relay"
