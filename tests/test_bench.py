"""`gateway bench`: the smoke run end to end, and the statistics it reports.

Behaviour only, never timings: the machine is shared, so no assertion here
depends on how fast anything is.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtests.bare_server import build_response
from loadtests.bench import compute_ratios, format_cpus, parse_cpus, summarize
from loadtests.loadgen import (
    ClientPool,
    LoadSpec,
    WorkerResult,
    arrival_times,
    build_request,
    check_response,
    load_signature,
    merge_results,
    merge_samples,
    percentile,
    split_evenly,
)
from tests.support import MODELS, ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGETS = {"ort", "bare", "gateway-nobatch", "gateway"}


def test_smoke_bench_writes_every_target_ratios_and_plot(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--smoke", "--model", "digits", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [json_path] = tmp_path.glob("bench-digits-*.json")
    data = json.loads(json_path.read_text())

    points = data["points"]
    assert {p["target"] for p in points} == TARGETS
    for point in points:
        assert point["completed"] > 0, point
        assert point["errors"] == {} and point["warmup_errors"] == {}, point
    served = [p for p in points if p["target"] != "ort"]
    assert {p["offered"] for p in served} == {1.0, 8.0}
    assert all(p["client_cpu_share"] > 0 for p in served)

    ratios = data["ratios"]
    for key in ("gateway_over_bare_rps", "gateway_over_ort_rows", "batching_speedup_rps", "batching_p99_ratio"):
        assert set(ratios[key]) == {"1", "8"}, key
        assert all(math.isfinite(v) and v > 0 for v in ratios[key].values()), key
    assert data["versions"]["grpcio"] and data["versions"]["onnxruntime"]
    assert data["machine"]["cpu_count"] >= 1
    assert "ratios (medians of this run)" in result.stdout

    [png_path] = tmp_path.glob("bench-digits-*.png")
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_help_has_examples() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0
    for flag in ("--concurrency", "--rates", "--baselines", "--server-cpus", "--smoke", "--repeats"):
        assert flag in result.stdout
    assert "Examples:" in result.stdout


def test_open_loop_against_the_bare_server() -> None:
    signature = load_signature(MODELS, "digits")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.bare_server", "--models", str(MODELS), "--model", "digits", "--rows", "2"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        spec = LoadSpec(
            address=line.split()[-1],
            payload=build_request(signature, 2, pin_version=False),
            rows=2,
            outputs=signature.outputs,
            mode="open",
            offered=200.0,
            duration_s=0.5,
            warmup_s=0.1,
            channels=2,
            request_timeout_s=2.0,
        )
        with ClientPool(1, None) as pool:
            point = pool.run(spec)
    finally:
        proc.terminate()
        proc.wait(10)
    assert "response_problem" not in point.extra
    assert point.errors == {}
    # 100 arrivals expected; Poisson noise is about +-10, so this only fails if the schedule is wrong.
    assert 50 < point.scheduled < 150
    assert point.completed == point.scheduled and point.success_ratio == 1.0
    assert point.rows_per_s == pytest.approx(point.throughput_rps * 2)


# --------------------------------------------------------------------------- statistics, no servers


def test_percentile_is_nearest_rank() -> None:
    ordered = np.arange(1, 101, dtype=np.float64)
    assert percentile(ordered, 50) == 50
    assert percentile(ordered, 99) == 99
    assert percentile(ordered, 100) == 100
    assert percentile(ordered, 0) == 1
    assert percentile(np.array([7.0]), 99) == 7
    assert math.isnan(percentile(np.empty(0), 50))


def test_percentiles_come_from_all_samples_merged() -> None:
    fast = [0.001] * 990
    slow = [0.001] * 980 + [0.100] * 20  # 2% slow: this process alone has p99 = 100 ms
    merged = merge_samples([fast, slow])
    assert len(merged) == 1990 and bool(np.all(merged[:-1] <= merged[1:]))
    # 20 slow of 1990 is 1.005% > 1%: the merged p99 is slow; the mean of the per-process p99s would not be.
    assert percentile(merged, 99) == 0.100
    assert percentile(merged, 98) == 0.001


def test_merge_results_sums_processes() -> None:
    spec = LoadSpec("127.0.0.1:1", b"", 4, (), "closed", 3, 2.0, 0.5, 1, 2.0)
    a, b = WorkerResult(), WorkerResult()
    a.latencies.extend([0.001, 0.002])
    a.completed_in_window = 2
    a.errors = {"UNAVAILABLE": 1}
    a.cpu_s = 0.5
    b.latencies.extend([0.003])
    b.completed_in_window = 1
    b.errors = {"UNAVAILABLE": 2, "RESOURCE_EXHAUSTED": 1}
    b.cpu_s = 0.3
    point = merge_results(spec, [a, b], client_cores=2)
    assert point.completed == 3
    assert point.errors == {"UNAVAILABLE": 3, "RESOURCE_EXHAUSTED": 1}
    assert point.throughput_rps == pytest.approx(1.5)
    assert point.rows_per_s == pytest.approx(6.0)
    assert point.p50_ms == pytest.approx(2.0) and point.max_ms == pytest.approx(3.0)
    assert point.client_cpu_share == pytest.approx(0.8 / (2.0 * 2))


def test_poisson_schedule_is_seeded_with_mean_gap_one_over_rate() -> None:
    rate = 1500.0
    times = list(itertools.islice(arrival_times(10.0, rate, seed=7), 20_000))
    gaps = np.diff([10.0, *times])
    assert bool(np.all(gaps > 0))
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean (a fixed pacing would give 0).
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.1)
    assert times == list(itertools.islice(arrival_times(10.0, rate, seed=7), 20_000))
    assert times != list(itertools.islice(arrival_times(10.0, rate, seed=8), 20_000))


def test_concurrency_splits_over_processes() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(1, 2) == [1, 0]


def test_cpu_lists() -> None:
    assert parse_cpus("0-3,6") == [0, 1, 2, 3, 6]
    assert format_cpus([6, 0, 1, 2, 3]) == "0-3,6"
    assert format_cpus([1]) == "1"
    with pytest.raises(ValueError):
        parse_cpus("3-1")


def test_response_check_finds_missing_and_short_outputs() -> None:
    signature = load_signature(MODELS, "digits")
    good = build_response(signature, 3)
    assert check_response(good, signature.outputs, 3) is None
    assert "expected 2 rows" in (check_response(good, signature.outputs, 2) or "")
    only_one = build_response(dataclasses.replace(signature, outputs=signature.outputs[:1]), 3)
    assert "missing" in (check_response(only_one, signature.outputs, 3) or "")


def _point(target: str, offered: float, rps: float, p99: float, repeat: int = 0) -> dict[str, object]:
    return {
        "target": target,
        "repeat": repeat,
        "mode": "closed",
        "offered": offered,
        "throughput_rps": rps,
        "rows_per_s": rps,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "errors": {},
        "completed": 1,
    }


def test_summary_takes_medians_and_ratios_divide_them() -> None:
    points = [_point("bare", 4, rps, 1.0, repeat=i) for i, rps in enumerate((900.0, 1000.0, 5000.0))] + [
        _point("gateway", 4, 800.0, 2.0),
        _point("gateway-nobatch", 4, 400.0, 4.0),
    ]
    summary = summarize(points)
    bare = next(e for e in summary if e["target"] == "bare")
    assert bare["throughput_rps"] == {"median": 1000.0, "min": 900.0, "max": 5000.0}
    ratios = compute_ratios(summary, [4], [])
    assert ratios["gateway_over_bare_rps"] == {"4": pytest.approx(0.8)}
    assert ratios["batching_speedup_rps"] == {"4": pytest.approx(2.0)}
    assert ratios["batching_p99_ratio"] == {"4": pytest.approx(0.5)}
    assert "gateway_over_ort_rows" not in ratios  # no ort points: no ratio, rather than a wrong one


def test_compare_two_versions_side_by_side(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--compare", "1", "3", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version comparison" in result.stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {p["target"] for p in data["points"]} == {"v1", "v3"}
    assert all(p["completed"] > 0 and not p["errors"] for p in data["points"])
    for version in ("v1", "v3"):
        assert data["compare"][version]["throughput_at_slo_rps"] > 0
    assert data["compare"]["b_over_a_throughput_at_slo"] > 0
    assert next(tmp_path.glob("*.png")).read_bytes().startswith(b"\x89PNG")


def test_shadow_target_and_routing_cost(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "bench",
            "--smoke",
            "--baselines",
            "gateway,gateway-shadow",
            "--shadow",
            "3",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {p["target"] for p in data["points"]} == {"gateway", "gateway-shadow"}
    assert all(not p["errors"] for p in data["points"])
    assert data["ratios"]["shadow_over_gateway_p99"] and data["ratios"]["shadow_over_gateway_p50"]
    assert 0 < data["routing"]["route_point_us"] <= data["routing"]["choose_us"] < 1000
    missing = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--smoke", "--baselines", "gateway-shadow", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert missing.returncode == 2 and "--shadow" in missing.stderr
