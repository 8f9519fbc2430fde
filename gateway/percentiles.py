"""One definition of a percentile for the whole project: the nearest rank.

The q-quantile of n values is the value at rank ceil(q * n) (at least 1) in
ascending order: always a latency some request really had, never an
interpolation between two. The same rank picks the bucket of a latency
histogram (gateway.release.compare), so the gate, replay, the release windows
and the load tests all mean the same thing by "p99".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def quantile_rank(q: float, count: int) -> int:
    """The 1-based rank of the q-quantile (0 <= q <= 1) among `count` ascending values."""
    # Rounded first: 0.07 * 100 is 7.000000000000001 in floating point, whose ceiling would skip a rank.
    return max(1, math.ceil(round(q * count, 9)))


def quantile(ordered: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-quantile (0 <= q <= 1) of ascending values by nearest rank; NaN when there are none."""
    if len(ordered) == 0:
        return math.nan
    return float(ordered[min(quantile_rank(q, len(ordered)), len(ordered)) - 1])


def p99(values: Iterable[float]) -> float:
    """The 99th percentile of `values` in any order (nearest rank); NaN when there are none."""
    return quantile(sorted(values), 0.99)
