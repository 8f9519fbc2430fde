"""What a run prints and writes: a line per point as it is measured, then rich tables of the
medians and ratios, and the results as JSON plus a PNG plot.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from loadtests.bench.config import EXECUTOR_TARGETS
from loadtests.bench.summary import label

# Other processes busy on the bench's CPUs for this share of a point's window: its numbers are suspect.
NOISY_SHARE = 0.05
# Text that is not a terminal (a pipe, a file, CI logs) is laid out this wide, so no table row wraps.
TEXT_WIDTH = 200

RATIO_TITLES = {
    "shadow_over_gateway_p50": "gateway-shadow / gateway, p50",
    "shadow_over_gateway_p99": "gateway-shadow / gateway, p99",
    "shadow_over_gateway_throughput": "gateway-shadow / gateway, req/s",
    "shadow_rows_per_primary_row": "shadow rows run / primary rows (mirrored)",
    "gateway_over_bare_rps": "gateway / bare, req/s",
    "gateway_nobatch_over_bare_rps": "gateway-nobatch / bare, req/s",
    "gateway_over_naive_rps": "gateway / naive, req/s",
    "gateway_nobatch_over_naive_rps": "gateway-nobatch / naive, req/s",
    "gateway_over_naive_p50": "gateway / naive, p50 (nothing else in flight)",
    "gateway_over_ort_rows": "gateway / ort at batch rows*c, rows/s",
    "gateway_nobatch_over_ort_batch1_rows": "gateway-nobatch / ort at batch rows, rows/s",
    "batching_speedup_rps": "gateway / gateway-nobatch, req/s",
    "batching_p99_ratio": "gateway / gateway-nobatch, p99",
    "open_gateway_over_bare_p99": "gateway / bare, p99 (open loop, per rate)",
    "rest_json_over_gateway_rps": "REST JSON / gRPC (gateway), req/s",
    "rest_binary_over_gateway_rps": "REST binary / gRPC (gateway), req/s",
    "rest_json_over_gateway_p50": "REST JSON / gRPC (gateway), p50",
    "rest_binary_over_gateway_p50": "REST binary / gRPC (gateway), p50",
    "exec_over_gateway_rps": "gateway-exec / gateway, req/s",
    "exec_over_gateway_p50": "gateway-exec / gateway, p50",
    "exec_over_gateway_p99": "gateway-exec / gateway, p99",
    "exec_over_gateway_batch": "gateway-exec / gateway, mean batch",
}

Entry = dict[str, Any]


# --------------------------------------------------------------------------- numbers as text


def fmt_ms(value: float) -> str:
    # Three significant digits or so: the ort baseline runs in microseconds, servers in milliseconds.
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def _count(value: float) -> str:
    return f"{value:.0f}"


def _share(value: float) -> str:
    return f"{value:.0%}"


def _point(entry: Entry) -> str:
    return f"c={label(entry['offered'])}" if entry["mode"] == "closed" else f"r={label(entry['offered'])}/s"


def progress_line(row: Entry, repeats: int) -> str:
    """One point as soon as it is measured."""
    offered = f"c={label(row['offered'])}" if row["mode"] == "closed" else f"r={label(row['offered'])}/s"
    errors = sum(row["errors"].values())
    parts = [
        f"[{row['repeat'] + 1}/{repeats}] {row['target']:<19} {offered:<9}",
        f"{row['throughput_rps']:9.0f} req/s {row['rows_per_s']:10.0f} rows/s",
        f"p50 {fmt_ms(row['p50_ms']):>6} ms  p99 {fmt_ms(row['p99_ms']):>6} ms",
        f"err {errors}" + (f" {row['errors']}" if errors else ""),
    ]
    if row["warmup_errors"]:
        parts.append(f"warm-up errors {row['warmup_errors']}")
    if row["target"] == "ort":
        parts.append(f"batch {row['batch']}")
    else:
        parts.append(f"cli-cpu {row['client_cpu_share']:4.0%}")
    if "server_cpu_share" in row:
        parts.append(f"srv-cpu {row['server_cpu_share']:4.0%}")
    if "server_cpu_ms_per_1k" in row:
        parts.append(f"{row['server_cpu_ms_per_1k']:.0f} ms/1k req")
    if "mean_batch" in row:
        parts.append(f"batch {row['mean_batch']:.1f}")
    if "executor_busy_share" in row:
        parts.append(f"exec busy {row['executor_busy_share']:4.0%}")
    if "shadow_rows_per_row" in row:
        parts.append(f"mirrored {row['shadow_rows_per_row']:.2f}")
    if row["mode"] == "open":
        parts.append(f"ok {row['success_ratio']:.1%} dropped {row['dropped']} lag {row['send_lag_ms']:.2f} ms")
    if row.get("other_cpu_share", 0.0) >= NOISY_SHARE:
        parts.append(f"NOISY: other processes used {row['other_cpu_share']:.0%} of the CPUs")
    return "  ".join(parts)


# --------------------------------------------------------------------------- tables


def table(title: str | None, headers: Sequence[str], rows: Sequence[Sequence[str]], *, plain: bool = False) -> Table:
    """A table of text cells: the first column left-aligned, the numbers right-aligned.

    `plain`: no rules at all, only aligned columns (for output that other tools split on whitespace).
    """
    result = Table(
        title=title,
        title_justify="left",
        box=None if plain else box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    for index, header in enumerate(headers):
        result.add_column(header, justify="left" if index == 0 else "right", no_wrap=True)
    for row in rows:
        result.add_row(*row)
    return result


def _target_table(target: str, entries: Sequence[Entry]) -> Table:
    def spread(entry: Entry, metric: str, fmt: Callable[[float], str]) -> str:
        if metric not in entry:
            return "-"
        m = entry[metric]
        if entry["repeats"] == 1:
            return fmt(m["median"])
        return f"{fmt(m['median'])} [{fmt(m['min'])}-{fmt(m['max'])}]"

    def plain(entry: Entry, metric: str, fmt: Callable[[float], str]) -> str:
        return fmt(entry[metric]["median"]) if metric in entry else "-"

    busy = target in EXECUTOR_TARGETS
    rows = []
    for e in entries:
        batch = str(e["batch"]) if target == "ort" else plain(e, "mean_batch", lambda v: f"{v:.1f}")
        rows.append(
            [
                _point(e),
                spread(e, "throughput_rps", _count),
                plain(e, "rows_per_s", _count),
                plain(e, "p50_ms", fmt_ms),
                plain(e, "p90_ms", fmt_ms),
                spread(e, "p99_ms", fmt_ms),
                str(sum(e["errors"].values())),
                "-" if target == "ort" else plain(e, "client_cpu_share", _share),
                plain(e, "server_cpu_share", _share),
                "-" if target == "ort" else plain(e, "server_cpu_ms_per_1k", _count),
                batch,
            ]
            + ([plain(e, "executor_busy_share", _share)] if busy else [])
        )
    what = " (model runs; latency per batch run)" if target == "ort" else ""
    headers = ["point", "req/s [min-max]", "rows/s", "p50 ms", "p90 ms", "p99 ms [min-max]", "errors"]
    # srv-cpu ms/1k req: the server's CPU time per 1,000 requests; mean batch: rows per model run;
    # exec busy: the executor's time in model runs over the point's wall time (executor targets only).
    headers += ["cli-cpu", "srv-cpu", "srv-cpu ms/1k req", "batch" if target == "ort" else "mean batch"]
    headers += ["exec busy"] if busy else []
    return table(f"{target}{what}: median of {entries[0]['repeats']} repeat(s)", headers, rows)


def _point_label(ratio: str, key: str) -> str:
    """A ratio's per-point key as printed: "16" -> "c=16"; open-loop keys say "r=" already."""
    if key.startswith("r="):
        return key
    return ("r=" if ratio == "open_gateway_over_bare_p99" else "c=") + key


