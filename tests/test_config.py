"""Configuration: defaults, TOML file < environment (< .env) < command line, keyed errors, secrecy."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_relay.config import Config, ConfigError, config_sections, load_config, timing_warnings

SECRET = "k3y-5ecret-9d8c7b6a5f4e"


def load(path: Path | None = None, *, env: dict[str, str] | None = None, **kwargs: Any) -> Config:
    """load_config isolated from the real environment and the working directory's .env."""
    kwargs.setdefault("dotenv", None)
    return load_config(path, environ=env or {}, **kwargs)


def error_of(path: Path | None = None, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, **kwargs)
    return str(info.value)


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- defaults and sources


def test_defaults() -> None:
    config = load()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8000
    assert config.upstream.provider == "auto"
    assert config.provider == "sim"  # no key: the embedded simulator
    assert config.upstream.pinned == []
    assert config.upstream.stale_after == 30.0
    assert config.upstream.unsubscribe_linger == 5.0
    assert config.upstream.max_retries == 0
    assert config.fmp.api_key == ""
    assert config.fmp.endpoint == "stocks"
    assert config.fmp.resolved_url == "wss://websockets.financialmodelingprep.com"
    assert config.sim.rate == 4.0 and config.sim.seed is None  # a fresh path on every start
    assert config.clients.outbox_size == 256
    assert config.clients.max_symbols_per_client == 500
    assert config.clients.stall_timeout == 30.0
    assert config.logging.level == "INFO"
    assert config == Config()


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
host = "0.0.0.0"
port = 9001

[auth]
allow_insecure = true

[upstream]
provider = "sim"
pinned = ["aapl", "BRK.B"]
stale_after = 12.5

[fmp]
endpoint = "crypto"

[sim]
rate = 20
seed = 7

[clients]
outbox_size = 32

