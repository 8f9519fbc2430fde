"""Approval gates and waiting for a rollout (issue 18, items 2 and 4), on real gateways.

A rollout with `approve_before = [25, "promote"]` stops at 10 % until a person with
a write token approves, then at 25 % until approved again, and the audit names
who approved and why; a rollout waiting at a gate whose candidate turns bad is
still rolled back; `gateway rollout start --wait` and `gateway rollout wait` (the
CLI as a subprocess) exit 0 on promotion, 1 on rollback and 5 on timeout, and
`--json` writes one typed event a line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.support import MODELS, ROOT, Process, gateway_command, gateway_process
from tests.traffic import Load, digits_builder

WRITE = "gates-write-token-0123456789"
READ = "gates-read-token-0123456789"
TOKENS = f"alice:write:{WRITE},bob:read:{READ}"
AS_ALICE = (("authorization", f"Bearer {WRITE}"),)
AS_BOB = (("authorization", f"Bearer {READ}"),)
EXPOSURE = ("step_requests", "step_duration_s")

# Short: labelled 16-row requests decide accuracy and errors in a few seconds a step.
# Latency is off (timing on a shared CI box is noise); v2 (the MLP) is the better model.
POLICY = """
[policy]
interval_s = 0.3
step_weights = [10, 25]
threshold = 1
min_samples = 100
max_latency_ratio = 0
max_error_increase = 0.05
max_accuracy_drop = 0.02
max_duration_s = 120
step_min_samples = 50
step_min_duration_s = 0.5
"""


def repo_with(root: Path, models: dict[str, str]) -> Path:
    """A repository of digits copies, each with POLICY and its own extra policy lines."""
    for name, extra in models.items():
        shutil.copytree(MODELS / "digits", root / name)
        spec = root / name / "model.toml"
        spec.write_text(spec.read_text() + POLICY + extra)
    return root


@pytest.fixture
def server_for(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Process]]:
    """Start one gateway with tokens over a repository of the given models."""
    started: list[Any] = []

    def start(models: dict[str, str]) -> Process:
        repo = repo_with(tmp_path / "repo", models)
        args = ("--models", str(repo), "--workers", "1", "--metrics-port", "0", "--dashboard-port", "0")
        context = gateway_process(*args, env={"GATEWAY_CONTROL_TOKENS": TOKENS})
        started.append(context)
        return context.__enter__()

    yield start
    for context in started:
        context.__exit__(None, None, None)


def cli_env(server: Process, token: str | None) -> dict[str, str]:
    env = {**os.environ, "GATEWAY_CONTROL": server.control, "COLUMNS": "200"}
    env.pop("GATEWAY_TOKEN", None)
    if token is not None:
        env["GATEWAY_TOKEN"] = token
    return env


def cli(
    server: Process, *args: str, token: str | None = WRITE, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=cli_env(server, token)
    )


def cli_background(server: Process, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        gateway_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=cli_env(server, WRITE),
    )


def control(server: Process) -> rgrpc.ReleaseServiceStub:
    return rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))


def release(server: Process, model: str) -> rpb.Release:
    return control(server).GetRelease(rpb.GetReleaseRequest(model=model), metadata=AS_ALICE, timeout=10)


def audit(server: Process, model: str) -> list[rpb.AuditRecord]:
    request = rpb.GetAuditLogRequest(model=model, limit=1000)
    return list(control(server).GetAuditLog(request, metadata=AS_ALICE, timeout=10).records)


def story(server: Process, model: str) -> list[str]:
    return [f"{r.action} {r.outcome} by {r.actor}: {r.reason}" for r in audit(server, model)]


def wait_for(
    server: Process, model: str, done: Callable[[rpb.Release], bool], timeout: float, what: str
) -> rpb.Release:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = release(server, model)
        if done(current):
            return current
        time.sleep(0.2)
    raise AssertionError(f"{model}: {what} not within {timeout:g} s: {release(server, model)} {story(server, model)}")


def events(output: str) -> list[dict[str, Any]]:
    """`--json` output: every line one JSON object with an `event` and an RFC 3339 `at`."""
    parsed = [json.loads(line) for line in output.splitlines() if line.strip()]
    for event in parsed:
        assert event["event"] in ("change", "assessment", "result"), event
        assert event["at"].endswith("Z") and datetime.fromisoformat(event["at"].replace("Z", "+00:00")), event
    return parsed


def metric_soon(server: Process, line: str, timeout: float = 10.0) -> bool:
    """Whether `line` appears in the gateway's /metrics within `timeout` (they are synced each sample)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{server.launched.metrics_port}/metrics", timeout=10).text
        if line in text:
            return True
        time.sleep(0.3)
    return False


