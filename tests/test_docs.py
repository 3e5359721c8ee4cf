"""The documentation is tested, so that it cannot rot.

- ``GET /openapi.json`` from the real app: a structurally valid OpenAPI 3.1 document that lists
  every route the app serves (compared with the app's ``url_map``: a new route without a
  docstring, or an API route without a documented response schema, fails here), and whose
  schemas match what the routes really send (live bodies decoded with unknown fields forbidden).
- Examples run against a real relay: ``docs/examples/python_client.py`` (as a program, and in
  process through a forced disconnect that it must resume from), every ```` ```python ```` block
  of ``docs/*.md`` marked ``<!-- test -->``, every marked ``curl`` example (the same request
  made with httpx; the documented status, headers and fields checked), and the JavaScript
  client under Node when Node is installed (``node --check`` for every ``.js`` file).
- Every error code and close code the code can send is in the API guide; the configuration
  reference lists every key of ``config/trio-relay.toml`` with its real default.
- Relative links between the docs resolve, anchors included.

Markers, on the line before a fenced block: ``<!-- test -->``; ``<!-- test: auth -->`` (run
against a relay with auth on; ``$TOKEN`` and ``$ADMIN_TOKEN`` are replaced by real tokens);
``<!-- test: expect="text" -->`` (a Python block's output must contain the text). The docs use
``127.0.0.1:8000``; the tests replace it with the test relay's address.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import httpx
import jwt
import msgspec
import pytest
import trio
import trio.testing
from conftest import api, fmp_sections, wait_cached, wait_state

from trio_relay.api.app import RelayContext
from trio_relay.api.openapi import ENDPOINTS, OPENAPI_PATH
from trio_relay.api.rest import PREFIX, create_rest_app
from trio_relay.api.ws import WS_PATH
from trio_relay.config import Config
from trio_relay.daemon import Relay
from trio_relay.model import PriceState

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
JS_CLIENT = ROOT / "trio_relay" / "web" / "client" / "relay-client.js"  # the official client
DOC_BASE = "127.0.0.1:8000"
SECRET = "docs-test-secret-0123456789abcdef-XYZ"
TIMEOUT = 10
JSON = {"Content-Type": "application/json"}  # the relay refuses REST writes of any other type (415)


# ----------------------------------------------------------------------------- markdown


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    marker: list[str] | None  # the options of a <!-- test --> marker; None: not marked
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^\s*```(\S*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*test(?::\s*(.*?))?\s*-->\s*$")


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the test marker before each, if any."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    marker: list[str] | None = None
    while i < len(lines):
        m = _MARKER.match(lines[i])
        if m:
            marker = shlex.split(m.group(1) or "")
            i += 1
            continue
        fence = _FENCE.match(lines[i])
        if fence:
            start, body = i + 1, []
            indent = len(lines[i]) - len(lines[i].lstrip())
            i += 1
            while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
                body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
                i += 1
            options = {}
            for word in marker or []:
                key, _, value = word.partition("=")
                options[key] = value
            found.append(Block(path, start, fence.group(1), "\n".join(body) + "\n", marker, options))
            marker = None
        elif lines[i].strip():
            marker = None
        i += 1
    return found


def doc_files() -> list[Path]:
    """The README and every page under docs/."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def marked(lang: str) -> list[Block]:
    return [b for p in doc_files() for b in blocks(p) if b.marker is not None and b.lang == lang]


def localize(text: str, relay: Relay) -> str:
    """The docs' 127.0.0.1:8000 (or localhost:8000) replaced by the test relay's address."""
    host = relay.http_url.split("://", 1)[1]
    return text.replace(DOC_BASE, host).replace("localhost:8000", host)


async def start_docs_relay(start_relay: Any, **sections: Any) -> Relay:
    """A relay with AAPL and MSFT pinned and cached (the examples' symbols)."""
    upstream = sections.pop("upstream", {})
    relay: Relay = await start_relay(upstream={"pinned": ["AAPL", "MSFT"], **upstream}, **sections)
    with trio.fail_after(TIMEOUT):
        await wait_cached(relay, "AAPL")
        await wait_cached(relay, "MSFT")
    return relay


def rest_app_of(relay: Relay) -> Any:
    """A REST app built by the same factory, from the running relay's parts (for its url_map)."""
    assert relay.security is not None
    ctx = RelayContext(
        hub=relay.hub, engine=relay.engine, config=relay.config, started_at=time.time(), security=relay.security
    )
    return create_rest_app(ctx)


