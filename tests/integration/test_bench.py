"""`gateway bench`: the smoke run end to end, and the statistics it reports.

Behaviour only, never timings: the machine is shared, so no assertion here
depends on how fast anything is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gateway.cli import bench as bench_command
from gateway.percentiles import quantile
from gateway.protocol.pb import inference_pb2 as pb
from loadtests.bare_server import build_response
from loadtests.bench.cpus import format_cpus, parse_cpus
from loadtests.bench.report import report, to_text
from loadtests.bench.routing import routing_cost
from loadtests.bench.summary import compute_ratios, summarize
from loadtests.bench.targets import with_shadow_release
from loadtests.loadgen import (
    ClientPool,
    LoadSpec,
    WorkerResult,
    arrival_times,
    merge_results,
    merge_samples,
    split_evenly,
)
from loadtests.signature import build_request, check_response, load_signature
from tests.support import MODELS, ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGETS = {"ort", "bare", "naive", "gateway-nobatch", "gateway"}
# A short closed-loop point that tests change field by field.
SPEC = LoadSpec(
    address="127.0.0.1:1",
    payload=b"",
    rows=1,
    outputs=(),
    mode="closed",
    offered=1.0,
    duration_s=0.5,
    warmup_s=0.1,
    channels=1,
    request_timeout_s=2.0,
)


def gateway_bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`gateway bench ARGS` as a user runs it, from the checkout."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_smoke_bench_writes_every_target_ratios_and_plot(tmp_path: Path) -> None:
    result = gateway_bench("--smoke", "--model", "digits", "--out", str(tmp_path))
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
    # Every server reports its CPU per 1,000 requests; the in-process ort loop is no server.
    assert all(p["server_cpu_ms_per_1k"] > 0 for p in served), served
    for p in served:  # CPU seconds per request, in ms per 1,000 requests
        assert p["server_cpu_ms_per_1k"] == pytest.approx(p["server_cpu_s"] / p["completed"] * 1e6)
    assert not any("server_cpu_ms_per_1k" in p for p in points if p["target"] == "ort")
    assert {p["offered"] for p in served if p["target"] == "naive"} == {1.0, 8.0}
    gateway_summary = [e for e in data["summary"] if e["target"] == "gateway"]
    assert all(e["server_cpu_ms_per_1k"]["median"] > 0 and e["mean_batch"]["median"] >= 1 for e in gateway_summary)

    ratios = data["ratios"]
    per_point = ("gateway_over_bare_rps", "gateway_over_naive_rps", "gateway_nobatch_over_naive_rps")
    for key in (*per_point, "gateway_over_ort_rows", "batching_speedup_rps", "batching_p99_ratio"):
        assert set(ratios[key]) == {"1", "8"}, key
        assert all(math.isfinite(v) and v > 0 for v in ratios[key].values()), key
    assert set(ratios["gateway_over_naive_p50"]) == {"1"} and ratios["gateway_over_naive_p50"]["1"] > 0
    assert ratios["peak"]["gateway_over_naive_rps"] > 0
    assert data["versions"]["grpcio"] and data["versions"]["onnxruntime"]
    assert data["machine"]["cpu_count"] >= 1
    assert "ratios (medians of this run)" in result.stdout
    assert "gateway / naive, req/s" in result.stdout and "gateway / naive, p50" in result.stdout
    assert "srv-cpu ms/1k req" in result.stdout and "mean batch" in result.stdout

    [png_path] = tmp_path.glob("bench-digits-*.png")
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_help_has_examples() -> None:
    result = gateway_bench("--help", timeout=60)
    assert result.returncode == 0
    for flag in ("--concurrency", "--rates", "--baselines", "--server-cpus", "--smoke", "--repeats"):
        assert flag in result.stdout
    assert "naive" in result.stdout  # a target of --baselines, and in its default
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
        spec = dataclasses.replace(
            SPEC,
            address=line.split()[-1],
            payload=build_request(signature, 2, pin_version=False),
            rows=2,
            outputs=signature.outputs,
            mode="open",
            offered=200.0,
            channels=2,
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
    assert quantile(ordered, 0.50) == 50
    assert quantile(ordered, 0.99) == 99
    assert quantile(ordered, 1.0) == 100
    assert quantile(ordered, 0.0) == 1
    assert quantile(ordered, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floating point
    assert quantile(np.array([7.0]), 0.99) == 7
    assert math.isnan(quantile(np.empty(0), 0.50))


def test_percentiles_come_from_all_samples_merged() -> None:
    fast = [0.001] * 990
    slow = [0.001] * 980 + [0.100] * 20  # 2% slow: this process alone has p99 = 100 ms
    merged = merge_samples([fast, slow])
    assert len(merged) == 1990 and bool(np.all(merged[:-1] <= merged[1:]))
    # 20 slow of 1990 is 1.005% > 1%: the merged p99 is slow; the mean of the per-process p99s would not be.
    assert quantile(merged, 0.99) == 0.100
    assert quantile(merged, 0.98) == 0.001


def test_merge_results_sums_processes() -> None:
    spec = dataclasses.replace(SPEC, rows=4, offered=3, duration_s=2.0, warmup_s=0.5)
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
    good = pb.ModelInferResponse.FromString(build_response(signature, 3))
    assert check_response(good, signature.outputs, 3) is None
    assert "expected 2 rows" in (check_response(good, signature.outputs, 2) or "")
    only_one = build_response(dataclasses.replace(signature, outputs=signature.outputs[:1]), 3)
    assert "missing" in (check_response(pb.ModelInferResponse.FromString(only_one), signature.outputs, 3) or "")
    short = pb.ModelInferResponse.FromString(build_response(signature, 3))
    short.raw_output_contents[0] = short.raw_output_contents[0][:-1]
    assert "bytes for" in (check_response(short, signature.outputs, 3) or "")


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


def test_naive_ratios_and_server_cpu_per_thousand_requests() -> None:
    points = [
        {**_point("naive", c, rps, p99), "server_cpu_ms_per_1k": cpu}
        for c, rps, p99, cpu in ((1, 1000.0, 2.0, 500.0), (8, 2000.0, 8.0, 400.0))
    ] + [
        {**_point("gateway", c, rps, p99), "server_cpu_ms_per_1k": cpu, "mean_batch": batch}
        for c, rps, p99, cpu, batch in ((1, 800.0, 3.0, 600.0, 1.0), (8, 3000.0, 6.0, 300.0, 2.5))
    ]
    summary = summarize(points)
    ratios = compute_ratios(summary, [1, 8], [])
    assert ratios["gateway_over_naive_rps"] == {"1": pytest.approx(0.8), "8": pytest.approx(1.5)}
    assert ratios["gateway_over_naive_p50"] == {"1": pytest.approx(1.5)}  # at c=1 only
    assert ratios["peak"]["gateway_over_naive_rps"] == pytest.approx(1.5)
    assert "gateway_over_naive_p50" not in compute_ratios(summary, [8], [])
    gateway = next(e for e in summary if e["target"] == "gateway" and e["offered"] == 8)
    assert gateway["server_cpu_ms_per_1k"]["median"] == 300.0
    text = to_text(report(summary, ratios, ["naive", "gateway"]))
    assert "gateway / naive, req/s" in text and "c=1: 0.80  c=8: 1.50" in text
    assert "gateway / naive, p50" in text
    # The gateway's table shows both its CPU per 1,000 requests and its mean batch per point.
    gateway_table = text.split("gateway: median")[1].split("ratios")[0]
    assert "srv-cpu ms/1k req" in gateway_table and "mean batch" in gateway_table
    assert "300" in gateway_table and "2.5" in gateway_table


def test_compare_two_versions_side_by_side(tmp_path: Path) -> None:
    result = gateway_bench("--compare", "1", "3", "--smoke", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version comparison" in result.stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {p["target"] for p in data["points"]} == {"v1", "v3"}
    assert all(p["completed"] > 0 and not p["errors"] for p in data["points"])
    for version in ("v1", "v3"):
        assert data["compare"][version]["throughput_at_slo_rps"] > 0
    assert data["compare"]["b_over_a_throughput_at_slo"] > 0
    assert next(tmp_path.glob("*.png")).read_bytes().startswith(b"\x89PNG")


def test_shadow_target_mirrors_everything_and_reports_its_overhead(tmp_path: Path) -> None:
    result = gateway_bench(
        *("--smoke", "--model", "digits", "--baselines", "gateway,gateway-shadow", "--shadow", "3"),
        *("--out", str(tmp_path)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    for target in ("gateway", "gateway-shadow"):
        points = [p for p in data["points"] if p["target"] == target]
        assert {p["offered"] for p in points} == {1.0, 8.0}, target
        assert all(p["completed"] > 0 and p["errors"] == {} for p in points), points
    # The shadow really ran (a stored release once replaced the temporary one and it silently did not).
    shadow_points = [p for p in data["points"] if p["target"] == "gateway-shadow"]
    assert all(p["shadow_rows_per_row"] > 0 for p in shadow_points)
    assert "shadow_rows_per_row" not in next(p for p in data["points"] if p["target"] == "gateway")
    ratios = data["ratios"]
    for key in ("shadow_over_gateway_p50", "shadow_over_gateway_p99", "shadow_rows_per_primary_row"):
        assert set(ratios[key]) == {"1", "8"}, key
        assert all(math.isfinite(v) and v > 0 for v in ratios[key].values()), key
    assert "gateway-shadow / gateway, p99" in result.stdout
    assert data["routing"]["choose_us"] > 0 and data["routing"]["route_point_us"] > 0
    assert "us per decision" in result.stdout

    missing = gateway_bench("--smoke", "--baselines", "gateway-shadow", "--out", str(tmp_path), timeout=60)
    assert missing.returncode == 2 and "--shadow" in missing.stderr


def test_routing_cost_is_measured_per_call() -> None:
    cost = routing_cost(keys=2_000, repeats=3)
    for name in ("choose_us", "route_point_us"):
        assert math.isfinite(cost[name]) and cost[name] > 0, name
        low, high = cost[f"{name}_range"]
        assert 0 < low <= cost[name] <= high
    assert cost["keys"] == 2_000 and cost["repeats"] == 3
    # The 10% canary split it times does route by the key: about 10% of 2,000 distinct keys (+-7 sd).
    assert 0.05 < cost["canary_share"] < 0.15


def test_shadow_release_replaces_the_release_and_keeps_the_rest() -> None:
    import tomllib

    text = (
        'max_batch_size = 4\n[release]\nstable = "2"\ncanary = "1"\ncanary_weight_bp = 500\n'
        "[release.extra]\na = 1\n[policy]\nthreshold = 2\n"
    )
    parsed = tomllib.loads(with_shadow_release(text, "1", "3"))
    assert parsed["release"] == {"stable": "1", "shadows": {"3": 1.0}}
    assert parsed == {"max_batch_size": 4, "policy": {"threshold": 2}, "release": parsed["release"]}
    digits = tomllib.loads(with_shadow_release((MODELS / "digits" / "model.toml").read_text(), "1", "3"))
    assert digits["release"] == {"stable": "1", "shadows": {"3": 1.0}}
    assert digits["batching"] == tomllib.loads((MODELS / "digits" / "model.toml").read_text())["batching"]
    assert tomllib.loads(with_shadow_release("", "1", "3"))["release"]["shadows"] == {"3": 1.0}
    with pytest.raises(ValueError):
        with_shadow_release('release.stable = "2"\n', "1", "3")  # dotted keys: refused, never half-applied


def test_shadow_ratios_per_closed_and_open_point() -> None:
    def entry(target: str, mode: str, offered: float, p50: float, p99: float, **extra: float) -> dict[str, object]:
        row: dict[str, object] = {"target": target, "repeat": 0, "mode": mode, "offered": offered}
        row.update(throughput_rps=1000.0, rows_per_s=1000.0, p50_ms=p50, p99_ms=p99, errors={}, completed=1, **extra)
        return row

    points = [
        entry("gateway", "closed", 16, 4.0, 8.0),
        entry("gateway-shadow", "closed", 16, 5.0, 12.0, shadow_rows_per_row=1.0),
        entry("gateway", "open", 1600, 1.0, 2.0),
        entry("gateway-shadow", "open", 1600, 1.1, 3.0, shadow_rows_per_row=0.5),
    ]
    summary = summarize(points)
    ratios = compute_ratios(summary, [16], [1600.0])
    assert ratios["shadow_over_gateway_p50"] == {"16": pytest.approx(1.25), "r=1600": pytest.approx(1.1)}
    assert ratios["shadow_over_gateway_p99"] == {"16": pytest.approx(1.5), "r=1600": pytest.approx(1.5)}
    assert ratios["shadow_rows_per_primary_row"] == {"16": 1.0, "r=1600": 0.5}
    text = to_text(report(summary, ratios, ["gateway", "gateway-shadow"]))
    assert "c=16: 1.25  r=1600: 1.10" in text and "c=r=" not in text


def test_report_warns_about_points_other_processes_disturbed() -> None:
    quiet = {**_point("gateway", 16, 3000.0, 8.0), "other_cpu_share": 0.01}
    noisy = {**_point("gateway", 64, 2000.0, 30.0), "other_cpu_share": 0.4}
    summary = summarize([quiet, noisy])
    text = to_text(report(summary, {}, ["gateway"]))
    assert "WARNING: other processes were busy" in text
    assert "gateway c=64 (up to 40%)" in text and "c=16 (" not in text
    assert "WARNING" not in to_text(report(summarize([quiet]), {}, ["gateway"]))


def test_gateway_bench_says_so_without_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    # An installed gateway without the source tree: one clear line, exit 1, nothing run.
    monkeypatch.setattr(bench_command, "checkout_root", lambda: None)
    result = CliRunner().invoke(bench_command.bench, ["--smoke"])
    assert result.exit_code == 1
    assert "runs the load tests of the source checkout" in result.output and "loadtests/bench" in result.output


def test_gateway_never_imports_the_load_tests() -> None:
    # `gateway bench` runs them as a program of their own; the package itself never imports them.
    code = (
        "import sys, gateway.cli.main, gateway.server.gateway; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'loadtests'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_naive_server_answers_what_onnxruntime_computes(loop: str) -> None:
    import onnxruntime as ort
    import tritonclient.grpc as tc

    signature = load_signature(MODELS, "digits")
    command = [sys.executable, "-m", "loadtests.naive_server", "--models", str(MODELS), "--model", "digits"]
    command += ["--port", "0", "--workers", "2", "--intra-op-threads", "1", "--loop", loop]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        assert len(_children(proc.pid)) == 1  # --workers 2: one more process on the same port
        pixels = np.random.default_rng(3).random((3, 64), dtype=np.float32)
        client = tc.InferenceServerClient(line.split()[-1])
        try:
            inputs = [tc.InferInput("pixels", [3, 64], "FP32")]
            inputs[0].set_data_from_numpy(pixels)
            result = client.infer("digits", inputs)
        finally:
            client.close()
    finally:
        proc.terminate()
        code = proc.wait(20)
    assert code == 0  # SIGTERM: a clean stop, its worker stopped with it

    answer = pb.ModelInferResponse.FromString(result.get_response().SerializeToString())
    assert check_response(answer, signature.outputs, 3) is None
    session = ort.InferenceSession(str(signature.path), providers=["CPUExecutionProvider"])
    probabilities, labels = session.run(["probabilities", "label"], {"pixels": pixels})
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    assert result.as_numpy("label").dtype == np.int64


def test_the_bench_runs_beside_a_gateway_holding_the_default_ports(tmp_path: Path) -> None:
    # A gateway already serving on this machine holds the default ports; the bench's own
    # gateways must take none of them (the dashboard's 8004 once failed every target's start).
    with contextlib.ExitStack() as stack:
        for port in (8000, 8002, 8003, 8004):
            holder = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):  # already held by something else: the same test
                holder.bind(("127.0.0.1", port))
                holder.listen(1)
        result = gateway_bench("--smoke", "--baselines", "gateway", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_executor_target_reports_mean_batch_and_busy_share(tmp_path: Path) -> None:
    # Executors on against off at the same worker count: gateway-exec is `gateway serve --executors 1`.
    result = gateway_bench(
        *("--smoke", "--model", "mlp", "--workers", "2", "--baselines", "gateway,gateway-exec"),
        *("--out", str(tmp_path)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    exec_points = [p for p in data["points"] if p["target"] == "gateway-exec"]
    assert {p["offered"] for p in exec_points} == {1.0, 8.0}
    for point in exec_points:
        assert point["completed"] > 0 and point["errors"] == {}, point
        # Rows per model run, from the executor's counts (every worker's requests): at least one row a run,
        # at most what was in flight.
        assert 1.0 <= point["mean_batch"] <= point["offered"], point
        # The executor's time in model runs over the window: it ran something, and no more than the window.
        assert 0.0 < point["executor_busy_share"] <= 1.05, point
    # In-process batching has no executor, so no busy share.
    assert not any("executor_busy_share" in p for p in data["points"] if p["target"] == "gateway")
    exec_summary = [e for e in data["summary"] if e["target"] == "gateway-exec"]
    assert all(e["executor_busy_share"]["median"] > 0 for e in exec_summary)
    ratios = data["ratios"]
    for key in ("exec_over_gateway_rps", "exec_over_gateway_p50", "exec_over_gateway_p99"):
        assert set(ratios[key]) == {"1", "8"}, key
        assert all(math.isfinite(v) and v > 0 for v in ratios[key].values()), key
    assert "exec busy" in result.stdout and "gateway-exec / gateway, req/s" in result.stdout
    assert "gateway-exec: one executor process for 2 worker(s)" in result.stdout


def test_executor_target_runs_one_executor_and_the_others_none(tmp_path: Path) -> None:
    from loadtests.bench.cli import BenchOptions
    from loadtests.bench.targets import gateway_command

    def flag(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    config = BenchOptions(models=MODELS, workers=2, server_cpus="0", client_cpus="0").resolve()
    in_process = gateway_command(config, batching=True, state_dir=tmp_path)
    executor = gateway_command(config, batching=True, state_dir=tmp_path, executor=True)
    # `auto` would start an executor on a GPU host: the in-process targets say off.
    assert flag(in_process, "--executors") == "off" and flag(executor, "--executors") == "1"
    assert flag(in_process, "--workers") == flag(executor, "--workers") == "2"
    # --exec-workers: the executor's front ends only (the GPU bench's 12 workers against 1 in-process).
    apart = BenchOptions(models=MODELS, workers=1, exec_workers=12, server_cpus="0", client_cpus="0").resolve()
    assert flag(gateway_command(apart, batching=True, state_dir=tmp_path), "--workers") == "1"
    assert flag(gateway_command(apart, batching=True, state_dir=tmp_path, executor=True), "--workers") == "12"


def test_executor_ratios_and_busy_column() -> None:
    points = [
        {**_point("gateway", 64, 1000.0, 20.0), "mean_batch": 4.0},
        {**_point("gateway-exec", 64, 1500.0, 10.0), "mean_batch": 24.0, "executor_busy_share": 0.5},
    ]
    summary = summarize(points)
    ratios = compute_ratios(summary, [64], [])
    assert ratios["exec_over_gateway_rps"] == {"64": pytest.approx(1.5)}
    assert ratios["exec_over_gateway_p99"] == {"64": pytest.approx(0.5)}
    assert ratios["exec_over_gateway_batch"] == {"64": pytest.approx(6.0)}
    text = to_text(report(summary, ratios, ["gateway", "gateway-exec"]))
    gateway_table, exec_table = text.split("gateway-exec: median")[0], text.split("gateway-exec: median")[1]
    assert "exec busy" not in gateway_table
    assert "exec busy" in exec_table.split("ratios")[0] and "50%" in exec_table
    assert "gateway-exec / gateway, mean batch" in text and "c=64: 6.0" in text
