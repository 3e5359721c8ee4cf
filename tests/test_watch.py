"""``trio-relay watch``: the table it renders, and the command itself against a real relay."""

from __future__ import annotations

import io
import os
import sys

import trio
from rich.console import Console

from trio_relay.client import PriceUpdate, Status
from trio_relay.watch import Board, watch


def update(symbol: str, seq: int, **prices: float) -> PriceUpdate:
    return PriceUpdate(
        symbol=symbol,
        timestamp=1_700_000_000_123,
        data_type="T" if "last_price" in prices else "Q",
        cached_at="2023-11-14T22:13:20.125Z",
        seq=seq,
        provider="sim",
        epoch="e1",
        **prices,
    )


def text_of(board: Board, width: int = 140) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(board.render())
    return console.export_text()


def test_the_table_shows_prices_change_since_first_seen_and_provider() -> None:
    board = Board("ws://relay/prices", ["AAPL", "MSFT", "IBM"])
    board.apply(Status(scope="client", state="connected"))
    board.apply(update("AAPL", 1, last_price=189.45, last_size=100, bid_price=189.44, ask_price=189.46))
    board.apply(update("AAPL", 2, last_price=190.00, last_size=50, bid_price=189.98, ask_price=190.02))
    board.apply(update("MSFT", 7, bid_price=411.10, ask_price=411.30))  # quotes only: change on the mid
    board.apply(Status(scope="symbols", state="stale", symbols=["MSFT"], stale_after=60.0))
    text = text_of(board)
    aapl = next(line for line in text.splitlines() if "AAPL" in line)
    for cell in ("190.00", "189.98", "190.02", "+0.55 (+0.29%)", "sim"):
        assert cell in aapl, cell
    msft = next(line for line in text.splitlines() if "MSFT" in line)
    assert "411.10" in msft and "411.30" in msft and "stale" in msft
    assert "waiting" in next(line for line in text.splitlines() if "IBM" in line)
    assert "● connected to ws://relay/prices · upstream up (sim) · 0 reconnects · 3 updates" in text
    styles = [row.style for row in board.table().rows]
    assert styles == [None, "dim", "dim"]  # MSFT is stale, IBM has no price yet


def test_the_status_line_follows_the_connection_and_the_upstream() -> None:
    board = Board("ws://relay/prices", ["AAPL"])
    board.apply(Status(scope="client", state="connected"))
    board.apply(update("AAPL", 1, last_price=10.5))
    board.apply(Status(scope="client", state="disconnected", reason="closed 4008: slow", retry_after_ms=500))
    text = text_of(board)
    # With no relay to ask, its upstream is unknown: a dead relay never shows a green "up".
    assert "○ disconnected from ws://relay/prices: closed 4008: slow; retrying in 0.5s · upstream unknown" in text
    assert board.table().rows[0].style == "dim"  # a price we are not hearing about is not live
    board.apply(Status(scope="client", state="connected"))
    board.apply(Status(scope="client", state="gap", symbols=["AAPL"], epoch="e2"))
    board.apply(Status(scope="upstream", state="down", provider="fmp", reason="connection closed", symbols=["AAPL"]))
    text = text_of(board)
    assert "● connected" in text and "upstream down (fmp) · 1 reconnect · 1 updates" in text
    assert "upstream down: connection closed" in text
    # Recovery clears the notice about the trouble it ends.
    board.apply(Status(scope="upstream", state="stale", provider="fmp", reason="feed silent for 10s", symbols=["AAPL"]))
    assert "upstream stale: feed silent for 10s" in text_of(board)
    board.apply(Status(scope="upstream", state="up", provider="fmp", symbols=["AAPL"]))
    text = text_of(board)
    assert "upstream up (fmp)" in text and "feed silent" not in text and "connection closed" not in text


async def test_watch_count_gives_up_on_an_unreachable_relay(capsys, autojump_clock) -> None:
    """A script's ``watch --count N`` against no relay exits 1 instead of retrying forever."""
    with trio.socket.socket() as sock:  # a port that refuses: bound, never listening
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        start = trio.current_time()  # virtual (MockClock): the give-up deadline is exact
        with trio.fail_after(20):
            code = await watch(
                f"ws://127.0.0.1:{port}/api/v2/realtime/ws/prices",
                ["AAPL"],
                count=1,
                give_up_after=1.0,
                console=Console(file=io.StringIO()),
            )
    assert code == 1 and trio.current_time() - start == 1.0
    assert f"trio-relay watch: no connection to ws://127.0.0.1:{port}" in capsys.readouterr().err


async def test_watch_renders_the_table_until_count(start_relay) -> None:
    relay = await start_relay()
    out = io.StringIO()
    console = Console(record=True, width=140, file=out)
    with trio.fail_after(5):
        code = await watch(relay.ws_url, ["AAPL", "MSFT"], count=6, console=console)
    assert code == 0
    text = console.export_text()
    assert "AAPL" in text and "MSFT" in text and "sim" in text and "6 updates" in text


async def test_watch_reports_a_relay_error_and_exits_1(start_relay, capsys) -> None:
    relay = await start_relay()
    with trio.fail_after(5):
        code = await watch(relay.ws_url, ["BAD SYMBOL!"], console=Console(file=io.StringIO()))
    assert code == 1
    assert "trio-relay watch: invalid_symbols: invalid symbol(s): 'BAD SYMBOL!'" in capsys.readouterr().err


async def test_the_command_against_a_real_relay(start_relay) -> None:
    relay = await start_relay()
    env = {**os.environ, "COLUMNS": "140"}
    with trio.fail_after(20):
        done = await trio.run_process(
            [sys.executable, "-m", "trio_relay", "watch", "AAPL", "--url", relay.ws_url, "--count", "5", "--batch"],
            capture_stdout=True,
            capture_stderr=True,
            env=env,
            check=False,
        )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "AAPL" in out and "sim" in out and "5 updates" in out


async def test_the_command_exits_1_without_a_relay() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with trio.fail_after(30):
            done = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "trio_relay",
                    "watch",
                    "AAPL",
                    "--url",
                    f"ws://127.0.0.1:{port}/x",
                    "--count",
                    "1",
                    "--give-up-after",
                    "1",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert done.returncode == 1
    assert b"no connection to" in done.stderr
