"""A small client WebSocket built for bulk reading of one upstream feed (wsproto over Trio).

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

Keepalive follows from that: with ``ping_interval`` set, :meth:`WsClient.receive_batch` itself
sends a Ping once it has waited that long without receiving a single byte, and raises
:class:`KeepaliveTimeout` if nothing at all arrives ``ping_timeout`` seconds after it. Providers
that send nothing while nothing trades need this to tell a quiet feed from a half-open connection.
"""

from __future__ import annotations

import email.utils
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import wsproto
import wsproto.events as wse
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

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


class WsClient:
    """One client WebSocket connection. Not safe for two concurrent readers (by design).

    Sending (:meth:`send_text`) from other tasks while one task reads is fine: every write,
    pongs and keepalive pings included, goes through the transport's send lock.
    """

    def __init__(
        self,
        transport: _Transport,
        conn: wsproto.WSConnection,
        max_message: int,
        ping_interval: float | None = None,
        ping_timeout: float = 20.0,
    ) -> None:
        self._transport = transport
        self._conn = conn
        self._max_message = max_message
        self._partial: list[str] = []
        self._partial_len = 0
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

        ``ping_interval`` (seconds, None for no keepalive) and ``ping_timeout``: see
        :meth:`receive_batch`.
        """
        if ping_interval is not None and not ping_interval > 0:
            raise ValueError(f"ping_interval must be > 0 or None, not {ping_interval!r}")
        if not ping_timeout > 0:
            raise ValueError(f"ping_timeout must be > 0, not {ping_timeout!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ProviderError(f"not a WebSocket URL: {parts.scheme}://{parts.hostname}")
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        context = (ssl_context or ssl.create_default_context()) if secure else None
        try:
            transport = await _Transport.connect(parts.hostname, port, context)
        except ssl.SSLError as exc:
            raise ProviderError(f"TLS with {parts.hostname}:{port} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ProviderError(f"cannot connect to {parts.hostname}:{port}: {exc.strerror or exc}") from None
        try:
            conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
            await transport.send_all(
                conn.send(wse.Request(host=host, target=target, extra_headers=extra_headers or []))
            )
            client = cls(transport, conn, max_message, ping_interval, ping_timeout)
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
        while True:
            data = await self._read()
            if not data:
                raise UpstreamClosed(1006, "closed during the handshake")
            try:
                self._conn.receive_data(data)
            except RemoteProtocolError as exc:
                raise ProviderError(f"bad handshake reply: {exc}") from None
            for event in self._conn.events():
                if isinstance(event, wse.AcceptConnection):
                    return
                if isinstance(event, wse.RejectConnection):
                    retry_after = retry_after_seconds(list(event.headers))
                    if event.status_code == 429:
                        raise HandshakeRateLimited(event.status_code, retry_after)
                    raise HandshakeRejected(event.status_code, retry_after)

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
                    ping = self._conn.send(wse.Ping(payload=self._ping_payload))
                except LocalProtocolError:
                    raise UpstreamClosed(1006, "connection is closing") from None
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
            data = self._conn.send(wse.Message(data=text))
        except LocalProtocolError:
            raise UpstreamClosed(1006, "connection is closing") from None
        await self._write(data)

    async def receive_batch(self) -> list[str]:
        """Every complete text message received so far (at least one); raises UpstreamClosed.

        With ``ping_interval`` set, once this has waited ``ping_interval`` seconds without
        receiving anything (no frame of any kind), it sends a Ping and waits on; if still nothing
        has arrived ``ping_timeout`` seconds after that, it raises :class:`KeepaliveTimeout`. Any
        bytes received reset the clock, so a busy feed is never pinged. Pongs are never returned.
        """
        while True:
            # Bytes already fed to wsproto (e.g. frames that came with the handshake reply) first.
            out = await self._process_events()
            if out:
                return out  # a close frame after data: the next call raises
            if self._closed is not None:
                raise self._closed
            data = await self._read_or_ping()
            try:
                self._conn.receive_data(data or None)
            except RemoteProtocolError as exc:
                self._closed = UpstreamClosed(1002, f"protocol error: {exc}")
                raise self._closed from None
            if not data:
                await self._process_events()
                if self._closed is None:
                    self._closed = UpstreamClosed(1006, "connection lost (EOF)")

    async def _process_events(self) -> list[str]:
        out: list[str] = []
        reply = b""
        for event in self._conn.events():
            if isinstance(event, wse.TextMessage):
                self._collect(event.data, event.message_finished, out)
            elif isinstance(event, wse.BytesMessage):
                self._collect(bytes(event.data).decode("utf-8", "replace"), event.message_finished, out)
            elif isinstance(event, wse.Ping):
                reply += self._conn.send(event.response())
            elif isinstance(event, wse.Pong):
                if event.payload == self._ping_payload:
                    self._ping_payload = b""  # ours; any other pong is unsolicited, and ignored too
            elif isinstance(event, wse.CloseConnection) and self._closed is None:
                self._closed = UpstreamClosed(event.code, event.reason or "")
                try:
                    reply += self._conn.send(event.response())
                except LocalProtocolError:
                    pass
        if reply:
            try:
                await self._write(reply)
            except UpstreamClosed:
                pass
        return out

    def _collect(self, piece: str, finished: bool, out: list[str]) -> None:
        if not finished or self._partial:
            self._partial.append(piece)
            self._partial_len += len(piece)
            if self._partial_len > self._max_message:
                self._closed = UpstreamClosed(1009, "message too big")
                raise self._closed
            if not finished:
                return
            piece = "".join(self._partial)
            self._partial.clear()
            self._partial_len = 0
        elif len(piece) > self._max_message:
            self._closed = UpstreamClosed(1009, "message too big")
            raise self._closed
        out.append(piece)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (if we can) and close the socket; never raises for a dead peer."""
        try:
            if self._conn.state is wsproto.connection.ConnectionState.OPEN:
                await self._write(self._conn.send(wse.CloseConnection(code=code, reason=reason)))
        except (UpstreamClosed, LocalProtocolError):
            pass
        finally:
            self._transport.close()
