"""The upstream WebSocket client against a real loopback server built on wsproto.

The server side is scripted per test, so it can do what a provider may do and trio-websocket's
server cannot easily: fragment messages, ping, close with a code, refuse the upgrade, or never
answer a ping (a half-open connection, as the client sees it).

The keepalive tests run under ``MockClock(autojump_threshold=0)``: loopback I/O takes no virtual
time, so every ping and every timeout is checked at its exact virtual instant.
"""

from __future__ import annotations

import email.utils
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trustme
import wsproto
import wsproto.events as wse

from trio_relay.providers.base import ProviderError, RateLimited
from trio_relay.providers.wsclient import (
    MAX_RETRY_AFTER,
    HandshakeRateLimited,
    HandshakeRejected,
    KeepaliveTimeout,
    UpstreamClosed,
    WsClient,
)

EXACT = 1e-6  # virtual seconds
GUARD = 3600.0  # virtual seconds any keepalive test may take

Script = Callable[[trio.SocketStream, wsproto.WSConnection], Awaitable[None]]


class Peer:
    def __init__(
        self,
        script: Script,
        reject: int | None = None,
        tls: ssl.SSLContext | None = None,
        answer_pings: bool = False,
        *,
        reject_headers: list[tuple[bytes, bytes]] | None = None,
        accept_with: list[wse.Event] | None = None,
        raw_reply: bytes | None = None,
    ) -> None:
        self.script = script
        self.reject = reject
        self.reject_headers = reject_headers or []  # sent with the refusal
        self.accept_with = accept_with or []  # events sent in the same write as the 101 reply
        self.raw_reply = raw_reply  # sent instead of any handshake reply, then EOF
        self.tls = tls
        self.answer_pings = answer_pings
        self.request: wse.Request | None = None  # the client's upgrade request
        self.received: list[str] = []
        self.received_bytes: list[bytes] = []
        self.pongs = 0
        self.pong_payloads: list[bytes] = []
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
            self.request = request
            if self.raw_reply is not None:
                await stream.send_all(self.raw_reply)
                return
            if self.reject is not None:
                refusal = wse.RejectConnection(status_code=self.reject, headers=self.reject_headers)
                await stream.send_all(conn.send(refusal))
                return
            await stream.send_all(conn.send(wse.AcceptConnection()) + b"".join(conn.send(e) for e in self.accept_with))
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
                elif isinstance(event, wse.BytesMessage):
                    self.received_bytes.append(bytes(event.data))
                elif isinstance(event, wse.Pong):
                    self.pongs += 1
                    self.pong_payloads.append(bytes(event.payload))
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
    script: Script,
    reject: int | None = None,
    tls: ssl.SSLContext | None = None,
    answer_pings: bool = False,
    **options: Any,
) -> AsyncIterator[tuple[Peer, str]]:
    p = Peer(script, reject, tls, answer_pings, **options)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), p.handle, 0)
        scheme = "wss" if tls else "ws"
        yield p, f"{scheme}://127.0.0.1:{listeners[0].socket.getsockname()[1]}/feed?x=1"
        nursery.cancel_scope.cancel()


async def closing_error(ws: WsClient, p: Peer | None = None) -> UpstreamClosed:
    """What the next read raises (it must be :class:`UpstreamClosed`); then the client is closed
    and, given the peer, its script has ended."""
    with pytest.raises(UpstreamClosed) as info:
        await ws.receive_batch()
    await ws.aclose()
    if p is not None:
        await p.done.wait()
    return info.value


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
            closed = await closing_error(ws)
    assert closed.code == 1009


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


# =========================================================================== what the protocol engine decides
# (the frame parser is websockets' sans-I/O protocol since issue 25; these pin down what it may not change)


async def nothing(stream: trio.abc.Stream, conn: wsproto.WSConnection) -> None:
    """A script for peers that never get as far as running one."""


@pytest.mark.parametrize(("status", "error"), [(429, HandshakeRateLimited), (503, HandshakeRejected)])
async def test_a_refusal_with_retry_after_as_an_http_date_reports_the_seconds(status, error):
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    headers = [(b"Retry-After", when.encode())]
    async with peer(nothing, reject=status, reject_headers=headers) as (_p, url):
        with trio.fail_after(5), pytest.raises(HandshakeRejected) as info:
            await WsClient.connect(url)
    assert type(info.value) is error and info.value.status == status
    assert isinstance(info.value, RateLimited) == (status == 429)
    assert info.value.retry_after == pytest.approx(120, abs=3)  # whole seconds, on the wall clock


