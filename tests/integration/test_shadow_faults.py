"""A shadow never affects the primary (reliability rows 8-9, and 6's readiness part).

Versions of one model with the same inputs: v1 behaves; the others raise,
answer the wrong shape, run 10x slower, or hang. With each mirrored at 100%,
the primary's answers are byte-identical to a run without shadows, and the
shadow's trouble shows up only in its counters. The byte-identical check runs
both in process and with the versions in an executor process (`--executors 1`).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.integration.test_overload import request
from tests.onnx_models import write_spin_model
from tests.support import Process, Running, gateway_in_thread, gateway_process

VARIANTS = {
    "1": {},
    "2": {"fault": "raise"},
    "3": {"fault": "garbage"},
    "4": {"trip_scale": 10},
    "5": {"fault": "hang"},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for version, options in VARIANTS.items():
        write_spin_model(root / "spin" / version / "model.onnx", **options)  # type: ignore[arg-type]
    (root / "spin" / "model.toml").write_text(
        'max_batch_size = 8\n[batching]\nmax_queue_delay_us = 0\nexecution = "thread"\n[release]\nstable = "1"\n'
    )
    return root


@pytest.fixture(scope="module")
def in_process(repo: Path) -> Iterator[Running]:
    with gateway_in_thread(repo, metrics_port=0) as running:
        yield running


@pytest.fixture(scope="module")
def executor(repo: Path) -> Iterator[Process]:
    # The shadows run in the executor process, beside the primary: their faults must stay theirs there too.
    with gateway_process("--models", str(repo), "--workers", "1", "--executors", "1", timeout=120) as process:
        yield process
        assert any("on the executor process" in line for line in process.lines), process.lines[-20:]


@pytest.fixture(scope="module", params=["in_process", "executor"])
def server(request: pytest.FixtureRequest) -> Running | Process:
    found: Running | Process = request.getfixturevalue(request.param)
    return found


def primary_answers(stub: service_pb2_grpc.GRPCInferenceServiceStub, n: int = 30) -> list[bytes]:
    answers = []
    for i in range(n):
        response = stub.ModelInfer(request(200, value=1.0 + i), timeout=1.0)
        assert response.model_version == "1"
        # Everything the client sees: outputs, bytes, version, id and parameters.
        answers.append(response.SerializeToString(deterministic=True))
    return answers


def counters(control: rgrpc.ReleaseServiceStub, version: str) -> rpb.ShadowCounters:
    return control.GetReport(rpb.GetReportRequest(model="spin")).shadows[version]


def settle(control: rgrpc.ReleaseServiceStub, version: str, timeout: float = 15.0) -> rpb.ShadowCounters:
    deadline = time.monotonic() + timeout
    while (c := counters(control, version)).pending and time.monotonic() < deadline:
        time.sleep(0.05)
    return c


@pytest.mark.parametrize(
    ("version", "expect"),
    [("2", "failed"), ("3", "failed"), ("4", "completed"), ("5", "timed_out")],
    ids=["raises", "wrong-shape", "10x-slower", "hangs"],
)
def test_primary_answers_are_byte_identical_with_a_faulty_shadow(
    server: Running | Process, version: str, expect: str
) -> None:
    with grpc.insecure_channel(server.address) as channel, grpc.insecure_channel(server.control) as control_channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        control = rgrpc.ReleaseServiceStub(control_channel)
        baseline = primary_answers(stub)
        control.AddShadow(rpb.AddShadowRequest(model="spin", version=version, fraction=1.0))
        try:
            mirrored = primary_answers(stub)
            assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready
            assert stub.ModelReady(service_pb2.ModelReadyRequest(name="spin")).ready
        finally:
            control.RemoveShadow(rpb.RemoveShadowRequest(model="spin", version=version))
        assert mirrored == baseline
        c = settle(control, version)
        assert c.mirrored + c.dropped == len(baseline)
        assert getattr(c, expect) >= 1, c
        if expect == "completed":
            assert c.completed == c.mirrored and c.failed == 0
        else:
            assert c.completed == 0


def scrape(server: Running) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.gateway.metrics_port}/metrics").read().decode()


def test_always_failing_shadow_opens_its_circuit_and_is_probed_after_backoff(in_process: Running) -> None:
    server = in_process  # (it reads the in-process gateway's metrics port)
    with grpc.insecure_channel(server.address) as channel, grpc.insecure_channel(server.control) as control_channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        control = rgrpc.ReleaseServiceStub(control_channel)
        before = (
            counters(control, "2") if "2" in control.GetReport(rpb.GetReportRequest(model="spin")).shadows else None
        )
        start_mirrored = before.mirrored if before else 0
        start_opened = before.circuit_opened if before else 0
        control.AddShadow(rpb.AddShadowRequest(model="spin", version="2", fraction=1.0))
        try:
            for _ in range(12):
                stub.ModelInfer(request(0), timeout=1.0)
                settle(control, "2")
            c = counters(control, "2")
            assert c.circuit_open
            assert c.circuit_opened == start_opened + 1
            assert c.mirrored - start_mirrored == 5  # the threshold; the rest were dropped
            time.sleep(0.7)  # the sampler exports every 0.5 s
            assert 'gateway_shadow_circuit_open{model="spin",version="2"} 1.0' in scrape(server)
            time.sleep(1.0)  # the first backoff is 1 s: one probe goes through, fails, reopens
            for _ in range(3):
                stub.ModelInfer(request(0), timeout=1.0)
                settle(control, "2")
            assert counters(control, "2").mirrored - start_mirrored == 6
        finally:
            control.RemoveShadow(rpb.RemoveShadowRequest(model="spin", version="2"))
