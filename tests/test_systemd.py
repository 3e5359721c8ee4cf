"""sd_notify over a real unix datagram socket; watchdog pings follow the hub's progress."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import trio
import trio.testing

from trio_relay.config import ClientsConfig
from trio_relay.hub import Demand, Hub, Stats
from trio_relay.model import Update
from trio_relay.systemd import Notifier, run_watchdog, watchdog_interval


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_daemon_sends_ready_watchdog_and_stopping_in_order(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIO_RELAY_", "FMP_"))}
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")  # a ping every 0.1 s
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_relay", "serve", "--port", "0", "--provider", "sim"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    messages: list[str] = []
    try:
        with trio.fail_after(20):
            while sum(m == "WATCHDOG=1" for m in messages) < 3:
                messages.append((await sock.recv(4096)).decode())
            proc.send_signal(signal.SIGTERM)
            while not messages[-1].startswith("STOPPING=1"):
                messages.append((await sock.recv(4096)).decode())
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()
    ready = messages[0].split("\n")
    assert ready[0] == "READY=1" and ready[1].startswith("STATUS=upstream connected")
    assert f"MAINPID={proc.pid}" in ready
    assert messages.index("WATCHDOG=1") > 0
    assert messages[-1] == "STOPPING=1\nSTATUS=shutting down"


async def test_watchdog_pings_stop_while_the_hub_is_wedged(autojump_clock, tmp_path):
    path = str(tmp_path / "notify.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await listener.bind(path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    pings: list[float] = []

    async def collect() -> None:
        while True:
            if (await listener.recv(4096)) == b"WATCHDOG=1":
                pings.append(trio.current_time())

    send, receive = trio.open_memory_channel[list[Update]](100)
    async with Hub.open(ClientsConfig(), Demand(0, ["AAPL"]), Stats()) as hub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            consuming = trio.CancelScope()

            async def consume() -> None:
                with consuming:
                    await hub.consume(receive.clone())

            nursery.start_soon(consume)
            nursery.start_soon(run_watchdog, notifier, 1.0, hub.making_progress, lambda: "ok")
            await trio.sleep(3.5)  # virtual time (MockClock): idle hub, nothing waiting: pings
            assert len(pings) == 4
            # The hub stops taking data (wedged) while data waits: pings stop.
            consuming.cancel()
            send.send_nowait([Update("AAPL", "T", 1, last_price=1.0, last_size=1)])
            await trio.sleep(5)  # virtual time (MockClock)
            assert len(pings) <= 5  # at most the one already due before the data arrived
            stalled_at = len(pings)
            # The hub comes back: pings resume.
            nursery.start_soon(hub.consume, receive)
            send.send_nowait([Update("AAPL", "T", 2, last_price=2.0, last_size=1)])
            await trio.sleep(3)  # virtual time (MockClock)
            assert len(pings) >= stalled_at + 2
            nursery.cancel_scope.cancel()
    notifier.close()
    listener.close()


def test_watchdog_interval_is_half_the_timeout_and_only_for_us():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert not Notifier({}).enabled
