"""The rollout policy: a state machine written as a transition table, and one pure decision step.

Phases: idle -> shadowing -> progressing(step k) -> promoting -> succeeded,
with paused reachable from shadowing and progressing, and rolled_back from
any active phase. An event that the table does not allow in the current
phase raises IllegalTransition; manual actions go through the same table.

`decide` looks at the evidence gathered since the rollout began and answers
what to do next; it has no clock, store or I/O of its own (time comes in).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.config.spec import PolicySpec
from gateway.errors import FailedPrecondition
from gateway.release.compare import LatencyHistogram, PairWindow, VersionWindow, bucket_edges
from gateway.release.confidence import Interval, Verdict, at_least, at_most, difference_cs, proportion_cs, quantile_cs
from gateway.types import BASIS_POINTS


class Phase(StrEnum):
    """A rollout's phase. The values are stored in the state database and sent by the
    control API as strings: never change one."""

    IDLE = "idle"
    SHADOWING = "shadowing"
    PROGRESSING = "progressing"
    PROMOTING = "promoting"
    SUCCEEDED = "succeeded"
    PAUSED = "paused"
    ROLLED_BACK = "rolled_back"


class Event(StrEnum):
    START = "start"
    START_SHADOW = "start_shadow"
    ADVANCE = "advance"
    FINISH = "finish"
    PROMOTE = "promote"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"
    SET_WEIGHT = "set_weight"
    HOLD = "hold"


ACTIVE = frozenset({Phase.SHADOWING, Phase.PROGRESSING, Phase.PROMOTING, Phase.PAUSED})
AT_REST = frozenset({Phase.IDLE, Phase.SUCCEEDED, Phase.ROLLED_BACK})
# The phases the controller decides in, and in which evidence gathers for the rollout.
DECIDING = frozenset({Phase.SHADOWING, Phase.PROGRESSING})

# (phase, event) -> next phase. Anything missing is illegal.
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    **{(p, Event.START): Phase.PROGRESSING for p in AT_REST},
    **{(p, Event.START_SHADOW): Phase.SHADOWING for p in AT_REST},
    **{(p, Event.SET_WEIGHT): p for p in (*AT_REST, Phase.PAUSED)},
    (Phase.SHADOWING, Event.ADVANCE): Phase.PROGRESSING,
    (Phase.PROGRESSING, Event.ADVANCE): Phase.PROGRESSING,
    (Phase.PROGRESSING, Event.FINISH): Phase.PROMOTING,
    (Phase.SHADOWING, Event.HOLD): Phase.SHADOWING,
    (Phase.PROGRESSING, Event.HOLD): Phase.PROGRESSING,
    (Phase.PROMOTING, Event.PROMOTE): Phase.SUCCEEDED,
    (Phase.PROGRESSING, Event.PROMOTE): Phase.SUCCEEDED,
    (Phase.PAUSED, Event.PROMOTE): Phase.SUCCEEDED,
    (Phase.SHADOWING, Event.PAUSE): Phase.PAUSED,
    (Phase.PROGRESSING, Event.PAUSE): Phase.PAUSED,
    (Phase.PAUSED, Event.RESUME): Phase.PROGRESSING,  # or shadowing: RolloutState.resume_to decides
    **{(p, Event.ROLLBACK): Phase.ROLLED_BACK for p in ACTIVE},
}


class IllegalTransition(FailedPrecondition):
    """An event the current phase does not allow."""


@dataclass(frozen=True, slots=True)
class RolloutState:
    phase: Phase = Phase.IDLE
    step: int = 0
    failed_checks: int = 0
    candidate: str = ""
    started_at: float = 0.0
    resume_to: Phase = Phase.PROGRESSING

    def __post_init__(self) -> None:
        # Read back from the store, a phase is a string: the member, or ValueError naming it.
        object.__setattr__(self, "phase", Phase(self.phase))
        object.__setattr__(self, "resume_to", Phase(self.resume_to))

    def on(self, event: Event, **changes: object) -> RolloutState:
        """The state after `event`, or IllegalTransition."""
        target = TRANSITIONS.get((self.phase, event))
        if target is None:
            allowed = sorted(e for (p, e) in TRANSITIONS if p == self.phase)
            raise IllegalTransition(
                f"cannot {event.replace('_', ' ')} while the rollout is {self.phase} "
                f"(allowed now: {', '.join(allowed) or 'nothing'})"
            )
        if event == Event.RESUME:
            target = self.resume_to
        if event == Event.PAUSE:
            changes.setdefault("resume_to", self.phase)
        return dataclasses.replace(self, phase=target, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    verdict: Verdict
    value: float  # point estimate
    low: float
    high: float
    bound: float
    samples: int

    def to_dict(self) -> dict[str, object]:
        return {
            "check": self.name,
            "verdict": self.verdict.value,
            "value": _finite(self.value),
            "low": _finite(self.low),
            "high": _finite(self.high),
            "bound": self.bound,
            "samples": self.samples,
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(slots=True)
class RolloutEvidence:
    """Evidence since the rollout began: the stable and candidate windows and their pair."""

    stable: VersionWindow = field(default_factory=VersionWindow)
    candidate: VersionWindow = field(default_factory=VersionWindow)
    pair: PairWindow = field(default_factory=PairWindow)


@dataclass(frozen=True, slots=True)
class Decision:
    event: Event
    reason: str
    checks: Sequence[CheckResult] = ()
    weight_bp: int | None = None  # the canary weight after this decision, when it changes


def _quantile_interval(h: LatencyHistogram, alpha: float, spec: PolicySpec) -> Interval:
    return quantile_cs(h.counts, bucket_edges(), 0.99, alpha, spec.min_samples)


def run_checks(evidence: RolloutEvidence, spec: PolicySpec, with_traffic: bool) -> list[CheckResult]:
    """Each enabled check at alpha / (number of checks), so all of them together stay within alpha."""
    s, c, pair = evidence.stable, evidence.candidate, evidence.pair
    enabled = []
    if with_traffic:
        if spec.max_error_increase >= 0:
            enabled.append("error_rate")
        if spec.max_latency_ratio > 0:
            enabled.append("latency_p99")
        if spec.max_accuracy_drop >= 0:
            enabled.append("accuracy")
    if spec.min_agreement > 0:
        enabled.append("agreement")
    alpha = spec.alpha / max(1, len(enabled))
    n_min = spec.min_samples
    results = []
    for name in enabled:
        if name == "error_rate":
            n = min(s.requests, c.requests)
            interval = difference_cs(c.errors, c.requests, s.errors, s.requests, alpha, n_min)
            verdict = at_most(interval, spec.max_error_increase)
            value = c.error_rate - s.error_rate
            bound = spec.max_error_increase
        elif name == "latency_p99":
            n = min(s.latency.total, c.latency.total)
            cand = _quantile_interval(c.latency, alpha / 2, spec)
            stab = _quantile_interval(s.latency, alpha / 2, spec)
            ratio = Interval(
                cand.low / stab.high if stab.high > 0 else 0.0, cand.high / stab.low if stab.low > 0 else math.inf
            )
            interval = ratio
            verdict = at_most(ratio, spec.max_latency_ratio)
            s99 = s.latency.quantile(0.99)
            value = c.latency.quantile(0.99) / s99 if s99 else math.nan
            bound = spec.max_latency_ratio
        elif name == "accuracy":
            n = min(s.labelled, c.labelled)
            interval = difference_cs(c.correct, c.labelled, s.correct, s.labelled, alpha, n_min)
            verdict = at_least(interval, -spec.max_accuracy_drop)
            value = c.accuracy - s.accuracy if c.labelled and s.labelled else math.nan
            bound = -spec.max_accuracy_drop
        else:
            n = pair.rows
            interval = proportion_cs(pair.agree, pair.rows, alpha, n_min)
            verdict = at_least(interval, spec.min_agreement)
            value = pair.agreement
            bound = spec.min_agreement
        if n < n_min:
            verdict = Verdict.INCONCLUSIVE
        results.append(CheckResult(name, verdict, value, interval.low, interval.high, bound, n))
    return results


def decide(state: RolloutState, evidence: RolloutEvidence, spec: PolicySpec, now: float) -> Decision:
    """The next step of an automatic rollout in `shadowing` or `progressing`."""
    if state.phase not in DECIDING:
        raise IllegalTransition(f"no automatic decision while the rollout is {state.phase}")
    checks = run_checks(evidence, spec, with_traffic=state.phase is Phase.PROGRESSING)
    failed = [c.name for c in checks if c.verdict is Verdict.FAIL]
    if failed:
        if state.failed_checks + 1 >= spec.threshold:
            return Decision(Event.ROLLBACK, f"failed checks: {', '.join(failed)}", checks, weight_bp=0)
        return Decision(
            Event.HOLD, f"failed checks ({state.failed_checks + 1}/{spec.threshold}): {', '.join(failed)}", checks
        )
    if now - state.started_at > spec.max_duration_s:
        return Decision(
            Event.ROLLBACK, f"no decision within max_duration ({spec.max_duration_s:.0f} s)", checks, weight_bp=0
        )
    if not checks or any(c.verdict is not Verdict.PASS for c in checks):
        waiting = [c.name for c in checks if c.verdict is not Verdict.PASS]
        return Decision(Event.HOLD, f"inconclusive: {', '.join(waiting)}", checks)
    weights = spec.step_weights_bp
    if state.phase is Phase.SHADOWING:
        return Decision(Event.ADVANCE, "shadow checks passed: first traffic step", checks, weight_bp=weights[0])
    if state.step + 1 < len(weights):
        return Decision(
            Event.ADVANCE,
            f"checks passed at step {state.step + 1}/{len(weights)}",
            checks,
            weight_bp=weights[state.step + 1],
        )
    return Decision(Event.FINISH, "checks passed at the last step: promote", checks, weight_bp=BASIS_POINTS)
