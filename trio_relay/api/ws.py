"""The client WebSocket at ``/api/v2/realtime/ws/prices``: the upgrade policy and the socket loops.

Served natively (see :class:`PriceSocketServer`): one reader loop (client → hub) and one sender task
(outbox → socket) per connection, both owned by the connection's handler. What a client may say
and what it gets back is :mod:`.protocol` (parsing, replies) and :mod:`.sessions` (applying
actions to the hub); docs/api.md is the reference. In short:

- ``{"action":"subscribe","symbols":["AAPL"]}`` → ``{"type":"subscribed","symbols":[...]}`` then the
  cached ``price_update`` of each newly subscribed symbol that has one, then live updates.
  An optional ``"batch": true`` switches the connection to batched frames (see below).
  A reconnecting client adds ``"since": {"AAPL": 1234}, "epoch": "..."`` (the last ``seq`` and
  the ``epoch`` it saw): it gets exactly the updates it missed instead of a snapshot, and the ack
  says ``"recovered": true`` (or ``false`` + ``"unrecovered"`` with a snapshot for those).
- ``{"type":"status",...}`` messages come unasked: the upstream went down / stale / failed over /
  came back (``scope: "upstream"``), symbols stopped or resumed ticking (``scope: "symbols"``),
  the relay is shutting down and the client should reconnect (``scope: "relay"``).
- ``"channel": "bars", "interval": "1m"`` in a subscribe/unsubscribe: live OHLCV bars
  (``{"type":"bar",...}``) instead of ticks; see :mod:`trio_relay.bars.channel`.
- ``{"action":"unsubscribe","symbols":[...]}`` → ``{"type":"unsubscribed","symbols":[...]}``; no update
  of those symbols follows the ack.
- ``{"action":"ping"}`` → ``{"type":"pong"}``; ``{"action":"list"}`` → ``{"type":"subscriptions","symbols":[...]}``.
- Anything wrong → ``{"type":"error","code":...,"message":...}``; the connection stays up.

By default each message is its own text frame. With ``?batch=1`` on the URL (or ``"batch":true``
in a subscribe), every frame is a JSON array of all messages pending for the client, sent as soon
as the previous frame went out (no timer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import msgspec
import trio
import wsproto
import wsproto.events as wse
from wsproto.connection import Connection, ConnectionType
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..auth import BROWSER_PARAM, AuthError, bearer_token, open_principal
from ..hub import CLOSE_GRACE, CLOSE_POLICY, Client
from ..hub.outbox import Outbox
from ..model import CloseCode, ws_text_frame
from .protocol import ProtocolError, flag, parse_symbols
from .sessions import Actions, Session

__all__ = ["WS_PATH", "Handover", "PriceSocketServer", "ProtocolError", "parse_symbols", "peer", "peer_ip", "reject"]

log = logging.getLogger("trio_relay.api.ws")

WS_PATH = "/api/v2/realtime/ws/prices"


class Handover:
    """A price-socket upgrade the edge parsed and checked, not answered yet: taken once."""

    __slots__ = ("_parts",)

    def __init__(self, handshake: wsproto.WSConnection, request: wse.Request, trailing: bytes) -> None:
        self._parts: tuple[wsproto.WSConnection, wse.Request, bytes] | None = (handshake, request, trailing)

    def take(self) -> tuple[wsproto.WSConnection, wse.Request, bytes]:
        """The handshake, its request and the bytes after it; the holder keeps nothing of them."""
        parts, self._parts = self._parts, None
        if parts is None:
            raise RuntimeError("the upgrade was already taken")
        return parts


class PriceSocketServer:
    """The client WebSocket, served natively on Trio + wsproto; one instance serves every connection.

    Not through ASGI: every frame through Hypercorn's WebSocket stream cost ~60 µs (wsproto
    framing per client, the H11 protocol layers, a lock and a shielded socket write per frame),
    which capped a 1,000-client relay at ~11,000 frames/s and, because the shielded write cannot
    be cancelled, left a client that stops reading pinned until the kernel gave up. Here each
    message arrives from the hub already framed (encoded once for everybody), and a client's
    sender writes everything it has pending with ONE socket write.
    """

    def __init__(self, actions: Actions) -> None:
        self.actions = actions
        self.hub = actions.hub  # hub.config holds the client limits (and changes on reload)
        self.security = actions.security

    async def serve(self, stream: trio.abc.Stream, handover: Handover) -> None:
        """Take over a connection whose upgrade the edge parsed and checked (``handover``).

        The edge has checked the Host, the handshake headers and the per-address cap; this
        checks the origin and the token, then answers 101 (or an HTTP error and the end of the
        connection) and serves the price socket until it closes.
        """
        accepted = await self._accept(stream, *handover.take())
        if accepted is None:
            return
        conn, session, batch = accepted
        try:
            await self._serve_accepted(stream, conn, session, batch)
        finally:
            session.release_user()

    async def _accept(
        self, stream: trio.abc.Stream, handshake: wsproto.WSConnection, request: wse.Request, trailing: bytes
    ) -> tuple[Connection, Session, bool] | None:
        """Check the origin and the token and answer 101; None if refused (the answer is sent).

        What the handshake needed (its headers, wsproto's handshake state) ends with this call:
        the connection then lives on a bare frame-level :class:`wsproto.connection.Connection`.
        """
        query = parse_qs(urlsplit(request.target).query)
        batch = flag(query.get("batch", [""])[-1])
        headers = {bytes(k).lower(): bytes(v).decode("latin-1") for k, v in request.extra_headers}
        security = self.security
        if not security.origin_allowed(headers.get(b"origin"), request.host):
            log.warning("[CLIENT] refused: origin %.100r is not allowed", headers.get(b"origin"))
            await reject(stream, 403, "forbidden_origin", "this page's origin may not open the price socket")
            return None
        session = Session(security)
        if not security.auth.enabled:
            try:  # with auth off, a browser's own id (if it sends one) owns its alerts and portfolios
                session.principal = open_principal(query.get(BROWSER_PARAM, [""])[-1])
            except AuthError as exc:
                await reject(stream, 400, "invalid_browser", exc.reason)
                return None
        else:
            token = query.get("token", [""])[-1] or bearer_token(headers.get(b"authorization"))
            if token:
                try:
                    session.principal = security.auth.verify(token)
                except AuthError as exc:
                    log.info("[AUTH] WebSocket refused: %s", exc.reason)
                    await reject(stream, 401, "unauthorized", exc.reason, bearer=True)
                    return None
        if session.principal is not None and not session.claim_user():
            cap = security.per_user.cap
            await reject(stream, 429, "too_many_connections", f"at most {cap} connections per user")
            return None
        try:
            # No extensions offered back: permessage-deflate stays off (it would cost a
            # compression per client per frame, and our frames are encoded once for everyone).
            await stream.send_all(handshake.send(wse.AcceptConnection()))
        except BaseException:
            session.release_user()
            raise
        return Connection(ConnectionType.SERVER, trailing_data=trailing), session, batch

    async def _serve_accepted(self, stream: trio.abc.Stream, conn: Connection, session: Session, batch: bool) -> None:
        address = peer(stream)
        remote = f"{address[0]}:{address[1]}" if address else "?"
        client = self.hub.connect(batch=batch, remote=remote)
        session.attach(client)
        log.info(
            "[CLIENT] #%d connected from %s%s%s",
            client.id,
            client.remote,
            f" as {client.user}" if client.user else "",
            " (batch)" if batch else "",
        )
        writer = _Writer(stream)
        if writer.direct:
            # The hub's flusher writes this client's frames (one task for all, no wake-up per
            # client); this connection's sender only writes what the socket did not take at once.
            _Sink(client, writer).attach(self.hub.flusher.mark)
        peer_gone = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    sender = trio.CancelScope()
                    loop = self._rest_loop if writer.direct else self._send_loop
                    nursery.start_soon(loop, client, writer, sender)
                    if self.security.auth.enabled:
                        nursery.start_soon(self.actions.guard, session)
                    # close() cancels only the reader: the sender must not be cut mid-frame.
                    with client.cancel_scope:
                        peer_gone = await self._read_loop(client, stream, conn, writer, session)
                    session.guard.cancel()
                    if peer_gone:
                        client.outbox.stop()
                    else:  # the sender writes what is pending (a last error or notice), ends...
                        client.outbox.finish()
                    sender.deadline = trio.current_time() + CLOSE_GRACE  # ...if that ends in time
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                # Reset or gone mid-write/read; from the nursery these arrive grouped.
                peer_gone = True
            if client.close_code is not None and not peer_gone:
                # Bounded: a peer that stopped reading may never take the close frame.
                with trio.move_on_after(1.0):
                    try:
                        frame = conn.send(wse.CloseConnection(code=client.close_code, reason=client.close_reason))
                        await writer.write(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                        pass
        finally:
            writer.detach()
            client.outbox.stop()
            # Only now: shutdown waits for the last client to be gone before it stops serving.
            if self.actions.portfolios is not None:
                self.actions.portfolios.disconnect(client)
            self.hub.disconnect(client)
        log.info(
            "[CLIENT] #%d disconnected (%s)",
            client.id,
            f"closed {client.close_code}: {client.close_reason}" if client.close_code and not peer_gone else "by peer",
        )

    async def _send_loop(self, client: Client, writer: _Writer, scope: trio.CancelScope) -> None:
        """The sender of a TLS client (and of every client once it is closing): outbox → socket."""
        with scope:
            await _write_pending(client, writer)

    async def _rest_loop(self, client: Client, writer: _Writer, scope: trio.CancelScope) -> None:
        """The sender of a direct-mode client: writes what the flusher's write left, until closing."""
        outbox = client.outbox
        with scope:
            while not (outbox.stopped or outbox.finishing):
                if writer.rest:
                    await writer.write()  # the rest first; the writer then pokes the outbox
                else:
                    await outbox.wait()
            # Closing (the close frame's write sends any rest first): the last frames (an error, a notice) go out through this task, in order.
            await _write_pending(client, writer)

    async def _read_loop(
        self,
        client: Client,
        stream: trio.abc.Stream,
        conn: Connection,
        writer: _Writer,
        session: Session,
    ) -> bool:
        """Apply client messages until the peer closes; True if the peer ended the connection."""
        limit = self.hub.config.max_message_size
        max_frames = self.hub.config.max_frames_per_message
        parts: list[str] = []
        size = 0
        frames = 0  # of the message being received: an endless run of empty fragments ends here
        while True:
            data = await stream.receive_some(65536)
            try:
                conn.receive_data(bytes(data) if data else None)  # bytes(bytes) is no copy
                events = list(conn.events())
            except RemoteProtocolError as exc:
                client.close(CloseCode.PROTOCOL_ERROR, f"protocol error: {exc}"[:120])
                return False
            for event in events:
                if isinstance(event, (wse.TextMessage, wse.BytesMessage)):
                    piece = event.data
                    size += len(piece)
                    if size > limit:
                        client.close(CloseCode.TOO_BIG, f"message larger than {limit} bytes")
                        return False
                    if event.frame_finished:
                        frames += 1
                        if frames > max_frames:
                            client.close(CLOSE_POLICY, f"message split into more than {max_frames} frames")
                            return False
                    if not piece and not event.message_finished:
                        continue  # an empty fragment adds nothing to keep
                    if isinstance(piece, (bytes, bytearray)):
                        try:
                            piece = bytes(piece).decode("utf-8")
                        except UnicodeDecodeError:
                            piece = "\ufffd"  # reported as invalid JSON below
                    parts.append(piece)
                    if event.message_finished:
                        text = "".join(parts)
                        parts.clear()
                        size = 0
                        frames = 0
                        self.actions.handle_text(client, session, text)
                elif isinstance(event, wse.Ping):
                    await writer.write(conn.send(event.response()))
                elif isinstance(event, wse.CloseConnection):
                    try:
                        await writer.write(conn.send(event.response()))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                        pass
                    return True
            if not data:
                return True


async def reject(stream: trio.abc.Stream, status: int, code: str, message: str, *, bearer: bool = False) -> None:
    """Refuse a WebSocket upgrade with an HTTP error and a JSON body."""
    body = msgspec.json.encode({"error": code, "message": message})
    extra = b'www-authenticate: Bearer realm="trio-relay"\r\n' if bearer else b""
    reason = HTTPStatus(status).phrase.encode()
    await stream.send_all(
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n%s"
        b"content-length: %d\r\n\r\n%s" % (status, reason, extra, len(body), body)
    )


def peer(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The remote (host, port) of a socket stream, or of the socket under a TLS stream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return None
    return str(host), int(port)


def peer_ip(stream: trio.abc.Stream) -> str:
    address = peer(stream)
    return address[0] if address else "?"


async def _write_pending(client: Client, writer: _Writer) -> None:
    """Write the outbox's frames as they come, until it is stopped (or finished and empty)."""
    outbox = client.outbox
    while True:
        frames = await outbox.get()
        if not frames:
            return  # stopped
        await writer.write(wire(outbox.batch, frames))
        outbox.progressed(len(frames))


def wire(batch: bool, entries: list[bytes]) -> bytes:
    """What one socket write sends for an outbox's ``entries``: its frames, or one JSON array of
    its payloads (a batched outbox holds payloads, see :class:`~trio_relay.hub.outbox.Outbox`)."""
    if batch:
        return ws_text_frame(b"[" + b",".join(entries) + b"]")
    return entries[0] if len(entries) == 1 else b"".join(entries)


class _Writer:
    """Serialises writes to one client socket (the sender, the flusher and the reader's pongs share it).

    A write cancelled half-way leaves a torn frame on the wire: the writer is then ``broken`` and
    refuses further writes (no close frame may follow a torn one; the connection is just dropped).

    On a plain socket (``direct``) the hub's flusher writes with :meth:`write_now`, which never
    waits: what the socket does not take is kept in :attr:`rest`, and the next :meth:`write`
    (the connection's sender task, or a pong) sends it before anything else, so frames are never
    interleaved. ``on_free`` runs after each :meth:`write` (the flusher may have skipped the
    outbox meanwhile).
    """

    __slots__ = ("_stream", "_lock", "_in_write", "_fd", "rest", "on_free")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._lock = trio.Lock()
        self._in_write = False
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self.rest = b""  # bytes of a frame write_now began and the socket did not take yet
        self.on_free: Callable[[], object] | None = None

    @property
    def direct(self) -> bool:
        """True on a plain socket, where :meth:`write_now` may be used."""
        return self._fd >= 0

    def ready(self) -> bool:
        """True if :meth:`write_now` may write: no write in progress and no rest waiting."""
        return self._fd >= 0 and not self.rest and not self._lock.locked() and not self._in_write

    def detach(self) -> None:
        """The connection is over: never write to its descriptor again (it may be reused)."""
        self._fd = -1

    def write_now(self, data: bytes) -> bool:
        """Write as much of ``data`` as the socket takes without waiting; True if it took all.

        Call only when :meth:`ready`. A failed socket (reset, closed) keeps everything as the
        rest: the sender's next :meth:`write` then raises it as trio's BrokenResourceError.
        """
        try:
            sent = os.write(self._fd, data)
        except OSError:  # EAGAIN (the socket is full) or the socket failed: all of it is the rest
            sent = 0
        if sent == len(data):
            return True
        self.rest = data[sent:]
        return False

    async def write(self, data: bytes = b"") -> None:
        # Uncontended (nearly always: only pongs race the sender), take the lock without the
        # scheduler round-trip `async with` costs; send_all is this call's checkpoint.
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            if self._in_write:
                raise trio.ClosedResourceError("an earlier write was abandoned mid-frame")
            if self.rest:  # a frame the flusher began goes out whole before anything else
                data, self.rest = self.rest + data, b""
            if data:
                self._in_write = True
                await self._stream.send_all(data)
                self._in_write = False
        finally:
            self._lock.release()
            if self.on_free is not None:
                self.on_free()


class _Sink:
    """A direct-mode client as the hub's flusher sees it (:class:`~trio_relay.hub.outbox.DirectSink`)."""

    __slots__ = ("_outbox", "_writer", "ready")

    def __init__(self, client: Client, writer: _Writer) -> None:
        self._outbox = client.outbox
        self._writer = writer
        self.ready = writer.ready  # bound once: the flusher asks for every write

    def attach(self, mark: Callable[[Outbox], object]) -> None:
        self._writer.on_free = self._freed
        self._outbox.direct(self, mark)

    def _freed(self) -> None:
        # A write by the sender task or a pong ended: the flusher may have skipped this outbox.
        if not self._writer.rest:
            outbox = self._outbox
            outbox.idle = not outbox
            outbox.poke()

    def write_now(self, frames: list[bytes]) -> bool:
        if self._writer.write_now(wire(self._outbox.batch, frames)):
            return True
        self._outbox.wake()  # the sender task writes the rest when the socket takes it
        return False