@pytest.mark.parametrize(
    ("header", "wait"),
    [(b"7", 7.0), (b"99999", MAX_RETRY_AFTER), (b"Wed, 21 Oct 2015 07:28:00 GMT", 0.0), (b"soon", None), (None, None)],
    ids=["delta", "capped", "past-date", "unreadable", "absent"],
)
async def test_a_refusal_reports_its_retry_after_capped_or_none(header, wait):
    headers = [] if header is None else [(b"retry-after", header)]
    async with peer(nothing, reject=429, reject_headers=headers) as (_p, url):
        with trio.fail_after(5), pytest.raises(HandshakeRateLimited) as info:
            await WsClient.connect(url)
    assert info.value.retry_after == wait and str(info.value) == "handshake rejected with HTTP 429"


async def test_a_refusal_whose_body_ends_with_the_connection_is_still_a_refusal():
    # No Content-Length, no chunks: the body is delimited by the end of the connection.
    reply = (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30\r\nContent-Type: text/plain\r\n\r\nbusy, come back later"
    )
    async with peer(nothing, raw_reply=reply) as (_p, url):
        with trio.fail_after(5), pytest.raises(HandshakeRejected) as info:
            await WsClient.connect(url)
    assert info.value.status == 503 and info.value.retry_after == 30.0


@pytest.mark.parametrize(
    ("reply", "error", "text"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", ProviderError, "bad handshake reply: did not receive a valid HTTP response"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n", UpstreamClosed, "closed during the handshake"),
        (b"", UpstreamClosed, "closed during the handshake"),
    ],
    ids=["not-http", "cut-short", "nothing"],
)
async def test_a_broken_handshake_reply_is_a_clear_error(reply, error, text):
    async with peer(nothing, raw_reply=reply) as (_p, url):
        with trio.fail_after(5), pytest.raises(ProviderError) as info:
            await WsClient.connect(url)
    assert type(info.value) is error and text in str(info.value)
    if error is UpstreamClosed:
        assert info.value.code == 1006


async def test_an_upgrade_without_the_right_accept_key_is_refused():
    reply = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    async with peer(nothing, raw_reply=reply) as (_p, url):
        with trio.fail_after(5), pytest.raises(ProviderError, match="bad handshake reply.*Sec-WebSocket-Accept"):
            await WsClient.connect(url)


async def test_the_request_carries_the_extra_headers_and_offers_no_extension_or_subprotocol():
    async with peer(silent) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url, extra_headers=[(b"X-Api-Key", b"k-123"), (b"User-Agent", b"relay")])
            await ws.aclose()
            await p.done.wait()
    assert p.request is not None
    assert p.request.target == "/feed?x=1" and p.request.host == f"127.0.0.1:{url.split(':')[2].split('/')[0]}"
    sent = {bytes(k).lower(): bytes(v) for k, v in p.request.extra_headers}
    assert sent[b"x-api-key"] == b"k-123" and sent[b"user-agent"] == b"relay"
    assert p.request.extensions == [] and p.request.subprotocols == []  # no permessage-deflate, as before


async def test_a_message_over_the_limit_closes_with_1009_after_the_messages_before_it():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(conn.send(wse.Message(data="small")) + conn.send(wse.Message(data="x" * 5000)))

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url, max_message=1000)
            got = await ws.receive_batch()
            closed = await closing_error(ws, p)
    assert got == ["small"]
    assert closed.code == 1009 and "message too big" in str(closed)
    assert p.closed_with == 1009  # the server is told why


async def test_fragments_adding_up_past_the_limit_close_with_1009():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        pieces = [conn.send(wse.Message(data="y" * 300, message_finished=False)) for _ in range(5)]
        await stream.send_all(b"".join(pieces) + conn.send(wse.Message(data="end", message_finished=True)))

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url, max_message=1000)
            closed = await closing_error(ws, p)
    assert closed.code == 1009 and p.closed_with == 1009


async def test_a_message_over_the_limit_right_behind_the_handshake_reply_closes_with_1009():
    # The too-big frame arrives in the same read as the 101: the connection is open (and already
    # closing) when connect returns, and the first read reports it.
    async with peer(silent, accept_with=[wse.Message(data="z" * 5000)]) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url, max_message=1000)
            closed = await closing_error(ws, p)
    assert closed.code == 1009 and p.closed_with == 1009


async def test_frames_that_came_with_the_handshake_reply_are_returned_first():
    early = [wse.Message(data="one"), wse.Ping(payload=b"early"), wse.Message(data="two")]

    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(conn.send(wse.Message(data="three")))

    async with peer(script, accept_with=early) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            got: list[str] = []
            while len(got) < 3:
                got += await ws.receive_batch()
            await ws.aclose()
            await p.done.wait()
    assert got == ["one", "two", "three"] and p.pong_payloads == [b"early"]


