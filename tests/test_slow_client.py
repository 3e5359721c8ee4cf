"""A client that never reads must not delay others, nor grow the relay's memory past its bound."""

from __future__ import annotations

import socket

import trio
import wsproto
import wsproto.events as wse
from conftest import api

from trio_relay.api import WS_PATH

SYMBOLS = [f"S{i:02d}" for i in range(20)]


async def open_stuck_client(port: int, subscribe: str) -> trio.SocketStream:
    """A real WebSocket client with a tiny receive buffer that subscribes and then never reads."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(conn.send(wse.Request(host=f"127.0.0.1:{port}", target=WS_PATH)))
    while True:
        conn.receive_data(await stream.receive_some(4096))
        if any(isinstance(e, wse.AcceptConnection) for e in conn.events()):
            break
    await stream.send_all(conn.send(wse.Message(data=subscribe)))
    return stream


async def test_slow_client_is_conflated_then_closed_and_fast_client_keeps_up(start_relay, ws_connect, http):
    outbox_size = 64
    relay = await start_relay(
        sim={"rate": 500.0},
        clients={"outbox_size": outbox_size, "stall_timeout": 1.0},
    )
    symbols_json = '{"action":"subscribe","symbols":[' + ",".join(f'"{s}"' for s in SYMBOLS) + "]}"
    fast = await ws_connect(relay, "?batch=1")
    await fast.send(symbols_json)
    stuck = await open_stuck_client(relay.port, symbols_json)
    hub = relay.hub
    with trio.fail_after(30):
        while len(hub.clients) < 2 or not all(c.symbols for c in hub.clients.values()):
            await fast.recv()
        slow = next(c for c in hub.clients.values() if not c.batch)
        bound = max(outbox_size, len(SYMBOLS)) + 1  # +1: the subscribe ack
        largest = 0
        fast_updates = 0
        # Read the fast client until the relay gives up on the stuck one.
        while hub.stats.slow_clients_closed == 0:
            frame = await fast.recv()
            fast_updates += sum(1 for m in frame if m.get("type") == "price_update")
            largest = max(largest, len(slow.outbox))
            assert len(slow.outbox) <= bound
        assert slow.close_code == 4008
        # The fast client is still served after the stuck one is gone.
        frame = await fast.recv()
        assert any(m.get("type") == "price_update" for m in frame)
        status = (await http.get(api(relay, "/status"))).json()
    assert largest >= len(SYMBOLS) // 2, "the stuck client should have had a backlog to conflate"
    assert slow.outbox.conflated > 0
    assert fast_updates > 1000
    assert status["clients"]["slow_closed"] == 1 and status["clients"]["count"] == 1
    assert status["messages"]["conflated"] >= slow.outbox.conflated
    await stuck.aclose()
