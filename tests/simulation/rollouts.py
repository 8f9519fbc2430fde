"""Simulated rollouts through the real policy: many at once, evidence drawn with numpy.

Every simulated rollout feeds the real `decide` (gateway/release/policy.py)
the evidence of one more analysis interval, with the real state machine and
per-step windows, until it promotes, rolls back or pauses. The evidence of
all runs is drawn together, one interval at a time (vectorised), and only the
decisions are made run by run.

The traffic model (stated here and in docs/promotion.md):
- `per_interval` requests an interval; the candidate serves its step's weight
  of them (binomial), the stable the rest;
- served latency is log-normal (median 1 ms, sigma 0.45: p99 / p50 about 2.85,
  as measured on the bundled digits model); a slower candidate adds a
  constant `extra_s` to every request (its own run is slower by that much);
- every candidate request is also run on the stable version (dual run) and
  timed on both, `rows_per_batch` copies a batch; the paired difference of a
  batch is extra_s plus normal noise with sd `pair_noise` x the median;
- errors and correct labels are binomial, every request labelled;
- every candidate request's copy on the stable version is labelled too (paired
  accuracy): the two versions' answers differ in correctness on `discordance`
  of the rows, split evenly both ways, plus the accuracy difference one way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from gateway.config.spec import PolicySpec
from gateway.release.compare import (
    PairWindow,
    VersionWindow,
    bucket_edges,
    copy_pair,
    copy_window,
    pair_since,
    window_since,
)
from gateway.release.confidence import Verdict
from gateway.release.policy import Event, Phase, RolloutEvidence, RolloutState, Windows, decide

MEDIAN_S = 0.001
SIGMA = 0.45
EDGES = np.array(bucket_edges())


@dataclass(frozen=True)
class Arm:
    error_rate: float = 0.001
    accuracy: float = 0.95
    extra_s: float = 0.0  # added to every served request and to every paired run


@dataclass(frozen=True)
class Traffic:
    per_interval: int = 2000
    rows_per_batch: int = 4
    pair_noise: float = 0.2  # sd of a paired run-time difference, as a fraction of the median
    # Rows one version gets right and the other wrong, beyond the accuracy difference
    # (two retrainings of a model disagree on some rows both ways).
    discordance: float = 0.02


def latency_probabilities(extra_s: float) -> np.ndarray:
    """P(latency in each histogram bucket) for the log-normal shifted by extra_s."""
    shifted = np.clip(EDGES - extra_s, 1e-12, None)
    z = (np.log(shifted) - math.log(MEDIAN_S)) / SIGMA
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    cdf[extra_s >= EDGES] = 0.0
    probs = np.diff(np.concatenate([[0.0], cdf]))
    probs[-1] += max(0.0, 1 - probs.sum())
    return np.asarray(probs / probs.sum())


def quantile_of(extra_s: float, q: float) -> float:
    """The exact q-quantile of served latency for an arm (for stating ratios)."""
    z = {0.5: 0.0, 0.9: 1.2815515655446004, 0.99: 2.3263478740408408}[q]
    return MEDIAN_S * math.exp(SIGMA * z) + extra_s


@dataclass
class Run:
    state: RolloutState
    stable: VersionWindow = field(default_factory=VersionWindow)
    candidate: VersionWindow = field(default_factory=VersionWindow)
    pair: PairWindow = field(default_factory=PairWindow)
    base: Windows | None = None  # the windows when the current step began
    step_began: float = 0.0
    outcome: str = ""  # promoted | rolled_back | paused, once decided
    intervals: int = 0
    failed_at_step: int = -1
    canary_requests: int = 0  # when decided
    step_labelled: int = 0  # candidate rows labelled in the step it was decided in


def _add(window: VersionWindow, requests: int, errors: int, latency: np.ndarray, correct: int) -> None:
    window.requests += requests
    window.errors += errors
    window.rows += requests - errors
    window.latency.counts = (np.asarray(window.latency.counts) + latency).tolist()
    window.latency.total += requests - errors
    window.labelled += requests
    window.correct += correct


def simulate(
    spec: PolicySpec,
    stable: Arm,
    candidate: Arm,
    runs: int,
    seed: int,
    max_intervals: int = 200,
    traffic: Traffic = Traffic(),
    candidate_from_step: int = 0,
) -> list[Run]:
    """`runs` rollouts in lockstep. The candidate behaves as `candidate` from step
    `candidate_from_step` on (before it, like `stable`: a regression that shows only
    under a larger share of traffic)."""
    rng = np.random.default_rng(seed)
    probs = {arm.extra_s: latency_probabilities(arm.extra_s) for arm in (stable, candidate)}
    weights = np.array(spec.step_weights) / 100
    all_runs = [Run(RolloutState(Phase.PROGRESSING, 0, 0, "2", 0.0)) for _ in range(runs)]
    for interval in range(1, max_intervals + 1):
        active = [r for r in all_runs if not r.outcome]
        if not active:
            break
        steps = np.array([r.state.step for r in active])
        behaving = [candidate if r.state.step >= candidate_from_step else stable for r in active]
        canary = rng.binomial(traffic.per_interval, weights[steps])
        base = traffic.per_interval - canary
        error_c = rng.binomial(canary, [a.error_rate for a in behaving])
        error_s = rng.binomial(base, stable.error_rate)
        correct_c = rng.binomial(canary, [a.accuracy for a in behaving])
        correct_s = rng.binomial(base, stable.accuracy)
        latency_s = rng.multinomial(base - error_s, probs[stable.extra_s])
        latency_c = np.stack(
            [rng.multinomial(k, probs[a.extra_s]) for k, a in zip(canary - error_c, behaving, strict=True)]
        )
        batches = canary // traffic.rows_per_batch
        extra = np.array([a.extra_s for a in behaving])
        sd = traffic.pair_noise * MEDIAN_S
        # Sum and sum of squares of `batches` normal differences, drawn exactly.
        mean_diff = rng.normal(extra, sd / np.sqrt(np.maximum(batches, 1)))
        within = sd**2 * rng.chisquare(np.maximum(batches - 1, 1)) * (batches > 1)
        # Paired correctness on the canary's rows: +1 (only the candidate right), -1, or 0.
        gain = np.array([max(0.0, a.accuracy - stable.accuracy) for a in behaving])
        loss = np.array([max(0.0, stable.accuracy - a.accuracy) for a in behaving])
        plus = rng.binomial(canary, traffic.discordance / 2 + gain)
        minus = rng.binomial(canary - plus, (traffic.discordance / 2 + loss) / (1 - traffic.discordance / 2 - gain))
        for i, run in enumerate(active):
            _add(run.stable, int(base[i]), int(error_s[i]), latency_s[i], int(correct_s[i]))
            _add(run.candidate, int(canary[i]), int(error_c[i]), latency_c[i], int(correct_c[i]))
            b = int(batches[i])
            run.pair.timed += b
            run.pair.time_diff_s += b * mean_diff[i]
            run.pair.time_diff_sq += within[i] + b * mean_diff[i] ** 2
            run.pair.labelled += int(canary[i])
            run.pair.label_diff += int(plus[i]) - int(minus[i])
            run.pair.label_discordant += int(plus[i]) + int(minus[i])
            _decide(run, spec, float(interval))
    return all_runs


def _decide(run: Run, spec: PolicySpec, now: float) -> None:
    run.intervals = int(now)
    step = None
    if run.base is not None:
        step = Windows(
            window_since(run.stable, run.base.stable),
            window_since(run.candidate, run.base.candidate),
            pair_since(run.pair, run.base.pair),
        )
    evidence = RolloutEvidence(run.stable, run.candidate, run.pair, step, now - run.step_began)
    decision = decide(run.state, evidence, spec, now)
    event = decision.event
    if event in (Event.ROLLBACK, Event.FINISH, Event.PAUSE, Event.PROMOTE):
        run.outcome = {Event.ROLLBACK: "rolled_back", Event.PAUSE: "paused"}.get(event, "promoted")
        run.canary_requests = run.candidate.requests
        run.step_labelled = evidence.this_step.candidate.labelled
        if event is Event.ROLLBACK:
            run.failed_at_step = run.state.step
        return
    if event is Event.ADVANCE:
        run.state = replace(run.state, step=run.state.step + 1, failed_checks=0)
        run.base = Windows(copy_window(run.stable), copy_window(run.candidate), copy_pair(run.pair))
        run.step_began = now
        return
    failed = any(c.verdict is Verdict.FAIL for c in decision.checks)
    run.state = replace(run.state, failed_checks=run.state.failed_checks + int(failed))
