"""Every datatype of the unseen-model tests over REST, flat and nested, plus outputs and parameters.

The identity models (tests/onnx_models.py) answer what they were sent, so each
datatype's extremes must come back exactly: over plain JSON (httpx) and through
tritonclient.http in JSON mode, as the gRPC edge answers them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import serialize_byte_tensor

from gateway.dtypes import NUMPY_BY_DATATYPE
from gateway.rest.tensors import to_bytes
from tests.integration.rest_support import datatype_repo, infer_body, output, tensor
from tests.onnx_models import IDENTITY_DTYPES
from tests.support import Running, gateway_in_thread

# Two rows of three values each, with each datatype's extremes where it has them.
VALUES: dict[str, list[list[Any]]] = {
    "BOOL": [[True, False, True], [False, False, True]],
    "UINT8": [[0, 255, 7], [1, 2, 3]],
    "UINT16": [[0, 65535, 9], [1, 2, 3]],
    "UINT32": [[0, 2**32 - 1, 5], [1, 2, 3]],
    "UINT64": [[0, 2**64 - 1, 5], [1, 2, 3]],
    "INT8": [[-128, 127, 0], [1, -2, 3]],
    "INT16": [[-32768, 32767, 1], [1, -2, 3]],
    "INT32": [[-(2**31), 2**31 - 1, 2], [1, -2, 3]],
    "INT64": [[-(2**63), 2**63 - 1, 3], [1, -2, 3]],
    "FP16": [[0.5, -65504.0, 0.001], [1.5, 2.0, -3.25]],
    "FP32": [[0.1, -3.5, 1e30], [1.0, 2.0, 3.0]],
    "FP64": [[0.1, -1e300, 2.5], [1.0, 2.0, 3.0]],
}
# A value each datatype cannot hold, and the JSON type it refuses.
OUT_OF_RANGE = {"UINT8": 256, "UINT16": -1, "UINT32": 2**32, "INT8": -129, "INT16": 40000, "INT32": 2**31}


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with gateway_in_thread(datatype_repo(tmp_path_factory.mktemp("rest-dtypes"))) as running:
        yield running


def identity(custom: Running, dtype: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"http://{custom.http}/v2/models/identity_{dtype.lower()}/infer", json=body, timeout=30)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("dtype", IDENTITY_DTYPES)
def test_every_datatype_comes_back_exactly_over_plain_json(custom: Running, dtype: str, nested: bool) -> None:
    x = np.array(VALUES[dtype], dtype=NUMPY_BY_DATATYPE[dtype])
    reply = identity(custom, dtype, infer_body(tensor("x", x, dtype, nested=nested)))
    assert reply.status_code == 200, reply.text
    entry = reply.json()["outputs"][0]
    assert (entry["name"], entry["datatype"], entry["shape"]) == ("y", dtype, [2, 3])
    assert len(entry["data"]) == 6  # answers are flat, row-major
    got = output(reply.json(), "y")
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("dtype", IDENTITY_DTYPES)
def test_every_datatype_through_tritonclient_json_mode(custom: Running, dtype: str) -> None:
    x = np.array(VALUES[dtype], dtype=NUMPY_BY_DATATYPE[dtype])
    client = th.InferenceServerClient(custom.http)
    infer_input = th.InferInput("x", list(x.shape), dtype)
    infer_input.set_data_from_numpy(x, binary_data=False)
    result = client.infer(f"identity_{dtype.lower()}", [infer_input], outputs=[th.InferRequestedOutput("y", False)])
    got = result.as_numpy("y")
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("dtype", sorted(OUT_OF_RANGE))
def test_a_value_out_of_its_datatypes_range_is_400(custom: Running, dtype: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": dtype, "shape": [1, 3], "data": [0, OUT_OF_RANGE[dtype], 0]}]}
    reply = identity(custom, dtype, body)
    assert reply.status_code == 400
    assert reply.json()["error"].startswith(f"inputs[0].data: a value is out of range for {dtype}")


@pytest.mark.parametrize(
    ("dtype", "value", "expected"),
    [("INT32", 1.5, "integers, got a number"), ("FP32", "1.5", "numbers, got a string"), ("BOOL", 1, "true or false")],
)
def test_a_value_of_the_wrong_json_type_is_400(custom: Running, dtype: str, value: Any, expected: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": dtype, "shape": [1, 3], "data": [value] * 3}]}
    reply = identity(custom, dtype, body)
    assert reply.status_code == 400 and expected in reply.json()["error"], reply.text


def test_nested_data_must_follow_the_shape(custom: Running) -> None:
    ragged = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3, 4], [5, 6]]}]}
    reply = identity(custom, "FP32", ragged)
    assert reply.status_code == 400 and "inputs[0].data: a nested array" in reply.json()["error"]
    mixed = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], 4]}]}
    assert "mixes arrays and values" in identity(custom, "FP32", mixed).json()["error"]


def test_bytes_travel_as_strings_and_are_refused_by_a_model_without_bytes_inputs(custom: Running) -> None:
    # Encoded as a gRPC client's raw BYTES (a 4-byte length before each), so the data plane sees one form.
    strings = np.array([["a", "é", ""]], dtype=object)
    assert to_bytes("BYTES", ["a", "é", ""], "data") == serialize_byte_tensor(strings).item()
    body = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 3], "data": ["a", "é", ""]}]}
    reply = identity(custom, "FP32", body)
    assert reply.status_code == 400
    assert reply.json()["error"] == "input 'x': datatype must be FP32, got 'BYTES'"
    body["inputs"][0]["data"] = ["a", 1, "c"]
    assert "BYTES values must be strings, got an integer" in identity(custom, "FP32", body).json()["error"]


def test_outputs_selects_what_is_answered(custom: Running) -> None:
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    weights = np.full((2, 4), 0.5, np.float16)
    inputs = [tensor("ids", ids, "INT64"), tensor("weights", weights, "FP16")]
    url = f"http://{custom.http}/v2/models/mixed/infer"
    both = httpx.post(url, json=infer_body(*inputs), timeout=30).json()
    assert [o["name"] for o in both["outputs"]] == ["sum", "ids_twice"]
    only = httpx.post(url, json=infer_body(*inputs, outputs=[{"name": "ids_twice"}]), timeout=30).json()
    assert [o["name"] for o in only["outputs"]] == ["ids_twice"]
    np.testing.assert_array_equal(output(only, "ids_twice"), ids * 2)
    np.testing.assert_array_equal(output(both, "sum"), (ids * 0.5).sum(axis=1).astype(np.float32))


@pytest.mark.parametrize(
    ("timeout_us", "status"), [(5_000_000, 200), (0, 400), (-5, 400), (1.5, 400), (True, 400), ("soon", 400)]
)
def test_timeout_us_is_read_as_on_grpc(custom: Running, timeout_us: Any, status: int) -> None:
    x = np.zeros((1, 3), np.float32)
    reply = identity(custom, "FP32", infer_body(tensor("x", x), parameters={"timeout_us": timeout_us}))
    assert reply.status_code == status, reply.text
    if status == 400:
        assert "timeout_us" in reply.json()["error"]
