"""The dashboard's JSON: snapshots of releases, rollouts and evidence, and a short history of them.

Everything is read in-process from the release plane and ReleaseOps, the same objects the
control API answers from, so the page and `gateway report` never disagree. A snapshot is
plain JSON (no NaN: absent numbers are null, weights are percent as the CLI takes them).

The history is a ring of samples per model taken every second by `History.run` on the
gateway's loop: a page opened in the middle of a rollout draws the story so far, then
appends the samples that come after the sequence number it last saw.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.logthrottle import ThrottledLog
from gateway.release.assessment import assess
from gateway.release.evidence import VersionReport
from gateway.release.operations import ReleaseOps
from gateway.release.plane import ModelReport, ReleasePlane
from gateway.release.policy import ACTIVE, Phase

log = logging.getLogger(__name__)

# One sample every 2 s, half an hour of them per model. A sample is a few kilobytes of
# Python objects (3 versions and a rollout's checks: ~3.6 KB), so the ring holds about
# 3 MB a model; an hour at one a second measured 13 MB, paid by every gateway.
SAMPLE_S = 2.0
HISTORY_SAMPLES = 900
# The audit records a model page shows, newest first.
AUDIT_LIMIT = 50
# Phases in which a rollout sits at one of the policy's traffic steps; the step is shown
# 1-based there, as `gateway status` shows it, and null elsewhere.
AT_A_STEP = frozenset({Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING})

Json = dict[str, Any]
# What a sample keeps of each version's figures: what the charts plot.
SAMPLED_VERSION_FIELDS = (
    "role", "p50_ms", "p99_ms", "error_rate", "accuracy", "accuracy_low", "accuracy_high",
    "labelled", "agreement", "requests",
)  # fmt: skip


def finite(x: float) -> float | None:
    """JSON has no NaN or infinity: an absent figure is null."""
    return x if math.isfinite(x) else None


def version_json(v: VersionReport) -> Json:
    served = v.requests > 0  # before its first request a version has no latency or error rate, not 0
    return {
        "version": v.version,
        "role": v.role,
        "requests": v.requests,
        "errors": v.errors,
        "error_rate": finite(v.error_rate) if served else None,
        "p50_ms": finite(v.p50_ms) if served else None,
        "p99_ms": finite(v.p99_ms) if served else None,
        "labelled": v.labelled,
        "accuracy": finite(v.accuracy),
        "accuracy_low": finite(v.accuracy_low),
        "accuracy_high": finite(v.accuracy_high),
        "compared_rows": v.compared_rows,
        "agreement": finite(v.agreement) if v.compared_rows else None,
    }


def alerts(checks: Iterable[Json], report: ModelReport) -> list[Json]:
    """What deserves a marker on the overview: red for a failing check, amber for an open shadow circuit."""
    found: list[Json] = [
        {"level": "red", "text": f"check {c['check']} fails"} for c in checks if c.get("verdict") == "fail"
    ]
    for version, shadow in sorted(report.shadows.items()):
        if shadow.circuit_open:
            found.append({"level": "amber", "text": f"shadow circuit of v{version} is open"})
    return found


@dataclass(slots=True)
class Sources:
    """The in-process objects a snapshot is read from."""

    plane: ReleasePlane
    ops: ReleaseOps
    # The last audit read per model and the store's change count it was read at: pages poll
    # every second or two, and the audit log is only read again once a release has changed.
    _audit: dict[str, tuple[int, list[Json]]] = field(default_factory=dict)

    def models(self) -> list[str]:
        return sorted(self.plane.table.models())

    def snapshot(self, model: str, now: float) -> Json:
        """One model now: its release, its rollout and what the policy makes of it, each version's figures."""
        report = self.plane.report(model)
        current = self.ops.current(model)
        state, rollout = report.release, current.rollout
        # What the policy makes of the evidence now: in process, with no store read (a snapshot
        # is taken on the event loop every sample; the store's lock may be held by a writer).
        decision = assess(self.plane, model, rollout, now) if rollout.phase in ACTIVE else None
        checks: list[Json] = [c.to_dict() for c in decision.checks] if decision is not None else []
        return {
            "model": model,
            "at": now,
            "stable": state.stable,
            "canary": state.canary,
            "weight_pct": state.canary_weight_bp / 100,
            "shadows": {v: f * 100 for v, f in sorted(state.shadows.items())},
            "revision": state.revision,
            "phase": rollout.phase.value,
            "step": rollout.step + 1 if rollout.phase in AT_A_STEP else None,
            "candidate": rollout.candidate,
            # The approval gate it waits at (policy.approve_before): "start", "25", "promote".
            "awaiting_approval": (rollout.awaiting or None) if rollout.phase in ACTIVE else None,
            "next": None if decision is None else decision.event.value,
            "reason": None if decision is None else decision.reason,
            "checks": checks,
            "versions": [version_json(v) for v in report.versions],
            "shadow_lanes": {
                v: {"circuit_open": s.circuit_open, "pending": s.pending, "completed": s.counters.completed}
                for v, s in sorted(report.shadows.items())
            },
            "labels_joined": report.feedback_joined,
            "alerts": alerts(checks, report),
        }

    def audit(self, model: str, limit: int = AUDIT_LIMIT) -> list[Json]:
        """The newest `limit` audit records of a model, newest first, each decision's checks as given."""
        store = self.ops.store
        changes = store.changes()
        cached = self._audit.get(model)
        if cached is not None and cached[0] == changes:
            return cached[1]
        # The store pages oldest first: count once to learn where the newest are.
        total = len(store.audit_log(model, limit=100_000))
        entries = store.audit_log(model, limit=limit, offset=max(0, total - limit))
        records = [
            {
                "id": e.id,
                "at": e.at,
                "actor": e.actor,
                "action": e.action,
                "outcome": str(e.outcome),
                "reason": e.reason,
                "revision": e.revision,
                "checks": e.evidence if isinstance(e.evidence, list) else [],
            }
            for e in reversed(entries)
        ]
        self._audit[model] = (changes, records)
        return records