def labelled_load(server: Process, model: str) -> Load:
    return Load(
        server.address,
        server.control,
        model,
        digits_builder(model, rows=16, seed=3),
        clients=2,
        label_delay_s=0.2,
        metadata=AS_ALICE,
    )


def test_a_gated_rollout_stops_at_each_gate_until_approved_and_the_audit_names_who(
    server_for: Callable[[dict[str, str]], Process],
) -> None:
    server = server_for({"digits": 'approve_before = [25, "promote"]\n', "held": 'approve_before = ["start"]\n'})
    with labelled_load(server, "digits"):
        waiting = cli_background(server, "rollout", "start", "digits", "2", "--reason", "v2 MLP", "--wait", "--json")
        try:
            at_gate = wait_for(server, "digits", lambda r: r.awaiting_approval == "25", 60, "waiting at 25 %")
            assert (at_gate.phase, at_gate.step, at_gate.canary, at_gate.canary_weight_bp) == (
                "progressing",
                0,
                "2",
                1000,
            )
            time.sleep(1.5)  # five intervals: passing checks alone do not move it past the gate
            held = release(server, "digits")
            assert (held.awaiting_approval, held.step, held.canary_weight_bp) == ("25", 0, 1000), story(
                server, "digits"
            )

            status = cli(server, "status", token=READ)
            assert status.returncode == 0, status.stderr
            assert "awaiting approval before 25%" in status.stdout, status.stdout
            assert "gateway rollout approve digits" in status.stdout, status.stdout
            report = cli(server, "report", "digits", "--json", token=READ)
            data = json.loads(report.stdout)
            assert data["release"]["awaiting_approval"] == "25"
            assert data["rollout"]["awaiting_approval"] == "25" and data["rollout"]["next"] == "await_approval"

            # The dashboard (any role may read) and the metrics say so too.
            dashboard = httpx.get(
                server.dashboard + "api/models/digits", headers={"authorization": f"Bearer {READ}"}, timeout=10
            ).json()
            assert dashboard["snapshot"]["awaiting_approval"] == "25", dashboard["snapshot"]
            assert metric_soon(server, 'gateway_rollout_awaiting_approval{model="digits",version="2"} 1.0')

            # A second watcher gives up after its timeout, saying where the rollout waits.
            timed_out = cli(server, "rollout", "wait", "digits", "--timeout", "1", token=READ)
            assert timed_out.returncode == 5, (timed_out.stdout, timed_out.stderr)
            assert "timed out" in timed_out.stderr and "awaiting approval before 25%" in timed_out.stderr

            # Approving takes the write role, and a reason.
            stub = control(server)
            with pytest.raises(grpc.RpcError) as denied:
                stub.Approve(rpb.ModelActionRequest(model="digits", reason="ok"), metadata=AS_BOB, timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as no_reason:
                stub.Approve(rpb.ModelActionRequest(model="digits", reason=" "), metadata=AS_ALICE, timeout=10)
            assert no_reason.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "reason is empty" in (no_reason.value.details() or "")

            approved = cli(server, "rollout", "approve", "digits", "--reason", "10% dashboards look fine")
            assert approved.returncode == 0, approved.stderr
            at_promote = wait_for(
                server, "digits", lambda r: r.awaiting_approval == "promote", 60, "waiting to promote"
            )
            assert (at_promote.step, at_promote.canary_weight_bp) == (1, 2500)
            approved = cli(server, "rollout", "approve", "digits", "--reason", "25% fine too: ship it")
            assert approved.returncode == 0, approved.stderr
            out, err = waiting.communicate(timeout=60)
        finally:
            waiting.kill()
    assert waiting.returncode == 0, (out, err)
    done = release(server, "digits")
    assert (done.phase, done.stable, done.canary, done.awaiting_approval) == ("succeeded", "2", "", "")

    records = audit(server, "digits")
    actions = [(r.action, r.actor) for r in records if r.action not in ("init",)]
    assert actions == [
        ("start_rollout", "alice"),
        ("await_approval", "controller"),
        ("approve", "alice"),
        ("advance", "controller"),
        ("await_approval", "controller"),
        ("approve", "alice"),
        ("advance", "controller"),
        ("promote", "controller"),
    ], story(server, "digits")
    approvals = [r for r in records if r.action == "approve"]
    assert [r.reason for r in approvals] == ["10% dashboards look fine", "25% fine too: ship it"]
    assert [json.loads(r.before_json)["rollout"]["awaiting"] for r in approvals] == ["25", "promote"]
    gates = [r for r in records if r.action == "await_approval"]
    for gate in gates:
        # It waits only where it would have moved on: every check the move needs passed (the
        # whole rollout's checks and the step's exposure), and none failed.
        checks = json.loads(gate.evidence_json)
        deciding = [c for c in checks if not c["check"].startswith("step_") or c["check"] in EXPOSURE]
        assert {c["verdict"] for c in deciding} == {"pass"} and "fail" not in {c["verdict"] for c in checks}, checks
    advance = next(r for r in records if r.action == "advance")
    assert advance.at > approvals[0].at and json.loads(advance.after_json)["canary_weight_bp"] == 2500

    # The watcher's JSON: every change in order, typed, and the result.
    stream = events(out)
    changes = [e for e in stream if e["event"] == "change"]
    assert [e["action"] for e in changes] == [a for a, _ in actions]
    assert all(isinstance(e["canary_weight_percent"], int | float) for e in changes)
    assert [e["awaiting_approval"] for e in changes if e["action"] == "await_approval"] == ["25", "promote"]
    assert any(e["event"] == "assessment" and e["awaiting_approval"] == "25" for e in stream)
    assert stream[-1]["event"] == "result"
    assert (stream[-1]["result"], stream[-1]["exit_code"], stream[-1]["stable"]) == ("promoted", 0, "2")

    # Nothing waits now: an approval is refused, and audited.
    again = cli(server, "rollout", "approve", "digits", "--reason", "once more")
    assert again.returncode == 1 and "digits is not awaiting approval" in again.stderr, again.stderr
    with pytest.raises(grpc.RpcError) as refused:
        control(server).Approve(rpb.ModelActionRequest(model="digits", reason="x"), metadata=AS_ALICE, timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [(r.action, r.outcome) for r in audit(server, "digits")][-2:] == [("approve", "refused")] * 2

    # A start gate with no shadow phase: the canary waits at 0 % until approved.
    started = cli(server, "rollout", "start", "held", "2", "--reason", "held at the start")
    assert started.returncode == 0, started.stderr
    assert "awaiting approval before the first traffic step" in started.stdout, started.stdout
    first = release(server, "held")
    assert (first.phase, first.canary, first.canary_weight_bp, first.awaiting_approval) == (
        "progressing",
        "2",
        0,
        "start",
    )
    opened = control(server).Approve(rpb.ModelActionRequest(model="held", reason="go"), metadata=AS_ALICE, timeout=10)
    assert (opened.canary_weight_bp, opened.awaiting_approval, opened.step) == (1000, "", 0)
    assert [r.action for r in audit(server, "held")][-3:] == ["start_rollout", "await_approval", "approve"]


class RelabellingTraffic:
    """Labelled traffic whose labels can turn against the canary: after `turn()`, every
    row the canary answered is labelled one class off its answer, and every row the stable
    answered is labelled as it answered. Late ground truth that shows a candidate wrong."""

    def __init__(self, server: Process, model: str) -> None:
        data = np.load(MODELS / "digits" / "heldout.npz")
        self.x, self.y = data["X"], data["y"]
        self.server, self.model = server, model
        self.turned = threading.Event()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]

    def __enter__(self) -> RelabellingTraffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)

    def _run(self, index: int) -> None:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(self.server.address))
        labeller = control(self.server)
        rng = np.random.default_rng(index)
        count = 0
        while not self.stop.is_set():
            rows = rng.integers(0, len(self.x), 16)
            request_id = f"t{index}-{count}"
            count += 1
            request = service_pb2.ModelInferRequest(model_name=self.model, id=request_id)
            request.parameters["routing_key"].string_param = request_id
            request.inputs.add(name="pixels", datatype="FP32", shape=[16, 64])
            request.raw_input_contents.append(self.x[rows].tobytes())
            try:
                response = infer.ModelInfer(request, timeout=10)
            except grpc.RpcError:
                continue
            labels = self.y[rows].astype(float)
            if self.turned.is_set():
                index_of = [o.name for o in response.outputs].index("probabilities")
                answers = np.frombuffer(response.raw_output_contents[index_of], np.float32).reshape(16, -1).argmax(1)
                canary = response.parameters["role"].string_param == "canary"
                labels = ((answers + 1) % 10 if canary else answers).astype(float)
            feedback = rpb.SubmitFeedbackRequest(
                model=self.model, items=[rpb.Feedback(request_id=request_id, labels=labels.tolist())]
            )
            try:
                labeller.SubmitFeedback(feedback, metadata=AS_ALICE, timeout=10)
            except grpc.RpcError:
                continue


