"""The REST app called straight from the edge: one ASGI HTTP call per parsed request, and the lifespan.

The edge has parsed the request head with h11; :func:`call_app` hands it to the Quart-Trio app
as an ASGI ``http`` scope, feeds it the body from the same ``h11.Connection`` and writes its
response through it. No second HTTP server and no loopback hop: the app sees the real client
address in ``scope["client"]``, and every bound of the edge (head size, timeouts, connection
caps) applies to REST as much as to the price socket.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

import h11
import msgspec
import trio

__all__ = ["AsgiApp", "Outcome", "call_app", "error_response", "run_lifespan"]

log = logging.getLogger("trio_relay.api.asgi")

Message = MutableMapping[str, Any]
AsgiApp = Callable[[Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

RECEIVE_SIZE = 65536


class Outcome(enum.Enum):
    """How a request ended, for the edge to decide whether the connection goes on."""

    DONE = "done"  # response sent, request body read: the connection may serve another request
    CLOSE = "close"  # the connection must end (a timeout, a torn response, the peer gone)


def error_response(conn: h11.Connection, status: int, code: str, message: str, *, close: bool = True) -> bytes:
    """An edge error as bytes: status, JSON body ``{"error", "message"}``; closes by default."""
    body = msgspec.json.encode({"error": code, "message": message})
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("cache-control", "no-store")]
    if close:
        headers.append(("connection", "close"))
    reason = HTTPStatus(status).phrase.encode()
    return (
        conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
        + (conn.send(h11.Data(data=body)) or b"")
        + (conn.send(h11.EndOfMessage()) or b"")
    )


async def call_app(
    app: AsgiApp,
    conn: h11.Connection,
    stream: trio.abc.Stream,
    request: h11.Request,
    target: bytes,
    *,
    scheme: str,
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
    timeout: float,
    closing: bool,
) -> Outcome:
    """Serve ``request`` (already read from ``conn``) with ``app``, within ``timeout`` seconds.

    ``target`` is the origin-form target (the edge resolved an absolute-form one). A request
    that runs out of time gets 408 while its body was still arriving, 503 after; one whose
    response had begun is cut (the connection closes). An exception from the app (Quart
    answers its own errors, so this is a bug) gets a 500 with a JSON body, never a traceback.
    """
    scope = _scope(request, target, scheme=scheme, client=client, server=server)
    state = _Exchange(conn, stream, closing, head=request.method == b"HEAD")
    failure = False
    try:
        with trio.move_on_after(timeout) as limit:
            await app(scope, state.receive, state.send)
    # Quart-Trio runs each request in a nursery of its own: what it raises arrives grouped.
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        failure = True  # the peer went away mid-response: routine
    except* h11.LocalProtocolError as group:
        # The app's response broke HTTP framing (e.g. more body than its content-length).
        log.error(
            "[REST] %s %s: bad response from the app: %s", scope["method"], scope["path"][:100], group.exceptions[0]
        )
        failure = True
    except* Exception as group:
        log.error("[REST] %s %s failed", scope["method"], scope["path"][:100], exc_info=group)
        if not state.started:
            await _send_error(stream, conn, 500, "internal_error", "internal error; see the relay's log")
        failure = True
    if failure:
        return Outcome.CLOSE
    if limit.cancelled_caught:
        if not state.started:
            await _send_timeout(stream, conn, timeout, body_complete=state.body_complete)
        return Outcome.CLOSE
    state.drain_buffered()
    if not state.finished or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
        # The body was not read (the app answered without it) or the response is incomplete:
        # the connection cannot be reused.
        return Outcome.CLOSE
    return Outcome.DONE


def _scope(
    request: h11.Request,
    target: bytes,
    *,
    scheme: str,
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
) -> Message:
    """The ASGI HTTP scope of ``request`` (``target``: its origin-form target)."""
    path, _, query = target.partition(b"?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version.decode("ascii"),
        "method": request.method.decode("ascii"),
        "scheme": scheme,
        "path": unquote_to_bytes(path).decode("utf-8", "replace"),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": [(bytes(k), bytes(v)) for k, v in request.headers],
        "client": client,
        "server": server,
        "extensions": {},
    }


async def _send_timeout(stream: trio.abc.Stream, conn: h11.Connection, timeout: float, *, body_complete: bool) -> None:
    """408 while the request body was still arriving, 503 once the app had it all."""
    if body_complete:
        await _send_error(stream, conn, 503, "timeout", f"the request took more than {timeout:g} s")
    else:
        await _send_error(stream, conn, 408, "request_timeout", f"the request body did not arrive within {timeout:g} s")


async def _send_error(stream: trio.abc.Stream, conn: h11.Connection, status: int, code: str, message: str) -> None:
    try:
        await stream.send_all(error_response(conn, status, code, message))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass


class _Exchange:
    """The ASGI ``receive`` and ``send`` of one request, over the edge's h11 connection."""

    __slots__ = ("conn", "stream", "closing", "head", "started", "finished", "body_complete", "_pending")

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream, closing: bool, *, head: bool = False) -> None:
        self.conn = conn
        self.head = head  # a HEAD request: the app's body is not sent (h11 would refuse it)
        self.stream = stream
        self.closing = closing  # the relay is draining: the response says connection: close
        self.started = False
        self.finished = False
        self.body_complete = False
        self._pending = b""  # the response head, sent with the first body chunk (one write)

    async def receive(self) -> Message:
        conn = self.conn
        while not self.body_complete:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return {"type": "http.disconnect"}  # a malformed body: the connection will close
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    # Expect: 100-continue (curl sends it for bodies over 1 KiB): the app reads on.
                    await self.stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
                data = await self.stream.receive_some(RECEIVE_SIZE)
                conn.receive_data(bytes(data))  # b"": the peer is gone (a ConnectionClosed next)
                continue
            if isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            if isinstance(event, h11.EndOfMessage):
                self.body_complete = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.disconnect"}  # ConnectionClosed, PAUSED: nothing more comes
        # The body is complete: nothing more arrives for this request. The app ends this call
        # when it has sent its response (and the edge's time limit ends it otherwise).
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def drain_buffered(self) -> None:
        """Read the rest of the request body if it has already arrived (a GET's is empty)."""
        while not self.body_complete:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                return
            if isinstance(event, h11.EndOfMessage):
                self.body_complete = True
            elif not isinstance(event, h11.Data):
                return  # more to come from the network: the connection will not be reused

    async def send(self, message: Message) -> None:
        kind = message["type"]
        conn = self.conn
        if kind == "http.response.start":
            headers = [
                (bytes(k), _relative(bytes(v)) if k.lower() == b"location" else bytes(v))
                for k, v in message.get("headers", ())
            ]
            if self.closing:
                headers.append((b"connection", b"close"))
            status = int(message["status"])
            self._pending = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status))) or b""
            self.started = True
        elif kind == "http.response.body":
            body = b"" if self.head else message.get("body", b"")
            data = self._pending + (conn.send(h11.Data(data=body)) if body else b"")
            self._pending = b""
            if not message.get("more_body", False):
                data += conn.send(h11.EndOfMessage()) or b""
                self.finished = True
            if data:
                await self.stream.send_all(data)