def served_operations(app: Any) -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every route the app really serves."""
    ops = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" and not app.has_static_folder:
            continue  # Quart's static route without a folder can only answer 404
        path = re.sub(r"<(?:[^<>:]+:)?([^<>:]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method == "HEAD" or (method == "OPTIONS" and rule.provide_automatic_options):
                continue
            ops.add((path, method.lower()))
    return ops


def tokens() -> dict[str, str]:
    now = int(time.time())
    user = jwt.encode({"sub": "alice", "exp": now + 600}, SECRET, algorithm="HS256")
    admin = jwt.encode({"sub": "root", "exp": now + 600, "scope": "relay:admin"}, SECRET, algorithm="HS256")
    return {"$ADMIN_TOKEN": admin, "$TOKEN": user}


# ----------------------------------------------------------------------------- OpenAPI


def check_openapi_structure(doc: dict[str, Any]) -> None:
    """The parts of OpenAPI 3.1 a viewer or a generator relies on."""
    assert doc["openapi"].startswith("3.1."), doc["openapi"]
    assert doc["info"]["title"] and doc["info"]["version"]
    schemas = doc["components"]["schemas"]
    declared_tags = {t["name"] for t in doc.get("tags", [])}
    operation_ids: set[str] = set()
    refs: list[str] = []

    def collect_refs(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                collect_refs(value)
        elif isinstance(node, list):
            for value in node:
                collect_refs(value)

    for path, item in doc["paths"].items():
        assert path.startswith("/"), path
        for method, op in item.items():
            assert method in {"get", "put", "post", "delete", "options", "head", "patch", "trace"}, method
            where = f"{method.upper()} {path}"
            assert op["operationId"] not in operation_ids, f"duplicate operationId {op['operationId']}"
            operation_ids.add(op["operationId"])
            assert op["responses"], f"{where}: no response"
            for code, response in op["responses"].items():
                assert code == "default" or re.fullmatch(r"[1-5]\d\d", code), f"{where}: response {code}"
                assert isinstance(response.get("description"), str), f"{where} {code}: no description"
            in_path = set(re.findall(r"{([^}]+)}", path))
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert in_path == declared, f"{where}: path parameters {in_path} declared {declared}"
            for p in op.get("parameters", []):
                assert p["in"] in {"path", "query", "header", "cookie"} and "schema" in p
                assert p["in"] != "path" or p["required"] is True
            assert set(op.get("tags", [])) <= declared_tags, f"{where}: undeclared tag"
            for requirement in op.get("security", []):
                assert set(requirement) <= set(doc["components"].get("securitySchemes", {}))
    collect_refs(doc)
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, f"dangling $ref {ref}"


def validate_if_available(doc: dict[str, Any]) -> None:
    """The full OpenAPI 3.1 meta-schema check, when openapi-spec-validator is installed.

    It is not a dependency (it pulls in pydantic and jsonschema): without it the structural
    checks of :func:`check_openapi_structure` stand in.
    """
    try:
        from openapi_spec_validator import validate
    except ImportError:
        return
    validate(doc)


async def test_openapi_document_lists_every_route_with_schemas(start_relay: Any, http: httpx.AsyncClient) -> None:
    relay = await start_relay()
    with trio.fail_after(TIMEOUT):
        response = await http.get(relay.http_url + OPENAPI_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    check_openapi_structure(doc)

    app = rest_app_of(relay)
    served = served_operations(app)
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    missing = served - documented
    assert not missing, f"served but not in /openapi.json: {sorted(missing)}"
    phantom = documented - served - {(WS_PATH, "get")}
    assert not phantom, f"in /openapi.json but not served: {sorted(phantom)}"
    assert (OPENAPI_PATH, "get") in served

    for path, method in sorted(served):
        op = doc["paths"][path][method]
        assert op.get("summary"), (
            f"{method.upper()} {path} has no summary: give its view a docstring (see docs/openapi.md)"
        )
        if path.startswith(PREFIX) or path in ("/metrics", OPENAPI_PATH):
            ok = op["responses"].get("200", {})
            schemas = [media.get("schema") for media in ok.get("content", {}).values()]
            assert schemas and all(schemas), (
                f"{method.upper()} {path}: no documented 200 body: add it to ENDPOINTS in trio_relay/api/openapi.py"
            )

    schemas = doc["components"]["schemas"]
    for name in ("PriceState", "ErrorBody", "Health", "Live", "Status", "CacheBody", "Subscribed", "Unsubscribed"):
        assert name in schemas, name
    assert set(schemas["PriceState"]["properties"]) == set(PriceState.__struct_fields__)
    cache_one = doc["paths"][PREFIX + "/cache/{symbol}"]["get"]
    assert cache_one["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PriceState"
    }
    assert cache_one["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    subscribe = doc["paths"][PREFIX + "/subscribe"]["post"]
    assert "requestBody" in subscribe and "429" in subscribe["responses"]
    # Auth is off: no operation asks for a token; open routes say so explicitly.
    assert all(not op.get("security") for item in doc["paths"].values() for op in item.values())
    assert doc["paths"][WS_PATH]["get"]["x-websocket"] is True
    validate_if_available(doc)


async def test_openapi_follows_auth_and_stays_public(start_relay: Any, http: httpx.AsyncClient) -> None:
    relay = await start_relay(auth={"enabled": True, "secret": SECRET})
    with trio.fail_after(TIMEOUT):
        response = await http.get(relay.http_url + OPENAPI_PATH)  # no token
    assert response.status_code == 200
    doc = response.json()
    check_openapi_structure(doc)
    paths = doc["paths"]
    assert paths[PREFIX + "/status"]["get"]["security"] == [{"bearerAuth": ["relay:admin"]}]
    assert {"401", "403", "429"} <= set(paths[PREFIX + "/subscribe"]["post"]["responses"])
    assert paths[PREFIX + "/cache"]["get"]["security"] == [{"bearerAuth": []}]
    assert "403" in paths[PREFIX + "/cache/{symbol}"]["get"]["responses"]  # forbidden_symbols
    for open_path in (PREFIX + "/health", PREFIX + "/health/live", "/metrics", OPENAPI_PATH):
        assert paths[open_path]["get"]["security"] == [], open_path
        assert "401" not in paths[open_path]["get"]["responses"]
    validate_if_available(doc)


def _documented_type(endpoint: str, status: int) -> Any:
    reply = ENDPOINTS[endpoint].responses.get(status)
    assert reply is not None, f"{endpoint} answered {status}, which ENDPOINTS does not document"
    return reply.body


def _check_body(endpoint: str, status: int, body: Any) -> None:
    kind = _documented_type(endpoint, status)
    converted = msgspec.convert(body, kind)  # the Structs forbid unknown fields
    if kind is PriceState:
        assert set(body) == set(PriceState.__struct_fields__)
    assert converted is not None


async def test_live_responses_match_the_documented_types(
    start_relay: Any, fake_fmp: Any, http: httpx.AsyncClient, ws_connect: Any
) -> None:
    # Two providers, so that the failover blocks of /health and /status are there too.
    sections = fmp_sections(fake_fmp, providers=["fmp", "sim"], pinned=["AAPL", "MSFT"])
    relay = await start_relay(**sections)
    client = await ws_connect(relay, "?batch=1")
    with trio.fail_after(TIMEOUT):
        await wait_cached(relay, "AAPL")
        await client.send({"action": "subscribe", "symbols": ["AAPL"]})
        await client.recv()
        app = rest_app_of(relay)
        checked = set()
        for rule in app.url_map.iter_rules():
            endpoint = rule.endpoint
            if not rule.rule.startswith(PREFIX) or endpoint not in ENDPOINTS:
                continue
            url = relay.http_url + rule.rule.replace("<symbol>", "aapl").replace("<name>", "main")
            methods = rule.methods or set()
            if "POST" in methods:
                response = await http.post(url, content=b'["AAPL","MSFT"]', headers=JSON)
            elif "GET" in methods:
                response = await http.get(url)
            elif "PUT" in methods:
                response = await http.put(url, content=b'{"quantity":1,"cost_basis":1}', headers=JSON)
            else:
                response = await http.delete(url)
            _check_body(endpoint, response.status_code, response.json())
            checked.add(endpoint)
        response = await http.get(api(relay, "/cache/NOPE"))
        _check_body("cache_one", response.status_code, response.json())
        health = (await http.get(api(relay, "/health"))).json()
    assert "failover" in health
    assert {"health", "ready", "live", "status", "subscribe", "unsubscribe", "cache_all", "cache_one"} <= checked


async def test_health_503_body_matches_its_type(
    start_relay: Any, fake_fmp: Any, http: httpx.AsyncClient, ws_connect: Any
) -> None:
    """The 503 body is its type and what the docs show (blocks marked ``health-503``); a client
    that subscribes while the upstream has never got in is told so at once (as the FAQ says)."""
    sections = fmp_sections(fake_fmp)
    sections["fmp"]["api_key"] = "a-wrong-key-0123456789"
    relay = await start_relay(**sections)
    with trio.fail_after(TIMEOUT):
        await wait_state(relay, "auth_failed")
        response = await http.get(api(relay, "/health"))
        client = await ws_connect(relay)
        await client.send({"action": "subscribe", "symbols": ["AAPL"]})
        status, _ = await client.recv_until(lambda m: m.get("type") == "status")
    assert response.status_code == 503
    _check_body("health", 503, response.json())
    assert response.json()["code"] == "auth_failed"
    assert status["scope"] == "upstream" and status["state"] == "down" and status["symbols"] == ["AAPL"]
    shown = [(b, json_lines(b.code)) for b, _ in ws_blocks("health-503")]
    assert len(shown) >= 2
    for block, bodies in shown:
        for body in bodies:
            assert_same_shape(body, response.json(), str(block))


# ----------------------------------------------------------------------------- shapes

# Fields whose documented value is compared, not only its type: they name what a body is.
_NAMING = ("status", "error", "type", "openapi", "code", "channel")


def shape_differences(shown: Any, actual: Any, path: str = "$") -> list[str]:
    """How ``actual`` differs in shape from the documented example ``shown``; [] if it does not.

    Objects must have the same field names (all of them: a field added, renamed or removed is a
    difference), unless the example has a ``"..."`` key (then its fields must exist). Values must
    have the same JSON type (a null on either side matches: the field is nullable; integers and
    floats are both numbers); a list is compared element by element with the example's first
    element; a ``"..."`` value matches anything. The values of :data:`_NAMING` fields must be
    equal. Other values (prices, times, ids) are volatile and not compared.
    """
    if shown == "..." or shown is None or actual is None:
        return []
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{path}: documented an object, got {type(actual).__name__}"]
        found = []
        documented = set(shown) - {"..."}
        missing = documented - set(actual)
        if missing:
            found.append(f"{path}: documented fields not in the response: {sorted(missing)}")
        extra = set(actual) - documented
        if extra and "..." not in shown:
            found.append(f"{path}: fields in the response that the docs do not show: {sorted(extra)}")
        for key in sorted(documented & set(actual)):
            if key in _NAMING and isinstance(shown[key], str) and shown[key] != "...":
                if actual[key] != shown[key]:
                    found.append(f"{path}.{key}: documented {shown[key]!r}, got {actual[key]!r}")
                continue
            found += shape_differences(shown[key], actual[key], f"{path}.{key}")
        return found
    if isinstance(shown, list):
        if not isinstance(actual, list):
            return [f"{path}: documented a list, got {type(actual).__name__}"]
        if not shown:
            return []
        return [d for i, item in enumerate(actual[:5]) for d in shape_differences(shown[0], item, f"{path}[{i}]")]
    kinds = {bool: "boolean", int: "number", float: "number", str: "string"}
    if kinds.get(type(shown)) != kinds.get(type(actual)):
        return [f"{path}: documented a {kinds.get(type(shown))} ({shown!r}), got {actual!r}"]
    return []


def assert_same_shape(shown: Any, actual: Any, where: str) -> None:
    differences = shape_differences(shown, actual)
    assert not differences, f"{where}: the documented example differs from the real response:\n" + "\n".join(
        differences
    )


def test_the_shape_check_sees_a_changed_shape() -> None:
    """The doc tests below fail when a response changes shape, not when its values move."""
    doc = {"type": "price_update", "symbol": "AAPL", "last_price": 277.45, "seq": 42, "ticks": [{"a": 1}]}
    same = {"type": "price_update", "symbol": "MSFT", "last_price": 480, "seq": 7, "ticks": [{"a": 2}, {"a": 3}]}
    assert shape_differences(doc, same) == []
    assert shape_differences(doc, {**same, "new_field": 1})  # a field the docs do not show
    assert shape_differences(doc, {k: v for k, v in same.items() if k != "seq"})  # a field gone
    assert shape_differences(doc, {**same, "seq": "42"})  # a number became a string
    assert shape_differences(doc, {**same, "type": "quote"})  # a message renamed
    assert shape_differences(doc, {**same, "ticks": [{"b": 2}]})  # inside a list
    assert shape_differences({**doc, "...": "..."}, {**same, "new_field": 1}) == []  # "...": more may come
    assert shape_differences(doc, {**same, "last_price": None}) == []  # nullable


# ----------------------------------------------------------------------------- curl examples


@dataclass
class Exchange:
    block: Block
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    status: int
    response_headers: dict[str, str]
    response_body: str


def curl_examples(auth: bool) -> list[Exchange]:
    """Every marked ``curl`` block and the ``http`` block that follows it, in document order."""
    found = []
    for path in doc_files():
        all_blocks = blocks(path)
        for i, block in enumerate(all_blocks):
            if block.lang != "sh" or block.marker is None or ("auth" in block.options) != auth:
                continue
            if "ws" in block.options:
                continue  # a WebSocket example (below)
            if "runs" in block.options:
                found.extend(runnable_curls(block))
                continue
            follows = all_blocks[i + 1] if i + 1 < len(all_blocks) else None
            assert follows is not None and follows.lang in ("http", "json"), f"{block}: no ```http or ```json follows"
            # A ```json block after a curl is the body of a 200 response.
            response = follows.code if follows.lang == "http" else "HTTP/1.1 200 OK\n\n" + follows.code
            found.append(parse_exchange(block, response))
    return found


def runnable_curls(block: Block) -> list[Exchange]:
    """The curl commands of a block marked ``runs`` (no response shown): each must succeed (2xx).

    One command per line (``\\`` continues a line); a ``# comment``, a pipe or a redirection
    ends the command.
    """
    found = []
    for command in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(command, comments=True)
        if not words or words[0] != "curl":
            continue
        cut = next((i for i, w in enumerate(words) if w in ("|", ">", ">>")), len(words))
        one = Block(block.path, block.line, "sh", shlex.join(words[:cut]), block.marker)
        exchange = parse_exchange(one, "HTTP/1.1 200 OK\n\n")
        exchange.status = 0  # any 2xx
        found.append(exchange)
    assert found, f"{block}: no curl command"
    return found


def parse_exchange(block: Block, http_text: str) -> Exchange:
    command = " ".join(line.rstrip("\\") for line in block.code.strip().splitlines())
    words = shlex.split(command)
    assert words[0] == "curl", f"{block}: a marked sh block must be one curl command"
    method, url, body, headers = "", "", None, {}
    it = iter(words[1:])
    for word in it:
        if word in ("-X", "--request"):
            method = next(it)
        elif word in ("-d", "--data", "--data-raw"):
            body = next(it).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")  # as curl does
        elif word in ("-H", "--header"):
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif word.startswith("-"):
            continue  # -s, -i, -S...
        else:
            url = word if "://" in word else "http://" + word
    head, _, response_body = http_text.partition("\n\n")
    status_line, *header_lines = head.splitlines()
    status = int(status_line.split()[1])
    response_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    method = method or ("POST" if body else "GET")
    return Exchange(block, method, url, headers, body, status, response_headers, response_body.strip())


async def run_exchange(exchange: Exchange, relay: Relay, http: httpx.AsyncClient, secrets: dict[str, str]) -> None:
    where = str(exchange.block)

    def real(text: str) -> str:
        text = localize(text, relay)
        for name, value in secrets.items():
            text = text.replace(name, value)
        return text

    response = await http.request(
        exchange.method,
        real(exchange.url),
        headers={k: real(v) for k, v in exchange.headers.items()},
        content=exchange.body,
    )
    if exchange.status == 0:  # a command shown without its response: it must succeed
        assert 200 <= response.status_code < 300, f"{where}: {exchange.url} got {response.status_code}"
        return
    assert response.status_code == exchange.status, f"{where}: documented {exchange.status}, got {response.status_code}"
    for name, value in exchange.response_headers.items():
        actual = response.headers.get(name)
        assert actual is not None, f"{where}: no {name} header"
        if name == "content-type":
            assert actual.split(";")[0] == value.split(";")[0], f"{where}: content-type {actual}"
        else:
            assert actual == value, f"{where}: {name}: {actual}"
    documented = exchange.response_body
    try:
        shown = json.loads(documented)
    except ValueError:
        for line in documented.splitlines():  # text (metrics): the documented lines exist
            if line.startswith("#"):
                assert line in response.text, f"{where}: {line!r} not in the response"
        return
    actual_body = response.json()
    assert isinstance(shown, dict) and isinstance(actual_body, dict), where
    assert_same_shape(shown, actual_body, where)


async def run_all(examples: list[Exchange], relay: Relay, http: httpx.AsyncClient, secrets: dict[str, str]) -> None:
    """Every example, in order; every difference reported at once."""
    failures = []
    with trio.fail_after(TIMEOUT * 3):
        for exchange in examples:
            try:
                await run_exchange(exchange, relay, http, secrets)
            except AssertionError as exc:
                failures.append(str(exc).split("\nassert")[0])
    assert not failures, "\n\n".join(failures)


async def wait_history(relay: Relay, http: httpx.AsyncClient, symbol: str) -> None:
    """Until the tick history has ticks and a trade of ``symbol`` (the history examples show some)."""
    with trio.fail_after(TIMEOUT):
        while True:
            body = (await http.get(api(relay, f"/history/{symbol}?start=-5m&limit=1000"))).json()
            if any(t["kind"] == "T" for t in body["ticks"]):
                return
            assert relay.history_writer is not None
            await relay.history_writer.changed()  # its next write, not a timer


async def test_curl_examples(start_relay: Any, http: httpx.AsyncClient, tmp_path: Path) -> None:
    examples = curl_examples(auth=False)
    assert len(examples) >= 10
    relay = await start_docs_relay(
        start_relay,
        history={"backend": "sqlite", "data_dir": str(tmp_path / "history")},
        alerts={"enabled": True, "data_dir": str(tmp_path / "app")},
    )
    await wait_history(relay, http, "AAPL")
    await run_all(examples, relay, http, {})


async def test_curl_examples_with_auth_on(start_relay: Any, http: httpx.AsyncClient) -> None:
    examples = curl_examples(auth=True)
    assert examples
    relay = await start_relay(auth={"enabled": True, "secret": SECRET})
    await run_all(examples, relay, http, tokens())


# ----------------------------------------------------------------------------- Python examples


async def run_python(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT):
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [sys.executable, *args], capture_stdout=True, capture_stderr=True, check=False, cwd=cwd
        )
    assert result.returncode == 0, f"{args} failed:\n{result.stderr.decode(errors='replace')[-3000:]}"
    return result


PYTHON_BLOCKS = marked("python")


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[str(b) for b in PYTHON_BLOCKS])
async def test_python_blocks_in_the_docs_run(block: Block, start_relay: Any, tmp_path: Path) -> None:
    relay = await start_docs_relay(start_relay)
    script = tmp_path / "example.py"
    script.write_text(localize(block.code, relay))
    result = await run_python([str(script)], cwd=tmp_path)
    out = result.stdout.decode()
    assert out.strip(), f"{block}: printed nothing"
    if "expect" in block.options:
        assert block.options["expect"] in out, f"{block}: {block.options['expect']!r} not in its output:\n{out}"


def test_there_are_runnable_python_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 2
    for block in PYTHON_BLOCKS:
        compile(block.code, str(block), "exec")


async def test_python_client_example_runs_as_a_program(start_relay: Any) -> None:
    relay = await start_docs_relay(start_relay)
    result = await run_python(
        [str(EXAMPLES / "python_client.py"), "--url", relay.ws_url, "--symbols", "aapl,MSFT", "--count", "6", "--batch"]
    )
    messages = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert messages[0]["type"] == "subscribed" and messages[0]["symbols"] == ["AAPL", "MSFT"]
    assert set(messages[0]["prev_close"]) == {"AAPL", "MSFT"}  # the simulated market knows them
    prices = [m for m in messages if m["type"] == "price_update"]
    assert len(prices) == 6 and {p["symbol"] for p in prices} <= {"AAPL", "MSFT"}


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_no_gap(prices: list[dict[str, Any]]) -> None:
    """Each symbol's seq goes up by exactly one: nothing missed, nothing repeated."""
    last: dict[str, int] = {}
    for p in prices:
        if p["symbol"] in last:
            assert p["seq"] == last[p["symbol"]] + 1, f"{p['symbol']}: seq {last[p['symbol']]} then {p['seq']}"
        last[p["symbol"]] = p["seq"]


