"""A Python client of trio-relay, using trio-websocket directly.

It subscribes, keeps the latest price of each symbol, and survives the relay going away:
it reconnects with capped, jittered backoff (waiting at least what the relay asked for in its
"closing" notice) and resumes with "since"/"epoch", so it gets exactly the updates it missed.
It understands both frame formats (one message per frame, or ``--batch``: a JSON array per frame).

    pip install trio trio-websocket
    python docs/examples/python_client.py --symbols AAPL,MSFT
    python docs/examples/python_client.py --url wss://relay.example.com/api/v2/realtime/ws/prices \\
        --token "$JWT" --symbols AAPL --count 100

Each message received is printed as one JSON line; ``--count N`` stops after N price updates.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from typing import Any

import trio
import trio_websocket

URL = "ws://127.0.0.1:8000/api/v2/realtime/ws/prices"

# Close codes after which reconnecting cannot help (the client must change what it sends).
FATAL_CLOSE_CODES = {1002: "protocol error", 1009: "message too big"}


def reconnect_delay(attempt: int, hint_ms: int | None, initial: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait before reconnect number ``attempt`` (0, 1, 2...): full jitter, capped.

    Never less than the relay's own hint (``retry_after_ms`` of its "closing" notice), so that a
    restarting relay is not met by every client at the same instant.
    """
    delay = random.uniform(0, min(cap, initial * 2**attempt))
    if hint_ms is not None:
        delay = max(delay, hint_ms / 1000 * random.uniform(1.0, 1.5))
    return delay


class PriceFeed:
    """Subscribe to ``symbols`` at ``url`` and call ``on_message`` with every message received."""

    def __init__(
        self,
        url: str,
        symbols: list[str],
        *,
        batch: bool = False,
        token: str | None = None,
        backoff_initial: float = 0.5,
        heartbeat: float = 20.0,
    ) -> None:
        self.url = url + ("?batch=1" if batch else "")
        self.symbols = [s.upper() for s in symbols]
        self.token = token
        self.backoff_initial = backoff_initial
        self.heartbeat = heartbeat
        self.prices: dict[str, dict[str, Any]] = {}  # symbol -> its latest price_update
        self.last_seq: dict[str, int] = {}  # symbol -> last seq seen, in self.epoch
        self.epoch: str | None = None
        self.connections = 0

    def subscribe_message(self) -> dict[str, Any]:
        """The subscribe to send on (re)connect: with since/epoch once we have seen updates."""
        msg: dict[str, Any] = {"action": "subscribe", "symbols": self.symbols}
        since = {s: seq for s, seq in self.last_seq.items() if s in self.symbols}
        if since and self.epoch is not None:
            msg["since"] = since
            msg["epoch"] = self.epoch
        return msg

    def _track(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "price_update":
            if msg["epoch"] != self.epoch:  # a restarted relay: a new sequence space
                self.epoch, self.last_seq = msg["epoch"], {}
            self.last_seq[msg["symbol"]] = msg["seq"]
            self.prices[msg["symbol"]] = msg
        elif kind == "subscribed" and "epoch" in msg and msg["epoch"] != self.epoch:
            self.epoch, self.last_seq = msg["epoch"], {}

    async def run(self, on_message: Callable[[dict[str, Any]], None], count: int | None = None) -> None:
        """Run until ``count`` price updates were received (forever when None)."""
        prices = 0
        attempt = 0
        while True:
            hint_ms: int | None = None
            try:
                async with trio_websocket.open_websocket_url(self.url) as ws:
                    self.connections += 1
                    if self.token:
                        await ws.send_message(json.dumps({"action": "auth", "token": self.token}))
                    await ws.send_message(json.dumps(self.subscribe_message()))
                    quiet = 0
                    while True:
                        # The relay sends nothing while the market is quiet: after `heartbeat`
                        # seconds of silence ask for a pong; no answer to that = a dead link.
                        with trio.move_on_after(self.heartbeat) as silence:
                            data = json.loads(await ws.get_message())
                        if silence.cancelled_caught:
                            quiet += 1
                            if quiet > 1:
                                raise trio.TooSlowError("no answer to a ping")
                            await ws.send_message('{"action":"ping"}')
                            continue
                        quiet = 0
                        for msg in data if isinstance(data, list) else [data]:
                            self._track(msg)
                            if msg.get("type") == "subscribed":
                                attempt = 0  # connected and accepted: the backoff starts over
                            elif msg.get("type") == "status" and msg.get("scope") == "relay":
                                hint_ms = msg.get("retry_after_ms")
                            on_message(msg)
                            if msg.get("type") == "price_update":
                                prices += 1
                                if count is not None and prices >= count:
                                    return
            except trio_websocket.ConnectionClosed as exc:
                code, reason = (exc.reason.code, exc.reason.reason) if exc.reason else (None, None)
                if code in FATAL_CLOSE_CODES:
                    raise RuntimeError(f"closed with {code} ({FATAL_CLOSE_CODES[code]}): fix the client") from None
                on_message({"type": "disconnected", "code": code, "reason": reason})
            except trio_websocket.ConnectionRejected as exc:
                if exc.status_code in (401, 403):  # a bad token or a page origin the relay refuses
                    raise RuntimeError(f"handshake refused with HTTP {exc.status_code}: {exc.body!r}") from None
                on_message({"type": "disconnected", "code": exc.status_code, "reason": "handshake refused"})
            except (trio_websocket.HandshakeError, OSError, trio.TooSlowError) as exc:
                on_message({"type": "disconnected", "code": None, "reason": repr(exc)})
            await trio.sleep(reconnect_delay(attempt, hint_ms, self.backoff_initial))
            attempt += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=URL)
    parser.add_argument("--symbols", default="AAPL,MSFT")
    parser.add_argument("--count", type=int, default=None, help="stop after this many price updates")
    parser.add_argument("--batch", action="store_true", help="ask for batched frames (?batch=1)")
    parser.add_argument("--token", default=None, help="a JWT, when the relay has auth on")
    args = parser.parse_args()
    feed = PriceFeed(args.url, args.symbols.split(","), batch=args.batch, token=args.token)

    def show(msg: dict[str, Any]) -> None:
        print(json.dumps(msg), flush=True)

    try:
        trio.run(feed.run, show, args.count)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