def _relative(location: bytes) -> bytes:
    """A redirect's target without scheme and host: werkzeug builds absolute ones from the Host
    header, and the relay's redirects all point at itself, so the Host is never reflected."""
    if location.startswith((b"http://", b"https://")):
        after = location.split(b"://", 1)[1]
        path = after[after.find(b"/") :] if b"/" in after else b"/"
        return b"/" + path.lstrip(b"/")  # never "//host": that would be another site again
    return location


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def run_lifespan(
    app: AsgiApp, stop: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the app's ASGI lifespan: started() once its startup completed; shut down when ``stop`` is set.

    Raises RuntimeError when the app's startup fails. The app's own nursery (Quart-Trio's
    background tasks) lives inside this task, so it ends with it.
    """
    to_app, app_receive = trio.open_memory_channel[Message](1)  # two messages in a lifespan: never full
    app_send, from_app = trio.open_memory_channel[Message](1)
    scope: Message = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, scope, app_receive.receive, app_send.send)
        await to_app.send({"type": "lifespan.startup"})
        reply = await from_app.receive()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the REST app did not start: {reply.get('message', reply['type'])}")
        task_status.started()
        await stop.wait()
        await to_app.send({"type": "lifespan.shutdown"})
        reply = await from_app.receive()
        if reply["type"] != "lifespan.shutdown.complete":
            log.warning("[REST] the app's shutdown failed: %s", reply.get("message", reply["type"]))
        nursery.cancel_scope.cancel()  # the app's lifespan task waits for more messages
