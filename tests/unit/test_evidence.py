"""Evidence bookkeeping: label joins, rollout windows, merging workers' snapshots."""

from __future__ import annotations

import numpy as np

from gateway.config.spec import CompareSpec
from gateway.release.evidence import ModelEvidence, PredictionLog


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


def test_a_shadows_batch_latency_stays_out_of_the_rollouts_latency_check() -> None:
    evidence = ModelEvidence("m", CompareSpec(), 0)
    evidence.begin_rollout("1", "2", "k")
    evidence.record_request("2", True, 0.004, 31, requests=31, served=False)  # a shadow batch
    evidence.record_request("2", True, 0.001, 1)  # a canary request
    _, candidate, _ = evidence.rollout_windows()
    assert candidate.requests == 32 and candidate.rows == 32
    assert candidate.latency.total == 1  # only the served request's latency
    assert evidence.window("2").latency.total == 32  # the report still shows the shadow's


def test_a_single_requests_predictions_are_logged_whole() -> None:
    evidence = ModelEvidence("m", CompareSpec(), 0)
    no_batch_dim = np.array([0.1, 0.7, 0.2], np.float32)  # a model without a batch dimension
    evidence.record_predictions("2", "shadow", [("solo", 1)], no_batch_dim)
    evidence.record_prediction("solo", "1", "stable", [no_batch_dim])
    taken = evidence.log.take("solo")
    assert taken is not None
    assert [values.shape for _, _, values in taken[0]] == [(3,), (3,)]  # shadow and stable alike