async def test_python_client_example_resumes_after_a_disconnect(
    start_relay: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = await start_docs_relay(start_relay)
    example = load_example("python_client")
    monkeypatch.setattr(example, "reconnect_delay", lambda *args: 0.0)  # no real wait in a test
    feed = example.PriceFeed(relay.ws_url, ["AAPL", "MSFT"])
    messages: list[dict[str, Any]] = []
    three = trio.Event()

    def on_message(msg: dict[str, Any]) -> None:
        messages.append(msg)
        if sum(m["type"] == "price_update" for m in messages) == 3:
            three.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed.run, on_message, 12)
            await three.wait()
            relay.hub.close_all()  # a restart: a "closing" notice, then 1001
    kinds = [m["type"] for m in messages]
    assert {"type": "disconnected", "code": 1001, "reason": "server shutting down"} in messages
    acks = [m for m in messages if m["type"] == "subscribed"]
    assert len(acks) == 2 and acks[1]["recovered"] is True, acks
    assert kinds.index("disconnected") < messages.index(acks[1])
    assert feed.connections == 2
    assert_no_gap([m for m in messages if m["type"] == "price_update"])


# ----------------------------------------------------------------------------- JavaScript


def node_command() -> list[str] | None:
    """``node`` (with the flag Node 20 needs for WebSocket), or None when Node is missing."""
    node = shutil.which("node")
    if node is None:
        return None
    return [node]


