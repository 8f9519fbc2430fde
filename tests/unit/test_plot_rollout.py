"""`report --plot`'s figure, read back from matplotlib's objects (titles, lines, markers, texts), not pixels."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gateway.cli.plot import MAX_ROLLOUTS, rollout_figure, segments
from gateway.protocol.pb import release_pb2 as rpb

T0 = 1_800_000_000.0


class Log:
    """Audit records as the release store writes them, one call per applied change."""

    def __init__(self) -> None:
        self.records: list[rpb.AuditRecord] = []

    def add(
        self,
        at: float,
        action: str,
        *,
        stable: str = "1",
        canary: str = "",
        weight: float = 0,
        phase: str = "idle",
        candidate: str = "",
        started: float | None = None,
        evidence: list[dict[str, Any]] | None = None,
    ) -> None:
        rollout = {"phase": phase, "candidate": candidate, "started_at": started, "step": None}
        after = {"stable": stable, "canary": canary, "canary_weight_bp": int(weight * 100), "rollout": rollout}
        self.records.append(
            rpb.AuditRecord(
                id=len(self.records) + 1,
                at=T0 + at,
                action=action,
                model="digits",
                outcome="applied",
                after_json=json.dumps(after),
                evidence_json=json.dumps(evidence) if evidence else "",
            )
        )


def check(name: str, verdict: str, value: float, low: float, high: float, bound: float) -> dict[str, Any]:
    return {"check": name, "verdict": verdict, "value": value, "low": low, "high": high, "bound": bound}


def passing(accuracy: float) -> list[dict[str, Any]]:
    return [
        check("error_rate", "pass", 0.0, -0.01, 0.02, 0.05),
        check("accuracy", "pass", accuracy, accuracy - 0.02, accuracy + 0.02, -0.02),
        check("step_accuracy", "pass", accuracy, accuracy - 0.04, accuracy + 0.04, -0.02),
        check("step_requests", "pass", 120, 120, 120, 100),
    ]


def promoted_then_rolled_back() -> Log:
    """v2 promoted over three steps (started at +1 s, promoted at +9 s); v3 rolled back at +14 s."""
    log = Log()
    log.add(0, "init")
    a: dict[str, Any] = {"candidate": "2", "started": T0 + 1}
    log.add(1, "start_rollout", canary="2", weight=10, phase="progressing", **a)
    log.add(4, "advance", canary="2", weight=25, phase="progressing", evidence=passing(0.010), **a)
    log.add(6, "advance", canary="2", weight=50, phase="progressing", evidence=passing(0.012), **a)
    log.add(9, "advance", canary="2", weight=100, phase="promoting", evidence=passing(0.011), **a)
    log.add(9, "promote", stable="2", phase="succeeded", evidence=passing(0.011), **a)
    b: dict[str, Any] = {"stable": "2", "candidate": "3", "started": T0 + 10}
    log.add(10, "start_rollout", canary="3", weight=10, phase="progressing", **b)
    failing = [check("error_rate", "inconclusive", 0.0, -0.01, 0.06, 0.05)]
    failing.append(check("accuracy", "fail", -0.08, -0.12, -0.04, -0.02))
    log.add(14, "rollback", phase="rolled_back", evidence=failing, **b)
    return log


def figure(log: Log, now: float = 60.0, phase: str = "rolled_back") -> Figure:
    report = rpb.Report(release=rpb.Release(model="digits", stable="2", phase=phase, revision=len(log.records)))
    return rollout_figure("digits", log.records, report, T0 + now)


def rows(fig: Figure) -> list[list[Axes]]:
    """The figure's axes as its grid: a row per rollout."""
    columns = fig.axes[0].get_subplotspec().get_gridspec().ncols  # type: ignore[union-attr]
    return [fig.axes[i : i + columns] for i in range(0, len(fig.axes), columns)]


def labelled(ax: Axes, label: str) -> list[Line2D]:
    return [line for line in ax.get_lines() if line.get_label() == label]


def xs(line: Line2D) -> list[float]:
    return [float(x) for x in np.asarray(line.get_xdata(), dtype=float)]


def ys(line: Line2D) -> list[float]:
    return [float(y) for y in np.asarray(line.get_ydata(), dtype=float)]


def texts(ax: Axes) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_a_row_per_rollout_with_its_candidate_named_and_its_ending_marked() -> None:
    grid = rows(figure(promoted_then_rolled_back()))
    assert len(grid) == 2
    first, second = grid
    assert first[0].get_title(loc="left") == "v2 over stable v1: promoted"
    assert second[0].get_title(loc="left") == "v3 over stable v2: rolled back"
    [promote] = labelled(first[0], "promoted")
    assert promote.get_marker() == "^" and xs(promote) == [8.0] and ys(promote) == [100]
    [rollback] = labelled(second[0], "rolled back")
    assert rollback.get_marker() == "X" and xs(rollback) == [4.0]
    assert not labelled(first[0], "rolled back") and not labelled(second[0], "promoted")
    # The rolled-back candidate's traffic: 10 % from its start, 0 at the rollback, the line ending there.
    [traffic] = labelled(second[0], "traffic")
    assert xs(traffic) == [0.0, 4.0, 4.0] and ys(traffic) == [10.0, 0.0, 0.0]
    # The ending is marked on every check of the row too.
    for ax in second[1:]:
        assert [4.0, 4.0] in [xs(line) for line in ax.get_lines()], ax.get_title()


