"""SSE in a real browser (Debian's Chromium): an ``EventSource`` that loses its connection resumes.

The relay is a real process (as in test_dashboard.py); between the browser and it, a real TCP
relay of our own (threads and sockets) whose ``cut()`` drops every connection it carries: the
browser sees the network go, reconnects by itself with ``Last-Event-ID``, and the relay must
send exactly what it missed. The dashboard is also driven over SSE (``?transport=sse``), through
the official client.
"""

from __future__ import annotations

import functools
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from test_dashboard import Daemon, _environ, add, browser, errors, page, wait_updates  # noqa: F401 (fixtures)


class CuttableProxy:
    """Forwards TCP connections from a local port to ``target_port``; ``cut()`` drops them all."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, upstream]
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def pinned_relay(tmp_path: Path) -> Iterator[Daemon]:
    # Pinned: AAPL keeps ticking, and its resume history keeps growing, while no client holds it.
    daemon = Daemon(tmp_path, _environ(TRIO_RELAY_UPSTREAM_PINNED="AAPL", TRIO_RELAY_SIM_RATE="40"))
    daemon.start()
    yield daemon
    daemon.kill()


def test_event_source_resumes_without_a_gap_or_a_repeat(page: Page, pinned_relay: Daemon) -> None:
    proxy = CuttableProxy(pinned_relay.port)
    try:
        base = f"http://127.0.0.1:{proxy.port}/"
        page.goto(base + "static/favicon.svg")  # an origin whose policy allows connect-src 'self'
        page.evaluate(
            """() => {
                window.seqs = []; window.acks = []; window.opens = 0;
                const es = new EventSource("/api/v2/realtime/sse/prices?symbols=AAPL");
                es.onopen = () => window.opens++;
                es.addEventListener("subscribed", (e) => window.acks.push(JSON.parse(e.data)));
                es.addEventListener("price_update", (e) => window.seqs.push(JSON.parse(e.data).seq));
            }"""
        )
        page.wait_for_function("() => window.seqs.length >= 5")
        proxy.cut()  # the network drops the stream
        seen = page.evaluate("() => window.seqs.length")
        page.wait_for_function("() => window.opens >= 2")  # the browser reconnected by itself
        page.wait_for_function("(n) => window.seqs.length >= n + 15", arg=seen)
        seqs, acks = page.evaluate("() => [window.seqs, window.acks]")
        assert [a.get("recovered") for a in acks] == [None, True]  # the second one resumed
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap or repeat: {seqs}"
        assert proxy.connections >= 2
    finally:
        proxy.close()


def test_dashboard_over_sse(page: Page, errors: list[str], pinned_relay: Daemon) -> None:  # noqa: F811 (a fixture)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(pinned_relay.url + "?transport=sse")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    add(page, "AAPL")
    wait_updates(page, "AAPL", 5)
    assert any("/api/v2/realtime/sse/prices?symbols=AAPL" in url for url in requests)
    assert not any("/ws/prices" in url for url in requests)
    assert errors == []


EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"


@pytest.fixture
def examples_site() -> Iterator[str]:
    """docs/examples served over HTTP (as its README says), on a port of its own: another origin."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(EXAMPLES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_the_html_example_on_another_origin(
    page: Page,
    errors: list[str],  # noqa: F811 (a fixture)
    examples_site: str,
    tmp_path: Path,
    transport: str,
) -> None:
    """docs/examples/index.html loads the client from the relay (CORS) and shows live prices."""
    daemon = Daemon(tmp_path, _environ(TRIO_RELAY_SERVER_ALLOWED_ORIGINS=examples_site, TRIO_RELAY_SIM_RATE="40"))
    daemon.start()
    try:
        base = daemon.url.rstrip("/")
        page.goto(f"{examples_site}/index.html?url={base}&symbols=AAPL&transport={transport}&delta=1")
        expect(page.locator("#state")).to_have_attribute("data-state", "live")
        expect(page.locator("#state")).to_contain_text(transport)
        seq = page.locator('#prices tbody tr[data-symbol="AAPL"] td.seq')
        expect(seq).to_have_text(re.compile(r"^\d+$"))
        first = int(seq.text_content() or 0)
        page.wait_for_function(
            "(n) => Number(document.querySelector('tr[data-symbol=AAPL] td.seq').textContent) > n + 5", arg=first
        )
        # Deltas were merged: the full price is shown, not only what changed.
        for cell in ("last", "bid", "ask"):
            expect(page.locator(f'#prices tbody tr[data-symbol="AAPL"] td.{cell}')).to_have_text(re.compile(r"^\d"))
        assert [e for e in errors if "File not found" not in e] == []  # the static server has no favicon
    finally:
        daemon.kill()


def test_the_quick_start_page(page: Page, errors: list[str], tmp_path: Path) -> None:  # noqa: F811 (a fixture)
    """docs/quickstart.md's prices.html, served as it says, against a relay that allows its origin."""
    quickstart = (Path(__file__).parent.parent / "docs" / "quickstart.md").read_text()
    [html] = re.findall(r"```html\n(.*?)```", quickstart, re.S)
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    daemon = Daemon(tmp_path, _environ(TRIO_RELAY_SERVER_ALLOWED_ORIGINS=origin))
    daemon.start()
    try:
        (site / "prices.html").write_text(html.replace("http://127.0.0.1:8000", daemon.url.rstrip("/")))
        page.goto(f"{origin}/prices.html")
        expect(page.locator("#out")).to_contain_text(re.compile(r"AAPL \d+\.\d+ \d+\.\d+/\d+\.\d+"))
        expect(page.locator("#out")).to_contain_text("MSFT")
        assert [e for e in errors if "File not found" not in e] == []  # the static server has no favicon
    finally:
        daemon.kill()
        server.shutdown()
        server.server_close()
