"""Delivering notifications off the hot path: a bounded queue and a sender task per target.

`Notifier.publish` only puts the event on each interested target's queue
(`put_nowait`): a decision or a request that announces something never waits for a
receiver. When a queue is full the event is dropped for that target and counted.
Each target has its own sender, so a receiver that is down or slow holds up only its
own queue, never another target's. A sender tries an event `1 + max_retries` times,
each attempt bounded by `timeout_s`, with exponential backoff and jitter in between
(gateway/release/notify/backoff.py); a 2xx answer delivers it, a 4xx other than 408,
425 or 429 is final (retrying the same body gets the same answer).

Every outcome is a structured log line (event id, target, outcome, attempts, last
result) and a count in gateway_notifications_total{target,event,outcome}.

Which process sends: the one that appends the audit row (gateway/server/gateway.py
builds a notifier only where release changes are made). Each row is appended once,
by one process, so each event goes out once per target, not once per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import httpx

from gateway.config.notify import EVENT_NAMES, NotifyTarget
from gateway.logthrottle import ThrottledLog
from gateway.release.notify import signing
from gateway.release.notify.backoff import Backoff
from gateway.release.notify.events import NotifyEvent, circuit_opened, from_audit
from gateway.release.notify.metrics import NotifyMetrics
from gateway.release.notify.payloads import slack_body, webhook_body
from gateway.release.notify.secrets import Secret, load_secret
from gateway.release.store import AuditEntry

log = logging.getLogger(__name__)

# Events waiting per target. Rollout events come a few a minute; a thousand queued means
# the receiver has been down for a long while, and older news matters less than memory.
QUEUE_SIZE = 1000
# At shutdown, what is queued gets this long (at most: never past the drain's grace) to go out.
CLOSE_GRACE_S = 2.0
# 4xx answers worth retrying: timeout, too early, too many requests.
RETRY_STATUSES = frozenset({408, 425, 429})
USER_AGENT = "release-gateway-notifier"

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event's outcome at one target: the delivery log's line."""

    event_id: str
    event: str
    model: str
    target: str
    outcome: str  # delivered, failed, dropped (gateway/release/notify/metrics.py)
    attempts: int
    result: str  # the last attempt's: 2xx, an HTTP status, timeout, error, queue full, stopped
    seconds: float