def require_node() -> list[str]:
    node = node_command()
    if node is None:
        pytest.skip("node is not installed: the JavaScript examples are not checked (install Node >= 20)")
    return node


def js_sources(tmp_path: Path) -> Iterator[Path]:
    yield from sorted(EXAMPLES.glob("*.js"))
    yield from sorted(EXAMPLES.glob("*.mjs"))
    html = (EXAMPLES / "index.html").read_text()
    for i, script in enumerate(re.findall(r'<script type="module">(.*?)</script>', html, re.S)):
        path = tmp_path / f"index-html-{i}.mjs"
        path.write_text(script)
        yield path
    for i, block in enumerate(b for p in doc_files() for b in blocks(p) if b.lang in ("js", "javascript")):
        path = tmp_path / f"doc-block-{i}.js"  # browser console snippets: plain scripts
        path.write_text(block.code)
        yield path


async def test_javascript_examples_parse(tmp_path: Path) -> None:
    node = require_node()
    sources = list(js_sources(tmp_path))
    assert len(sources) >= 5
    failures: list[str] = []

    async def check(source: Path) -> None:
        result = await trio.run_process([*node, "--check", str(source)], capture_stderr=True, check=False)
        if result.returncode != 0:
            failures.append(f"{source.name}: {result.stderr.decode()}")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:  # Node takes a while to start: all at once
            for source in sources:
                nursery.start_soon(check, source)
    assert not failures, "\n".join(failures)


