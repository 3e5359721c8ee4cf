"""``trio-relay watch AAPL MSFT``: a live terminal table of prices, built on :mod:`trio_relay.client`.

The screen is a :class:`Board` (a pure function of the feed's events, rendered with rich) repainted
at most ``REPAINT_HZ`` times a second; the feed reconnects and resumes by itself, and the status
line says what the connection and the relay's upstream are doing, so a frozen screen never looks
alive. ``--count N`` exits after N price updates (scripts, tests); Ctrl-C exits cleanly.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Iterable

import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import client
from .client import PriceUpdate, RelayError, Status, TokenExpired

__all__ = ["Board", "watch", "main"]

REPAINT_HZ = 10  # a person reads no faster; a busy feed must not cost a repaint per update


def _reference(update: PriceUpdate) -> float | None:
    """The price a row's change is measured on: the last trade, else the quote's mid."""
    if update.last_price is not None:
        return update.last_price
    if update.bid_price is not None and update.ask_price is not None:
        return (update.bid_price + update.ask_price) / 2
    return None


def _decimals(price: float) -> int:
    return 2 if abs(price) >= 10 else 4 if abs(price) >= 0.01 else 8


def _price(value: float | None) -> str:
    return "—" if value is None else f"{value:,.{_decimals(value)}f}"


def _clock(timestamp_ms: int) -> str:
    seconds, ms = divmod(timestamp_ms, 1000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{ms:03d}"


class Board:
    """What the watch screen shows: one row per symbol and a status line, fed event by event."""

    def __init__(self, url: str, symbols: Iterable[str]) -> None:
        self.url = url
        self.rows: dict[str, PriceUpdate | None] = dict.fromkeys(symbols)
        self.first: dict[str, float] = {}  # the reference price when the symbol was first seen
        self.stale: set[str] = set()
        self.connection = "connecting"
        self.connection_reason = ""
        self.upstream = "unknown"
        self.provider: str | None = None
        self.reconnects = 0
        self.updates = 0
        self.notice = ""  # the latest thing worth telling (a gap, a failover, the relay closing)
        self._connections = 0

    def apply(self, event: PriceUpdate | Status) -> None:
        if isinstance(event, PriceUpdate):
            self.updates += 1
            self.rows[event.symbol] = event
            ref = _reference(event)
            if ref is not None:
                self.first.setdefault(event.symbol, ref)
            if event.provider:
                self.provider = event.provider
            return
        if event.scope == "client":
            if event.state == "connected":
                self._connections += 1
                self.reconnects = self._connections - 1
                self.connection, self.connection_reason = "connected", ""
                self.upstream = "up"
                self.stale.clear()
            elif event.state == "disconnected":
                wait = f"; retrying in {event.retry_after_ms / 1000:.1f}s" if event.retry_after_ms is not None else ""
                self.connection, self.connection_reason = "disconnected", f"{event.reason or ''}{wait}"
                # With no relay to ask, nothing is known of its upstream: never a green "up".
                self.upstream = "unknown"
            elif event.state == "gap":
                self.notice = (
                    f"missed updates of {', '.join(event.symbols)} while away (the relay could not replay them)"
                )
        elif event.scope == "upstream":
            self.upstream = "up" if event.state == "failover" else event.state
            if event.provider:
                self.provider = event.provider
            if event.state == "up" and self.notice.startswith("upstream "):
                self.notice = ""  # the trouble it described is over
            elif event.reason:
                self.notice = f"upstream {event.state}: {event.reason}"
        elif event.scope == "symbols":
            if event.state == "stale":
                self.stale.update(event.symbols)
            elif event.state == "fresh":
                self.stale.difference_update(event.symbols)
        elif event.scope == "relay":
            self.notice = f"relay {event.state}: {event.reason or ''}"

    def table(self) -> Table:
        table = Table(expand=False, header_style="bold")
        table.add_column("Symbol", style="bold")
        table.add_column("Last", justify="right")
        table.add_column("Bid", justify="right")
        table.add_column("Ask", justify="right")
        table.add_column("Change", justify="right")
        table.add_column("Updated", justify="right")
        table.add_column("Provider")
        for symbol, update in self.rows.items():
            dim = symbol in self.stale or self.connection != "connected"
            if update is None:
                table.add_row(symbol, "—", "—", "—", "", "waiting…", "", style="dim")
                continue
            change = Text("")
            ref, first = _reference(update), self.first.get(symbol)
            if ref is not None and first is not None:
                delta = ref - first
                pct = f" ({delta / first * 100:+.2f}%)" if first else ""
                change = Text(
                    f"{delta:+,.{_decimals(first)}f}{pct}", style="green" if delta > 0 else "red" if delta < 0 else ""
                )
            table.add_row(
                symbol,
                _price(update.last_price),
                _price(update.bid_price),
                _price(update.ask_price),
                change,
                _clock(update.timestamp) + (" stale" if symbol in self.stale else ""),
                update.provider,
                style="dim" if dim else None,
            )
        return table

    def status_line(self) -> Text:
        line = Text()
        if self.connection == "connected":
            line.append("● connected", style="green")
            line.append(f" to {self.url}")
        elif self.connection == "disconnected":
            line.append("○ disconnected", style="red")
            line.append(f" from {self.url}")
            if self.connection_reason:
                line.append(f": {self.connection_reason}", style="red")
        else:
            line.append("○ connecting", style="yellow")
            line.append(f" to {self.url}")
        upstream_style = "green" if self.upstream == "up" else "yellow" if self.upstream == "unknown" else "red"
        line.append(" · upstream ")
        line.append(self.upstream, style=upstream_style)
        if self.provider:
            line.append(f" ({self.provider})")
        line.append(f" · {self.reconnects} reconnect{'s' if self.reconnects != 1 else ''} · {self.updates} updates")
        if self.notice:
            line.append(f"\n{self.notice}", style="yellow")
        return line

    def render(self) -> RenderableType:
        return Group(self.table(), self.status_line())


class _Repainter:
    """Repaints the live table after a change, at most ``REPAINT_HZ`` times a second."""

    def __init__(self, live: Live, board: Board) -> None:
        self._live, self._board = live, board
        self._changed = trio.Event()

    def poke(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            self._live.update(self._board.render(), refresh=True)
            await trio.sleep(1 / REPAINT_HZ)


async def _follow(
    url: str,
    symbols: list[str],
    board: Board,
    repainter: _Repainter,
    *,
    token: str | None,
    batch: bool,
    count: int | None,
    give_up_after: float | None,
) -> RelayError | str | None:
    """Feed the board until ``count`` updates or the relay's refusal; what went wrong, if anything."""
    # Cancelled when the relay has been out of reach for give_up_after: its deadline is pushed
    # to infinity while connected and re-armed at each loss of the connection.
    patience = give_up_after if give_up_after is not None else math.inf
    offline = trio.CancelScope(deadline=trio.current_time() + patience)
    try:
        with offline:
            async with client.connect(url, symbols, token=token, batch=batch) as feed:
                async for event in feed:
                    board.apply(event)
                    if board.connection == "connected":
                        offline.deadline = math.inf
                    elif offline.deadline == math.inf:
                        offline.deadline = trio.current_time() + patience
                    repainter.poke()
                    if count is not None and board.updates >= count:
                        break
    except RelayError as exc:
        return exc
    if offline.cancelled_caught:
        reason = board.connection_reason or board.connection
        return f"no connection to {url} for {patience:g}s ({reason})"
    return None


