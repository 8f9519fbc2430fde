"""The model's signature, kept whole: shared symbolic dimensions per request, batchability at load.

Inputs that the ONNX graph declares with the same symbolic dimension (a text
model's `input_ids` and `attention_mask`, both `[batch, seq]`) must agree in
every request: a mismatch is the client's error, INVALID_ARGUMENT naming both
inputs, never a model failure. A model whose first dimension is fixed cannot
batch: `max_batch_size > 0` on it is refused at load, naming model, input and fix.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.errors import ModelLoadError
from tests.onnx_models import write_sequence_model
from tests.support import ROOT, Running, gateway_command, gateway_in_thread

FIX = "set max_batch_size = 0"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("repo")
    write_sequence_model(root / "text" / "1" / "model.onnx")
    (root / "text" / "model.toml").write_text("max_batch_size = 8\n")
    write_sequence_model(root / "whole" / "1" / "model.onnx")
    (root / "whole" / "model.toml").write_text("max_batch_size = 0\n")
    # A fixed first dimension serves where nothing batches.
    write_sequence_model(root / "fixed" / "1" / "model.onnx", first=1)
    (root / "fixed" / "model.toml").write_text("max_batch_size = 0\n")
    with gateway_in_thread(root) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: Running) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _request(model: str, ids_shape: list[int], mask_shape: list[int]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id="")
    for name, shape in (("input_ids", ids_shape), ("attention_mask", mask_shape)):
        request.inputs.add(name=name, datatype="INT64", shape=shape)
        request.raw_input_contents.append(np.ones(shape, np.int64).tobytes())
    return request


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model=st.sampled_from(["text", "whole"]),
    rows=st.integers(1, 3),
    ids_length=st.integers(0, 6),
    mask_length=st.integers(0, 6),
)
def test_inputs_sharing_a_symbolic_dimension_must_agree(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str, rows: int, ids_length: int, mask_length: int
) -> None:
    request = _request(model, [rows, ids_length], [rows, mask_length])
    if ids_length == mask_length:
        response = stub.ModelInfer(request, timeout=30)
        assert list(response.outputs[0].shape) == [rows, ids_length]
        return
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    details = refused.value.details() or ""
    for words in ("input_ids", "attention_mask", "'seq'", str(ids_length), str(mask_length)):
        assert words in details, details


def test_the_issue_case_in_a_stream_fails_alone(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    good = _request("text", [2, 3], [2, 3])
    bad = _request("text", [2, 3], [2, 4])
    replies = list(stub.ModelStreamInfer(iter([good, bad, good]), timeout=60))
    assert [bool(r.error_message) for r in replies] == [False, True, False]
    assert "'seq'" in replies[1].error_message


def test_fixed_first_dimension_serves_without_batching(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(_request("fixed", [1, 5], [1, 5]), timeout=30)
    assert list(response.outputs[0].shape) == [1, 5]
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(_request("fixed", [2, 5], [2, 5]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("max_batch_size", [1, 8])
def test_batching_a_fixed_first_dimension_is_refused_at_load(tmp_path: Path, max_batch_size: int) -> None:
    write_sequence_model(tmp_path / "fixed" / "1" / "model.onnx", first=1)
    (tmp_path / "fixed" / "model.toml").write_text(f"max_batch_size = {max_batch_size}\n")
    with pytest.raises(ModelLoadError) as refused, gateway_in_thread(tmp_path):
        pass
    message = str(refused.value)
    for words in ("model 'fixed'", "input 'input_ids'", f"max_batch_size = {max_batch_size}", FIX, "dynamic first"):
        assert words in message, message


def test_serve_stops_with_one_line_naming_the_fix(tmp_path: Path) -> None:
    write_sequence_model(tmp_path / "fixed" / "1" / "model.onnx", first=1)
    (tmp_path / "fixed" / "model.toml").write_text("max_batch_size = 8\n")
    result = subprocess.run(
        gateway_command(
            "serve",
            "--models",
            str(tmp_path),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--http-port",
            "-1",
            "--control-port",
            "-1",
            "--workers",
            "1",
            "--provider",
            "cpu",
            "--state-dir",
            str(tmp_path / "state"),
        ),
        capture_output=True,
        text=True,
        timeout=60,  # today's code would serve (and this time out) rather than stop
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert FIX in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
