"""Drift scores per feature: the population stability index and a two-sample chi-square test,
with Holm's step-down procedure across every feature of a version and its prediction.

PSI = sum over bins of (live - ref) * ln(live / ref), proportions smoothed by half
a count per bin (an empty bin would make it infinite). It is an effect size: 0.1
is commonly read as a moderate shift, 0.2 as a large one (monitor.max_drift).

The test is Pearson's chi-square test of homogeneity of the reference and the
window on the feature's bins (bins empty in both dropped; degrees of freedom
= bins used - 1), which accounts for the reference's own sampling noise. Holm's
procedure over the m p-values of a version (every feature, plus the prediction
histogram when the reference has labels) keeps the chance of any false alarm
in a window at most alpha (the family-wise error rate), and names which
features moved. A feature drifts when Holm rejects it AND its PSI reaches
max_drift: significance alone flags tiny shifts once windows are large.
"""

from __future__ import annotations

import math

import numpy as np


def psi(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """PSI of each row of live counts against the same row of reference counts ((F, B) each)."""
    bins = reference.shape[-1]
    ref = (reference + 0.5) / (reference.sum(axis=-1, keepdims=True) + 0.5 * bins)
    cur = (live + 0.5) / (live.sum(axis=-1, keepdims=True) + 0.5 * bins)
    result: np.ndarray = ((cur - ref) * np.log(cur / ref)).sum(axis=-1)
    return result


def chi_square_p(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """p-value of the two-sample chi-square test of each row ((F, B) counts each); 1 where a
    side is empty or only one bin is used."""
    ref = reference.astype(np.float64)
    cur = live.astype(np.float64)
    column = ref + cur
    n_ref = ref.sum(axis=-1, keepdims=True)
    n_cur = cur.sum(axis=-1, keepdims=True)
    total = n_ref + n_cur
    with np.errstate(divide="ignore", invalid="ignore"):
        e_ref = n_ref * column / total
        e_cur = n_cur * column / total
        terms = np.where(column > 0, (ref - e_ref) ** 2 / e_ref + (cur - e_cur) ** 2 / e_cur, 0.0)
    stat = np.nan_to_num(terms).sum(axis=-1)
    dof = (column > 0).sum(axis=-1) - 1
    p = np.ones(stat.shape)
    usable = (dof > 0) & (n_ref[..., 0] > 0) & (n_cur[..., 0] > 0)
    for index in zip(*np.nonzero(usable), strict=True):
        p[index] = chi2_sf(float(stat[index]), int(dof[index]))
    return p


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with `dof` degrees of freedom: the regularized upper
    incomplete gamma function Q(dof / 2, x / 2), by its power series below a + 1 and its
    continued fraction (modified Lentz) above, each to double precision."""
    a, z = dof / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    log_prefix = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-16:
            n += 1
            term *= z / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = z + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        step = d * c
        h *= step
        if abs(step - 1) < 1e-16:
            break
    return min(1.0, h * math.exp(log_prefix))


def holm(p: np.ndarray, alpha: float) -> np.ndarray:
    """Which hypotheses Holm's step-down procedure rejects at family-wise level alpha."""
    m = p.size
    rejected = np.zeros(m, dtype=bool)
    for rank, index in enumerate(np.argsort(p, kind="stable")):
        if p[index] > alpha / (m - rank):
            break
        rejected[index] = True
    return rejected
