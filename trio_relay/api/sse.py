"""Prices over Server-Sent Events at ``GET /api/v2/realtime/sse/prices?symbols=AAPL,MSFT``.

For browsers behind proxies that block WebSockets: the same hub client, outbox, limits and
slow-client policy as the price socket, but one way (the subscription is the URL) and written as
``text/event-stream``. Query parameters: ``symbols`` (comma-separated), the delivery options
``max_rate``, ``fields`` (comma-separated) and ``delta``, and ``token`` (or an
``Authorization: Bearer`` header).

Every ``price_update`` event carries an ``id:`` naming the epoch and the last seq of every symbol
of the stream (``<epoch>~AAPL:41,MSFT:7``). A browser's ``EventSource`` that loses the connection
reconnects with that id in ``Last-Event-ID`` (a client that opens a new stream may pass it as
``last_event_id`` in the query) and the relay resumes it: exactly the missed updates, or, when
they are gone, the ``subscribed`` event says ``"recovered": false`` and snapshots follow.
Other messages (``subscribed``, ``status``) are events named by their ``type``; an ``error``
message is the event ``relay_error`` (an ``EventSource``'s own ``error`` event is its connection's). A
stream with nothing to send gets a ``: keep-alive`` comment every ``clients.sse_heartbeat``.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import msgspec
import trio

from ..auth import BROWSER_PARAM, AuthError, bearer_token, open_principal
from ..entitlements import EntitlementError
from ..hub import CLOSE_GRACE, Client
from ..model import ws_payload
from .protocol import Channel, ProtocolError, Subscribe, delivery_options, parse_symbols, resume_fields
from .sessions import Actions, Session
from .ws import peer, reject

__all__ = ["SSE_PATH", "SsePriceServer", "parse_event_id"]

log = logging.getLogger("trio_relay.api.sse")

SSE_PATH = "/api/v2/realtime/sse/prices"

# How long a browser waits before reconnecting a dropped stream (the "retry:" field), in ms.
RETRY_MS = 1000


class _Head(msgspec.Struct):
    """What the stream reads back from a routed frame: its type, and a price's place in the sequence.

    Loosely typed on purpose: any message the relay sends must read (a reply whose ``symbol``
    is null is not a price and needs no id).
    """

    type: object = ""
    symbol: object = ""
    seq: object = 0
    epoch: object = ""


_HEAD = msgspec.json.Decoder(_Head)


def parse_event_id(raw: str) -> tuple[str, dict[str, int]] | None:
    """``<epoch>~SYM:seq,...`` → (epoch, {symbol: seq}); None when it is not one of ours."""
    epoch, sep, pairs = raw.strip().partition("~")
    if not sep or not epoch or len(raw) > 32_768:
        return None
    since: dict[str, int] = {}
    for pair in pairs.split(","):
        symbol, colon, seq = pair.partition(":")
        if not colon or not seq.isdigit() or len(seq) > 18:
            return None
        since[symbol.strip().upper()] = int(seq)
    return epoch, since


def _event_name(kind: str) -> bytes:
    # An EventSource's own "error" event is about its connection: the relay's error is another name.
    return b"relay_error" if kind == "error" else (kind or "message").encode()


def event_id(epoch: str, seqs: dict[str, int]) -> bytes:
    return f"{epoch}~{','.join(f'{s}:{q}' for s, q in seqs.items())}".encode()


class SsePriceServer:
    """The SSE price stream; one instance serves every connection (the edge hands each over)."""

    def __init__(self, actions: Actions) -> None:
        self.actions = actions
        self.hub = actions.hub
        self.security = actions.security

    def _subscribe_action(self, query: dict[str, list[str]], last_event_id: str | None) -> Subscribe:
        """The stream's subscription, from its query (and a resume from its last event id)."""

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        raw_symbols = one("symbols")
        symbols = parse_symbols(
            [s for s in raw_symbols.split(",") if s] if raw_symbols is not None else None,
            self.hub.config.max_symbols_per_request,
        )
        rate = one("max_rate")
        fields = one("fields")
        delta = one("delta")
        try:
            max_rate = float(rate) if rate is not None else None
        except ValueError:
            raise ProtocolError("invalid_max_rate", "'max_rate' must be a number of updates per second") from None
        options = delivery_options(
            {
                "max_rate": max_rate,
                "fields": [f for f in fields.split(",") if f] if fields is not None else None,
                "delta": None if delta is None else delta.lower() in ("1", "true", "yes"),
            }
        )
        since: dict[str, int] | None = None
        epoch: str | None = None
        resume = last_event_id or one("last_event_id")
        if resume:
            parsed = parse_event_id(resume)
            if parsed is not None:
                epoch, raw_since = parsed
                wanted = set(symbols)
                since, epoch = resume_fields({k: v for k, v in raw_since.items() if k in wanted}, epoch, symbols)
        return Subscribe(Channel.TICKS, symbols, since=since, epoch=epoch, options=options)

    async def serve(self, stream: trio.abc.Stream, target: bytes, headers: dict[bytes, bytes], host: str) -> None:
        """Answer one ``GET`` of the stream: a 4xx with a JSON body, or the stream until it ends."""
        query = parse_qs(urlsplit(target.decode("latin-1")).query)
        origin = headers[b"origin"].decode("latin-1") if b"origin" in headers else None
        security = self.security
        if not security.origin_allowed(origin, host):
            await reject(stream, 403, "forbidden_origin", "this page's origin may not open the price stream")
            return
        session = Session(security)
        if not security.auth.enabled:
            try:  # as on the WebSocket: a browser's own id owns its alerts and portfolios
                session.principal = open_principal(query.get(BROWSER_PARAM, [""])[-1])
            except AuthError as exc:
                await reject(stream, 400, "invalid_browser", exc.reason)
                return
        else:
            authorization = headers.get(b"authorization")
            token = query.get("token", [""])[-1] or bearer_token(
                authorization.decode("latin-1") if authorization else None
            )
            if not token:
                await reject(stream, 401, "unauthorized", "a token is required (?token= or Authorization)", bearer=True)
                return
            try:
                session.principal = security.auth.verify(token)
            except AuthError as exc:
                log.info("[AUTH] SSE refused: %s", exc.reason)
                await reject(stream, 401, "unauthorized", exc.reason, bearer=True)
                return
        last_event_id = headers.get(b"last-event-id")
        try:
            action = self._subscribe_action(query, last_event_id.decode("latin-1") if last_event_id else None)
        except ProtocolError as exc:
            await reject(stream, 400, exc.code, exc.message)
            return
        try:
            if not session.claim_user():
                await reject(
                    stream, 429, "too_many_connections", f"at most {security.per_user.cap} connections per user"
                )
                return
            await self._serve_stream(stream, session, action, origin)
        finally:
            session.release_user()

    async def _serve_stream(
        self, stream: trio.abc.Stream, session: Session, action: Subscribe, origin: str | None
    ) -> None:
        address = peer(stream)
        client = self.hub.connect(remote=f"{address[0]}:{address[1]}" if address else "?")
        session.attach(client)
        try:
            try:
                self.actions.apply(client, session, action)
            except (ProtocolError, EntitlementError) as exc:
                status = exc.status if isinstance(exc, EntitlementError) else 400
                await reject(stream, status, exc.code, exc.message)
                return
            log.info(
                "[CLIENT] #%d SSE stream from %s%s",
                client.id,
                client.remote,
                f" as {client.user}" if client.user else "",
            )
            cors = b"access-control-allow-origin: %s\r\nvary: origin\r\n" % origin.encode("latin-1") if origin else b""
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-store\r\n"
                b"x-accel-buffering: no\r\nconnection: close\r\n%s\r\nretry: %d\n\n" % (cors, RETRY_MS)
            )
            await self._run(stream, client, session)
        finally:
            if self.actions.portfolios is not None:
                self.actions.portfolios.disconnect(client)
            self.hub.disconnect(client)
        log.info("[CLIENT] #%d SSE stream ended (%s)", client.id, client.close_reason or "by peer")

    async def _run(self, stream: trio.abc.Stream, client: Client, session: Session) -> None:
        """Send until the peer goes or the relay closes the client (then what is pending, briefly)."""
        sender = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop, stream, client, sender)
            if self.security.auth.enabled:
                nursery.start_soon(self.actions.guard, session)
            with client.cancel_scope:
                # The peer sends nothing after its request: reading only tells us it left.
                while await stream.receive_some(4096):
                    pass
                client.outbox.stop()
                sender.cancel()
            session.guard.cancel()
            client.outbox.finish()  # closed by the relay: the last notice goes out...
            sender.deadline = min(sender.deadline, trio.current_time() + CLOSE_GRACE)  # ...if in time

    async def _send_loop(self, stream: trio.abc.Stream, client: Client, scope: trio.CancelScope) -> None:
        outbox = client.outbox
        heartbeat = self.hub.config.sse_heartbeat
        seqs: dict[str, int] = {}  # the last seq sent per symbol: the event id a resume needs
        epoch = ""
        with scope:
            while True:
                frames: list[bytes] | None = None
                with trio.move_on_after(heartbeat):
                    frames = await outbox.get()
                if frames is None:
                    await stream.send_all(b": keep-alive\n\n")
                    continue
                if not frames:
                    return  # stopped
                out: list[bytes] = []
                for frame in frames:
                    payload = frame if outbox.batch else ws_payload(frame)
                    head = _HEAD.decode(payload)
                    kind = head.type if isinstance(head.type, str) else ""
                    if kind == "price_update" and type(head.seq) is int and isinstance(head.symbol, str):
                        if head.epoch != epoch:
                            epoch, seqs = str(head.epoch), {}
                        seqs[head.symbol] = head.seq
                        out.append(b"id: %s\nevent: price_update\ndata: %s\n\n" % (event_id(epoch, seqs), payload))
                    else:
                        out.append(b"event: %s\ndata: %s\n\n" % (_event_name(kind), payload))
                await stream.send_all(b"".join(out))
                outbox.progressed(len(frames))
