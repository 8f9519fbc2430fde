"""Seeded rollout simulations: the promotion statistics stay valid under continuous monitoring,
with every step judged on its own traffic, and decide within stated budgets.

The simulated rollouts run through the real `decide` (tests/simulation/rollouts.py
draws the evidence, all runs at once). The policy is the default one except for
a short interval (1 simulated second) and step_min_duration_s (2 s): error
rate, served p90 latency and paired latency (ratio 1.2); 2,000 requests an
interval.

Budgets (stated here and in docs/promotion.md, where `python -m
tests.simulation.power_curves` prints the full curves):
- A/A: false rollbacks <= alpha over 1,000 runs (seen: 0), >= 95% promoted
  within 100 intervals, 95% of them within 5,000 canary requests (seen: median
  about 4,300, most of it the last steps' minimum durations at 25 and 50 %);
  with accuracy on too (16,000 labelled rows an interval): false rollbacks <= alpha;
- a candidate 30% slower at p99 (a constant extra run time): rolled back in
  >= 95% of runs, on latency, at the first step (seen: all, median 230 canary
  requests);
- a 2-point accuracy drop (95% -> 93%, max_accuracy_drop 0; the versions also
  disagree both ways on 2 % of rows): rolled back in >= 95% of runs (seen: all,
  median about 1,600 labelled candidate rows, on the paired check);
- the real tests' -2-point copy (wrong on 2 % more rows, none the other way;
  max_accuracy_drop 0.005, 160 labelled rows an interval): rolled back within
  2,000 labelled rows an arm in >= 95 % of runs (seen: 97 %, median 1,270);
- a regression that shows only from the third (or fourth) step on is rolled
  back at that step, never promoted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.config.spec import PolicySpec
from tests.simulation.rollouts import MEDIAN_S, SIGMA, Arm, Traffic, simulate

# The default policy but for a short interval (1 simulated second) and step_min_duration_s.
SPEC = PolicySpec(interval_s=1.0, step_min_duration_s=2.0, max_duration_s=1e9)
# Every check on: accuracy too (max_accuracy_drop 0.01), with 16,000 labelled rows an interval.
ALL_CHECKS = PolicySpec(interval_s=1.0, step_min_duration_s=2.0, max_duration_s=1e9, max_accuracy_drop=0.01)
LABELLED = Traffic(per_interval=16_000)
P99_S = MEDIAN_S * math.exp(SIGMA * 2.3263478740408408)


def test_a_a_rollouts_rarely_roll_back_and_promote_within_budget() -> None:
    runs = simulate(SPEC, Arm(), Arm(), runs=1000, seed=1, max_intervals=100)
    false_rollbacks = sum(r.outcome == "rolled_back" for r in runs) / len(runs)
    assert false_rollbacks <= SPEC.alpha, false_rollbacks
    promoted = [r for r in runs if r.outcome == "promoted"]
    assert len(promoted) / len(runs) >= 0.95, len(promoted)
    requests = [r.canary_requests for r in promoted]
    # Every step had its own exposure, and the whole rollout stayed within 5,000 canary requests.
    assert min(requests) >= SPEC.step_min_samples * len(SPEC.step_weights)
    assert np.percentile(requests, 95) <= 5000, np.percentile(requests, 95)


def test_a_a_rollouts_with_every_check_on_rarely_roll_back() -> None:
    runs = simulate(ALL_CHECKS, Arm(), Arm(), runs=300, seed=5, max_intervals=100, traffic=LABELLED)
    false_rollbacks = sum(r.outcome == "rolled_back" for r in runs) / len(runs)
    assert false_rollbacks <= ALL_CHECKS.alpha, false_rollbacks
    assert sum(r.outcome == "promoted" for r in runs) > len(runs) / 2


def naive_rollback(stable: Arm, candidate: Arm, seed: int, intervals: int = 30, per_interval: int = 2000) -> bool:
    """A fixed-horizon two-proportion z-test on accuracy, checked at every interval."""
    rng = np.random.default_rng(seed)
    s = c = n = 0
    for _ in range(intervals):
        s += int(rng.binomial(per_interval, stable.accuracy))
        c += int(rng.binomial(per_interval, candidate.accuracy))
        n += per_interval
        pooled = (s + c) / (2 * n)
        se = math.sqrt(2 * pooled * (1 - pooled) / n)
        # One-sided at 5%: "the candidate is less accurate".
        if se and (c / n - s / n) / se < -1.645:
            return True
    return False


def test_naive_repeated_z_test_exceeds_alpha_where_ours_does_not() -> None:
    naive = sum(naive_rollback(Arm(), Arm(), seed) for seed in range(1000)) / 1000
    assert naive > SPEC.alpha, naive


def test_a_candidate_thirty_percent_slower_at_p99_is_rolled_back_at_the_first_step() -> None:
    runs = simulate(SPEC, Arm(), Arm(extra_s=0.3 * P99_S), runs=200, seed=2, max_intervals=100)
    rolled = [r for r in runs if r.outcome == "rolled_back"]
    assert len(rolled) / len(runs) >= 0.95, [r.outcome for r in runs][:10]
    assert all(r.failed_at_step == 0 for r in rolled)


def test_a_two_point_accuracy_drop_is_rolled_back() -> None:
    # A 1 % first step gathers labels slowly: accuracy must fail on that step's rows.
    spec = PolicySpec(interval_s=1.0, step_min_duration_s=2.0, max_accuracy_drop=0.0, max_duration_s=1e9)
    runs = simulate(spec, Arm(), Arm(accuracy=0.93), runs=200, seed=3, max_intervals=150, traffic=LABELLED)
    rolled = [r for r in runs if r.outcome == "rolled_back"]
    assert len(rolled) / len(runs) >= 0.95, [r.outcome for r in runs][:10]
    # The budget (docs/promotion.md): a median of about 1,600 labelled candidate rows (the
    # two arms alone needed about 3,600).
    assert np.median([r.step_labelled for r in rolled]) <= 2500


def test_a_candidate_wrong_on_two_percent_more_rows_is_rolled_back_within_2000_labelled_rows() -> None:
    # The -2-point copy of the real-traffic test (tests/integration/test_rollout_decisions.py):
    # wrong on 2 % of the rows the stable gets right, right on none it gets wrong, against
    # a bound of half a point, 160 labelled canary rows an interval at the 1 % step.
    spec = PolicySpec(interval_s=1.0, step_min_duration_s=2.0, max_accuracy_drop=0.005, max_duration_s=1e9)
    traffic = Traffic(per_interval=16_000, discordance=0.0)
    runs = simulate(spec, Arm(), Arm(accuracy=0.93), runs=300, seed=9, max_intervals=150, traffic=traffic)
    rolled = [r.step_labelled for r in runs if r.outcome == "rolled_back" and r.failed_at_step == 0]
    assert len(rolled) == len(runs), [r.outcome for r in runs][:10]
    # The budget (docs/promotion.md): 2,000 labelled rows an arm in >= 95 % of runs.
    assert np.mean(np.asarray(rolled) <= 2000) >= 0.95, np.percentile(rolled, [50, 95])
    print(f"-2 points, one way: median {np.median(rolled):.0f}, 95th pct {np.percentile(rolled, 95):.0f} rows")


@pytest.mark.parametrize("from_step", [2, 3])
def test_a_regression_only_under_a_larger_share_is_caught_at_its_step(from_step: int) -> None:
    runs = simulate(
        SPEC, Arm(), Arm(extra_s=1.0 * P99_S), runs=100, seed=4, max_intervals=150, candidate_from_step=from_step
    )
    assert not [r for r in runs if r.outcome == "promoted"]
    rolled = [r for r in runs if r.outcome == "rolled_back"]
    assert len(rolled) >= 95 and all(r.failed_at_step >= from_step for r in rolled)
