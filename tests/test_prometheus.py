"""Monitoring as people run it: the shipped Prometheus rules and Grafana dashboard, for real.

- ``promtool check rules`` / ``check config`` / ``test rules`` pass on the files in
  ``config/prometheus/`` (run as processes), and the unit tests cover every alert both firing and
  not firing; every alert has a ``for``, a severity and a runbook that points at its section of
  ``docs/monitoring.md``.
- Every metric name and every label value the rules and the dashboard select is one a real relay
  exports (``/metrics`` of a relay started in process; a fleet relay on the real Redis for the
  ``trio_relay_fleet_*`` names).
- A real Prometheus (Debian's ``/usr/bin/prometheus``) scrapes three real relays over loopback,
  with the shipped rules loaded: the targets are healthy, the series are ingested with the right
  values, every rule evaluates without error, a relay whose key is refused raises
  ``TrioRelayUpstreamAuthFailed`` (and nothing else), a stalled feed raises
  ``TrioRelayUpstreamStale`` until data flows again, the healthy relay raises nothing, and every
  query of the dashboard returns data.
- The same with a fleet of two relays on the real Redis: one holder seen, nothing raised, the
  fleet panels answered; then every relay of the fleet stops, its series go stale, and
  ``TrioRelayFleetNoHolder`` is raised for the fleet that vanished.

Without ``prometheus``/``promtool`` these tests skip and say so, except under CI (``CI=true``),
where that fails (``require``). Prometheus runs in real time, so its tests wait on conditions
polled against its HTTP API, each wait bounded.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml
from conftest import FMP_KEY, fmp_sections, require, wait_state
from prometheus_client.parser import text_string_to_metric_families
from test_docs import anchors

from trio_relay.daemon import Relay
from trio_relay.engine.fleet_view import FleetUpstream

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "config" / "prometheus"
RULES = PROMETHEUS_DIR / "trio-relay-rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "trio-relay-rules.test.yml"
EXAMPLE = PROMETHEUS_DIR / "prometheus.example.yml"
DASHBOARD = ROOT / "config" / "grafana" / "trio-relay-dashboard.json"
MONITORING_DOC = ROOT / "docs" / "monitoring.md"
JOB = "trio-relay"
PROMETHEUS_WAIT = 30.0  # seconds for a real Prometheus to start, scrape, ingest and evaluate
POLL_INTERVAL = 0.25  # seconds between two looks at Prometheus's HTTP API
METRIC = re.compile(r"\b(trio_relay_[a-z0-9_]+)")
SELECTOR = re.compile(r"\b(trio_relay_[a-z0-9_]+)\{([^}]*)\}")
EQUALITY = re.compile(r'(\w+)\s*=\s*"([^"]*)"')  # `=` only: not `=~`, not `!=`


def tool(name: str) -> str:
    """The path of a Prometheus tool; skipped (failed under CI) when it is not installed."""
    path = shutil.which(name)
    require(None if path else f"{name} is not installed (Debian: apt-get install prometheus)")
    assert path is not None
    return path


@pytest.fixture
def promtool() -> str:
    # A plain (not async) fixture: a skip raised here keeps its reason in pytest's report.
    return tool("promtool")


@pytest.fixture
def prometheus_binary() -> str:
    return tool("prometheus")


async def run_tool(*args: str | Path) -> str:
    """Run a tool to completion; its output, stdout and stderr together (asserted exit 0)."""
    result = await trio.run_process([str(a) for a in args], capture_stdout=True, capture_stderr=True, check=False)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, f"{' '.join(map(str, args))} exited {result.returncode}:\n{output}"
    return output


# ----------------------------------------------------------------------------- the shipped files


def alerting_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel of the dashboard, those inside rows included."""
    for panel in json.loads(DASHBOARD.read_text())["panels"] if panels is None else panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def rule_queries() -> list[str]:
    """The rules' expressions, and the queries their annotation templates run."""
    queries = []
    for rule in alerting_rules():
        queries.append(rule["expr"])
        for text in rule["annotations"].values():
            queries += re.findall(r"printf `([^`]*)`", text)
    return queries


def dashboard_queries() -> list[str]:
    """The PromQL of every panel target and template variable of the dashboard."""
    queries = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        queries.append(variable["query"])
    return queries


def concrete(query: str) -> str:
    """A dashboard query as Grafana sends it: its variables replaced by values."""
    return query.replace("$__rate_interval", "5s").replace("$job", JOB).replace("$instance", ".*")


