"""A model's drift monitor: the hot-path hooks and the per-version report.

Every request's inputs are checked for NaN/Inf (one np.isfinite pass; with
monitor.reject_invalid they are refused before the model runs). A `sample`
fraction of answered requests is binned: one broadcast comparison against the
edges and one bincount per input, one argmax and bincount for the prediction.
The report is computed on demand (the control API, the metrics sync), never on
the request path.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.config.spec import MonitorSpec
from gateway.errors import InvalidInput
from gateway.release.drift.profile import VersionProfile
from gateway.release.drift.scoring import chi_square_p, holm, psi
from gateway.release.drift.window import VersionDrift

PREDICTION = "prediction"  # the prediction histogram's name among the features
TOP_FEATURES = 10  # features a report lists (all of them are scored)
# Queued requests are binned together once this many rows wait, or the first has waited
# this long (so other workers see a quiet worker's counts within a second).
FLUSH_ROWS = 128
FLUSH_S = 0.5

# (rows, each profiled input as (rows, elements or features), the compared output or None)
_Entry = tuple[int, dict[str, np.ndarray], np.ndarray | None]


@dataclass(slots=True)
class _Pending:
    entries: list[_Entry] = field(default_factory=list)
    rows: int = 0
    since: float = 0.0  # when the first queued request came (monotonic); 0: none queued


@dataclass(frozen=True, slots=True)
class FeatureScore:
    name: str
    psi: float
    p_value: float
    rejected: bool  # by Holm at the monitor's alpha
    drifting: bool  # rejected and psi >= max_drift
    reference: list[int]  # counts per bin (below range, the bins, above range)
    live: list[int]
    edges: list[float]


@dataclass(frozen=True, slots=True)
class VersionDriftReport:
    version: str
    source: str  # the reference file
    judged: str  # "closed": the last closed window; "open": none closed yet (no verdict)
    rows: int  # rows in the judged window
    open_rows: int
    windows_closed: int
    score: float  # the largest feature PSI
    over_threshold: int  # features drifting
    prediction: FeatureScore | None
    alarm: bool  # a closed window with a drifting feature or prediction
    requests_checked: int
    nonfinite: dict[str, int]
    rejected: int
    out_of_range: dict[str, int]  # values outside the reference range, all closed windows and the open one
    max_drift: float
    alpha: float
    features: list[FeatureScore] = field(default_factory=list)  # the top ones, by PSI

    def to_dict(self) -> dict[str, Any]:
        def score(f: FeatureScore) -> dict[str, Any]:
            return {
                "name": f.name,
                "psi": f.psi,
                "p_value": f.p_value,
                "rejected": f.rejected,
                "drifting": f.drifting,
                "reference": f.reference,
                "live": f.live,
                "edges": [e if math.isfinite(e) else None for e in f.edges],
            }

        return {
            "version": self.version,
            "reference": self.source,
            "judged": self.judged,
            "rows": self.rows,
            "open_rows": self.open_rows,
            "windows_closed": self.windows_closed,
            "score": self.score,
            "over_threshold": self.over_threshold,
            "alarm": self.alarm,
            "prediction": None if self.prediction is None else score(self.prediction),
            "requests_checked": self.requests_checked,
            "nonfinite": self.nonfinite,
            "rejected": self.rejected,
            "out_of_range": self.out_of_range,
            "max_drift": self.max_drift,
            "alpha": self.alpha,
            "features": [score(f) for f in self.features],
        }


class ModelMonitor:
    """One model's reference profiles (by version) over the drift counts it records into."""

    def __init__(
        self,
        spec: MonitorSpec,
        profiles: Mapping[str, VersionProfile],
        windows: dict[str, VersionDrift],
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.profiles = profiles
        self.windows = windows  # the model evidence's, so they travel with its snapshot
        self._rng = rng
        self._clock = clock
        self._pending: dict[str, _Pending] = {}

    def _state(self, version: str) -> VersionDrift:
        state = self.windows.get(version)
        if state is None:
            state = self.windows[version] = VersionDrift()
        return state

    def check(self, version: str, feeds: Mapping[str, np.ndarray]) -> None:
        """With reject_invalid, refuse a request holding NaN/Inf before it runs (counted);
        otherwise nothing here: NaN/Inf of answered requests are counted when binned."""
        if not self.spec.reject_invalid or version not in self.profiles:
            return
        for name, x in feeds.items():
            if x.dtype.kind != "f" or np.isfinite(x).all():
                continue
            state = self._state(version)
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            state.nonfinite[name] = state.nonfinite.get(name, 0) + bad
            state.rejected += 1
            raise InvalidInput(f"input {name!r} holds {bad} NaN or infinite value(s) (monitor.reject_invalid)")

    def record(self, version: str, feeds: Mapping[str, np.ndarray], rows: int, compared: np.ndarray | None) -> None:
        """Queue an answered request's inputs and prediction for binning (sampled): a few
        microseconds here; the comparisons run over many rows at once in `flush`."""
        profile = self.profiles.get(version)
        if profile is None or (self.spec.sample < 1.0 and self._rng.random() >= self.spec.sample):
            return
        pending = self._pending.get(version)
        if pending is None:
            pending = self._pending[version] = _Pending()
        entry: dict[str, np.ndarray] = {}
        for name, inp in profile.inputs.items():
            x = feeds.get(name)
            if x is not None and x.size == rows * inp.rule.elements:
                # Small rows are kept as they came (a view, no copy); large ones are reduced
                # to their features now, so no pending request holds a large tensor.
                entry[name] = x.reshape(rows, -1) if not inp.rule.channels else inp.rule.features(x, rows)
        pending.entries.append((rows, entry, compared))
        pending.rows += rows
        now = self._clock()
        if not pending.since:
            pending.since = now
        if pending.rows >= FLUSH_ROWS or now - pending.since >= FLUSH_S:
            self._flush(version, pending)

    def flush(self) -> None:
        """Bin every queued request (before a report or a snapshot reads the counts)."""
        for version, pending in self._pending.items():
            self._flush(version, pending)

    def _flush(self, version: str, pending: _Pending) -> None:
        entries, pending.entries, pending.rows, pending.since = pending.entries, [], 0, 0.0
        profile = self.profiles.get(version)
        if profile is None or not entries:
            return
        state = self._state(version)
        state.requests_checked += len(entries)
        start = 0
        while start < len(entries):
            # A window closes at the first request that brings it to window_rows.
            need = self.spec.window_rows - state.open.rows
            end, rows = start, 0
            while end < len(entries) and rows < need:
                rows += entries[end][0]
                end += 1
            self._bin(profile, state, entries[start:end])
            state.open.rows += rows
            if state.open.rows >= self.spec.window_rows:
                state.close()
            start = end

    def _bin(self, profile: VersionProfile, state: VersionDrift, entries: list[_Entry]) -> None:
        window = state.open
        for name, inp in profile.inputs.items():
            parts = [e[1][name] for e in entries if name in e[1]]
            if not parts:
                continue
            x = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if x.dtype.kind == "f":
                finite = np.isfinite(x)
                if not finite.all():
                    state.nonfinite[name] = state.nonfinite.get(name, 0) + int(x.size - np.count_nonzero(finite))
                    x = x[finite.all(axis=1)]  # the rows without NaN/Inf are binned
            if x.shape[0]:
                window.add_input(name, inp.counts_of(x))
        if profile.classes is None:
            return
        k = profile.classes.shape[0]
        outputs = [e[2] for e in entries if e[2] is not None and e[2].ndim == 2 and e[2].shape[1] == k]
        if outputs:
            top = (outputs[0] if len(outputs) == 1 else np.concatenate(outputs)).argmax(axis=1)
            window.add_classes(np.bincount(top, minlength=k))

    def report(self, windows: Mapping[str, VersionDrift]) -> list[VersionDriftReport]:
        """Each profiled version's report on `windows` (this process's, or merged with other
        workers'; flush first)."""
        return [self.version_report(v, windows.get(v, VersionDrift())) for v in sorted(self.profiles)]

    def version_report(self, version: str, state: VersionDrift) -> VersionDriftReport:
        profile = self.profiles[version]
        spec = self.spec
        judged = "closed" if state.windows_closed else "open"
        window = state.closed if state.windows_closed else state.open
        names: list[str] = []
        refs: list[np.ndarray] = []
        lives: list[np.ndarray] = []
        edges: list[np.ndarray] = []
        out_of_range: dict[str, int] = {}
        for name, inp in profile.inputs.items():
            shape = inp.reference.shape
            live = window.inputs.get(name)
            live = np.zeros(shape, dtype=np.int64) if live is None or live.size != inp.slots else live.reshape(shape)
            names += inp.rule.names()
            refs += list(inp.reference)
            lives += list(live)
            edges += list(inp.edges)
            seen = [w.inputs[name].reshape(shape) for w in (state.past, state.open) if name in w.inputs]
            out_of_range[name] = int(sum(int(s[:, 0].sum() + s[:, -1].sum()) for s in seen if s.size == inp.slots))
        scores = _scores(names, refs, lives, edges)
        if profile.classes is not None:
            live_classes = window.classes if window.classes is not None else np.zeros_like(profile.classes)
            scores.append(
                _scores([PREDICTION], [profile.classes], [live_classes], [np.arange(len(profile.classes) + 1.0)])[0]
            )
        p = np.array([s.p_value for s in scores])
        rejected = holm(p, spec.alpha) if judged == "closed" and window.rows else np.zeros(len(scores), dtype=bool)
        judged_scores = [
            FeatureScore(
                s.name, s.psi, s.p_value, bool(r), bool(r and s.psi >= spec.max_drift), s.reference, s.live, s.edges
            )
            for s, r in zip(scores, rejected, strict=True)
        ]
        prediction = judged_scores.pop() if profile.classes is not None else None
        ranked = sorted(judged_scores, key=lambda s: (-s.psi, s.name))
        over = sum(s.drifting for s in judged_scores)
        return VersionDriftReport(
            version=version,
            source=profile.source,
            judged=judged,
            rows=window.rows,
            open_rows=state.open.rows,
            windows_closed=state.windows_closed,
            score=max((s.psi for s in judged_scores), default=0.0),
            over_threshold=over,
            prediction=prediction,
            alarm=over > 0 or (prediction is not None and prediction.drifting),
            requests_checked=state.requests_checked,
            nonfinite=dict(state.nonfinite),
            rejected=state.rejected,
            out_of_range=out_of_range,
            max_drift=spec.max_drift,
            alpha=spec.alpha,
            features=ranked[:TOP_FEATURES],
        )


def _scores(
    names: list[str], refs: list[np.ndarray], lives: list[np.ndarray], edges: list[np.ndarray]
) -> list[FeatureScore]:
    if not names:
        return []
    ref = np.stack(refs)
    live = np.stack(lives)
    values = psi(ref, live) if live.sum() else np.zeros(len(names))
    p = chi_square_p(ref, live)
    return [
        FeatureScore(n, float(v), float(pv), False, False, r.tolist(), c.tolist(), [float(x) for x in e])
        for n, v, pv, r, c, e in zip(names, values, p, ref, live, edges, strict=True)
    ]
