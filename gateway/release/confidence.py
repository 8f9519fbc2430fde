"""Anytime-valid confidence sequences for the promotion checks.

A promotion engine looks at its evidence every interval. A fixed-horizon test
repeated that way inflates its error rate far beyond its nominal alpha; a
confidence sequence (CS) covers the true value at every sample size at once,
so it may be checked as often as we like. (Howard, Ramdas, McAuliffe, Sekhon,
Ann. Statist. 2021; Waudby-Smith, Arbour, Sinha, Kennedy, Ramdas, "Time-uniform
central limit theory and asymptotic confidence sequences", 2021/2024; Lindon et
al., KDD 2022, for canaries.) The method and its assumptions are written up in
docs/promotion.md.

All checks use the two-sided normal-mixture boundary with a plug-in variance
(the asymptotic CS of Waudby-Smith et al.): with probability about 1 - alpha,
for all t at once, the mean lies within

    radius(t) = sqrt(2 (v t + rho) log(2 sqrt((v t + rho) / rho) / alpha)) / t

of the running average of t samples with variance v. `rho` sets where the
boundary is tightest. Below `min_samples` (the policy's) no check decides.

Each check answers PASS (the whole CS satisfies the bound), FAIL (the whole
CS violates it) or INCONCLUSIVE (hold and gather more evidence).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class Verdict(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


def radius(t: int, variance: float, alpha: float, rho: float) -> float:
    """Half-width of the CS for the mean after t samples (time-uniform, two-sided)."""
    if t <= 0:
        return math.inf
    v = variance * t + rho
    return math.sqrt(2.0 * v * math.log(2.0 * math.sqrt(v / rho) / alpha)) / t


def tuned_rho(variance: float, alpha: float, t_opt: int) -> float:
    """rho that makes the boundary tightest near t_opt samples."""
    log_term = 2 * math.log(2 / alpha)
    return max(1e-12, variance * t_opt / (log_term + math.log(log_term + 1) - 1))


@dataclass(frozen=True, slots=True)
class Interval:
    low: float
    high: float

    def __sub__(self, other: Interval) -> Interval:
        return Interval(self.low - other.high, self.high - other.low)


def proportion_cs(successes: int, n: int, alpha: float, t_opt: int = 2000) -> Interval:
    """CS for a proportion, with the (smoothed) plug-in Bernoulli variance."""
    if n <= 0:
        return Interval(0.0, 1.0)
    mean = successes / n
    p = (successes + 0.5) / (n + 1.0)  # keeps the variance positive at 0 or n successes
    variance = p * (1 - p)
    r = radius(n, variance, alpha, tuned_rho(variance, alpha, t_opt))
    return Interval(max(0.0, mean - r), min(1.0, mean + r))


def difference_cs(a_successes: int, a_n: int, b_successes: int, b_n: int, alpha: float, t_opt: int = 2000) -> Interval:
    """CS for p_a - p_b from two independent arms (alpha split between them)."""
    return proportion_cs(a_successes, a_n, alpha / 2, t_opt) - proportion_cs(b_successes, b_n, alpha / 2, t_opt)


def mean_cs(n: int, total: float, total_sq: float, alpha: float, t_opt: int = 2000) -> Interval:
    """CS for the mean of n observations given their sum and sum of squares (plug-in variance).

    For paired differences: with no bound on the values the guarantee is the asymptotic
    one (Waudby-Smith et al.), as for every check here; a variance estimated from few
    samples is floored by `min_samples`, below which no check decides."""
    if n <= 1:
        return Interval(-math.inf, math.inf)
    mean = total / n
    variance = max(total_sq / n - mean * mean, 0.0) * n / (n - 1)
    if variance <= 0.0:
        variance = max(abs(mean), 1e-12) ** 2 * 1e-6  # identical values: keep the radius positive
    r = radius(n, variance, alpha, tuned_rho(variance, alpha, t_opt))
    return Interval(mean - r, mean + r)


# The bets a paired CS mixes: fractions of the largest stake that cannot go broke, sqrt(2)
# apart (any optimal bet is within 2^(1/4) of one of them, which keeps >= 96 % of its growth),
# from 0.9 down to 0.9 / 2^8.5: a smaller bet pays off only past ~10^5 rows.
_BETS = 0.9 * 2.0 ** (-np.arange(18) / 2)


def _log_wealth(n_minus: int, n_zero: int, n_plus: int, m: float, side: int) -> float:
    """log of the wealth of a bettor who stakes a fixed fraction of it on every item, against
    "the mean of d is at least m" (side +1: wins when d < m) or "at most m" (side -1), averaged
    over the fractions in _BETS. While the hypothesis holds each fixed-fraction wealth is a
    nonnegative supermartingale starting at 1, and so is their average: by Ville's inequality
    it ever reaches 1/a with probability at most a. It depends on the counts only."""
    lam = _BETS / (1.0 - side * m)  # scaled so the item that loses most costs that fraction of the wealth
    log_w = (
        n_minus * np.log1p(side * lam * (1.0 + m))
        + n_zero * np.log1p(side * lam * m)
        + n_plus * np.log1p(-side * lam * (1.0 - m))
    )
    return float(np.logaddexp.reduce(log_w) - math.log(len(_BETS)))


def _edge(n_minus: int, n_zero: int, n_plus: int, start: float, end: float, side: int, threshold: float) -> float:
    """The m nearest `start` (the mean) at which the side's wealth reaches `threshold`, by
    bisection (the wealth only grows as m moves away from the mean); `end` if it never does."""
    if _log_wealth(n_minus, n_zero, n_plus, end - side * 1e-9, side) < threshold:
        return end
    inside, outside = start, end
    for _ in range(40):
        mid = (inside + outside) / 2
        if _log_wealth(n_minus, n_zero, n_plus, mid, side) >= threshold:
            outside = mid
        else:
            inside = mid
    return outside


def paired_difference_cs(n: int, diff: int, discordant: int, alpha: float) -> Interval:
    """CS for p_a - p_b when both are measured on the same n items: `diff` is the sum of
    d = a - b over the items (each a and b 0 or 1) and `discordant` the items where a != b.

    Where two versions of one model mostly agree, d is nearly always 0 and its variance,
    P(a != b) - (p_a - p_b)^2, is far below the 2 p (1 - p) of two independent arms (the
    idea of McNemar's test, 1947). And when the worse version is wrong on rows the other
    got right, d is -1 on a small share of rows and +1 on almost none: a skewed, rare-event
    variable for which the normal boundary above is loose (it takes the variance seen, not
    the smaller one the bound implies). So this CS is built by betting (Waudby-Smith and
    Ramdas, "Estimating means of bounded random variables by betting", JRSS B 2024): each
    m is rejected once a mixture of fixed-fraction bets against it has multiplied its
    stake by 2/alpha (each side at alpha/2). It holds exactly, not asymptotically, at every
    n at once, and on a 2-point drop against a half-point bound (d = -1 on 2 % of rows)
    decides in about two thirds of the normal boundary's rows (docs/promotion.md)."""
    if n <= 0:
        return Interval(-1.0, 1.0)
    n_plus, n_minus = (discordant + diff) // 2, (discordant - diff) // 2
    n_zero, mean = n - discordant, diff / n
    threshold = math.log(2.0 / alpha)
    high = _edge(n_minus, n_zero, n_plus, mean, 1.0, +1, threshold)
    low = _edge(n_minus, n_zero, n_plus, mean, -1.0, -1, threshold)
    return Interval(low, high)


def samples_needed(n: int, value: float, interval: Interval, bound: float, log_scale: bool = False) -> int | None:
    """A rough estimate of how many more samples an inconclusive check needs: the CS's
    half-width shrinks about as 1/sqrt(n), so it clears the bound once it is smaller than
    the distance from the estimate to the bound. None when that cannot be estimated (the
    estimate sits on the bound, or the interval is still unbounded)."""
    low, high = interval.low, interval.high
    if log_scale:
        if not (value > 0 and low > 0 and bound > 0):
            return None
        value, low, high, bound = math.log(value), math.log(low), math.log(high), math.log(bound)
    if n <= 0 or not all(math.isfinite(x) for x in (value, low, high, bound)):
        return None
    gap = abs(value - bound)
    half = (high - low) / 2
    if gap <= 1e-12 * max(1.0, abs(bound)):
        return None
    return max(0, math.ceil(n * (half / gap) ** 2) - n)


def quantile_cs(counts: Sequence[int], edges: Sequence[float], q: float, alpha: float, t_opt: int = 2000) -> Interval:
    """CS for the q-quantile of values binned into a histogram (bucket i covers (edges[i-1], edges[i]]).

    1[X <= x_q] is Bernoulli(q) at the true quantile x_q, so a CS of radius r
    for that proportion brackets x_q between the empirical (q - r)- and
    (q + r)-quantiles (Howard and Ramdas, "Sequential estimation of quantiles
    with applications to A/B-testing and best-arm identification", Bernoulli
    2022). Bucket edges make the bracket coarser, never narrower.
    """
    cumulative = np.cumsum(np.asarray(counts, dtype=np.int64))
    n = int(cumulative[-1]) if len(cumulative) else 0
    if n == 0:
        return Interval(0.0, math.inf)
    variance = q * (1 - q)
    r = radius(n, variance, alpha, tuned_rho(variance, alpha, t_opt))
    lo_rank, hi_rank = (q - r) * n, (q + r) * n
    # Lower bound: the lower edge of the bucket holding rank lo_rank (0 if below the data).
    low = 0.0
    if lo_rank > 0:
        i = int(np.searchsorted(cumulative, lo_rank, side="left"))
        low = edges[i - 1] if i > 0 else 0.0
    high = math.inf
    if hi_rank <= n:
        high = edges[int(np.searchsorted(cumulative, hi_rank, side="left"))]
    return Interval(low, high)


def at_most(interval: Interval, bound: float) -> Verdict:
    """Is the quantity at most `bound`?"""
    if interval.high <= bound:
        return Verdict.PASS
    if interval.low > bound:
        return Verdict.FAIL
    return Verdict.INCONCLUSIVE


def at_least(interval: Interval, bound: float) -> Verdict:
    """Is the quantity at least `bound`?"""
    if interval.low >= bound:
        return Verdict.PASS
    if interval.high < bound:
        return Verdict.FAIL
    return Verdict.INCONCLUSIVE
