"""`gateway report --plot`: each rollout over time, from the audit log, as PNG.

One row of panels per rollout (the last few), its candidate named in the
title: the candidate's share of traffic at left, then each check the policy
decided on, its estimate with the confidence band at every decision and the
bound it was held to. Promotions and rollbacks are marked on every panel of
the row; a rollout still running is drawn up to now. Changes made by hand
outside any rollout get a row of their own.

The figure is built on a `Figure` object, not through pyplot, so nothing is
kept in matplotlib's global figure registry and tests can read the axes back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.control.client import EXIT_REFUSED, CommandFailed
from gateway.protocol.pb import release_pb2 as rpb
from gateway.release.store import AuditOutcome

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Rows beyond this many rollouts make each too small to read: the latest are drawn.
MAX_ROLLOUTS = 4
# Differences of two proportions (candidate - stable): drawn in percentage points.
IN_POINTS = ("error_rate", "accuracy", "accuracy_paired")
# Checks drawn first, in this order; others (gates, agreement) after them by name.
ORDER = ("error_rate", "latency_p", "latency_paired", "accuracy", "accuracy_paired", "agreement")
VERDICT_COLORS = {"pass": "tab:green", "fail": "tab:red", "inconclusive": "tab:gray"}
ENDINGS = {"succeeded": ("promoted", "^", "tab:green"), "rolled_back": ("rolled back", "X", "tab:red")}


@dataclass
class Segment:
    """One rollout's records (or the changes made by hand outside rollouts: `candidate` "")."""

    candidate: str
    stable: str  # the stable version when it began
    started: float
    records: list[rpb.AuditRecord] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return str(_after(self.records[-1]).get("rollout", {}).get("phase", "idle"))


def _after(record: rpb.AuditRecord) -> dict[str, Any]:
    return dict(json.loads(record.after_json)) if record.after_json else {}


def segments(records: Sequence[rpb.AuditRecord]) -> list[Segment]:
    """The applied records split into rollouts (by their start time), in order; records outside
    any rollout that set a canary make one more segment, placed by its first record."""
    rollouts: dict[tuple[str, float], Segment] = {}
    by_hand = Segment("", "", 0.0)
    stable = ""
    for r in records:
        if r.outcome != AuditOutcome.APPLIED or not r.after_json:
            continue
        after = _after(r)
        rollout = after.get("rollout") or {}
        started = rollout.get("started_at") or 0.0
        key = (str(rollout.get("candidate", "")), float(started))
        phase = rollout.get("phase", "idle")
        # After a rollout ends its state stays in every later record: only the ending itself is its.
        if started and (phase not in (*ENDINGS, "idle") or (key in rollouts and rollouts[key].phase not in ENDINGS)):
            if key not in rollouts:
                rollouts[key] = Segment(key[0], stable or str(after.get("stable", "")), float(started))
            rollouts[key].records.append(r)
        elif after.get("canary") or by_hand.records:
            if not by_hand.records:
                by_hand.started, by_hand.stable = r.at, str(after.get("stable", ""))
            by_hand.records.append(r)
        stable = str(after.get("stable", stable))
    found = list(rollouts.values()) + ([by_hand] if by_hand.records else [])
    return sorted(found, key=lambda s: s.started)


def _weight(segment: Segment, record: rpb.AuditRecord) -> float:
    """The candidate's share of traffic after `record`, in percent (a promoted candidate has it all)."""
    after = _after(record)
    if segment.candidate and after.get("rollout", {}).get("phase") == "succeeded":
        return 100.0
    if after.get("canary") and (not segment.candidate or after["canary"] == segment.candidate):
        return float(after.get("canary_weight_bp", 0)) / 100
    return 0.0


def _check_key(name: str) -> tuple[int, str]:
    for index, prefix in enumerate(ORDER):
        if name == prefix or (prefix.endswith("_p") and name.startswith(prefix) and name[len(prefix) :].isdigit()):
            return index, name
    return len(ORDER), name


def _checks(segment: Segment) -> dict[str, list[tuple[float, dict[str, Any]]]]:
    """Per check, (seconds since the start, evidence) at each decision. The step_ checks ask the
    same questions of one step's evidence, and a step's exposure is no question: neither is drawn."""
    found: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for r in segment.records:
        for c in json.loads(r.evidence_json) if r.evidence_json else []:
            if not str(c["check"]).startswith("step_"):
                found.setdefault(str(c["check"]), []).append((r.at - segment.started, c))
    return found


def _scale(name: str) -> tuple[float, str]:
    if name in IN_POINTS:
        return 100.0, "points, candidate - stable"
    if name.startswith("latency_"):
        return 1.0, "x the stable's"
    return 1.0, ""


def _title(segment: Segment) -> str:
    if not segment.candidate:
        canaries = sorted({str(_after(r).get("canary")) for r in segment.records if _after(r).get("canary")})
        return f"set by hand: canary v{', v'.join(canaries)}"
    ending = ENDINGS.get(segment.phase, (segment.phase,))[0]
    return f"v{segment.candidate} over stable v{segment.stable}: {ending}"


def _right(end: float) -> float:
    """The panels' right edge: a little past the end, so a mark at the end is not cut in half."""
    return max(end, 1.0) * 1.04


