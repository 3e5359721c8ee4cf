"""Webhook delivery of fired alerts: POST the alert's JSON to the rule's URL, retried, never blocking.

:meth:`WebhookSender.offer` is synchronous and never waits (the engine calls it from the hub's
hot path): the alert is queued, or, when ``webhook_queue`` alerts are already pending (queued,
in flight or waiting for a retry), dropped and counted. :meth:`WebhookSender.run` delivers them.

Each pending alert is one task in the sender's nursery (at most ``webhook_queue`` of them), so
an alert waiting for its retry holds nothing but its task: one receiver that is down or slow
never holds up the others. Requests in flight are bounded twice: ``concurrency`` in all and
``per_host`` per receiver (scheme, host and port), so a slow receiver cannot take every connection.

An attempt succeeds on a 2xx answer. A timeout (``webhook_timeout`` for the whole request), a
connection error, a 5xx, 408 or 429 is retried after ``backoff * 2**(n-1)`` seconds (capped at
``backoff_cap``), up to ``webhook_attempts`` attempts in all; any other status (a 4xx: the URL
is wrong) gives up at once. Giving up is counted (``failed``) and logged once per alert. Redirects
are not followed. The request carries ``X-Alert-Id`` so a receiver can drop a retried duplicate.
"""

from __future__ import annotations

import logging
from typing import Final
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from ..config import AlertsConfig
from .rules import FiredAlert
from .targets import WebhookRefused, webhook_policy

__all__ = ["WebhookSender", "WebhookStats"]

log = logging.getLogger(__name__)

USER_AGENT: Final = "trio-relay-alerts"
_RETRYABLE_4XX: Final = (408, 429)


class WebhookStats:
    """Counters since start (for /metrics and /status)."""

    __slots__ = ("delivered", "failed", "dropped", "retries", "refused")

    def __init__(self) -> None:
        self.delivered = 0  # alerts a receiver accepted (2xx)
        self.failed = 0  # alerts given up (attempts exhausted, or a 4xx)
        self.dropped = 0  # alerts not queued: webhook_queue alerts already pending
        self.retries = 0  # attempts after the first
        self.refused = 0  # alerts whose host is no longer allowed, or resolves to a refused address

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class _Job:
    __slots__ = ("alert_id", "url", "host", "body")

    def __init__(self, alert_id: str, url: str, host: str, body: bytes) -> None:
        self.alert_id = alert_id
        self.url = url
        self.host = host
        self.body = body


