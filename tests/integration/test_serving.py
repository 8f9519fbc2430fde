"""The gateway on the bundled models, called with tritonclient (sync and aio)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support import MODELS, Running

INPUTS = {"digits": ("pixels", (64,)), "mlp": ("input", (784,)), "convnet": ("image", (1, 28, 28))}


def offline(model: str, version: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(MODELS / model / version / "model.onnx"), providers=["CPUExecutionProvider"])
    result: list[np.ndarray] = session.run(None, feeds)
    return result


def heldout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "digits" / "heldout.npz")
    return data["X"], data["y"]


def test_live_ready_and_metadata(bundled: Running) -> None:
    client = tc.InferenceServerClient(bundled.address)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "3")
    assert not client.is_model_ready("digits", "9")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server.name == "release-gateway"
    meta = client.get_model_metadata("digits")
    assert list(meta.versions) == ["1", "2", "3"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("pixels", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, 10]),
        ("label", "INT64", [-1]),
    ]


@pytest.mark.parametrize("model", sorted(INPUTS))
def test_every_bundled_model_matches_onnxruntime_raw(bundled: Running, model: str) -> None:
    name, shape = INPUTS[model]
    rng = np.random.default_rng(7)
    x = rng.random((3, *shape), dtype=np.float32)
    client = tc.InferenceServerClient(bundled.address)
    infer_input = tc.InferInput(name, list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    result = client.infer(model, [infer_input], request_id="req-42")
    response = result.get_response()
    assert response.id == "req-42"
    assert response.model_name == model
    session = ort.InferenceSession(str(MODELS / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for spec, expected in zip(session.get_outputs(), session.run(None, {name: x}), strict=False):
        got = result.as_numpy(spec.name)
        assert got is not None and got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def typed_request(model: str, version: str, name: str, x: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id="typed")
    tensor = request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


@pytest.mark.parametrize("model", sorted(INPUTS))
def test_every_bundled_model_matches_onnxruntime_typed(bundled: Running, model: str) -> None:
    name, shape = INPUTS[model]
    x = np.random.default_rng(3).random((2, *shape), dtype=np.float32)
    with grpc.insecure_channel(bundled.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(typed_request(model, "", name, x))
    expected = offline(model, "1", {name: x})
    assert response.id == "typed"
    assert len(response.outputs) == len(expected) == len(response.raw_output_contents)
    for tensor, raw, want in zip(response.outputs, response.raw_output_contents, expected, strict=False):
        got = np.frombuffer(raw, dtype=want.dtype).reshape(list(tensor.shape))
        np.testing.assert_array_equal(got, want)


def test_requested_output_filtering_and_version_pin(bundled: Running) -> None:
    x, _ = heldout()
    client = tc.InferenceServerClient(bundled.address)
    infer_input = tc.InferInput("pixels", [8, 64], "FP32")
    infer_input.set_data_from_numpy(x[:8])
    result = client.infer("digits", [infer_input], model_version="3", outputs=[tc.InferRequestedOutput("label")])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["label"]
    assert response.model_version == "3"
    np.testing.assert_array_equal(result.as_numpy("label"), offline("digits", "3", {"pixels": x[:8]})[1])


def test_digits_v2_accuracy_through_gateway_equals_offline(bundled: Running) -> None:
    x, y = heldout()
    offline_labels = offline("digits", "2", {"pixels": x})[1]
    offline_accuracy = float(np.mean(offline_labels == y))
    client = tc.InferenceServerClient(bundled.address)
    labels = []
    for start in range(0, len(x), 64):
        chunk = x[start : start + 64]
        infer_input = tc.InferInput("pixels", list(chunk.shape), "FP32")
        infer_input.set_data_from_numpy(chunk)
        result = client.infer("digits", [infer_input], model_version="2")
        labels.append(result.as_numpy("label"))
    accuracy = float(np.mean(np.concatenate(labels) == y))
    assert accuracy == offline_accuracy
    assert accuracy > 0.95


def test_aio_client(bundled: Running) -> None:
    async def scenario() -> list[np.ndarray]:
        client = tca.InferenceServerClient(bundled.address)
        try:
            assert await client.is_server_ready()
            x, _ = heldout()
            calls = []
            for row in range(16):
                infer_input = tca.InferInput("pixels", [1, 64], "FP32")
                infer_input.set_data_from_numpy(x[row : row + 1])
                calls.append(client.infer("digits", [infer_input], model_version="1"))
            results = await asyncio.gather(*calls)
            return [r.as_numpy("label") for r in results]
        finally:
            await client.close()

    labels = np.concatenate(asyncio.run(scenario()))
    x, _ = heldout()
    np.testing.assert_array_equal(labels, offline("digits", "1", {"pixels": x[:16]})[1])


def test_statistics_and_repository_index(bundled: Running) -> None:
    client = tc.InferenceServerClient(bundled.address)
    infer_input = tc.InferInput("pixels", [4, 64], "FP32")
    infer_input.set_data_from_numpy(np.zeros((4, 64), np.float32))
    before = client.get_inference_statistics("digits", "3", as_json=True)["model_stats"][0]
    client.infer("digits", [infer_input], model_version="3")
    after = client.get_inference_statistics("digits", "3", as_json=True)["model_stats"][0]
    assert int(after.get("inference_count", 0)) == int(before.get("inference_count", 0)) + 4
    assert (
        int(after["inference_stats"]["success"]["count"])
        == int(before.get("inference_stats", {}).get("success", {}).get("count", 0)) + 1
    )
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {
        ("digits", "1", "READY"),
        ("digits", "2", "READY"),
        ("digits", "3", "READY"),
        ("mlp", "1", "READY"),
    }
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("digits")
    assert "control API" in str(refused.value)


def test_streaming_infer(bundled: Running) -> None:
    x, _ = heldout()
    with grpc.insecure_channel(bundled.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        good = typed_request("digits", "1", "pixels", x[:2])
        bad = typed_request("digits", "1", "nope", x[:2])
        replies = list(stub.ModelStreamInfer(iter([good, bad, good])))
    assert [bool(r.error_message) for r in replies] == [False, True, False]
    assert "nope" in replies[1].error_message


def test_health_and_reflection(bundled: Running) -> None:
    with grpc.insecure_channel(bundled.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "inference.GRPCInferenceService" in names
        assert "grpc.health.v1.Health" in names
        lookup = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        replies = list(stub.ServerReflectionInfo(iter([lookup])))
        assert replies[0].file_descriptor_response.file_descriptor_proto


def test_bundled_repository_is_what_the_models_dir_holds() -> None:
    names = sorted(p.name for p in Path(MODELS).iterdir() if p.is_dir() and (p / "1").is_dir())
    assert names == sorted(INPUTS)
