"""A small client WebSocket built for bulk reading of one upstream feed (websockets' sans-I/O
protocol over Trio).

Why not trio-websocket here: its reader task hands over every message through a memory channel,
one scheduler checkpoint per message. When the relay is busy sending to thousands of clients,
every one of their sender tasks takes a turn between two of those checkpoints, so the upstream
was read at a few thousand frames/s and the cache fell seconds behind the feed (measured with
bench/: 2,400 frames/s ingested of 10,000 sent, p50 latency 5.8 s). :meth:`WsClient.receive_batch`
instead parses everything one ``receive_some`` brought (up to 256 KiB, thousands of frames) in a
single turn. The socket is read until the kernel has nothing more (not one fixed-size chunk), so
however long the scheduler's rounds get, each turn of the reader catches up with the feed; TLS is
done with :class:`ssl.SSLObject` on memory BIOs so ``wss://`` gets the same bulk reads. The
connection is driven by its one reader (the caller): no background task.

Why websockets' sans-I/O :class:`~websockets.client.ClientProtocol` and not wsproto (which the
relay's own client-facing server keeps): its frame parser costs about a third of wsproto's per
frame (bench/upstream_frames.py; issue 25 in bench/RESULTS.md), and at tens of thousands of
upstream frames/s wsproto's parser was a quarter of the relay's core. It answers pings and echoes
a close frame by itself; it enforces ``max_message`` from each frame's header, before the payload
is buffered; it does no UTF-8 check of text messages, which this module does once per message.

Keepalive follows from that: with ``ping_interval`` set, :meth:`WsClient.receive_batch` itself
sends a Ping once it has waited that long without receiving a single byte, and raises
:class:`KeepaliveTimeout` if nothing at all arrives ``ping_timeout`` seconds after it. Providers
that send nothing while nothing trades need this to tell a quiet feed from a half-open connection.
"""

from __future__ import annotations

import email.utils
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, cast
from urllib.parse import urlsplit

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import (
    InvalidHeaderValue,
    InvalidMessage,
    InvalidState,
    InvalidStatus,
    PayloadTooBig,
    ProtocolError,
)
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import WebSocketURI

from .base import ProviderError, RateLimited

__all__ = [
    "WsClient",
    "UpstreamClosed",
    "HandshakeRejected",
    "HandshakeRateLimited",
    "KeepaliveTimeout",
    "retry_after_seconds",
]

RECEIVE_BYTES = 1 << 18
# Most bytes taken in one turn: bounds the work (and the pause) of a single turn after a long stall.
MAX_DRAIN = 1 << 23


class UpstreamClosed(ProviderError):
    """The upstream WebSocket ended (close frame, EOF or reset)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed (code {code}{', ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class HandshakeRejected(ProviderError):
    """The server answered the upgrade with an HTTP status instead of 101.

    ``retry_after``: the answer's ``Retry-After`` in seconds (delta-seconds or an HTTP date), or
    None when it has none or it cannot be read.
    """

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"handshake rejected with HTTP {status}")
        self.status = status
        self.retry_after = retry_after


class HandshakeRateLimited(HandshakeRejected, RateLimited):
    """HTTP 429 on the upgrade: the upstream waits at least ``retry_after`` (or its own minimum)."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        HandshakeRejected.__init__(self, status, retry_after)


# Longest Retry-After honoured (an absurd one must not park the upstream for days).
MAX_RETRY_AFTER = 3600.0


def retry_after_seconds(headers: list[tuple[bytes, bytes]], now: float | None = None) -> float | None:
    """The ``Retry-After`` of an HTTP answer in seconds (RFC 9110 10.2.3), capped; None if absent or bad."""
    for name, value in headers:
        if name.lower() != b"retry-after":
            continue
        text = value.decode("latin-1").strip()
        if text.isdigit():
            return min(float(text), MAX_RETRY_AFTER)
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        return min(max(seconds, 0.0), MAX_RETRY_AFTER)
    return None