async def node_with_websocket(node: list[str]) -> list[str] | None:
    for flags in (["--experimental-websocket"], []):  # Node 20 needs the flag; later ones have WebSocket
        probe = await trio.run_process(
            [*node, *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
            capture_stderr=True,
            check=False,
        )
        if probe.returncode == 0:
            return [*node, *flags]
    return None


DRIVER = """
import { RelayClient } from %s;
const [url, count] = [process.argv[2], Number(process.argv[3])];
let prices = 0;
const client = new RelayClient(url, {
  message: (m) => console.log(JSON.stringify(m)),
  state: () => console.log(JSON.stringify({ type: "state", state: client.state, detail: client.detail })),
  update: () => { if (++prices >= count) client.stop(); },
}, { backoffInitialMs: 1 });
client.add(["AAPL", "MSFT"]);
client.start();
"""


async def test_javascript_client_resumes_under_node(start_relay: Any, tmp_path: Path) -> None:
    node = require_node()
    with trio.fail_after(TIMEOUT):
        command = await node_with_websocket(node)
    if command is None:
        pytest.skip("this Node has no WebSocket (Node >= 22, or 20 with --experimental-websocket)")
    relay = await start_docs_relay(start_relay)
    driver = tmp_path / "driver.mjs"
    driver.write_text(DRIVER % json.dumps(JS_CLIENT.as_uri()))
    messages: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                partial(
                    trio.run_process, [*command, str(driver), relay.ws_url, "12"], stdout=subprocess.PIPE, check=False
                )
            )
            buffer = b""
            closed = False
            while True:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                messages.extend(json.loads(line) for line in lines if line.strip())
                if not closed and sum(m["type"] == "price_update" for m in messages) >= 3:
                    relay.hub.close_all(4008, "slow consumer")  # no notice: the client's own backoff
                    closed = True
        assert process.returncode == 0
    states = [m for m in messages if m["type"] == "state"]
    assert {"type": "state", "state": "reconnecting", "detail": "slow consumer"} in states
    acks = [m for m in messages if m["type"] == "subscribed"]
    assert len(acks) == 2 and acks[1]["recovered"] is True, acks
    prices = [m for m in messages if m["type"] == "price_update"]
    assert len(prices) >= 12
    assert_no_gap(prices)


