"""TLS on the public port: https:// REST and wss:// prices with a real certificate (trustme's CA)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
import trio_websocket
import trustme
from conftest import JsonWsClient, api

from trio_relay.config import ConfigError
from trio_relay.daemon import Relay


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_server_cert(ca: trustme.CA, directory: Path) -> dict[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files; the ``server`` section using them."""
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=i > 0)
    leaf.private_key_pem.write_to_path(str(key))
    return {"tls_certfile": str(cert), "tls_keyfile": str(key)}


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def tls_relay(start_relay, ca, tmp_path) -> Relay:
    relay: Relay = await start_relay(server=write_server_cert(ca, tmp_path))
    return relay


async def assert_serving(relay: Relay, ca: trustme.CA) -> None:
    async with httpx.AsyncClient(verify=trusting(ca), timeout=10) as client:
        assert (await client.get(api(relay, "/health"))).status_code == 200


async def test_rest_over_https(tls_relay, ca, all_logs):
    relay = tls_relay
    assert relay.http_url.startswith("https://127.0.0.1:")
    assert relay.ws_url.startswith("wss://127.0.0.1:")
    with trio.fail_after(10):
        async with httpx.AsyncClient(verify=trusting(ca), timeout=10) as client:
            health = await client.get(api(relay, "/health"))
            assert health.status_code == 200 and health.json()["provider"] == "sim"
            # Keep-alive through TLS and the relay to REST: several requests on one connection.
            for _ in range(3):
                live = await client.get(api(relay, "/health/live"))
                assert live.status_code == 200 and live.json()["client_ip"] == "127.0.0.1"
    assert f"[START] TLS on (cert: {relay.config.server.tls_certfile})" in all_logs.text
    key = Path(relay.config.server.tls_keyfile).read_text()
    body = key.split("-----")[2].strip().splitlines()[0]
    assert body and body not in all_logs.text


async def test_alpn_is_http11(tls_relay, ca):
    context = trusting(ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with trio.fail_after(10):
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", tls_relay.port, ssl_context=context)
        await stream.do_handshake()
    assert stream.selected_alpn_protocol() == "http/1.1"
    await stream.aclose()


async def test_prices_over_wss(tls_relay, ca):
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(tls_relay.ws_url, ssl_context=trusting(ca)) as ws:
            client = JsonWsClient(ws)
            ack = await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
            assert ack["type"] == "subscribed" and ack["symbols"] == ["AAPL"] and "AAPL" in ack["prev_close"]
            update, _ = await client.recv_until(lambda m: m.get("type") == "price_update")
            assert update["symbol"] == "AAPL"
        await tls_relay.hub.wait_no_clients()


async def test_plain_http_on_the_tls_port_gets_no_http_reply(tls_relay, ca, all_logs):
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", tls_relay.port)
        await stream.send_all(b"GET /api/v2/realtime/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = b""
        try:
            while chunk := await stream.receive_some(4096):
                reply += chunk
        except trio.BrokenResourceError:
            pass  # reset: the relay closed with our request unread, also fine
        await stream.aclose()
        assert not reply.startswith(b"HTTP/")
        await assert_serving(tls_relay, ca)
    failures = [r for r in all_logs.records if r.getMessage().startswith("[TLS] handshake with 127.0.0.1 failed")]
    assert failures and all(r.levelno == logging.DEBUG and r.exc_info is None for r in failures)


async def test_untrusting_client_fails_the_handshake_and_the_relay_keeps_serving(tls_relay, ca, all_logs):
    other = trustme.CA()  # the client trusts some other CA only
    with trio.fail_after(10):
        with pytest.raises(trio.BrokenResourceError) as failed:
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", tls_relay.port, ssl_context=trusting(other))
            await stream.do_handshake()
        assert isinstance(failed.value.__cause__, ssl.SSLCertVerificationError)
        async with httpx.AsyncClient(verify=trusting(other), timeout=10) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(api(tls_relay, "/health"))
        await assert_serving(tls_relay, ca)

        # The relay's side of it: one debug line (the client's alert), no traceback.
        def logged() -> list[logging.LogRecord]:
            return [r for r in all_logs.records if r.getMessage().startswith("[TLS] handshake with 127.0.0.1 failed")]

        while not logged():
            await trio.testing.wait_all_tasks_blocked()
    assert all(r.levelno == logging.DEBUG and r.exc_info is None for r in logged())


@pytest.mark.parametrize(
    ("problem", "said"),
    [
        ("not_pem", "not a PEM certificate"),
        ("other_key", "the key does not match the certificate"),
        ("encrypted_key", "the key is encrypted"),
    ],
)
async def test_bad_certificate_files_stop_the_start(start_relay, ca, tmp_path, problem, said):
    server = write_server_cert(ca, tmp_path)
    key_path = Path(server["tls_keyfile"])
    if problem == "not_pem":
        Path(server["tls_certfile"]).write_text("this is not a certificate\n")
    elif problem == "other_key":
        other = tmp_path / "other"
        other.mkdir()
        server["tls_keyfile"] = write_server_cert(ca, other)["tls_keyfile"]
    else:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        encryption = serialization.BestAvailableEncryption(b"secret")
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        )
    key_text = Path(server["tls_keyfile"]).read_text()
    with trio.fail_after(5):  # an encrypted key must not make OpenSSL prompt for a password
        with pytest.raises(ConfigError, match=r"server\.tls_certfile") as failed:
            await start_relay(server=server)
    message = str(failed.value)
    assert server["tls_certfile"] in message and said in message
    assert "PRIVATE KEY" not in message and key_text.split("-----")[2].strip()[:40] not in message


def test_tls_context_settings(ca, tmp_path):
    from trio_relay.api.app import tls_context
    from trio_relay.config import ServerConfig

    context = tls_context(ServerConfig(**write_server_cert(ca, tmp_path)))
    assert context is not None
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE  # no client certificates asked for
    assert tls_context(ServerConfig()) is None