def used_selectors(queries: list[str]) -> tuple[set[str], set[tuple[str, str, str]]]:
    """Metric names, and (name, label, value) equality matchers, used by ``queries``."""
    names: set[str] = set()
    matchers: set[tuple[str, str, str]] = set()
    for query in queries:
        names.update(METRIC.findall(query))
        for name, inside in SELECTOR.findall(query):
            for label, value in EQUALITY.findall(inside):
                if "$" not in value and "%" not in value:  # not a variable or a printf verb
                    matchers.add((name, label, value))
    return names, matchers


def exported(text: str) -> dict[str, list[dict[str, str]]]:
    """/metrics text: each sample name with the label sets it has."""
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    return samples


def assert_exported(
    samples: dict[str, list[dict[str, str]]], names: set[str], matchers: set[tuple[str, str, str]]
) -> None:
    assert not names - samples.keys(), f"used but not exported: {sorted(names - samples.keys())}"
    for name, label, value in matchers:
        values = {labels.get(label) for labels in samples[name]}
        assert value in values, (
            f'{name}{{{label}="{value}"}}: the relay exports only {label} in {sorted(map(str, values))}'
        )


async def test_promtool_checks_the_rules_and_the_example_config(promtool: str) -> None:
    output = await run_tool(promtool, "check", "rules", RULES)
    assert f"SUCCESS: {len(alerting_rules())} rules found" in output
    # check config also checks the rule files it names (relative to the config file).
    output = await run_tool(promtool, "check", "config", EXAMPLE)
    assert "SUCCESS: 1 rule files found" in output and "trio-relay-rules.yml" in output
    example = yaml.safe_load(EXAMPLE.read_text())
    assert example["rule_files"] == [RULES.name]
    [job] = [job for job in example["scrape_configs"] if job["job_name"] == JOB]
    assert job["metrics_path"] == "/metrics" and job["scrape_interval"]


async def test_promtool_unit_tests_pass_and_show_every_alert_firing_and_not(promtool: str) -> None:
    output = await run_tool(promtool, "test", "rules", RULE_TESTS)
    assert "SUCCESS" in output and "FAILED" not in output
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alerting_rules():
        name = rule["alert"]
        firing = [c for c in cases if c["alertname"] == name and c.get("exp_alerts")]
        quiet = [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")]
        assert firing and quiet, f"{name}: tested firing {len(firing)} times, not firing {len(quiet)} times"
        # A firing case checks the rendered annotations too (templates with queries included).
        assert all(a.get("exp_annotations") for c in firing for a in c["exp_alerts"]), name


def test_every_alert_has_a_delay_a_severity_and_a_runbook_section() -> None:
    rules = alerting_rules()
    assert len(rules) >= 12
    doc = MONITORING_DOC.read_text()
    sections = anchors(MONITORING_DOC)
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for") not in (None, "0s", "0m"), f"{name}: no for"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook"].startswith(f"docs/monitoring.md#{name.lower()}: "), name
        assert name.lower() in sections, f"docs/monitoring.md has no section for {name}"
        assert f"| `{name}` |" in doc, f"docs/monitoring.md's table does not list {name}"
    severity = {r["alert"]: r["labels"]["severity"] for r in rules}
    for name in (
        "TrioRelayDown",
        "TrioRelayUpstreamDown",
        "TrioRelayUpstreamAuthFailed",
        "TrioRelayFleetNoHolder",
        "TrioRelayFleetRedisDown",
    ):
        assert severity[name] == "critical", name


