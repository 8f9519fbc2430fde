"""Drift monitoring on digits' held-out rows: bins, scores, windows, NaN/Inf, the shift check."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from gateway.config.spec import CompareSpec, MonitorSpec, PolicySpec
from gateway.errors import ConfigError, InvalidInput
from gateway.release.compare import PairWindow
from gateway.release.confidence import Verdict
from gateway.release.drift.features import rule_for
from gateway.release.drift.monitor import ModelMonitor
from gateway.release.drift.profile import load_profile
from gateway.release.drift.scoring import chi2_sf, chi_square_p, holm, psi
from gateway.release.drift.shift import ClassShift
from gateway.release.drift.window import VersionDrift
from gateway.release.evidence import ModelEvidence
from gateway.release.policy import PREDICTION_DRIFT, Windows, run_checks
from gateway.types import TensorSpec

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "models" / "digits" / "reference.npz"
PIXELS = [TensorSpec("pixels", "FP32", (-1, 64))]
DATA = np.load(REFERENCE)
X, Y = DATA["X"], DATA["y"]


def monitor(spec: MonitorSpec | None = None, windows: dict[str, VersionDrift] | None = None) -> ModelMonitor:
    spec = spec or MonitorSpec(sample=1.0)  # every request binned (the default is a quarter)
    profile = load_profile(REFERENCE, PIXELS, True, 10, spec)
    return ModelMonitor(spec, {"1": profile}, {} if windows is None else windows, random.Random(0))


def feed(m: ModelMonitor, rows: np.ndarray, labels: np.ndarray, per_request: int = 1) -> None:
    for i in range(0, len(rows), per_request):
        x = rows[i : i + per_request]
        scores = np.eye(10, dtype=np.float32)[labels[i : i + per_request]]
        m.check("1", {"pixels": x})
        m.record("1", {"pixels": x}, len(x), scores)
    m.flush()


def sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).integers(len(X), size=n)
    return X[idx], Y[idx]


def test_the_feature_rule_is_elements_for_small_rows_and_channel_moments_for_large_ones() -> None:
    assert rule_for("pixels", (64,)).count == 64
    assert rule_for("pixels", (8, 8)).names()[9] == "pixels[1,1]"
    image = rule_for("image", (3, 32, 32))
    assert image.channels == 3 and image.count == 6
    x = np.arange(2 * 3 * 32 * 32, dtype=np.float32).reshape(2, 3, 32, 32)
    f = image.features(x, 2)
    assert f.shape == (2, 6)
    assert f[0, 1] == pytest.approx(x[0, 1].mean()) and f[1, 5] == pytest.approx(x[1, 2].std())
    assert rule_for("ids", (1000,)).channels == 1


def test_reference_bins_hold_each_decile_and_nothing_out_of_range() -> None:
    profile = load_profile(REFERENCE, PIXELS, True, 10, MonitorSpec())
    pixels = profile.inputs["pixels"]
    assert pixels.reference.shape == (64, 12)
    assert (pixels.reference.sum(axis=1) == len(X)).all()
    assert (pixels.reference[:, 0] == 0).all() and (pixels.reference[:, -1] == 0).all()
    # Pixel 36 (centre) spreads over its values: no bin holds much more than its share.
    assert pixels.reference[36, 1:-1].max() < 0.3 * len(X)
    assert profile.classes is not None and profile.classes.sum() == len(Y)


def test_a_reference_that_does_not_fit_the_input_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "reference.npz"
    np.savez(path, X=np.zeros((10, 63), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"reference.npz: monitor.reference: array 'X' has rows of shape \[63\]"):
        load_profile(path, PIXELS, True, 10, MonitorSpec())


def test_scores_psi_chi_square_and_holm() -> None:
    # scipy comes with scikit-learn (the dev extra, which CI installs): the reference values
    # our own chi-square tail is checked against. Imported, not skipped when missing.
    import scipy.stats as scipy_stats

    for x, k in [(0.5, 1), (3.0, 2), (15.0, 9), (40.0, 11), (300.0, 9)]:
        assert chi2_sf(x, k) == pytest.approx(scipy_stats.chi2.sf(x, k), rel=1e-9)
    same = np.array([[50, 50, 50, 50]])
    assert psi(same, same)[0] == pytest.approx(0.0)
    assert chi_square_p(same, same)[0] == pytest.approx(1.0)
    moved = np.array([[100, 100, 0, 0]])
    assert psi(same, moved)[0] > 1.0 and chi_square_p(same, moved)[0] < 1e-10
    assert list(holm(np.array([0.001, 0.04, 0.03, 0.5]), 0.05)) == [True, False, False, False]
    assert list(holm(np.array([0.001, 0.012, 0.02, 0.5]), 0.05)) == [True, True, True, False]


def test_held_out_rows_raise_no_alarm_over_20_windows() -> None:
    m = monitor()
    alarms = []
    for seed in range(20):
        rows, labels = sample(500, seed)
        feed(m, rows, labels)
        alarms.append(m.report(m.windows)[0].alarm)
    report = m.report(m.windows)[0]
    assert report.windows_closed == 20 and report.judged == "closed" and report.rows == 500
    assert not any(alarms)


def test_dimmed_rows_alarm_in_the_first_window_naming_inked_pixels() -> None:
    m = monitor()
    rows, labels = sample(500, 1)
    feed(m, (rows * 0.6).astype(np.float32), labels)
    report = m.report(m.windows)[0]
    assert report.alarm and report.over_threshold >= 20
    inked = set(np.nonzero(X.mean(axis=0) > 4)[0])
    top = {int(f.name[len("pixels[") : -1]) for f in report.features}
    assert top <= inked, (top, inked)


def test_a_zeroed_block_alarms_in_the_first_window_naming_its_pixels() -> None:
    m = monitor()
    rows, labels = sample(500, 2)
    block = rows.reshape(-1, 8, 8).copy()
    block[:, 2:5, 2:5] = 0
    feed(m, block.reshape(-1, 64), labels, per_request=4)
    report = m.report(m.windows)[0]
    assert report.alarm
    named = {int(f.name[len("pixels[") : -1]) for f in report.features if f.drifting}
    zeroed = {r * 8 + c for r in range(2, 5) for c in range(2, 5)}
    assert named and named <= zeroed, named
    assert len(named) >= 5


def test_predictions_of_one_class_far_more_often_alarm() -> None:
    m = monitor()
    rows, labels = sample(500, 3)
    skewed = labels.copy()
    skewed[: len(skewed) // 3] = 0  # a third of all rows called 0: ~40 % zeros instead of 10 %
    feed(m, rows, skewed)
    report = m.report(m.windows)[0]
    assert report.prediction is not None and report.prediction.drifting and report.alarm
    assert report.over_threshold == 0  # the inputs did not move


def test_nan_and_inf_are_counted_and_rejected_with_reject_invalid() -> None:
    m = monitor()
    rows, labels = sample(20, 4)
    rows = rows.copy()
    rows[0, 5], rows[3, 7] = np.nan, np.inf
    feed(m, rows, labels)
    report = m.report(m.windows)[0]
    assert report.nonfinite == {"pixels": 2} and report.open_rows == 20
    strict = monitor(MonitorSpec(reject_invalid=True))
    with pytest.raises(InvalidInput, match="input 'pixels' holds 1 NaN or infinite"):
        strict.check("1", {"pixels": rows[:1]})
    strict.check("1", {"pixels": rows[1:2]})  # a finite request passes
    assert strict.windows["1"].rejected == 1


def test_out_of_range_values_are_counted() -> None:
    m = monitor()
    rows, labels = sample(50, 5)
    rows = rows.copy()
    rows[:10, 0] = 99.0  # pixel 0 is 0 in every reference row
    feed(m, rows, labels)
    assert m.report(m.windows)[0].out_of_range == {"pixels": 10}


def test_counts_merge_across_workers_through_the_evidence_snapshot() -> None:
    spec = CompareSpec()
    workers = [ModelEvidence("digits", spec, 0) for _ in range(2)]
    monitors = [monitor(windows=w.drift) for w in workers]
    for i, m in enumerate(monitors):
        rows, labels = sample(300, 10 + i)
        feed(m, rows, labels)
    merged = workers[0].merged_with([workers[1].snapshot()])
    report = monitors[0].report(merged.drift)[0]
    # Neither worker has closed a window (300 rows of 500): the merged open window has both.
    assert report.open_rows == 600 and report.windows_closed == 0 and report.judged == "open"
    assert not report.alarm  # no verdict on an open window
    assert report.requests_checked == 600
    assert sum(merged.drift["1"].open.inputs["pixels"]) == 600 * 64


def test_sampling_bins_about_that_fraction() -> None:
    m = monitor(MonitorSpec(sample=0.25))
    rows, labels = sample(2000, 6)
    feed(m, rows, labels)
    binned = m.windows["1"].past.rows + m.windows["1"].open.rows
    assert 400 < binned < 600


def _shift(stable: np.ndarray, candidate: np.ndarray) -> ClassShift:
    shift = ClassShift()
    eye = np.eye(10, dtype=np.float32)
    for i in range(0, len(stable), 8):
        shift.add(eye[stable[i : i + 8]], eye[candidate[i : i + 8]])
    return shift


def test_the_max_drift_check_fails_a_candidate_whose_predictions_shift_and_passes_a_copy() -> None:
    spec = PolicySpec(max_drift=0.05, min_samples=200)
    stable = np.random.default_rng(7).integers(10, size=3000)
    same = run_checks(Windows(pair=PairWindow(), shift=_shift(stable, stable)), spec, with_traffic=False)
    check = next(c for c in same if c.name == PREDICTION_DRIFT)
    assert check.verdict is Verdict.PASS and check.value == 0.0
    skewed = stable.copy()
    skewed[::4] = 0  # a quarter of the rows moved to class 0
    shifted = run_checks(Windows(shift=_shift(stable, skewed)), spec, with_traffic=False)
    check = next(c for c in shifted if c.name == PREDICTION_DRIFT)
    assert check.verdict is Verdict.FAIL and check.low > 0.05 and check.value == pytest.approx(0.225, abs=0.02)
    few = run_checks(Windows(shift=_shift(stable[:50], skewed[:50])), spec, with_traffic=False)
    assert next(c for c in few if c.name == PREDICTION_DRIFT).verdict is Verdict.INCONCLUSIVE


def test_the_rollout_shift_travels_in_the_snapshot() -> None:
    workers = [ModelEvidence("digits", CompareSpec(), 0) for _ in range(2)]
    eye = np.eye(10, dtype=np.float32)
    for w in workers:
        w.begin_rollout("1", "2", key="r1")
        w.record_pair("2", eye[[1, 2, 3]], eye[[0, 0, 3]], 0.0)
    merged = workers[0].merged_with([workers[1].snapshot()])
    assert merged.rollout_shift is not None and merged.rollout_shift.rows == 6
    assert merged.rollout_shift.diff is not None and merged.rollout_shift.diff[0] == 4