class WebhookSender:
    """Delivers fired alerts to webhooks; start :meth:`run` in a nursery, then :meth:`offer`."""

    def __init__(
        self,
        config: AlertsConfig,
        *,
        concurrency: int = 8,
        per_host: int = 2,
        backoff: float = 1.0,
        backoff_cap: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.stats = WebhookStats()
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.per_host = per_host
        self._transport = transport
        self._encoder = msgspec.json.Encoder()
        # As deep as the pending bound: offer() checks that bound first, so a send never waits.
        self._send, self._receive = trio.open_memory_channel[_Job](config.webhook_queue)
        self._requests = trio.CapacityLimiter(concurrency)
        self._hosts: dict[str, trio.CapacityLimiter] = {}
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        """Alerts queued, in flight or waiting for a retry."""
        return self._pending

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.backoff_cap, self.backoff * 2 ** (attempt - 1)))

    def offer(self, alert: FiredAlert, url: str) -> bool:
        """Queue ``alert`` for ``url``; False if it was dropped (queue full) or refused (host not
        allowed any more, or no URL). Never blocks."""
        try:
            parts = urlsplit(url)
            host, port = (parts.hostname or "").lower(), parts.port
        except ValueError:  # rules are validated when created: only a hand-edited database
            host, port = "", None
        allowed = self.config.webhook_allowed_hosts
        if not host or (allowed and host not in {h.lower() for h in allowed}):
            self.stats.refused += 1
            log.warning("[WEBHOOK] alert %s not sent: host %r is not allowed (webhook_allowed_hosts)", alert.id, host)
            return False
        if self._pending >= self.config.webhook_queue:
            self.stats.dropped += 1
            return False
        try:
            receiver = f"{parts.scheme}://{host}:{port or ''}"  # per_host counts per receiver
            self._send.send_nowait(_Job(alert.id, url, receiver, self._encoder.encode(alert)))
        except trio.WouldBlock:
            self.stats.dropped += 1
            return False
        self._pending += 1
        if self._pending == 1:
            self._idle = trio.Event()
        return True

    async def wait_idle(self) -> None:
        """Wait until nothing is pending (delivered or given up); for tests and a graceful stop."""
        while self._pending:
            await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver offered alerts until cancelled (alerts still pending then are lost)."""
        async with httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(self.config.webhook_timeout),
            follow_redirects=False,
            headers={"user-agent": USER_AGENT},
        ) as client:
            async with trio.open_nursery() as nursery:
                task_status.started()
                async for job in self._receive:
                    nursery.start_soon(self._deliver, client, job)

    async def _deliver(self, client: httpx.AsyncClient, job: _Job) -> None:
        try:
            attempts = self.config.webhook_attempts
            for attempt in range(1, attempts + 1):
                error, permanent = await self._attempt(client, job)
                if error is None:
                    self.stats.delivered += 1
                    return
                log.debug(
                    "[WEBHOOK] alert %s to %s: attempt %d failed: %s", job.alert_id, _where(job.url), attempt, error
                )
                if permanent or attempt == attempts:
                    self.stats.failed += 1
                    log.warning(
                        "[WEBHOOK] alert %s to %s given up after %d attempt%s: %s",
                        job.alert_id,
                        _where(job.url),
                        attempt,
                        "" if attempt == 1 else "s",
                        error,
                    )
                    return
                self.stats.retries += 1
                await trio.sleep(self.backoff_delay(attempt))
        finally:
            self._pending -= 1
            if not self._pending:
                self._idle.set()

    async def _attempt(self, client: httpx.AsyncClient, job: _Job) -> tuple[str | None, bool]:
        """One POST: (None, _) if delivered, else (why, whether retrying is pointless)."""
        limiter = self._hosts.get(job.host)
        if limiter is None:
            limiter = self._hosts[job.host] = trio.CapacityLimiter(self.per_host)
        try:
            async with limiter, self._requests:
                with trio.move_on_after(self.config.webhook_timeout) as scope:
                    request = await self._vetted_request(client, job)
                    response = await client.send(request)
                if scope.cancelled_caught:
                    return f"no answer within {self.config.webhook_timeout:g}s", False
        except WebhookRefused as e:
            self.stats.refused += 1
            return str(e), True
        except (httpx.HTTPError, OSError) as e:
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, False
        finally:
            if not limiter.borrowed_tokens and not limiter.statistics().tasks_waiting:
                self._hosts.pop(job.host, None)
        status = response.status_code
        if 200 <= status < 300:
            return None, False
        return f"HTTP {status}", 400 <= status < 500 and status not in _RETRYABLE_4XX

    async def _vetted_request(self, client: httpx.AsyncClient, job: _Job) -> httpx.Request:
        """The POST of ``job``, addressed to an address of its host that the policy allows now.

        The host is resolved for this attempt (:meth:`WebhookPolicy.vet`: every address must be
        allowed), and the request goes to the first address, not to the name again, so a name
        that changes its answer between the check and the connect (DNS rebinding) cannot steer
        it. The URL's host stays in ``Host``, and in TLS's SNI and certificate check.
        """
        url = httpx.URL(job.url)
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await webhook_policy(self.config).vet(url.host, port)
        headers = {"content-type": "application/json", "x-alert-id": job.alert_id, "host": url.netloc.decode("ascii")}
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        return client.build_request(
            "POST", url.copy_with(host=str(addresses[0])), content=job.body, headers=headers, extensions=extensions
        )


def _where(url: str) -> str:
    """scheme://host:port of a URL: paths and queries of webhooks often hold secrets, kept out of logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