def test_the_dashboard_is_importable_with_a_datasource_input_and_an_instance_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["id"] is None and dashboard["uid"] and dashboard["title"]  # importable anywhere
    [source] = dashboard["__inputs"]
    assert source == {**source, "name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["instance"]["type"] == "query" and variables["instance"]["multi"]
    assert all(v["datasource"] == datasource for v in variables.values())
    panels = list(dashboard_panels())
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    titles = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        titles.append(panel["title"].lower())
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource and target["refId"], panel["title"]
            # Every series is chosen by the variables: no panel shows relays the user filtered out.
            selectors = re.findall(r"\b(?:trio_relay_[a-z0-9_]+|up)\b(\{[^}]*\})?", target["expr"])
            assert selectors and all('instance=~"$instance"' in s for s in selectors), target["expr"]
    for wanted in (
        "upstream up", "upstream state", "last upstream message age", "updates in", "messages out",
        "clients", "client queue depth", "delivery latency", "conflated, dropped, slow clients closed",
        "reconnects and failovers", "history written and dropped", "history pending", "fleet holder",
        "fleet redis up",
    ):  # fmt: skip
        assert any(wanted in title for title in titles), f"no {wanted!r} panel"
    latency = next(p for p in panels if p["title"] == "Delivery latency")
    assert [t["expr"].split(",")[0] for t in latency["targets"]] == [
        "histogram_quantile(0.5",
        "histogram_quantile(0.99",
    ]
    assert all("trio_relay_delivery_latency_seconds_bucket" in t["expr"] for t in latency["targets"])


# ----------------------------------------------------------------------------- against a real relay


async def metrics_of(relay: Relay, http: httpx.AsyncClient) -> dict[str, list[dict[str, str]]]:
    response = await http.get(f"{relay.http_url}/metrics")
    assert response.status_code == 200
    return exported(response.text)


async def test_the_rules_and_the_dashboard_use_only_what_a_relay_exports(start_relay, http, tmp_path) -> None:
    # The tick history on, so that its metrics are there too.
    relay = await start_relay(history={"backend": "sqlite", "data_dir": str(tmp_path)})
    await wait_state(relay, "connected")
    samples = await metrics_of(relay, http)
    for queries in (rule_queries(), dashboard_queries()):
        names, matchers = used_selectors(queries)
        assert "trio_relay_upstream_up" in names  # the extraction found something to check
        local = {n for n in names if not n.startswith("trio_relay_fleet_")}
        assert_exported(samples, local, {m for m in matchers if m[0] in local})


async def test_the_fleet_metrics_used_are_exported_by_a_fleet_relay(start_relay, http, fleet_prefix) -> None:
    relay = await start_relay(
        engine={"backend": "redis", "prefix": fleet_prefix, "node_id": "a", "lock_ttl": 1.0, "demand_ttl": 1.0}
    )
    samples = await metrics_of(relay, http)
    for queries in (rule_queries(), dashboard_queries()):
        names, matchers = used_selectors(queries)
        fleet = {n for n in names if n.startswith("trio_relay_fleet_")}
        assert {"trio_relay_fleet_holder", "trio_relay_fleet_redis_up"} <= fleet
        assert_exported(samples, fleet, {m for m in matchers if m[0] in fleet})


# ----------------------------------------------------------------------------- a real Prometheus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fleet_role(relay: Relay) -> str:
    upstream = relay.upstream
    assert isinstance(upstream, FleetUpstream)
    return upstream.engine.role


def address(relay: Relay) -> str:
    return relay.http_url.split("://", 1)[1]


class NotReady(Exception):
    """Prometheus is still starting (it answers 503 until its storage is open)."""


class Prometheus:
    """A real Prometheus process scraping ``targets`` every second, with the shipped rules."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    async def get(self, http: httpx.AsyncClient, path: str, **params: str) -> Any:
        response = await http.get(f"{self.url}/api/v1/{path}", params=params)
        if response.status_code == 503:
            raise NotReady(response.text.strip())
        body = response.json()  # an invalid query is a 400 with a JSON error: it fails here
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    async def targets_down_or_up(self, http: httpx.AsyncClient) -> dict[str, tuple[str, str]]:
        """Each target's (health, lastError)."""
        targets = (await self.get(http, "targets"))["activeTargets"]
        return {t["labels"]["instance"]: (t["health"], t["lastError"]) for t in targets}

    async def rules_not_evaluated(self, http: httpx.AsyncClient) -> str | None:
        """None once every shipped rule is loaded and evaluated without error."""
        groups = (await self.get(http, "rules"))["groups"]
        rules = {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}
        if rules.keys() != {rule["alert"] for rule in alerting_rules()}:
            return f"rules loaded: {sorted(rules)}"
        bad = {name: state for name, state in rules.items() if state != ("ok", "")}
        return f"rules not (yet) evaluated cleanly: {bad}" if bad else None

    async def alerts(self, http: httpx.AsyncClient) -> list[tuple[str, dict[str, str], str]]:
        """The pending and firing alerts: (name, labels, state)."""
        return sorted(
            (
                (a["labels"].pop("alertname"), a["labels"], a["state"])
                for a in (await self.get(http, "alerts"))["alerts"]
            ),
            key=repr,
        )

    async def dashboard_not_answered(self, http: httpx.AsyncClient, *, fleet: bool) -> str | None:
        """None once every dashboard query returns series (the fleet's only when ``fleet``)."""
        for query in dashboard_queries():
            if query.startswith("label_values("):
                continue  # Grafana's own function (its metric names are checked above)
            result = (await self.get(http, "query", query=concrete(query)))["result"]
            if not result and (fleet or "trio_relay_fleet_" not in query):
                return f"no data yet for {concrete(query)}"
        return None

    async def until(self, what: str, check: Callable[[], Awaitable[str | None]]) -> None:
        """Poll ``check`` (None: satisfied; otherwise what is still missing) within PROMETHEUS_WAIT."""
        missing: str | None = "never checked"
        with trio.move_on_after(PROMETHEUS_WAIT):
            while True:
                try:
                    missing = await check()
                except httpx.TransportError as exc:
                    missing = f"Prometheus not answering ({exc!r})"
                except NotReady as exc:
                    missing = f"Prometheus not ready ({exc})"
                if missing is None:
                    return
                await trio.sleep(POLL_INTERVAL)
        tail = self.log.read_text(errors="replace").splitlines()[-15:]
        pytest.fail(f"{what}: not within {PROMETHEUS_WAIT:g}s: {missing}\nPrometheus log:\n" + "\n".join(tail))


@pytest.fixture
async def prometheus(
    nursery: trio.Nursery, tmp_path: Path, prometheus_binary: str
) -> AsyncIterator[Callable[..., Awaitable[Prometheus]]]:
    """``await prometheus(targets, labels)``: a real Prometheus in the test's nursery, killed at the end."""
    binary = prometheus_binary
    processes: list[trio.Process] = []

    async def start(targets: list[str], labels: dict[str, str] | None = None) -> Prometheus:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": JOB,
                            "metrics_path": "/metrics",
                            "static_configs": [{"targets": targets, "labels": labels or {}}],
                        }
                    ],
                }
            )
        )
        log = tmp_path / "prometheus.log"
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        with log.open("wb") as out:
            # check=False: it ends killed, which is not a failure.
            process = await nursery.start(partial(trio.run_process, command, check=False, stdout=out, stderr=out))
        processes.append(process)
        return Prometheus(f"http://127.0.0.1:{port}", log)

    yield start
    for process in processes:
        process.kill()


