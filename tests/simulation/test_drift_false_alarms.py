"""The drift monitor's false-alarm rate and detection, by simulation on digits' held-out rows.

Null: the reference (450 rows) and every live window (500 rows) are drawn
independently, with replacement, from the held-out rows, so both come from one
distribution. Over 600 windows (6 references x 100 windows), the share of
windows with an alarm stays at most monitor.alpha (0.01, the stated level;
asserted with binomial slack: <= 2 %). Shifts: brightness x0.6, or the 3 x 3
pixel block at rows/columns 2..4 zeroed, alarm in the first closed window
(500 rows) in at least 95 % of 40 trials each.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gateway.config.spec import MonitorSpec
from gateway.release.drift.monitor import ModelMonitor
from gateway.release.drift.profile import load_profile
from gateway.types import TensorSpec

pytestmark = pytest.mark.simulation

ROOT = Path(__file__).resolve().parents[2]
DATA = np.load(ROOT / "models" / "digits" / "heldout.npz")
X, Y = DATA["X"], DATA["y"]
PIXELS = [TensorSpec("pixels", "FP32", (-1, 64))]
SPEC = MonitorSpec(sample=1.0)
EYE = np.eye(10, dtype=np.float32)


def fresh_monitor(tmp: Path, rng: np.random.Generator) -> ModelMonitor:
    idx = rng.integers(len(X), size=450)
    path = tmp / "reference.npz"
    np.savez(path, X=X[idx], y=Y[idx])
    return ModelMonitor(SPEC, {"1": load_profile(path, PIXELS, True, 10, SPEC)}, {}, random.Random(0))


def window(m: ModelMonitor, rng: np.random.Generator, change: Callable[[np.ndarray], np.ndarray]) -> bool:
    """Feed one window (500 rows, 10 a request) and say whether it alarmed."""
    idx = rng.integers(len(X), size=SPEC.window_rows)
    rows, labels = change(X[idx]), Y[idx]
    for i in range(0, len(rows), 10):
        m.record("1", {"pixels": rows[i : i + 10]}, 10, EYE[labels[i : i + 10]])
    m.flush()
    report = m.report(m.windows)[0]
    assert report.judged == "closed" and report.rows == SPEC.window_rows
    return report.alarm


def test_false_alarms_over_600_windows_stay_at_the_stated_level(tmp_path: Path) -> None:
    rng = np.random.default_rng(19)
    alarms = 0
    for _ in range(6):
        m = fresh_monitor(tmp_path, rng)
        alarms += sum(window(m, rng, lambda r: r) for _ in range(100))
    print(f"false alarms: {alarms} of 600 windows")
    assert alarms / 600 <= 0.02


def dim(rows: np.ndarray) -> np.ndarray:
    return (rows * 0.6).astype(np.float32)


def zero_block(rows: np.ndarray) -> np.ndarray:
    out = rows.reshape(-1, 8, 8).copy()
    out[:, 2:5, 2:5] = 0
    return out.reshape(-1, 64)


@pytest.mark.parametrize("change", [dim, zero_block], ids=["brightness_x0.6", "zeroed_block"])
def test_a_shift_alarms_in_the_first_window(tmp_path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    rng = np.random.default_rng(20)
    detected = 0
    for _ in range(40):
        m = fresh_monitor(tmp_path, rng)
        detected += window(m, rng, change)
    assert detected >= 38
