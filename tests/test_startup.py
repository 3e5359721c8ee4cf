"""Operator mistakes at start: one line on stderr, exit code 2, never a traceback.

Each case runs the real command (``python -m trio_relay serve``) the way systemd would, and
checks the whole of stderr: a traceback or an exception group anywhere is a failure.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

import pytest
import trio


async def serve(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``trio-relay serve`` until it exits by itself (a start that fails must exit)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TRIO_RELAY_", "FMP_", "STATE_DIRECTORY"))}
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "trio_relay", "serve", *args],
            cwd=cwd,
            env={**base, **(env or {})},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stderr.decode()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr, stderr
    # Log lines from the start may come first; the error is the last line and the only error.
    assert lines and lines[-1].startswith("trio-relay: "), stderr
    return lines[-1]


async def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = await serve(["--port", str(port)], tmp_path)
    assert code == 2
    line = one_line(err)
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in line
    assert "--port" in line


async def test_port_in_use_with_workers_is_one_line_too(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = await serve(["--port", str(port), "--workers", "2"], tmp_path)
    assert code == 2
    assert "address already in use" in one_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: a read-only directory needs a non-root user")
async def test_unwritable_data_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code, err = await serve(["--port", "0"], tmp_path)
    finally:
        tmp_path.chmod(stat.S_IRWXU)
    assert code == 2
    line = one_line(err)
    assert "history.data_dir: cannot write to" in line and "StateDirectory" in line


async def test_a_data_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Works as root too: nothing can create a directory where a file is."""
    (tmp_path / "data").write_text("not a directory")
    code, err = await serve(["--port", "0"], tmp_path)
    assert code == 2
    line = one_line(err)
    assert f"history.data_dir: cannot write to {tmp_path / 'data'}" in line


async def test_missing_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, err = await serve(["--provider", "fmp", "--port", "0"], tmp_path)
    assert code == 2
    assert "fmp.api_key" in one_line(err) and "FMP_API_KEY" in err


async def test_bad_tls_files_are_one_line_and_exit_2(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    env = {"TRIO_RELAY_SERVER_TLS_CERTFILE": str(cert), "TRIO_RELAY_SERVER_TLS_KEYFILE": str(key)}
    code, err = await serve(["--port", "0"], tmp_path, env)
    assert code == 2
    assert "server.tls_certfile: cannot load" in one_line(err)


async def test_state_directory_holds_the_data_when_data_dir_is_relative(tmp_path: Path) -> None:
    """Under systemd (StateDirectory=) the working directory may be read-only: data goes to $STATE_DIRECTORY."""
    from trio_relay.config import load_config

    state = tmp_path / "state"
    config = load_config(environ={"STATE_DIRECTORY": f"{state}:/var/lib/other"}, dotenv=None)
    assert config.history.data_dir == str(state / "data")
    assert config.alerts.data_dir == str(state / "data")
    absolute = load_config(
        environ={"STATE_DIRECTORY": str(state), "TRIO_RELAY_HISTORY_DATA_DIR": "/srv/ticks"}, dotenv=None
    )
    assert absolute.history.data_dir == "/srv/ticks"  # an absolute setting is kept as set
    assert load_config(environ={}, dotenv=None).history.data_dir == "data"
