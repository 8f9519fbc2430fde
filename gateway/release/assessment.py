"""A rollout's evidence as the policy reads it, and its current assessment.

The controller decides on it every interval; `gateway status` and `gateway
report` show the same assessment at any moment (which checks wait, their
estimates and intervals, and how many more samples each needs), computed on
demand from the same evidence, so what a person reads is what the controller
would do next.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from gateway.release.compare import pair_since, window_since
from gateway.release.plane import ReleasePlane
from gateway.release.policy import DECIDING, Decision, Phase, RolloutEvidence, RolloutState, Windows, decide
from gateway.release.store import Store


def rollout_evidence(plane: ReleasePlane, model: str, rollout: RolloutState, now: float) -> RolloutEvidence:
    """Every worker's evidence since the rollout began, and since its current step began, and
    the external checks' verdicts on their latest readings."""
    local = plane.evidence[model]
    combined = plane.combined(model)
    stable, candidate, pair = combined.rollout_windows()
    step = None
    if local.step_base is not None:
        base_stable, base_candidate, base_pair = local.step_base
        step = Windows(
            window_since(stable, base_stable), window_since(candidate, base_candidate), pair_since(pair, base_pair)
        )
    evidence = RolloutEvidence(stable, candidate, pair, step, time.monotonic() - local.step_began)
    if combined.rollout_shift is not None:
        evidence.shift = combined.rollout_shift  # prediction drift on copies (policy.max_drift)
    spec = plane.registry.entry(model).spec.policy
    if spec.checks:
        evidence.external = plane.external.results(
            model, spec.checks, since=rollout.started_at, now=now, interval_s=spec.interval_s
        )
    return evidence


def assess(plane: ReleasePlane, model: str, rollout: RolloutState, now: float) -> Decision | None:
    """What the policy makes of the evidence now; None outside a rollout. A paused rollout
    is assessed as if resumed now (its phase before the pause, max_duration_s counting
    afresh): what a person resuming it would get."""
    if rollout.phase is Phase.PAUSED:
        rollout = dataclasses.replace(rollout, phase=rollout.resume_to, timed_from=now)
    if rollout.phase not in DECIDING or plane.evidence[model].rollout is None:
        return None
    spec = plane.registry.entry(model).spec.policy
    return decide(rollout, rollout_evidence(plane, model, rollout, now), spec, now)


# The trailing metadata key under which the control API sends `rollout_view` (JSON, UTF-8)
# with GetRelease and GetReport: the Release message has no field for it yet.
ROLLOUT_METADATA_KEY = "x-gateway-rollout-bin"


def rollout_view(plane: ReleasePlane, store: Store, model: str, rollout: RolloutState, now: float) -> dict[str, Any]:
    """What `gateway status` and `gateway report` show about a model's rollout: why it is in
    its phase (the last applied change) and what the policy makes of the evidence now, each
    waiting check with its estimate, interval and the samples it still needs."""
    view: dict[str, Any] = {"model": model, "phase": rollout.phase.value, "step": rollout.step}
    # The approval gate it waits at (policy.approve_before), e.g. "25"; None when not waiting.
    view["awaiting_approval"] = rollout.awaiting or None
    last = store.last_applied(model)
    if last is not None:
        view["last_change"] = {"at": last.at, "actor": last.actor, "action": last.action, "reason": last.reason}
    decision = assess(plane, model, rollout, now)
    if decision is not None:
        # While paused nothing happens by itself: this is what a resume would lead to.
        view["if_resumed" if rollout.phase is Phase.PAUSED else "next"] = decision.event.value
        view["reason"] = decision.reason
        view["checks"] = [c.to_dict() for c in decision.checks]
    return view
