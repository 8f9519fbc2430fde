"""Rollout events, derived from what the gateway already records.

Every change to a release is an audit row (gateway.release.operations), so the
events are read off the rows as they are appended: a row's action and outcome name
the event, its after-state and evidence are the event's details. Nothing else has
to remember to announce a change, and a new code path that changes a release (the
approval gates' "await_approval" and "approve" rows, say) is announced as soon as
it is audited. The one event with no audit row is a shadow's circuit opening: it is
a process's local protection, reported by the shadow lane that opened it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.release.store import AuditEntry, AuditOutcome

# Audit actions applied -> event names (gateway/config/notify.py lists every event).
APPLIED_EVENTS: Mapping[str, str] = {
    "start_rollout": "rollout_started",
    "advance": "step_advanced",
    "await_approval": "awaiting_approval",
    "approve": "approved",
    "promote": "promoted",
    "rollback": "rolled_back",
}
# A start refused with a failed check in its evidence is the load-test gate failing
# (gateway.release.gate): the other refusals of a start (an illegal transition, a version
# already stable) carry no checks, or only passed ones.
GATE_FAILED = "gate_failed"
CIRCUIT_OPENED = "shadow_circuit_opened"
# Event ids are UUIDs derived from what they announce, so a receiver can deduplicate
# retries (and the same row seen twice) by id alone.
_ID_NAMESPACE = uuid.UUID("6f1d3c4e-2b8a-4c1e-9f0a-5d7e8b9c0a1f")


def _source() -> str:
    """Which process sent it (host:pid): receivers of several replicas tell them apart."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class NotifyEvent:
    """One event as every target kind receives it (each kind renders it its own way)."""

    id: str
    event: str  # one of gateway.config.notify.EVENT_NAMES
    model: str
    at: float  # unix seconds, when it happened
    actor: str
    reason: str
    revision: int | None = None
    # The release after the change: stable, canary, weight (percent), phase, step, candidate.
    release: Mapping[str, Any] = field(default_factory=dict)
    checks: Any = None  # the decision's evidence, as audited (a list of check dicts), if any
    version: str = ""  # the shadow whose circuit opened
    source: str = field(default_factory=_source)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "event": self.event,
            "model": self.model,
            "at": self.at,
            "actor": self.actor,
            "reason": self.reason,
            "source": self.source,
        }
        if self.revision is not None:
            data["revision"] = self.revision
        if self.release:
            data["release"] = dict(self.release)
        if self.checks is not None:
            data["checks"] = self.checks
        if self.version:
            data["version"] = self.version
        return data


def _release(after: Mapping[str, Any] | None) -> dict[str, Any]:
    if not after:
        return {}
    rollout = after.get("rollout") or {}
    return {
        "stable": after.get("stable", ""),
        "canary": after.get("canary", ""),
        "canary_weight_pct": after.get("canary_weight_bp", 0) / 100,
        "phase": str(rollout.get("phase", "")),
        "step": rollout.get("step", 0),
        "candidate": rollout.get("candidate", ""),
    }


def _has_failed_check(evidence: Any) -> bool:
    return isinstance(evidence, list) and any(isinstance(c, dict) and c.get("verdict") == "fail" for c in evidence)


def from_audit(entry: AuditEntry) -> NotifyEvent | None:
    """The event an audit row announces, or None for rows that announce none (init, a traffic set by hand...)."""
    if entry.outcome is AuditOutcome.APPLIED:
        name = APPLIED_EVENTS.get(entry.action)
    elif entry.action == "start_rollout" and _has_failed_check(entry.evidence):
        name = GATE_FAILED
    else:
        name = None
    if name is None:
        return None
    key = f"{entry.model}|{entry.action}|{entry.outcome.value}|{entry.revision}|{entry.at!r}"
    return NotifyEvent(
        id=str(uuid.uuid5(_ID_NAMESPACE, key)),
        event=name,
        model=entry.model,
        at=entry.at,
        actor=entry.actor,
        reason=entry.reason,
        revision=entry.revision,
        release=_release(entry.after if entry.after is not None else entry.before),
        checks=entry.evidence,
    )


def circuit_opened(model: str, version: str, opened: int, at: float, failures: int) -> NotifyEvent:
    """A shadow's circuit opened (its `opened`-th time in this process), after `failures` failed runs in a row."""
    return NotifyEvent(
        id=str(uuid.uuid5(_ID_NAMESPACE, f"{model}|{version}|circuit|{_source()}|{opened}|{at!r}")),
        event=CIRCUIT_OPENED,
        model=model,
        at=at,
        actor="gateway",
        reason=f"shadow {version} failed {failures} runs in a row: its copies stop until a probe succeeds",
        version=version,
    )
