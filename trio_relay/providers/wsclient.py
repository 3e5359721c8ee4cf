"""A small client WebSocket built for bulk reading of one upstream feed (wsproto over Trio).

Why not trio-websocket here: its reader task hands over every message through a memory channel,
one scheduler checkpoint per message. When the relay is busy sending to thousands of clients,
every one of their sender tasks takes a turn between two of those checkpoints, so the upstream
was read at a few thousand frames/s and the cache fell seconds behind the feed (measured with
bench/: 2,400 frames/s ingested of 10,000 sent, p50 latency 5.8 s). :meth:`WsClient.receive_batch`
instead parses everything one ``receive_some`` brought (up to 256 KiB, thousands of frames) in a
single turn. The connection is driven by its one reader (the caller): no background task.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import trio
import wsproto
import wsproto.events as wse
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .base import ProviderError

__all__ = ["WsClient", "UpstreamClosed", "HandshakeRejected"]

RECEIVE_BYTES = 1 << 18  # a whole backlog per turn: a busy relay gives the reader few turns


class UpstreamClosed(ProviderError):
    """The upstream WebSocket ended (close frame, EOF or reset)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed (code {code}{', ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class HandshakeRejected(ProviderError):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"handshake rejected with HTTP {status}")
        self.status = status


class WsClient:
    """One client WebSocket connection. Not safe for two concurrent readers (by design)."""

    def __init__(self, stream: trio.abc.Stream, conn: wsproto.WSConnection, max_message: int) -> None:
        self._stream = stream
        self._conn = conn
        self._max_message = max_message
        self._partial: list[str] = []
        self._partial_len = 0
        self._closed: UpstreamClosed | None = None
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(
        cls, url: str, *, max_message: int = 1 << 20, extra_headers: list[tuple[bytes, bytes]] | None = None
    ) -> WsClient:
        """Open TCP (TLS for wss://), do the upgrade. The caller bounds the time it may take."""
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ProviderError(f"not a WebSocket URL: {parts.scheme}://{parts.hostname}")
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
        except OSError as exc:
            raise ProviderError(f"cannot connect to {parts.hostname}:{port}: {exc.strerror or exc}") from None
        try:
            if secure:
                stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=parts.hostname)
                await stream.do_handshake()
            conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
            await stream.send_all(conn.send(wse.Request(host=host, target=target, extra_headers=extra_headers or [])))
            client = cls(stream, conn, max_message)
            await client._await_accept()
            return client
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

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
                    raise HandshakeRejected(event.status_code)

    async def _read(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(RECEIVE_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamClosed(1006, str(exc) or "connection lost") from None

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise UpstreamClosed(1006, str(exc) or "connection lost") from None

    async def send_text(self, text: str) -> None:
        if self._closed is not None:
            raise self._closed
        try:
            data = self._conn.send(wse.Message(data=text))
        except LocalProtocolError:
            raise UpstreamClosed(1006, "connection is closing") from None
        await self._write(data)

    async def receive_batch(self) -> list[str]:
        """Every complete text message of the next read (at least one); raises UpstreamClosed."""
        while True:
            if self._closed is not None:
                raise self._closed
            data = await self._read()
            try:
                self._conn.receive_data(data or None)
            except RemoteProtocolError as exc:
                self._closed = UpstreamClosed(1002, f"protocol error: {exc}")
                raise self._closed from None
            out: list[str] = []
            reply = b""
            for event in self._conn.events():
                if isinstance(event, wse.TextMessage):
                    self._collect(event.data, event.message_finished, out)
                elif isinstance(event, wse.BytesMessage):
                    self._collect(bytes(event.data).decode("utf-8", "replace"), event.message_finished, out)
                elif isinstance(event, wse.Ping):
                    reply += self._conn.send(event.response())
                elif isinstance(event, wse.CloseConnection):
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
            if out:
                return out  # a close frame after data: the next call raises
            if not data and self._closed is None:
                self._closed = UpstreamClosed(1006, "connection lost (EOF)")

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
            await trio.aclose_forcefully(self._stream)
