"""The paired confidence sequence (by betting) and the one-sided alpha of the checks.

Coverage is checked by simulation at every look, the way a controller looks at it;
power against the normal-mixture boundary the paired check used before, on the
case that matters most: a candidate wrong on a few rows the stable got right.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from gateway.config.spec import PolicySpec
from gateway.release.compare import PairWindow, VersionWindow
from gateway.release.confidence import Interval, paired_difference_cs, radius, tuned_rho
from gateway.release.policy import ACCURACY_PAIRED, Windows, check_alpha, run_checks


def normal_boundary(n: int, diff: int, discordant: int, alpha: float) -> Interval:
    """The paired CS before betting: normal mixture, plug-in variance P(discordant) - mean^2."""
    mean = diff / n
    variance = max((discordant + 0.5) / (n + 1.0) - mean * mean, 1e-12)
    r = radius(n, variance, alpha, tuned_rho(variance, alpha, 200))
    return Interval(mean - r, mean + r)


@pytest.mark.parametrize(
    ("p_minus", "p_plus"),
    [(0.02, 0.0), (0.03, 0.01), (0.3, 0.3), (0.0, 0.005)],
    ids=["one-way", "both-ways", "half-discordant", "rare-gain"],
)
def test_the_interval_covers_the_true_difference_at_every_look(p_minus: float, p_plus: float) -> None:
    alpha, runs, looks, per_look = 0.1, 100, 10, 180
    rng = np.random.default_rng(7)
    truth = p_plus - p_minus
    draws = rng.multinomial(per_look, [p_minus, p_plus, 1 - p_minus - p_plus], size=(runs, looks)).cumsum(axis=1)
    missed_high = missed_low = 0
    for run in draws:
        highs, lows = [], []
        for look, (minus, plus, _) in enumerate(run.tolist(), start=1):
            cs = paired_difference_cs(look * per_look, plus - minus, plus + minus, alpha)
            assert cs.low <= plus / (look * per_look) - minus / (look * per_look) <= cs.high
            highs.append(cs.high)
            lows.append(cs.low)
        missed_high += min(highs) < truth
        missed_low += max(lows) > truth
    # Each side holds at alpha / 2 at all looks at once (Ville); the exact bound is conservative.
    assert missed_high / runs <= alpha / 2 and missed_low / runs <= alpha / 2, (missed_high, missed_low)


def test_a_candidate_wrong_on_two_percent_of_rows_is_caught_on_fewer_rows_than_the_normal_boundary() -> None:
    # d = -1 on 2 % of rows, +1 on none: the -2-point copy of the rollout tests. The whole
    # rollout's paired accuracy check, one-sided at alpha / 12 (default policy, three questions).
    alpha = 2 * PolicySpec(max_accuracy_drop=0.005).alpha / 3 / 2 / 2
    bound = -0.005

    def first_failing(cs: Callable[[int, int, int, float], Interval]) -> int:
        for n in range(200, 5000, 16):
            diff = -round(0.02 * n)
            if cs(n, diff, -diff, alpha).high < bound:
                return n
        return 5000

    betting, normal = first_failing(paired_difference_cs), first_failing(normal_boundary)
    assert betting < 0.75 * normal, (betting, normal)
    assert betting <= 1000, betting


def test_agreeing_rows_alone_never_collapse_the_interval() -> None:
    for n in (1, 10, 200, 10_000):
        cs = paired_difference_cs(n, 0, 0, 0.01)
        assert cs.low < 0 < cs.high
    # ...but they do narrow it: no disagreement in 10,000 rows bounds the difference tightly.
    assert paired_difference_cs(10_000, 0, 0, 0.01).high < 0.002 < paired_difference_cs(200, 0, 0, 0.01).high
    assert paired_difference_cs(0, 0, 0, 0.01) == Interval(-1.0, 1.0)


def test_each_one_sided_check_spends_its_alpha_on_each_side() -> None:
    """A check's verdict errs only where its CS misses on one side, so its interval is the
    two-sided one at twice its alpha; drift, a bound on a size, stays two-sided."""
    spec = PolicySpec(max_accuracy_drop=0.005, max_latency_ratio=0)
    pair = PairWindow()
    pair.labelled, pair.label_diff, pair.label_discordant = 1000, -20, 20
    stable, candidate = VersionWindow(), VersionWindow()
    stable.requests = candidate.requests = 1000
    checks = {c.name: c for c in run_checks(Windows(stable, candidate, pair), spec, with_traffic=True)}
    paired = checks[ACCURACY_PAIRED]
    expected = paired_difference_cs(1000, -20, 20, 2 * check_alpha(spec, ACCURACY_PAIRED, step=False))
    assert math.isclose(paired.low, expected.low) and math.isclose(paired.high, expected.high)
    narrower = paired_difference_cs(1000, -20, 20, check_alpha(spec, ACCURACY_PAIRED, step=False))
    assert paired.high < narrower.high
