"""The OIP REST binding (KServe v2 HTTP/JSON) on the bundled models: health, metadata, JSON infer.

Called with tritonclient.http, httpx and urllib against a real gateway; every
answer is checked against onnxruntime run directly, or against the gRPC edge's.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th

from tests.integration.rest_support import INPUTS, infer_body, offline, output, tensor
from tests.support import MODELS, Running


@pytest.fixture
def client(bundled: Running) -> httpx.Client:
    return httpx.Client(base_url=f"http://{bundled.http}", timeout=30)


def test_health_server_and_model_metadata_say_what_grpc_says(bundled: Running, client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    server = client.get("/v2").json()
    assert server["name"] == "release-gateway" and "binary_tensor_data" in server["extensions"]
    grpc_meta = tc.InferenceServerClient(bundled.address).get_model_metadata("digits", "3", as_json=True)
    for path in ("/v2/models/digits", "/v2/models/digits/versions/3"):
        meta = client.get(path).json()
        assert meta["name"] == "digits"
        assert meta["versions"] == ["1", "2", "3"]
        assert meta["platform"] == grpc_meta["platform"]
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
        assert meta["outputs"] == [
            {"name": o["name"], "datatype": o["datatype"], "shape": [int(d) for d in o["shape"]]}
            for o in grpc_meta["outputs"]
        ]
    # KServe v2: readiness is the status code (200 true, 4xx false).
    assert client.get("/v2/models/digits/ready").status_code == 200
    assert client.get("/v2/models/digits/versions/2/ready").status_code == 200
    assert client.get("/v2/models/digits/versions/9/ready").status_code == 400
    assert client.get("/v2/models/nope/ready").json() == {"name": "nope", "ready": False}


def test_tritonclient_http_health_and_metadata(bundled: Running) -> None:
    client = th.InferenceServerClient(bundled.http)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "3")
    assert not client.is_model_ready("digits", "9") and not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "release-gateway"
    assert client.get_model_metadata("mlp")["inputs"][0]["name"] == "input"


@pytest.mark.parametrize("model", sorted(INPUTS))
def test_every_bundled_model_in_tritonclient_json_mode_matches_onnxruntime(bundled: Running, model: str) -> None:
    name, shape = INPUTS[model]
    x = np.random.default_rng(11).random((3, *shape), dtype=np.float32)
    client = th.InferenceServerClient(bundled.http)
    infer_input = th.InferInput(name, list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x, binary_data=False)
    expected = offline(model, "1", {name: x})
    requested = [th.InferRequestedOutput(n, binary_data=False) for n in expected]
    result = client.infer(model, [infer_input], outputs=requested, request_id="json-1")
    response = result.get_response()
    assert (response["id"], response["model_name"], response["model_version"]) == ("json-1", model, "1")
    assert all("data" in o for o in response["outputs"])
    for out, want in expected.items():
        got = result.as_numpy(out)
        assert got.dtype == want.dtype and got.shape == want.shape
        # JSON numbers carry FP32 exactly (shortest round-trip form), so equal, not close.
        np.testing.assert_array_equal(got, want)


def test_plain_http_infer_answers_as_grpc_does(bundled: Running, client: httpx.Client) -> None:
    x = np.load(MODELS / "digits" / "heldout.npz")["X"][:5]
    reply = client.post("/v2/models/digits/versions/2/infer", json=infer_body(tensor("pixels", x), id="plain-7"))
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    document = reply.json()
    assert document["id"] == "plain-7" and document["model_version"] == "2"
    assert document["parameters"] == {"role": "pinned"}  # a version named in the path
    grpc_input = tc.InferInput("pixels", list(x.shape), "FP32")
    grpc_input.set_data_from_numpy(x)
    grpc_result = tc.InferenceServerClient(bundled.address).infer("digits", [grpc_input], model_version="2")
    for name in ("probabilities", "label"):
        np.testing.assert_array_equal(output(document, name), grpc_result.as_numpy(name))


def test_urllib_without_any_client_library(bundled: Running) -> None:
    x = np.zeros((1, 64), np.float32)
    body = json.dumps(infer_body(tensor("pixels", x), outputs=[{"name": "label"}])).encode()
    request = urllib.request.Request(
        f"http://{bundled.http}/v2/models/digits/infer", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        document = json.loads(response.read())
    assert [o["name"] for o in document["outputs"]] == ["label"]
    np.testing.assert_array_equal(output(document, "label"), offline("digits", "1", {"pixels": x})["label"])


def test_one_call_takes_about_a_millisecond_not_a_delayed_ack(client: httpx.Client) -> None:
    # Without TCP_NODELAY on accepted connections, every answer (headers and body
    # written apart) waited ~40 ms for the client's delayed ACK.
    body = infer_body(tensor("pixels", np.zeros((1, 64), np.float32)))
    client.post("/v2/models/digits/infer", json=body)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        assert client.post("/v2/models/digits/infer", json=body).status_code == 200
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.02, times
