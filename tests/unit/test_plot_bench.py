"""The bench PNG's figure, read back from matplotlib's objects: the in-process baseline on a panel
of its own, and the points the run flagged as noisy circled and named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from loadtests.bench.report import NOISY_SHARE
from loadtests.plot import NOISY_LABEL, bench_figure, plot_results


def entry(target: str, offered: float, rows_per_s: float, p99_ms: float, other: float | None = None) -> dict[str, Any]:
    """A summary entry as the bench writes it: medians (and spreads) over the repeats."""
    e: dict[str, Any] = {"target": target, "mode": "closed", "offered": offered, "repeats": 3}
    for metric, value in (("rows_per_s", rows_per_s), ("p50_ms", p99_ms / 3), ("p99_ms", p99_ms)):
        e[metric] = {"median": value, "min": value, "max": value}
    if other is not None:
        e["other_cpu_share"] = {"median": other / 2, "min": 0.0, "max": other}
    return e


def results(*summary: dict[str, Any]) -> dict[str, Any]:
    config = {"model": "digits", "version_resolved": "1", "rows": 1, "duration_s": 5.0, "repeats": 3}
    machine = {"cpu_model": "test cpu", "cpu_count": 2}
    return {"config": config, "machine": machine, "cpus": {}, "versions": {}, "summary": list(summary)}


SERVERS = (entry("gateway", 1, 900, 5.0), entry("gateway", 8, 1500, 12.0), entry("bare", 1, 1200, 4.0))
ORT = (entry("ort", 1, 90_000, 0.015), entry("ort", 8, 800_000, 0.014))


def xs(line: Line2D) -> list[float]:
    return [float(x) for x in np.asarray(line.get_xdata(), dtype=float)]


def labels(ax: Axes) -> list[str]:
    return [str(line.get_label()) for line in ax.get_lines()]


def test_the_in_process_baseline_gets_its_own_panel() -> None:
    fig = bench_figure(results(*SERVERS, *ORT))
    servers, baseline = fig.axes
    assert servers.get_title() == "servers (over the network)"
    assert baseline.get_title().startswith("ort in process")
    assert not any(label.startswith("ort") for label in labels(servers))
    assert labels(baseline) == ["ort p99", "ort p50"]
    # The servers' axis spans only their throughput, not the baseline's 10^5-10^6 rows/s.
    assert servers.get_xlim()[1] < 2000 and baseline.get_xlim()[1] > 500_000
    assert servers.get_ylim()[0] > 0.1  # nor its microseconds


def test_without_the_baseline_one_panel() -> None:
    [servers] = bench_figure(results(*SERVERS)).axes
    assert set(labels(servers)) == {"gateway p99", "gateway p50", "bare p99", "bare p50"}


def test_noisy_points_are_circled_and_named_under_the_title() -> None:
    noisy = entry("gateway", 8, 1500, 12.0, other=0.18)
    quiet = entry("bare", 1, 1200, 4.0, other=NOISY_SHARE / 2)  # busy, but under the report's threshold
    fig = bench_figure(results(entry("gateway", 1, 900, 5.0), noisy, quiet, *ORT))
    servers, baseline = fig.axes
    [circle] = [line for line in servers.get_lines() if line.get_label() == NOISY_LABEL]
    assert xs(circle) == [1500.0] and circle.get_markeredgecolor() == "red" and circle.get_markerfacecolor() == "none"
    legend = servers.get_legend()
    assert legend is not None and NOISY_LABEL in [t.get_text() for t in legend.get_texts()]
    assert "c=8 noisy" in [t.get_text() for t in servers.texts]
    assert "c=1 noisy" not in [t.get_text() for t in servers.texts]
    title = fig.get_suptitle()
    assert "during 1 point(s)" in title and "gateway c=8 (18%)" in title and "bare" not in title
    assert NOISY_LABEL not in labels(baseline)


def test_a_quiet_run_has_no_noise_flags() -> None:
    fig = bench_figure(results(*SERVERS, *ORT))
    assert "NOISY" not in fig.get_suptitle()
    assert all(NOISY_LABEL not in labels(ax) for ax in fig.axes)


def test_plot_results_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "deeper" / "bench.png"
    plot_results(results(*SERVERS, *ORT), out)
    assert out.read_bytes().startswith(b"\x89PNG")
