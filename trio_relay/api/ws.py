"""The client WebSocket protocol at ``/api/v2/realtime/ws/prices``, as a raw ASGI handler.

The hot path skips Quart's websocket layer: one reader loop (client → hub) and one sender task
(outbox → socket) per connection, both owned by the connection's handler. Client messages:

- ``{"action":"subscribe","symbols":["AAPL"]}`` → ``{"type":"subscribed","symbols":[...]}`` then the
  cached ``price_update`` of each newly subscribed symbol that has one, then live updates.
  An optional ``"batch": true`` switches the connection to batched frames (see below).
- ``{"action":"unsubscribe","symbols":[...]}`` → ``{"type":"unsubscribed","symbols":[...]}``; no update
  of those symbols follows the ack.
- ``{"action":"ping"}`` → ``{"type":"pong"}``; ``{"action":"list"}`` → ``{"type":"subscriptions","symbols":[...]}``.
- Anything wrong → ``{"type":"error","code":...,"message":...}``; the connection stays up.

By default each message is its own text frame. With ``?batch=1`` on the URL (or ``"batch":true``
in a subscribe), every frame is a JSON array of all messages pending for the client, sent as soon
as the previous frame went out (no timer).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs

import msgspec
import trio

from ..config import ClientsConfig
from ..hub import Client, Hub, SubscriptionError
from ..model import SYMBOL_RE, control

__all__ = ["WS_PATH", "ClientProtocol", "ProtocolError", "parse_symbols"]

log = logging.getLogger("trio_relay.api.ws")

WS_PATH = "/api/v2/realtime/ws/prices"

Scope = dict[str, Any]
Receive = Any
Send = Any


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_symbols(raw: object, max_per_request: int, field: str = "symbols") -> list[str]:
    """Validate a list of symbols: upper-cased, de-duplicated, format-checked, capped."""
    if raw is None:
        raise ProtocolError("missing_field", f"'{field}' is required: a list of symbols, e.g. [\"AAPL\"]")
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise ProtocolError("invalid_symbols", f"'{field}' must be a list of strings")
    if not raw:
        raise ProtocolError("invalid_symbols", f"'{field}' must not be empty")
    if len(raw) > max_per_request:
        raise ProtocolError(
            "too_many_symbols", f"at most {max_per_request} symbols per request (got {len(raw)})"
        )
    symbols = list(dict.fromkeys(s.strip().upper() for s in raw))
    bad = [s for s in symbols if not SYMBOL_RE.match(s)]
    if bad:
        shown = ", ".join(repr(s[:24]) for s in bad[:5])
        raise ProtocolError(
            "invalid_symbols",
            f"invalid symbol(s): {shown}; a symbol is 1-20 of A-Z 0-9 . - / ^ = starting with a letter or digit",
        )
    return symbols


def _flag(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes"))


class ClientProtocol:
    """ASGI app for the client WebSocket; one instance serves every connection."""

    def __init__(self, hub: Hub, config: ClientsConfig) -> None:
        self.hub = hub
        self.config = config
        self._decoder = msgspec.json.Decoder()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        batch = _flag(query.get("batch", [""])[-1])
        await send({"type": "websocket.accept"})
        peer = scope.get("client") or ("?", 0)
        client = self.hub.connect(batch=batch, remote=f"{peer[0]}:{peer[1]}")
        log.info("[CLIENT] #%d connected from %s%s", client.id, client.remote, " (batch)" if batch else "")
        peer_gone = False
        try:
            with client.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop, client, send)
                    await self._read_loop(client, receive)
                    peer_gone = True
                    nursery.cancel_scope.cancel()
        finally:
            self.hub.disconnect(client)
        if client.close_code is not None and not peer_gone:
            # Bounded: a peer that stopped reading may never take the close frame.
            with trio.move_on_after(1.0):
                await send({"type": "websocket.close", "code": client.close_code, "reason": client.close_reason})
        log.info(
            "[CLIENT] #%d disconnected (%s)",
            client.id,
            f"closed {client.close_code}: {client.close_reason}" if client.close_code and not peer_gone else "by peer",
        )

    async def _send_loop(self, client: Client, send: Send) -> None:
        outbox = client.outbox
        while True:
            if client.batch:
                # Everything pending, as one frame: the frame, not the message, is the cost.
                items = await outbox.get()
                await send({"type": "websocket.send", "text": "[" + ",".join(items) + "]"})
                outbox.progressed(len(items))
            else:
                # One at a time: what stays queued can still be conflated to the latest price.
                (text,) = await outbox.get(1)
                if client.batch:  # switched on by the subscribe this reply answers
                    text = "[" + text + "]"
                await send({"type": "websocket.send", "text": text})
                outbox.progressed()

    async def _read_loop(self, client: Client, receive: Receive) -> None:
        while True:
            event = await receive()
            kind = event["type"]
            if kind == "websocket.disconnect":
                return
            if kind != "websocket.receive":
                continue
            text = event.get("text")
            if text is None:
                try:
                    text = (event.get("bytes") or b"").decode("utf-8")
                except UnicodeDecodeError:
                    self._error(client, "invalid_json", "binary frame is not UTF-8 JSON")
                    continue
            self.handle_message(client, text)

    def _error(self, client: Client, code: str, message: str, action: object = None) -> None:
        fields: dict[str, object] = {"code": code, "message": message}
        if isinstance(action, str):
            fields["action"] = action
        self.hub.send_control(client, control("error", **fields))

    def handle_message(self, client: Client, text: str) -> None:
        """Apply one client message (sync: the hub never awaits)."""
        try:
            msg = self._decoder.decode(text)
        except msgspec.DecodeError:
            self._error(client, "invalid_json", "message is not valid JSON")
            return
        if not isinstance(msg, dict):
            self._error(client, "invalid_message", 'message must be a JSON object like {"action":"subscribe","symbols":["AAPL"]}')
            return
        action = msg.get("action")
        try:
            if action == "subscribe":
                symbols = parse_symbols(msg.get("symbols"), self.config.max_symbols_per_request)
                if "batch" in msg:
                    client.batch = _flag(msg["batch"])
                try:
                    self.hub.subscribe(client, symbols)
                except SubscriptionError as exc:
                    raise ProtocolError(exc.code, exc.message) from None
            elif action == "unsubscribe":
                symbols = parse_symbols(msg.get("symbols"), self.config.max_symbols_per_request)
                self.hub.unsubscribe(client, symbols)
            elif action == "ping":
                self.hub.send_control(client, control("pong"))
            elif action == "list":
                self.hub.send_control(client, control("subscriptions", symbols=sorted(client.symbols)))
            elif action is None:
                raise ProtocolError("missing_field", "'action' is required: subscribe, unsubscribe, ping or list")
            else:
                shown = action if isinstance(action, str) else repr(action)
                raise ProtocolError(
                    "unknown_action", f"unknown action {shown[:40]!r}; expected subscribe, unsubscribe, ping or list"
                )
        except ProtocolError as exc:
            self._error(client, exc.code, exc.message, action)
