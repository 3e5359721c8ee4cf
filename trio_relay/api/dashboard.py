"""The web dashboard: a static page at ``/`` and its files under ``/static/``.

The files are plain ES modules (the official client among them, from ``web/client/``), a stylesheet and an icon shipped in the ``trio_relay.web``
package (no build step, nothing fetched from another site). They are read once, when the REST
app is created, and served from memory: the set of names that can be asked for is fixed at start,
so a request can never reach another file.

The page carries no data (it gets everything over the price WebSocket, which authenticates on its
own), so these routes stay open when REST authentication is on: see :data:`OPEN_PREFIXES` and
:data:`PAGE_PATH`, which the REST guard lets through. Each response sets its own
``Content-Security-Policy`` (the app's ``after_request`` hook only fills in a default): scripts,
styles and images from this origin only, WebSocket connections allowed, nothing else.
"""

from __future__ import annotations

from importlib import resources

from quart import Response, abort
from quart_trio import QuartTrio

__all__ = ["CSP", "OPEN_PREFIXES", "PAGE_PATH", "STATIC_PREFIX", "register_dashboard"]

PAGE_PATH = "/"
STATIC_PREFIX = "/static/"
OPEN_PREFIXES = (STATIC_PREFIX,)  # path prefixes the REST guard lets through (plus PAGE_PATH exactly)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_PAGE = "index.html"
CLIENT_MODULE = "relay-client.js"  # the official JavaScript client (web/client/)


def _load_files() -> dict[str, tuple[bytes, str]]:
    """Every servable file of ``trio_relay.web`` and of its ``client/``: name → (content, content type).

    ``client/`` is the official JavaScript client's package (``@trio-relay/client``): the page
    loads ``relay-client.js`` from there, served flat like the others.
    """
    files: dict[str, tuple[bytes, str]] = {}
    web = resources.files("trio_relay.web")
    for entry in [*web.iterdir(), *web.joinpath("client").iterdir()]:
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            files[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return files


def register_dashboard(app: QuartTrio) -> None:
    """Serve the dashboard page at ``/`` and its files at ``/static/<name>`` on ``app``."""
    files = _load_files()

    def serve(name: str) -> Response:
        found = files.get(name)
        if found is None:
            abort(404, f"no such file: {name[:40]!r}")
        body, content_type = found
        response = Response(body, status=200, content_type=content_type)
        response.headers["Content-Security-Policy"] = CSP
        if name == CLIENT_MODULE:
            # Public code, no credentials: any page (docs/examples/index.html opened from disk,
            # an app on another origin) may import the official client from its relay.
            response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    @app.get(PAGE_PATH)
    async def dashboard_page() -> Response:
        return serve(_PAGE)

    @app.get(STATIC_PREFIX + "<name>")
    async def dashboard_file(name: str) -> Response:
        if name == _PAGE:
            abort(404, "the dashboard is at /")  # its relative links only work from there
        return serve(name)
