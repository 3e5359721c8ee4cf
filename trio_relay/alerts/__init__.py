"""Price alerts: rules per user and symbol, evaluated on every update, stored, sent to webhooks.

The pieces, wired by the daemon (not here)::

    store = AlertStore(app_store)
    engine = AlertEngine(config.alerts, on_watch=keep_subscribed)  # (symbol, True/False)
    engine.load(await store.load())
    sender = WebhookSender(config.alerts)
    await nursery.start(sender.run)
    # REST: rule = engine.create(owner, body, cache=hub.cache)  (RuleError -> 400 {code, message})
    #       await store.save_rule(rule); engine.remove(owner, id) + await store.delete_rule(id)
    # hub sync callback, per update (one dict lookup for a symbol without rules):
    #     alerts = engine.on_update(update, hub.cache[update.symbol])
    # and engine.run_stale_checks(deliver) in the nursery (or engine.check_stale() every second).
    # For each fired alert: push it to the owner's clients, hand
    # store.record_fired(alert, engine.get(alert.rule_id)) to a writer task (the callback is
    # sync), and sender.offer(alert, rule.webhook) when the rule has a webhook.

Semantics a client may rely on (see also :mod:`.engine`):

- ``above`` / ``below`` fire at the first update where the price (``field``: last, bid, ask or
  mid) is at/above (at/below) ``level`` after one where it was below (above): exactly once per
  crossing, including when the price jumps over the level. A rule created while the price is
  already beyond the level is ``armed``: it waits for the price to come back to the near side
  and fires on the next crossing, never at once (an alert says something happened, not that
  something is true). With no known price at creation it is armed too.
- ``move``: ``pct > 0`` fires when the price is ``pct`` % or more above the lowest price of the
  last ``window_s`` seconds of event time; ``pct < 0`` when it is ``-pct`` % or more below the
  highest. Symbols with move rules keep a bounded window (256 slots per window length).
- ``spread``: ask - bid strictly wider than ``max_spread`` (absolute) or ``max_spread_bps``
  (basis points of mid); a crossed or locked book is never wide.
- ``stale``: no update for ``seconds`` (engine clock, checked by ``check_stale``); counting
  starts when the rule is added. Fires once per silence.
- ``one_shot`` (default): fires once, then stays ``fired`` (also across restarts). Otherwise the
  rule re-arms after ``cooldown_s`` (event time; stale: engine clock) *and* once the condition
  is false again: a crossing that happens during the cooldown does not fire later. Stale rules
  re-arm once an update has arrived and the cooldown has passed.
"""

from .engine import AlertEngine
from .rules import (
    AboveRule,
    BelowRule,
    FiredAlert,
    MoveRule,
    Rule,
    RuleError,
    SpreadRule,
    StaleRule,
    decode_rule,
    encode_rule,
    parse_rule,
    rule_params,
)
from .store import AlertStore
from .targets import WebhookPolicy, WebhookRefused, webhook_policy
from .webhook import WebhookSender, WebhookStats

__all__ = [
    "AlertEngine",
    "AlertStore",
    "WebhookSender",
    "WebhookStats",
    "WebhookPolicy",
    "WebhookRefused",
    "webhook_policy",
    "Rule",
    "AboveRule",
    "BelowRule",
    "MoveRule",
    "SpreadRule",
    "StaleRule",
    "FiredAlert",
    "RuleError",
    "parse_rule",
    "rule_params",
    "encode_rule",
    "decode_rule",
]