def test_html_example_is_self_contained() -> None:
    html = (EXAMPLES / "index.html").read_text()
    assert "<script src" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html), "the page must load nothing from another site"
    assert re.search(r'http-equiv="Content-Security-Policy"\s+content="default-src \'none\'', html)
    for hook in ('id="url"', 'id="symbols"', 'id="connect"', 'id="state"', 'id="prices"', 'id="log"'):
        assert hook in html, hook


# ----------------------------------------------------------------------------- completeness


API_GUIDE = DOCS / "api.md"


def _source(name: str) -> str:
    return (ROOT / "trio_relay" / name).read_text()


def test_every_error_code_is_documented() -> None:
    # The client protocol: its parsers, the sessions applying it, the transports' refusals.
    ws = "".join(_source(f"api/{n}.py") for n in ("ws", "sse", "protocol", "sessions"))
    ws += _source("hub/delivery.py")
    hub, rest, app = _source("hub/core.py"), _source("api/rest.py"), _source("api/app.py")
    codes = set()
    codes |= set(re.findall(r'ProtocolError\(\s*"(\w+)"', ws))
    codes |= set(re.findall(r'(?:_error|\.error)\(\s*client,\s*"(\w+)"', ws))
    codes |= set(re.findall(r'code="(\w+)"', ws))
    codes |= set(re.findall(r'reject\(\s*stream,\s*\d+,\s*"(\w+)"', ws))
    codes |= set(re.findall(r'OptionsError\(\s*"(\w+)"', ws))
    codes |= set(re.findall(r'SubscriptionError\(\s*"(\w+)"', hub))
    routes = rest + "".join(_source(f"api/{n}_routes.py") for n in ("health", "pin", "cache", "alert", "portfolio"))
    codes |= set(re.findall(r'(?:_error|error_response)\(\s*\d+,\s*"(\w+)"', routes))
    codes |= set(re.findall(r'"error":"(\w+)"', app))
    codes |= set(re.findall(r'EntitlementError\(\s*\d+,\s*"(\w+)"', _source("entitlements.py")))
    codes |= set(re.findall(r'(?:_busy|error_response)\(\s*(?:\d+,\s*)?"(\w+)"', _source("api/history_routes.py")))
    expected_ws = {
        "invalid_json", "invalid_message", "missing_field", "unknown_action", "invalid_symbols", "too_many_symbols",
        "symbol_limit", "invalid_since", "unauthenticated", "unauthorized", "forbidden_symbols", "token_expired",
        "rate_limited", "too_many_connections",
    }  # fmt: skip
    assert expected_ws <= codes, f"the extraction missed {expected_ws - codes}"
    guide = API_GUIDE.read_text()
    undocumented = {c for c in codes if f"`{c}`" not in guide}
    assert not undocumented, f"error codes missing from docs/api.md: {sorted(undocumented)}"


