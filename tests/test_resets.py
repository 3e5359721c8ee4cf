"""Clients that vanish with a TCP reset mid-stream must never take the relay down."""

from __future__ import annotations

import socket
import struct

import trio
import wsproto
import wsproto.events as wse
from conftest import api

from trio_relay.api import WS_PATH


async def _subscribe_raw(port: int, symbols: list[str]) -> socket.socket:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await sock.send(conn.send(wse.Request(host="localhost", target=WS_PATH)))
    while not any(isinstance(e, wse.AcceptConnection) for e in conn.events()):
        conn.receive_data(await sock.recv(65536))
    sub = '{"action":"subscribe","symbols":[' + ",".join(f'"{s}"' for s in symbols) + "]}"
    await sock.send(conn.send(wse.Message(data=sub)))
    await sock.recv(65536)  # the ack (and maybe prices): the relay is now writing to us
    return sock


async def test_many_clients_resetting_mid_stream_do_not_kill_the_relay(start_relay, ws_connect, http):
    relay = await start_relay(sim={"rate": 500.0})
    symbols = [f"R{i}" for i in range(20)]
    with trio.fail_after(20):
        for _round in range(3):
            socks = [await _subscribe_raw(relay.port, symbols) for _ in range(30)]
            for sock in socks:
                # SO_LINGER 0: close() sends RST, and unread data makes the relay's next write fail.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            await relay.hub.wait_no_clients()
        client = await ws_connect(relay)
        assert (await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed"))["symbols"] == ["AAPL"]
        await client.recv_until(lambda m: m.get("symbol") == "AAPL")
        assert (await http.get(api(relay, "/health"))).status_code == 200
