"""The edge as an attacker's script sees it: real sockets against the real daemon.

Slow and silent connections, header floods, fragment floods, socket floods from one address and
from many, cross-site writes, DNS-rebinding Host headers, bad WebSocket keys, absolute-form
targets, and several requests routed one by one on one kept-alive connection. Timeouts are short
configured values and every wait is a condition under a deadline (``fail_after``), never a sleep
asserted on.
"""

from __future__ import annotations

import json
import resource
from typing import Any

import h11
import trio
import trio_websocket
import wsproto

from trio_relay.api import WS_PATH

LIVE = "/api/v2/realtime/health/live"
SUBSCRIBE = "/api/v2/realtime/subscribe"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key: 16 bytes in base64
DEADLINE = 10  # generous: a bound on the test, not on the relay


def upgrade_head(target: str = WS_PATH, host: str = "127.0.0.1", key: str = KEY, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


async def open_raw(relay: Any, local: str | None = None) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", relay.port, local_address=local)


async def read_response(stream: trio.SocketStream, conn: h11.Connection | None = None) -> tuple[h11.Response, bytes]:
    """One HTTP response, parsed by a client-side h11 connection (reused for keep-alive)."""
    conn = conn or h11.Connection(h11.CLIENT)
    if conn.our_state is h11.IDLE:
        # The request went out by hand: tell h11 one was made (proposing an upgrade, so that a
        # 101 parses too) so that it reads the response.
        conn.send(
            h11.Request(
                method="GET", target="/", headers=[("host", "x"), ("upgrade", "websocket"), ("connection", "upgrade")]
            )
        )
        conn.send(h11.EndOfMessage())
    response: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, (h11.Response, h11.InformationalResponse)):
            response = event  # type: ignore[assignment]
            if isinstance(event, h11.InformationalResponse):
                assert response is not None
                return response, b""  # 101: the rest is WebSocket
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            assert response is not None, "the connection ended without a response"
            return response, body


async def send_and_read(relay: Any, data: bytes) -> tuple[int, dict[str, Any], bytes]:
    """Send ``data`` on a new connection; the status, JSON body and the rest until the relay closes."""
    stream = await open_raw(relay)
    async with stream:
        await stream.send_all(data)
        response, body = await read_response(stream)
        rest = await read_to_eof(stream)
    return response.status_code, json.loads(body) if body else {}, rest


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    got = b""
    try:
        while chunk := await stream.receive_some(65536):
            got += chunk
    except trio.BrokenResourceError:
        pass  # a reset is an end too
    return got


async def first_price(relay: Any, nursery: trio.Nursery, symbol: str = "AAPL") -> dict[str, Any]:
    """What a real client does: connect, subscribe, wait for its first price."""
    ws = await trio_websocket.connect_websocket_url(nursery, relay.ws_url)
    try:
        await ws.send_message(json.dumps({"action": "subscribe", "symbols": [symbol]}))
        while True:
            msg = json.loads(await ws.get_message())
            if msg.get("type") == "price_update":
                return msg
    finally:
        await ws.aclose()


# --------------------------------------------------------------------------- time bounds


async def test_a_silent_connection_gets_408_then_is_closed(start_relay):
    relay = await start_relay(server={"head_timeout": 0.3})
    with trio.fail_after(DEADLINE):
        stream = await open_raw(relay)
        response, body = await read_response(stream)
        assert await read_to_eof(stream) == b""
    assert response.status_code == 408 and json.loads(body)["error"] == "request_timeout"
    assert relay.edge.table.open == 0


async def test_a_slowloris_head_gets_408_though_bytes_keep_coming(start_relay):
    relay = await start_relay(server={"head_timeout": 0.5})
    with trio.fail_after(DEADLINE):
        stream = await open_raw(relay)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for i in range(10_000):  # a header byte at a time, never the blank line
                await stream.send_all(b"X-%d: y\r\n" % i)
                await trio.sleep(0.02)  # the attacker's pace (real time: the relay's clock is real here)
        except trio.BrokenResourceError:
            pass  # the relay closed while we were still sending: what we want
        response, _ = await read_response(stream)
    assert response.status_code == 408


async def test_an_idle_kept_alive_connection_is_closed_without_a_reply(start_relay):
    relay = await start_relay(server={"keepalive_timeout": 0.3})
    with trio.fail_after(DEADLINE):
        stream = await open_raw(relay)
        client = h11.Connection(h11.CLIENT)
        await stream.send_all(client.send(h11.Request(method="GET", target=LIVE, headers=[("host", "127.0.0.1")])))
        await stream.send_all(client.send(h11.EndOfMessage()))
        response, _ = await read_response(stream, client)
        assert response.status_code == 200
        assert await read_to_eof(stream) == b""  # closed, and no unasked-for 408


