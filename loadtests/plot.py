"""Latency against throughput for one `gateway bench` run: p99 solid, p50 dashed, a line per target.

python -m loadtests.plot bench-results/bench-digits-20250101-120000.json [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLORS = {
    "ort": "tab:gray",
    "bare": "tab:blue",
    "naive": "tab:purple",
    "gateway-nobatch": "tab:orange",
    "gateway": "tab:green",
    "gateway-rest-json": "tab:red",
    "gateway-rest-binary": "tab:brown",
}


def _median(entry: dict[str, Any], metric: str) -> float | None:
    value = entry.get(metric)
    return float(value["median"]) if isinstance(value, dict) else None


def plot_results(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or servers
    import matplotlib.pyplot as plt

    config, machine = results["config"], results["machine"]
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=110)
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in results["summary"]:
        series.setdefault((entry["target"], entry["mode"]), []).append(entry)
    xs_all: list[float] = []
    for (target, mode), entries in series.items():
        points = []
        for e in sorted(entries, key=lambda e: e["offered"]):
            x, p50, p99 = _median(e, "rows_per_s"), _median(e, "p50_ms"), _median(e, "p99_ms")
            if x and p50 and p99:
                points.append((x, p50, p99, e["offered"]))
        if not points:
            continue
        xs = [p[0] for p in points]
        xs_all += xs
        color = COLORS.get(target)
        name = target + (" (open loop)" if mode == "open" else "") + (" (per batch run)" if target == "ort" else "")
        style = "-" if mode == "closed" else ":"
        ax.plot(xs, [p[2] for p in points], style, marker="o", color=color, label=f"{name} p99")
        ax.plot(xs, [p[1] for p in points], "--", marker=".", color=color, alpha=0.6, label=f"{name} p50")
        for x, _, p99, offered in points:
            tag = f"c={offered:g}" if mode == "closed" else f"{offered:g}/s"
            ax.annotate(tag, (x, p99), textcoords="offset points", xytext=(3, 4), fontsize=7, color=color)
    ax.set_yscale("log")
    if xs_all and max(xs_all) / max(min(xs_all), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("throughput (rows/s, median of repeats)")
    ax.set_ylabel("latency (ms): p99 solid, p50 dashed")
    cpus = results.get("cpus", {})
    ax.set_title(
        f"{config['model']} v{config.get('version_resolved', '?')}, {config['rows']} row(s)/request, "
        f"{config['duration_s']:g} s x {config['repeats']} repeat(s)\n"
        f"{machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} cores; "
        f"server cpus {cpus.get('server') or 'any'}, client cpus {cpus.get('client') or 'any'}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    versions = results.get("versions", {})
    footer = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    fig.text(0.01, 0.005, footer, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


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
