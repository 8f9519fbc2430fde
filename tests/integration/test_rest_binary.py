"""Triton's binary tensor data extension: tritonclient.http in its default (binary) mode, unchanged.

The JSON header's length travels in `Inference-Header-Content-Length`; each binary
input says its size in `parameters.binary_data_size`, and outputs come back as
binary when `binary_data_output` (or an output's `binary_data`) asks for it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from gateway.dtypes import NUMPY_BY_DATATYPE
from tests.integration.rest_support import INPUTS, datatype_repo, offline
from tests.integration.test_rest_datatypes import VALUES
from tests.onnx_models import IDENTITY_DTYPES
from tests.support import Running, gateway_in_thread


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with gateway_in_thread(datatype_repo(tmp_path_factory.mktemp("rest-binary"))) as running:
        yield running


@pytest.mark.parametrize("model", sorted(INPUTS))
def test_every_bundled_model_in_tritonclient_binary_mode_matches_onnxruntime(bundled: Running, model: str) -> None:
    name, shape = INPUTS[model]
    x = np.random.default_rng(5).random((4, *shape), dtype=np.float32)
    client = th.InferenceServerClient(bundled.http)
    infer_input = th.InferInput(name, list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)  # binary_data=True: tritonclient's default
    result = client.infer(model, [infer_input])  # no outputs named: every output, binary
    response = result.get_response()
    assert all("binary_data_size" in o["parameters"] and "data" not in o for o in response["outputs"])
    for out, want in offline(model, "1", {name: x}).items():
        got = result.as_numpy(out)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", IDENTITY_DTYPES)
def test_every_datatype_in_binary_mode(custom: Running, dtype: str) -> None:
    x = np.array(VALUES[dtype], dtype=NUMPY_BY_DATATYPE[dtype])
    client = th.InferenceServerClient(custom.http)
    infer_input = th.InferInput("x", list(x.shape), dtype)
    infer_input.set_data_from_numpy(x)
    result = client.infer(f"identity_{dtype.lower()}", [infer_input], outputs=[th.InferRequestedOutput("y")])
    got = result.as_numpy("y")
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)


def test_binary_and_json_inputs_and_outputs_mix(custom: Running) -> None:
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    weights = np.full((2, 4), 0.25, np.float16)
    client = th.InferenceServerClient(custom.http)
    ids_input = th.InferInput("ids", [2, 4], "INT64")
    ids_input.set_data_from_numpy(ids, binary_data=False)
    weights_input = th.InferInput("weights", [2, 4], "FP16")
    weights_input.set_data_from_numpy(weights)  # binary: FP16 as its own bytes
    outputs = [th.InferRequestedOutput("sum", True), th.InferRequestedOutput("ids_twice", binary_data=False)]
    result = client.infer("mixed", [ids_input, weights_input], outputs=outputs)
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    assert "data" not in by_name["sum"] and "data" in by_name["ids_twice"]
    np.testing.assert_array_equal(result.as_numpy("ids_twice"), ids * 2)
    np.testing.assert_array_equal(result.as_numpy("sum"), (ids * 0.25).sum(axis=1).astype(np.float32))


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_inflated(custom: Running, algorithm: str) -> None:
    x = np.array(VALUES["FP32"], np.float32)
    client = th.InferenceServerClient(custom.http)
    infer_input = th.InferInput("x", [2, 3], "FP32")
    infer_input.set_data_from_numpy(x)
    result = client.infer("identity_fp32", [infer_input], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("y"), x)


def binary_request(header: dict[str, Any], data: bytes, length: int | None = None) -> tuple[bytes, dict[str, str]]:
    text = orjson.dumps(header)
    return text + data, {"Inference-Header-Content-Length": str(len(text) if length is None else length)}


def test_a_hand_written_binary_request_and_its_answer(custom: Running) -> None:
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    header = {
        "inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_request(header, x.tobytes())
    reply = httpx.post(f"http://{custom.http}/v2/models/identity_int32/infer", content=body, headers=headers)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/octet-stream"
    length = int(reply.headers["inference-header-content-length"])
    document = orjson.loads(reply.content[:length])
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 24}
    assert reply.content[length:] == x.tobytes()


@pytest.mark.parametrize(
    ("size", "data", "length", "message"),
    [
        (24, b"\0" * 20, None, "only 20 of the binary data are left"),
        (24, b"\0" * 28, None, "4 bytes of binary data that no input"),
        (20, b"\0" * 20, None, "raw content is 20 bytes, expected 24"),
        ("24", b"\0" * 24, None, "binary_data_size: expected a byte count"),
        (24, b"\0" * 24, 10**9, "Inference-Header-Content-Length"),
        (24, b"\0" * 24, 5, "not valid JSON"),
    ],
)
def test_binary_framing_mistakes_are_400_naming_what_is_wrong(
    custom: Running, size: Any, data: bytes, length: int | None, message: str
) -> None:
    header = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 3], "parameters": {"binary_data_size": size}}]}
    body, headers = binary_request(header, data, length)
    reply = httpx.post(f"http://{custom.http}/v2/models/identity_int32/infer", content=body, headers=headers)
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text


def test_tritonclient_binary_mode_errors_carry_the_message(custom: Running) -> None:
    client = th.InferenceServerClient(custom.http)
    wrong = th.InferInput("x", [2, 3], "FP64")
    wrong.set_data_from_numpy(np.zeros((2, 3), np.float64))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("identity_fp32", [wrong])
    assert raised.value.status() == "400" and "datatype must be FP32, got 'FP64'" in raised.value.message()


def test_bytes_in_binary_form_reach_validation_intact(custom: Running) -> None:
    strings = np.array([[b"ab", b"", b"xyz"]], dtype=object)
    infer_input = th.InferInput("x", [1, 3], "BYTES")
    infer_input.set_data_from_numpy(strings)
    raw = b"".join(struct.pack("<I", len(s)) + s for s in strings.ravel())
    assert infer_input._get_binary_data() == raw  # the form the JSON path builds too
    with pytest.raises(InferenceServerException) as raised:
        th.InferenceServerClient(custom.http).infer("identity_fp32", [infer_input])
    assert "datatype must be FP32, got 'BYTES'" in raised.value.message()
