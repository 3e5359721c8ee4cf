"""The upstream WebSocket client against a real loopback server built on wsproto.

The server side is scripted per test, so it can do what a provider may do and trio-websocket's
server cannot easily: fragment messages, ping, close with a code, refuse the upgrade, or never
answer a ping (a half-open connection, as the client sees it).

The keepalive tests run under ``MockClock(autojump_threshold=0)``: loopback I/O takes no virtual
time, so every ping and every timeout is checked at its exact virtual instant.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
import trustme
import wsproto
import wsproto.events as wse

from trio_relay.providers.base import ProviderError
from trio_relay.providers.wsclient import HandshakeRejected, KeepaliveTimeout, UpstreamClosed, WsClient

EXACT = 1e-6  # virtual seconds
GUARD = 3600.0  # virtual seconds any keepalive test may take

Script = Callable[[trio.SocketStream, wsproto.WSConnection], Awaitable[None]]


class Peer:
    def __init__(
        self, script: Script, reject: int | None = None, tls: ssl.SSLContext | None = None, answer_pings: bool = False
    ) -> None:
        self.script = script
        self.reject = reject
        self.tls = tls
        self.answer_pings = answer_pings
        self.received: list[str] = []
        self.pongs = 0
        self.pings: list[tuple[float, bytes]] = []  # (virtual time, payload) of each ping the client sent
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
                elif isinstance(event, wse.Ping):
                    self.pings.append((trio.current_time(), bytes(event.payload)))
                    if self.answer_pings:
                        # Keepalive tests' scripts never send while a ping is due, so no concurrent send_all.
                        await stream.send_all(conn.send(event.response()))
                elif isinstance(event, wse.CloseConnection) and self.closed_with is None:
                    self.closed_with = event.code  # the first one; EOF adds a 1006 after it
            if not data:
                self.done.set()
                return


@asynccontextmanager
async def peer(
    script: Script, reject: int | None = None, tls: ssl.SSLContext | None = None, answer_pings: bool = False
) -> AsyncIterator[tuple[Peer, str]]:
    p = Peer(script, reject, tls, answer_pings)
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


# =========================================================================== keepalive


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts; the client trusts the server's certificate for 127.0.0.1."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def silent(stream: trio.abc.Stream, conn: wsproto.WSConnection) -> None:
    """Accept the upgrade, then send nothing (the peer's reader still reads, and ignores, everything)."""


async def test_a_peer_answering_pings_keeps_a_quiet_connection_open(autojump_clock):
    go = trio.Event()

    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await go.wait()
        await stream.send_all(conn.send(wse.Message(data="still here")))

    with trio.fail_after(GUARD):
        async with peer(script, answer_pings=True) as (p, url):
            async with WsClient.open(url, connect_timeout=10, ping_interval=10.0, ping_timeout=20.0) as ws:
                start = trio.current_time()
                got: list[str] = []
                with trio.move_on_after(95.0):
                    while True:
                        got += await ws.receive_batch()
                go.set()
                after = await ws.receive_batch()
            await p.done.wait()
    assert got == []  # the pongs were swallowed
    assert after == ["still here"]
    # One ping every ping_interval of silence, each answered at once (which resets the clock).
    assert [t - start for t, _ in p.pings] == pytest.approx([10.0 * i for i in range(1, 10)], abs=EXACT)
    assert len({payload for _, payload in p.pings}) == 9  # each ping carries its own payload
    assert p.closed_with == 1000


@pytest.mark.parametrize("secure", [False, True], ids=["ws", "wss"])
async def test_a_silent_half_open_peer_times_out_at_interval_plus_timeout(autojump_clock, secure):
    server_ctx, client_ctx = tls_contexts() if secure else (None, None)
    with trio.fail_after(GUARD):
        async with peer(silent, tls=server_ctx) as (p, url):
            ws = await WsClient.connect(url, ssl_context=client_ctx, ping_interval=10.0, ping_timeout=20.0)
            start = trio.current_time()
            with pytest.raises(KeepaliveTimeout) as info:
                await ws.receive_batch()
            waited = trio.current_time() - start
            await ws.aclose()
    assert waited == pytest.approx(30.0, abs=EXACT)
    assert isinstance(info.value, ProviderError) and str(info.value) == "no pong within 20s"
    assert [t - start for t, _ in p.pings] == pytest.approx([10.0], abs=EXACT)


async def test_data_resets_the_clock_so_a_busy_feed_is_never_pinged(autojump_clock):
    sent: list[float] = []

    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        for i in range(12):
            await trio.sleep(9.0)  # virtual time (MockClock)
            await stream.send_all(conn.send(wse.Message(data=f"tick {i}")))
            sent.append(trio.current_time())

    with trio.fail_after(GUARD):
        async with peer(script) as (p, url):  # a peer that never answers a ping
            ws = await WsClient.connect(url, ping_interval=10.0, ping_timeout=20.0)
            got: list[str] = []
            while len(got) < 12:
                got += await ws.receive_batch()
            assert p.pings == []
            # The feed goes quiet: ping after ping_interval, give up ping_timeout later.
            with pytest.raises(KeepaliveTimeout):
                await ws.receive_batch()
            gave_up = trio.current_time()
            await ws.aclose()
    assert got == [f"tick {i}" for i in range(12)]
    assert [t - sent[-1] for t, _ in p.pings] == pytest.approx([10.0], abs=EXACT)
    assert gave_up - sent[-1] == pytest.approx(30.0, abs=EXACT)


async def test_any_bytes_count_as_the_answer_to_a_ping(autojump_clock):
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        for i in range(4):
            await trio.sleep(25.0)  # virtual time (MockClock)
            await stream.send_all(conn.send(wse.Message(data=f"slow {i}")))

    with trio.fail_after(GUARD):
        async with peer(script) as (p, url):  # never answers a ping, but sends data within ping_timeout of one
            ws = await WsClient.connect(url, ping_interval=10.0, ping_timeout=20.0)
            start = trio.current_time()
            got: list[str] = []
            while len(got) < 4:
                got += await ws.receive_batch()
            await ws.aclose()
    assert got == [f"slow {i}" for i in range(4)]
    assert [t - start for t, _ in p.pings] == pytest.approx([10.0, 35.0, 60.0, 85.0], abs=EXACT)


@pytest.mark.parametrize("secure", [False, True], ids=["ws", "wss"])
async def test_data_waiting_past_the_deadline_is_read_not_lost(autojump_clock, secure):
    # The reader came back late (say the hub applied backpressure): both deadlines have passed,
    # but what is waiting in the socket is returned, and no ping is sent.
    server_ctx, client_ctx = tls_contexts() if secure else (None, None)
    connected, sent = trio.Event(), trio.Event()

    async def script(stream: trio.abc.Stream, conn: wsproto.WSConnection) -> None:
        await connected.wait()  # else the frame could come with the handshake reply, read before the wait
        await stream.send_all(conn.send(wse.Message(data="waiting")))
        sent.set()

    with trio.fail_after(GUARD):
        async with peer(script, tls=server_ctx) as (p, url):
            ws = await WsClient.connect(url, ssl_context=client_ctx, ping_interval=10.0, ping_timeout=20.0)
            connected.set()
            await sent.wait()
            await trio.sleep(60.0)  # virtual time (MockClock)
            got = await ws.receive_batch()
            await ws.aclose()
    assert got == ["waiting"]
    assert p.pings == []


async def test_no_ping_interval_means_no_ping(autojump_clock):
    with trio.fail_after(GUARD):
        async with peer(silent) as (p, url):
            ws = await WsClient.connect(url)
            with trio.move_on_after(3000.0) as scope:
                await ws.receive_batch()
            await ws.aclose()
            await p.done.wait()
    assert scope.cancelled_caught
    assert p.pings == [] and p.closed_with == 1000


async def test_keepalive_settings_are_checked_before_connecting():
    for bad in ({"ping_interval": 0.0}, {"ping_interval": 10.0, "ping_timeout": -1.0}):
        with pytest.raises(ValueError, match="ping_"):
            await WsClient.connect("ws://127.0.0.1:9/", **bad)  # port 9 (discard) is never dialled
