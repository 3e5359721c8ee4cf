"""Authentication, authorization, limits and origins, against the real daemon with real clients."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import trio
import trio.testing
import trio_websocket
from conftest import JsonWsClient, api, close_code
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trio_relay.auth import Authenticator, AuthError, ConnectionCounter, TokenBucket
from trio_relay.config import AuthConfig

SECRET = "jwt-test-secret-0123456789abcdef-XYZ"  # 35 chars; grep-able if it ever leaks
OTHER_SECRET = "another-secret-0123456789abcdef-XYZ"
ISSUER = "https://auth.example.test"
AUDIENCE = "trio-relay"


def token(
    claims: dict[str, Any] | None = None, *, key: str | bytes = SECRET, algorithm: str = "HS256", **extra: Any
) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600}
    body.update(claims or {})
    body.update(extra)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def auth_sections(**auth: Any) -> dict[str, dict[str, Any]]:
    return {
        "auth": {"enabled": True, "secret": SECRET, "issuer": ISSUER, "audience": AUDIENCE, "leeway": 0, **auth},
    }


async def connect(
    relay: Any, nursery: trio.Nursery, *, query: str = "", headers: list[tuple[str, str]] | None = None
) -> JsonWsClient:
    ws = await trio_websocket.connect_websocket_url(
        nursery, relay.ws_url + query, extra_headers=headers or [], message_queue_size=10_000
    )
    return JsonWsClient(ws)


async def rejected_status(
    relay: Any, nursery: trio.Nursery, *, query: str = "", headers: list[tuple[str, str]] | None = None
) -> int:
    """The HTTP status of a refused handshake (its own context: a refusal must not reach ``nursery``)."""
    with pytest.raises(trio_websocket.ConnectionRejected) as info:
        async with trio_websocket.open_websocket_url(relay.ws_url + query, extra_headers=headers or []):
            pass
    return info.value.status_code


# --------------------------------------------------------------------------- token verification


def none_token() -> str:
    return jwt.encode(
        {"sub": "mallory", "exp": int(time.time()) + 60, "iss": ISSUER, "aud": AUDIENCE}, None, algorithm="none"
    )


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: token(key=OTHER_SECRET), "token signature is invalid"),
        (none_token, "token algorithm not allowed"),
        (lambda: token(algorithm="HS384", key=SECRET * 2), "token algorithm not allowed"),
        (lambda: token(exp=int(time.time()) - 10), "token expired"),
        (lambda: token(nbf=int(time.time()) + 600), "token not yet valid"),
        (lambda: token(aud="someone-else"), "token has the wrong audience"),
        (lambda: token(iss="https://evil.example"), "token has the wrong issuer"),
        (lambda: token(exp=None), "token lacks the 'exp' claim"),
        (lambda: token(sub=None), "token lacks the 'sub' claim"),
        (lambda: "not.a.jwt", "token is malformed"),
        (lambda: token(symbols="AAPL"), "token 'symbols' must be a list of symbol patterns"),
        (lambda: token(max_symbols=-1), "token 'max_symbols' must be a non-negative integer"),
    ],
    ids=[
        "forged",
        "alg-none",
        "wrong-alg",
        "expired",
        "not-yet-valid",
        "audience",
        "issuer",
        "no-exp",
        "no-sub",
        "malformed",
        "bad-symbols",
        "bad-max",
    ],
)
def test_bad_tokens_are_refused_with_a_reason(make: Any, reason: str) -> None:
    auth = Authenticator(AuthConfig(enabled=True, secret=SECRET, issuer=ISSUER, audience=AUDIENCE, leeway=0))
    bad = make()
    with pytest.raises(AuthError) as info:
        auth.verify(bad)
    assert info.value.reason == reason
    assert bad not in str(info.value) and SECRET not in str(info.value)


def test_public_key_tokens_and_key_confusion(tmp_path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem)
    auth = Authenticator(AuthConfig(enabled=True, algorithms=["ES256"], public_key_file=str(path), leeway=0))
    good = jwt.encode(
        {"sub": "bob", "exp": int(time.time()) + 60, "scope": "read relay:admin"}, private, algorithm="ES256"
    )
    principal = auth.verify(good)
    assert principal.subject == "bob" and principal.has_scope("relay:admin")
    # The classic attack: an HS256 token "signed" with the public key as the HMAC secret.
    forged = jwt.api_jws.PyJWS().encode(b'{"sub":"mallory","exp":9999999999}', b"x" * 32, algorithm="HS256")
    with pytest.raises(AuthError) as info:
        auth.verify(forged)
    assert info.value.reason == "token algorithm not allowed"


def test_symbol_patterns_and_scopes_from_claims() -> None:
    auth = Authenticator(AuthConfig(enabled=True, secret=SECRET, leeway=0))
    p = auth.verify(token(symbols=["aapl", "BTC*"], scopes=["relay:admin"], max_symbols=3, iss=None, aud=None))
    assert p.may_subscribe("AAPL") and p.may_subscribe("BTCUSD") and not p.may_subscribe("MSFT")
    assert p.refused(["AAPL", "MSFT", "BTCEUR", "ETHUSD"]) == ["MSFT", "ETHUSD"]
    assert p.has_scope("relay:admin") and p.max_symbols == 3
    anyone = auth.verify(token(iss=None, aud=None))
    assert anyone.may_subscribe("ANYTHING") and not anyone.has_scope("relay:admin")


# --------------------------------------------------------------------------- limits, unit


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_token_bucket_trips_and_recovers(autojump_clock) -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=trio.current_time())
    assert [bucket.take(trio.current_time()) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(trio.current_time()) == pytest.approx(0.5)
    await trio.sleep(0.5)  # virtual time (MockClock)
    assert bucket.take(trio.current_time()) == 0.0
    assert bucket.take(trio.current_time()) == pytest.approx(0.5)
    await trio.sleep(10.0)  # virtual time (MockClock): refills up to the burst, not beyond
    assert [bucket.take(trio.current_time()) for _ in range(4)][-1] == pytest.approx(0.5)


def test_connection_counter_caps_and_forgets() -> None:
    counter = ConnectionCounter(cap=2)
    assert counter.acquire("1.2.3.4") and counter.acquire("1.2.3.4") and not counter.acquire("1.2.3.4")
    assert counter.acquire("5.6.7.8")
    counter.release("1.2.3.4")
    assert counter.acquire("1.2.3.4")
    for _ in range(2):
        counter.release("1.2.3.4")
    counter.release("5.6.7.8")
    assert counter.counts == {}


# --------------------------------------------------------------------------- WebSocket


async def test_websocket_token_in_query_header_or_first_message(start_relay, nursery):
    relay = await start_relay(**auth_sections())
    good = token()
    by_query = await connect(relay, nursery, query=f"?token={good}")
    by_header = await connect(relay, nursery, headers=[("Authorization", f"Bearer {good}")])
    by_message = await connect(relay, nursery)
    with trio.fail_after(10):
        assert (await by_query.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed"))[
            "type"
        ] == "subscribed"
        assert (await by_header.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed"))[
            "type"
        ] == "subscribed"
        refused = await by_message.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        assert refused["code"] == "unauthenticated"
        hello = await by_message.request({"action": "auth", "token": good}, "authenticated")
        assert hello["subject"] == "alice" and hello["expires_at"] > time.time()
        assert (await by_message.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed"))[
            "type"
        ] == "subscribed"
    assert {c.user for c in relay.hub.clients.values()} == {"alice"}


@pytest.mark.parametrize(
    "bad",
    [lambda: token(key=OTHER_SECRET), none_token, lambda: token(exp=int(time.time()) - 5), lambda: token(aud="x")],
    ids=["forged", "alg-none", "expired", "audience"],
)
async def test_a_bad_token_on_the_handshake_gets_401(start_relay, nursery, bad):
    relay = await start_relay(**auth_sections())
    with trio.fail_after(10):
        assert await rejected_status(relay, nursery, query=f"?token={bad()}") == 401
        assert await rejected_status(relay, nursery, headers=[("Authorization", f"Bearer {bad()}")]) == 401
    assert relay.hub.clients == {}


async def test_no_token_in_time_or_a_bad_one_closes_with_1008(start_relay, nursery):
    relay = await start_relay(**auth_sections(auth_timeout=0.3))
    silent = await connect(relay, nursery)
    wrong = await connect(relay, nursery)
    with trio.fail_after(10):
        await wrong.send({"action": "auth", "token": token(key=OTHER_SECRET)})
        error = await wrong.recv()
        assert await close_code(wrong.ws) == 1008
        assert await close_code(silent.ws) == 1008
    assert error == {"type": "error", "code": "unauthorized", "message": "token signature is invalid", "action": "auth"}


async def test_an_expiring_token_closes_4001_unless_refreshed(start_relay, nursery):
    relay = await start_relay(**auth_sections())
    soon = time.time() + 1.0
    expiring = await connect(relay, nursery, query=f"?token={token(exp=soon)}")
    refreshed = await connect(relay, nursery, query=f"?token={token(exp=soon)}")
    with trio.fail_after(10):
        reply = await refreshed.request({"action": "auth", "token": token()}, "authenticated")
        assert reply["expires_at"] > soon + 3000
        # A refresh for another user is refused (the old token keeps counting down).
        other = await refreshed.request({"action": "auth", "token": token(sub="bob")}, "authenticated")
        assert other["code"] == "unauthorized"
        notice, _ = await expiring.recv_until(lambda m: m.get("type") == "error")
        assert await close_code(expiring.ws) == 4001
        # Both deadlines were the same instant: the refreshed connection is still up after it.
        assert (await refreshed.request({"action": "ping"}, "pong")) == {"type": "pong"}
    assert notice["code"] == "token_expired"


async def test_a_token_limited_to_some_symbols(start_relay, nursery):
    relay = await start_relay(**auth_sections())
    client = await connect(relay, nursery, query=f"?token={token(symbols=['AAPL', 'BTC*'], max_symbols=2)}")
    with trio.fail_after(10):
        refused = await client.request({"action": "subscribe", "symbols": ["AAPL", "MSFT"]}, "subscribed")
        ok = await client.request({"action": "subscribe", "symbols": ["AAPL", "BTCUSD"]}, "subscribed")
        over = await client.request({"action": "subscribe", "symbols": ["BTCEUR"]}, "subscribed")
    assert refused["code"] == "forbidden_symbols" and "MSFT" in refused["message"] and "AAPL" not in refused["message"]
    assert ok["symbols"] == ["AAPL", "BTCUSD"]
    assert over["code"] == "symbol_limit"
    assert relay.hub.demand.wanted == {"AAPL", "BTCUSD"}


async def test_rate_limit_errors_then_closes_1008_if_it_persists(start_relay, nursery):
    relay = await start_relay(limits={"messages_per_second": 1.0, "messages_burst": 3, "strikes": 4})
    client = await connect(relay, nursery)
    with trio.fail_after(10):
        for _ in range(3):
            await client.send({"action": "ping"})
        for _ in range(3):
            await client.send({"action": "ping"})
        replies = [await client.recv() for _ in range(6)]
        await client.send({"action": "ping"})  # the 4th strike in a row
        assert await close_code(client.ws) == 1008
    assert replies[:3] == [{"type": "pong"}] * 3
    assert [r["code"] for r in replies[3:]] == ["rate_limited"] * 3
    assert all(0 < r["retry_after_ms"] <= 1000 for r in replies[3:])


async def test_subscribe_requests_have_their_own_limit(start_relay, nursery):
    relay = await start_relay(limits={"subscribes_per_second": 0.5, "subscribes_burst": 2})
    client = await connect(relay, nursery)
    with trio.fail_after(10):
        assert (await client.request({"action": "subscribe", "symbols": ["A"]}, "subscribed"))["type"] == "subscribed"
        assert (await client.request({"action": "unsubscribe", "symbols": ["A"]}, "unsubscribed"))[
            "type"
        ] == "unsubscribed"
        limited = await client.request({"action": "subscribe", "symbols": ["B"]}, "subscribed")
        assert (await client.request({"action": "ping"}, "pong")) == {"type": "pong"}  # other messages still pass
    assert limited["code"] == "rate_limited" and limited["retry_after_ms"] > 0


async def test_connection_caps_per_ip_and_per_user(start_relay, nursery):
    relay = await start_relay(**auth_sections(), limits={"connections_per_ip": 3, "connections_per_user": 2})
    with trio.fail_after(10):
        a1 = await connect(relay, nursery, query=f"?token={token()}")
        await connect(relay, nursery, query=f"?token={token()}")
        assert await rejected_status(relay, nursery, query=f"?token={token()}") == 429  # alice's third
        await connect(relay, nursery, query=f"?token={token(sub='bob')}")
        assert await rejected_status(relay, nursery, query=f"?token={token(sub='carol')}") == 429  # the IP's fourth
        await a1.ws.aclose()
        while len(relay.hub.clients) > 2:
            await trio.testing.wait_all_tasks_blocked()
        await connect(relay, nursery, query=f"?token={token()}")  # alice may connect again


async def test_disallowed_origin_is_refused(start_relay, nursery):
    relay = await start_relay(server={"allowed_origins": ["https://good.example"]})
    with trio.fail_after(10):
        assert await rejected_status(relay, nursery, headers=[("Origin", "https://evil.example")]) == 403
        good = await connect(relay, nursery, headers=[("Origin", "https://good.example")])
        no_origin = await connect(relay, nursery)  # not a browser
        assert (await good.request({"action": "ping"}, "pong")) == {"type": "pong"}
        assert (await no_origin.request({"action": "ping"}, "pong")) == {"type": "pong"}


async def test_with_auth_on_and_no_origin_list_only_the_relays_own_pages_may_connect(start_relay, nursery):
    relay = await start_relay(**auth_sections())
    own = relay.http_url
    with trio.fail_after(10):
        assert (
            await rejected_status(
                relay, nursery, query=f"?token={token()}", headers=[("Origin", "https://evil.example")]
            )
            == 403
        )
        same = await connect(relay, nursery, query=f"?token={token()}", headers=[("Origin", own)])
        assert (await same.request({"action": "ping"}, "pong")) == {"type": "pong"}


# --------------------------------------------------------------------------- REST


async def test_rest_needs_a_bearer_token_and_pins_need_the_admin_scope(start_relay, http, all_logs):
    relay = await start_relay(**auth_sections())
    user = {"Authorization": f"Bearer {token(symbols=['AAPL'])}"}
    admin = {"Authorization": f"Bearer {token(scope='relay:admin')}"}
    with trio.fail_after(10):
        health = await http.get(api(relay, "/health"))
        missing = await http.get(api(relay, "/cache"))
        forged = await http.get(api(relay, "/cache"), headers={"Authorization": f"Bearer {token(key=OTHER_SECRET)}"})
        as_user = await http.get(api(relay, "/cache"), headers=user)
        pin_user = await http.post(api(relay, "/subscribe"), json=["AAPL"], headers=user)
        status_user = await http.get(api(relay, "/status"), headers=user)
        pin_admin = await http.post(api(relay, "/subscribe"), json=["AAPL", "MSFT"], headers=admin)
        status_admin = await http.get(api(relay, "/status"), headers=admin)
        forbidden = await http.get(api(relay, "/cache/MSFT"), headers=user)
        metrics = await http.get(f"{relay.http_url}/metrics")
    assert health.status_code == 200 and metrics.status_code == 200  # monitoring needs no token
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert missing.json()["error"] == "unauthorized"
    assert forged.status_code == 401 and forged.json()["message"] == "token signature is invalid"
    assert as_user.status_code == 200
    assert pin_user.status_code == 403 and pin_user.json()["error"] == "insufficient_scope"
    assert status_user.status_code == 403
    assert pin_admin.status_code == 200 and status_admin.status_code == 200
    assert forbidden.status_code == 403
    texts = [status_admin.text, metrics.text, health.text, all_logs.text]
    for text in texts:
        assert SECRET not in text and admin["Authorization"][7:] not in text


async def test_rest_rate_limit_answers_429_with_retry_after(start_relay, http):
    relay = await start_relay(limits={"rest_per_second": 1.0, "rest_burst": 2})
    with trio.fail_after(10):
        codes = [(await http.get(api(relay, "/cache"))).status_code for _ in range(3)]
        limited = await http.get(api(relay, "/cache"))
        health = await http.get(api(relay, "/health"))
    assert codes == [200, 200, 429]
    assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 2
    assert limited.json()["error"] == "rate_limited"
    assert health.status_code == 200  # health checks are never limited


async def test_security_headers(start_relay, http):
    relay = await start_relay()
    with trio.fail_after(10):
        response = await http.get(api(relay, "/status"))
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"


async def test_a_reload_applies_new_limits_to_new_connections(start_relay, nursery):
    import attrs

    relay = await start_relay()
    first = await connect(relay, nursery)
    new = attrs.evolve(relay.config, limits=attrs.evolve(relay.config.limits, connections_per_ip=1))
    changes = relay.reload(new)
    with trio.fail_after(10):
        assert await rejected_status(relay, nursery) == 429
        assert (await first.request({"action": "ping"}, "pong")) == {"type": "pong"}  # kept
    assert "auth, limits and origins (for new connections and requests)" in changes


def test_a_public_key_file_that_is_not_a_key_fails_naming_the_key(tmp_path) -> None:
    from trio_relay.config import ConfigError

    path = tmp_path / "not-a-key.pem"
    path.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError) as info:
        Authenticator(AuthConfig(enabled=True, algorithms=["RS256"], public_key_file=str(path)))
    assert str(info.value) == f"config error: auth.public_key_file: {path}: not a PEM public key"
