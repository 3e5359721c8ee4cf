"""The public socket: native price WebSocket details, and everything else served by the REST app."""

from __future__ import annotations

import json

import httpx
import trio
import wsproto
import wsproto.events as wse
from wsproto.extensions import PerMessageDeflate

from trio_relay.api import WS_PATH


async def _open_raw(port: int, request: wse.Request) -> tuple[trio.SocketStream, wsproto.WSConnection, list[object]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(conn.send(request))
    events: list[object] = []
    while not any(isinstance(e, (wse.AcceptConnection, wse.RejectConnection)) for e in events):
        conn.receive_data(await stream.receive_some(65536))
        events += list(conn.events())
    return stream, conn, events


async def _messages(stream: trio.SocketStream, conn: wsproto.WSConnection, n: int) -> list[object]:
    got: list[object] = []
    while len([e for e in got if isinstance(e, (wse.TextMessage, wse.Pong, wse.CloseConnection))]) < n:
        conn.receive_data(await stream.receive_some(65536))
        got += list(conn.events())
    return got


async def test_permessage_deflate_is_never_negotiated(start_relay):
    relay = await start_relay()
    request = wse.Request(host="localhost", target=WS_PATH, extensions=[PerMessageDeflate()])
    with trio.fail_after(5):
        stream, conn, events = await _open_raw(relay.port, request)
        accept = next(e for e in events if isinstance(e, wse.AcceptConnection))
        assert accept.extensions == []
        await stream.send_all(conn.send(wse.Message(data='{"action":"ping"}')))
        replies = await _messages(stream, conn, 1)
    assert any(isinstance(e, wse.TextMessage) and json.loads(e.data) == {"type": "pong"} for e in replies)
    await stream.aclose()


async def test_fragmented_client_message_and_protocol_ping(start_relay):
    relay = await start_relay()
    with trio.fail_after(5):
        stream, conn, _ = await _open_raw(relay.port, wse.Request(host="localhost", target=WS_PATH + "?batch=0"))
        data = conn.send(wse.Message(data='{"action":"subscr', message_finished=False))
        data += conn.send(wse.Message(data='ibe","symbols":["AAPL"]}', message_finished=True))
        data += conn.send(wse.Ping(payload=b"are you there"))
        await stream.send_all(data)
        got = await _messages(stream, conn, 2)
    texts = [json.loads(e.data) for e in got if isinstance(e, wse.TextMessage)]
    # The simulated market also gives each symbol's previous close in the ack.
    assert [{k: v for k, v in t.items() if k != "prev_close"} for t in texts if t["type"] == "subscribed"] == [
        {"type": "subscribed", "symbols": ["AAPL"]}
    ]
    assert any(isinstance(e, wse.Pong) and e.payload == b"are you there" for e in got)
    await stream.aclose()


async def test_client_close_is_answered_and_releases_demand(start_relay):
    relay = await start_relay()
    with trio.fail_after(5):
        stream, conn, _ = await _open_raw(relay.port, wse.Request(host="localhost", target=WS_PATH))
        await stream.send_all(conn.send(wse.Message(data='{"action":"subscribe","symbols":["IBM"]}')))
        await _messages(stream, conn, 1)
        assert "IBM" in relay.hub.demand.wanted
        await stream.send_all(conn.send(wse.CloseConnection(code=1000, reason="bye")))
        got: list[object] = []
        while not any(isinstance(e, wse.CloseConnection) for e in got):
            conn.receive_data(await stream.receive_some(65536))
            got += list(conn.events())
        assert [e.code for e in got if isinstance(e, wse.CloseConnection)] == [1000]
        await relay.hub.wait_no_clients()
    assert "IBM" not in relay.hub.demand.wanted
    await stream.aclose()


async def test_bad_upgrade_gets_400_and_plain_http_goes_to_rest(start_relay, http):
    relay = await start_relay()
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.send_all(
            f"GET {WS_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += await stream.receive_some(4096)
        assert reply.startswith(b"HTTP/1.1 400") and b"not a valid WebSocket upgrade" in reply
        await stream.aclose()
        # A plain GET of the WebSocket path is an ordinary (404) HTTP request for the REST app.
        plain = await http.get(relay.http_url + WS_PATH)
        assert plain.status_code == 404 and plain.json()["error"] == "not_found"
        # Keep-alive through the relay: several requests on one connection.
        for _ in range(3):
            assert (await http.get(relay.http_url + "/api/v2/realtime/health")).status_code == 200


async def test_rest_sees_the_real_client_address(start_relay, http):
    relay = await start_relay()
    with trio.fail_after(5):
        live = await http.get(relay.http_url + "/api/v2/realtime/health/live")
        assert live.status_code == 200 and live.json()["client_ip"] == "127.0.0.1"
        # From another loopback address: the REST app's own peer (the front door, 127.0.0.1) is
        # not what it reports, the client behind it is.
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(transport=transport, timeout=5) as other:
            for _ in range(2):  # keep-alive: the same backend connection, still attributed
                live = await other.get(relay.http_url + "/api/v2/realtime/health/live")
                assert live.json()["client_ip"] == "127.0.0.2"
        assert (await http.get(relay.http_url + "/api/v2/realtime/health/live")).json()["client_ip"] == "127.0.0.1"
