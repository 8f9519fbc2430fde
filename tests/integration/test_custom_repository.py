"""A repository the project did not ship: nothing is special-cased to the bundled models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.dtypes import CONTENTS_FIELD, NUMPY_BY_DATATYPE
from tests.onnx_models import IDENTITY_DTYPES, write_identity_model, write_mixed_dtype_model
from tests.support import Running, gateway_in_thread


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root: Path = tmp_path_factory.mktemp("repo")
    write_mixed_dtype_model(root / "mixed" / "7" / "model.onnx")
    (root / "mixed" / "model.toml").write_text("max_batch_size = 8\n")
    for dtype in IDENTITY_DTYPES:
        name = f"identity_{dtype.lower()}"
        write_identity_model(root / name / "1" / "model.onnx", dtype)
        (root / name / "model.toml").write_text("max_batch_size = 4\n")
    with gateway_in_thread(root) as running:
        yield running


def test_two_inputs_of_different_dtypes(custom: Running) -> None:
    client = tc.InferenceServerClient(custom.address)
    meta = client.get_model_metadata("mixed")
    assert list(meta.versions) == ["7"]
    assert {(t.name, t.datatype) for t in meta.inputs} == {("ids", "INT64"), ("weights", "FP16")}
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    weights = np.full((3, 4), 0.5, dtype=np.float16)
    inputs = [tc.InferInput("ids", [3, 4], "INT64"), tc.InferInput("weights", [3, 4], "FP16")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(weights)
    result = client.infer("mixed", inputs)
    np.testing.assert_allclose(result.as_numpy("sum"), (ids * 0.5).sum(axis=1).astype(np.float32))
    np.testing.assert_array_equal(result.as_numpy("ids_twice"), ids * 2)
    # A wrong dtype on the second input is named.
    inputs[1] = tc.InferInput("weights", [3, 4], "FP32")
    inputs[1].set_data_from_numpy(weights.astype(np.float32))
    with pytest.raises(Exception, match=r"weights.*datatype must be FP16"):
        client.infer("mixed", inputs)


def sample(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(5)
    np_dtype = NUMPY_BY_DATATYPE[dtype]
    if dtype == "BOOL":
        return rng.integers(0, 2, (2, 3)).astype(np.bool_)
    if np_dtype.kind in "iu":
        info = np.iinfo(np_dtype)  # type: ignore[type-var]
        return rng.integers(info.min, info.max, (2, 3), dtype=np_dtype, endpoint=True)
    return rng.standard_normal((2, 3)).astype(np_dtype)


@pytest.mark.parametrize("dtype", IDENTITY_DTYPES)
def test_every_numeric_datatype_round_trips_raw(custom: Running, dtype: str) -> None:
    x = sample(dtype)
    client = tc.InferenceServerClient(custom.address)
    infer_input = tc.InferInput("x", [2, 3], dtype)
    infer_input.set_data_from_numpy(x)
    got = client.infer(f"identity_{dtype.lower()}", [infer_input]).as_numpy("y")
    assert got is not None and got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("dtype", [d for d in IDENTITY_DTYPES if d in CONTENTS_FIELD])
def test_every_typed_datatype_round_trips_contents(custom: Running, dtype: str) -> None:
    x = sample(dtype)
    request = service_pb2.ModelInferRequest(model_name=f"identity_{dtype.lower()}")
    tensor = request.inputs.add(name="x", datatype=dtype, shape=[2, 3])
    getattr(tensor.contents, CONTENTS_FIELD[dtype]).extend(x.ravel().tolist())
    with grpc.insecure_channel(custom.address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.outputs[0].datatype == dtype
    got = np.frombuffer(response.raw_output_contents[0], dtype=x.dtype).reshape(2, 3)
    np.testing.assert_array_equal(got, x)


def test_fp16_in_typed_contents_is_refused_by_name(custom: Running) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_fp16")
    tensor = request.inputs.add(name="x", datatype="FP16", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with grpc.insecure_channel(custom.address) as channel, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x': FP16 data travels only in raw_input_contents" in (caught.value.details() or "")


def test_out_of_range_typed_value_is_refused(custom: Running) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_int8")
    tensor = request.inputs.add(name="x", datatype="INT8", shape=[1, 3])
    tensor.contents.int_contents.extend([1, 300, 3])
    with grpc.insecure_channel(custom.address) as channel, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of range for INT8" in (caught.value.details() or "")
