"""Live counts on a version's reference bins: plain integer arrays, so they add up.

A version's drift state is an open window filling with sampled rows, the last
closed window (the one a verdict is given on), the sum of all closed windows
(for the out-of-range totals), and counters of the checks every request gets.
Workers' states merge by adding; each worker closes its own windows every
`window_rows` rows, so the merged closed window is the sum of the workers' last
ones: still a sample whose size was fixed before its rows were seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class DriftWindow:
    rows: int = 0
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # flattened counts per input
    classes: np.ndarray | None = None  # top-1 class counts of the compared output

    def add_input(self, name: str, counts: np.ndarray) -> None:
        held = self.inputs.get(name)
        if held is None:
            self.inputs[name] = counts.astype(np.int64, copy=True)
        else:
            held += counts

    def add_classes(self, counts: np.ndarray) -> None:
        if self.classes is None:
            self.classes = counts.astype(np.int64, copy=True)
        elif self.classes.shape == counts.shape:
            self.classes += counts

    def merge(self, other: DriftWindow) -> None:
        self.rows += other.rows
        for name, counts in other.inputs.items():
            held = self.inputs.get(name)
            if held is None or held.shape == counts.shape:
                self.add_input(name, counts)
        if other.classes is not None:
            self.add_classes(other.classes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "inputs": {name: counts.tolist() for name, counts in self.inputs.items()},
            "classes": None if self.classes is None else self.classes.tolist(),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> DriftWindow:
        classes = data.get("classes")
        return DriftWindow(
            rows=int(data["rows"]),
            inputs={name: np.asarray(c, dtype=np.int64) for name, c in data["inputs"].items()},
            classes=None if classes is None else np.asarray(classes, dtype=np.int64),
        )


@dataclass(slots=True)
class VersionDrift:
    open: DriftWindow = field(default_factory=DriftWindow)
    closed: DriftWindow = field(default_factory=DriftWindow)  # the last closed window
    past: DriftWindow = field(default_factory=DriftWindow)  # every closed window, summed
    windows_closed: int = 0
    requests_checked: int = 0  # requests whose inputs were checked for NaN/Inf
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/Inf elements seen, by input
    rejected: int = 0  # requests refused for NaN/Inf (monitor.reject_invalid)

    def close(self) -> None:
        self.past.merge(self.open)
        self.closed, self.open = self.open, DriftWindow()
        self.windows_closed += 1

    def merge(self, other: VersionDrift) -> None:
        self.open.merge(other.open)
        self.closed.merge(other.closed)
        self.past.merge(other.past)
        self.windows_closed += other.windows_closed
        self.requests_checked += other.requests_checked
        self.rejected += other.rejected
        for name, count in other.nonfinite.items():
            self.nonfinite[name] = self.nonfinite.get(name, 0) + count

    def to_dict(self) -> dict[str, Any]:
        return {
            "open": self.open.to_dict(),
            "closed": self.closed.to_dict(),
            "past": self.past.to_dict(),
            "windows_closed": self.windows_closed,
            "requests_checked": self.requests_checked,
            "nonfinite": dict(self.nonfinite),
            "rejected": self.rejected,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> VersionDrift:
        return VersionDrift(
            open=DriftWindow.from_dict(data["open"]),
            closed=DriftWindow.from_dict(data["closed"]),
            past=DriftWindow.from_dict(data["past"]),
            windows_closed=int(data["windows_closed"]),
            requests_checked=int(data["requests_checked"]),
            nonfinite={k: int(v) for k, v in data["nonfinite"].items()},
            rejected=int(data.get("rejected", 0)),
        )


def merged(states: list[dict[str, dict[str, Any]]]) -> dict[str, VersionDrift]:
    """Several workers' drift states (as `to_dict` wrote them, by version), added up."""
    out: dict[str, VersionDrift] = {}
    for state in states:
        for version, data in state.items():
            out.setdefault(version, VersionDrift()).merge(VersionDrift.from_dict(data))
    return out
