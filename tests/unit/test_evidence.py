"""Evidence bookkeeping: label joins, rollout windows, merging workers' snapshots."""

from __future__ import annotations

import numpy as np

from gateway.config.spec import CompareSpec
from gateway.release.confidence import difference_cs, paired_difference_cs
from gateway.release.evidence import COPY, ModelEvidence, PredictionLog


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


def rows_of(labels: list[int]) -> list[np.ndarray]:
    out = np.zeros((len(labels), 10), np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return [out]


def test_a_dual_run_copy_pairs_the_two_versions_answers_on_the_same_labelled_rows() -> None:
    evidence = ModelEvidence("m", CompareSpec(), 0)
    evidence.begin_rollout("1", "2", "k")
    # The canary answered four rows; its copy on the stable version answered them too.
    evidence.record_prediction("r", "2", "canary", rows_of([0, 1, 2, 9]))
    evidence.record_predictions("1", COPY, [("r", 4)], rows_of([0, 1, 3, 3])[0])
    assert evidence.feedback("r", [0.0, 1.0, 3.0, 9.0])
    stable, candidate, pair = evidence.rollout_windows()
    # Rows 0 and 1 both right; row 2 only the stable right, row 3 only the canary: d = 0.
    assert (pair.labelled, pair.label_diff, pair.label_discordant) == (4, 0, 2)
    # The copy is paired evidence only: the stable arm served none of these rows.
    assert (stable.labelled, candidate.labelled, candidate.correct) == (0, 4, 3)
    assert evidence.window("1").labelled == 0


def test_a_shadows_answers_are_paired_with_the_stable_ones_and_only_within_the_rollout() -> None:
    evidence = ModelEvidence("m", CompareSpec(), 0)
    evidence.record_prediction("before", "1", "stable", rows_of([1]))
    evidence.record_prediction("before", "2", "shadow", rows_of([2]))
    evidence.begin_rollout("1", "2", "k")
    evidence.record_prediction("after", "1", "stable", rows_of([1, 1]))
    evidence.record_prediction("after", "2", "shadow", rows_of([2, 1]))
    evidence.record_prediction("alone", "1", "stable", rows_of([5]))  # no copy ran: nothing to pair
    for request_id, labels in (("before", [1.0]), ("after", [1.0, 1.0]), ("alone", [5.0])):
        assert evidence.feedback(request_id, labels)
    _, _, pair = evidence.rollout_windows()
    assert (pair.labelled, pair.label_diff, pair.label_discordant) == (2, -1, 1)


def test_the_paired_interval_is_narrower_than_two_independent_arms_when_versions_mostly_agree() -> None:
    # 2,000 rows, 95 % right on the stable; the candidate loses 40 of them (2 points), gains none.
    n, alpha = 2000, 0.01
    paired = paired_difference_cs(n, -40, 40, alpha)
    arms = difference_cs(1860, n, 1900, n, alpha)
    assert paired.low < -0.02 < paired.high < -0.005
    assert paired.high - paired.low < (arms.high - arms.low) / 2
    # Agreeing rows alone never make the interval collapse: the discordant rate is smoothed.
    identical = paired_difference_cs(200, 0, 0, alpha)
    assert identical.low < -0.005 and identical.high > 0.005
