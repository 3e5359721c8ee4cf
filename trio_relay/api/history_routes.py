"""REST routes over the tick history: ``/history/{symbol}`` (ticks) and ``/bars/{symbol}`` (OHLCV).

Times are ISO 8601 or epoch milliseconds (UTC); the window is ``[start, end)`` in event time.
Without ``end`` it is now; without ``start`` it is one hour (ticks) or ``limit`` bars (bars)
before ``end``. Ticks are paginated with an opaque ``cursor`` (``next_cursor`` of the previous
page, same window); bars with ``next_start``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from ..auth import Security
from ..bars import INTERVALS, Bar, BudgetExceeded
from ..entitlements import EntitlementError
from ..history import HistoryBusy, HistoryUnavailable, InvalidCursor, QueryTimeout, Tick
from ..model import SYMBOL_RE, wall_ms
from ..timeparse import TimeError, parse_time
from .responses import entitlement, error_response, json_response

if TYPE_CHECKING:
    from .app import RelayContext

__all__ = ["register_history", "TicksPage", "BarsPage", "MAX_LIMIT"]

MAX_LIMIT = 10_000  # ticks or bars per page
DEFAULT_LIMIT = 1_000
DEFAULT_TICKS_WINDOW_MS = 3_600_000


class TicksPage(msgspec.Struct, forbid_unknown_fields=True):
    """One page of stored ticks, oldest first."""

    symbol: str
    start: int
    end: int
    count: int
    ticks: list[Tick]
    next_cursor: str | None


class BarsPage(msgspec.Struct, forbid_unknown_fields=True):
    """OHLCV bars built from the stored trades, oldest first (an interval without trades has none)."""

    symbol: str
    interval: str
    start: int
    end: int
    count: int
    bars: list[Bar]
    next_start: int | None
    # True when the page ended early on the relay's per-request budget (history.query_max_rows
    # or query_timeout), not on `limit`: ask again from next_start for the rest.
    truncated: bool = False


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _busy(code: str, message: str) -> Response:
    response = error_response(503, code, message)
    response.headers["Retry-After"] = "1"
    return response


def _unavailable(exc: QueryTimeout | HistoryBusy | HistoryUnavailable) -> Response:
    """A query the history could not answer now: 503, and when to ask again."""
    if isinstance(exc, QueryTimeout):
        return _busy("query_timeout", "the query ran past the relay's time budget; ask for a shorter window")
    if isinstance(exc, HistoryBusy):
        return _busy("history_busy", "every history query slot is busy; try again shortly")
    return error_response(503, "history_unavailable", "the history database cannot be reached now; try again")


def _symbol(raw: str, security: Security) -> str:
    symbol = raw.strip().upper()
    if not SYMBOL_RE.match(symbol):
        raise _BadRequest(400, "invalid_symbols", f"invalid symbol {raw[:24]!r}")
    try:
        entitlement(security).require([symbol])
    except EntitlementError as exc:
        raise _BadRequest(exc.status, exc.code, exc.message) from None
    return symbol


def _limit() -> int:
    raw = request.args.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_LIMIT:
        raise _BadRequest(400, "invalid_range", f"'limit' must be an integer from 1 to {MAX_LIMIT} (got {raw[:20]!r})")
    return int(raw)


def _window(default_span_ms: int) -> tuple[int, int]:
    try:
        end = parse_time(request.args["end"], "end") if "end" in request.args else wall_ms()
        start = parse_time(request.args["start"], "start") if "start" in request.args else end - default_span_ms
    except TimeError as exc:
        raise _BadRequest(400, "invalid_range", str(exc)) from None
    if start >= end:
        raise _BadRequest(400, "invalid_range", f"'start' ({start}) must be before 'end' ({end})")
    return start, end


def register_history(app: QuartTrio, ctx: RelayContext) -> None:
    """The two history routes on ``app``: long only by their views (each under 30 lines), which
    close over ``ctx`` as Quart views do."""
    prefix = "/api/v2/realtime"

    def history_store() -> Any:
        """The store, or a 404 when the history is off."""
        if ctx.history_store is None:
            raise _BadRequest(404, "history_off", 'tick history is off (history.backend = "off")')
        return ctx.history_store

    @app.get(prefix + "/history/<symbol>")
    async def history_ticks(symbol: str) -> Response:
        """Stored ticks of a symbol (every update: trades, quotes, breaks), paginated.

        Query: `start`, `end` (ISO 8601 or epoch ms; default the last hour), `limit` (1..10000,
        default 1000), `cursor` (the previous page's `next_cursor`, same window).
        """
        try:
            name = _symbol(symbol, ctx.security)
            start, end = _window(DEFAULT_TICKS_WINDOW_MS)
            limit = _limit()
            store = history_store()
            ticks, cursor = await store.ticks(name, start, end, limit, after=request.args.get("cursor"))
        except _BadRequest as exc:
            return error_response(exc.status, exc.code, exc.message)
        except InvalidCursor:
            return error_response(400, "invalid_cursor", "'cursor' is not a next_cursor this relay gave (same window)")
        except (QueryTimeout, HistoryBusy, HistoryUnavailable) as exc:
            return _unavailable(exc)
        return json_response(TicksPage(name, start, end, len(ticks), ticks, cursor))

    @app.get(prefix + "/bars/<symbol>")
    async def history_bars(symbol: str) -> Response:
        """OHLCV bars of a symbol built from its stored trades.

        Query: `interval` (1s, 1m, 5m or 1h; default 1m), `start`, `end` (ISO 8601 or epoch ms;
        default: the `limit` bars before now), `limit` (1..10000, default 1000). A bar is
        `complete` when its whole interval lies inside the window and its lateness window has
        passed (it can no longer change). Trades that came later than the bar's lateness window
        count in no bar, as live. More bars than `limit` in the window: the first `limit`, and
        `next_start` to ask for the rest.
        """
        try:
            name = _symbol(symbol, ctx.security)
            interval = request.args.get("interval", "1m")
            if interval not in INTERVALS:
                raise _BadRequest(400, "invalid_interval", f"'interval' must be one of {', '.join(INTERVALS)}")
            step = INTERVALS[interval]
            limit = _limit()
            start, end = _window(step * limit)
            store = history_store()
            first = start - start % step  # whole intervals: the first bar starts on its boundary
            page = await store.bars(name, interval, first, end, limit, now_ms=wall_ms(), window_start=start)
        except _BadRequest as exc:
            return error_response(exc.status, exc.code, exc.message)
        except BudgetExceeded:
            return error_response(
                422,
                "query_too_large",
                f"one {interval} bar holds more trades than the relay reads per request; ask for a finer interval",
            )
        except (QueryTimeout, HistoryBusy, HistoryUnavailable) as exc:
            return _unavailable(exc)
        bars = page.bars
        return json_response(BarsPage(name, interval, start, end, len(bars), bars, page.next_start, page.truncated))
