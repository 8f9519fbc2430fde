"""Zero-element tensors are valid requests: answered, with or without an id, and the evidence path holds.

Validation refuses a zero batch where the model batches (a batch of no rows is
no request); any other zero dimension is the model's to answer, as it does
without an id. Recording a prediction, comparing a shadow and joining labels
must then cope with outputs that hold no values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.config.spec import CompareSpec
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.compare import PairWindow, compare_outputs, top1
from tests.onnx_models import write_sequence_model
from tests.support import Running, gateway_in_thread


@dataclass(frozen=True)
class Model:
    name: str
    max_batch_size: int
    kind: str
    output: str


MODELS = (
    Model("seq", 4, "classification", "masked"),
    Model("seqreg", 4, "regression", "scores"),
    Model("nobatch", 0, "classification", "scores"),
)


def _repository(root: Path) -> Path:
    for m in MODELS:
        for version in ("1", "2"):
            write_sequence_model(root / m.name / version / "model.onnx")
        (root / m.name / "model.toml").write_text(
            f"max_batch_size = {m.max_batch_size}\n"
            f'[compare]\nkind = "{m.kind}"\noutput = "{m.output}"\n'
            '[release]\nstable = "1"\nshadows = { "2" = 1.0 }\n'
        )
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with gateway_in_thread(_repository(tmp_path_factory.mktemp("repo"))) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: Running) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _request(model: str, rows: int, length: int, request_id: str) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name in ("input_ids", "attention_mask"):
        request.inputs.add(name=name, datatype="INT64", shape=[rows, length])
        request.raw_input_contents.append(np.ones((rows, length), np.int64).tobytes())
    return request


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model=st.sampled_from(MODELS),
    rows=st.integers(0, 3),
    length=st.integers(0, 3),
    with_id=st.booleans(),
)
def test_zero_element_requests_are_answered_with_and_without_an_id(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, model: Model, rows: int, length: int, with_id: bool
) -> None:
    request = _request(model.name, rows, length, f"r-{rows}-{length}-{time.monotonic_ns()}" if with_id else "")
    if model.max_batch_size and rows == 0:
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        assert "batch" in (refused.value.details() or "")
        return
    response = stub.ModelInfer(request, timeout=30)
    assert [list(o.shape) for o in response.outputs] == [[rows, length], [rows, length]]


def test_zero_element_evidence_keeps_the_report_and_the_shadow_whole(
    server: Running, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    with grpc.insecure_channel(server.control) as channel:
        control = rgrpc.ReleaseServiceStub(channel)
        for m in MODELS:
            for i, (rows, length) in enumerate([(2, 0), (1, 0), (2, 3)]):
                stub.ModelInfer(_request(m.name, rows, length, f"{m.name}-evidence-{i}"), timeout=30)
            if not m.max_batch_size:
                stub.ModelInfer(_request(m.name, 0, 3, f"{m.name}-evidence-none"), timeout=30)
            deadline = time.monotonic() + 30
            while (report := control.GetReport(rpb.GetReportRequest(model=m.name))).shadows["2"].pending:
                assert time.monotonic() < deadline, report
                time.sleep(0.05)
            assert report.shadows["2"].failed == 0, report
            # Labels for a prediction of rows without values join without error.
            joined = control.SubmitFeedback(
                rpb.SubmitFeedbackRequest(
                    model=m.name, items=[rpb.Feedback(request_id=f"{m.name}-evidence-0", labels=[1.0, 0.0])]
                )
            )
            assert joined.joined == 1


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0), (3, 0, 2), (0, 0)])
def test_comparing_zero_element_outputs(kind: str, shape: tuple[int, ...]) -> None:
    empty = np.zeros(shape, np.float32)
    rows = shape[0]
    assert top1(empty).shape == (rows,)
    pair = PairWindow()
    compare_outputs(pair, empty, empty, CompareSpec(kind=kind), 0.001)  # type: ignore[arg-type]
    assert (pair.requests, pair.rows, pair.elements) == (1, rows, 0)
    if kind == "classification":
        assert pair.agree == rows
    assert pair.within_tolerance == rows
