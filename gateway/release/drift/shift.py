"""Prediction drift between a rollout's candidate and its stable version on the same rows.

Dual-run and shadow copies give both versions' answers to the very same inputs,
so for each class k the change in its share of predictions, d_k = P(candidate
says k) - P(stable says k), is the mean of a paired difference of indicators:
`confidence.paired_difference_cs` gives it an anytime-valid confidence sequence,
whose variance is small where the two versions mostly agree. The check
(policy.max_drift) bounds the largest |d_k| over the K classes; each class's CS
gets alpha / K (a union bound), so the interval for max_k |d_k| holds at every
look with probability at least 1 - alpha.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.release.confidence import Interval, paired_difference_cs


@dataclass(slots=True)
class ClassShift:
    rows: int = 0
    diff: np.ndarray | None = None  # per class: rows the candidate said k minus rows the stable said k
    discordant: np.ndarray | None = None  # per class: rows where exactly one of the two said k

    def add(self, stable: np.ndarray, candidate: np.ndarray) -> None:
        """Both versions' compared outputs on the same rows ((rows, K) scores each)."""
        if stable.ndim != 2 or stable.shape != candidate.shape or not stable.shape[0]:
            return
        k = stable.shape[1]
        s, c = stable.argmax(axis=1), candidate.argmax(axis=1)
        differ = s != c
        diff = np.bincount(c, minlength=k) - np.bincount(s, minlength=k)
        discordant = np.bincount(c[differ], minlength=k) + np.bincount(s[differ], minlength=k)
        self._add(int(stable.shape[0]), diff, discordant)

    def _add(self, rows: int, diff: np.ndarray, discordant: np.ndarray) -> None:
        if self.diff is None or self.discordant is None:
            self.diff, self.discordant = diff.astype(np.int64), discordant.astype(np.int64)
        elif self.diff.shape == diff.shape:
            self.diff += diff
            self.discordant += discordant
        else:
            return  # another model's classes (a reload changed the output): not comparable
        self.rows += rows

    def merge(self, other: ClassShift) -> None:
        if other.diff is not None and other.discordant is not None:
            self._add(other.rows, other.diff, other.discordant)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "diff": None if self.diff is None else self.diff.tolist(),
            "discordant": None if self.discordant is None else self.discordant.tolist(),
        }

    @staticmethod
    def from_dict(data: dict[str, Any] | None) -> ClassShift:
        shift = ClassShift()
        if data and data.get("diff") is not None:
            shift._add(int(data["rows"]), np.asarray(data["diff"]), np.asarray(data["discordant"]))
        return shift

    def largest(self, alpha: float) -> tuple[float, Interval]:
        """max_k |d_k| and its confidence interval (alpha split across the K classes)."""
        if self.diff is None or self.discordant is None or not self.rows:
            return float("nan"), Interval(0.0, 1.0)
        k = len(self.diff)
        value = float(np.abs(self.diff).max() / self.rows)
        low = high = 0.0
        for d, m in zip(self.diff.tolist(), self.discordant.tolist(), strict=True):
            cs = paired_difference_cs(self.rows, d, m, alpha / k)
            high = max(high, abs(cs.low), abs(cs.high))
            low = max(low, 0.0 if cs.low <= 0 <= cs.high else min(abs(cs.low), abs(cs.high)))
        return value, Interval(low, high)
