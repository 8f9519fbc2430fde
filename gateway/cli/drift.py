"""`gateway drift MODEL`: each version's drift against its reference, from the control API.

The table lists the top drifting features (PSI with the max_drift threshold, the
test's p-value and whether Holm rejected it at alpha), the prediction histogram's
drift and the data-quality counters; --json prints the same figures; --plot
draws, for the top features of each version, the reference's and the judged
window's share of rows per bin side by side (docs/drift.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich import box
from rich.table import Table

from gateway.cli.release import connection_options, console, examples, markup
from gateway.control.client import ControlClient
from gateway.protocol.pb import release_pb2 as rpb

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTTED_FEATURES = 4  # panels per version: the top features by PSI, then the prediction


def feature_json(f: rpb.FeatureDrift) -> dict[str, Any]:
    return {
        "name": f.name,
        "psi": f.psi,
        "p_value": f.p_value,
        "rejected": f.rejected,
        "drifting": f.drifting,
        "reference": list(f.reference),
        "live": list(f.live),
        "edges": list(f.edges),
    }


def drift_json(report: rpb.DriftReport) -> dict[str, Any]:
    return {
        "model": report.model,
        "versions": [
            {
                "version": v.version,
                "reference": v.reference,
                "judged": v.judged,
                "rows": v.rows,
                "open_rows": v.open_rows,
                "windows_closed": v.windows_closed,
                "score": v.score,
                "over_threshold": v.over_threshold,
                "alarm": v.alarm,
                "max_drift": v.max_drift,
                "alpha": v.alpha,
                "prediction": feature_json(v.prediction) if v.HasField("prediction") else None,
                "requests_checked": v.requests_checked,
                "nonfinite": dict(v.nonfinite),
                "rejected": v.rejected,
                "out_of_range": dict(v.out_of_range),
                "features": [feature_json(f) for f in v.features],
            }
            for v in report.versions
        ],
    }


def _verdict(v: rpb.VersionDrift) -> str:
    if v.judged != "closed":
        return f"no window closed yet ({v.open_rows} rows of the first): no verdict"
    return "ALARM" if v.alarm else "no drift"


def version_table(v: rpb.VersionDrift, top: int) -> Table:
    title = (
        f"version {markup(v.version)}: {_verdict(v)}; score {v.score:.3f} (max PSI), "
        f"{v.over_threshold} feature(s) over max_drift {v.max_drift:g}; window {v.rows} rows, "
        f"{v.windows_closed} closed, alpha {v.alpha:g}"
    )
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("feature", "PSI", "p-value", "Holm", "drifting"):
        table.add_column(name, justify="left" if name == "feature" else "right")
    features = list(v.features[:top])
    if v.HasField("prediction"):
        features.append(v.prediction)
    for f in features:
        table.add_row(
            markup(f.name),
            f"{f.psi:.3f}",
            f"{f.p_value:.2g}",
            "reject" if f.rejected else "-",
            "YES" if f.drifting else "-",
        )
    quality = ", ".join(
        [f"{v.requests_checked} requests binned"]
        + [f"{markup(k)}: {n} NaN/Inf" for k, n in sorted(v.nonfinite.items())]
        + [f"{markup(k)}: {n} out of range" for k, n in sorted(v.out_of_range.items())]
        + [f"{v.rejected} refused"]
    )
    table.caption = f"data quality: {quality}"
    table.caption_justify = "left"
    return table


@click.command(
    epilog=examples(
        "gateway drift digits", "gateway drift digits --version 2 --json", "gateway drift digits --plot drift.png"
    )
)
@click.argument("model")
@click.option("--version", default="", help="One version. [default: every version with a reference]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every figure, bins included).")
@click.option("--top", type=click.IntRange(1, 50), default=5, show_default=True, help="Features listed per version.")
@click.option(
    "--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write reference vs live histograms as PNG."
)
@connection_options
def drift(client: ControlClient, model: str, version: str, as_json: bool, top: int, plot: Path | None) -> None:
    """Input and prediction drift of live traffic against each version's reference data, and
    data-quality counts (NaN/Inf, out of range). Verdicts are given on closed windows."""
    report = client.call(client.stub.GetDrift, rpb.GetDriftRequest(model=model, version=version))
    if plot is not None:
        plot_drift(report, plot)
        console.print(f"wrote {markup(plot)}")
        return
    if as_json:
        click.echo(json.dumps(drift_json(report), indent=2))
        return
    if not report.versions:
        console.print(f"{markup(model)}: no version has a reference data set (or [monitor] is off)")
    for v in report.versions:
        console.print(version_table(v, top))


def _panel(ax: Axes, f: rpb.FeatureDrift, title: str) -> None:
    ref = [c / max(1, sum(f.reference)) for c in f.reference]
    live = [c / max(1, sum(f.live)) for c in f.live]
    if f.name == "prediction":
        labels = [str(i) for i in range(len(ref))]
    else:
        inner = [f"{e:.3g}" for e in f.edges]
        labels = ["below"] + [f"≤{e}" for e in inner[1:]] + ["above"]
    xs = range(len(ref))
    ax.bar([x - 0.2 for x in xs], ref, width=0.4, label="reference", color="tab:blue")
    ax.bar([x + 0.2 for x in xs], live, width=0.4, label="live window", color="tab:orange")
    ax.set_xticks(list(xs), labels, rotation=60, fontsize=7)
    ax.set_ylabel("share of rows")
    color = "tab:red" if f.drifting else "black"
    ax.set_title(f"{title}\n{f.name}: PSI {f.psi:.2f}, p {f.p_value:.1e}", fontsize=9, color=color)


def drift_figure(report: rpb.DriftReport) -> Figure:
    """A row of panels per version that has seen live rows (its top features by PSI, then its
    predictions); versions without live traffic are named in the title, not drawn as empty
    windows scored 0."""
    from matplotlib.figure import Figure

    plotted = [v for v in report.versions if v.rows or v.open_rows]
    idle = [f"v{v.version}" for v in report.versions if not (v.rows or v.open_rows)]
    cols = PLOTTED_FEATURES + 1
    fig = Figure(figsize=(3.2 * cols, 3.0 * max(1, len(plotted)) + 0.9), layout="constrained")
    axes = fig.subplots(max(1, len(plotted)), cols, squeeze=False)
    for row, v in zip(axes, plotted, strict=False):
        panels = [(f, f"v{v.version} feature {i + 1}") for i, f in enumerate(v.features[:PLOTTED_FEATURES])]
        if v.HasField("prediction"):
            panels.append((v.prediction, f"v{v.version} predictions"))
        for ax, (f, title) in zip(row, panels, strict=False):
            _panel(ax, f, title)
        for ax in row[len(panels) :]:
            ax.set_axis_off()
    if plotted:
        axes[0][0].legend(fontsize=7)
    else:
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0][0].text(0, 0.5, "no version has served live rows yet", fontsize=11)
    lines = [f"{report.model}: reference vs live window, top features by PSI"]
    lines += [f"v{v.version}: {_verdict(v)}" for v in plotted]
    if idle:
        lines.append(f"no live traffic yet: {', '.join(idle)}")
    if not report.versions:
        lines.append("no version has a reference data set")
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def plot_drift(report: rpb.DriftReport, path: Path) -> None:
    drift_figure(report).savefig(path, dpi=100)
