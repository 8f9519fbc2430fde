"""Statistics that compare model versions: per-version windows and per-pair differences.

Pure and mergeable: every structure here is plain counts and sums, so the
windows of several worker processes add up to the window of all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.config.spec import CompareSpec
from gateway.percentiles import quantile_rank

# Latency histogram: log-spaced buckets from 10 us to ~100 s, 2% apart, so
# percentiles are exact to within 2% and a window is a fixed-size count array.
_LOW_S = 1e-5
_RATIO = 1.02
_BUCKETS = int(math.log(1e7) / math.log(_RATIO)) + 2
_LOG_RATIO = math.log(_RATIO)


def _bucket(seconds: float) -> int:
    if seconds <= _LOW_S:
        return 0
    return min(_BUCKETS - 1, 1 + int(math.log(seconds / _LOW_S) / _LOG_RATIO))


# Computed once: the policy reads them for every latency check at every interval.
_EDGES = tuple(_LOW_S * _RATIO**i for i in range(_BUCKETS))


def bucket_edges() -> tuple[float, ...]:
    """Upper edge (seconds) of each latency bucket."""
    return _EDGES


@dataclass(slots=True)
class LatencyHistogram:
    counts: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    total: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.counts[_bucket(seconds)] += count
        self.total += count

    def merge(self, other: LatencyHistogram) -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.total += other.total

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding the q-quantile (seconds, nearest rank); 0 when empty."""
        if not self.total:
            return 0.0
        rank = quantile_rank(q, self.total)
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return _LOW_S * _RATIO**i
        return _LOW_S * _RATIO ** (_BUCKETS - 1)


@dataclass(slots=True)
class VersionWindow:
    """What one version did in a window: requests, errors, latency, and labels joined."""

    requests: int = 0
    errors: int = 0
    rows: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    labelled: int = 0  # rows with ground truth
    correct: int = 0  # classification: rows whose top-1 equals the label
    abs_error: float = 0.0  # regression: sum of |prediction - label|

    def record(self, ok: bool, seconds: float, rows: int, requests: int = 1, latency: bool = True) -> None:
        """`requests` requests of `rows` rows in all, each of which took `seconds`
        (left out of the latency histogram when `latency` is False)."""
        self.requests += requests
        if ok:
            self.rows += rows
            if latency:
                self.latency.add(seconds, requests)
        else:
            self.errors += requests

    def merge(self, other: VersionWindow) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.rows += other.rows
        self.latency.merge(other.latency)
        self.labelled += other.labelled
        self.correct += other.correct
        self.abs_error += other.abs_error

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else float("nan")


@dataclass(slots=True)
class PairWindow:
    """A candidate (shadow or canary) against the stable version, on the same requests."""

    requests: int = 0
    rows: int = 0
    agree: int = 0  # rows with the same top-1 (classification)
    within_tolerance: int = 0  # rows whose outputs are allclose(atol, rtol)
    max_abs: float = 0.0
    sum_abs: float = 0.0
    elements: int = 0
    sq_diff: float = 0.0
    sq_base: float = 0.0
    latency_diff_s: float = 0.0  # sum of candidate - stable latency
    # Paired timing: batches of copies run back to back on both versions (in random
    # order), each a paired difference of run time on identical rows.
    timed: int = 0
    time_diff_s: float = 0.0  # sum of candidate - stable run time
    time_diff_sq: float = 0.0  # sum of squares of those differences
    # Paired correctness: rows that ran on both versions and were then labelled. Per row
    # d = (candidate right) - (stable right), in {-1, 0, 1}: `label_diff` sums d and
    # `label_discordant` sums d squared (the rows only one version got right).
    labelled: int = 0
    label_diff: int = 0
    label_discordant: int = 0

    def merge(self, other: PairWindow) -> None:
        self.requests += other.requests
        self.rows += other.rows
        self.agree += other.agree
        self.within_tolerance += other.within_tolerance
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sum_abs += other.sum_abs
        self.elements += other.elements
        self.sq_diff += other.sq_diff
        self.sq_base += other.sq_base
        self.latency_diff_s += other.latency_diff_s
        self.timed += other.timed
        self.time_diff_s += other.time_diff_s
        self.time_diff_sq += other.time_diff_sq
        self.labelled += other.labelled
        self.label_diff += other.label_diff
        self.label_discordant += other.label_discordant

    def add_labels(self, candidate_right: np.ndarray, stable_right: np.ndarray) -> None:
        """Rows both versions predicted, now labelled: which each got right (boolean arrays)."""
        self.labelled += int(candidate_right.shape[0])
        self.label_diff += int(np.count_nonzero(candidate_right)) - int(np.count_nonzero(stable_right))
        self.label_discordant += int(np.count_nonzero(candidate_right != stable_right))

    def add_timing(self, candidate_s: float, stable_s: float) -> None:
        """One batch run on both versions: its paired run-time difference."""
        diff = candidate_s - stable_s
        self.timed += 1
        self.time_diff_s += diff
        self.time_diff_sq += diff * diff

    @property
    def agreement(self) -> float:
        return self.agree / self.rows if self.rows else float("nan")

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.elements if self.elements else float("nan")

    @property
    def relative_l2(self) -> float:
        if not self.elements:
            return float("nan")
        return math.sqrt(self.sq_diff) / math.sqrt(self.sq_base) if self.sq_base else math.sqrt(self.sq_diff)

    @property
    def mean_latency_diff_s(self) -> float:
        return self.latency_diff_s / self.requests if self.requests else float("nan")