async def watch(
    url: str,
    symbols: list[str],
    *,
    token: str | None = None,
    batch: bool = False,
    count: int | None = None,
    give_up_after: float | None = None,
    console: Console | None = None,
) -> int:
    """Show the table until Ctrl-C (or ``count`` price updates); the exit status.

    With ``give_up_after``, a relay that cannot be reached (never, or no longer) for that many
    seconds ends the watch with status 1 instead of retrying forever: what a script needs.
    """
    console = console if console is not None else Console()
    board = Board(url, symbols)
    failure: RelayError | str | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            # auto_refresh off: no rich thread; the repainter is the only painter.
            with Live(board.render(), console=console, auto_refresh=False) as live:
                repainter = _Repainter(live, board)
                nursery.start_soon(repainter.run)
                try:
                    failure = await _follow(
                        url,
                        symbols,
                        board,
                        repainter,
                        token=token,
                        batch=batch,
                        count=count,
                        give_up_after=give_up_after,
                    )
                finally:
                    live.update(board.render(), refresh=True)
            if not console.is_terminal:
                console.line()  # the last render ends without one when it is not a terminal
            nursery.cancel_scope.cancel()
    if failure is None:
        return 0
    hint = "; pass a fresh --token" if isinstance(failure, TokenExpired) else ""
    print(f"trio-relay watch: {failure}{hint}", file=sys.stderr)
    return 1


def main(args: argparse.Namespace) -> int:
    """Run ``trio-relay watch`` with the arguments parsed by :mod:`trio_relay.cli`."""
    symbols = list(dict.fromkeys(s.strip().upper() for arg in args.symbols for s in arg.split(",") if s.strip()))
    token = args.token or os.environ.get("TRIO_RELAY_TOKEN") or None
    try:
        give_up = args.give_up_after
        if give_up is None and args.count is not None:
            give_up = 10.0  # a script waiting for N updates must not wait forever for no relay
        if give_up is not None and give_up <= 0:
            give_up = None
        return trio.run(
            lambda: watch(args.url, symbols, token=token, batch=args.batch, count=args.count, give_up_after=give_up)
        )
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was in place
        return 0