async def test_a_real_prometheus_scrapes_relays_and_runs_the_rules_and_the_dashboard(
    start_relay, fake_fmp, ws_connect, http, prometheus, tmp_path
) -> None:
    """Three relays: healthy (sim), refused (wrong FMP key), stalled (FMP logged in, sending nothing)."""
    good = await start_relay(history={"backend": "sqlite", "data_dir": str(tmp_path / "history")})
    sections = fmp_sections(fake_fmp)
    sections["fmp"]["api_key"] = "wrong-key-" + FMP_KEY[::-1]
    refused = await start_relay(**sections)
    stalled = await start_relay(**fmp_sections(fake_fmp, stale_after=1.0, backoff_initial=0.05, backoff_max=0.1))
    with trio.fail_after(10):
        await wait_state(good, "connected")
        await wait_state(refused, "auth_failed")
        client = await ws_connect(good)
        await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
        for _ in range(20):
            await client.recv()
        watcher = await ws_connect(stalled)
        await watcher.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await watcher.recv_until(lambda m: m.get("type") == "price_update")
        fake_fmp.stall()
        await wait_state(stalled, "stale")
    good_at, refused_at, stalled_at = address(good), address(refused), address(stalled)
    server = await prometheus([good_at, refused_at, stalled_at])

    async def targets_up() -> str | None:
        states = await server.targets_down_or_up(http)
        return (
            None
            if set(states) == {good_at, refused_at, stalled_at} and set(states.values()) == {("up", "")}
            else f"targets {states}"
        )

    await server.until("the relays scraped", targets_up)

    async def ingested() -> str | None:
        up = await server.get(http, "query", query="trio_relay_upstream_up")
        values = {s["metric"]["instance"]: s["value"][1] for s in up["result"]}
        if values != {good_at: "1", refused_at: "0", stalled_at: "0"}:
            return f"trio_relay_upstream_up {values}"
        out = await server.get(http, "query", query=f'trio_relay_messages_out_total{{instance="{good_at}"}} > 0')
        return None if out["result"] else "no messages_out counted yet"

    await server.until("the relays' series ingested", ingested)
    await server.until(
        "every shipped rule loaded and evaluated without error", partial(server.rules_not_evaluated, http)
    )

    async def raised_by(instance: str) -> set[str]:
        return {name for name, labels, _state in await server.alerts(http) if labels.get("instance") == instance}

    async def alerts_raised() -> str | None:
        by = {at: await raised_by(at) for at in (good_at, refused_at, stalled_at)}
        if "TrioRelayUpstreamAuthFailed" not in by[refused_at] or "TrioRelayUpstreamStale" not in by[stalled_at]:
            return f"alerts {by}"
        # The refused key is that alert's alone (not also "upstream down"); the healthy relay raises nothing.
        assert by[refused_at] == {"TrioRelayUpstreamAuthFailed"} and not by[good_at], by
        assert by[stalled_at] <= {"TrioRelayUpstreamStale", "TrioRelayUpstreamDown"}, by
        return None

    await server.until("AuthFailed raised for the refused key, Stale for the stalled feed", alerts_raised)
    await server.until("every dashboard query answered", partial(server.dashboard_not_answered, http, fleet=False))

    # Data flows again: the stalled relay's alerts end at the first fresh scrape (not 5 minutes later).
    fake_fmp.resume()

    async def stalled_quiet() -> str | None:
        # (TrioRelayUpstreamFlapping may now rightly follow: it reconnected every second while stalled.)
        raised = await raised_by(stalled_at) & {"TrioRelayUpstreamStale", "TrioRelayUpstreamDown"}
        return f"alerts {raised}" if raised else None

    await server.until("the stalled relay's alerts over once data flows", stalled_quiet)


