"""The drift figures Prometheus gets from a version's drift report (gateway/release/metrics.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from gateway.config.spec import MonitorSpec
from gateway.release.drift.monitor import ModelMonitor
from gateway.release.drift.profile import load_profile
from gateway.release.metrics import ReleaseMetrics
from gateway.release.plane import ModelReport
from gateway.release.state import ReleaseState
from gateway.types import TensorSpec

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "digits" / "reference.npz"
X = np.load(REFERENCE)["X"]


def test_drift_gauges_and_quality_counters_follow_the_report() -> None:
    spec = MonitorSpec(sample=1.0)
    m = ModelMonitor(
        spec,
        {"1": load_profile(REFERENCE, [TensorSpec("pixels", "FP32", (-1, 64))], True, 10, spec)},
        {},
        random.Random(0),
    )
    rows = (X[np.random.default_rng(0).integers(len(X), size=500)] * 0.6).astype(np.float32)
    rows[0, 0] = np.nan  # one NaN (its row is not binned)
    rows[1, 0] = 50.0  # pixel 0 is 0 in every reference row: out of range
    for i in range(0, 500, 10):
        m.record("1", {"pixels": rows[i : i + 10]}, 10, np.eye(10, dtype=np.float32)[np.zeros(10, dtype=int)])
    m.flush()
    registry = CollectorRegistry()
    metrics = ReleaseMetrics(registry)
    report = ModelReport(ReleaseState("digits", "1"), [], 1.0, 0, 0, 0, {}, drift=m.report(m.windows))
    metrics.sync(report)
    metrics.sync(report)  # counters take the report's totals, never twice

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model": "digits", "version": "1", **labels})

    assert value("gateway_drift_alarm") == 1
    assert value("gateway_drift_windows_closed") == 1
    assert (value("gateway_drift_score") or 0) > 1.0
    assert (value("gateway_drift_features_over_threshold") or 0) >= 20
    assert (value("gateway_drift_prediction_psi") or 0) > 1.0  # every answer says 0
    assert value("gateway_drift_nonfinite_values_total", input="pixels") == 1
    assert value("gateway_drift_out_of_range_values_total", input="pixels") == 1
    assert value("gateway_drift_rejected_requests_total") == 0  # exported at 0, so a first refusal is an increase