def test_a_rollout_waiting_at_a_gate_still_rolls_back_and_wait_exits_1_then_5(
    server_for: Callable[[dict[str, str]], Process],
) -> None:
    server = server_for({"digits": "approve_before = [25]\n", "quiet": "approve_before = [25]\n"})
    with RelabellingTraffic(server, "digits") as traffic:
        assert cli(server, "rollout", "start", "digits", "2", "--reason", "v2").returncode == 0
        wait_for(server, "digits", lambda r: r.awaiting_approval == "25", 60, "waiting at 25 %")
        watcher = cli_background(server, "rollout", "wait", "digits", "--timeout", "60")
        try:
            traffic.turned.set()  # from here the labels say the candidate is wrong
            done = wait_for(server, "digits", lambda r: r.phase == "rolled_back", 60, "the rollback")
            out, err = watcher.communicate(timeout=30)
        finally:
            watcher.kill()
    assert (done.stable, done.canary, done.canary_weight_bp) == ("1", "", 0)
    last = audit(server, "digits")[-1]
    assert (last.action, last.actor) == ("rollback", "controller"), story(server, "digits")
    # Rolled back while it waited at the gate, never having moved past it.
    before = json.loads(last.before_json)
    assert (before["rollout"]["awaiting"], before["canary_weight_bp"]) == ("25", 1000)
    failed = {c["check"] for c in json.loads(last.evidence_json) if c["verdict"] == "fail"}
    assert failed & {"accuracy", "step_accuracy"}, last.evidence_json
    assert "approve" not in [r.action for r in audit(server, "digits")]
    assert watcher.returncode == 1, (out, err)
    assert "await_approval" in out and "rollback" in out and "rolled back: digits stable 1" in out, out

    # An ended rollout answers at once, with its outcome.
    after = cli(server, "rollout", "wait", "digits", "--json", token=READ)
    assert after.returncode == 1 and events(after.stdout)[-1]["result"] == "rolled_back", after.stdout

    # v3, the degraded version, with --wait: rolled back at its first step, exit 1.
    with labelled_load(server, "digits"):
        bad = cli(server, "rollout", "start", "digits", "3", "--reason", "v3", "--wait", "--timeout", "60", timeout=90)
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert "start_rollout" in bad.stdout and "rolled back: digits stable 1 (candidate 3)" in bad.stdout, bad.stdout

    # Nothing to wait for yet: refused, exit 1.
    none = cli(server, "rollout", "wait", "quiet")
    assert none.returncode == 1 and "quiet has had no rollout to wait for" in none.stderr, none.stderr

    # No traffic at all: nothing can decide, and --wait gives up after its timeout (exit 5).
    began = time.monotonic()
    stuck = cli(server, "rollout", "start", "quiet", "2", "--wait", "--timeout", "2", "--json")
    assert stuck.returncode == 5, (stuck.stdout, stuck.stderr)
    assert 2 <= time.monotonic() - began < 30
    result = events(stuck.stdout)[-1]
    assert (result["result"], result["exit_code"], result["phase"]) == ("timeout", 5, "progressing")
    assert release(server, "quiet").phase == "progressing"  # the rollout goes on


