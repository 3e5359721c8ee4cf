"""The official JavaScript client (trio_relay/web/client/): its types, and its tests under Node.

``tsc`` (Debian's ``node-typescript``) checks the JSDoc types of ``relay-client.js`` strictly;
Node's test runner runs ``tests/js/`` against real relay processes (see tests/js/support.mjs).
Both are Debian packages that ``.ci/system-deps`` installs; here they skip when missing (and
fail under CI). The Chromium side is in tests/test_dashboard.py and tests/test_sse_browser.py.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import trio
from conftest import require

ROOT = Path(__file__).parent.parent
CLIENT = ROOT / "trio_relay" / "web" / "client"


async def test_types_check_with_tsc() -> None:
    tsc = shutil.which("tsc")
    require(None if tsc else "tsc is not installed (Debian: node-typescript)")
    assert tsc is not None
    with trio.fail_after(120):
        result = await trio.run_process([tsc, "-p", str(CLIENT)], capture_stdout=True, check=False)
    assert result.returncode == 0, result.stdout.decode()


async def test_node_tests_pass() -> None:
    node = shutil.which("node")
    require(None if node else "node is not installed (Debian: nodejs)")
    assert node is not None
    env = {"RELAY_PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    with trio.fail_after(240):
        result = await trio.run_process(
            [node, "--experimental-websocket", "--test", "--test-reporter=spec", str(ROOT / "tests" / "js")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    report = result.stdout.decode()
    assert result.returncode == 0, report + result.stderr.decode()[-2000:]
    assert "# fail 0" in report or "fail 0" in report
