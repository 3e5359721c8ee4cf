"""The web dashboard, in a real browser: Debian's Chromium driven by Playwright's sync API.

The relay runs as a real subprocess (``python -m trio_relay serve``) on a fixed port, so "kill the
daemon and start it again" is real: the page sees its socket die, backs off, and resumes on the
new process. These tests are plain sync tests (Playwright's async API needs asyncio), and every
wait is on a condition in the page (``expect``, ``wait_for_function``), never a fixed sleep.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import axe_playwright_python
import httpx
import jwt
import pytest
from conftest import api, require
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from trio_relay.api.dashboard import CSP
from trio_relay.daemon import Relay

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
SECRET = "dashboard-test-secret-0123456789abcdef"  # HS256 needs at least 32 characters
READY_LINE = "[START] trio-relay listening on"

expect.set_options(timeout=10_000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Daemon:
    """``trio-relay serve --provider sim`` in a subprocess; ``start()`` again after ``kill()``."""

    def __init__(self, workdir: Path, env: dict[str, str], provider: str = "sim") -> None:
        self.provider = provider
        self.workdir = workdir
        self.env = env
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen[str] | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=200)

    def start(self) -> None:
        cmd = [sys.executable, "-m", "trio_relay", "serve", "--port", str(self.port), "--provider", self.provider]
        proc = self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        ready = threading.Event()

        def drain() -> None:  # reads the log to its end, so the relay never blocks on a full pipe
            assert proc.stderr is not None
            for line in proc.stderr:
                self.log.append(line)
                if READY_LINE in line:
                    ready.set()
            ready.set()  # it exited

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(20) or proc.poll() is not None:
            self.kill()
            raise AssertionError("the relay did not start:\n" + "".join(self.log))

    def kill(self) -> None:
        """SIGKILL: no close frame, no goodbye; the browser sees the connection drop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM: the relay sends a ``closing`` status, closes clients with 1001 and exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):  # .ci/run installs it
        require(f"{CHROMIUM} is missing (apt-get install chromium); the dashboard tests drive Debian's Chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def _environ(**env: str) -> dict[str, str]:
    """This environment without relay settings or provider keys, plus a fast sim and ``env``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIO_RELAY_", "FMP_", "FINNHUB_", "APCA_", "POLYGON_", "MASSIVE_"))
    }
    base |= {
        "TRIO_RELAY_SIM_RATE": "50",
        "TRIO_RELAY_HISTORY_BACKEND": "off",
        "TRIO_RELAY_UPSTREAM_UNSUBSCRIBE_LINGER": "0",
    }
    return base | env


@pytest.fixture(scope="module")
def sim_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One plain relay shared by the tests that neither stop it nor need settings of their own."""
    # A temporary working directory: no .env is read and no data directory is left behind.
    daemon = Daemon(tmp_path_factory.mktemp("relay"), _environ())
    daemon.start()
    yield daemon
    daemon.kill()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``daemon = relay(TRIO_RELAY_X="...")``: a relay of the test's own, killed at its end."""
    started: list[Daemon] = []

    def start(provider: str = "sim", **env: str) -> Daemon:
        daemon = Daemon(tmp_path, _environ(**env), provider)
        started.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def errors() -> list[str]:
    """Script errors and console errors (CSP violations among them) of the test's page."""
    return []


@pytest.fixture
def page(browser: Browser, errors: list[str]) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()


def add(page: Page, symbols: str) -> None:
    page.fill("#symbol-input", symbols)
    page.click("#add")


def row(page: Page, symbol: str) -> Locator:
    return page.locator(f'#rows tr[data-symbol="{symbol}"]')


def wait_updates(page: Page, symbol: str, more_than: int) -> int:
    """Wait until the page applied more than ``more_than`` updates of ``symbol``; the count."""
    page.wait_for_function("([s, n]) => window.relayDashboard.updates(s) > n", arg=[symbol, more_than])
    count: int = page.evaluate("(s) => window.relayDashboard.updates(s)", symbol)
    return count


def wait_prices_change(page: Page, symbol: str) -> None:
    """Wait until the row's displayed prices (last, bid, ask) differ from what they are now."""
    cells = f'#rows tr[data-symbol="{symbol}"] td'
    script = f"() => [...document.querySelectorAll('{cells}.last, {cells}.bid, {cells}.ask')].map(c => c.textContent).join(' ')"
    before = page.evaluate(script)
    page.wait_for_function(f"(before) => ({script})() !== before", arg=before)


@pytest.mark.parametrize("auth", [False, True])
async def test_files_are_served_with_their_own_policy(
    start_relay: Callable[..., Awaitable[Relay]], http: httpx.AsyncClient, auth: bool
) -> None:
    """No browser needed: the page and its files, their types and headers; open when auth is on."""
    sections = {"auth": {"enabled": True, "secret": SECRET}} if auth else {}
    relay = await start_relay(**sections)
    base = relay.http_url
    for path, content_type in [
        ("/", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/feed.js", "text/javascript"),
        ("/static/style.css", "text/css"),
        ("/static/favicon.svg", "image/svg+xml"),
    ]:
        response = await http.get(base + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(content_type)
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-frame-options"] == "DENY"
    for path in ("/static/index.html", "/static/__init__.py", "/static/..%2f__init__.py", "/static/nope.js"):
        assert (await http.get(base + path)).status_code == 404, path
    # The data is still guarded, and keeps the REST policy.
    cache = await http.get(api(relay, "/cache"))
    assert cache.status_code == (401 if auth else 200)
    assert cache.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


def test_page_loads_and_goes_live(page: Page, errors: list[str], sim_relay: Daemon) -> None:
    daemon = sim_relay
    response = page.goto(daemon.url)
    assert response is not None and response.ok
    assert response.headers["content-security-policy"] == CSP
    expect(page).to_have_title("trio-relay")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(page.locator("#conn-text")).to_have_text("live")
    expect(page.locator("#empty")).to_be_visible()

    script = page.request.get(daemon.url + "static/app.js")
    assert script.status == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["content-security-policy"] == CSP
    assert script.headers["x-content-type-options"] == "nosniff"
    missing = page.request.get(daemon.url + "static/nope.js")
    assert missing.status == 404 and missing.json()["error"] == "not_found"
    # No script error and no CSP violation (Chromium reports both on the console).
    assert errors == []


def test_add_watch_chart_and_remove_symbols(page: Page, sim_relay: Daemon) -> None:
    daemon = sim_relay
    page.goto(daemon.url)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    add(page, "AAPL")
    add(page, "msft")  # upper-cased by the page
    expect(page.locator("#rows tr")).to_have_count(2)
    for symbol in ("AAPL", "MSFT"):
        wait_updates(page, symbol, 5)
        wait_prices_change(page, symbol)
        expect(row(page, symbol).locator("td.provider")).to_have_text("sim")
        expect(row(page, symbol).locator("td.change")).to_have_text(re.compile(r"\d\.\d+ \(.*%\)"))

    # A chart per selected row, drawn on a canvas.
    row(page, "AAPL").locator("th.symbol").click()
    canvas = page.locator('figure.chart[data-symbol="AAPL"] canvas')
    expect(canvas).to_be_visible()
    page.wait_for_function(
        """() => {
            const c = document.querySelector('figure.chart[data-symbol="AAPL"] canvas');
            const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let drawn = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) drawn++;
            return drawn > 500;
        }"""
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "dashboard.png", full_page=True)

    # Removing MSFT: its row goes, and the relay sends nothing more of it after its ack.
    row(page, "MSFT").locator("button.drop").click()
    expect(row(page, "MSFT")).to_have_count(0)
    page.wait_for_function("() => 'MSFT' in window.relayDashboard.unsubscribedAt")
    aapl = page.evaluate("() => window.relayDashboard.received.AAPL")
    page.wait_for_function("(n) => window.relayDashboard.received.AAPL > n + 25", arg=aapl)
    received, acked = page.evaluate(
        "() => [window.relayDashboard.received.MSFT, window.relayDashboard.unsubscribedAt.MSFT]"
    )
    assert received == acked

    # The list survives a reload (localStorage).
    page.reload()
    expect(page.locator("#rows tr")).to_have_count(1)
    expect(row(page, "AAPL")).to_have_count(1)
    wait_updates(page, "AAPL", 1)


def test_reconnects_when_the_relay_dies_and_comes_back(page: Page, relay: Callable[..., Daemon]) -> None:
    daemon = relay()
    page.goto(daemon.url)
    add(page, "AAPL")
    wait_updates(page, "AAPL", 3)
    conn = page.locator("#conn")

    daemon.kill()
    expect(conn).to_have_attribute("data-state", "reconnecting")
    expect(page.locator("#conn-text")).to_contain_text(re.compile(r"reconnecting in \d+s"))
    expect(page.locator("#quotes")).to_have_class(re.compile(r"\boffline\b"))
    count = page.evaluate("() => window.relayDashboard.updates('AAPL')")

    daemon.start()  # same port, new process, new epoch
    expect(conn).to_have_attribute("data-state", "live", timeout=15_000)
    count = wait_updates(page, "AAPL", count + 3)
    wait_prices_change(page, "AAPL")

    # A clean shutdown: a "closing" status, close code 1001, a pause, then the same again.
    daemon.terminate()
    expect(conn).to_have_attribute("data-state", "reconnecting")
    daemon.start()
    expect(conn).to_have_attribute("data-state", "live", timeout=15_000)
    wait_updates(page, "AAPL", count + 3)


def test_stale_symbol_is_greyed(page: Page, relay: Callable[..., Daemon]) -> None:
    # The sim ticks every symbol alike; at 0.01 updates/s a symbol gets its first quote on
    # subscribe and then nothing for ~100 s, so with a 1 s limit the relay reports it stale.
    daemon = relay(TRIO_RELAY_SIM_RATE="0.01", TRIO_RELAY_CLIENTS_SYMBOL_STALE_AFTER="1")
    page.goto(daemon.url)
    add(page, "IBM")
    wait_updates(page, "IBM", 0)
    expect(row(page, "IBM")).to_have_class(re.compile(r"\bstale\b"))
    opacity = row(page, "IBM").evaluate("(tr) => Number(getComputedStyle(tr).opacity)")
    assert opacity < 1
    # Every row stale: the badge must not say "live" whatever the upstream reports.
    expect(page.locator("#conn")).to_have_attribute("data-state", "stale")
    expect(page.locator("#conn-text")).to_have_text("stale: no updates for any symbol")


def test_asks_for_a_token_when_auth_is_on(page: Page, relay: Callable[..., Daemon]) -> None:
    daemon = relay(TRIO_RELAY_AUTH_ENABLED="true", TRIO_RELAY_AUTH_SECRET=SECRET)
    # The page and its files are served without a token; the data still needs one.
    assert page.request.get(daemon.url + "api/v2/realtime/cache").status == 401
    page.goto(daemon.url)
    token_form = page.locator("#token-form")
    expect(token_form).to_be_visible()
    expect(page.locator("#conn")).to_have_attribute("data-state", "token")

    page.fill("#token-input", "not-a-jwt")
    page.click("#token-form button")
    expect(token_form).to_be_visible()
    expect(page.locator("#token-reason")).to_contain_text("token refused")

    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    page.fill("#token-input", token)
    page.click("#token-form button")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(token_form).to_be_hidden()
    expect(page.locator("#who")).to_have_text("as alice")
    add(page, "AAPL")
    wait_updates(page, "AAPL", 3)

    # The token is kept for the tab (sessionStorage): a reload connects without asking.
    page.reload()
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    wait_updates(page, "AAPL", 1)
    expect(token_form).to_be_hidden()


def test_alerts_panel_creates_lists_fires_and_deletes(
    page: Page, errors: list[str], relay: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = relay(TRIO_RELAY_ALERTS_ENABLED="true", TRIO_RELAY_ALERTS_DATA_DIR=str(tmp_path / "alerts"))
    page.goto(daemon.url)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    add(page, "AAPL")
    wait_updates(page, "AAPL", 3)
    expect(page.locator("#alert-rules-empty")).to_be_visible()
    expect(page.locator("#fired-empty")).to_be_visible()

    # Refused by the relay (no level): its message is shown by the form, and no rule is made.
    page.fill("#alert-symbol", "aapl")
    page.select_option("#alert-type", "above")
    page.click("#alert-create")
    error = page.locator("#alert-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("needs 'level'")
    expect(page.locator("#alert-rows tr")).to_have_count(0)

    # A spread rule that fires within a few quotes: the sim's AAPL spread is one or two cents
    # (0.36 or 0.72 bps of ~278), drawn again on every quote (50 updates/s here), so it soon goes
    # from 0.7 bps or less (one cent: the rule becomes active) to wider (it fires).
    page.select_option("#alert-type", "spread")
    expect(page.locator("#alert-level")).to_be_hidden()
    page.fill("#alert-spread", "0.7")
    page.select_option("#alert-spread-unit", "max_spread_bps")
    page.click("#alert-create")
    expect(error).to_be_hidden()
    rules = page.locator("#alert-rows tr")
    expect(rules).to_have_count(1)
    expect(rules.locator("th.symbol")).to_have_text("AAPL")
    expect(rules.locator("td.rule")).to_have_text("spread > 0.7 bps")

    fired = page.locator("#fired li")
    expect(fired.first).to_be_visible()
    expect(fired.first.locator(".symbol")).to_have_text("AAPL")
    expect(fired.first.locator(".message")).to_contain_text("AAPL spread")
    expect(fired.first.locator(".time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
    expect(fired.first.locator(".price")).to_have_text(re.compile(r"^\d+\.\d+$"))
    expect(page.locator("#fired-empty")).to_be_hidden()
    # One-shot (the default): fired once, for good, as the relay's list says after the alert.
    expect(rules.locator("td.state")).to_have_text("fired")
    expect(rules.locator("td.count")).to_have_text("1")
    assert fired.count() == 1

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "dashboard-alerts.png", full_page=True)

    # The rules survive a reload: the page asks for them on every connection.
    page.reload()
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(rules).to_have_count(1)
    expect(rules.locator("td.state")).to_have_text("fired")

    rules.locator("button.drop").click()
    expect(rules).to_have_count(0)
    expect(page.locator("#alert-rules-empty")).to_be_visible()
    page.reload()
    page.wait_for_function("() => window.relayDashboard.alertLists > 0")
    expect(page.locator("#alert-rules-empty")).to_be_visible()
    assert page.evaluate("() => window.relayDashboard.alertRules") == []
    assert errors == []


def test_alerts_panel_says_when_alerts_are_off(page: Page, relay: Callable[..., Daemon]) -> None:
    daemon = relay(TRIO_RELAY_ALERTS_ENABLED="false")
    page.goto(daemon.url)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(page.locator("#alerts-off")).to_contain_text("alerts are off")
    expect(page.locator("#alert-form")).to_be_hidden()
    expect(page.locator("#notice")).to_be_hidden()


# --------------------------------------------------------------------------- every screen

DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
SMALLEST = {"width": 360, "height": 740}
# The symbols a trader looks at first: a price that is cut, or absurd, is seen at once.
WATCHED = "AAPL, MSFT, NVDA, BTCUSD, EURUSD, ^GSPC"
# Where the screenshots go (not a TRIO_RELAY_ variable: those are the relay's configuration).
SCREENSHOTS = Path(os.environ.get("DASHBOARD_SCREENSHOTS", str(ARTIFACTS)))


def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / name, full_page=False)


def open_page(browser: Browser, errors: list[str], viewport: dict[str, int], **options: object) -> Page:
    context = browser.new_context(viewport=viewport, **options)  # type: ignore[arg-type]
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return page


def watch_all(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    add(page, WATCHED)
    for symbol in [s.strip() for s in WATCHED.split(",")]:
        # Every row has a price to show (an index prints values only: last, no bid/ask).
        page.wait_for_function(
            """(s) => { const r = document.querySelector(`#rows tr[data-symbol="${s}"]`);
                        return r && (r.querySelector('td.last').textContent !== '—'
                                     || r.querySelector('td.bid').textContent !== '—'); }""",
            arg=symbol,
        )


# What is cut or off-screen: cells whose text is wider than the cell, and anything past the
# right edge of the viewport (the remove buttons, a row, the page itself).
CUT = """() => {
  const cut = [];
  const right = document.documentElement.clientWidth;
  for (const cell of document.querySelectorAll('#rows th, #rows td')) {
    if (getComputedStyle(cell).display === 'none') continue;
    const box = cell.getBoundingClientRect();
    if (cell.scrollWidth > cell.clientWidth + 1 || box.right > right + 0.5)
      cut.push(`${cell.parentElement.dataset.symbol} ${cell.className}: ${cell.textContent}`);
  }
  for (const b of document.querySelectorAll('#rows button.drop'))
    if (b.getBoundingClientRect().right > right || b.getBoundingClientRect().width < 16) cut.push('remove button');
  if (document.documentElement.scrollWidth > right) cut.push(`page scrolls sideways: ${document.documentElement.scrollWidth}`);
  return cut;
}"""


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE, SMALLEST], ids=["1440", "390", "360"])
def test_every_price_is_whole_on_every_screen(
    browser: Browser, errors: list[str], sim_relay: Daemon, viewport: dict[str, int]
) -> None:
    page = open_page(browser, errors, viewport)
    watch_all(page, sim_relay.url)
    for _ in range(5):  # the widest prices come and go: look at several frames
        wait_prices_change(page, "BTCUSD")
        assert page.evaluate(CUT) == []
    # The prices a trader knows, at levels they know (the simulator's reference table).
    levels = page.evaluate(
        "() => Object.fromEntries([...document.querySelectorAll('#rows tr')].map(r => [r.dataset.symbol, "
        "Number(r.querySelector('td.last').textContent) || Number(r.querySelector('td.bid').textContent)]))"
    )
    for symbol, (lo, hi) in {
        "AAPL": (200, 360),
        "MSFT": (380, 600),
        "NVDA": (130, 240),
        "BTCUSD": (60_000, 130_000),
        "EURUSD": (1.0, 1.35),
        "^GSPC": (5_500, 8_200),
    }.items():
        assert lo < levels[symbol] < hi, (symbol, levels[symbol])
    row(page, "BTCUSD").locator("button.sym").click()
    expect(page.locator('figure.chart[data-symbol="BTCUSD"] canvas')).to_be_visible()
    wait_updates(page, "BTCUSD", page.evaluate("() => window.relayDashboard.updates('BTCUSD')") + 20)
    shoot(page, f"dashboard-live-{viewport['width']}x{viewport['height']}.png")
    page.context.close()
    assert errors == []


def test_the_page_passes_axe_core(browser: Browser, errors: list[str], sim_relay: Daemon) -> None:
    """axe-core (bundled by axe-playwright-python: nothing is fetched) finds no violation."""
    axe_script = (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text()
    for viewport in (DESKTOP, PHONE):
        for scheme in ("light", "dark"):
            page = open_page(browser, errors, viewport, color_scheme=scheme)
            watch_all(page, sim_relay.url)
            row(page, "AAPL").locator("button.sym").click()
            expect(row(page, "AAPL").locator("button.sym")).to_have_attribute("aria-expanded", "true")
            page.fill("#symbol-input", "bad sym!")
            page.click("#add")
            expect(page.locator("#symbol-error")).to_be_visible()
            page.evaluate(axe_script)
            result = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
            found = [
                f"{v['id']} ({v['impact']}): {v['help']}: " + "; ".join(n["target"][0] for n in v["nodes"][:5])
                for v in result["violations"]
            ]
            assert found == [], f"{viewport['width']}px, {scheme}: " + " | ".join(found)
            page.context.close()
    assert errors == []


def test_a_bad_symbol_is_refused_not_mangled(page: Page, sim_relay: Daemon) -> None:
    page.goto(sim_relay.url)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    add(page, "bad sym!")
    error = page.locator("#symbol-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text('"SYM!"')
    expect(page.locator("#symbol-input")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#symbol-input")).to_have_value("bad sym!")  # kept, to be corrected
    expect(page.locator("#rows tr")).to_have_count(0)  # not "BAD"
    page.fill("#symbol-input", "aapl, brk.b ^gspc")  # typing clears the error
    expect(error).to_be_hidden()
    page.click("#add")
    expect(page.locator("#rows tr")).to_have_count(3)
    assert page.evaluate("() => window.relayDashboard.symbols") == ["AAPL", "BRK.B", "^GSPC"]
    # Change says since when: on the day, as the simulated market gives each previous close.
    expect(page.locator("#quotes thead th.change")).to_have_text(re.compile(r"^Change on the day$"))
    wait_updates(page, "AAPL", 3)
    expect(row(page, "AAPL").locator("td.change")).to_have_attribute(
        "title", re.compile(r"^on the day: since the previous close, \d+\.\d\d$")
    )


# Counts the flashes that start: a class attribute that gains flash-up or flash-down.
FLASHES = """() => { window.flashes = 0;
  const flash = /\\bflash-(up|down)\\b/;
  new MutationObserver((records) => { for (const r of records)
    if (!flash.test(r.oldValue || '') && r.target.classList.contains('flash-up') !== r.target.classList.contains('flash-down'))
      window.flashes++; })
  .observe(document.getElementById('rows'),
           {subtree: true, attributes: true, attributeOldValue: true, attributeFilter: ['class']}); }"""


@pytest.mark.parametrize("motion", ["no-preference", "reduce"])
def test_flashes_are_brief_and_respect_reduced_motion(
    browser: Browser, errors: list[str], sim_relay: Daemon, motion: str
) -> None:
    page = open_page(browser, errors, DESKTOP, reduced_motion=motion)
    page.goto(sim_relay.url)
    add(page, "AAPL, MSFT")
    wait_updates(page, "AAPL", 2)
    page.evaluate(FLASHES)
    started = time.monotonic()
    wait_updates(page, "AAPL", page.evaluate("() => window.relayDashboard.updates('AAPL')") + 150)  # ~3 s
    wait_prices_change(page, "MSFT")
    flashes = page.evaluate("() => window.flashes")
    seconds = time.monotonic() - started
    if motion == "reduce":
        assert flashes == 0
    else:
        # Some, but a cell flashes at most once a second (6 price cells here), however often it
        # changes: at 50 updates/s the table is not permanently tinted.
        assert 0 < flashes <= 6 * (seconds + 1)
    page.context.close()
    assert errors == []


def test_the_chart_has_a_time_axis(page: Page, sim_relay: Daemon) -> None:
    page.goto(sim_relay.url)
    add(page, "MSFT")
    wait_updates(page, "MSFT", 40)
    row(page, "MSFT").locator("button.sym").click()
    # Labels and ticks are drawn in the strip under the plot.
    page.wait_for_function(
        """() => { const c = document.querySelector('figure.chart[data-symbol="MSFT"] canvas');
                   if (!c || !c.width) return false;
                   const r = c.height / c.clientHeight, h = Math.round(14 * r);
                   const px = c.getContext('2d').getImageData(0, c.height - h, c.width, h).data;
                   let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i]) n++;
                   return n > 200; }"""
    )


def fake_fmp(port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "trio_relay", "fake-fmp", "--port", str(port), "--control", "--rate", "20"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc


def command(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()
    proc.stdout.readline()


def test_the_badge_shows_stale_and_down_on_every_screen(
    browser: Browser, errors: list[str], relay: Callable[..., Daemon]
) -> None:
    port = _free_port()
    fake = fake_fmp(port)
    try:
        daemon = relay(
            "fmp",
            FMP_API_KEY="demo-key",
            TRIO_RELAY_FMP_URL=f"ws://127.0.0.1:{port}",
            TRIO_RELAY_UPSTREAM_STALE_AFTER="1",
        )
        pages = {"desktop": open_page(browser, errors, DESKTOP), "phone": open_page(browser, errors, PHONE)}
        for page in pages.values():
            watch_all(page, daemon.url)
        command(fake, "stall")  # no data, no heartbeat: stale after a second
        for name, page in pages.items():
            conn = page.locator("#conn")
            expect(conn).to_have_attribute("data-state", "stale")
            expect(page.locator("#conn-text")).to_have_text(re.compile(r"^stale: fmp"))
            assert page.evaluate(CUT) == []
            shoot(page, f"dashboard-stale-{name}.png")
        command(fake, "resume")
        for page in pages.values():
            expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        fake.kill()
        fake.wait(10)
        for name, page in pages.items():
            expect(page.locator("#conn")).to_have_attribute("data-state", "upstream-down")
            expect(page.locator("#conn-text")).to_have_text(re.compile(r"^down: fmp"))
            expect(page.locator("#quotes")).to_have_class(re.compile(r"\boffline\b"))
            assert page.evaluate(CUT) == []
            shoot(page, f"dashboard-down-{name}.png")
        for page in pages.values():
            page.context.close()
    finally:
        fake.kill()
        fake.wait(10)
    assert errors == []


def test_alerts_are_private_to_each_browser_with_auth_off(
    browser: Browser, errors: list[str], relay: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = relay(TRIO_RELAY_ALERTS_ENABLED="true", TRIO_RELAY_ALERTS_DATA_DIR=str(tmp_path / "alerts"))
    one, other = open_page(browser, errors, DESKTOP), open_page(browser, errors, DESKTOP)  # two browsers
    for page in (one, other):
        page.goto(daemon.url)
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    one.fill("#alert-symbol", "AAPL")
    one.select_option("#alert-type", "above")
    one.fill("#alert-level", "1000")
    one.click("#alert-create")
    expect(one.locator("#alert-rows tr")).to_have_count(1)
    other.reload()  # a new list from the relay
    other.wait_for_function("() => window.relayDashboard.alertLists > 0")
    expect(other.locator("#alert-rows tr")).to_have_count(0)
    one.reload()  # the same browser keeps its id (localStorage), so its rules
    expect(one.locator("#alert-rows tr")).to_have_count(1)
    for page in (one, other):
        page.context.close()
    assert errors == []


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1440", "390"])
def test_the_portfolio_panel_values_positions_live(
    browser: Browser, errors: list[str], relay: Callable[..., Daemon], tmp_path: Path, viewport: dict[str, int]
) -> None:
    daemon = relay(TRIO_RELAY_ALERTS_DATA_DIR=str(tmp_path / "app"))
    page = open_page(browser, errors, viewport)
    watch_all(page, daemon.url)
    expect(page.locator("#positions-empty")).to_be_visible()
    for symbol, qty, cost in (("AAPL", "100", "250"), ("BTCUSD", "0.5", "90000"), ("EURUSD", "-10000", "1.17")):
        page.fill("#position-symbol", symbol)
        page.fill("#position-qty", qty)
        page.fill("#position-cost", cost)
        page.click("#position-set")
        expect(page.locator(f'#position-rows tr[data-symbol="{symbol}"]')).to_have_count(1)
    expect(page.locator("#position-error")).to_be_hidden()
    aapl = page.locator('#position-rows tr[data-symbol="AAPL"]')
    expect(aapl.locator("td.price")).to_have_text(re.compile(r"^\d+\.\d+$"))
    expect(aapl.locator("td.value")).to_have_text(re.compile(r"^2\d,\d{3}\.\d\d$"))  # 100 x ~278
    expect(aapl.locator("td.pnl")).to_have_text(re.compile(r"^[+−][\d,]+\.\d\d \([+−]\d+\.\d\d%\)$"))
    expect(page.locator("#total-value")).to_have_text(re.compile(r"^−?[\d,]+\.\d\d$"))
    expect(page.locator('#position-rows tr[data-symbol="EURUSD"] td.value')).to_have_text(
        re.compile(r"^−1\d,\d{3}\.\d\d$")
    )
    # Valued live: the AAPL value moves with its price (the portfolio channel).
    before = aapl.locator("td.value").text_content()
    page.wait_for_function(
        "(b) => document.querySelector('#position-rows tr[data-symbol=\"AAPL\"] td.value').textContent !== b",
        arg=before,
    )
    shoot(page, f"dashboard-portfolio-{viewport['width']}.png")
    assert page.evaluate(CUT.replace("#rows", "#position-rows")) == []
    # A bad position is refused with the relay's reason, nothing else changes.
    page.fill("#position-symbol", "bad sym!")
    page.fill("#position-qty", "1")
    page.click("#position-set")
    expect(page.locator("#position-error")).to_be_visible()
    # Kept for this browser across a reload; removed with its button.
    page.reload()
    expect(page.locator("#position-rows tr")).to_have_count(3)
    aapl.locator("button.drop").click()
    expect(page.locator("#position-rows tr")).to_have_count(2)
    page.context.close()
    # Chromium logs the refused request (422) on the console: that one was asked for.
    assert [e for e in errors if "422" not in e] == []


def test_the_docs_browser_console_snippet_works_from_the_relays_page(
    browser: Browser, errors: list[str], sim_relay: Daemon
) -> None:
    """README's and the quick start's console snippet, pasted into the console of the relay's page."""
    root = Path(__file__).resolve().parent.parent
    snippets = []
    for doc in (root / "README.md", root / "docs" / "quickstart.md"):
        snippets += re.findall(r"```js\n(.*?)```", doc.read_text(), re.S)
    assert len(snippets) == 2
    for snippet in snippets:
        page = open_page(browser, errors, DESKTOP)
        page.goto(sim_relay.url)
        # What the snippet logs, kept in the page (as JSON) for the test to wait on.
        page.evaluate(
            "() => { window.logged = []; const log = console.log;"
            " console.log = (...a) => { window.logged.push(JSON.stringify(a[0])); log(...a); }; }"
        )
        code = snippet.replace("127.0.0.1:8000", sim_relay.url.split("//")[1].rstrip("/"))
        page.evaluate(f"() => {{ {code} }}")  # as pasted into the console (its own scope)
        page.wait_for_function("() => window.logged.some((l) => l.includes('\"price_update\"'))")
        logged = page.evaluate("() => window.logged")
        ack = json.loads(logged[0])
        assert ack["type"] == "subscribed" and ack["symbols"] == ["AAPL"] and "AAPL" in ack["prev_close"], logged
        assert any(json.loads(line).get("symbol") == "AAPL" for line in logged[1:])
        page.context.close()
    assert errors == []
