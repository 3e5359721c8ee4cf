"""Clean shutdown: clients get 1001, the upstream closes cleanly, no task outlives the relay."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import trio
import trio_websocket
from conftest import close_code, fmp_sections, make_config

from trio_relay.daemon import run_relay


def _all_tasks() -> list[trio.lowlevel.Task]:
    tasks, todo = [], [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        tasks.append(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return tasks


def _relay_tasks() -> list[str]:
    names = [t.name for t in _all_tasks()]
    return [n for n in names if ("trio_relay" in n and "testing" not in n) or "hypercorn" in n]


async def test_shutdown_closes_clients_with_1001_and_leaves_no_task(fake_fmp):
    assert _relay_tasks() == []
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(run_relay, make_config(**fmp_sections(fake_fmp)))
        ws = await trio_websocket.connect_websocket_url(nursery, relay.ws_url)
        await ws.send_message('{"action":"subscribe","symbols":["AAPL"]}')
        await ws.get_message()
        await fake_fmp.wait_until(lambda: fake_fmp.subscriptions == {"AAPL"})
        assert _relay_tasks(), "the relay's tasks should be visible while it runs"
        with trio.fail_after(5):
            relay.shutdown()
            assert await close_code(ws) == 1001
            # Draining: no new connection is accepted any more.
            try:
                late = await trio.open_tcp_stream("127.0.0.1", relay.port)
            except OSError:
                pass
            else:
                await late.aclose()
                raise AssertionError("a new connection was accepted during shutdown")
            # The upstream said goodbye with a close frame (the fake saw its connection end).
            await fake_fmp.wait_until(lambda: not fake_fmp.connections)
        # run_relay has returned once the nursery can exit; the client socket is ours to close.
        await ws.aclose()
    assert _relay_tasks() == []
    assert relay.upstream.state == "stopped"


async def test_sigterm_exits_zero_within_five_seconds(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIO_RELAY_", "FMP_"))}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_relay", "serve", "--port", "0", "--provider", "sim"],
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    try:
        url = None
        buffered = b""
        with trio.fail_after(20):
            while url is None:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, f"relay exited early: {buffered.decode()}"
                buffered += chunk
                match = re.search(rb"client WebSocket: (ws://\S+)", buffered)
                url = match.group(1).decode() if match else None
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message('{"action":"subscribe","symbols":["AAPL"]}')
            assert "subscribed" in await ws.get_message()
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                assert await close_code(ws) == 1001
                assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rest = await proc.stderr.receive_some(65536)
    log = (buffered + rest).decode()
    assert "[SIGNAL] SIGTERM received" in log and "[SHUTDOWN] done" in log
    assert "Traceback" not in log


async def test_shutdown_mid_stream_gives_every_reading_client_a_clean_1001(fake_fmp):
    """Closing never cuts a frame in half: busy readers get 1001, a stuck one is dropped in time."""
    from test_slow_client import open_stuck_client

    symbols = [f"B{i}" for i in range(20)]
    subscribe = '{"action":"subscribe","symbols":[' + ",".join(f'"{s}"' for s in symbols) + "]}"
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(run_relay, make_config(sim={"rate": 500.0}, clients={"outbox_size": 64}))
        readers = []
        for _ in range(20):
            ws = await trio_websocket.connect_websocket_url(nursery, relay.ws_url, message_queue_size=100_000)
            await ws.send_message(subscribe)
            readers.append(ws)
        stuck = await open_stuck_client(relay.port, subscribe)
        for ws in readers:  # everybody is receiving
            for _ in range(50):
                await ws.get_message()
        codes = []
        with trio.fail_after(5):
            relay.shutdown()
            for ws in readers:
                codes.append(await close_code(ws))
        assert codes == [1001] * len(readers)
        await stuck.aclose()


async def test_every_service_ends_at_shutdown_without_waiting_for_the_grace_period(tmp_path):
    """History, alerts and portfolios on: nothing is left for the SHUTDOWN_GRACE deadline to cancel."""
    from trio_relay.daemon import SHUTDOWN_GRACE

    config = make_config(
        history={"backend": "sqlite", "data_dir": str(tmp_path)}, alerts={"enabled": True, "data_dir": str(tmp_path)}
    )
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(run_relay, config)
        relay.shutdown()
        # Well before the deadline (which would end a lingering task at SHUTDOWN_GRACE).
        nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE / 2
    assert not nursery.cancel_scope.cancelled_caught, "a task outlived the shutdown until cancelled"
    assert _relay_tasks() == []