async def test_a_fragmented_text_message_is_joined_even_across_a_utf8_character():
    text = "prix: 10€ – 12€"
    data = text.encode()
    cut = data.index("€".encode()) + 1  # inside the euro sign's three bytes

    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        # wsproto sends str fragments whole, so the frames are built from raw bytes: FIN=0 text, FIN=1 continuation.
        first, rest = data[:cut], data[cut:]
        await stream.send_all(bytes([0x01, len(first)]) + first)
        await trio.lowlevel.checkpoint()  # a separate write: a separate read, most likely
        await stream.send_all(bytes([0x80, len(rest)]) + rest + conn.send(wse.Message(data="next")))

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            got: list[str] = []
            while len(got) < 2:
                got += await ws.receive_batch()
            await ws.aclose()
    assert got == [text, "next"]


async def test_binary_messages_whole_or_fragmented_come_out_as_text():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(
            conn.send(wse.Message(data=b'{"a":1}'))
            + conn.send(wse.Message(data=b'{"b":', message_finished=False))
            + conn.send(wse.Message(data=b"2}", message_finished=True))
            + conn.send(wse.Message(data=b"\xff bad"))
        )

    async with peer(script) as (_p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            got: list[str] = []
            while len(got) < 3:
                got += await ws.receive_batch()
            await ws.aclose()
    assert got == ['{"a":1}', '{"b":2}', "\ufffd bad"]  # undecodable bytes replaced, as before


async def test_a_text_message_that_is_not_utf8_closes_with_1007_after_the_messages_before_it():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        bad = b"\xc3\x28"  # an invalid two-byte sequence
        await stream.send_all(conn.send(wse.Message(data="fine")) + bytes([0x81, len(bad)]) + bad)

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            got = await ws.receive_batch()
            closed = await closing_error(ws, p)
    assert got == ["fine"]
    assert closed.code == 1007 and p.closed_with == 1007


@pytest.mark.parametrize(
    "frame",
    [b"\xc1\x02hi", b"\x83\x00", b"\x81\x82abcdhi", b"\x00\x02hi"],
    ids=["reserved-bit", "reserved-opcode", "masked-by-server", "continuation-out-of-the-blue"],
)
async def test_a_frame_against_the_protocol_closes_with_1002(frame):
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(conn.send(wse.Message(data="before")) + frame)

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            got = await ws.receive_batch()
            closed = await closing_error(ws, p)
    assert got == ["before"]
    assert closed.code == 1002 and str(closed).startswith("connection closed (code 1002, protocol error")
    assert p.closed_with == 1002


async def test_a_ping_from_the_server_is_answered_with_its_payload_and_never_returned():
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(conn.send(wse.Ping(payload=b"are you there")) + conn.send(wse.Ping(payload=b"")))
        await stream.send_all(conn.send(wse.Message(data="data")))

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            assert await ws.receive_batch() == ["data"]
            await ws.aclose()
            await p.done.wait()
    assert p.pong_payloads == [b"are you there", b""]


@pytest.mark.parametrize(
    ("close", "code", "reason"),
    [(wse.CloseConnection(code=1001, reason="restarting"), 1001, "restarting"), (None, 1005, "")],
    ids=["with-code", "empty"],
)
async def test_a_close_from_the_server_is_echoed_and_reported(close, code, reason):
    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(conn.send(close) if close is not None else b"\x88\x00")

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(url)
            with pytest.raises(UpstreamClosed) as info:
                await ws.receive_batch()
            with pytest.raises(UpstreamClosed):
                await ws.send_text("too late")  # closed is closed
            await ws.aclose()
            await p.done.wait()
    assert (info.value.code, info.value.reason) == (code, reason)
    assert p.closed_with == code and p.received == []  # the echo, and nothing after it


async def test_debug_logging_never_shows_the_url_query_or_what_is_sent(all_logs):
    secret = "s3cr3t-k3y-0123456789"

    async def script(stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        await stream.send_all(conn.send(wse.Message(data="ok")))

    async with peer(script) as (p, url):
        with trio.fail_after(5):
            ws = await WsClient.connect(f"{url}&token={secret}")
            await ws.send_text(f'{{"event":"login","data":{{"apiKey":"{secret}"}}}}')
            assert await ws.receive_batch() == ["ok"]
            await ws.aclose()
            await p.done.wait()
    assert p.request is not None and secret in p.request.target and len(p.received) == 1  # it was sent...
    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in all_logs.records)
    assert secret[:8] not in logged  # ...and never logged, not even cut short
    assert not [r for r in all_logs.records if r.name.startswith("websockets")]


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


async def test_a_url_with_a_bad_port_is_a_provider_error_that_does_not_quote_the_url():
    with pytest.raises(ProviderError) as info:
        await WsClient.connect("ws://127.0.0.1:99999/feed?token=secret")
    assert str(info.value) == "not a WebSocket URL: bad port for 127.0.0.1"
