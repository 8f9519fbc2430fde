"""What the gateway has seen of each version: windows, pairs, predictions and labels.

One `ModelEvidence` per logical model. The data plane records into it; the
report (and the promotion engine) read it. Everything is counts and sums, so
windows merge across worker processes.
"""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.config.spec import CompareSpec
from gateway.errors import InvalidInput
from gateway.release.compare import (
    PairWindow,
    VersionWindow,
    compare_outputs,
    copy_pair,
    copy_window,
    first_values,
    pair_from_dict,
    pair_to_dict,
    top1,
    wilson_interval,
    window_from_dict,
    window_to_dict,
)
from gateway.release.drift.shift import ClassShift
from gateway.release.drift.window import VersionDrift
from gateway.release.drift.window import merged as merged_states

# (version, role, values): values per row are the top-1 class (classification)
# or the first output value (regression).
Prediction = tuple[str, str, np.ndarray]
# (when the first prediction was logged, monotonic; every prediction for the id;
# the entry's estimated size in bytes, see `_entry_bytes`)
_Logged = tuple[float, tuple[Prediction, ...], int]

# The log holds ids the clients chose, for an hour: without a byte bound, large ids
# or large prediction rows held hundreds of MB (400 requests with 1 MB ids: 415 MB).
# Ids are capped at decode (setting max_id_bytes), and the log as a whole here.
# 64 MiB holds the default 100k entries of short ids and a few rows each.
PREDICTION_LOG_BYTES = 64 * (1 << 20)
# What one entry and one prediction cost beyond the id and the values' data, roughly:
# the dict slot and entry tuple; the prediction tuple and the array's header.
_ENTRY_OVERHEAD = 200
_PREDICTION_OVERHEAD = 200


def _prediction_bytes(prediction: Prediction) -> int:
    return _PREDICTION_OVERHEAD + prediction[2].nbytes


