"""Notification counters, on the injected registry (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# What became of a notification at one target:
#   delivered: a 2xx answer; failed: no 2xx after every attempt (or a refusal not worth retrying);
#   dropped: its target's queue was full, or the gateway stopped before it was sent.
OUTCOMES = ("delivered", "failed", "dropped")


class NotifyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notifications = Counter(
            "gateway_notifications",
            "Rollout notifications by target, event and outcome (delivered, failed, dropped).",
            ["target", "event", "outcome"],
            registry=registry,
        )
        self.attempts = Counter(
            "gateway_notification_attempts",
            "HTTP attempts to deliver notifications, by target and result (2xx, an HTTP status, timeout, error).",
            ["target", "result"],
            registry=registry,
        )
        self.queued = Gauge(
            "gateway_notifications_queued",
            "Notifications waiting for their target's sender (bounded; past the bound they are dropped).",
            ["target"],
            registry=registry,
            multiprocess_mode="livesum",
        )

    def start(self, target: str, events: tuple[str, ...]) -> None:
        """Every (target, event, outcome) at 0 from the start: the first failure is an increase Prometheus sees."""
        for event in events:
            for outcome in OUTCOMES:
                self.notifications.labels(target, event, outcome)
        self.queued.labels(target).set(0)