def sample(snapshot: Json) -> Json:
    """The figures a chart plots from one snapshot (the history keeps these, not whole snapshots)."""
    return {
        "t": snapshot["at"],
        "phase": snapshot["phase"],
        "step": snapshot["step"],
        "weight_pct": snapshot["weight_pct"],
        "checks": {
            c["check"]: {k: c.get(k) for k in ("value", "low", "high", "bound", "verdict", "samples")}
            for c in snapshot["checks"]
        },
        "versions": {v["version"]: {k: v[k] for k in SAMPLED_VERSION_FIELDS} for v in snapshot["versions"]},
    }


class Snapshots(Protocol):
    """What the history samples: `Sources`, or in tests a source of made-up snapshots."""

    def models(self) -> list[str]: ...

    def snapshot(self, model: str, now: float) -> Json: ...


@dataclass(slots=True)
class History:
    """A ring of samples per model, numbered so a page can ask for what it has not seen."""

    sources: Snapshots
    limit: int = HISTORY_SAMPLES
    _rings: dict[str, deque[Json]] = field(default_factory=dict)
    _seq: int = 0

    def take(self, now: float | None = None) -> None:
        """Sample every model once; models no longer loaded are forgotten."""
        at = time.time() if now is None else now
        models = self.sources.models()
        for gone in set(self._rings) - set(models):
            del self._rings[gone]
        for model in models:
            self._seq += 1
            point = sample(self.sources.snapshot(model, at))
            point["seq"] = self._seq
            self._rings.setdefault(model, deque(maxlen=self.limit)).append(point)

    def since(self, model: str, seq: int) -> list[Json]:
        """The model's samples numbered after `seq` (all of them for 0), oldest first. The ring
        is copied first (one C-level pass), so a caller may filter it off the loop."""
        ring = list(self._rings.get(model, ()))
        return [p for p in ring if p["seq"] > seq]

    async def run(self, interval_s: float = SAMPLE_S) -> None:
        """Sample until cancelled (a task on the gateway's loop). A sample that fails is
        logged (once in a while) and skipped: the charts must not freeze for good."""
        failures = ThrottledLog(log)
        while True:
            try:
                self.take()
            except Exception as exc:
                failures.log(logging.WARNING, "sample", "dashboard: sampling the models failed: %r", exc)
            await asyncio.sleep(interval_s)


def overview(sources: Sources, now: float) -> Json:
    """Every model at a glance, for `/`."""
    models = []
    for model in sources.models():
        snap = sources.snapshot(model, now)
        models.append({k: snap[k] for k in ("model", "stable", "canary", "weight_pct", "shadows", "phase")} | {
            "step": snap["step"],
            "candidate": snap["candidate"],
            "next": snap["next"],
            "awaiting_approval": snap.get("awaiting_approval"),
            "alerts": snap["alerts"],
        })  # fmt: skip
    return {"at": now, "models": models}