def _ratio_table(ratios: dict[str, Any]) -> Table:
    rows = []
    for key, title in RATIO_TITLES.items():
        if key in ratios:
            rows.append([title, "  ".join(f"{_point_label(key, k)}: {fmt_ratio(v)}" for k, v in ratios[key].items())])
    for key, value in ratios.get("peak", {}).items():
        rows.append([f"peak {RATIO_TITLES[key]}", fmt_ratio(value)])
    ratio_table = table("ratios (medians of this run)", ["ratio", "per point"], rows)
    ratio_table.columns[1].justify = "left"
    return ratio_table


def _noisy(summary: Sequence[Entry], targets: Sequence[str]) -> Text | None:
    noisy = [
        f"{e['target']} {'c=' if e['mode'] == 'closed' else 'r='}{label(e['offered'])} "
        f"(up to {e['other_cpu_share']['max']:.0%})"
        for e in summary
        if e["target"] in targets and e.get("other_cpu_share", {}).get("max", 0.0) >= NOISY_SHARE
    ]
    if not noisy:
        return None
    return Text(
        f"WARNING: other processes were busy on the bench's CPUs during {len(noisy)} point(s), in at least one "
        f"repeat: {', '.join(noisy)}. Rerun on a quiet machine before trusting those.",
        style="bold yellow",
        no_wrap=True,
        overflow="ignore",  # one line however long: a terminal wraps it, a log keeps it greppable
    )