def test_each_check_has_its_bound_drawn_in_its_unit_and_step_checks_are_left_out() -> None:
    first, second = rows(figure(promoted_then_rolled_back()))
    assert [ax.get_title() for ax in first[1:]] == ["error_rate ≤ 5 pts", "accuracy ≥ -2 pts"]
    for ax, bound in zip(first[1:], (5.0, -2.0), strict=True):
        [line] = labelled(ax, "bound")
        assert ys(line) == [bound, bound]
    [estimate] = labelled(first[2], "estimate")
    # In points, at each decision (seconds since the start), held to the rollout's end.
    assert xs(estimate) == [3.0, 5.0, 8.0, 8.0, 8.0]
    assert ys(estimate) == pytest.approx([1.0, 1.2, 1.1, 1.1, 1.1])
    [accuracy] = [ax for ax in second if ax.get_title().startswith("accuracy")]
    assert ys(labelled(accuracy, "estimate")[0]) == pytest.approx([-8.0, -8.0])


def test_a_running_rollout_is_drawn_up_to_now() -> None:
    log = Log()
    log.add(0, "init")
    a: dict[str, Any] = {"candidate": "2", "started": T0 + 5}
    log.add(5, "start_rollout", canary="2", weight=10, phase="progressing", **a)
    log.add(9, "advance", canary="2", weight=25, phase="progressing", evidence=passing(0.01), **a)
    [[traffic_ax, *checks]] = rows(figure(log, now=30.0, phase="progressing"))
    assert traffic_ax.get_title(loc="left") == "v2 over stable v1: progressing"
    [traffic] = labelled(traffic_ax, "traffic")
    assert xs(traffic)[-1] == 25.0 and ys(traffic)[-1] == 25.0
    for ax in checks:
        assert xs(labelled(ax, "estimate")[0])[-1] == 25.0
    assert not labelled(traffic_ax, "promoted") and not labelled(traffic_ax, "rolled back")


def test_a_rollout_without_evidence_says_no_checks_yet() -> None:
    log = Log()
    log.add(0, "init")
    log.add(1, "start_rollout", canary="2", weight=10, phase="progressing", candidate="2", started=T0 + 1)
    [[traffic_ax, checks]] = rows(figure(log, now=3.0, phase="progressing"))
    assert "v2" in traffic_ax.get_title(loc="left")
    assert texts(checks) == ["no checks yet"]
    [traffic] = labelled(traffic_ax, "traffic")
    assert xs(traffic) == [0.0, 2.0]


def test_a_check_one_rollout_lacks_says_no_checks_yet_in_its_row() -> None:
    log = promoted_then_rolled_back()
    log.add(20, "start_rollout", stable="2", canary="4", weight=10, phase="progressing", candidate="4", started=T0 + 20)
    last = rows(figure(log, phase="progressing"))[-1]
    assert [texts(ax) for ax in last[1:]] == [["no checks yet"], ["no checks yet"]]


def test_changes_by_hand_get_their_own_row_and_stay_out_of_a_finished_rollout() -> None:
    log = promoted_then_rolled_back()
    log.add(30, "set_weight", stable="2", canary="3", weight=20, phase="rolled_back", candidate="3", started=T0 + 10)
    log.add(40, "set_weight", stable="2", phase="rolled_back", candidate="3", started=T0 + 10)
    found = segments(log.records)
    assert [(s.candidate, len(s.records)) for s in found] == [("2", 5), ("3", 2), ("", 2)]
    grid = rows(figure(log))
    assert grid[-1][0].get_title(loc="left") == "set by hand: canary v3"
    assert texts(grid[-1][1]) == ["no checks yet"]


def test_only_changes_by_hand() -> None:
    log = Log()
    log.add(0, "init")
    log.add(2, "set_weight", canary="3", weight=20)
    log.add(5, "set_weight")
    [[traffic_ax, checks]] = rows(figure(log, now=8.0, phase=""))
    assert traffic_ax.get_title(loc="left") == "set by hand: canary v3"
    [traffic] = labelled(traffic_ax, "traffic")
    assert ys(traffic) == [20.0, 0.0, 0.0] and xs(traffic) == [0.0, 3.0, 6.0]
    assert texts(checks) == ["no checks yet"]


def test_no_rollouts_at_all() -> None:
    log = Log()
    log.add(0, "init")
    fig = figure(log, phase="")
    [[traffic_ax, checks]] = rows(fig)
    assert traffic_ax.get_title(loc="left") == "no rollouts yet" and texts(checks) == ["no checks yet"]


def test_only_the_latest_rollouts_are_drawn_and_the_title_says_so() -> None:
    log = Log()
    log.add(0, "init")
    for n in range(MAX_ROLLOUTS + 2):
        a: dict[str, Any] = {"candidate": str(n + 2), "started": T0 + 10 * n + 1}
        log.add(10 * n + 1, "start_rollout", canary=str(n + 2), weight=10, phase="progressing", **a)
        log.add(10 * n + 5, "rollback", phase="rolled_back", evidence=passing(-0.1), **a)
    fig = figure(log)
    grid = rows(fig)
    assert len(grid) == MAX_ROLLOUTS
    assert grid[0][0].get_title(loc="left").startswith("v4 ") and grid[-1][0].get_title(loc="left").startswith("v7 ")
    assert fig.get_suptitle().endswith("(2 earlier not shown)")
