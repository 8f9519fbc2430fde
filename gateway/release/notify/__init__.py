"""Notifications of rollout events to webhooks and Slack (README: "Notifications").

events (read off audit rows, and a shadow's circuit opening) · payloads (the
generic webhook's JSON, Slack's message) · signing (HMAC-SHA256 over
"<timestamp>.<body>") · backoff (the retry schedule) · secrets (the keys, read at
start) · metrics · sender (a bounded queue and a sender task per target).
"""

from gateway.release.notify.metrics import NotifyMetrics
from gateway.release.notify.sender import Notifier

__all__ = ["Notifier", "NotifyMetrics"]