# The class of a row with no values (a zero-element output): never a class index,
# so such a row agrees only with another empty row and never matches a label.
NO_CLASS = -1


def as_rows(output: np.ndarray) -> np.ndarray:
    """`output` as a (rows, values per row) matrix; a 0-d output is one row of one value.

    The sizes are explicit: numpy cannot infer a -1 size when there are zero rows.
    """
    if output.ndim == 0:
        return output.reshape(1, 1)
    return output.reshape(output.shape[0], math.prod(output.shape[1:]))


def top1(output: np.ndarray) -> np.ndarray:
    """Predicted class per row: argmax over the last axis (or the value itself for 1-D labels);
    NO_CLASS for a row without values."""
    if output.ndim <= 1:
        return output.reshape(-1)
    matrix = as_rows(output)
    if not matrix.shape[1]:
        return np.full(matrix.shape[0], NO_CLASS, dtype=np.int64)
    result: np.ndarray = np.argmax(matrix, axis=1)
    return result


def first_values(output: np.ndarray) -> np.ndarray:
    """A regression's prediction per row: its first value; NaN for a row without values
    (as for a model that answers NaN: the row has no usable prediction)."""
    matrix = as_rows(output)
    if not matrix.shape[1]:
        return np.full(matrix.shape[0], np.nan)
    return matrix[:, 0].astype(np.float64)


def compare_outputs(
    pair: PairWindow,
    baseline: np.ndarray,
    candidate: np.ndarray,
    spec: CompareSpec,
    latency_diff_s: float,
    requests: int = 1,
) -> None:
    """Add the comparison of `requests` requests (their rows stacked) to `pair`.

    Every figure is a per-row count or a sum over elements, so comparing the
    rows of several requests at once adds exactly what comparing each would.
    `latency_diff_s` is the sum over the requests. Shapes must match (the caller checks).
    """
    base = as_rows(baseline.astype(np.float64, copy=False))
    cand = as_rows(candidate.astype(np.float64, copy=False))
    rows = base.shape[0]
    diff = np.abs(cand - base)
    pair.requests += requests
    pair.rows += rows
    if spec.kind == "classification":
        pair.agree += int(np.count_nonzero(top1(baseline) == top1(candidate)))
    close = diff <= spec.atol + spec.rtol * np.abs(base)
    pair.within_tolerance += int(np.count_nonzero(close.all(axis=1)))
    if diff.size:
        pair.max_abs = max(pair.max_abs, float(diff.max()))
    pair.sum_abs += float(diff.sum())
    pair.elements += diff.size
    pair.sq_diff += float(np.square(diff).sum())
    pair.sq_base += float(np.square(base).sum())
    pair.latency_diff_s += latency_diff_s


def copy_window(w: VersionWindow) -> VersionWindow:
    copied = VersionWindow()
    copied.merge(w)
    return copied


def copy_pair(p: PairWindow) -> PairWindow:
    copied = PairWindow()
    copied.merge(p)
    return copied


def window_since(now: VersionWindow, base: VersionWindow) -> VersionWindow:
    """What a window gathered after `base` was copied from it: every count and sum subtracts."""
    w = VersionWindow(
        requests=now.requests - base.requests,
        errors=now.errors - base.errors,
        rows=now.rows - base.rows,
        labelled=now.labelled - base.labelled,
        correct=now.correct - base.correct,
        abs_error=now.abs_error - base.abs_error,
    )
    w.latency.counts = [a - b for a, b in zip(now.latency.counts, base.latency.counts, strict=True)]
    w.latency.total = now.latency.total - base.latency.total
    return w


def pair_since(now: PairWindow, base: PairWindow) -> PairWindow:
    """`window_since` for a pair (its maximum cannot subtract: the whole window's is kept)."""
    since = PairWindow(max_abs=now.max_abs)
    for name in PairWindow.__slots__:
        if name != "max_abs":
            setattr(since, name, getattr(now, name) - getattr(base, name))
    return since


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (fixed-sample; for reports, not decisions)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def window_to_dict(w: VersionWindow) -> dict[str, Any]:
    """A window as JSON-ready data (the latency histogram sparse: bucket -> count)."""
    return {
        "requests": w.requests,
        "errors": w.errors,
        "rows": w.rows,
        "labelled": w.labelled,
        "correct": w.correct,
        "abs_error": w.abs_error,
        "latency": {str(i): c for i, c in enumerate(w.latency.counts) if c},
    }


def window_from_dict(data: dict[str, Any]) -> VersionWindow:
    w = VersionWindow(
        requests=data["requests"],
        errors=data["errors"],
        rows=data["rows"],
        labelled=data["labelled"],
        correct=data["correct"],
        abs_error=data["abs_error"],
    )
    for index, count in data["latency"].items():
        w.latency.counts[int(index)] = count
    w.latency.total = sum(data["latency"].values())
    return w


def pair_to_dict(p: PairWindow) -> dict[str, Any]:
    return {name: getattr(p, name) for name in PairWindow.__slots__}


def pair_from_dict(data: dict[str, Any]) -> PairWindow:
    return PairWindow(**data)