def test_a_waiting_rollout_survives_a_kill_9_and_a_watcher_rides_out_the_restart(tmp_path: Path) -> None:
    repo = repo_with(tmp_path / "repo", {"digits": 'approve_before = ["start"]\n'})
    args = ("--models", str(repo), "--workers", "1", "--state-dir", str(tmp_path / "state"))
    env = {"GATEWAY_CONTROL_TOKENS": TOKENS}
    with gateway_process(*args, env=env) as server:
        control(server).StartRollout(
            rpb.StartRolloutRequest(model="digits", candidate="2", reason="v2"), metadata=AS_ALICE, timeout=10
        )
        assert release(server, "digits").awaiting_approval == "start"
        port = server.control.rsplit(":", 1)[1]
        watcher = cli_background(server, "rollout", "wait", "digits", "--timeout", "90")
        time.sleep(3)  # it is polling
        server.proc.kill()  # kill -9 while it waits
        server.proc.wait(10)
    try:
        # The same control port: the watcher knows only that address.
        with gateway_process(*args, "--control-port", port, env=env) as server:
            restored = release(server, "digits")
            assert (restored.phase, restored.canary, restored.canary_weight_bp, restored.awaiting_approval) == (
                "progressing",
                "2",
                0,
                "start",
            )
            approved = cli(server, "rollout", "approve", "digits", "--reason", "after the restart")
            assert approved.returncode == 0, approved.stderr
            assert "canary 2 at 10%" in approved.stdout and "awaiting" not in approved.stdout, approved.stdout
            last = audit(server, "digits")[-1]
            assert (last.action, last.actor, last.reason) == ("approve", "alice", "after the restart")
            assert cli(server, "rollback", "digits", "--reason", "enough").returncode == 0
            out, err = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert watcher.returncode == 1, (out, err)
    assert "cannot reach the control API" in err and "retrying" in err and "answers again" in err, err
    assert "approve        by alice: after the restart" in out and "rolled back: digits stable 1" in out, out