async def test_a_body_that_never_finishes_gets_408(start_relay):
    relay = await start_relay(server={"request_timeout": 0.3})
    with trio.fail_after(DEADLINE):
        stream = await open_raw(relay)
        await stream.send_all(
            f"POST {SUBSCRIBE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n["AA'.encode()
        )
        response, body = await read_response(stream)
    assert response.status_code == 408 and json.loads(body)["error"] == "request_timeout"
    assert "AA" not in relay.hub.demand.pinned


# --------------------------------------------------------------------------- heads


async def test_header_floods_get_431_and_malformed_heads_400(start_relay):
    relay = await start_relay(server={"max_header_size": 4096, "max_headers": 20})
    with trio.fail_after(DEADLINE):
        big = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
        status, body, _ = await send_and_read(relay, big)
        assert (status, body["error"]) == (431, "header_too_large")
        many = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(30)) + b"\r\n"
        status, body, _ = await send_and_read(relay, many)
        assert (status, body["error"]) == (431, "too_many_headers")
        # An endless head (no blank line ever): cut at the size bound, not read forever.
        stream = await open_raw(relay)
        try:
            for _ in range(1000):
                await stream.send_all(b"X-More: " + b"b" * 1000 + b"\r\n")
        except trio.BrokenResourceError:
            pass
        for garbage in (
            b"NOT HTTP AT ALL\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
        ):
            status, body, _ = await send_and_read(relay, garbage)
            assert status == 400 and body["error"] == "bad_request", garbage
            assert "Traceback" not in body["message"]
        missing_host = await send_and_read(relay, b"GET / HTTP/1.1\r\n\r\n")
        assert missing_host[0] == 400


async def test_bad_websocket_keys_get_400_not_101(start_relay):
    relay = await start_relay()
    with trio.fail_after(DEADLINE):
        for key in (
            "",
            "short",
            "not base64 at all!!!!!!!",
            "AAAAAAAAAAAAAAAAAAAAAA==" + "AAAA",
            "AAAAAAAAAAAAAAAAAAAA",
        ):
            status, body, _ = await send_and_read(relay, upgrade_head(key=key))
            assert status == 400 and "Sec-WebSocket-Key" in body["message"], key
        wrong_version = upgrade_head().replace(b"Version: 13", b"Version: 8")
        status, _, _ = await send_and_read(relay, wrong_version)
        assert status == 426
    assert not relay.hub.clients


# --------------------------------------------------------------------------- routing per request


