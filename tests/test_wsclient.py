"""The upstream WebSocket client against a real loopback server built on wsproto.

The server side is scripted per test, so it can do what a provider may do and trio-websocket's
server cannot easily: fragment messages, ping, close with a code, refuse the upgrade.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import ssl

import pytest
import trio
import trustme
import wsproto
import wsproto.events as wse

from trio_relay.providers.base import ProviderError
from trio_relay.providers.wsclient import HandshakeRejected, UpstreamClosed, WsClient

Script = Callable[[trio.SocketStream, wsproto.WSConnection], Awaitable[None]]


class Peer:
    def __init__(self, script: Script, reject: int | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.reject = reject
        self.tls = tls
        self.received: list[str] = []
        self.pongs = 0
        self.closed_with: int | None = None
        self.done = trio.Event()

    async def handle(self, stream: trio.abc.Stream) -> None:
        try:
            await self._handle(stream)
        except* trio.BrokenResourceError:
            self.done.set()  # the client went away without a TLS goodbye (or refused our cert)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_side=True)
        conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        async with stream:
            while True:
                conn.receive_data(await stream.receive_some(65536))
                request = next((e for e in conn.events() if isinstance(e, wse.Request)), None)
                if request is not None:
                    break
            if self.reject is not None:
                await stream.send_all(conn.send(wse.RejectConnection(status_code=self.reject)))
                return
            await stream.send_all(conn.send(wse.AcceptConnection()))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, stream, conn)
                await self.script(stream, conn)
                await self.done.wait()
                nursery.cancel_scope.cancel()

    async def _read(self, stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        while True:
            data = await stream.receive_some(65536)
            conn.receive_data(data or None)
            for event in conn.events():
                if isinstance(event, wse.TextMessage):
                    self.received.append(event.data)
                elif isinstance(event, wse.Pong):
                    self.pongs += 1
                elif isinstance(event, wse.CloseConnection) and self.closed_with is None:
                    self.closed_with = event.code  # the first one; EOF adds a 1006 after it
            if not data:
                self.done.set()
                return


@asynccontextmanager
async def peer(
    script: Script, reject: int | None = None, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Peer, str]]:
    p = Peer(script, reject, tls)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), p.handle, 0)
        scheme = "wss" if tls else "ws"
        yield p, f"{scheme}://127.0.0.1:{listeners[0].socket.getsockname()[1]}/feed?x=1"
        nursery.cancel_scope.cancel()


async def test_batch_holds_every_message_of_one_read_and_joins_fragments():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        data = b"".join(conn.send(wse.Message(data=f"m{i}")) for i in range(300))
        data += conn.send(wse.Message(data="frag-", message_finished=False))
        data += conn.send(wse.Message(data="ment", message_finished=True))
        await stream.send_all(data)

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            got: list[str] = []
            while len(got) < 301:
                got += await ws.receive_batch()
            await ws.send_text("hello")
            await ws.aclose()
            await p.done.wait()
    assert got == [f"m{i}" for i in range(300)] + ["frag-ment"]
    assert p.received == ["hello"] and p.closed_with == 1000


async def test_ping_is_answered_and_close_is_reported_with_its_code():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(conn.send(wse.Ping(payload=b"hi")) + conn.send(wse.Message(data="after ping")))
        await stream.send_all(conn.send(wse.CloseConnection(code=4003, reason="go away")))

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            assert await ws.receive_batch() == ["after ping"]
            with pytest.raises(UpstreamClosed) as info:
                while True:
                    await ws.receive_batch()
            await ws.aclose()
    assert info.value.code == 4003 and "go away" in str(info.value)
    assert p.pongs == 1


async def test_eof_without_close_frame_is_1006():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(conn.send(wse.Message(data="last words")))
        await stream.aclose()

    async with peer(script) as (_p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            with pytest.raises(UpstreamClosed) as info:
                while True:
                    await ws.receive_batch()
    assert info.value.code == 1006


async def test_oversized_message_ends_the_connection_with_1009():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(conn.send(wse.Message(data="x" * 5000)))

    async with peer(script) as (_p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url, max_message=1000)
            with pytest.raises(UpstreamClosed) as info:
                await ws.receive_batch()
            await ws.aclose()
    assert info.value.code == 1009


async def test_refused_upgrade_reports_the_http_status():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        raise AssertionError("never reached")

    async with peer(script, reject=401) as (_p, url):
        with trio.fail_after(5), pytest.raises(HandshakeRejected) as info:
            await WsClient.connect(url)
    assert info.value.status == 401 and str(info.value) == "handshake rejected with HTTP 401"


async def test_bad_urls_and_closed_ports_are_provider_errors():
    with pytest.raises(ProviderError, match="not a WebSocket URL"):
        await WsClient.connect("http://example.invalid/")
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ProviderError, match="cannot connect"):
        await WsClient.connect(f"ws://127.0.0.1:{port}")


async def test_wss_reads_in_bulk_over_tls_and_checks_the_certificate():
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def script(stream: trio.abc.Stream, conn: wsproto.WSConnection) -> None:
        big = "y" * 20_000  # spans several TLS records
        await stream.send_all(b"".join(conn.send(wse.Message(data=f"{i}:{big}")) for i in range(50)))

    async with peer(script, tls=server_ctx) as (p, url):
        with trio.fail_after(10):
            ws = await WsClient.connect(url, ssl_context=client_ctx)
            got: list[str] = []
            while len(got) < 50:
                got += await ws.receive_batch()
            await ws.send_text("over tls")
            await ws.aclose()
            await p.done.wait()
        # An untrusted certificate is refused.
        with trio.fail_after(10), pytest.raises(ProviderError, match="TLS"):
            await WsClient.connect(url)
    assert [m.split(":")[0] for m in got] == [str(i) for i in range(50)]
    assert all(len(m) == len(str(i)) + 1 + 20_000 for i, m in enumerate(got))
    assert p.received == ["over tls"]
