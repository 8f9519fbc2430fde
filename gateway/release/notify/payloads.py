"""What each kind of target receives: the generic webhook's JSON, or a Slack message.

The webhook gets the whole event (the receiver decides what matters); Slack gets one
line of text people read, plus the same line as a block with the event's id and time
as context (Slack shows blocks, and falls back to `text` in notifications).
"""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.release.notify.events import NotifyEvent

# Slack's marks per event: read at a glance in a busy channel.
_ICONS = {
    "rollout_started": ":rocket:",
    "step_advanced": ":arrow_up:",
    "awaiting_approval": ":raised_hand:",
    "approved": ":white_check_mark:",
    "promoted": ":tada:",
    "rolled_back": ":rewind:",
    "gate_failed": ":no_entry:",
    "shadow_circuit_opened": ":zap:",
}
# Slack cuts a section's text at 3,000 characters; a reason is at most 1,024 (operations.py).
_MAX_TEXT = 2900


def webhook_body(event: NotifyEvent) -> bytes:
    return json.dumps(event.to_dict(), separators=(",", ":"), default=str).encode()


def summary(event: NotifyEvent) -> str:
    """One line: what happened to which model, and why."""
    release = event.release
    candidate = release.get("candidate") or release.get("canary") or ""
    what = {
        "rollout_started": f"rollout of v{candidate} started at {release.get('canary_weight_pct', 0):g} %",
        "step_advanced": f"v{candidate} advanced to {release.get('canary_weight_pct', 0):g} %",
        "awaiting_approval": f"v{candidate} is awaiting approval at {release.get('canary_weight_pct', 0):g} %",
        "approved": f"v{candidate} approved by {event.actor}",
        "promoted": f"v{release.get('stable', '?')} promoted: now stable",
        "rolled_back": f"v{candidate} rolled back; stable stays v{release.get('stable', '?')}",
        "gate_failed": "the load-test gate refused the rollout",
        "shadow_circuit_opened": f"shadow v{event.version}'s circuit opened",
    }.get(event.event, event.event)
    return f"{event.model}: {what} ({event.reason})"[:_MAX_TEXT]


def _escaped(text: str) -> str:
    """Slack's three control characters: a reason with "<" or "&" would otherwise read as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(event: NotifyEvent) -> bytes:
    text = f"{_ICONS.get(event.event, '')} {_escaped(summary(event))}".strip()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(event.at))
    context = f"{event.event} · {stamp} · by {event.actor} · id {event.id}"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
    ]
    return json.dumps({"text": text, "blocks": blocks}, separators=(",", ":")).encode()
