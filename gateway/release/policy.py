"""The rollout policy: a state machine written as a transition table, and one pure decision step.

Phases: idle -> shadowing -> progressing(step k) -> promoting -> succeeded,
with paused reachable from shadowing and progressing, and rolled_back from
any active phase. An event that the table does not allow in the current
phase raises IllegalTransition; manual actions go through the same table.

`decide` looks at the evidence gathered since the rollout began, and since
its current step began, and answers what to do next; it has no clock, store or
I/O of its own (time comes in). docs/promotion.md explains the checks, the
exposure each step needs and what happens when max_duration_s runs out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.config.spec import PROMOTE_GATE, START_GATE, PolicySpec, describe_gate
from gateway.errors import FailedPrecondition
from gateway.release.compare import PairWindow, VersionWindow, bucket_edges
from gateway.release.confidence import (
    Interval,
    Verdict,
    at_least,
    at_most,
    difference_cs,
    mean_cs,
    paired_difference_cs,
    proportion_cs,
    quantile_cs,
    samples_needed,
)
from gateway.release.drift.shift import ClassShift
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
    AWAIT = "await_approval"  # the checks passed, and the next move waits for a person (approve_before)
    APPROVE = "approve"


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
    # An approval gate changes no phase: the rollout goes on deciding (and can still roll
    # back) while it waits, and an approval only lets its next move happen.
    **{(p, Event.AWAIT): p for p in DECIDING},
    # Not while paused: a paused rollout holds where it is until resumed (and an approval
    # at a start gate would begin its traffic).
    **{(p, Event.APPROVE): p for p in DECIDING},
}
# Events that move a rollout past the gate it waited at.
_MOVES = frozenset({Event.ADVANCE, Event.FINISH})


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
    # When max_duration_s began to count (unix seconds; 0: at started_at). A resume
    # restarts it, so a rollout paused on timeout gets a whole max_duration_s again.
    timed_from: float = 0.0
    # The approval gate the rollout waits at ("start", "25", "promote"; empty: none), and the
    # one a person has approved, which its next move may pass. Both clear when it moves or ends.
    awaiting: str = ""
    approved: str = ""

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
        if event in _MOVES or target in AT_REST:
            changes.setdefault("awaiting", "")
            changes.setdefault("approved", "")
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
    # Roughly how many more samples (of what `samples` counts) an inconclusive check
    # needs to decide; None once decided, or when it cannot be estimated.
    needed: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "check": self.name,
            "verdict": self.verdict.value,
            "value": _finite(self.value),
            "low": _finite(self.low),
            "high": _finite(self.high),
            "bound": self.bound,
            "samples": self.samples,
            "needed": self.needed,
        }

    def failure(self) -> str:
        """How a failing check is named in a decision's reason."""
        return self.name

    def describe(self) -> str:
        """One phrase for a reason or `gateway status`: estimate, interval, bound and what it needs."""
        if self.name == STEP_DURATION:
            return f"{self.name} {self.value:.1f} s of {self.bound:g} s"
        text = f"{self.name} {_short(self.value)} [{_short(self.low)}, {_short(self.high)}] vs {_short(self.bound)}"
        text += f", {self.samples} samples"
        if self.verdict is Verdict.INCONCLUSIVE:
            text += f", ~{self.needed} more needed" if self.needed is not None else ", more needed (unknown how many)"
        return text


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _short(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


@dataclass(slots=True)
class Windows:
    """The stable and candidate windows and their pair, over some stretch of a rollout."""

    stable: VersionWindow = field(default_factory=VersionWindow)
    candidate: VersionWindow = field(default_factory=VersionWindow)
    pair: PairWindow = field(default_factory=PairWindow)
    shift: ClassShift = field(default_factory=ClassShift)  # prediction drift on the same rows


@dataclass(slots=True)
class RolloutEvidence:
    """Evidence since the rollout began, and since its current step began.

    `step` None means the step began with the rollout (the windows are the same)."""

    stable: VersionWindow = field(default_factory=VersionWindow)
    candidate: VersionWindow = field(default_factory=VersionWindow)
    pair: PairWindow = field(default_factory=PairWindow)
    step: Windows | None = None
    step_seconds: float = math.inf  # how long the current step has lasted
    shift: ClassShift = field(default_factory=ClassShift)  # since the rollout began
    # The external checks' verdicts on their latest readings (gateway/release/external.py):
    # thresholds on numbers read from outside, judged while the candidate serves traffic.
    external: Sequence[CheckResult] = ()

    @property
    def whole(self) -> Windows:
        return Windows(self.stable, self.candidate, self.pair, self.shift)

    @property
    def this_step(self) -> Windows:
        return self.step if self.step is not None else self.whole


@dataclass(frozen=True, slots=True)
class Decision:
    event: Event
    reason: str
    checks: Sequence[CheckResult] = ()
    weight_bp: int | None = None  # the canary weight after this decision, when it changes
    gate: str = ""  # AWAIT: the approval gate the move waits at


# Check names. The latency check on served traffic is named by its quantile
# (latency_p90); `latency_paired` compares run times of the same rows on both versions.
# `accuracy` compares the two arms' labelled traffic; `accuracy_paired` the two versions'
# answers on the same labelled rows (dual-run and shadow copies).
ERROR_RATE = "error_rate"
LATENCY_PAIRED = "latency_paired"
ACCURACY = "accuracy"
ACCURACY_PAIRED = "accuracy_paired"
AGREEMENT = "agreement"
PREDICTION_DRIFT = "prediction_drift"  # policy.max_drift (gateway/release/drift/shift.py)
STEP_PREFIX = "step_"  # the same checks on the current step's evidence alone
STEP_REQUESTS = "step_requests"
STEP_DURATION = "step_duration_s"


def latency_check_name(spec: PolicySpec) -> str:
    return f"latency_p{spec.latency_quantile * 100:g}"


def paired_families(spec: PolicySpec) -> tuple[tuple[str, str], ...]:
    """The questions answered two ways: (the check on the two arms, the paired check)."""
    return ((latency_check_name(spec), LATENCY_PAIRED), (ACCURACY, ACCURACY_PAIRED))


def enabled_checks(spec: PolicySpec, with_traffic: bool) -> list[str]:
    """The checks a rollout runs: those on served traffic only once it has some; paired
    latency, paired accuracy and agreement also while the candidate only shadows (copies
    are paired)."""
    names = []
    if with_traffic and spec.max_error_increase >= 0:
        names.append(ERROR_RATE)
    if spec.max_latency_ratio > 0:
        names += [latency_check_name(spec), LATENCY_PAIRED] if with_traffic else [LATENCY_PAIRED]
    if spec.max_accuracy_drop >= 0:
        names += [ACCURACY, ACCURACY_PAIRED] if with_traffic else [ACCURACY_PAIRED]
    if spec.min_agreement > 0:
        names.append(AGREEMENT)
    if spec.max_drift > 0:
        names.append(PREDICTION_DRIFT)
    return names


def check_alpha(spec: PolicySpec, name: str, step: bool) -> float:
    """The alpha check `name` spends on one sequence of evidence.

    alpha is split evenly across the questions the policy asks (a union bound: all
    of them together err with probability at most alpha); latency and accuracy are
    each one question answered two ways (on the two arms, and paired), so each pair
    of checks shares one part. Each check spends half its share on the whole
    rollout's evidence and the other half on the steps', split evenly across the
    steps, so a step judged on its own traffic costs no extra alpha."""
    names = set(enabled_checks(spec, with_traffic=True))
    families = [f for f in paired_families(spec) if names & set(f)]
    paired = {n for f in families for n in f}
    questions = len(names - paired) + len(families)
    share = spec.alpha / max(1, questions) / (2 if name in paired else 1)
    return share / 2 / len(spec.step_weights) if step else share / 2


def _served_latency(w: Windows, spec: PolicySpec, alpha: float) -> tuple[float, Interval, int]:
    """Candidate over stable at the stated quantile of served latency: estimate, CS, samples."""
    q, s, c = spec.latency_quantile, w.stable.latency, w.candidate.latency
    edges = bucket_edges()
    cand = quantile_cs(c.counts, edges, q, alpha / 2, spec.min_samples)
    stab = quantile_cs(s.counts, edges, q, alpha / 2, spec.min_samples)
    ratio = Interval(cand.low / stab.high if stab.high > 0 else 0.0, cand.high / stab.low if stab.low > 0 else math.inf)
    sq = s.quantile(q)
    value = c.quantile(q) / sq if sq else math.nan
    return value, ratio, min(s.total, c.total)


def _paired_latency(w: Windows, spec: PolicySpec, alpha: float) -> tuple[float, Interval, int]:
    """1 + (mean paired run-time difference) / (stable's served latency at the quantile).

    Where copies of the same rows run back to back on both versions, their run
    times differ only by the versions (and noise the random order makes
    symmetric), so the difference has far less variance than two arms of served
    latency. Served latency is the same front end plus the run: a candidate that
    adds d seconds to every run moves the stable's quantile x_q to about x_q + d,
    a ratio of 1 + d / x_q, which is what this estimates."""
    p, s = w.pair, w.stable.latency
    diff = mean_cs(p.timed, p.time_diff_s, p.time_diff_sq, alpha / 2, spec.min_samples)
    x = quantile_cs(s.counts, bucket_edges(), spec.latency_quantile, alpha / 2, spec.min_samples)
    if p.timed <= 1 or x.low <= 0:
        return math.nan, Interval(-math.inf, math.inf), p.timed
    low = diff.low / (x.high if diff.low >= 0 else x.low)
    high = diff.high / (x.low if diff.high >= 0 else x.high)
    value = (p.time_diff_s / p.timed) / s.quantile(spec.latency_quantile)
    return 1 + value, Interval(1 + low, 1 + high), p.timed


def run_checks(
    evidence: Windows, spec: PolicySpec, with_traffic: bool, step: bool = False, min_samples: int | None = None
) -> list[CheckResult]:
    """Each enabled check on one stretch of evidence (the whole rollout's, or a step's),
    at the alpha `check_alpha` gives it."""
    s, c, pair = evidence.stable, evidence.candidate, evidence.pair
    n_min = spec.min_samples if min_samples is None else min_samples
    prefix = STEP_PREFIX if step else ""
    results = []
    for name in enabled_checks(spec, with_traffic):
        if step and name.startswith("latency_p"):
            # Over a step's short window, served latency also moves with each version's own
            # serving state (its batcher adapting to a new share of traffic, a burst of load):
            # seen failing an identical copy at a 50 % step. A step judges latency on the
            # paired run times, measured on the same rows at the same moment.
            continue
        if step and name == PREDICTION_DRIFT:
            continue  # judged on the whole rollout's copies: a step keeps no base of the shift

        # Every check but drift asks a one-sided question (at most, or at least, its bound), and
        # a verdict errs only where the CS misses on one side: failing a candidate within its
        # bound needs the end on the bound's far side to have crossed the truth, and passing
        # one beyond it the other end. Each side may so spend the check's whole alpha: the
        # two-sided CS at 2 alpha. Drift bounds a size, |shift|, whose CS may miss either way.
        alpha = check_alpha(spec, name, step) * (1 if name == PREDICTION_DRIFT else 2)
        log_scale = False
        if name == ERROR_RATE:
            n = min(s.requests, c.requests)
            interval = difference_cs(c.errors, c.requests, s.errors, s.requests, alpha, spec.min_samples)
            verdict = at_most(interval, spec.max_error_increase)
            value = c.error_rate - s.error_rate
            bound = spec.max_error_increase
        elif name == LATENCY_PAIRED:
            value, interval, n = _paired_latency(evidence, spec, alpha)
            verdict = at_most(interval, spec.max_latency_ratio)
            bound = spec.max_latency_ratio
        elif name.startswith("latency_p"):
            value, interval, n = _served_latency(evidence, spec, alpha)
            verdict = at_most(interval, spec.max_latency_ratio)
            bound = spec.max_latency_ratio
            log_scale = True
        elif name == ACCURACY:
            n = min(s.labelled, c.labelled)
            interval = difference_cs(c.correct, c.labelled, s.correct, s.labelled, alpha, spec.min_samples)
            verdict = at_least(interval, -spec.max_accuracy_drop)
            value = c.accuracy - s.accuracy if c.labelled and s.labelled else math.nan
            bound = -spec.max_accuracy_drop
        elif name == ACCURACY_PAIRED:
            n = pair.labelled
            interval = paired_difference_cs(n, pair.label_diff, pair.label_discordant, alpha)
            verdict = at_least(interval, -spec.max_accuracy_drop)
            value = pair.label_diff / n if n else math.nan
            bound = -spec.max_accuracy_drop
        elif name == PREDICTION_DRIFT:
            n = evidence.shift.rows
            value, interval = evidence.shift.largest(alpha)
            verdict = at_most(interval, spec.max_drift)
            bound = spec.max_drift
        else:
            n = pair.rows
            interval = proportion_cs(pair.agree, pair.rows, alpha, spec.min_samples)
            verdict = at_least(interval, spec.min_agreement)
            value = pair.agreement
            bound = spec.min_agreement
        if n < n_min:
            verdict = Verdict.INCONCLUSIVE
        needed = None
        if verdict is Verdict.INCONCLUSIVE:
            estimate = samples_needed(n, value, interval, bound, log_scale)
            needed = max(n_min - n, estimate or 0) if estimate is not None or n < n_min else None
        results.append(CheckResult(prefix + name, verdict, value, interval.low, interval.high, bound, n, needed))
    return results


def step_exposure(evidence: RolloutEvidence, spec: PolicySpec) -> list[CheckResult]:
    """Whether the current step has had its own exposure: candidate requests served, and time."""
    served = evidence.this_step.candidate.requests
    lasted = evidence.step_seconds
    samples_ok = served >= spec.step_min_samples
    time_ok = lasted >= spec.step_min_duration_s
    return [
        CheckResult(
            STEP_REQUESTS,
            Verdict.PASS if samples_ok else Verdict.INCONCLUSIVE,
            float(served),
            float(served),
            float(served),
            float(spec.step_min_samples),
            served,
            None if samples_ok else spec.step_min_samples - served,
        ),
        CheckResult(
            STEP_DURATION,
            Verdict.PASS if time_ok else Verdict.INCONCLUSIVE,
            lasted,
            lasted,
            lasted,
            spec.step_min_duration_s,
            served,
        ),
    ]


def _waiting(checks: Sequence[CheckResult], spec: PolicySpec) -> list[CheckResult]:
    """The whole-rollout checks (and exposure) that hold the rollout.

    Latency passes on the paired check: served latency of two arms with very different
    shares of traffic is biased toward the smaller one (each version's batcher holds
    batches open according to its own traffic: a candidate 30 % slower measured 0.5x the
    stable's served p90 at a 1 % step), so the served check passes latency only where no
    pair was timed at all (copies that never found idle time). Accuracy passes on either
    of its checks: both are unbiased (labelled rows of either kind are a sample of the
    traffic), and each spends its own half of the question's alpha. Either check of a
    question failing fails it."""
    by_name = {c.name: c for c in checks}

    def passed(name: str) -> bool:
        return name in by_name and by_name[name].verdict is Verdict.PASS

    answered: set[str] = set()
    served, paired = latency_check_name(spec), LATENCY_PAIRED
    if passed(paired) or (paired in by_name and by_name[paired].samples == 0 and passed(served)):
        answered |= {served, paired}
    if passed(ACCURACY) or passed(ACCURACY_PAIRED):
        answered |= {ACCURACY, ACCURACY_PAIRED}
    return [c for c in checks if c.verdict is not Verdict.PASS and c.name not in answered]


def _timeout(
    state: RolloutState, spec: PolicySpec, waiting: Sequence[CheckResult], checks: Sequence[CheckResult]
) -> Decision:
    # What happens first, then what waited: a reason cut to fit the audit keeps the action.
    def reason(action: str) -> str:
        waited = "; ".join(c.describe() for c in waiting)
        return f"no decision within max_duration ({spec.max_duration_s:g} s), {action}; inconclusive: {waited}"

    if spec.on_timeout == "rollback":
        return Decision(Event.ROLLBACK, reason("on_timeout = rollback"), checks, weight_bp=0)
    if spec.on_timeout == "promote":
        if state.phase is Phase.SHADOWING:
            # The candidate has served no traffic yet: on to the first step, not to stable.
            weight = spec.step_weights_bp[0]
            move = Decision(Event.ADVANCE, reason("on_timeout = promote: first traffic step"), checks, weight)
            return _gated(move, START_GATE, state, spec)
        move = Decision(Event.PROMOTE, reason("on_timeout = promote"), checks, weight_bp=BASIS_POINTS)
        return _gated(move, PROMOTE_GATE, state, spec)
    return Decision(Event.PAUSE, reason("on_timeout = pause: waiting for a person"), checks)


def _gated(move: Decision, gate: str, state: RolloutState, spec: PolicySpec) -> Decision:
    """`move`, or AWAIT when policy.approve_before holds it at `gate` and no one has approved it."""
    if gate not in spec.approval_gates or state.approved == gate:
        return move
    return Decision(Event.AWAIT, f"{move.reason}; awaiting approval {describe_gate(gate)}", move.checks, gate=gate)


def decide(state: RolloutState, evidence: RolloutEvidence, spec: PolicySpec, now: float) -> Decision:
    """The next step of an automatic rollout in `shadowing` or `progressing`.

    A check that fails, on the whole rollout's evidence or on the current step's
    alone, counts toward `threshold` at any time. A step advances only when every
    check passes on the whole rollout's evidence and the step has had its own
    exposure (step_min_samples candidate requests, step_min_duration_s). Past
    max_duration_s with nothing failed and something still waiting, `on_timeout` decides.
    A move that policy.approve_before gates waits (AWAIT) until a person approves it: its
    checks still run, so a failure at a gate still counts toward a rollback, and an
    approved move still needs every check to pass.
    """
    if state.phase not in DECIDING:
        raise IllegalTransition(f"no automatic decision while the rollout is {state.phase}")
    if state.phase is Phase.PROGRESSING and state.awaiting == START_GATE:
        # Started with its canary at 0 % (no shadow phase): nothing to judge until a person
        # lets the first step begin (ReleaseOps.approve sets its weight).
        first = spec.step_weights[0]
        return Decision(Event.AWAIT, f"awaiting approval before the first traffic step ({first:g}%)", gate=START_GATE)
    traffic = state.phase is Phase.PROGRESSING
    checks = run_checks(evidence.whole, spec, with_traffic=traffic)
    if traffic and evidence.step is not None:
        checks += run_checks(evidence.step, spec, with_traffic=True, step=True)
    if traffic:
        # Point readings held to a bound, outside the alpha budget (docs/promotion.md): a fail
        # counts toward threshold like any check's, an inconclusive one holds like any other.
        checks += evidence.external
    failed = [c.failure() for c in checks if c.verdict is Verdict.FAIL]
    if failed:
        if state.failed_checks + 1 >= spec.threshold:
            return Decision(Event.ROLLBACK, f"failed checks: {', '.join(failed)}", checks, weight_bp=0)
        return Decision(
            Event.HOLD, f"failed checks ({state.failed_checks + 1}/{spec.threshold}): {', '.join(failed)}", checks
        )
    if traffic:
        checks += step_exposure(evidence, spec)
    deciding = [c for c in checks if not c.name.startswith(STEP_PREFIX) or c.name in (STEP_REQUESTS, STEP_DURATION)]
    waiting = _waiting(deciding, spec)
    if not deciding:
        return Decision(Event.HOLD, "no checks enabled", checks)
    if waiting:
        # A rollout waiting for a person is not timed out: the person decides.
        if now - (state.timed_from or state.started_at) > spec.max_duration_s and not state.awaiting:
            return _timeout(state, spec, waiting, checks)
        return Decision(Event.HOLD, "inconclusive: " + "; ".join(c.describe() for c in waiting), checks)
    weights = spec.step_weights_bp
    if state.phase is Phase.SHADOWING:
        move = Decision(Event.ADVANCE, "shadow checks passed: first traffic step", checks, weight_bp=weights[0])
        return _gated(move, START_GATE, state, spec)
    if state.step + 1 < len(weights):
        move = Decision(
            Event.ADVANCE,
            f"checks passed at step {state.step + 1}/{len(weights)}",
            checks,
            weight_bp=weights[state.step + 1],
        )
        return _gated(move, spec.gate_before_step(state.step + 1), state, spec)
    move = Decision(Event.FINISH, "checks passed at the last step: promote", checks, weight_bp=BASIS_POINTS)
    return _gated(move, PROMOTE_GATE, state, spec)
