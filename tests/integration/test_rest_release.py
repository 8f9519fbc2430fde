"""Requests over REST go through the same release plane as gRPC's: routing, shadows, feedback, capture, metrics.

One gateway serves digits with a 50 % canary (v2) and a shadow (v3), captures
every stable answer and exports metrics; REST and gRPC calls to it are compared.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2

from gateway.protocol.capture import capture_files, read_capture
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.routing import route_point
from tests.integration.rest_support import infer_body, output, tensor
from tests.integration.test_overload import metric
from tests.support import MODELS, Running, gateway_in_thread

RELEASE = """
[release]
stable = "1"
canary = "2"
canary_weight_bp = 5000
shadows = { "3" = 1.0 }
"""
KEYS = [f"user-{i}" for i in range(40)]
# Keys the 50 % split leaves on the stable version (gateway.release.routing), whose traffic is mirrored.
STABLE_KEYS = [k for k in KEYS if route_point(k) * 10_000 >= 5000]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("rest-release")
    shutil.copytree(MODELS / "digits", root / "digits")
    spec = root / "digits" / "model.toml"
    spec.write_text(spec.read_text().split("[release]")[0] + RELEASE)
    captures = root / "captures"
    with gateway_in_thread(
        root, metrics_port=0, controller=False, capture_dir=captures, capture_fraction=1.0
    ) as running:
        yield running


def rows(n: int = 1) -> np.ndarray:
    return np.load(MODELS / "digits" / "heldout.npz")["X"][:n]


def rest(server: Running, **fields: object) -> dict[str, object]:
    reply = httpx.post(
        f"http://{server.http}/v2/models/digits/infer", json=infer_body(tensor("pixels", rows()), **fields), timeout=30
    )
    assert reply.status_code == 200, reply.text
    document: dict[str, object] = reply.json()
    return document


def grpc_version(client: tc.InferenceServerClient, key: str, as_id: bool) -> str:
    pixels = tc.InferInput("pixels", [1, 64], "FP32")
    pixels.set_data_from_numpy(rows())
    if as_id:
        result = client.infer("digits", [pixels], request_id=key)
    else:
        result = client.infer("digits", [pixels], parameters={"routing_key": key})
    return str(result.get_response().model_version)


def control(server: Running) -> rgrpc.ReleaseServiceStub:
    return rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))


@pytest.mark.parametrize("as_id", [False, True], ids=["routing_key", "request_id"])
def test_a_key_lands_on_the_same_version_over_rest_as_over_grpc(server: Running, as_id: bool) -> None:
    chosen = {}
    client = tc.InferenceServerClient(server.address)
    for key in KEYS:
        fields: dict[str, object] = {"id": key} if as_id else {"parameters": {"routing_key": key}}
        versions = {str(rest(server, **fields)["model_version"]) for _ in range(2)}
        assert len(versions) == 1, f"{key} moved between {versions}"  # sticky
        chosen[key] = versions.pop()
        assert chosen[key] == grpc_version(client, key, as_id), key
    assert set(chosen.values()) == {"1", "2"}  # both sides of the 50 % split were reached


def test_a_routing_key_that_is_not_a_string_is_400(server: Running) -> None:
    reply = httpx.post(
        f"http://{server.http}/v2/models/digits/infer",
        json=infer_body(tensor("pixels", rows()), parameters={"routing_key": 7}),
        timeout=30,
    )
    assert reply.status_code == 400 and "routing_key" in reply.json()["error"]


def test_rest_traffic_is_mirrored_to_the_shadow(server: Running) -> None:
    stub = control(server)
    before = stub.GetReport(rpb.GetReportRequest(model="digits")).shadows["3"].mirrored
    for i in range(10):
        rest(server, id=f"shadowed-{i}", parameters={"routing_key": STABLE_KEYS[i % len(STABLE_KEYS)]})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        counters = stub.GetReport(rpb.GetReportRequest(model="digits")).shadows["3"]
        if counters.completed >= before + 10 and not counters.pending:
            break
        time.sleep(0.05)
    assert counters.mirrored >= before + 10 and counters.completed >= before + 10, counters


def test_labels_join_predictions_made_over_rest(server: Running) -> None:
    ids = [f"labelled-{i}" for i in range(6)]
    for request_id in ids:
        rest(server, id=request_id)
    items = [rpb.Feedback(request_id=request_id, labels=[1.0]) for request_id in ids]
    reply = control(server).SubmitFeedback(rpb.SubmitFeedbackRequest(model="digits", items=items), timeout=30)
    assert (reply.joined, reply.unknown, reply.rejected) == (6, 0, 0)


def test_stable_answers_over_rest_are_captured_as_grpc_bytes(server: Running) -> None:
    key = STABLE_KEYS[0]
    document = rest(server, id="captured-1", parameters={"routing_key": key, "timeout_us": 5_000_000})
    assert document["model_version"] == "1"
    assert server.gateway.capture is not None
    server.gateway.capture.flush()
    records = [r for path in capture_files([server.gateway.capture.directory]) for r in read_capture(path)]
    found = [r for r in records if service_pb2.ModelInferRequest.FromString(r.request).id == "captured-1"]
    assert len(found) == 1
    request = service_pb2.ModelInferRequest.FromString(found[0].request)
    assert request.model_name == "digits" and request.parameters["routing_key"].string_param == key
    assert request.parameters["timeout_us"].int64_param == 5_000_000
    np.testing.assert_array_equal(np.frombuffer(request.raw_input_contents[0], np.float32), rows().ravel())
    response = service_pb2.ModelInferResponse.FromString(found[0].response)
    labels = np.frombuffer(response.raw_output_contents[1], np.int64)
    np.testing.assert_array_equal(labels, output(document, "label"))


def test_rest_requests_are_counted_in_the_same_metrics(server: Running) -> None:
    before = metric(server, "gateway_requests_total", model="digits", version="3", outcome="ok")
    pinned = httpx.post(
        f"http://{server.http}/v2/models/digits/versions/3/infer", json=infer_body(tensor("pixels", rows())), timeout=30
    )
    assert pinned.status_code == 200
    assert metric(server, "gateway_requests_total", model="digits", version="3", outcome="ok") == before + 1
