"""Rollouts that finish, on real gateways with real gRPC traffic (issue 22).

Each test starts `gateway serve` on port 0, drives it with client threads
(tests/traffic.py) and rolls out a candidate under the default policy, but
for short intervals: an identical copy of v1 is promoted through every
default step, each step held for its own minimum; a slower copy is rolled
back on latency; a copy 2 points less accurate is rolled back on labels that
arrive after the answers, within 2,000 labelled rows of each arm; a
candidate that slows down only once it serves more than 25 % of the
traffic is caught at the 50 % step; and a rollout whose checks
cannot decide in max_duration_s pauses (the default), rolls back or promotes
as `on_timeout` says, and `gateway status` names what it waits for.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.routing import route_point
from tests.onnx_models import write_less_accurate_copy, write_slowed_copy, write_spin_model
from tests.support import MODELS, ROOT, Process, gateway_command, gateway_process
from tests.traffic import Load, digits_builder

# The default policy, but for short intervals (and max_duration_s, so a stuck test ends).
SHORT = """
[policy]
interval_s = 0.5
step_min_duration_s = 1
max_duration_s = 150
"""
DONE = ("succeeded", "rolled_back", "paused")


def digits_repo(root: Path, policy: str, name: str = "digits") -> Path:
    shutil.copytree(MODELS / "digits", root / name)
    spec = root / name / "model.toml"
    spec.write_text(spec.read_text() + policy)
    return root / name


def control_stub(server: Process) -> rgrpc.ReleaseServiceStub:
    return rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))


def wait_phase(control: rgrpc.ReleaseServiceStub, model: str, phases: tuple[str, ...], timeout: float) -> rpb.Release:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        release = control.GetRelease(rpb.GetReleaseRequest(model=model), timeout=10)
        if release.phase in phases:
            return release
        time.sleep(0.2)
    raise AssertionError(f"{model} did not reach {phases} in {timeout:g} s: {audit_lines(control, model)}")


def audit(control: rgrpc.ReleaseServiceStub, model: str) -> list[rpb.AuditRecord]:
    return list(control.GetAuditLog(rpb.GetAuditLogRequest(model=model, limit=1000), timeout=10).records)


def audit_lines(control: rgrpc.ReleaseServiceStub, model: str) -> list[str]:
    return [f"{r.action} by {r.actor}: {r.reason}" for r in audit(control, model)]


def checks_of(record: rpb.AuditRecord) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in json.loads(record.evidence_json or "[]")}


def test_an_identical_copy_is_promoted_through_every_default_step_each_held_for_its_minimum(tmp_path: Path) -> None:
    model_dir = digits_repo(tmp_path / "repo", SHORT)
    shutil.copytree(model_dir / "1", model_dir / "4")  # byte-identical to v1: an A/A rollout
    with gateway_process("--models", str(tmp_path / "repo"), "--workers", "1") as server:
        control = control_stub(server)
        with Load(server.address, server.control, "digits", digits_builder(), clients=3) as load:
            started = time.monotonic()
            control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="4", reason="A/A"))
            done = wait_phase(control, "digits", DONE, timeout=140)
            took = time.monotonic() - started
        records = audit(control, "digits")
        assert done.phase == "succeeded" and done.stable == "4", audit_lines(control, "digits")
        assert not [r for r in records if r.action == "failed_check"], audit_lines(control, "digits")
        start = next(r for r in records if r.action == "start_rollout")
        steps = [start, *(r for r in records if r.action == "advance")]
        assert [json.loads(r.after_json)["canary_weight_bp"] for r in steps] == [100, 500, 1000, 2500, 5000, 10_000]
        for began, ended in itertools.pairwise(steps):
            # Every step held for at least its minimum, on its own traffic.
            assert ended.at - began.at >= 1.0, (began.action, ended.action, ended.at - began.at)
            checks = checks_of(ended)
            assert checks["step_requests"]["value"] >= 200 and checks["step_duration_s"]["value"] >= 1.0
        last = checks_of(steps[-1])
        canary_requests = last["error_rate"]["samples"]
        assert isinstance(canary_requests, int) and canary_requests <= 5000, canary_requests
        print(f"A/A promoted in {took:.1f} s, {canary_requests} canary requests of {load.sent} sent")


def per_iteration_seconds(v1: Path, tmp: Path, iterations: int = 2000) -> float:
    """What one padding MatMul costs on this machine (a slowed copy against v1, in-process).

    The fastest of many runs: on a shared machine the median carried other work
    (it varied threefold between runs), which made the candidate far less slow than meant."""
    write_slowed_copy(v1, tmp / "probe.onnx", iterations)
    x = np.load(MODELS / "digits" / "heldout.npz")["X"][:1]
    times = []
    for path in (v1, tmp / "probe.onnx"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runs = []
        for _ in range(40):
            begin = time.perf_counter()
            session.run(None, {"pixels": x})
            runs.append(time.perf_counter() - begin)
        times.append(min(runs))
    return max(1e-8, (times[1] - times[0]) / iterations)


def inline(model_dir: Path) -> None:
    """Every version of the model runs inline: a slowed copy would otherwise run on threads
    (chosen from its warm-up time), and the hand-off alone changes its latency far more than
    the extra work does."""
    spec = model_dir / "model.toml"
    text = spec.read_text()
    assert "default_timeout_us = 0\n" in text
    spec.write_text(text.replace("default_timeout_us = 0\n", 'default_timeout_us = 0\nexecution = "inline"\n', 1))


def test_a_candidate_thirty_percent_slower_at_p99_is_rolled_back_on_latency(tmp_path: Path) -> None:
    model_dir = digits_repo(tmp_path / "repo", SHORT)
    inline(model_dir)
    per_iteration_s = per_iteration_seconds(model_dir / "1" / "model.onnx", tmp_path)  # before any load
    with gateway_process("--models", str(tmp_path / "repo"), "--workers", "1") as server:
        control = control_stub(server)
        with Load(server.address, server.control, "digits", digits_builder(), clients=3):
            time.sleep(3)
            report = control.GetReport(rpb.GetReportRequest(model="digits"), timeout=10)
            p99_s = next(v.p99_ms for v in report.versions if v.version == "1") / 1000
            # The slower candidate: v1 plus a MatMul chain worth 30 % of v1's p99 under this load.
            iterations = max(1, round(0.3 * p99_s / per_iteration_s))
            extra_ms = iterations * per_iteration_s * 1e3
            print(f"v1 p99 {p99_s * 1e3:.2f} ms; candidate +{extra_ms:.2f} ms a run ({iterations} MatMuls)")
            write_slowed_copy(model_dir / "1" / "model.onnx", model_dir / "5" / "model.onnx", iterations)
            control.LoadModel(rpb.ModelRequest(model="digits"), timeout=60)
            started = time.monotonic()
            control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="5", reason="slower"))
            done = wait_phase(control, "digits", DONE, timeout=120)
            took = time.monotonic() - started
            report = control.GetReport(rpb.GetReportRequest(model="digits"), timeout=10)
        by_version = {v.version: v for v in report.versions}
        ratio = by_version["5"].p99_ms / by_version["1"].p99_ms
        assert done.phase == "rolled_back", audit_lines(control, "digits")
        last = audit(control, "digits")[-1]
        assert (last.action, last.actor) == ("rollback", "controller")
        failed = [name for name, c in checks_of(last).items() if c["verdict"] == "fail"]
        assert failed and all("latency" in name for name in failed), checks_of(last)
        canary = checks_of(last)["error_rate"]["samples"]
        print(f"rolled back in {took:.1f} s, {canary} canary requests; measured p99 x{ratio:.2f}; failed: {failed}")
        print({name: (c["verdict"], c["value"], c["samples"]) for name, c in checks_of(last).items()})


SPIN_SPEC = """max_batch_size = 8
[batching]
max_queue_delay_us = 0
[compare]
kind = "regression"
[release]
stable = "1"
[policy]
interval_s = 0.5
step_weights = [10, 25, 50]
min_samples = 100
step_min_samples = 100
step_min_duration_s = 1
max_duration_s = 150
# Twice the stable's latency is the bound: this test is about where a slowdown shows (only at the
# 50 % step), not how small a one the paired check resolves (the 30 %-slower test's question). Two
# identical runs of a few microseconds differ by whole scheduler time slices on a loaded machine,
# and against a bound of 1.2 their paired CS took minutes to clear it; the spinning candidate
# measures several times the stable's latency at the 50 % step.
max_latency_ratio = 2
"""
SLOW_SPIN = 1500  # loop iterations on the candidate for the keys that reach it only above 25 %


def spin_builder(request_id: str, key: str) -> tuple[service_pb2.ModelInferRequest, list[float] | None]:
    """Keys routed to the canary only above 25 % of traffic ask for a long loop: the stable
    (trip_scale 0) ignores it, the candidate (trip_scale 1) runs it. A candidate slower only
    under a larger share of the traffic."""
    request = service_pb2.ModelInferRequest(model_name="spin", id=request_id)
    request.parameters["routing_key"].string_param = key
    spin = SLOW_SPIN if 0.25 <= route_point(key) < 0.5 else 0
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), 0.1, np.float32).tobytes())
    request.inputs.add(name="spin", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.array([[spin]], np.int64).tobytes())
    return request, None


def test_a_candidate_slower_only_above_25_percent_is_caught_at_the_50_percent_step(tmp_path: Path) -> None:
    write_spin_model(tmp_path / "spin" / "1" / "model.onnx", trip_scale=0)
    write_spin_model(tmp_path / "spin" / "2" / "model.onnx", trip_scale=1)
    (tmp_path / "spin" / "model.toml").write_text(SPIN_SPEC)
    with gateway_process("--models", str(tmp_path), "--workers", "1") as server:
        control = control_stub(server)
        with Load(server.address, server.control, "spin", spin_builder, clients=3):
            control.StartRollout(rpb.StartRolloutRequest(model="spin", candidate="2", reason="slow under load"))
            done = wait_phase(control, "spin", DONE, timeout=140)
        records = audit(control, "spin")
        assert done.phase == "rolled_back", [f"{r.action}: {r.reason}" for r in records]
        advances = [json.loads(r.after_json)["canary_weight_bp"] for r in records if r.action == "advance"]
        assert advances == [2500, 5000]  # the 10 % and 25 % steps passed
        last = records[-1]
        assert last.action == "rollback" and json.loads(last.before_json)["canary_weight_bp"] == 5000
        failed = [name for name, c in checks_of(last).items() if c["verdict"] == "fail"]
        assert failed and all("latency" in name for name in failed), checks_of(last)


def test_a_two_point_accuracy_drop_is_rolled_back_within_2000_labelled_rows_an_arm(tmp_path: Path) -> None:
    # The acceptance run's policy: a drop of more than half a point is a regression.
    model_dir = digits_repo(tmp_path / "repo", SHORT + "max_accuracy_drop = 0.005\n")
    heldout = MODELS / "digits" / "heldout.npz"
    drop = write_less_accurate_copy(model_dir / "1" / "model.onnx", model_dir / "6" / "model.onnx", 2.0, heldout)
    assert 0.019 < drop < 0.03, drop
    with gateway_process("--models", str(tmp_path / "repo"), "--workers", "1") as server:
        control = control_stub(server)
        build = digits_builder(rows=16, seed=7)
        # Two clients leave the idle time the canary's copies on the stable version run in: with
        # three saturating CI's two cores, copies were dropped and labels went unpaired.
        with Load(server.address, server.control, "digits", build, clients=2, label_delay_s=0.5):
            control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="6", reason="-2 points"))
            done = wait_phase(control, "digits", DONE, timeout=120)
        records = audit(control, "digits")
        assert done.phase == "rolled_back", audit_lines(control, "digits")
        rollback = records[-1]
        checks = checks_of(rollback)
        failed = {name for name, c in checks.items() if c["verdict"] == "fail"}
        # The paired check decided: the two versions' answers on the same labelled rows.
        assert failed & {"accuracy_paired", "step_accuracy_paired"}, (failed, rollback.reason)
        assert not failed & {"error_rate", "latency_paired", "latency_p90"}, failed
        paired = checks["accuracy_paired"]
        assert paired["value"] < -0.01 and paired["high"] < -0.005, paired
        # Labelled rows of each arm when it was rolled back (all at the first, 1 % step).
        labelled_per_arm = checks["accuracy"]["samples"]
        assert 0 < paired["samples"] <= labelled_per_arm <= 2000, (paired, checks["accuracy"])
        assert json.loads(rollback.before_json)["canary_weight_bp"] == 100
        print(f"-2 points rolled back: {labelled_per_arm} labelled rows an arm, {paired['samples']} paired")


def timeout_policy(on_timeout: str) -> str:
    """Accuracy needs labels, and none are sent: it can never decide, and nothing fails.
    An empty `on_timeout` leaves the setting out (the default)."""
    setting = f'on_timeout = "{on_timeout}"\n' if on_timeout else ""
    return (
        "\n[policy]\ninterval_s = 0.5\nstep_min_duration_s = 0.5\nmax_duration_s = 3\nmax_accuracy_drop = 0.01\n"
        + setting
    )


def cli(server: Process, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command(*args, "--control", server.control), capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_each_on_timeout_behaviour_and_the_default_pause_says_why_in_status(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models = {"hold": "", "back": "rollback", "ship": "promote"}  # "": the default (pause)
    for name, on_timeout in models.items():
        digits_repo(repo, timeout_policy(on_timeout), name)
    with gateway_process("--models", str(repo), "--workers", "1") as server:
        control = control_stub(server)
        loads = [Load(server.address, server.control, m, digits_builder(m), clients=1).start() for m in models]
        try:
            for name in models:
                control.StartRollout(rpb.StartRolloutRequest(model=name, candidate="2", reason="no labels"))
            outcomes = {name: wait_phase(control, name, DONE, timeout=30) for name in models}
            assert {n: r.phase for n, r in outcomes.items()} == {
                "hold": "paused",
                "back": "rolled_back",
                "ship": "succeeded",
            }
            assert outcomes["ship"].stable == "2" and outcomes["back"].stable == "1"
            for name, setting in (("back", "rollback"), ("ship", "promote")):
                last = audit(control, name)[-1]
                assert last.actor == "controller" and f"on_timeout = {setting}" in last.reason, last.reason

            paused = audit(control, "hold")[-1]
            assert (paused.action, paused.actor) == ("pause", "controller")
            assert "no decision within max_duration (3 s)" in paused.reason and "accuracy" in paused.reason
            accuracy = checks_of(paused)["accuracy"]
            assert accuracy["verdict"] == "inconclusive" and accuracy["needed"] == 200  # min_samples, no labels yet

            status = cli(server, "status")
            assert status.returncode == 0, status.stderr
            text = status.stdout
            assert "rollout paused" in text and "pause by controller" in text, text
            assert "no decision within max_duration (3 s)" in text and "on_timeout = pause" in text, text
            accuracy_line = next(line for line in text.splitlines() if line.strip().startswith("accuracy "))
            assert "inconclusive" in accuracy_line and "more" in accuracy_line, text
            report = cli(server, "report", "hold", "--json")
            view = json.loads(report.stdout)["rollout"]
            assert view["phase"] == "paused" and any(c["check"] == "accuracy" for c in view["checks"])

            resumed = cli(server, "rollout", "resume", "hold", "--reason", "looked: go on")
            assert resumed.returncode == 0, resumed.stderr
            time.sleep(1.5)  # under max_duration_s: the resume restarted its clock
            assert control.GetRelease(rpb.GetReleaseRequest(model="hold")).phase == "progressing"
            assert wait_phase(control, "hold", ("paused",), timeout=10).phase == "paused"
        finally:
            for load in loads:
                load.stop()