def test_every_close_code_is_documented() -> None:
    from trio_relay.model import CloseCode

    codes = {str(int(code)) for code in CloseCode}  # every close code the relay sends is one of these
    codes |= set(re.findall(r"client\.close\((\d+)", _source("api/ws.py")))
    assert not re.findall(r"close\((1\d\d\d|4\d\d\d)\b", _source("api/ws.py") + _source("api/app.py")), (
        "a bare close code"
    )
    assert {"1001", "1002", "1008", "1009", "4001", "4008"} <= codes
    guide = API_GUIDE.read_text()
    table = guide[guide.index("### Close codes") :]
    undocumented = {c for c in codes if f"| `{c}` |" not in table}
    assert not undocumented, f"close codes missing from the table in docs/api.md: {sorted(undocumented)}"


def _toml_literal(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return json.dumps(value, separators=(", ", ": "))
    if isinstance(value, dict):
        return "{}" if not value else json.dumps(value)
    raise AssertionError(f"no literal for {value!r}")


def test_config_reference_lists_every_key_with_its_default() -> None:
    toml_keys: dict[str, set[str]] = {}
    section = None
    for line in (ROOT / "config" / "trio-relay.toml").read_text().splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
            toml_keys[section] = set()
        elif (m := re.match(r"^#\s*([a-z_][a-z0-9_]*)\s*=", line)) and section:
            toml_keys[section].add(m.group(1))
    guide = API_GUIDE.read_text()
    reference = guide[guide.index("## Configuration reference") :]
    documented: dict[str, dict[str, str]] = {}
    for part in re.split(r"^### ", reference, flags=re.M)[1:]:
        m = re.match(r"`\[(\w+)\]`", part)
        assert m, f"unexpected heading in the configuration reference: {part.splitlines()[0]}"
        documented[m.group(1)] = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", part, re.M))
    assert {s: set(k) for s, k in documented.items()} == toml_keys
    defaults = Config()
    for section_name, keys in documented.items():
        values = getattr(defaults, section_name)
        for key, shown in keys.items():
            real = _toml_literal(getattr(values, key))
            assert shown == real, f"docs/api.md: {section_name}.{key} default shown {shown}, really {real}"
        assert set(keys) == {f.name for f in attrs.fields(type(values))}, section_name


# ----------------------------------------------------------------------------- links


def github_slug(heading: str) -> str:
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.S | re.M)
    found: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = github_slug(heading)
        n = found.get(slug, 0)
        found[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def test_links_between_docs_resolve() -> None:
    checked = 0
    for path in doc_files():
        text = re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.S | re.M)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            assert resolved.exists(), f"{path.relative_to(ROOT)}: broken link {target}"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), (
                    f"{path.relative_to(ROOT)}: no #{anchor} in {file_part or path.name}"
                )
            checked += 1
    assert checked >= 20


def test_docs_exist() -> None:
    for name in ("quickstart.md", "api.md", "faq.md", "openapi.md", "examples/README.md"):
        assert (DOCS / name).is_file(), name
    assert os.access(EXAMPLES / "python_client.py", os.R_OK)


# ----------------------------------------------------------------------------- WebSocket examples
#
# Three kinds, all run against one relay and compared by shape (as the curl examples):
# - the rows of api.md's "Messages a client sends" table whose message is complete JSON: sent,
#   and the first reply of the documented type compared with the documented reply;
# - blocks marked ``<!-- test: ws -->`` (``websocat URL`` then the lines to send, or JSON lines
#   to send): sent, and when a ```json block follows, each line of it (a message) compared with
#   the first real message of its type (a line that is not JSON, "{...}" or "...", is skipped);
# - ```json blocks marked ``<!-- test: message -->``: each line compared with a real message of
#   its type (price_update, error, bar, alert, portfolio), made by the scenario below.


def json_lines(code: str) -> list[dict[str, Any]]:
    """The JSON objects of a block: the whole block, or one per line; lines that do not parse are skipped."""
    try:
        whole = json.loads(code)
        return [whole] if isinstance(whole, dict) else []
    except ValueError:
        pass
    found = []
    for line in code.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def table_exchanges() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, message, first documented reply) of the rows of "Messages a client sends"."""
    text = API_GUIDE.read_text()
    start = text.index("### Messages a client sends")
    table = text[start : text.index("\n\n**", start)]
    found = []
    for n, line in enumerate(table.splitlines()):
        cells = line.split(" | ")
        if len(cells) < 2 or not line.startswith("| `{"):
            continue
        sent = re.findall(r"`(\{.*?\})`", cells[0])
        replies = re.findall(r"`(\{.*?\})`", cells[1])
        try:
            message, reply = json.loads(sent[0]), json.loads(replies[0])
        except (IndexError, ValueError):
            continue  # a row with a placeholder ([...], "...")
        found.append((f"docs/api.md table row {n}", message, reply))
    return found


def ws_blocks(option: str) -> list[tuple[Block, Block | None]]:
    """Blocks marked ``<!-- test: <option> -->``, each with the block that follows it."""
    found = []
    for path in doc_files():
        all_blocks = blocks(path)
        for i, block in enumerate(all_blocks):
            if block.marker is not None and option in block.options:
                follows = all_blocks[i + 1] if i + 1 < len(all_blocks) else None
                end = block.line + block.code.count("\n")
                if follows is not None and follows.line - end > 6:
                    follows = None  # a block further down is not this one's answer
                found.append((block, follows))
    return found


def sent_lines(block: Block) -> list[dict[str, Any]]:
    lines = block.code.strip().splitlines()
    if block.lang == "sh":
        assert lines[0].split()[0] in ("websocat", "npx"), f"{block}: a ws block starts with websocat or npx wscat"
        lines = lines[1:]
    return [json.loads(line) for line in lines]


class Session:
    """One client of the docs relay: send, and find the next message of a type."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def next_of(self, kind: str, **match: Any) -> dict[str, Any]:
        def wanted(m: Any) -> bool:
            return m.get("type") == kind and all(m.get(k) == v for k, v in match.items())

        msg, _ = await self.client.recv_until(wanted)
        return dict(msg)