async def test_a_real_prometheus_watches_a_fleet_until_it_has_no_holder(
    start_relay, fleet_prefix, http, prometheus, tmp_path
) -> None:
    engine = {"backend": "redis", "prefix": fleet_prefix, "lock_ttl": 1.0, "demand_ttl": 1.0}
    relays = [
        await start_relay(
            engine={**engine, "node_id": node}, history={"backend": "sqlite", "data_dir": str(tmp_path / node)}
        )
        for node in "ab"
    ]
    with trio.fail_after(10):
        while not any(fleet_role(relay) == "holder" for relay in relays):
            await trio.sleep(POLL_INTERVAL)  # the election runs on Redis's clock
    instances = [address(relay) for relay in relays]
    server = await prometheus(instances, {"fleet": fleet_prefix})
    fleet = {"job": JOB, "fleet": fleet_prefix}

    async def one_holder() -> str | None:
        if set((await server.targets_down_or_up(http)).values()) != {("up", "")}:
            return "targets not up"
        held = (await server.get(http, "query", query="max without (instance) (trio_relay_fleet_holder)"))["result"]
        return None if [(s["metric"], s["value"][1]) for s in held] == [(fleet, "1")] else f"holder {held}"

    await server.until("the fleet and its holder ingested", one_holder)
    await server.until("every shipped rule evaluated without error", partial(server.rules_not_evaluated, http))
    await server.until(
        "every dashboard query answered, the fleet's too", partial(server.dashboard_not_answered, http, fleet=True)
    )

    async def quiet() -> str | None:
        # Until both relays' first scrapes are in, the follower alone (holder 0) can make
        # TrioRelayFleetNoHolder pending for an evaluation or two; a healthy fleet then settles
        # with nothing raised (and `for: 1m` keeps such a moment from ever firing).
        alerts = await server.alerts(http)
        return f"alerts {alerts}" if alerts else None

    await server.until("a healthy fleet raising nothing", quiet)

    # Every relay of the fleet gone: their series go stale, and no relay holds the upstream.
    for relay in relays:
        relay.shutdown()

    async def gone() -> str | None:
        if set((await server.targets_down_or_up(http)).values()) & {("up", "")}:
            return "a relay is still scraped"
        held = (await server.get(http, "query", query="trio_relay_fleet_holder"))["result"]
        return f"series not stale yet: {held}" if held else None

    await server.until("the fleet's relays gone and their series stale", gone)
    # The rule's own expression, now: it must see the fleet that vanished (a plain
    # "max(holder) == 0" sees nothing once the series are stale).
    [rule] = [r for r in alerting_rules() if r["alert"] == "TrioRelayFleetNoHolder"]
    result = (await server.get(http, "query", query=rule["expr"]))["result"]
    assert [s["metric"] for s in result] == [fleet]

    async def no_holder() -> str | None:
        alerts = await server.alerts(http)
        return (
            None
            if ("TrioRelayFleetNoHolder", {**fleet, "severity": "critical"}) in [a[:2] for a in alerts]
            else f"alerts {alerts}"
        )

    await server.until("TrioRelayFleetNoHolder raised for the vanished fleet", no_holder)
