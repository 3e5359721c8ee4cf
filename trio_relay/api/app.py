"""The front door: the one public listening socket of the relay.

Each connection's request head is read here. A WebSocket upgrade for the price socket is served
natively by :class:`~trio_relay.api.ws.ClientProtocol` (the hot path: thousands of clients,
every frame counts); anything else (REST, health checks, unknown paths) is relayed byte for byte
to the Quart-Trio app, which Hypercorn serves on a private loopback TCP socket. REST is light
traffic, so one extra local hop there costs nothing that matters.

With ``server.tls_certfile``/``tls_keyfile`` set, the front door speaks TLS: each accepted
connection is wrapped in a :class:`trio.SSLStream` and handshaken before its head is read; both the
native WebSocket and the REST relay then run over the TLS stream (the backend hop stays plain).

The REST app sees the front door's backend connection as its peer, so the front door records,
for each backend connection, which client it carries (:meth:`RelayContext.client_ip`).
"""

from __future__ import annotations

import logging
import ssl

import attrs
import trio
from quart_trio import QuartTrio

from ..alert_service import AlertService
from ..auth import Security
from ..config import Config, ConfigError, ServerConfig
from ..engine import Engine
from ..history import HistoryStore, HistoryWriter
from ..hub import Hub
from ..portfolio_service import PortfolioService
from ..upstream import UpstreamView
from .rest import create_rest_app
from .ws import WS_PATH, ClientProtocol, peer_ip

__all__ = ["RelayContext", "FrontDoor", "create_rest_app", "tls_context"]

log = logging.getLogger("trio_relay.api.front")

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0  # a client that cannot finish its TLS handshake and request head in this time is dropped
BACKEND_HOST = "127.0.0.1"  # where Hypercorn serves the REST app (a private port on loopback)


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
    # The front door's open connections to the REST server: backend local port → the client's
    # ip. One entry per REST connection in flight, removed when it ends.
    rest_peers: dict[int, str] = attrs.field(factory=dict, init=False)

    @property
    def upstream(self) -> UpstreamView:
        return self.engine.view

    @property
    def provider_name(self) -> str:
        """The active provider (it changes on a failover)."""
        return self.upstream.provider.name

    def client_ip(self, scope_client: tuple[str, int] | None) -> str:
        """The real client's ip for a REST request whose ASGI ``scope["client"]`` is ``scope_client``.

        A request relayed by the front door arrives from the front door's own loopback
        connection: its client is the one recorded for that connection. Any other request (a
        test client, a direct connection) is attributed to its own peer; ``"?"`` when unknown.
        """
        if scope_client is None:
            return "?"
        host, port = scope_client[0], scope_client[1]
        if host == BACKEND_HOST:
            return self.rest_peers.get(port, host)
        return host


def _wants_price_socket(head: bytes) -> bool:
    line, _, headers = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    path = parts[1].split(b"?", 1)[0].rstrip(b"/").decode("latin-1")
    if path != WS_PATH:
        return False
    for header in headers.split(b"\r\n"):
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


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
    def __init__(self, ctx: RelayContext, backend: tuple[str, int], ssl_context: ssl.SSLContext | None = None) -> None:
        self.ctx = ctx
        self.rest: QuartTrio = create_rest_app(ctx)
        self.ws = ClientProtocol(ctx.hub, ctx.security)
        self.ws.portfolios = ctx.portfolios
        self.ws.alerts = ctx.alerts
        self.backend = backend  # where Hypercorn serves the REST app
        self.ssl_context = ssl_context  # built once at start; None: plain HTTP

    async def handle(self, stream: trio.SocketStream) -> None:
        """One accepted connection, for its whole life."""
        conn: trio.abc.Stream = stream
        try:
            head = b""
            with trio.move_on_after(HEAD_TIMEOUT):
                if self.ssl_context is not None:
                    # https_compatible: HTTP clients often close without close_notify (read as a
                    # plain EOF), and we close without waiting for theirs.
                    conn = tls = trio.SSLStream(stream, self.ssl_context, server_side=True, https_compatible=True)
                    try:
                        await tls.do_handshake()
                    except trio.BrokenResourceError as exc:
                        # Plain HTTP on the TLS port, an untrusted certificate, a scanner: routine.
                        log.debug("[TLS] handshake with %s failed: %s", peer_ip(stream), _tls_problem(exc))
                        return
                while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                    chunk = await conn.receive_some(MAX_HEAD)
                    if not chunk:
                        return
                    head += chunk
            if b"\r\n\r\n" not in head:
                return  # too slow or too big: not a client we want to spend a task on
            if _wants_price_socket(head):
                # serve() uses only the Stream interface, plus the peer address, which it reads
                # from an SSLStream's transport.
                await self.ws.serve(conn, head)
            else:
                await self._relay_to_rest(conn, head, peer_ip(stream))
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; grouped when it happened inside a connection's nursery
        except* Exception as group:
            # One connection's failure must never take the relay (and every other client) down.
            log.error("[CONNECTION] handler failed; connection dropped", exc_info=group)
        finally:
            await trio.aclose_forcefully(conn)

    async def _relay_to_rest(self, stream: trio.abc.Stream, head: bytes, client_ip: str) -> None:
        try:
            backend = await trio.open_tcp_stream(*self.backend)
        except OSError as exc:
            log.error("[REST] cannot reach the REST server: %s", exc)
            body = b'{"error":"unavailable","message":"REST server not reachable"}'
            await stream.send_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        async with backend:
            # Recorded before the first byte reaches the REST app, removed before the port can
            # be reused (the socket closes after the finally).
            port = backend.socket.getsockname()[1]
            self.ctx.rest_peers[port] = client_ip
            try:
                await backend.send_all(head)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, stream, backend, nursery.cancel_scope)
                    nursery.start_soon(_pump, backend, stream, nursery.cancel_scope)
            finally:
                del self.ctx.rest_peers[port]


def _tls_problem(exc: BaseException) -> str:
    """One line for a failed handshake: the TLS alert or OpenSSL reason when there is one."""
    cause = exc.__cause__
    return str(getattr(cause, "reason", None) or cause or exc)


async def _pump(src: trio.abc.Stream, dst: trio.abc.Stream, scope: trio.CancelScope) -> None:
    try:
        while True:
            data = await src.receive_some(65536)
            if not data:
                if isinstance(dst, trio.abc.HalfCloseableStream):
                    await dst.send_eof()
                else:
                    scope.cancel()  # TLS cannot half-close: the backend is done, so is the connection
                return
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        scope.cancel()  # one side is gone: end both directions