[logging]
level = "DEBUG"
""",
    )
    config = load(path)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9001)
    assert config.upstream.provider == "sim"
    assert config.upstream.pinned == ["AAPL", "BRK.B"]  # upper-cased
    assert config.upstream.stale_after == 12.5
    assert config.fmp.resolved_url == "wss://crypto.financialmodelingprep.com"
    assert config.sim.rate == 20.0 and isinstance(config.sim.rate, float)
    assert config.sim.seed == 7
    assert config.clients.outbox_size == 32
    assert config.logging.level == "DEBUG"
    # Keys the file does not set keep their defaults.
    assert config.clients.stall_timeout == 30.0


def test_path_may_be_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n")
    assert load(str(path)).server.port == 1234


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nport = 9001\nhost = "0.0.0.0"\n[auth]\nallow_insecure = true\n[upstream]\npinned = ["IBM"]\n',
    )
    config = load(path, env={"TRIO_RELAY_SERVER_PORT": "9002", "TRIO_RELAY_UPSTREAM_PINNED": "aapl, msft,"})
    assert config.server.port == 9002
    assert config.server.host == "0.0.0.0"  # untouched by the environment
    assert config.upstream.pinned == ["AAPL", "MSFT"]


def test_env_values_are_typed() -> None:
    config = load(
        env={
            "TRIO_RELAY_UPSTREAM_STALE_AFTER": "2.5",
            "TRIO_RELAY_UPSTREAM_MAX_RETRIES": "3",
            "TRIO_RELAY_CLIENTS_OUTBOX_SIZE": "16",
            "TRIO_RELAY_LOGGING_LEVEL": "WARNING",
            "TRIO_RELAY_FMP_ENDPOINT": "forex",
            "UNRELATED_VARIABLE": "ignored",
        }
    )
    assert config.upstream.stale_after == 2.5
    assert config.upstream.max_retries == 3
    assert config.clients.outbox_size == 16
    assert config.logging.level == "WARNING"
    assert config.fmp.endpoint == "forex"


def test_overrides_beat_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9001\n")
    config = load(
        path,
        env={"TRIO_RELAY_SERVER_PORT": "9002", "TRIO_RELAY_UPSTREAM_PINNED": "IBM"},
        overrides={"server": {"port": 9003}, "upstream": {"pinned": ["spy"]}},
    )
    assert config.server.port == 9003
    assert config.upstream.pinned == ["SPY"]


def test_real_os_environ_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_RELAY_SERVER_PORT", "9444")
    assert load_config(dotenv=None).server.port == 9444


def test_fmp_api_key_makes_auto_resolve_to_fmp() -> None:
    config = load(env={"FMP_API_KEY": SECRET})
    assert config.upstream.provider == "auto"
    assert config.provider == "fmp"
    assert config.fmp.api_key == SECRET
    # An explicit provider wins over the key's presence.
    assert load(env={"FMP_API_KEY": SECRET, "TRIO_RELAY_UPSTREAM_PROVIDER": "sim"}).provider == "sim"


def test_prefixed_key_variable_wins_over_fmp_api_key() -> None:
    config = load(env={"FMP_API_KEY": "from-plain", "TRIO_RELAY_FMP_API_KEY": "from-prefixed"})
    assert config.fmp.api_key == "from-prefixed"


def test_dotenv_is_read_and_real_environment_wins(tmp_path: Path) -> None:
    dotenv = write(
        tmp_path,
        "# local settings\n"
        "\n"
        f'export FMP_API_KEY="{SECRET}"\n'
        "TRIO_RELAY_SERVER_PORT=9100\n"
        "TRIO_RELAY_SERVER_HOST = '10.0.0.1'\n"
        "TRIO_RELAY_AUTH_ALLOW_INSECURE=yes\n"
        "not a setting line\n",
        name=".env",
    )
    config = load_config(environ={"TRIO_RELAY_SERVER_PORT": "9200"}, dotenv=dotenv)
    assert config.fmp.api_key == SECRET
    assert config.provider == "fmp"
    assert config.server.host == "10.0.0.1"
    assert config.server.port == 9200  # the real environment beats .env


def test_dotenv_default_is_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "TRIO_RELAY_SERVER_PORT=9300\n", name=".env")
    monkeypatch.chdir(tmp_path)
    assert load_config(environ={}).server.port == 9300


def test_missing_dotenv_is_fine(tmp_path: Path) -> None:
    assert load_config(environ={}, dotenv=tmp_path / ".env").server.port == 8000


def test_fmp_url_override() -> None:
    config = load(overrides={"fmp": {"url": "ws://127.0.0.1:8765"}})
    assert config.fmp.resolved_url == "ws://127.0.0.1:8765"


# --------------------------------------------------------------------------- errors name the key


@pytest.mark.parametrize(
    "kwargs, key, detail",
    [
        (dict(overrides={"server": {"port": 70000}}), "server.port", "65535"),
        (dict(overrides={"server": {"port": -1}}), "server.port", "65535"),
        (dict(env={"TRIO_RELAY_SERVER_PORT": "eighty"}), "server.port", "integer"),
        (dict(overrides={"server": {"port": 80.5}}), "server.port", "integer"),
        (dict(overrides={"server": {"port": True}}), "server.port", "integer"),
        (dict(overrides={"upstream": {"provider": "bloomberg"}}), "upstream.provider", "'fmp'"),
        (dict(overrides={"server": {"prot": 1}}), "server", "prot"),
        (dict(overrides={"srever": {"port": 1}}), "srever", "unknown"),
        (dict(env={"TRIO_RELAY_SERVER_PROT": "1"}), "TRIO_RELAY_SERVER_PROT", "server.prot"),
        (dict(env={"TRIO_RELAY_SRVR_PORT": "1"}), "TRIO_RELAY_SRVR_PORT", "unknown section"),
        (dict(overrides={"upstream": {"stale_after": -1}}), "upstream.stale_after", "> 0"),
        (dict(overrides={"upstream": {"stale_after": 0}}), "upstream.stale_after", "> 0"),
        (dict(overrides={"upstream": {"unsubscribe_linger": -0.5}}), "upstream.unsubscribe_linger", ">= 0"),
        (dict(env={"TRIO_RELAY_UPSTREAM_PINNED": "AAPL,not valid"}), "upstream.pinned", "NOT VALID"),
        (dict(overrides={"upstream": {"pinned": "AAPL"}}), "upstream.pinned", "list"),
        (dict(overrides={"upstream": {"pinned": ["AAPL", 5]}}), "upstream.pinned", "string"),
        (dict(overrides={"upstream": {"provider": "fmp"}}), "fmp.api_key", "FMP_API_KEY"),
        (dict(overrides={"upstream": {"backoff_initial": 10, "backoff_max": 1}}), "upstream.backoff_max", ""),
        (dict(overrides={"sim": {"trade_ratio": 1.5}}), "sim.trade_ratio", ""),
        (dict(overrides={"fmp": {"url": "http://example.com"}}), "fmp.url", "ws://"),
        (dict(overrides={"fmp": {"endpoint": "bonds"}}), "fmp.endpoint", "'stocks'"),
        (dict(overrides={"logging": {"level": "LOUD"}}), "logging.level", "'DEBUG'"),
        (dict(overrides={"clients": {"outbox_size": 0}}), "clients.outbox_size", "> 0"),
    ],
)
def test_bad_values_name_their_key(kwargs: dict[str, Any], key: str, detail: str) -> None:
    message = error_of(**kwargs)
    assert message.startswith("config error: ")
    assert key in message
    assert detail in message


def test_port_error_message_is_exact() -> None:
    assert error_of(overrides={"server": {"port": 70000}}) == (
        "config error: server.port: must be between 0 and 65535 (got 70000)"
    )


def test_errors_in_toml_file_name_their_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[upstream]\nstale_after = -3\n")
    assert "upstream.stale_after" in error_of(path)
    path = write(tmp_path, "[upstream]\nstale_aftr = 3\n")
    message = error_of(path)
    assert "upstream" in message and "stale_aftr" in message
    path = write(tmp_path, "[nonsense]\nx = 1\n")
    assert "nonsense" in error_of(path)
    path = write(tmp_path, 'server = "not a table"\n')
    assert "server" in error_of(path)
    # ... also when the environment has something to merge into it.
    assert "server: must be a table" in error_of(path, env={"TRIO_RELAY_SERVER_PORT": "1"})


def test_pinned_string_in_toml_is_an_error_not_letters(tmp_path: Path) -> None:
    # cattrs would happily iterate a string: pinned = "SPY" once pinned "S", "P" and "Y".
    path = write(tmp_path, '[upstream]\npinned = "SPY"\n')
    assert "upstream.pinned" in error_of(path)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 8000\n")
    message = error_of(path)
    assert str(path) in message and "not valid TOML" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    message = error_of(path)
    assert "file not found" in message and str(path) in message


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        load(overrides={"server": {"port": 70000}})


# --------------------------------------------------------------------------- the key stays secret


def test_api_key_not_in_repr() -> None:
    config = load(env={"FMP_API_KEY": SECRET})
    assert config.fmp.api_key == SECRET
    assert SECRET not in repr(config)
    assert SECRET not in repr(config.fmp)
    assert SECRET not in str(config)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(overrides={"server": {"port": 70000}}),
        dict(overrides={"fmp": {"url": "http://example.com", "login_timeout": -1}}),
        dict(overrides={"fmp": {"bogus": 1}}),
        dict(env={"TRIO_RELAY_FMP_BOGUS": "x"}),
        dict(overrides={"upstream": {"pinned": ["bad symbol"]}}),
        dict(overrides={"upstream": {"provider": "nope"}}),
    ],
)
def test_api_key_not_in_config_errors(kwargs: dict[str, Any]) -> None:
    env = {"FMP_API_KEY": SECRET, **kwargs.pop("env", {})}
    message = error_of(env=env, **kwargs)
    assert SECRET not in message
    message = error_of(overrides={"fmp": {"api_key": SECRET}, **kwargs.get("overrides", {})}, env=env)
    assert SECRET not in message


def test_api_key_of_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    # An all-digit key written without quotes is an int in TOML: the error must not show it.
    path = write(tmp_path, "[fmp]\napi_key = 4815162342108\n")
    message = error_of(path)
    assert "fmp.api_key" in message
    assert "4815162342108" not in message


def test_api_key_not_in_errors_from_dotenv(tmp_path: Path) -> None:
    dotenv = write(tmp_path, f"FMP_API_KEY={SECRET}\nTRIO_RELAY_SERVER_PORT=99999\n", name=".env")
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, dotenv=dotenv)
    assert "server.port" in str(info.value)
    assert SECRET not in str(info.value)


# --------------------------------------------------------------------------- the command line


async def test_cli_bad_port_exits_2_naming_the_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RELAY_") and k != "FMP_API_KEY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_relay", "serve", "--port", "70000"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=tmp_path,  # no stray .env
            env=env,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "server.port" in stderr
    assert "70000" in stderr
    assert "Traceback" not in stderr


async def test_cli_does_not_echo_the_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RELAY_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    env["FMP_API_KEY"] = SECRET
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_relay", "serve", "--port", "70000", "--provider", "fmp"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=tmp_path,
            env=env,
        )
    assert result.returncode == 2
    assert SECRET not in result.stderr.decode() + result.stdout.decode()


# --------------------------------------------------------------------------- providers and failover


def test_vendor_environment_variables_fill_each_provider_section() -> None:
    env = {
        "FINNHUB_API_KEY": "fh-" + SECRET,
        "APCA_API_KEY_ID": "id-" + SECRET,
        "APCA_API_SECRET_KEY": "sk-" + SECRET,
        "MASSIVE_API_KEY": "pg-" + SECRET,
    }
    config = load(env=env, overrides={"upstream": {"providers": ["finnhub", "alpaca", "massive", "sim"]}})
    assert config.provider_chain == ["finnhub", "alpaca", "polygon", "sim"]
    assert config.provider == "finnhub"
    assert config.finnhub.api_key == "fh-" + SECRET
    assert (config.alpaca.key_id, config.alpaca.secret_key) == ("id-" + SECRET, "sk-" + SECRET)
    assert config.polygon.api_key == "pg-" + SECRET
    assert SECRET not in repr(config)
    # The TRIO_RELAY_ form wins over the vendor's variable.
    config = load(
        env={"FINNHUB_API_KEY": "a", "TRIO_RELAY_FINNHUB_API_KEY": "b"}, overrides={"upstream": {"provider": "finnhub"}}
    )
    assert config.finnhub.api_key == "b"


@pytest.mark.parametrize(
    "provider, key, var",
    [
        ("finnhub", "finnhub.api_key", "FINNHUB_API_KEY"),
        ("alpaca", "alpaca.key_id", "APCA_API_KEY_ID"),
        ("polygon", "polygon.api_key", "POLYGON_API_KEY"),
        ("massive", "polygon.api_key", "POLYGON_API_KEY"),
    ],
)
def test_a_provider_without_its_credentials_fails_naming_the_key(provider: str, key: str, var: str) -> None:
    message = error_of(overrides={"upstream": {"provider": provider}})
    assert message.startswith(f"config error: {key}: provider ") and var in message
    # The same check applies to every provider of a failover chain.
    message = error_of(overrides={"upstream": {"providers": ["sim", provider]}})
    assert message.startswith(f"config error: {key}: ")


def test_alpaca_needs_the_secret_too() -> None:
    message = error_of(env={"APCA_API_KEY_ID": "x"}, overrides={"upstream": {"provider": "alpaca"}})
    assert message.startswith("config error: alpaca.secret_key: ") and "APCA_API_SECRET_KEY" in message


@pytest.mark.parametrize(
    "providers, problem",
    [
        (["fmp", "bloomberg"], "upstream.providers: unknown provider 'bloomberg'"),
        (["sim", "sim"], "upstream.providers: a provider is listed twice"),
        (["polygon", "massive"], "upstream.providers: a provider is listed twice"),
        ("sim", "upstream.providers: expected a list of strings"),
    ],
)
def test_bad_failover_chains(providers: Any, problem: str) -> None:
    env = {"POLYGON_API_KEY": "x", "FMP_API_KEY": "y"}
    assert problem in error_of(env=env, overrides={"upstream": {"providers": providers}})


def test_provider_urls_from_their_settings() -> None:
    config = load(overrides={"alpaca": {"feed": "sip"}, "polygon": {"market": "crypto", "delayed": True}})
    assert config.finnhub.resolved_url == "wss://ws.finnhub.io"
    assert config.alpaca.resolved_url == "wss://stream.data.alpaca.markets/v2/sip"
    assert config.polygon.resolved_url == "wss://delayed.massive.com/crypto"
    config = load(overrides={"alpaca": {"feed": "crypto", "crypto_location": "eu-1", "sandbox": True}})
    assert config.alpaca.resolved_url == "wss://stream.data.sandbox.alpaca.markets/v1beta3/crypto/eu-1"


def test_symbol_tables(tmp_path: Path) -> None:
    path = write(tmp_path, '[finnhub.symbols]\nbtcusdt = "BINANCE:BTCUSDT"\n')
    assert load(path).finnhub.symbols == {"BTCUSDT": "BINANCE:BTCUSDT"}
    path = write(tmp_path, '[finnhub.symbols]\n"BAD SYMBOL" = "X"\n')
    assert "finnhub.symbols: 'BAD SYMBOL' is not a valid client-facing symbol" in error_of(path)
    path = write(tmp_path, "[polygon]\nsymbols = 3\n")
    assert "polygon.symbols: expected a table of strings" in error_of(path)


def test_the_example_config_documents_every_key() -> None:
    import attrs

    text = (Path(__file__).parent.parent / "config" / "trio-relay.toml").read_text()
    assert load(Path(__file__).parent.parent / "config" / "trio-relay.toml") == load()
    sections = config_sections()
    assert {"server", "upstream", "fmp", "sim", "replay", "engine"} <= set(sections)  # own and providers'
    for name, section in sections.items():
        assert f"[{name}]" in text
        for field in attrs.fields(section):
            assert f"# {field.name} = " in text, f"{name}.{field.name} is not in config/trio-relay.toml"


def test_a_token_in_the_finnhub_url_is_refused_without_echoing_it() -> None:
    message = error_of(overrides={"finnhub": {"url": f"wss://ws.finnhub.io?token={SECRET}"}})
    assert message.startswith("config error: finnhub.url: must not have a query")
    assert SECRET not in message


# --------------------------------------------------------------------------- security settings


def test_auth_off_on_a_public_address_is_refused_unless_explicitly_allowed() -> None:
    message = error_of(overrides={"server": {"host": "0.0.0.0"}})
    assert message.startswith("config error: auth.enabled: the relay would listen on 0.0.0.0 (not loopback)")
    assert "auth.allow_insecure" in message
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.9"):
        assert load(overrides={"server": {"host": host}}).auth.enabled is False
    assert load(overrides={"server": {"host": "0.0.0.0"}, "auth": {"allow_insecure": True}}).server.host == "0.0.0.0"


@pytest.mark.parametrize(
    "auth, problem",
    [
        ({"enabled": True}, "auth.secret: HS* tokens need a secret of at least 32 characters"),
        ({"enabled": True, "secret": "short"}, "auth.secret: HS* tokens need a secret of at least 32"),
        ({"enabled": True, "algorithms": ["none"]}, "auth.algorithms: unsupported algorithm 'none'"),
        ({"enabled": True, "algorithms": ["RS256"]}, "auth.public_key_file: RS*/ES* tokens need"),
        ({"enabled": True, "algorithms": ["RS256"], "public_key_file": "/nonexistent.pem"}, "file not found"),
        ({"enabled": True, "algorithms": ["HS256", "RS256"], "secret": "x" * 32}, "mix HMAC"),
        ({"enabled": True, "algorithms": []}, "at least one algorithm"),
    ],
)
def test_bad_auth_settings(auth: dict[str, Any], problem: str) -> None:
    message = error_of(overrides={"auth": auth})
    assert problem in message
    assert "x" * 32 not in message and "short" not in message.split(":", 2)[-1].replace("'short'", "")


def test_the_jwt_secret_is_never_shown() -> None:
    config = load(env={"TRIO_RELAY_AUTH_SECRET": SECRET * 2}, overrides={"auth": {"enabled": True}})
    assert config.auth.secret == SECRET * 2 and SECRET not in repr(config)


@pytest.mark.parametrize(
    "server, problem",
    [
        ({"tls_certfile": "/etc/hostname"}, "server.tls_keyfile: TLS needs both"),
        (
            {"tls_certfile": "/nonexistent.pem", "tls_keyfile": "/nonexistent.key"},
            "server.tls_certfile: file not found",
        ),
        ({"allowed_origins": ["app.example.com"]}, "server.allowed_origins: 'app.example.com' is not an origin"),
    ],
)
def test_bad_tls_and_origin_settings(server: dict[str, Any], problem: str) -> None:
    assert problem in error_of(overrides={"server": server})


# --------------------------------------------------------------------------- failover timings
CHAIN = {"providers": ["sim", "replay"]}


def test_failover_timings_that_cannot_work_are_one_line_errors_naming_the_keys() -> None:
    message = error_of(overrides={"upstream": {**CHAIN, "failback_after": 120.0, "failback_holdoff_max": 60.0}})
    assert message == (
        "config error: upstream.failback_holdoff_max: must be >= upstream.failback_after (the first hold-off)"
    )
    assert "\n" not in message
    # Without a chain the failback keys are unused: nothing to refuse.
    load(overrides={"upstream": {"failback_after": 120.0, "failback_holdoff_max": 60.0}})


def test_failover_timings_that_weaken_failback_are_warnings_naming_the_keys() -> None:
    assert timing_warnings(load(overrides={"upstream": CHAIN})) == []  # the defaults are consistent
    assert timing_warnings(load(overrides={"upstream": {"stale_after": 90.0, "failback_probe_interval": 99.0}})) == []
    warnings = timing_warnings(load(overrides={"upstream": {**CHAIN, "stale_after": 60.0}}))
    assert warnings == [
        "upstream.stale_after (60s) >= upstream.failback_after (60s): a failback probe then proves one update "
        "and failback_after without a disconnect, not data throughout; set stale_after below failback_after"
    ]
    warnings = timing_warnings(load(overrides={"upstream": {**CHAIN, "failback_probe_interval": 90.0}}))
    assert len(warnings) == 1 and warnings[0].startswith(
        "upstream.failback_probe_interval (90s) >= upstream.failback_after (60s)"
    )


# --------------------------------------------------------------------------- separate state per run


@pytest.mark.parametrize(
    "overrides, label",
    [
        ({"upstream": {"provider": "replay"}}, "replay"),
        ({"upstream": {"provider": "fmp"}, "fmp": {"api_key": "k", "url": "ws://127.0.0.1:8765"}}, "fmp-local"),
        (
            {"upstream": {"provider": "finnhub"}, "finnhub": {"api_key": "k", "url": "ws://localhost:9000"}},
            "finnhub-local",
        ),
        ({"upstream": {"provider": "fmp"}, "fmp": {"api_key": "k", "url": "ws://[::1]:8765"}}, "fmp-local"),
    ],
)
def test_a_replay_or_a_local_fake_keeps_its_own_data(overrides: dict[str, Any], label: str) -> None:
    config = load(overrides=overrides)
    assert config.history.data_dir == os.path.join("data", label)
    assert config.alerts.data_dir == os.path.join("data", label)  # alerts and portfolios
    # Under systemd it is still under the state directory.
    systemd = load(overrides=overrides, env={"STATE_DIRECTORY": "/var/lib/trio-relay"})
    assert systemd.history.data_dir == os.path.join("/var/lib/trio-relay", "data", label)


@pytest.mark.parametrize(
    "overrides",
    [
        {"upstream": {"provider": "sim"}},  # the live relay (the sim is its own data source)
        {"upstream": {"provider": "fmp"}, "fmp": {"api_key": "k"}},  # the real FMP
        {"upstream": {"provider": "fmp"}, "fmp": {"api_key": "k", "url": "wss://fmp.example.com/ws"}},
        {"upstream": {"provider": "relay"}, "relay": {"url": "ws://127.0.0.1:8000/api/v2/realtime/ws/prices"}},
        {"upstream": {"provider": "replay", "separate_data": False}},  # told to share
    ],
)
def test_a_live_run_uses_the_data_dir_itself(overrides: dict[str, Any]) -> None:
    config = load(overrides=overrides)
    assert config.history.data_dir == "data" and config.alerts.data_dir == "data"


def test_a_data_dir_set_by_the_operator_is_kept() -> None:
    config = load(overrides={"upstream": {"provider": "replay"}, "history": {"data_dir": "/srv/ticks"}})
    assert config.history.data_dir == "/srv/ticks"
    assert config.alerts.data_dir == os.path.join("data", "replay")
