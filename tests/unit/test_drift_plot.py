"""`gateway drift --plot`: what the figure draws (its axes and titles, not its pixels)."""

from __future__ import annotations

from gateway.cli.drift import PLOTTED_FEATURES, drift_figure
from gateway.protocol.pb import release_pb2 as rpb


def feature(name: str, psi: float, drifting: bool) -> rpb.FeatureDrift:
    return rpb.FeatureDrift(
        name=name, psi=psi, p_value=1e-9 if drifting else 0.5, drifting=drifting,
        reference=[10, 20, 30, 40], live=[40, 30, 20, 10], edges=[0.0, 1.0, 2.0],
    )  # fmt: skip


def live_version(version: str) -> rpb.VersionDrift:
    features = [feature(f"pixels[{i}]", 5.0 - i, True) for i in range(6)]
    prediction = feature("prediction", 0.03, False)
    return rpb.VersionDrift(
        version=version, judged="closed", rows=500, windows_closed=1, alarm=True, features=features,
        prediction=prediction,
    )  # fmt: skip


def test_only_versions_with_live_rows_get_panels_and_the_others_are_named() -> None:
    idle = [rpb.VersionDrift(version=v, judged="open") for v in ("2", "3")]
    report = rpb.DriftReport(model="digits", versions=[live_version("1"), *idle])
    fig = drift_figure(report)
    drawn = [ax for ax in fig.axes if ax.axison]
    # One row: the top features and the predictions of v1 only (no empty windows scored 0).
    assert len(drawn) == PLOTTED_FEATURES + 1
    assert all(ax.get_title().startswith("v1 ") for ax in drawn)
    assert "pixels[0]: PSI 5.00" in drawn[0].get_title() and drawn[-1].get_title().startswith("v1 predictions")
    title = fig.get_suptitle()
    assert "v1: ALARM" in title and "no live traffic yet: v2, v3" in title


def test_no_live_rows_at_all_says_so() -> None:
    report = rpb.DriftReport(model="digits", versions=[rpb.VersionDrift(version="1", judged="open")])
    fig = drift_figure(report)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no version has served live rows yet" in texts
    assert not [ax for ax in fig.axes if ax.axison]
