"""The front door: the one public listening socket of the relay, an HTTP/1.1 edge on h11.

Each accepted connection is admitted (or refused) by a :class:`ConnectionTable` before a byte is
read; then a server-side ``h11.Connection`` reads one request head after another, each routed on
its own:

- a WebSocket upgrade of the price path goes to wsproto (``initiate_upgrade_connection`` with the
  parsed head) and is served natively by :class:`~trio_relay.api.ws.PriceSocketServer` (the hot
  path: thousands of clients, every frame counts);
- a ``GET`` of the SSE price stream is served by :class:`~trio_relay.api.sse.SsePriceServer` on the
  same connection (the same hub client, limits and slow-client policy as the socket);
- anything else is an ASGI call of the Quart-Trio REST app, made here (:mod:`.asgi`): no second
  HTTP server, no loopback hop, and the app sees the real client address.

Every resource a peer can hold here is bounded (``[server]``): the head must arrive within
``head_timeout`` (408), a kept-alive connection may wait ``keepalive_timeout`` for its next
request, a REST request gets ``request_timeout`` (408/503), heads are capped at
``max_header_size`` bytes and ``max_headers`` fields (431), a malformed head gets 400, a Host the
relay does not serve 421, and connections are capped per address and in all before their head.

With ``server.tls_certfile``/``tls_keyfile`` set, each accepted connection is wrapped in a
:class:`trio.SSLStream` and handshaken (within ``head_timeout``) before its first head is read.
"""

from __future__ import annotations

import base64
import binascii
import logging
import ssl
from urllib.parse import urlsplit

import attrs
import h11
import trio
import wsproto
import wsproto.events as wse
from quart_trio import QuartTrio
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from ..alerts.service import AlertService
from ..auth import Security
from ..config import Config, ConfigError, ServerConfig
from ..engine import Engine
from ..history import HistoryStore, HistoryWriter
from ..hub import Hub
from ..portfolio.service import PortfolioService
from ..upstream import UpstreamView
from .asgi import AsgiApp, Outcome, call_app, error_response, run_lifespan
from .connections import Admission, ConnectionTable, Entry
from .rest import create_rest_app
from .sessions import Actions
from .sse import SSE_PATH, SsePriceServer
from .ws import WS_PATH, Handover, PriceSocketServer, peer

__all__ = ["RelayContext", "FrontDoor", "create_rest_app", "tls_context"]

log = logging.getLogger("trio_relay.api.front")

RECEIVE_SIZE = 65536
WRITE_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
REFUSAL_WRITE_TIMEOUT = 1.0  # a refused peer gets this long to take its 429/503