class KeepaliveTimeout(ProviderError):
    """Nothing at all (not even a pong) came back within ``timeout`` seconds of our ping."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no pong within {timeout:g}s")
        self.timeout = timeout


class _Transport:
    """A connected non-blocking socket, optionally wrapped in TLS, read in bulk."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None = None) -> None:
        self._sock = sock
        self._tls = tls
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._send_lock = trio.Lock()
        self._eof = False

    @classmethod
    async def connect(cls, host: str, port: int, tls_context: ssl.SSLContext | None) -> _Transport:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError | None = None
        for family, type_, proto, _name, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                await trio.socket.from_stdlib_socket(sock).connect(addr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = cls(sock)
            if tls_context is not None:
                try:
                    await transport._start_tls(tls_context, host)
                except BaseException:
                    transport.close()
                    raise
            return transport
        raise error or OSError(f"no address for {host}")

    async def _start_tls(self, context: ssl.SSLContext, host: str) -> None:
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush_tls()
                raw = await self._receive_raw()
                if not raw:
                    raise UpstreamClosed(1006, "closed during the TLS handshake") from None
                self._incoming.write(raw)
        await self._flush_tls()

    async def _flush_tls(self) -> None:
        pending = self._outgoing.read()
        if pending:
            await self._send_raw(pending)

    async def _receive_raw(self) -> bytes:
        """Everything the kernel holds for us (waiting if nothing), b"" at EOF."""
        chunks: list[bytes] = []
        size = 0
        waited = False
        while size < MAX_DRAIN:
            try:
                data = self._sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                if chunks:
                    break
                await trio.lowlevel.wait_readable(self._sock)
                waited = True
                continue
            except OSError as exc:
                raise UpstreamClosed(1006, exc.strerror or "connection lost") from None
            if not data:
                self._eof = True
                break
            chunks.append(data)
            size += len(data)
        if not waited:
            # An async call always yields, even with data ready; but a cancellation here would lose
            # bytes already taken from the kernel, so (like trio's own sockets) this yield is shielded.
            # A read under a deadline that has just passed still returns what was waiting.
            await trio.lowlevel.cancel_shielded_checkpoint()
        return b"".join(chunks)

    async def receive(self) -> bytes:
        """Plaintext bytes: everything available now (waiting if nothing); b"" at EOF.

        Cancel-safe: a cancellation only lands while nothing has been taken from the socket, so no
        bytes are lost (receive_batch's keepalive deadlines rely on this).
        """
        if self._tls is None:
            return b"" if self._eof else await self._receive_raw()
        while True:
            plain: list[bytes] = []
            try:
                while True:
                    chunk = self._tls.read(RECEIVE_BYTES)
                    if not chunk:
                        self._eof = True
                        break
                    plain.append(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                raise UpstreamClosed(1006, f"TLS error: {exc.reason or exc}") from None
            if plain or self._eof:
                return b"".join(plain)  # anything reading produced to send goes out next time or with a send
            if self._outgoing.pending:
                # Before waiting, as the peer may wait for it; under the lock, so it cannot land in the
                # middle of a frame another task is sending.
                async with self._send_lock:
                    await self._flush_tls()
            raw = await self._receive_raw()
            if not raw:
                self._eof = True
                return b""
            self._incoming.write(raw)

    async def _send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            except OSError as exc:
                raise UpstreamClosed(1006, exc.strerror or "connection lost") from None
            view = view[sent:]
        await trio.lowlevel.checkpoint()

    async def send_all(self, data: bytes) -> None:
        async with self._send_lock:
            if self._tls is None:
                await self._send_raw(data)
            else:
                self._tls.write(data)
                await self._flush_tls()

    def close(self) -> None:
        self._sock.close()


class _NoDebugLog(logging.LoggerAdapter[logging.Logger]):
    """The protocol's logger, never enabled for DEBUG.

    At DEBUG, websockets logs the request line (Finnhub's carries the token in its query) and
    every frame sent (FMP's and Polygon's login frames carry the key, cut to a length where the
    log filter's masking may no longer recognise it). Its warnings and errors still come through.
    """

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


_PROTOCOL_LOG = _NoDebugLog(logging.getLogger("trio_relay.providers.wsclient"))


class _Parsed(Protocol):
    """A frame as websockets' parser hands it out: ``data`` is the bytearray the stream reader cut.

    (``Frame.data`` is typed for anything bytes-like: a memoryview could only come from an
    extension's decoder, and none is negotiated. ``bytearray.decode`` is twice as fast as
    ``str(buffer, "utf-8")`` on a tick-sized frame.)
    """

    opcode: Opcode
    data: bytearray
    fin: bool


_TEXT, _BINARY, _CONT, _CLOSE, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.CLOSE, Opcode.PONG


def _closed_by(exc: Exception) -> UpstreamClosed:
    """What the protocol's parser failing with ``exc`` ends the connection with (the code it sent)."""
    if isinstance(exc, EOFError):
        return UpstreamClosed(1006, "connection lost (EOF)")
    if isinstance(exc, PayloadTooBig):
        return UpstreamClosed(1009, f"message too big: {exc}")
    if isinstance(exc, UnicodeDecodeError):  # a close frame's reason
        return UpstreamClosed(1007, f"invalid UTF-8: {exc.reason}")
    if isinstance(exc, ProtocolError):
        return UpstreamClosed(1002, f"protocol error: {exc}")
    return UpstreamClosed(1011, "cannot parse the stream")  # logged by websockets, with its traceback


def _handshake_error(exc: Exception) -> ProviderError:
    """The error a failed upgrade ends :meth:`WsClient.connect` with."""
    if isinstance(exc, InvalidStatus):
        response = exc.response
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.raw_items()]
        retry_after = retry_after_seconds(headers)
        if response.status_code == 429:
            return HandshakeRateLimited(response.status_code, retry_after)
        return HandshakeRejected(response.status_code, retry_after)
    cause = exc.__cause__
    if isinstance(exc, InvalidMessage) and isinstance(cause, EOFError):
        return UpstreamClosed(1006, "closed during the handshake")
    return ProviderError(f"bad handshake reply: {exc}{f' ({cause})' if cause is not None else ''}")


class WsClient:
    """One client WebSocket connection. Not safe for two concurrent readers (by design).

    Sending (:meth:`send_text`) from other tasks while one task reads is fine: every write,
    pongs and keepalive pings included, goes through the transport's send lock, and each takes
    the bytes of its own frame from the protocol before it awaits anything.
    """

    def __init__(
        self,
        transport: _Transport,
        protocol: ClientProtocol,
        ping_interval: float | None = None,
        ping_timeout: float = 20.0,
    ) -> None:
        self._transport = transport
        self._proto = protocol
        self._early: list[_Parsed] = []  # frames that came with the handshake reply, not yet handed out
        self._partial: list[bytearray] = []  # the fragments of an unfinished message
        self._partial_text = False  # whether that message is a text message
        self._closed: UpstreamClosed | None = None
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._heard_at = trio.current_time()  # when we last received any bytes at all
        self._ping_sent_at: float | None = None  # our unanswered ping, if we sent one since then
        self._ping_payload = b""
        self._pings = 0

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        max_message: int = 1 << 20,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ping_interval: float | None = None,
        ping_timeout: float = 20.0,
    ) -> WsClient:
        """Open TCP (TLS for wss://), do the upgrade. The caller bounds the time it may take.

        ``max_message``: the largest message accepted, in bytes (all its fragments together);
        a larger one is refused from its frame header, before its payload is buffered, and ends
        the connection with 1009. ``ping_interval`` (seconds, None for no keepalive) and
        ``ping_timeout``: see :meth:`receive_batch`. No extension (permessage-deflate) and no
        subprotocol is offered. Errors never quote the URL's path or query (they may hold a key).
        """
        if ping_interval is not None and not ping_interval > 0:
            raise ValueError(f"ping_interval must be > 0 or None, not {ping_interval!r}")
        if not ping_timeout > 0:
            raise ValueError(f"ping_timeout must be > 0, not {ping_timeout!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ProviderError(f"not a WebSocket URL: {parts.scheme}://{parts.hostname}")
        secure = parts.scheme == "wss"
        try:
            port = parts.port or (443 if secure else 80)
        except ValueError:
            raise ProviderError(f"not a WebSocket URL: bad port for {parts.hostname}") from None
        # Built from the URL's parts, not websockets' parse_uri: user info and fragment are
        # ignored as they always were (parse_uri would turn user info into Basic auth).
        uri = WebSocketURI(secure, parts.hostname, port, parts.path, parts.query)
        protocol = ClientProtocol(uri, max_size=max_message, logger=_PROTOCOL_LOG)
        request = protocol.connect()
        for name, value in extra_headers or []:
            try:
                request.headers[name.decode("latin-1")] = value.decode("latin-1")
            except InvalidHeaderValue:
                raise ProviderError(f"bad value for the {name.decode('latin-1')!r} header") from None
        protocol.send_request(request)
        context = (ssl_context or ssl.create_default_context()) if secure else None
        try:
            transport = await _Transport.connect(parts.hostname, port, context)
        except ssl.SSLError as exc:
            raise ProviderError(f"TLS with {parts.hostname}:{port} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ProviderError(f"cannot connect to {parts.hostname}:{port}: {exc.strerror or exc}") from None
        try:
            client = cls(transport, protocol, ping_interval, ping_timeout)
            await client._write(b"".join(protocol.data_to_send()))
            await client._await_accept()
            return client
        except BaseException:
            transport.close()
            raise

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        connect_timeout: float,
        max_message: int = 1 << 20,
        ping_interval: float | None = None,
        ping_timeout: float = 20.0,
    ) -> AsyncIterator[WsClient]:
        """Connect within ``connect_timeout`` (else ProviderError); close (with a close frame) on exit.

        ``ping_interval`` / ``ping_timeout``: keepalive, see :meth:`receive_batch`.
        """
        try:
            with trio.fail_after(connect_timeout):
                ws = await cls.connect(
                    url, max_message=max_message, ping_interval=ping_interval, ping_timeout=ping_timeout
                )
        except trio.TooSlowError:
            raise ProviderError(f"connect timed out after {connect_timeout:g}s") from None
        try:
            yield ws
        finally:
            await ws.aclose()

    async def _await_accept(self) -> None:
        """Read the server's answer to the upgrade: return once open, else raise what it said.

        A refusal is reported once its body is read (websockets reads it whole, up to 1 MiB, as
        delimited by its Content-Length, its chunks or the end of the connection).
        """
        protocol = self._proto
        while True:
            data = await self._read()
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            events = protocol.events_received()
            if protocol.handshake_exc is not None:
                raise _handshake_error(protocol.handshake_exc)
            if protocol.state is not State.CONNECTING:
                # Open, or already closing if a frame right behind the reply broke a rule (too big):
                # events[0] is the reply, those frames come next, and the first read reports them.
                self._early = cast(list[_Parsed], events[1:])
                return
            if not data:
                raise UpstreamClosed(1006, "closed during the handshake")

    async def _read(self) -> bytes:
        data = await self._transport.receive()
        if data:
            self._heard_at = trio.current_time()
            self._ping_sent_at = None  # the peer is alive: whatever came counts as the pong
        return data

    async def _read_or_ping(self) -> bytes:
        """:meth:`_read`, keeping the connection alive meanwhile when ``ping_interval`` is set."""
        if self._ping_interval is None:
            return await self._read()
        while True:
            if self._ping_sent_at is None:
                with trio.move_on_at(self._heard_at + self._ping_interval):
                    return await self._read()
                self._ping_sent_at = trio.current_time()
                self._pings += 1
                self._ping_payload = b"trio-relay %d" % self._pings
                try:
                    self._proto.send_ping(self._ping_payload)
                except InvalidState:
                    raise UpstreamClosed(1006, "connection is closing") from None
                ping = b"".join(self._proto.data_to_send())
            else:
                ping = b""  # sent by an earlier call, cancelled while it waited for the answer
            # The ping's send is under the deadline too: a dead peer may have let the send buffer fill.
            with trio.move_on_at(self._ping_sent_at + self._ping_timeout):
                await self._write(ping)
                return await self._read()
            raise KeepaliveTimeout(self._ping_timeout)

    async def _write(self, data: bytes) -> None:
        if data:
            await self._transport.send_all(data)

    async def send_text(self, text: str) -> None:
        if self._closed is not None:
            raise self._closed
        try:
            self._proto.send_text(text.encode())
        except InvalidState:
            raise UpstreamClosed(1006, "connection is closing") from None
        await self._write(b"".join(self._proto.data_to_send()))

    async def receive_batch(self) -> list[str]:
        """Every complete message received so far (at least one); raises UpstreamClosed.

        Text messages as sent; binary ones decoded as UTF-8 (undecodable bytes replaced). A text
        message that is not UTF-8 ends the connection with 1007, one over ``max_message`` bytes
        with 1009, a frame that breaks the protocol with 1002: each after the messages before it
        were returned. Pings are answered as they are read; pongs are never returned.

        With ``ping_interval`` set, once this has waited ``ping_interval`` seconds without
        receiving anything (no frame of any kind), it sends a Ping and waits on; if still nothing
        has arrived ``ping_timeout`` seconds after that, it raises :class:`KeepaliveTimeout`. Any
        bytes received reset the clock, so a busy feed is never pinged.
        """
        while True:
            # Frames already parsed (e.g. those that came with the handshake reply) first.
            out = await self._process_events()
            if out:
                return out  # a close frame after data: the next call raises
            if self._closed is not None:
                raise self._closed
            data = await self._read_or_ping()
            if data:
                self._proto.receive_data(data)
            else:
                self._proto.receive_eof()
                await self._process_events()
                if self._closed is None:
                    self._closed = UpstreamClosed(1006, "connection lost (EOF)")

    async def _process_events(self) -> list[str]:
        """The messages of the frames parsed since the last call; sends what the protocol answered.

        The hot path of the relay's ingest: one pass over the frames, one decode per message.
        """
        protocol = self._proto
        frames = cast(list[_Parsed], protocol.events_received())
        if self._early:
            frames = self._early + frames
            self._early = []
        out: list[str] = []
        for frame in frames:
            opcode = frame.opcode
            if opcode is _TEXT and frame.fin:
                try:
                    out.append(frame.data.decode())
                except UnicodeDecodeError:
                    self._fail(1007, "invalid UTF-8 in a text message")
                    break
            elif opcode is _TEXT or opcode is _BINARY:
                if frame.fin:
                    out.append(frame.data.decode("utf-8", "replace"))
                else:
                    self._partial = [frame.data]
                    self._partial_text = opcode is _TEXT
            elif opcode is _CONT:
                # The protocol checked the order of fragments and their total size (max_message).
                self._partial.append(frame.data)
                if frame.fin:
                    whole = b"".join(self._partial)
                    self._partial = []
                    try:
                        out.append(whole.decode() if self._partial_text else whole.decode("utf-8", "replace"))
                    except UnicodeDecodeError:
                        self._fail(1007, "invalid UTF-8 in a text message")
                        break
            elif opcode is _PONG:
                if frame.data == self._ping_payload:
                    self._ping_payload = b""  # ours; any other pong is unsolicited, and ignored too
            elif opcode is _CLOSE and self._closed is None:
                received = protocol.close_rcvd  # the protocol has queued its echo
                assert received is not None
                self._closed = UpstreamClosed(received.code, received.reason)
            # A ping: the protocol has queued the pong.
        if protocol.parser_exc is not None and self._closed is None:
            self._closed = _closed_by(protocol.parser_exc)
        reply = b"".join(protocol.data_to_send())
        if reply:
            try:
                await self._write(reply)
            except UpstreamClosed:
                pass
        return out

    def _fail(self, code: int, reason: str) -> None:
        """End the connection for what this module found wrong: close frame queued, nothing more parsed."""
        self._proto.fail(code, reason)
        self._closed = UpstreamClosed(code, reason)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (if we can) and close the socket; never raises for a dead peer."""
        try:
            if self._proto.state is State.OPEN:
                self._proto.send_close(code, reason)
                await self._write(b"".join(self._proto.data_to_send()))
        except (UpstreamClosed, InvalidState, ProtocolError):
            pass
        finally:
            self._transport.close()