def _draw_traffic(ax: Axes, segment: Segment, end: float) -> list[tuple[float, str]]:
    """The candidate's share over time up to `end`; the promote and rollback times, marked."""
    times = [max(0.0, r.at - segment.started) for r in segment.records]
    weights = [_weight(segment, r) for r in segment.records]
    ax.step([*times, end], [*weights, weights[-1]], where="post", color="tab:blue", label="traffic")
    marks = []
    for r, t, before in zip(segment.records, times, [0.0, *weights], strict=False):
        phase = _after(r).get("rollout", {}).get("phase", "")
        if r.action in ("promote", "rollback") and phase in ENDINGS:
            label, marker, color = ENDINGS[phase]
            level = 100.0 if phase == "succeeded" else before
            ax.plot([t], [level], linestyle="none", marker=marker, markersize=11, color=color, label=label)
            marks.append((t, color))
    ax.set_title(_title(segment), fontsize=10, loc="left")
    ax.set_ylabel("traffic to candidate (%)")
    ax.set_ylim(-4, 104)
    ax.set_xlim(0, _right(end))
    ax.grid(True, alpha=0.3)
    if marks:
        ax.legend(loc="center right", fontsize=8)
    return marks


def _draw_check(ax: Axes, name: str, points: list[tuple[float, dict[str, Any]]], end: float) -> None:
    """Estimate and confidence band at each decision, held until the next one, and the bound."""
    factor, unit = _scale(name)
    drawn = [(t, c) for t, c in points if c.get("value") is not None]
    bound = float(points[-1][1]["bound"]) * factor
    op = "≤" if name == "error_rate" or name.startswith("latency_") else "≥"
    ax.set_title(f"{name} {op} {bound:g}" + (" pts" if name in IN_POINTS else ""), fontsize=9)
    ax.axhline(bound, color="tab:red", linestyle="--", linewidth=1.2, label="bound")
    if drawn:
        times = [t for t, _ in drawn] + [end]
        values = [c["value"] * factor for _, c in drawn]
        lows = [(c["low"] if c.get("low") is not None else c["value"]) * factor for _, c in drawn]
        highs = [(c["high"] if c.get("high") is not None else c["value"]) * factor for _, c in drawn]
        ax.step(times, [*values, values[-1]], where="post", color="tab:blue", label="estimate")
        ax.fill_between(times, [*lows, lows[-1]], [*highs, highs[-1]], step="post", alpha=0.2, label="95% band")
        colors = [VERDICT_COLORS.get(str(c["verdict"]), "black") for _, c in drawn]
        # Each decision's interval as a bar too: the band of the last one has no width.
        ax.vlines(times[:-1], lows, highs, colors=colors, linewidth=2, zorder=3)
        ax.scatter(times[:-1], values, c=colors, s=18, zorder=4)
    ax.set_ylabel(unit, fontsize=8)
    ax.grid(True, alpha=0.3)


def rollout_figure(model: str, records: Sequence[rpb.AuditRecord], report: rpb.Report, now: float) -> Figure:
    """The figure `report --plot` writes; `now` ends a rollout that is still running."""
    from matplotlib.figure import Figure

    found = segments(records)
    shown = found[-MAX_ROLLOUTS:]
    names = sorted({n for s in shown for n in _checks(s)}, key=_check_key)
    columns = 1 + max(1, len(names))
    rows = max(1, len(shown))
    fig = Figure(figsize=(3.6 * columns, 2.9 * rows + 0.6), layout="constrained")
    grid = fig.subplots(rows, columns, squeeze=False)
    r = report.release
    hidden = f" ({len(found) - len(shown)} earlier not shown)" if len(found) > len(shown) else ""
    fig.suptitle(f"{model}: stable {r.stable}, phase {r.phase or 'idle'}, revision {r.revision}{hidden}")
    if not shown:
        grid[0][0].set_title("no rollouts yet", fontsize=10, loc="left")
        grid[0][1].text(0.5, 0.5, "no checks yet", ha="center", va="center", transform=grid[0][1].transAxes)
        return fig
    for row, segment in zip(grid, shown, strict=False):
        # A rollout that has ended is drawn to its end, one still running (or the latest
        # changes by hand) up to now.
        ended = segment.phase in ENDINGS if segment.candidate else segment is not found[-1]
        end = (segment.records[-1].at if ended else now) - segment.started
        marks = _draw_traffic(row[0], segment, end)
        checks = _checks(segment)
        for ax, name in zip(row[1:], names or [""], strict=False):
            if name in checks:
                _draw_check(ax, name, checks[name], end)
            else:
                ax.set_title(name, fontsize=9)
                ax.text(0.5, 0.5, "no checks yet", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xlim(0, _right(end))
            for t, color in marks:
                ax.axvline(t, color=color, linestyle=":", linewidth=1.2)
        row[0].set_xlabel("seconds since the rollout began" if segment.candidate else "seconds since the first change")
    for ax in grid[0][1:]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7)
    return fig


def plot_rollout(model: str, records: list[rpb.AuditRecord], report: rpb.Report, out: Path) -> None:
    try:
        import matplotlib  # noqa: F401  (only whether it imports)
    except ImportError:
        raise CommandFailed("--plot needs matplotlib: pip install matplotlib", EXIT_REFUSED) from None
    if not records:
        raise CommandFailed(f"{model} has no audit records to plot", EXIT_REFUSED)
    rollout_figure(model, records, report, time.time()).savefig(out, dpi=110)
