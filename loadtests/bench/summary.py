"""The numbers of a run: medians over the repeats, the ratios between targets, and --compare's summary."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

SUMMARY_METRICS = (
    "throughput_rps",
    "rows_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "client_cpu_share",
    "server_cpu_share",
    "server_cpu_ms_per_1k",  # server CPU time (ms, all cores) per 1,000 requests answered; servers only
    "mean_batch",
    "executor_busy_share",  # gateway-exec: the executor's time in model runs / wall time
    "success_ratio",
    "shadow_rows_per_row",
    "other_cpu_share",
)


def label(value: float) -> str:
    """An offered load as printed: 16 rather than 16.0, 0.5 as is."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def summarize(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and min/max per (target, mode, offered) over the repeats."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault((point["target"], point["mode"], point["offered"]), []).append(point)
    summary = []
    for (target, mode, offered), rows in groups.items():
        entry: dict[str, Any] = {"target": target, "mode": mode, "offered": offered, "repeats": len(rows)}
        for metric in SUMMARY_METRICS:
            values = [r[metric] for r in rows if isinstance(r.get(metric), int | float) and not math.isnan(r[metric])]
            if values:
                entry[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        errors: dict[str, int] = {}
        for r in rows:
            for code, count in r["errors"].items():
                errors[code] = errors.get(code, 0) + count
        entry["errors"] = errors
        entry["completed"] = sum(r["completed"] for r in rows)
        if target == "ort":
            entry["batch"] = rows[0]["batch"]
        summary.append(entry)
    return summary


def _median(summary: Sequence[dict[str, Any]], target: str, mode: str, offered: float, metric: str) -> float | None:
    for entry in summary:
        if (entry["target"], entry["mode"], entry["offered"]) == (target, mode, offered) and metric in entry:
            value: float = entry[metric]["median"]
            return value
    return None


def _peak(summary: Sequence[dict[str, Any]], target: str, metric: str) -> float | None:
    values = [e[metric]["median"] for e in summary if e["target"] == target and e["mode"] == "closed" and metric in e]
    return max(values) if values else None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def compute_ratios(
    summary: Sequence[dict[str, Any]], concurrency: Sequence[int], rates: Sequence[float]
) -> dict[str, Any]:
    """The claims this run supports, each a ratio of medians measured side by side."""

    def per_c(top: tuple[str, str], bottom: tuple[str, str], bottom_at_one: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in concurrency:
            low = float(1 if bottom_at_one else c)
            value = _ratio(
                _median(summary, top[0], "closed", float(c), top[1]),
                _median(summary, bottom[0], "closed", low, bottom[1]),
            )
            if value is not None:
                out[str(c)] = value
        return out

    # Latency with nothing else in flight (c=1): what serving adds to one request over the obvious server.
    p50_at_one = {k: v for k, v in per_c(("gateway", "p50_ms"), ("naive", "p50_ms")).items() if k == "1"}
    ratios: dict[str, Any] = {
        "gateway_over_bare_rps": per_c(("gateway", "throughput_rps"), ("bare", "throughput_rps")),
        "gateway_nobatch_over_bare_rps": per_c(("gateway-nobatch", "throughput_rps"), ("bare", "throughput_rps")),
        "gateway_over_naive_rps": per_c(("gateway", "throughput_rps"), ("naive", "throughput_rps")),
        "gateway_nobatch_over_naive_rps": per_c(("gateway-nobatch", "throughput_rps"), ("naive", "throughput_rps")),
        "gateway_over_naive_p50": p50_at_one,
        # ort at concurrency c ran batch rows*c: what a perfect batcher would hand the model.
        "gateway_over_ort_rows": per_c(("gateway", "rows_per_s"), ("ort", "rows_per_s")),
        "gateway_nobatch_over_ort_batch1_rows": per_c(
            ("gateway-nobatch", "rows_per_s"), ("ort", "rows_per_s"), bottom_at_one=True
        ),
        "batching_speedup_rps": per_c(("gateway", "throughput_rps"), ("gateway-nobatch", "throughput_rps")),
        "batching_p99_ratio": per_c(("gateway", "p99_ms"), ("gateway-nobatch", "p99_ms")),
        # The same gateway over REST against over gRPC, at the same concurrency.
        "rest_json_over_gateway_rps": per_c(("gateway-rest-json", "throughput_rps"), ("gateway", "throughput_rps")),
        "rest_binary_over_gateway_rps": per_c(("gateway-rest-binary", "throughput_rps"), ("gateway", "throughput_rps")),
        "rest_json_over_gateway_p50": per_c(("gateway-rest-json", "p50_ms"), ("gateway", "p50_ms")),
        "rest_binary_over_gateway_p50": per_c(("gateway-rest-binary", "p50_ms"), ("gateway", "p50_ms")),
        # Executor mode against in-process batching, at the same concurrency (and worker count unless
        # --exec-workers says otherwise).
        "exec_over_gateway_rps": per_c(("gateway-exec", "throughput_rps"), ("gateway", "throughput_rps")),
        "exec_over_gateway_p50": per_c(("gateway-exec", "p50_ms"), ("gateway", "p50_ms")),
        "exec_over_gateway_p99": per_c(("gateway-exec", "p99_ms"), ("gateway", "p99_ms")),
        "exec_over_gateway_batch": per_c(("gateway-exec", "mean_batch"), ("gateway", "mean_batch")),
        "peak": {
            name: value
            for name, value in {
                "gateway_over_bare_rps": _ratio(
                    _peak(summary, "gateway", "throughput_rps"), _peak(summary, "bare", "throughput_rps")
                ),
                "gateway_nobatch_over_bare_rps": _ratio(
                    _peak(summary, "gateway-nobatch", "throughput_rps"), _peak(summary, "bare", "throughput_rps")
                ),
                "gateway_over_naive_rps": _ratio(
                    _peak(summary, "gateway", "throughput_rps"), _peak(summary, "naive", "throughput_rps")
                ),
                "batching_speedup_rps": _ratio(
                    _peak(summary, "gateway", "throughput_rps"), _peak(summary, "gateway-nobatch", "throughput_rps")
                ),
                "rest_json_over_gateway_rps": _ratio(
                    _peak(summary, "gateway-rest-json", "throughput_rps"), _peak(summary, "gateway", "throughput_rps")
                ),
                "rest_binary_over_gateway_rps": _ratio(
                    _peak(summary, "gateway-rest-binary", "throughput_rps"), _peak(summary, "gateway", "throughput_rps")
                ),
                "exec_over_gateway_rps": _ratio(
                    _peak(summary, "gateway-exec", "throughput_rps"), _peak(summary, "gateway", "throughput_rps")
                ),
            }.items()
            if value is not None
        },
    }
    # Shadow overhead on the primary: the same gateway, same offered load, with a shadow mirrored at 100%.
    # Keys: "16" for closed loop c=16, "r=1600" for open loop at 1600 req/s.
    for metric in ("p50_ms", "p99_ms", "throughput_rps"):
        closed = per_c(("gateway-shadow", metric), ("gateway", metric))
        opened = {
            f"r={label(r)}": v
            for r in rates
            if (
                v := _ratio(
                    _median(summary, "gateway-shadow", "open", r, metric),
                    _median(summary, "gateway", "open", r, metric),
                )
            )
            is not None
        }
        if closed or opened:
            ratios[f"shadow_over_gateway_{metric.split('_')[0]}"] = {**closed, **opened}
    # How much of the primary's traffic the shadow actually ran (1.0: all of it; the lane drops past its bound).
    mirrored = {
        (str(int(offered)) if mode == "closed" else f"r={label(offered)}"): value
        for mode, points in (("closed", [float(c) for c in concurrency]), ("open", list(rates)))
        for offered in points
        if (value := _median(summary, "gateway-shadow", mode, offered, "shadow_rows_per_row")) is not None
    }
    if mirrored:
        ratios["shadow_rows_per_primary_row"] = mirrored
    if rates:
        open_ratios: dict[str, float] = {}
        for r in rates:
            value = _ratio(
                _median(summary, "gateway", "open", r, "p99_ms"), _median(summary, "bare", "open", r, "p99_ms")
            )
            if value is not None:
                open_ratios[label(r)] = value
        ratios["open_gateway_over_bare_p99"] = open_ratios
    return {k: v for k, v in ratios.items() if v}


def compare_summary(summary: Sequence[dict[str, Any]], targets: Sequence[str], slo_ms: float) -> dict[str, Any]:
    """Per version: the highest throughput whose p99 met the objective, latencies, error rate."""
    result: dict[str, Any] = {}
    for target in targets:
        rows = [r for r in summary if r["target"] == target]
        within = [r for r in rows if r["p99_ms"]["median"] <= slo_ms]
        best = max(within, key=lambda r: r["throughput_rps"]["median"], default=None)
        errors = sum(sum(r.get("errors", {}).values()) for r in rows)
        result[target] = {
            "throughput_at_slo_rps": best["throughput_rps"]["median"] if best else 0.0,
            "at_offered": best["offered"] if best else None,
            "p50_ms": {label(r["offered"]): r["p50_ms"]["median"] for r in rows},
            "p99_ms": {label(r["offered"]): r["p99_ms"]["median"] for r in rows},
            "errors": errors,
            "error_rate": max((1.0 - r["success_ratio"]["median"] for r in rows), default=0.0),
        }
    a, b = targets
    if result[a]["throughput_at_slo_rps"]:
        result["b_over_a_throughput_at_slo"] = result[b]["throughput_at_slo_rps"] / result[a]["throughput_at_slo_rps"]
    return result