class TargetSender:
    """One target: its queue, its sender loop, its attempts."""

    def __init__(
        self,
        target: NotifyTarget,
        secret: Secret | None,
        client: httpx.AsyncClient,
        metrics: NotifyMetrics,
        *,
        backoff: Backoff = Backoff(),  # noqa: B008 -- frozen, so one shared default is safe
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.target = target
        self._secret = secret
        self._client = client
        self._metrics = metrics
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self.queue: asyncio.Queue[NotifyEvent] = asyncio.Queue(queue_size)
        self._dropped_log = ThrottledLog(log)
        metrics.start(target.name, EVENT_NAMES)

    def offer(self, event: NotifyEvent) -> None:
        """Queue the event if this target wants it; never waits (a full queue drops it)."""
        if not self.target.wants(event.event, event.model):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.record(self._unsent(event, "queue full"))
            return
        self._metrics.queued.labels(self.target.name).inc()

    async def run(self) -> None:
        while True:
            event = await self.queue.get()
            self._metrics.queued.labels(self.target.name).dec()
            try:
                self.record(await self.deliver(event))
            except asyncio.CancelledError:
                self.record(self._unsent(event, "stopped"))  # the gateway stopped mid-delivery
                raise
            except Exception:  # the loop must outlive any one bad event
                log.exception("notify %s: delivering %s failed", self.target.name, event.id)
            finally:
                self.queue.task_done()

    async def deliver(self, event: NotifyEvent) -> Delivery:
        """Every attempt at one event, with backoff between them."""
        body = slack_body(event) if self.target.kind == "slack" else webhook_body(event)
        started = time.monotonic()
        result = ""
        attempts = 0
        for retry in range(self.target.max_retries + 1):
            if retry:
                await self._sleep(self._backoff.delay(retry, self._rng))
            attempts += 1
            result, again = await self.attempt(body)
            self._metrics.attempts.labels(self.target.name, result).inc()
            if result == "2xx" or not again:
                break
        outcome = "delivered" if result == "2xx" else "failed"
        return Delivery(
            event.id, event.event, event.model, self.target.name, outcome, attempts, result, time.monotonic() - started
        )

    async def attempt(self, body: bytes) -> tuple[str, bool]:
        """One POST: (its result, whether another attempt may do better)."""
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self._secret is not None:
            # Signed afresh each attempt: the timestamp says when this attempt was sent.
            headers.update(signing.headers(self._secret.value, int(self._clock()), body))
        try:
            # One bound on the whole attempt (connect, send, answer): httpx's own timeouts
            # bound each read, and a receiver that trickles bytes would outlast them.
            async with asyncio.timeout(self.target.timeout_s):
                response = await self._client.post(self.target.url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            return "timeout", True
        except httpx.HTTPError as exc:
            # Connection refused, reset, a name that does not resolve: the type says which;
            # the message may quote the URL, which may hold a secret (Slack's do).
            return f"error: {type(exc).__name__}", True
        status = response.status_code
        if 200 <= status < 300:
            return "2xx", False
        return str(status), status >= 500 or status in RETRY_STATUSES

    def record(self, delivery: Delivery) -> None:
        self._metrics.notifications.labels(delivery.target, delivery.event, delivery.outcome).inc()
        extra = asdict(delivery)
        line = "notify %s: %s %s of %s %s after %d attempt(s) (%s)"
        args = (delivery.target, delivery.event, delivery.event_id, delivery.model, delivery.outcome)
        if delivery.outcome == "delivered":
            log.info(line, *args, delivery.attempts, delivery.result, extra=extra)
        elif delivery.outcome == "dropped":
            # A full queue drops every event until it drains: a line now and then says how many.
            self._dropped_log.log(logging.WARNING, delivery.target, line, *args, delivery.attempts, delivery.result)
        else:
            log.warning(line, *args, delivery.attempts, delivery.result, extra=extra)

    def _unsent(self, event: NotifyEvent, why: str) -> Delivery:
        return Delivery(event.id, event.event, event.model, self.target.name, "dropped", 0, why, 0.0)

    def drop_queued(self) -> None:
        """At shutdown: what is still queued is counted dropped (never silently lost)."""
        while not self.queue.empty():
            event = self.queue.get_nowait()
            self._metrics.queued.labels(self.target.name).dec()
            self.record(self._unsent(event, "stopped"))
            self.queue.task_done()


class Notifier:
    """Every target's sender; the hooks the release plane and ReleaseOps call."""

    def __init__(self, senders: Sequence[TargetSender], client: httpx.AsyncClient, clock: Callable[[], float]) -> None:
        self.senders = list(senders)
        self._client = client
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def build(
        cls,
        targets: Sequence[NotifyTarget],
        metrics: NotifyMetrics,
        environ: Mapping[str, str],
        *,
        clock: Callable[[], float] = time.time,
        backoff: Backoff = Backoff(),  # noqa: B008 -- frozen, so one shared default is safe
    ) -> Notifier:
        """Read every target's secret first (ConfigError naming the target), then make the senders."""
        secrets = [load_secret(index, target, environ) for index, target in enumerate(targets)]
        # No redirects: a signed body re-sent somewhere else is not what the operator configured.
        client = httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": USER_AGENT})
        senders = [
            TargetSender(target, secret, client, metrics, backoff=backoff, clock=clock)
            for target, secret in zip(targets, secrets, strict=True)
        ]
        return cls(senders, client, clock)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(sender.run()) for sender in self.senders]

    def publish(self, event: NotifyEvent) -> None:
        for sender in self.senders:
            sender.offer(event)

    def audit(self, entry: AuditEntry) -> None:
        """ReleaseOps' hook: every audit row appended, applied or refused."""
        event = from_audit(entry)
        if event is not None:
            self.publish(event)

    def circuit_opened(self, model: str, version: str, opened: int, failures: int) -> None:
        """The release plane's hook: a shadow's circuit opened in this process."""
        self.publish(circuit_opened(model, version, opened, self._clock(), failures))

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Give what is queued up to `grace_s` to go out, then stop; what is left is counted dropped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await asyncio.gather(*(sender.queue.join() for sender in self.senders))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sender in self.senders:
            sender.drop_queued()
        await self._client.aclose()
