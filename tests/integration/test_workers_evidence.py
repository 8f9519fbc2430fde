"""Several workers on one port: one report, one set of labels, one controller deciding on all the traffic."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.integration.test_rollout import Traffic, repo  # noqa: F401  (fixture)
from tests.support import MODELS, Process, gateway_process


def stubs(server: Process, n: int = 16) -> list[service_pb2_grpc.GRPCInferenceServiceStub]:
    """Separate connections, so the kernel spreads them over the workers."""
    return [
        service_pb2_grpc.GRPCInferenceServiceStub(
            grpc.insecure_channel(
                server.address, options=[("grpc.use_local_subchannel_pool", 1), ("grpc.primary_user_agent", f"c{i}")]
            )
        )
        for i in range(n)
    ]


def wait_for(check, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


# The release plane is the front ends' own: it works unchanged whether the models run in
# each worker (off) or in one executor process fed by both workers (1).
EXECUTORS = pytest.mark.parametrize("executors", ["off", "1"])


@EXECUTORS
def test_reports_and_labels_cover_every_worker(repo: Path, tmp_path: Path, executors: str) -> None:  # noqa: F811
    state = tmp_path / "state"
    data = np.load(MODELS / "digits" / "heldout.npz")
    args = ("--models", str(repo), "--workers", "2", "--executors", executors, "--state-dir", str(state))
    with gateway_process(*args, timeout=120) as server:
        infer = stubs(server)
        for i in range(400):
            request = service_pb2.ModelInferRequest(model_name="digits", id=f"w{i}")
            request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(data["X"][i % 450 : i % 450 + 1].tobytes())
            infer[i % len(infer)].ModelInfer(request, timeout=10)
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))

        def total_requests() -> bool:
            report = control.GetReport(rpb.GetReportRequest(model="digits"))
            return sum(v.requests for v in report.versions) == 400

        assert wait_for(total_requests)
        with sqlite3.connect(state / "state.db") as db:
            per_worker = {
                worker: sum(w["requests"] for w in json.loads(blob)["windows"].values())
                for worker, blob in db.execute("SELECT worker, data FROM evidence WHERE model='digits'")
            }
        # Named replica/worker: one replica (this gateway, named HOST-PID), two workers.
        assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker
        assert len({name.rpartition("/")[0] for name in per_worker}) == 1, per_worker
        assert {name.rpartition("/")[2] for name in per_worker} == {"0", "1"}, per_worker
        items = [rpb.Feedback(request_id=f"w{i}", labels=[float(data["y"][i % 450])]) for i in range(400)]
        control.SubmitFeedback(rpb.SubmitFeedbackRequest(model="digits", items=items))

        def all_joined() -> rpb.Report | None:
            report = control.GetReport(rpb.GetReportRequest(model="digits"))
            return report if report.feedback_joined == 400 else None

        report = wait_for(all_joined)
        assert report is not None, "labels for the other worker's predictions were not joined"
        assert report.feedback_unknown == 0
        assert sum(v.labelled for v in report.versions) == 400
        # Executor mode really ran the models there: the workers built no batcher of their own.
        remote = [line for line in server.lines if "on the executor process" in line]
        assert bool(remote) == (executors == "1"), remote


@EXECUTORS
def test_a_rollout_is_decided_on_all_workers_evidence(repo: Path, tmp_path: Path, executors: str) -> None:  # noqa: F811
    args = ("--models", str(repo), "--workers", "2", "--executors", executors, "--state-dir", str(tmp_path / "state"))
    with gateway_process(*args, timeout=120) as server:
        traffic = Traffic(server, seed=3)
        connections = stubs(server, 4)
        calls = iter(range(10**9))

        class Spread:
            def ModelInfer(self, request, timeout):  # type: ignore[no-untyped-def]
                return connections[next(calls) % len(connections)].ModelInfer(request, timeout=timeout)

        traffic.infer = Spread()
        traffic.control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2"))
        done = traffic.until(lambda r: r.phase == "succeeded")
        assert done.stable == "2"
        records = traffic.control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records
        last_advance = [r for r in records if r.action == "advance"][-1]
        checks = {c["check"]: c for c in json.loads(last_advance.evidence_json)}
        assert checks["accuracy"]["verdict"] == "pass"
