"""The promotion policy's decisions: per-step exposure, failures on a step's own evidence,
paired latency, what happens on timeout, and what an inconclusive check says it needs.

`decide` is a pure function of the rollout state, the evidence and the clock, so
these tests build evidence by hand (counts, a latency histogram, paired timings)
and read the decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from gateway.config.spec import PolicySpec
from gateway.errors import ConfigError
from gateway.release.compare import PairWindow, VersionWindow, bucket_edges
from gateway.release.confidence import Interval, Verdict, mean_cs, samples_needed
from gateway.release.policy import (
    LATENCY_PAIRED,
    STEP_DURATION,
    STEP_REQUESTS,
    CheckResult,
    Event,
    Phase,
    RolloutEvidence,
    RolloutState,
    Windows,
    check_alpha,
    decide,
    enabled_checks,
)

SPEC = PolicySpec(
    interval_s=1.0,
    step_weights=(10.0, 50.0),
    min_samples=100,
    max_latency_ratio=0.0,
    max_error_increase=0.02,
    max_accuracy_drop=-1.0,
    step_min_samples=500,
    step_min_duration_s=30.0,
    max_duration_s=600.0,
)
PROGRESSING = RolloutState(Phase.PROGRESSING, step=0, candidate="2", started_at=0.0)


def window(requests: int, errors: int = 0, latency_s: float = 0.001, spread: float = 0.0) -> VersionWindow:
    w = VersionWindow()
    rng = np.random.default_rng(requests + errors)
    for seconds in latency_s * np.exp(spread * rng.standard_normal(requests - errors)):
        w.latency.add(float(seconds))
    w.requests, w.errors, w.rows = requests, errors, requests - errors
    return w


def evidence(stable: VersionWindow, candidate: VersionWindow, step: Windows | None, step_s: float) -> RolloutEvidence:
    return RolloutEvidence(stable, candidate, PairWindow(), step, step_s)


def by_name(checks: Sequence[CheckResult]) -> dict[str, CheckResult]:
    return {c.name: c for c in checks}


def test_passing_checks_wait_for_the_steps_own_samples_and_time() -> None:
    whole = evidence(window(20_000), window(5_000), Windows(window(4_000), window(300)), step_s=40.0)
    held = decide(PROGRESSING, whole, SPEC, now=50.0)
    assert held.event is Event.HOLD
    checks = by_name(held.checks)
    assert checks["error_rate"].verdict is Verdict.PASS
    assert checks[STEP_REQUESTS].verdict is Verdict.INCONCLUSIVE
    assert checks[STEP_REQUESTS].needed == 200
    assert "step_requests 300" in held.reason and "~200 more" in held.reason

    too_soon = evidence(window(20_000), window(5_000), Windows(window(4_000), window(600)), step_s=10.0)
    held = decide(PROGRESSING, too_soon, SPEC, now=50.0)
    assert held.event is Event.HOLD and STEP_DURATION in held.reason

    enough = evidence(window(20_000), window(5_000), Windows(window(4_000), window(600)), step_s=31.0)
    advanced = decide(PROGRESSING, enough, SPEC, now=50.0)
    assert (advanced.event, advanced.weight_bp) == (Event.ADVANCE, 5000)


def test_a_failure_on_the_steps_own_traffic_rolls_back_though_the_whole_rollout_looks_fine() -> None:
    # 20,000 clean candidate requests before this step; at this step, 10% errors.
    stable, candidate = window(200_000), window(21_000, errors=100)
    step = Windows(window(20_000), window(1_000, errors=100))
    once_failed = RolloutState(Phase.PROGRESSING, step=0, failed_checks=1, candidate="2", started_at=0.0)
    decision = decide(once_failed, evidence(stable, candidate, step, 5.0), SPEC, now=10.0)
    checks = by_name(decision.checks)
    assert checks["error_rate"].verdict is not Verdict.FAIL
    assert checks["step_error_rate"].verdict is Verdict.FAIL
    assert decision.event is Event.ROLLBACK and "step_error_rate" in decision.reason


def test_the_alpha_budget_adds_up_across_checks_and_steps() -> None:
    spec = PolicySpec(max_latency_ratio=1.2, max_accuracy_drop=0.01, min_agreement=0.5, max_duration_s=3600)
    steps = len(spec.step_weights)
    names = enabled_checks(spec, with_traffic=True)
    assert names == ["error_rate", "latency_p90", "latency_paired", "accuracy", "accuracy_paired", "agreement"]
    spent = sum(check_alpha(spec, n, step=False) + steps * check_alpha(spec, n, step=True) for n in names)
    assert math.isclose(spent, spec.alpha)
    # Latency and accuracy are each one question asked two ways: their two checks share one part of four.
    assert math.isclose(check_alpha(spec, "latency_paired", step=False), spec.alpha / 4 / 2 / 2)
    assert math.isclose(check_alpha(spec, "accuracy_paired", step=False), spec.alpha / 4 / 2 / 2)
    assert math.isclose(check_alpha(spec, "error_rate", step=False), spec.alpha / 4 / 2)


@pytest.mark.parametrize(
    ("on_timeout", "phase", "event"),
    [
        ("pause", Phase.PROGRESSING, Event.PAUSE),
        ("rollback", Phase.PROGRESSING, Event.ROLLBACK),
        ("promote", Phase.PROGRESSING, Event.PROMOTE),
        ("promote", Phase.SHADOWING, Event.ADVANCE),
        ("pause", Phase.SHADOWING, Event.PAUSE),
    ],
)
def test_on_timeout_decides_what_an_inconclusive_rollout_does(on_timeout: str, phase: Phase, event: Event) -> None:
    spec = PolicySpec(
        step_weights=(10.0, 50.0),
        min_samples=100,
        min_agreement=0.9,
        max_latency_ratio=0.0,
        max_error_increase=0.02,
        step_min_samples=10,
        step_min_duration_s=1.0,
        max_duration_s=60.0,
        on_timeout=on_timeout,  # type: ignore[arg-type]
    )
    state = RolloutState(phase, step=0, candidate="2", started_at=0.0)
    # Few requests: nothing decides, nothing fails.
    few = evidence(window(150), window(20), None, 30.0)
    assert decide(state, few, spec, now=59.0).event is Event.HOLD
    decision = decide(state, few, spec, now=61.0)
    assert decision.event is event
    assert "no decision within max_duration (60 s)" in decision.reason
    assert "agreement" in decision.reason and f"on_timeout = {on_timeout}" in decision.reason
    # After a resume, max_duration_s counts from the resume.
    resumed = RolloutState(phase, step=0, candidate="2", started_at=0.0, timed_from=50.0)
    assert decide(resumed, few, spec, now=61.0).event is Event.HOLD


def test_the_default_on_timeout_is_pause() -> None:
    assert PolicySpec().on_timeout == "pause"


def paired(diff_mean_s: float, diff_sd_s: float, batches: int, seed: int = 0) -> PairWindow:
    pair = PairWindow()
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.0005, 0.001, batches)
    for b, d in zip(base, diff_mean_s + diff_sd_s * rng.standard_normal(batches), strict=True):
        pair.add_timing(float(b + d), float(b))
    return pair


@pytest.mark.parametrize(("extra_s", "verdict"), [(0.0, Verdict.PASS), (0.0015, Verdict.FAIL)])
def test_paired_latency_decides_on_a_few_hundred_timed_batches(extra_s: float, verdict: Verdict) -> None:
    spec = PolicySpec(min_samples=100, max_latency_ratio=1.2, max_error_increase=-1.0, max_duration_s=3600)
    stable = window(5_000, latency_s=0.002, spread=0.5)  # served p90 about 3.8 ms
    rollout = RolloutEvidence(stable, window(300, latency_s=0.002, spread=0.5), paired(extra_s, 0.0002, 300))
    checks = by_name(decide(PROGRESSING, rollout, spec, now=1.0).checks)
    result = checks[LATENCY_PAIRED]
    assert result.verdict is verdict, result
    # The served-latency check on the same 300 canary requests cannot tell yet.
    assert checks["latency_p90"].verdict is Verdict.INCONCLUSIVE


def test_a_slower_candidate_fails_the_served_latency_check() -> None:
    spec = PolicySpec(min_samples=100, max_latency_ratio=1.2, max_error_increase=-1.0, max_duration_s=3600)
    stable = window(20_000, latency_s=0.002, spread=0.3)
    slow = window(3_000, latency_s=0.003, spread=0.3)
    decision = decide(PROGRESSING, RolloutEvidence(stable, slow, PairWindow()), spec, now=1.0)
    assert by_name(decision.checks)["latency_p90"].verdict is Verdict.FAIL


def test_samples_needed_shrinks_the_interval_to_the_bound() -> None:
    # Half-width 0.02 at 1,000 samples, 0.01 from the bound: about 4,000 in all.
    assert samples_needed(1000, 0.0, Interval(-0.02, 0.02), 0.01) == 3000
    assert samples_needed(1000, 0.01, Interval(-0.01, 0.03), 0.01) is None  # on the bound
    assert samples_needed(1000, 1.0, Interval(0.5, math.inf), 1.2, log_scale=True) is None


def test_mean_cs_covers_and_narrows() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 2.0, 10_000)
    wide = mean_cs(100, float(x[:100].sum()), float((x[:100] ** 2).sum()), 0.05)
    narrow = mean_cs(10_000, float(x.sum()), float((x**2).sum()), 0.05)
    assert wide.low < 0.5 < wide.high and narrow.low < 0.5 < narrow.high
    assert narrow.high - narrow.low < (wide.high - wide.low) / 5


def test_bad_policy_values_name_the_setting_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"policy.on_timeout: 'wait' is not one of pause, rollback, promote"):
        PolicySpec(on_timeout="wait")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"policy.step_min_duration_s: .*lower step_min_duration_s or raise max_"):
        PolicySpec(step_min_duration_s=100, max_duration_s=300)
    with pytest.raises(ConfigError, match=r"policy.latency_quantile: must be in 0.5..0.999, got 1.0"):
        PolicySpec(latency_quantile=1.0)


def test_bucket_edges_are_what_the_windows_use() -> None:
    assert len(bucket_edges()) == len(VersionWindow().latency.counts)


def test_latency_passes_on_the_paired_check_the_served_one_passes_only_without_pairs() -> None:
    spec = PolicySpec(
        min_samples=100,
        max_latency_ratio=1.2,
        max_error_increase=-1.0,
        step_min_samples=0,
        step_min_duration_s=0,
        max_duration_s=3600,
    )
    # Served latency of a small arm can look better than it is: here it passes.
    stable, candidate = window(20_000, latency_s=0.002, spread=0.3), window(5_000, latency_s=0.0015, spread=0.3)
    few_pairs = paired(0.0, 0.005, 120)  # timed, but too noisy to decide yet
    held = decide(PROGRESSING, RolloutEvidence(stable, candidate, few_pairs), spec, now=1.0)
    checks = by_name(held.checks)
    assert checks["latency_p90"].verdict is Verdict.PASS
    assert checks[LATENCY_PAIRED].verdict is Verdict.INCONCLUSIVE
    assert held.event is Event.HOLD and LATENCY_PAIRED in held.reason
    # No pair timed at all (no idle time for copies): the served check decides alone.
    alone = decide(PROGRESSING, RolloutEvidence(stable, candidate, PairWindow()), spec, now=1.0)
    assert alone.event is Event.ADVANCE