async def real_messages(relay: Relay, ws_connect: Any, http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """One real message of each type the docs show, from a scenario on ``relay``."""
    got: dict[str, dict[str, Any]] = {}
    s = Session(await ws_connect(relay))
    await s.client.send({"action": "subscribe", "symbols": ["AAPL"]})
    got["subscribed"] = await s.next_of("subscribed")
    got["price_update"] = await s.next_of("price_update", symbol="AAPL")
    await s.client.send({"action": "subscribe", "symbols": ["BAD SYMBOL!"]})
    got["error"] = await s.next_of("error")
    await s.client.send({"action": "subscribe", "symbols": ["AAPL"], "channel": "bars", "interval": "1s"})
    got["bar"] = await s.next_of("bar")
    got["alert"] = await _an_alert(relay, s, http)
    body = {"name": "main", "positions": [{"symbol": "AAPL", "quantity": 100, "cost_basis": 250}]}
    created = await http.post(api(relay, "/portfolios"), json=body)
    assert created.status_code == 200, created.text
    await s.client.send({"action": "subscribe", "channel": "portfolio", "portfolio": "main"})
    got["portfolio"] = await s.next_of("portfolio")
    return got


async def _an_alert(relay: Relay, s: Session, http: httpx.AsyncClient) -> dict[str, Any]:
    """A real fired alert: an `above` rule a cent over the last trade, moved to the price again
    every 2 s until a trade crosses it (a random walk can drift away from one fixed level)."""
    while True:
        state = (await http.get(api(relay, "/cache/AAPL"))).json()
        price = state["last_price"] or state["bid_price"]
        rule = {"type": "above", "symbol": "AAPL", "level": round(price + 0.01, 2), "one_shot": False}
        await s.client.send({"action": "alert_create", "rule": rule})
        created = await s.next_of("alert_created")
        with trio.move_on_after(2):
            return await s.next_of("alert")
        await s.client.send({"action": "alert_delete", "id": created["rule"]["id"]})
        await s.next_of("alert_deleted")


async def test_websocket_examples_match_the_relay(
    start_relay: Any, ws_connect: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    rows, exchanges, messages = table_exchanges(), ws_blocks("ws"), ws_blocks("message")
    assert len(rows) >= 5 and len(exchanges) >= 3 and len(messages) >= 5
    relay = await start_docs_relay(start_relay, alerts={"enabled": True, "data_dir": str(tmp_path / "app")})
    failures: list[str] = []

    def compare(shown: dict[str, Any], actual: dict[str, Any], where: str) -> None:
        failures.extend(f"{where}: {d}" for d in shape_differences(shown, actual))

    # A deadline per example (not one for all: the list grows with the docs).
    for where, message, reply in rows:
        with trio.fail_after(TIMEOUT):
            s = Session(await ws_connect(relay))
            await s.client.send(message)
            compare(reply, await s.next_of(reply["type"]), where)
    for block, follows in exchanges:
        with trio.fail_after(TIMEOUT):
            s = Session(await ws_connect(relay))
            for message in sent_lines(block):
                await s.client.send(message)
            expected = json_lines(follows.code) if follows is not None and follows.lang == "json" else []
            if not expected:  # requests alone: the relay must not refuse them
                await s.client.send({"action": "ping"})
                _, before = await s.client.recv_until(lambda m: m.get("type") == "pong")
                failures.extend(f"{block}: refused: {m}" for m in before if m.get("type") == "error")
            for shown in expected:
                compare(shown, await s.next_of(shown["type"], **_named(shown)), str(block))
    with trio.fail_after(TIMEOUT * 3):
        real = await real_messages(relay, ws_connect, http)
    for block, _ in messages:
        for shown in json_lines(block.code):
            assert shown.get("type") in real, f"{block}: no real {shown.get('type')!r} message to compare with"
            compare(shown, real[shown["type"]], str(block))
    assert not failures, "\n".join(failures)


def _named(shown: dict[str, Any]) -> dict[str, Any]:
    """What picks the real message an example stands for: its symbol, when it names one."""
    return {"symbol": shown["symbol"]} if isinstance(shown.get("symbol"), str) else {}


def test_every_page_with_an_example_says_which_port_it_assumes() -> None:
    """A reader on another port must be told, before the first example, that they assume 8000."""
    for path in doc_files():
        text = path.read_text()
        first = min((text.find(s) for s in (":8000", "localhost:8000") if s in text), default=-1)
        if first < 0:
            continue
        before = text[:first]
        assert re.search(r"port 8000", before), f"{path.relative_to(ROOT)}: no 'port 8000' before its first example"