async def test_absolute_form_targets_are_routed_like_paths(start_relay, nursery):
    relay = await start_relay()
    base = f"http://127.0.0.1:{relay.port}"
    with trio.fail_after(DEADLINE):
        status, body, _ = await send_and_read(
            relay, f"GET {base}{LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 200 and body["status"] == "ok"
        stream = await open_raw(relay)
        await stream.send_all(upgrade_head(target=f"{base}{WS_PATH}?batch=0"))
        response, _ = await read_response(stream)
        assert response.status_code == 101
        await stream.aclose()
        # The absolute form's authority is the host asked for: it must be one the relay serves.
        status, body, _ = await send_and_read(
            relay, f"GET http://evil.example{LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        assert (status, body["error"]) == (421, "misdirected_request")


async def test_one_connection_rest_requests_then_an_upgrade_each_routed_on_its_own(start_relay):
    relay = await start_relay()
    with trio.fail_after(DEADLINE):
        stream = await open_raw(relay)
        client = h11.Connection(h11.CLIENT)
        # Two requests pipelined in one write (h11 lets a client hold one request at a time: the
        # second goes by hand), then a POST after the answers.
        data = client.send(h11.Request(method="GET", target=LIVE, headers=[("host", "127.0.0.1")]))
        data += client.send(h11.EndOfMessage())
        await stream.send_all(data + f"GET {LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        first, body = await read_response(stream, client)
        assert first.status_code == 200 and json.loads(body)["client_ip"] == "127.0.0.1"
        client.start_next_cycle()
        second, body = await read_response(stream, h11.Connection(h11.CLIENT))
        client = h11.Connection(h11.CLIENT)
        assert second.status_code == 200 and json.loads(body)["status"] == "ok"
        post = json.dumps(["IBM"]).encode()
        await stream.send_all(
            client.send(
                h11.Request(
                    method="POST",
                    target=SUBSCRIBE,
                    headers=[
                        ("host", "127.0.0.1"),
                        ("content-type", "application/json"),
                        ("content-length", str(len(post))),
                    ],
                )
            )
            + client.send(h11.Data(data=post))
            + client.send(h11.EndOfMessage())
        )
        third, body = await read_response(stream, client)
        assert third.status_code == 200 and json.loads(body)["pinned"] == ["IBM"]
        # Then the same connection becomes the price socket.
        await stream.send_all(upgrade_head())
        switched, _ = await read_response(stream, h11.Connection(h11.CLIENT))
        assert switched.status_code == 101
        frames = wsproto.frame_protocol.FrameProtocol(client=True, extensions=[])
        await stream.send_all(frames.send_data('{"action":"subscribe","symbols":["IBM"]}', fin=True))
        got = b""
        while b'"price_update"' not in got:
            chunk = await stream.receive_some(65536)
            assert chunk, "the relay closed the upgraded connection"
            got += chunk
        assert b'"subscribed"' in got
        await stream.aclose()


# --------------------------------------------------------------------------- cross-site


async def test_cross_site_pages_cannot_drive_a_relay_with_auth_off(start_relay, nursery):
    relay = await start_relay()
    assert not relay.config.auth.enabled
    evil = "https://evil.example"
    own = f"http://127.0.0.1:{relay.port}"
    with trio.fail_after(DEADLINE):
        status, body, _ = await send_and_read(relay, upgrade_head(extra=f"Origin: {evil}\r\n"))
        assert (status, body["error"]) == (403, "forbidden_origin")
        ok = await open_raw(relay)
        await ok.send_all(upgrade_head(host=f"127.0.0.1:{relay.port}", extra=f"Origin: {own}\r\n"))
        assert (await read_response(ok))[0].status_code == 101
        await ok.aclose()

        def post(content_type: str | None, origin: str | None, body: bytes = b'["TSLA"]') -> bytes:
            head = f"POST {SUBSCRIBE} HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            if content_type:
                head += f"Content-Type: {content_type}\r\n"
            if origin:
                head += f"Origin: {origin}\r\n"
            return head.encode() + b"\r\n" + body

        # A form or a text/plain fetch from any page needs no CORS preflight: refused by type.
        for content_type in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            None,
        ):
            status, body, _ = await send_and_read(relay, post(content_type, None))
            assert (status, body["error"]) == (415, "unsupported_media_type"), content_type
        status, body, _ = await send_and_read(relay, post("application/json", evil))
        assert (status, body["error"]) == (403, "forbidden_origin")
        assert "TSLA" not in relay.hub.demand.pinned
        # The relay's own page (and a client that is not a browser) may.
        status, body, _ = await send_and_read(relay, post("application/json; charset=utf-8", own))
        assert status == 200 and "TSLA" in body["pinned"]


async def test_listed_origins_may_write(start_relay):
    relay = await start_relay(server={"allowed_origins": ["https://app.example"]})
    with trio.fail_after(DEADLINE):
        data = f'POST {SUBSCRIBE} HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n["NVDA"]'
        status, _, _ = await send_and_read(relay, data.encode())
    assert status == 200 and "NVDA" in relay.hub.demand.pinned


async def test_dns_rebinding_hosts_get_421_and_listed_hosts_are_served(start_relay):
    relay = await start_relay(server={"allowed_hosts": ["relay.example"]})
    default = await start_relay()
    with trio.fail_after(DEADLINE):
        for host in ("evil.example", f"evil.example:{default.port}", "127.0.0.1.evil.example"):
            status, body, _ = await send_and_read(default, f"GET {LIVE} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert (status, body["error"]) == (421, "misdirected_request"), host
            status, _, _ = await send_and_read(default, upgrade_head(host=host))
            assert status == 421
        for host in ("localhost", f"127.0.0.1:{default.port}", f"[::1]:{default.port}"):
            status, _, _ = await send_and_read(
                default, f"GET {LIVE} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            assert status == 200, host
        status, _, _ = await send_and_read(
            relay, f"GET {LIVE} HTTP/1.1\r\nHost: relay.example:443\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 200
        status, _, _ = await send_and_read(relay, f"GET {LIVE} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        assert status == 421  # a list replaces the defaults


async def test_the_host_is_never_reflected_into_a_redirect(start_relay):
    relay = await start_relay(server={"allowed_hosts": ["*"]})  # even where any Host is served
    redirects = 0
    with trio.fail_after(DEADLINE):
        for path in (
            f"/api/v2//realtime{LIVE[16:]}",
            "/api//v2/realtime/health",
            "//evil.example/static/app.js",
            "/static",
        ):
            stream = await open_raw(relay)
            async with stream:
                await stream.send_all(
                    f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode()
                )
                response, _ = await read_response(stream)
            location = dict(response.headers).get(b"location", b"")
            if response.status_code in (301, 302, 303, 307, 308):
                redirects += 1
                assert location.startswith(b"/") and not location.startswith(b"//"), (path, location)
            assert b"evil.example" not in location, path
    assert redirects  # werkzeug does redirect a path with doubled slashes: the case that mattered


# --------------------------------------------------------------------------- WebSocket frames


async def test_a_fragment_flood_is_closed_and_a_fragmented_message_still_works(start_relay):
    relay = await start_relay(clients={"max_frames_per_message": 8})
    with trio.fail_after(DEADLINE):
        stream = await open_raw(relay)
        await stream.send_all(upgrade_head())
        assert (await read_response(stream))[0].status_code == 101
        frames = wsproto.frame_protocol.FrameProtocol(client=True, extensions=[])
        # Eight frames are fine...
        parts = ['{"action"', ':"ping"', "", "", "", "", "", "}"]
        await stream.send_all(b"".join(frames.send_data(p, fin=i == len(parts) - 1) for i, p in enumerate(parts)))
        got = b""
        while b'"pong"' not in got:
            got += await stream.receive_some(65536)
        # ...an endless run of empty continuation frames is not.
        try:
            await stream.send_all(frames.send_data("{", fin=False))
            for _ in range(200):
                await stream.send_all(b"".join(frames.send_data("", fin=False) for _ in range(100)))
        except trio.BrokenResourceError:
            pass
        reader = wsproto.frame_protocol.FrameProtocol(client=True, extensions=[])
        reader.receive_bytes(await read_to_eof(stream))
        codes = [f.payload[0] for f in reader.received_frames() if f.opcode is wsproto.frame_protocol.Opcode.CLOSE]
    assert codes == [1008]


# --------------------------------------------------------------------------- socket floods


def _fds(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def test_2000_idle_sockets_from_one_address_cannot_keep_a_client_from_its_prices(start_relay, nursery, http):
    _fds(2 * 2200 + 256)  # both ends of every socket live in this process
    relay = await start_relay(limits={"connections_per_ip": 100})
    attackers: list[trio.SocketStream] = []
    try:
        with trio.fail_after(60):
            for _ in range(2000):
                attackers.append(await open_raw(relay, local="127.0.0.2"))
            # Beyond the address's cap: 429 at once, before any request was sent.
            refused = attackers[-1]
            response, body = await read_response(refused)
            assert response.status_code == 429 and json.loads(body)["error"] == "too_many_connections"
            await relay.edge.table.wait_open_at_most(100)  # the refused ones are being closed
            assert relay.edge.table.refused >= 1900
            price = await first_price(relay, nursery)
            metrics = (await http.get(f"{relay.http_url}/metrics")).text
        assert price["symbol"] == "AAPL"
        refused = next(
            line
            for line in metrics.splitlines()
            if line.startswith('trio_relay_edge_refused_total{reason="per_address"}')
        )
        assert float(refused.split()[-1]) >= 1900
    finally:
        for stream in attackers:
            stream.socket.close()


async def test_a_flood_from_many_addresses_evicts_idle_sockets_not_clients(start_relay, nursery):
    _fds(2 * 1300 + 256)
    relay = await start_relay(server={"max_connections": 300}, limits={"connections_per_ip": 100})
    attackers: list[trio.SocketStream] = []
    try:
        with trio.fail_after(60):
            ws = await trio_websocket.connect_websocket_url(nursery, relay.ws_url)  # a client first
            await ws.send_message('{"action":"subscribe","symbols":["MSFT"]}')
            for i in range(1200):  # 12 addresses x 100 idle sockets: four times the global cap
                attackers.append(await open_raw(relay, local=f"127.0.1.{i // 100 + 1}"))
            assert relay.edge.table.open <= 300
            assert relay.edge.table.evicted >= 900
            price = await first_price(relay, nursery)  # a newcomer gets in (an idle one makes room)
            # The connected client was never evicted: it still gets prices.
            while json.loads(await ws.get_message()).get("type") != "price_update":
                pass
        assert price["type"] == "price_update"
    finally:
        for stream in attackers:
            stream.socket.close()


async def test_the_global_cap_refuses_with_503_when_nothing_is_idle(start_relay, nursery):
    relay = await start_relay(server={"max_connections": 3})
    clients = []
    with trio.fail_after(DEADLINE):
        for _ in range(3):
            clients.append(await trio_websocket.connect_websocket_url(nursery, relay.ws_url))
        status, body, _ = await send_and_read(relay, f"GET {LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert (status, body["error"]) == (503, "server_full")
        await clients[0].aclose()
        await relay.edge.table.wait_open_at_most(2)
        status, _, _ = await send_and_read(
            relay, f"GET {LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 200


async def test_plain_clients_still_work_http10_head_and_two_hosts(start_relay):
    relay = await start_relay()
    with trio.fail_after(DEADLINE):
        # A health checker speaking HTTP/1.0 without Host (a browser always sends one).
        status, body, _ = await send_and_read(relay, f"GET {LIVE} HTTP/1.0\r\n\r\n".encode())
        assert status == 200 and body["status"] == "ok"
        stream = await open_raw(relay)
        async with stream:
            await stream.send_all(f"HEAD {LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            client = h11.Connection(h11.CLIENT)
            client.send(h11.Request(method="HEAD", target=LIVE, headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
            response, body = await read_response(stream, client)
        assert response.status_code == 200 and body == b""
        status, _, _ = await send_and_read(
            relay, f"GET {LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n".encode()
        )
        assert status == 400


def test_an_ipv6_client_counts_by_its_64():
    from trio_relay.api.connections import address_key

    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("203.0.113.7") == "203.0.113.7"


async def test_head_and_keepalive_timeouts_run_to_the_configured_time(start_relay, autojump_clock):
    """The edge's own loop over an in-memory stream, under a MockClock: the bounds are exact."""
    from trio.testing import memory_stream_pair

    relay = await start_relay(server={"head_timeout": 10.0, "keepalive_timeout": 30.0})
    edge = relay.edge

    async def serve(stream: Any, ended: list[float]) -> None:
        _, entry = edge.table.admit("192.0.2.1")
        try:
            await edge._serve(stream, entry, ("192.0.2.1", 1), trio.current_time() + edge.server.head_timeout)
        finally:
            edge.table.release(entry)
            ended.append(trio.current_time())

    async def response(stream: Any) -> tuple[h11.Response, bytes]:
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        got: h11.Response | None = None
        body = b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                got = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert got is not None
                return got, body

    # A head that stops half-way: 408 at exactly head_timeout.
    ours, theirs = memory_stream_pair()
    ended: list[float] = []
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(serve, theirs, ended)
        await ours.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow, _ = await response(ours)
    assert slow.status_code == 408 and ended[0] - start == 10.0

    # A served request, then silence: closed at exactly keepalive_timeout after the response.
    ours, theirs = memory_stream_pair()
    ended = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, theirs, ended)
        await ours.send_all(f"GET {LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        ok, _ = await response(ours)
        answered = trio.current_time()
    assert ok.status_code == 200 and ended[0] - answered == 30.0


async def test_expect_100_continue_gets_its_interim_answer(start_relay):
    relay = await start_relay()
    body = b'["AMD"]'
    with trio.fail_after(DEADLINE):
        stream = await open_raw(relay)
        async with stream:
            await stream.send_all(
                f"POST {SUBSCRIBE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode()
            )
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += await stream.receive_some(65536)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            rest = interim.split(b"\r\n\r\n", 1)[1] + await read_to_eof(stream)
    assert rest.startswith(b"HTTP/1.1 200 ") and "AMD" in relay.hub.demand.pinned


def test_allowed_hosts_must_be_host_names():
    import pytest

    from trio_relay.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="server.allowed_hosts: 'https://relay.example' is not a host name"):
        load_config(environ={}, dotenv=None, overrides={"server": {"allowed_hosts": ["https://relay.example"]}})
    config = load_config(
        environ={}, dotenv=None, overrides={"server": {"allowed_hosts": ["relay.example:443", "[::1]", "*"]}}
    )
    assert config.server.allowed_hosts == ["relay.example:443", "[::1]", "*"]


async def test_a_body_over_the_limit_is_refused_before_it_is_read(start_relay):
    relay = await start_relay()
    with trio.fail_after(DEADLINE):
        status, body, _ = await send_and_read(
            relay,
            f"POST {SUBSCRIBE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000000\r\n\r\n[".encode(),
        )
    assert status == 413 and "Traceback" not in json.dumps(body)
