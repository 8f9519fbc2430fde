"""Capture and replay of live traffic, and the load-test gate before a rollout's first traffic shift."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.capture import MAGIC, CaptureWriter, read_capture
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.onnx_models import write_slowed_copy
from tests.support import MODELS, ROOT, gateway_command, gateway_process

GATE_POLICY = """
[policy]
gate = true
gate_requests = 400
gate_max_latency_ratio = 4.0
gate_min_agreement = 0.9
max_latency_ratio = 0
"""


def send_heldout(address: str, count: int, rows: int = 4) -> None:
    data = np.load(MODELS / "digits" / "heldout.npz")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    for i in range(count):
        start = (i * rows) % (len(data["X"]) - rows)
        request = service_pb2.ModelInferRequest(model_name="digits", id=f"c{i}")
        request.inputs.add(name="pixels", datatype="FP32", shape=[rows, 64])
        request.raw_input_contents.append(data["X"][start : start + rows].tobytes())
        stub.ModelInfer(request, timeout=10)


def replay(address: str, captures: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command("replay", str(captures), "--address", address, "--json", *args),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ),
    )


def test_replaying_a_capture_on_the_stable_version_reproduces_its_answers(tmp_path: Path) -> None:
    captures = tmp_path / "captures"
    args = ("--load", "digits", "--workers", "1", "--capture-dir", str(captures), "--capture-fraction", "1")
    with gateway_process(*args) as server:
        send_heldout(server.address, 120)
        assert server.stop() == 0  # a drain closes (flushes) the capture
    records = [r for path in sorted(captures.glob("*.gwcap")) for r in read_capture(path)]
    assert len(records) == 120
    with gateway_process("--load", "digits", "--workers", "1") as server:
        same = replay(server.address, captures, "--version", "1", "--require-exact")
        assert same.returncode == 0, same.stderr
        summary = json.loads(same.stdout)
        assert summary["requests"] == 120 and summary["errors"] == 0
        assert summary["exact_match"] == 1.0 and summary["agreement"] == 1.0 and summary["max_abs_diff"] == 0.0
        other = replay(server.address, captures, "--version", "3", "--pace", "original")
        summary = json.loads(other.stdout)
        assert other.returncode == 0 and summary["exact_match"] < 1.0 and summary["agreement"] < 1.0
        strict = replay(server.address, captures, "--version", "3", "--require-exact")
        assert strict.returncode == 1


def test_capture_rotates_caps_its_size_and_survives_a_torn_record(tmp_path: Path) -> None:
    writer = CaptureWriter(tmp_path, 1.0, file_bytes=4096, max_bytes=16384)
    for i in range(400):
        writer.record(b"q" * 100, b"a" * 100, 0.001 * i)
    writer.close()
    files = sorted(tmp_path.glob("*.gwcap"))
    assert len(files) > 1
    assert sum(f.stat().st_size for f in files) <= 16384 + 4096
    torn = tmp_path / "torn.gwcap"
    torn.write_bytes(MAGIC + struct.pack("<Idd", 500, 0.0, 0.0) + b"short")
    assert list(read_capture(torn)) == []
    assert all(r.request == b"q" * 100 for r in read_capture(files[-1]))


@pytest.fixture
def gate_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    # v4: v2 with padding work (about 100x slower per run), same answers.
    write_slowed_copy(MODELS / "digits" / "2" / "model.onnx", root / "digits" / "4" / "model.onnx", 100)
    spec = root / "digits" / "model.toml"
    spec.write_text(spec.read_text() + GATE_POLICY)
    return root


def test_the_gate_passes_v2_and_refuses_a_slowed_v2_with_evidence(gate_repo: Path, tmp_path: Path) -> None:
    captures = tmp_path / "captures"
    args = (
        "--models",
        str(gate_repo),
        "--workers",
        "1",
        "--no-controller",
        "--capture-dir",
        str(captures),
        "--capture-fraction",
        "1",
    )
    with gateway_process(*args) as server:
        send_heldout(server.address, 150, rows=1)
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))
        with pytest.raises(grpc.RpcError) as refused:
            control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="4", reason="slow one"), timeout=60)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "gate_latency_p99_ratio" in (refused.value.details() or "")
        started = control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2"), timeout=60)
        assert started.phase == "progressing" and started.canary == "2"
        records = control.GetAuditLog(rpb.GetAuditLogRequest(model="digits")).records
    refusal = next(r for r in records if r.action == "start_rollout" and r.outcome == "refused")
    checks = {c["check"]: c for c in json.loads(refusal.evidence_json)}
    assert checks["gate_latency_p99_ratio"]["verdict"] == "fail"
    assert checks["gate_latency_p99_ratio"]["value"] > 4.0
    assert checks["gate_agreement"]["verdict"] == "pass"  # same answers, only slower
    accepted = next(r for r in records if r.action == "start_rollout" and r.outcome == "applied")
    checks = {c["check"]: c for c in json.loads(accepted.evidence_json)}
    assert checks["gate_latency_p99_ratio"]["verdict"] == "pass"
    assert checks["gate_agreement"]["verdict"] == "pass" and checks["gate_agreement"]["samples"] >= 150