def report(summary: Sequence[Entry], ratios: dict[str, Any], targets: Sequence[str]) -> Group:
    """Per target its medians over the repeats, a warning for disturbed points, and the ratios."""
    parts: list[RenderableType] = []
    for target in targets:
        entries = [e for e in summary if e["target"] == target]
        if entries:
            parts += [Text(""), _target_table(target, entries)]
    warning = _noisy(summary, targets)
    if warning is not None:
        parts += [Text(""), warning]
    if ratios:
        parts += [Text(""), _ratio_table(ratios)]
    return Group(*parts)


def compare_report(compare: dict[str, Any], slo_ms: float) -> Group:
    """--compare: per version its throughput at the p99 objective, errors and p99 per point."""
    rows = []
    for target, entry in compare.items():
        if not isinstance(entry, dict):
            continue
        p99 = "  ".join(f"@{k}: {v:.2f}" for k, v in entry["p99_ms"].items())
        errors = f"{entry['errors']} ({entry['error_rate']:.2%})"
        rows.append([target, f"{entry['throughput_at_slo_rps']:.0f}", errors, p99])
    headers = ["version", "req/s at objective", "errors", "p99 ms per point"]
    compared = table(f"version comparison (p99 objective {slo_ms:g} ms)", headers, rows)
    compared.columns[3].justify = "left"
    parts: list[RenderableType] = [Text(""), compared]
    if "b_over_a_throughput_at_slo" in compare:
        parts.append(Text(f"ratio (second / first) at objective: {compare['b_over_a_throughput_at_slo']:.2f}"))
    return Group(*parts)


def format_routing(routing: dict[str, Any]) -> str:
    low, high = routing["choose_us_range"]
    return (
        f"routing: {routing['choose_us']:.2f} us per decision [{low:.2f}-{high:.2f}] "
        f"({routing['route_point_us']:.2f} us of it the key hash; median of {routing['repeats']} passes "
        f"over {routing['keys']:,} keys, {routing['canary_share']:.1%} on the canary)"
    )


def show(renderable: RenderableType) -> None:
    """Print to standard output: styled at the terminal's width on a terminal, else as plain text."""
    if sys.stdout.isatty():
        Console(markup=False, highlight=False).print(renderable, crop=False)
    else:
        click.echo(to_text(renderable))


def to_text(renderable: RenderableType) -> str:
    """A table (or group) as plain text, as it prints into a file."""
    out = io.StringIO()
    Console(file=out, width=TEXT_WIDTH, markup=False, highlight=False, color_system=None).print(renderable, crop=False)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


# --------------------------------------------------------------------------- files


def require_plotting() -> None:
    """Refuse at once when the plot cannot be drawn, not after the whole run (as `report --plot` does)."""
    try:
        import matplotlib  # noqa: F401  (only whether it imports)
    except ImportError:
        raise click.ClickException(
            "gateway bench draws a PNG plot and needs matplotlib: "
            "pip install matplotlib (or pip install 'release-gateway[test]')"
        ) from None


def write_results(results: dict[str, Any], out: Path, model: str) -> list[Path]:
    """OUT/bench-MODEL-TIMESTAMP.json and .png; the paths written."""
    from loadtests.plot import plot_results

    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    png_path = stem.with_suffix(".png")
    plot_results(results, png_path)
    return [json_path, png_path]
