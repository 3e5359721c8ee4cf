"""Alerts in the running relay: rules evaluated on the hub's updates, fired alerts delivered.

A fired alert goes to every WebSocket connection of its owner (``{"type":"alert",...}``, never
conflated), to the rule's webhook (if any; :class:`~trio_relay.alerts.WebhookSender`), and to
the store (fired alerts and the rule's new state survive a restart, and so does each change of
state that decides the next crossing: armed -> active, the end of a cooldown). Nothing here waits in the
hub's path: evaluation is synchronous and cheap (:class:`~trio_relay.alerts.AlertEngine`), and
what must reach the database goes through a bounded channel to one writer task (full: counted,
logged, never blocking).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
import trio

from ..entitlements import Entitlement, EntitlementError
from ..model import Update, control, ws_text_frame
from ..portfolio.service import owner_of
from .engine import AlertEngine
from .rules import FiredAlert, Rule, RuleError
from .store import AlertStore
from .targets import WebhookRefused, webhook_policy
from .webhook import WebhookSender

if TYPE_CHECKING:
    from ..hub import Client, Hub

__all__ = ["AlertService"]

log = logging.getLogger("trio_relay.alerts")

# Store operations waiting for the writer task.
STORE_QUEUE = 10_000
# WebSocket rule creations in progress (resolving a webhook, reading the user's portfolios);
# beyond, refused with "busy".
PENDING_CREATIONS = 100
# Longest a fired-alerts read waits for the store writer to catch up (then it reads anyway).
SETTLE_TIMEOUT = 2.0

_encoder = msgspec.json.Encoder()

# ("save", rule, None) | ("state", rule, None) | ("delete", rule_id, None) | ("fired", alert, rule)
_Op = tuple[str, Any, Any]


class AlertService:
    def __init__(
        self,
        hub: Hub,
        engine: AlertEngine,
        store: AlertStore,
        sender: WebhookSender,
        *,
        held_elsewhere: Callable[[str], Awaitable[set[str]]] | None = None,
    ) -> None:
        self.hub = hub
        # The other symbols a user holds (their portfolios'): one symbol budget covers both.
        self.held_elsewhere = held_elsewhere
        self.engine = engine
        self.store = store
        self.sender = sender
        self.store_dropped = 0
        self._send, self._receive = trio.open_memory_channel[_Op](STORE_QUEUE)
        self._queued = 0  # store operations accepted into the queue
        self._stored = 0  # of those, finished by the writer (written or failed)
        self._progress = trio.Event()  # set (and replaced) at each finished operation
        self._written = trio.Event()  # the writer task took everything and ended
        self._nursery: trio.Nursery | None = None  # run()'s: WebSocket creations in progress
        self._creating = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sender.run)
            nursery.start_soon(self._write)
            nursery.start_soon(self._stale_checks)
            self._nursery = nursery
            task_status.started()

    # ------------------------------------------------------------------ rules
    def create(
        self,
        owner: str,
        data: Mapping[str, Any] | bytes | str,
        entitlement: Entitlement,
        *,
        also_held: Collection[str] = (),
    ) -> Rule:
        """Validate and add a rule; it is saved in the background.

        Refused with :class:`RuleError` (a bad rule) or
        :class:`~trio_relay.entitlements.EntitlementError` (a symbol the token does not allow, or
        one more than the user's symbol budget: the symbols of their live rules plus
        ``also_held``, see :meth:`create_checked`). The rule pins its symbol upstream only if
        ``entitlement.may_pin``.
        """

        def admit(rule: Rule) -> None:
            entitlement.require([rule.symbol])
            entitlement.require_budget(self.engine.owner_symbols(owner) | set(also_held), [rule.symbol])

        rule = self.engine.create(owner, data, cache=self.hub.cache, pins=entitlement.may_pin, admit=admit)
        self._queue(("save", rule, None))
        log.info("[ALERT] %s created rule %s on %s", owner, rule.id, rule.symbol)
        return rule

    async def vet_webhook(self, data: Mapping[str, Any]) -> None:
        """Resolve the webhook's host of a rule about to be created: RuleError if it may not be reached.

        The synchronous :meth:`create` refuses literal non-public addresses and ``localhost``
        names; this resolves names too (every address must be allowed, see
        :mod:`trio_relay.alerts.targets`). A rule without a webhook, or one :meth:`create` will
        refuse anyway, passes. Bounded by ``alerts.webhook_timeout``.
        """
        url = data.get("webhook")
        if not isinstance(url, str):
            return
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return
        if not host:
            return
        config = self.engine.config
        try:
            with trio.fail_after(config.webhook_timeout):
                await webhook_policy(config).vet(host, port)
        except WebhookRefused as exc:
            raise RuleError("webhook_refused", str(exc)) from None
        except (OSError, trio.TooSlowError):
            raise RuleError("webhook_refused", f"webhook host {host[:80]!r} does not resolve") from None

    async def create_checked(self, owner: str, data: Mapping[str, Any], entitlement: Entitlement) -> Rule:
        """:meth:`create` after the checks that must wait: the webhook's host resolved
        (:meth:`vet_webhook`), and the user's portfolio symbols read for their symbol budget."""
        await self.vet_webhook(data)
        held = await self.held_elsewhere(owner) if self.held_elsewhere is not None else set()
        return self.create(owner, data, entitlement, also_held=held)

    def create_for(self, client: Client, owner: str, data: Mapping[str, Any], entitlement: Entitlement) -> None:
        """A WebSocket ``alert_create``: :meth:`create_checked` in a task, the reply sent when done.

        The reply (``alert_created`` or an ``error``) goes to ``client``; other messages of the
        connection are handled meanwhile. At most ``PENDING_CREATIONS`` creations wait at once
        (beyond: ``busy``); each is a task of this service, ended with it.
        """
        if self._nursery is None or self._creating >= PENDING_CREATIONS:
            self.hub.send_control(
                client,
                control(
                    "error", code="busy", message="too many alert rules being created; retry", action="alert_create"
                ),
            )
            return
        self._creating += 1
        self._nursery.start_soon(self._create_vetted, client, owner, data, entitlement)

    async def _create_vetted(
        self, client: Client, owner: str, data: Mapping[str, Any], entitlement: Entitlement
    ) -> None:
        try:
            created = await self.create_checked(owner, data, entitlement)
        except (RuleError, EntitlementError) as exc:
            self.hub.send_control(client, control("error", code=exc.code, message=exc.message, action="alert_create"))
        else:
            self.hub.send_control(client, control("alert_created", rule=msgspec.to_builtins(created)))
        finally:
            self._creating -= 1

    def delete(self, owner: str, rule_id: str) -> Rule:
        rule = self.engine.remove(owner, rule_id)
        if rule is None:
            raise RuleError("not_found", f"no alert rule {rule_id[:20]!r}")
        self._queue(("delete", rule_id, None))
        return rule

    def rules(self, owner: str) -> list[Rule]:
        return self.engine.rules(owner)

    async def fired(self, owner: str, *, limit: int = 50) -> list[FiredAlert]:
        """``owner``'s fired alerts from the store, newest first, including every alert fired
        before the call: it first waits (at most ``SETTLE_TIMEOUT``) for the store writer to
        finish the operations queued so far, so an alert just pushed over the WebSocket is listed."""
        target = self._queued
        with trio.move_on_after(SETTLE_TIMEOUT):
            while self._stored < target:
                await self._progress.wait()
        return await self.store.fired(owner, limit=limit)

    # ------------------------------------------------------------------ evaluation
    def on_update(self, update: Update) -> None:
        """Hub callback: a dict lookup for symbols without rules."""
        if update.symbol not in self.engine.symbols:
            return
        state = self.hub.cache.get(update.symbol)
        if state is None:
            return
        for alert in self.engine.on_update(update, state):
            self._fire(alert)
        for rule in self.engine.take_changed():  # rare: a rule crossed to the near side
            self._queue(("state", rule, None))

    async def _stale_checks(self) -> None:
        while True:
            await trio.sleep(1.0)
            for alert in self.engine.check_stale():
                self._fire(alert)

    def _fire(self, alert: FiredAlert) -> None:
        frame = ws_text_frame(_encoder.encode(alert))
        for client in list(self.hub.clients.values()):
            # Each connection gets it only if its own token allows the symbol now (the one that
            # created the rule may have had a wider one).
            if (
                owner_of(client) == alert.owner
                and client.entitlement is not None
                and client.entitlement.allows(alert.symbol)
            ):
                if not client.outbox.put_control(frame):
                    client.close(1008, "too many unread replies")
        rule = self.engine.get(alert.rule_id)
        self._queue(("fired", alert, rule))
        webhook = getattr(rule, "webhook", None) if rule is not None else None
        if webhook:
            self.sender.offer(alert, webhook)

    # ------------------------------------------------------------------ store
    def _queue(self, op: _Op) -> None:
        try:
            self._send.send_nowait(op)
            self._queued += 1
        except trio.ClosedResourceError:
            log.warning("[ALERT] shutting down: %s not saved", op[0])
        except trio.WouldBlock:
            self.store_dropped += 1
            if self.store_dropped <= 10 or self.store_dropped % 1000 == 0:
                log.warning("[ALERT] store queue full: %s not saved (%d so far)", op[0], self.store_dropped)

    async def aclose(self) -> None:
        """Stop taking store operations and wait for the writer to save those already queued."""
        self._send.close()
        await self._written.wait()

    async def _write(self) -> None:
        try:
            await self._write_all()
        finally:
            self._written.set()

    async def _write_all(self) -> None:
        async for op, subject, extra in self._receive:
            try:
                if op == "save":
                    await self.store.save_rule(subject)
                elif op == "state":
                    await self.store.save_state(subject)
                elif op == "delete":
                    await self.store.delete_rule(subject)
                else:
                    await self.store.record_fired(subject, extra)
            except Exception:
                log.exception("[ALERT] could not store a %s", op)
            finally:
                self._stored += 1
                self._progress.set()
                self._progress = trio.Event()
