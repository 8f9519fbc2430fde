"""Latency against throughput for one `gateway bench` run: p99 solid, p50 dashed, a line per target.

The servers share one panel; the in-process `ort` baseline (model runs with no
server, microseconds at 10^5 rows/s and more) gets a panel of its own, so its
scale does not squash the servers' points into a corner. Points the run flagged
as noisy (other processes busy on the bench's CPUs, as the report warns) are
circled in red and listed under the title.

python -m loadtests.plot bench-results/bench-digits-20250101-120000.json [out.png]
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.bench.report import NOISY_SHARE
from loadtests.bench.summary import label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLORS = {
    "ort": "tab:gray",
    "bare": "tab:blue",
    "naive": "tab:purple",
    "gateway-nobatch": "tab:orange",
    "gateway": "tab:green",
    "gateway-rest-json": "tab:red",
    "gateway-rest-binary": "tab:brown",
}
# The in-process baseline: no server, so not on the servers' axes.
IN_PROCESS = "ort"
NOISY_LABEL = f"noisy: other processes used ≥{NOISY_SHARE:.0%} of the bench's CPUs"


def _median(entry: dict[str, Any], metric: str) -> float | None:
    value = entry.get(metric)
    return float(value["median"]) if isinstance(value, dict) else None


def noisy_share(entry: dict[str, Any]) -> float | None:
    """The largest share of the CPUs other processes used in any repeat of this point, if
    it is enough to flag the point (the report's threshold); else None."""
    share = entry.get("other_cpu_share")
    worst = float(share["max"]) if isinstance(share, dict) else 0.0
    return worst if worst >= NOISY_SHARE else None


def _point_name(entry: dict[str, Any]) -> str:
    return f"c={label(entry['offered'])}" if entry["mode"] == "closed" else f"{label(entry['offered'])}/s"


def _draw(ax: Axes, series: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Each target's p99 and p50 on `ax`; the noisy points circled. Returns the noisy points' names."""
    xs_all: list[float] = []
    noisy: list[str] = []
    flagged = False
    for (target, mode), entries in series.items():
        points = []
        for e in sorted(entries, key=lambda e: e["offered"]):
            x, p50, p99 = _median(e, "rows_per_s"), _median(e, "p50_ms"), _median(e, "p99_ms")
            if x and p50 and p99:
                points.append((x, p50, p99, e))
        if not points:
            continue
        xs = [p[0] for p in points]
        xs_all += xs
        color = COLORS.get(target)
        name = target + (" (open loop)" if mode == "open" else "")
        style = "-" if mode == "closed" else ":"
        ax.plot(xs, [p[2] for p in points], style, marker="o", color=color, label=f"{name} p99")
        ax.plot(xs, [p[1] for p in points], "--", marker=".", color=color, alpha=0.6, label=f"{name} p50")
        for x, _, p99, entry in points:
            tag = _point_name(entry)
            share = noisy_share(entry)
            if share is not None:
                tag += " noisy"
                noisy.append(f"{target} {_point_name(entry)} ({share:.0%})")
                ax.plot(
                    [x],
                    [p99],
                    linestyle="none",
                    marker="o",
                    markersize=14,
                    markerfacecolor="none",
                    markeredgecolor="red",
                    markeredgewidth=1.5,
                    label="_nolegend_" if flagged else NOISY_LABEL,
                )
                flagged = True
            ax.annotate(tag, (x, p99), textcoords="offset points", xytext=(3, 4), fontsize=7, color=color)
    ax.set_yscale("log")
    if xs_all and max(xs_all) / max(min(xs_all), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("throughput (rows/s, median of repeats)")
    ax.grid(True, which="both", alpha=0.3)
    if xs_all:
        # Below the panel: inside, a legend of many targets hides their points.
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return noisy


def bench_figure(results: dict[str, Any]) -> Figure:
    """The figure `gateway bench` writes: the servers' panel, and the in-process baseline's if it ran."""
    from matplotlib.figure import Figure

    config, machine = results["config"], results["machine"]
    servers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    baseline: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in results["summary"]:
        side = baseline if entry["target"] == IN_PROCESS else servers
        side.setdefault((entry["target"], entry["mode"]), []).append(entry)
    fig = Figure(figsize=(13 if baseline else 10, 6.5), dpi=110, layout="constrained")
    if baseline:
        server_ax, baseline_ax = fig.subplots(1, 2, width_ratios=(3, 1))
    else:
        server_ax = fig.subplots()
    server_ax.set_title("servers (over the network)", fontsize=10)
    noisy = _draw(server_ax, servers)
    server_ax.set_ylabel("latency (ms): p99 solid, p50 dashed")
    if baseline:
        baseline_ax.set_title("ort in process\n(no server; latency per batch run)", fontsize=10)
        noisy += _draw(baseline_ax, baseline)
    cpus = results.get("cpus", {})
    title = (
        f"{config['model']} v{config.get('version_resolved', '?')}, {config['rows']} row(s)/request, "
        f"{config['duration_s']:g} s x {config['repeats']} repeat(s)\n"
        f"{machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} cores; "
        f"server cpus {cpus.get('server') or 'any'}, client cpus {cpus.get('client') or 'any'}"
    )
    if noisy:
        warning = (
            f"NOISY: other processes were busy on the bench's CPUs during {len(noisy)} point(s), circled in red "
            f"(most in any repeat): {', '.join(noisy)}. Rerun on a quiet machine before trusting those."
        )
        title += "\n" + "\n".join(textwrap.wrap(warning, 160))
    fig.suptitle(title, fontsize=10)
    versions = results.get("versions", {})
    footer = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    fig.supxlabel(footer, fontsize=6, color="gray")
    return fig


def plot_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bench_figure(results).savefig(path, format="png")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return
    source = Path(args[0])
    target = Path(args[1]) if len(args) > 1 else source.with_suffix(".png")
    plot_results(json.loads(source.read_text()), target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