class PredictionLog:
    """Recent predictions by request id, capped in count, bytes and age, so labels can be
    joined later. The oldest entries go first whichever cap is reached.

    Entries are plain tuples of strings, floats and arrays on purpose: the
    collector stops tracking such tuples after one pass, so a full log (100k
    entries by default) adds almost nothing to each full garbage collection,
    where dataclass entries made every one of them traverse ~3 objects a request.
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = PREDICTION_LOG_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Logged] = OrderedDict()
        self.nbytes = 0  # the entries' estimated size, kept under max_bytes
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, request_id: str, prediction: Prediction) -> None:
        self.record_many(((request_id, prediction),))

    def record_many(self, predictions: Iterable[tuple[str, Prediction]]) -> None:
        """Log predictions by request id (a shadow batch's at once: one clock read, one eviction pass)."""
        now = self._clock()
        entries = self._entries
        for request_id, prediction in predictions:
            size = _prediction_bytes(prediction)
            entry = entries.get(request_id)
            if entry is None:
                size += _ENTRY_OVERHEAD + sys.getsizeof(request_id)
                entries[request_id] = (now, (prediction,), size)
            else:
                entries[request_id] = (entry[0], (*entry[1], prediction), entry[2] + size)
            self.nbytes += size
        self._evict(now)

    def _evict(self, now: float) -> None:
        entries = self._entries
        while entries and (
            len(entries) > self.max_entries
            or self.nbytes > self.max_bytes
            or now - next(iter(entries.values()))[0] > self.max_age_s
        ):
            self.nbytes -= entries.popitem(last=False)[1][2]
            self.evicted += 1

    def peek(self, request_id: str) -> tuple[tuple[Prediction, ...], float] | None:
        """What `take` would return, left in the log (labels are checked before they are joined)."""
        self._evict(self._clock())
        entry = self._entries.get(request_id)
        return None if entry is None else (entry[1], entry[0])

    def take(self, request_id: str) -> tuple[tuple[Prediction, ...], float] | None:
        """Remove and return the predictions made for a request id, and when the first was
        logged (monotonic); None when the id is unknown or expired."""
        self._evict(self._clock())
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        self.nbytes -= entry[2]
        return entry[1], entry[0]


def prediction_values(output: np.ndarray, kind: str) -> np.ndarray:
    if kind == "classification":
        return top1(output)
    return first_values(output)


# What became of one label set (SubmitFeedback counts each outcome apart).
JOINED = "joined"
# The role of a dual run's copy (a canary's request run again on the stable version) in
# the prediction log: labels join it with the canary's answer as a pair, not as an arm's.
COPY = "copy"
# The role prefix of a rule-routed prediction in the log: `rule:NAME` (see `routed_role`).
ROUTED = "rule:"
UNKNOWN = "unknown"  # no prediction logged for the id here (never, or expired)
ALREADY = "already_labelled"  # its prediction was joined with labels before: a resend
# How many labelled request ids each model remembers (as 8-byte hashes, ~100 bytes each
# with the dict's slot: ~10 MB), to tell a resent label from an unknown id.
LABELLED_IDS_KEPT = 100_000


def routed_role(rule: str) -> str:
    """The role a rule-routed prediction is logged with: its labels count for the rule only."""
    return ROUTED + rule


@dataclass(slots=True)
class FeedbackResult:
    joined: int = 0
    unknown: int = 0


@dataclass
class ModelEvidence:
    model: str
    spec: CompareSpec
    output_index: int  # which model output is compared and labelled
    log: PredictionLog = field(default_factory=PredictionLog)
    windows: dict[str, VersionWindow] = field(default_factory=dict)
    pairs: dict[str, PairWindow] = field(default_factory=dict)  # candidate version -> vs stable
    feedback_joined: int = 0
    started: float = field(default_factory=time.time)
    # Evidence since the current rollout began (stable and candidate windows,
    # and the candidate-vs-stable pair); None when no rollout is active.
    rollout: dict[str, VersionWindow] | None = None
    rollout_pair: PairWindow | None = None
    rollout_versions: tuple[str, str] = ("", "")
    rollout_key: str = ""  # identifies the rollout, so workers' windows merge only within one
    rollout_began: float = 0.0  # monotonic; labels of earlier predictions stay out of the rollout
    # The rollout's windows as they were when its current step began (None: the step
    # began with the rollout), so a step is judged on its own traffic by subtraction:
    # nothing is recorded twice on the request path.
    step_base: tuple[VersionWindow, VersionWindow, PairWindow] | None = None
    step_began: float = 0.0  # monotonic
    labels_received: int = 0
    # Hashes of request ids whose predictions were joined with labels, oldest first.
    labelled: OrderedDict[int, None] = field(default_factory=OrderedDict, repr=False)
    # Drift counts by version (gateway.release.drift: the monitor records into them), and the
    # rollout's candidate-vs-stable prediction shift on the same rows (policy.max_drift).
    drift: dict[str, VersionDrift] = field(default_factory=dict, repr=False)
    rollout_shift: ClassShift | None = None
    # Traffic routing rules sent, by rule name and version: a cohort is no random sample,
    # so it never enters `windows` or `rollout` (the arms the checks compare).
    routed: dict[str, dict[str, VersionWindow]] = field(default_factory=dict)

    def begin_rollout(self, stable: str, candidate: str, key: str = "") -> None:
        """Start gathering rollout evidence afresh (a new rollout, or a restart mid-rollout)."""
        self.rollout = {stable: VersionWindow(), candidate: VersionWindow()}
        self.rollout_pair = PairWindow()
        self.rollout_shift = ClassShift()
        self.rollout_versions = (stable, candidate)
        self.rollout_key = key
        self.rollout_began = time.monotonic()
        self.step_base = None
        self.step_began = self.rollout_began

    def begin_step(self, stable: VersionWindow, candidate: VersionWindow, pair: PairWindow) -> None:
        """A new traffic step begins: remember (copies of) the rollout's windows so far."""
        self.step_base = (copy_window(stable), copy_window(candidate), copy_pair(pair))
        self.step_began = time.monotonic()

    def end_rollout(self) -> None:
        self.rollout = None
        self.rollout_pair = None
        self.rollout_shift = None
        self.step_base = None
        self.rollout_versions = ("", "")
        self.rollout_key = ""

    # -- sharing between worker processes --------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything countable, as JSON-ready data (the prediction log stays local)."""
        return {
            "windows": {v: window_to_dict(w) for v, w in self.windows.items()},
            "pairs": {v: pair_to_dict(p) for v, p in self.pairs.items()},
            "feedback_joined": self.feedback_joined,
            "labels_received": self.labels_received,
            "rollout_key": self.rollout_key,
            "rollout": {v: window_to_dict(w) for v, w in (self.rollout or {}).items()},
            "rollout_pair": pair_to_dict(self.rollout_pair) if self.rollout_pair else None,
            "drift": {v: d.to_dict() for v, d in self.drift.items()},
            "rollout_shift": self.rollout_shift.to_dict() if self.rollout_shift else None,
            "routed": {r: {v: window_to_dict(w) for v, w in by.items()} for r, by in self.routed.items()},
        }

    def merged_with(self, peers: Sequence[dict[str, Any]]) -> ModelEvidence:
        """A view of this evidence plus other workers' snapshots (same rollout only)."""
        merged = ModelEvidence(self.model, self.spec, self.output_index, log=self.log, started=self.started)
        for data in [self.snapshot(), *peers]:
            for version, w in data["windows"].items():
                merged.window(version).merge(window_from_dict(w))
            for version, p in data["pairs"].items():
                merged.pairs.setdefault(version, PairWindow()).merge(pair_from_dict(p))
            merged.feedback_joined += data["feedback_joined"]
            merged.labels_received += data["labels_received"]
            for rule, by_version in data.get("routed", {}).items():  # absent from older workers' snapshots
                for version, w in by_version.items():
                    merged.routed_window(rule, version).merge(window_from_dict(w))
        merged.drift = merged_states([data.get("drift", {}) for data in [self.snapshot(), *peers]])
        if self.rollout is not None:
            stable, candidate = self.rollout_versions
            merged.begin_rollout(stable, candidate, self.rollout_key)
            assert merged.rollout is not None and merged.rollout_pair is not None
            for data in [self.snapshot(), *peers]:
                if data["rollout_key"] != self.rollout_key:
                    continue
                for version, w in data["rollout"].items():
                    if version in merged.rollout:
                        merged.rollout[version].merge(window_from_dict(w))
                if data["rollout_pair"]:
                    merged.rollout_pair.merge(pair_from_dict(data["rollout_pair"]))
                if merged.rollout_shift is not None:
                    merged.rollout_shift.merge(ClassShift.from_dict(data.get("rollout_shift")))
        return merged

    def rollout_windows(self) -> tuple[VersionWindow, VersionWindow, PairWindow]:
        stable, candidate = self.rollout_versions
        if self.rollout is None or self.rollout_pair is None:
            return VersionWindow(), VersionWindow(), PairWindow()
        return self.rollout[stable], self.rollout[candidate], self.rollout_pair

    def _targets(self, version: str, predicted_at: float | None = None) -> list[VersionWindow]:
        targets = [self.window(version)]
        if predicted_at is not None and predicted_at < self.rollout_began:
            return targets
        if self.rollout is not None and version in self.rollout:
            targets.append(self.rollout[version])
        return targets

    def window(self, version: str) -> VersionWindow:
        w = self.windows.get(version)
        if w is None:
            w = self.windows[version] = VersionWindow()
        return w

    def routed_window(self, rule: str, version: str) -> VersionWindow:
        by_version = self.routed.get(rule)
        if by_version is None:
            by_version = self.routed[rule] = {}
        w = by_version.get(version)
        if w is None:
            w = by_version[version] = VersionWindow()
        return w

    def record_routed(self, rule: str, version: str, ok: bool, seconds: float, rows: int) -> None:
        """Count a request a routing rule sent to `version`, in the rule's own window only."""
        self.routed_window(rule, version).record(ok, seconds, rows, 1)

    def record_request(
        self, version: str, ok: bool, seconds: float, rows: int, requests: int = 1, served: bool = True
    ) -> None:
        """Count requests in the version's windows. A shadow's (`served` False) latency is
        its batch's run time, not what a client would wait: it goes in the version's window
        for the report, never in the rollout's, whose latency check compares served traffic."""
        targets = self._targets(version)
        targets[0].record(ok, seconds, rows, requests)
        for w in targets[1:]:
            w.record(ok, seconds, rows, requests, latency=served)

    def compared(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        """The output that is compared and labelled."""
        return outputs[self.output_index]

    def record_prediction(self, request_id: str, version: str, role: str, outputs: Sequence[np.ndarray]) -> None:
        if request_id:
            values = prediction_values(outputs[self.output_index], self.spec.kind)
            self.log.record(request_id, (version, role, values))

    def record_predictions(
        self, version: str, role: str, requests: Sequence[tuple[str, int]], output: np.ndarray
    ) -> None:
        """Log the predictions of several requests (id, rows) whose rows are stacked in `output`."""
        values = prediction_values(output, self.spec.kind)
        if len(requests) == 1:
            # One request: its values whole, as record_prediction logs them (a model
            # without a batch dimension has no rows to slice by).
            if requests[0][0]:
                self.log.record(requests[0][0], (version, role, values))
            return
        logged: list[tuple[str, Prediction]] = []
        offset = 0
        for request_id, rows in requests:
            if request_id:
                logged.append((request_id, (version, role, values[offset : offset + rows])))
            offset += rows
        self.log.record_many(logged)

    def record_pair(
        self, candidate: str, base: np.ndarray, cand: np.ndarray, latency_diff_s: float, requests: int = 1
    ) -> bool:
        """Compare a candidate's compared output with the stable's on the same requests (rows
        stacked; `latency_diff_s` summed over them); False when the shapes differ."""
        if base.shape != cand.shape:
            return False
        pair = self.pairs.get(candidate)
        if pair is None:
            pair = self.pairs[candidate] = PairWindow()
        compare_outputs(pair, base, cand, self.spec, latency_diff_s, requests)
        if self.rollout_pair is not None and candidate == self.rollout_versions[1]:
            compare_outputs(self.rollout_pair, base, cand, self.spec, latency_diff_s, requests)
            if self.rollout_shift is not None and self.spec.kind == "classification":
                self.rollout_shift.add(base, cand)
        return True

    def record_timing(self, candidate: str, candidate_s: float, stable_s: float) -> None:
        """One batch of copies timed on the candidate and on the stable version (a paired
        difference), per batch: never on the request path."""
        pair = self.pairs.get(candidate)
        if pair is None:
            pair = self.pairs[candidate] = PairWindow()
        pair.add_timing(candidate_s, stable_s)
        if self.rollout_pair is not None and candidate == self.rollout_versions[1]:
            self.rollout_pair.add_timing(candidate_s, stable_s)

    def feedback(self, request_id: str, labels: Sequence[float], received: bool = True) -> bool:
        """Join labels with the request's predictions; True when they were joined."""
        return self.join(request_id, labels, received) == JOINED

    def join(self, request_id: str, labels: Sequence[float], received: bool = True) -> str:
        """Join labels (one per row) with every prediction made for the request id: JOINED,
        UNKNOWN or ALREADY. Labels that do not fit a prediction raise InvalidInput and leave
        it logged, so a corrected resend still joins.

        `received` is False for labels another worker received and shared: they
        count where they arrived, and join wherever the prediction was made.
        """
        logged = self.log.peek(request_id)
        if logged is None:
            self.labels_received += int(received)
            return ALREADY if hash(request_id) in self.labelled else UNKNOWN
        predictions, predicted_at = logged
        truth = np.asarray(labels, dtype=np.float64)
        for _version, _role, values in predictions:
            if values.shape[0] != truth.shape[0]:
                raise InvalidInput(
                    f"feedback for {request_id[:80]!r}: {truth.shape[0]} labels for a request of "
                    f"{values.shape[0]} rows: send one label per row"
                )
        self.log.take(request_id)
        self.labels_received += int(received)
        classification = self.spec.kind == "classification"
        for version, role, values in predictions:
            if role == COPY:
                continue  # a dual run's copy: paired evidence only (below), never an arm's
            correct = int(np.count_nonzero(values == truth)) if classification else 0
            abs_error = float(np.abs(values - truth).sum()) if not classification else 0.0
            targets = (
                [self.routed_window(role[len(ROUTED) :], version)]
                if role.startswith(ROUTED)
                else self._targets(version, predicted_at)
            )
            for w in targets:
                w.labelled += truth.shape[0]
                w.correct += correct
                w.abs_error += abs_error
        if classification and self.rollout_pair is not None and predicted_at >= self.rollout_began:
            self._join_pair(predictions, truth, self.rollout_pair)
        self.feedback_joined += 1
        self.labelled[hash(request_id)] = None
        if len(self.labelled) > LABELLED_IDS_KEPT:
            self.labelled.popitem(last=False)
        return JOINED

    def _join_pair(self, predictions: Sequence[Prediction], truth: np.ndarray, pair: PairWindow) -> None:
        """Rows the rollout's stable and candidate both predicted (a shadow's or a dual run's
        copy beside the served answer): which of the two got each right, paired."""
        stable, candidate = self.rollout_versions
        by_version = {version: values for version, _role, values in predictions}
        s, c = by_version.get(stable), by_version.get(candidate)
        if s is not None and c is not None and s.shape == c.shape == truth.shape:
            pair.add_labels(c == truth, s == truth)


@dataclass(frozen=True, slots=True)
class VersionReport:
    version: str
    role: str
    requests: int
    errors: int
    error_rate: float
    p50_ms: float
    p99_ms: float
    labelled: int
    accuracy: float  # classification; NaN without labels
    accuracy_low: float
    accuracy_high: float
    mean_abs_error: float  # regression; NaN without labels
    compared_rows: int  # rows compared with the stable version on the same requests
    agreement: float
    within_tolerance: float
    max_abs_diff: float
    mean_abs_diff: float
    relative_l2: float
    latency_diff_ms: float
    rows: int  # rows answered: the unit of `labelled` and `compared_rows` (a request may carry several)


def version_report(version: str, role: str, w: VersionWindow, pair: PairWindow | None) -> VersionReport:
    low, high = wilson_interval(w.correct, w.labelled)
    p = pair or PairWindow()
    return VersionReport(
        version=version,
        role=role,
        requests=w.requests,
        errors=w.errors,
        error_rate=w.error_rate,
        p50_ms=w.latency.quantile(0.5) * 1e3,
        p99_ms=w.latency.quantile(0.99) * 1e3,
        labelled=w.labelled,
        accuracy=w.accuracy,
        accuracy_low=low,
        accuracy_high=high,
        mean_abs_error=w.abs_error / w.labelled if w.labelled else math.nan,
        compared_rows=p.rows,
        agreement=p.agreement,
        within_tolerance=p.within_tolerance / p.rows if p.rows else math.nan,
        max_abs_diff=p.max_abs if p.rows else math.nan,
        mean_abs_diff=p.mean_abs,
        relative_l2=p.relative_l2,
        latency_diff_ms=p.mean_latency_diff_s * 1e3,
        rows=w.rows,
    )


def routed_report(evidence: ModelEvidence) -> list[VersionReport]:
    """One row per (rule, version) that rules sent traffic to; role `rule NAME`."""
    return [
        version_report(version, f"rule {rule}", w, None)
        for rule, by_version in sorted(evidence.routed.items())
        for version, w in sorted(by_version.items())
    ]


def model_report(evidence: ModelEvidence, roles: Mapping[str, str]) -> list[VersionReport]:
    """One row per version that has a role or has been seen."""
    versions = sorted(set(roles) | set(evidence.windows), key=lambda v: (not v.isdigit(), v.zfill(12)))
    return [version_report(v, roles.get(v, "idle"), evidence.window(v), evidence.pairs.get(v)) for v in versions]