@attrs.define
class RelayContext:
    """What the API needs from the daemon."""

    hub: Hub
    engine: Engine  # where prices come from (this relay's upstream, or a fleet's)
    config: Config
    started_at: float
    security: Security
    # Tick history (None when history.backend = "off").
    history_writer: HistoryWriter | None = None
    history_store: HistoryStore | None = None
    # Portfolios (None when alerts.enabled = false).
    portfolios: PortfolioService | None = None
    alerts: AlertService | None = None
    # The edge's connection table (set by the FrontDoor): open, idle, refused, evicted.
    edge: ConnectionTable | None = None

    @property
    def upstream(self) -> UpstreamView:
        return self.engine.view

    @property
    def provider_name(self) -> str:
        """The active provider (it changes on a failover)."""
        return self.upstream.provider.name

    def client_ip(self, scope_client: tuple[str, int] | None) -> str:
        """The client's ip for a REST request whose ASGI ``scope["client"]`` is ``scope_client``.

        The edge calls the REST app itself, with the real peer in the scope; ``"?"`` when unknown.
        """
        if scope_client is None:
            return "?"
        return scope_client[0]


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Without this callback OpenSSL would prompt on the terminal for an encrypted key's password.
    raise _EncryptedKey


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The front door's TLS context, built once at start; None when TLS is off.

    Raises :class:`ConfigError` naming ``server.tls_certfile`` when the certificate and key do
    not load (not PEM, a key that does not match the certificate, an encrypted key). The message
    names the files, never their contents.
    """
    if not server.tls_certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(server.tls_certfile, server.tls_keyfile, password=_no_password)
    except _EncryptedKey:
        problem = "the key is encrypted (the relay takes an unencrypted PEM key)"
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = "the key does not match the certificate"
        else:
            problem = f"not a PEM certificate and private key ({exc.reason or 'OpenSSL could not read them'})"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    else:
        return context
    raise ConfigError(
        f"config error: server.tls_certfile: cannot load {server.tls_certfile} "
        f"(with server.tls_keyfile {server.tls_keyfile}): {problem}"
    )


class FrontDoor:
    """The edge: admission, h11 per request, routing; one instance serves every connection.

    ``handle`` is the per-connection handler for ``trio.serve_listeners``; ``run_app`` (started
    in the daemon's nursery before the listener) runs the REST app's lifespan; ``drain`` ends
    idle connections and waits for REST requests in flight at shutdown.
    """

    def __init__(self, ctx: RelayContext, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ctx = ctx
        self.server = ctx.config.server  # server settings need a restart: never reloaded
        self.rest: QuartTrio = create_rest_app(ctx)
        self.app: AsgiApp = self.rest  # type: ignore[assignment]  # QuartTrio is an ASGI app
        self.actions = Actions(ctx.hub, ctx.security)
        self.actions.portfolios = ctx.portfolios
        self.actions.alerts = ctx.alerts
        self.ws = PriceSocketServer(self.actions)
        self.sse = SsePriceServer(self.actions)
        self.ssl_context = ssl_context  # built once at start; None: plain HTTP
        self.table = ConnectionTable(self.server.max_connections, ctx.security.per_ip)
        ctx.edge = self.table  # for /metrics
        self.closing = False  # shutdown began: responses say connection: close
        self._stop_app = trio.Event()

    async def run_app(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The REST app's lifespan: ready once started(); ends after :meth:`stop_app`."""
        await run_lifespan(self.app, self._stop_app, task_status=task_status)

    def stop_app(self) -> None:
        self._stop_app.set()

    def begin_drain(self) -> None:
        """Shutdown began: close idle connections now, and each connection after its request."""
        self.closing = True
        self.table.close_idle()

    async def drain(self, timeout: float) -> None:
        """Shutdown: give the REST requests in flight ``timeout`` seconds to finish."""
        self.begin_drain()
        with trio.move_on_after(timeout):
            await self.table.wait_quiet()

    async def handle(self, stream: trio.SocketStream) -> None:
        """One accepted connection, for its whole life. Never raises for what a peer does."""
        address = peer(stream)
        ip = address[0] if address else "?"
        verdict, entry = self.table.admit(ip)
        if entry is None:
            await self._refuse(stream, verdict)
            return
        conn: trio.abc.Stream = stream
        try:
            with entry.scope:
                deadline = trio.current_time() + self.server.head_timeout
                if self.ssl_context is not None:
                    # https_compatible: HTTP clients often close without close_notify (read as a
                    # plain EOF), and we close without waiting for theirs.
                    conn = tls = trio.SSLStream(stream, self.ssl_context, server_side=True, https_compatible=True)
                    with trio.move_on_at(deadline):
                        try:
                            await tls.do_handshake()
                        except trio.BrokenResourceError as exc:
                            # Plain HTTP on the TLS port, an untrusted certificate, a scanner: routine.
                            log.debug("[TLS] handshake with %s failed: %s", ip, _tls_problem(exc))
                            return
                    if trio.current_time() >= deadline:
                        return
                handover = await self._serve(conn, entry, address, deadline)
                if handover is not None:
                    # Only now, with the HTTP parser's state and the head gone with their frames:
                    # a connection holds the price socket for hours, its handshake need not live on.
                    await self.ws.serve(conn, handover)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; grouped when it happened inside a connection's nursery
        except* Exception as group:
            # One connection's failure must never take the relay (and every other client) down.
            log.error("[CONNECTION] handler failed; connection dropped", exc_info=group)
        finally:
            self.table.release(entry)
            await trio.aclose_forcefully(conn)

    async def _refuse(self, stream: trio.SocketStream, verdict: Admission) -> None:
        """A connection over a cap: a short 429/503 (plain HTTP only), then closed."""
        try:
            if self.ssl_context is None:
                if verdict is Admission.PER_ADDRESS:
                    data = error_response(
                        h11.Connection(h11.SERVER),
                        429,
                        "too_many_connections",
                        f"at most {self.table.per_address.cap} connections per address",
                    )
                else:
                    data = error_response(
                        h11.Connection(h11.SERVER), 503, "server_full", "the relay is at its connection limit"
                    )
                with trio.move_on_after(REFUSAL_WRITE_TIMEOUT):
                    await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(
        self, stream: trio.abc.Stream, entry: Entry, address: tuple[str, int] | None, deadline: float
    ) -> Handover | None:
        """Serve requests on one connection until it ends; the first head is due by ``deadline``.

        Returns the price socket's upgrade, accepted by nobody yet, for the caller to serve.
        """
        server = self.server
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_header_size)
        while True:
            request = await self._read_head(stream, conn, deadline)
            if request is None:
                return None
            self.table.busy(entry)
            upgraded, outcome = await self._route(stream, conn, request, address)
            if isinstance(upgraded, Handover):
                return upgraded
            if upgraded or outcome is Outcome.CLOSE or conn.our_state is not h11.DONE or self.closing:
                return None
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return None  # the request or the response said connection: close
            self.table.idle(entry)
            deadline = -1.0  # a kept-alive connection: keepalive_timeout for the next first byte

    async def _read_head(self, stream: trio.abc.Stream, conn: h11.Connection, deadline: float) -> h11.Request | None:
        """The next request head; None when the connection should end (after any error response).

        ``deadline`` < 0: between requests, the first byte may take ``keepalive_timeout`` (a
        silent close when it does not come), then the head ``head_timeout`` from that byte.
        """
        server = self.server
        waiting = deadline < 0
        if waiting:
            deadline = trio.current_time() + server.keepalive_timeout
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status == 431:
                    await self._error(
                        stream,
                        conn,
                        431,
                        "header_too_large",
                        f"the request head is larger than {server.max_header_size} bytes",
                    )
                else:
                    await self._error(stream, conn, status, "bad_request", f"malformed HTTP request: {exc}"[:200])
                return None
            if event is h11.NEED_DATA:
                with trio.move_on_at(deadline):
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if waiting and data:
                        waiting = False
                        deadline = trio.current_time() + server.head_timeout
                    conn.receive_data(bytes(data))
                    continue
                if not waiting:
                    await self._error(
                        stream,
                        conn,
                        408,
                        "request_timeout",
                        f"no complete request head within {server.head_timeout:g} s",
                    )
                return None
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed (the peer is done), or PAUSED after an upgrade

    async def _error(self, stream: trio.abc.Stream, conn: h11.Connection, status: int, code: str, message: str) -> None:
        """Answer an edge error and end the connection (bounded: the peer may not read)."""
        self.table.rejected[status] = self.table.rejected.get(status, 0) + 1
        try:
            data = error_response(conn, status, code, message)
        except h11.LocalProtocolError:
            return  # a response is already under way: just close
        with trio.move_on_after(REFUSAL_WRITE_TIMEOUT):
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _route(
        self, stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request, address: tuple[str, int] | None
    ) -> tuple[bool | Handover, Outcome]:
        """Serve one request; (True, _) when the connection was taken over (SSE), (handover, _)
        when it is to become the price socket."""
        server, security = self.server, self.ctx.security
        head = _read_head(request, server, security)
        if isinstance(head, _Refusal):
            await self._error(stream, conn, head.status, head.code, head.message)
            return False, Outcome.CLOSE
        target, host, headers = head.target, head.host, head.headers
        path = target.split(b"?", 1)[0]
        upgrade = headers.get(b"upgrade", b"").lower()
        if path.rstrip(b"/") == WS_PATH.encode() and upgrade == b"websocket":
            handover = await self._upgrade(stream, conn, request, headers, target, host)
            return (handover or True), Outcome.CLOSE
        if path.rstrip(b"/") == SSE_PATH.encode() and request.method == b"GET":
            if await self._request_done(stream, conn):
                await self.sse.serve(stream, target, headers, host)
            return True, Outcome.CLOSE
        if request.method in WRITE_METHODS:
            refusal = _write_refusal(request, headers, host, security)
            if refusal is not None:
                await self._error(stream, conn, *refusal)
                return False, Outcome.CLOSE
        outcome = await call_app(
            self.app,
            conn,
            stream,
            request,
            target,
            scheme="https" if self.ssl_context is not None else "http",
            client=address,
            server=(server.host, server.port),
            timeout=server.request_timeout,
            closing=self.closing,
        )
        return False, outcome

    async def _request_done(self, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
        """Read the rest of a GET that takes the connection over (it has no body); False: refused."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                await self._error(stream, conn, 400, "bad_request", "not a valid request")
                return False
            if event is h11.PAUSED or isinstance(event, h11.EndOfMessage) or event is h11.NEED_DATA:
                return True
            if isinstance(event, h11.Data) and not event.data:
                continue
            await self._error(stream, conn, 400, "bad_request", "this request carries no body")
            return False

    async def _upgrade(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        request: h11.Request,
        headers: dict[bytes, bytes],
        target: bytes,
        host: str,
    ) -> Handover | None:
        """Hand a price-socket upgrade to wsproto, or refuse it with 400 (426 for a wrong version)."""
        if request.method != b"GET":
            await self._error(stream, conn, 400, "bad_request", "a WebSocket upgrade must be a GET")
            return None
        if not _valid_key(headers.get(b"sec-websocket-key")):
            await self._error(
                stream, conn, 400, "bad_request", "not a valid WebSocket upgrade request: bad Sec-WebSocket-Key"
            )
            return None
        # The rest of the request (a GET has no body): whatever follows is already WebSocket.
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                await self._error(stream, conn, 400, "bad_request", "not a valid WebSocket upgrade request")
                return None
            if event is h11.PAUSED or isinstance(event, h11.EndOfMessage):
                if event is h11.PAUSED:
                    break
                continue
            await self._error(stream, conn, 400, "bad_request", "a WebSocket upgrade request carries no body")
            return None
        trailing, _ = conn.trailing_data
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        fields = [(name, value) for name, value in request.headers if name != b"host"]
        fields.append((b"host", host.encode("latin-1")))
        try:
            ws.initiate_upgrade_connection(fields, target)
            upgrade = next((e for e in ws.events() if isinstance(e, wse.Request)), None)
        except WsRemoteProtocolError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, wse.RejectConnection) else 400
            await self._error(
                stream, conn, status, "bad_request", f"not a valid WebSocket upgrade request: {exc}"[:200]
            )
            return None
        if upgrade is None:
            await self._error(stream, conn, 400, "bad_request", "not a valid WebSocket upgrade request")
            return None
        # Frames sent before our 101 (trailing) are read once accepted.
        return Handover(ws, upgrade, bytes(trailing))


def _valid_key(key: bytes | None) -> bool:
    """Sec-WebSocket-Key must be 16 random bytes in base64 (RFC 6455 4.1)."""
    if key is None or len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


@attrs.frozen
class _Refusal:
    """A request the edge answers itself, with an error (never reaching a route)."""

    status: int
    code: str
    message: str


@attrs.frozen
class _Head:
    """A request head that passed the edge's checks: its origin-form target, host and headers."""

    target: bytes
    host: str
    headers: dict[bytes, bytes]  # the first of each name (h11 lower-cases names)


def _read_head(request: h11.Request, server: ServerConfig, security: Security) -> _Head | _Refusal:
    """Check a request's head (size, Host, target form, allowed host names) before any routing."""
    if len(request.headers) > server.max_headers:
        return _Refusal(431, "too_many_headers", f"at most {server.max_headers} header fields per request")
    # h11 bounds a head that arrives in pieces (max_incomplete_event_size); one that came
    # whole in a single read is measured here.
    size = len(request.method) + len(request.target) + 12 + sum(len(k) + len(v) + 4 for k, v in request.headers)
    if size > server.max_header_size:
        return _Refusal(431, "header_too_large", f"the request head is larger than {server.max_header_size} bytes")
    headers: dict[bytes, bytes] = {}
    for name, value in request.headers:
        headers.setdefault(bytes(name), bytes(value))
    target = bytes(request.target)
    hosts = sum(1 for name, _ in request.headers if name == b"host")
    if hosts > 1 or (hosts == 0 and request.http_version != b"1.0"):
        return _Refusal(400, "bad_request", "a request needs exactly one Host header")
    host = headers.get(b"host", b"").decode("latin-1")
    if not target.startswith(b"/"):
        # Absolute form (RFC 9112 3.2.2): its authority is the host asked for.
        parts = urlsplit(target.decode("latin-1"))
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            return _Refusal(400, "bad_request", "the request target must be a path or an absolute http(s) URL")
        host = parts.netloc
        target = (parts.path or "/").encode("latin-1") + (b"?" + parts.query.encode("latin-1") if parts.query else b"")
    # An HTTP/1.0 request without Host (some health checkers) cannot come from a browser,
    # and only a browser can be made to send a rebinding name.
    if host and not security.host_allowed(host):
        return _Refusal(421, "misdirected_request", "this relay does not serve that host name")
    return _Head(target, host, headers)


def _write_refusal(
    request: h11.Request, headers: dict[bytes, bytes], host: str, security: Security
) -> tuple[int, str, str] | None:
    """Why a REST write must be refused (status, code, message), or None.

    Against cross-site requests (with auth off a browser page on any site could otherwise drive a
    relay on its visitor's loopback): a browser page's write must come from the relay's own
    origin or a listed one, and must be JSON, which a page can only send cross-site after a CORS
    preflight that the relay never grants (a form or a ``text/plain`` fetch needs none).
    """
    origin = headers.get(b"origin")
    if not security.origin_allowed(origin.decode("latin-1") if origin is not None else None, host):
        return 403, "forbidden_origin", "this page's origin may not write to the relay"
    has_body = b"content-length" in headers and headers[b"content-length"] != b"0" or b"transfer-encoding" in headers
    if request.method != b"DELETE" or has_body:
        media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if media != b"application/json":
            return 415, "unsupported_media_type", "the body must be JSON, sent with Content-Type: application/json"
    return None


def _tls_problem(exc: BaseException) -> str:
    """One line for a failed handshake: the TLS alert or OpenSSL reason when there is one."""
    cause = exc.__cause__
    return str(getattr(cause, "reason", None) or cause or exc)
