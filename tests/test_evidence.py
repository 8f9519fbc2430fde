"""Evidence bookkeeping: label joins, rollout windows, merging workers' snapshots."""

from __future__ import annotations

import numpy as np

from gateway.config import CompareSpec
from gateway.evidence import ModelEvidence, PredictionLog


def probabilities(label: int) -> list[np.ndarray]:
    out = np.zeros((1, 10), np.float32)
    out[0, label] = 1.0
    return [out]


def test_labels_of_predictions_made_before_a_rollout_stay_out_of_it() -> None:
    evidence = ModelEvidence("m", CompareSpec(), 0)
    evidence.record_prediction("early", "2", "canary", probabilities(3))
    evidence.begin_rollout("1", "2", "k")
    evidence.record_prediction("late", "2", "canary", probabilities(4))
    assert evidence.feedback("early", [3.0]) and evidence.feedback("late", [4.0])
    _, candidate, _ = evidence.rollout_windows()
    assert (candidate.labelled, candidate.correct) == (1, 1)
    assert (evidence.window("2").labelled, evidence.window("2").correct) == (2, 2)
    assert not evidence.feedback("late", [4.0])  # joined once only


def test_prediction_log_is_capped_by_size_and_age() -> None:
    now = [0.0]
    log = PredictionLog(max_entries=3, max_age_s=10.0, clock=lambda: now[0])
    evidence = ModelEvidence("m", CompareSpec(), 0, log=log)
    for i in range(5):
        evidence.record_prediction(f"r{i}", "1", "stable", probabilities(i))
    assert len(log) == 3 and log.evicted == 2
    now[0] = 11.0
    assert log.take("r4") is None  # expired
    assert not evidence.feedback("r0", [0.0])


def test_snapshots_of_several_workers_add_up() -> None:
    a, b = ModelEvidence("m", CompareSpec(), 0), ModelEvidence("m", CompareSpec(), 0)
    for e, n in ((a, 3), (b, 5)):
        e.begin_rollout("1", "2", "same")
        for i in range(n):
            e.record_request("2", True, 0.001, 1)
            e.record_prediction(f"{id(e)}-{i}", "2", "canary", probabilities(1))
            e.feedback(f"{id(e)}-{i}", [1.0])
    merged = a.merged_with([b.snapshot()])
    assert merged.window("2").requests == 8 and merged.window("2").correct == 8
    _, candidate, _ = merged.rollout_windows()
    assert candidate.requests == 8
    b.begin_rollout("1", "2", "another rollout")
    assert a.merged_with([b.snapshot()]).rollout_windows()[1].requests == 3
