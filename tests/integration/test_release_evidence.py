"""Canary, shadow and labels on the digits held-out split, through the real gateway.

Stable v1 with canary v2 at 30% (every canary request also run on v1 for
agreement) and v3 shadowing at 100%. After feedback for every row, the
report's accuracy and agreement for each version equal the figures computed
offline with onnxruntime on exactly the rows that version saw.

Both with the models run in the gateway's own process and in an executor
process (`gateway serve --executors 1`): the release plane (routing, the
canary's comparisons, the shadow's mirror, the labels' join) is the front
end's and must not notice where the model runs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.support import MODELS, Process, Running, gateway_in_thread, gateway_process

RELEASE = """
[release]
stable = "1"
canary = "2"
canary_weight_bp = 3000
canary_compare_fraction = 1.0
shadows = { "3" = 1.0 }
"""


@pytest.fixture(scope="module", params=["in-process", "executor"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running | Process]:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(MODELS / "digits", root / "digits")
    spec = root / "digits" / "model.toml"
    spec.write_text(spec.read_text().split("[release]")[0] + RELEASE)
    if request.param == "in-process":
        with gateway_in_thread(root) as running:
            yield running
        return
    # One front end (its evidence is the report at once: no other worker's to wait for) and one executor
    # running every version, shadow included.
    args = ("--models", str(root), "--workers", "1", "--executors", "1")
    with gateway_process(*args, timeout=120) as process:
        yield process
        # The executor really ran the models: the worker built no batcher of its own.
        assert any("on the executor process" in line for line in process.lines), process.lines[-20:]


def offline_labels(version: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(MODELS / "digits" / version / "model.onnx"), providers=["CPUExecutionProvider"])
    labels: np.ndarray = session.run(["label"], {"pixels": x})[0]
    return labels


def wait_for_shadows(control: rgrpc.ReleaseServiceStub) -> rpb.Report:
    deadline = time.monotonic() + 30
    while True:
        report = control.GetReport(rpb.GetReportRequest(model="digits"))
        counters = report.shadows.values()
        if all(c.pending == 0 for c in counters) or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def test_accuracy_and_agreement_equal_offline_on_the_same_rows(server: Running | Process) -> None:
    data = np.load(MODELS / "digits" / "heldout.npz")
    x, y = data["X"], data["y"]
    client = tc.InferenceServerClient(server.address)
    served: dict[str, list[int]] = {"1": [], "2": []}
    for i in range(len(x)):
        inp = tc.InferInput("pixels", [1, 64], "FP32")
        inp.set_data_from_numpy(x[i : i + 1])
        response = client.infer("digits", [inp], request_id=f"row-{i}").get_response()
        role = response.parameters["role"].string_param
        assert role == {"1": "stable", "2": "canary"}[response.model_version]
        served[response.model_version].append(i)
    # Sticky routing by request id at 30%: the canary's share is near the weight.
    assert abs(len(served["2"]) / len(x) - 0.3) < 0.06

    with grpc.insecure_channel(server.control) as channel:
        control = rgrpc.ReleaseServiceStub(channel)
        before = wait_for_shadows(control)
        assert before.shadows["3"].mirrored == len(served["1"])
        assert before.shadows["3"].dropped == 0 and before.shadows["3"].failed == 0
        for start in range(0, len(x), 100):
            items = [
                rpb.Feedback(request_id=f"row-{i}", labels=[float(y[i])])
                for i in range(start, min(start + 100, len(x)))
            ]
            reply = control.SubmitFeedback(rpb.SubmitFeedbackRequest(model="digits", items=items))
            assert (reply.joined, reply.unknown) == (len(items), 0)
        again = control.SubmitFeedback(
            rpb.SubmitFeedbackRequest(
                model="digits",
                items=[
                    rpb.Feedback(request_id="row-0", labels=[1.0]),
                    rpb.Feedback(request_id="never-seen", labels=[1.0]),
                ],
            )
        )
        # Joined once only: the resend is counted as already labelled, the unknown id as unknown.
        assert (again.joined, again.already_labelled, again.unknown) == (0, 1, 1)
        report = control.GetReport(rpb.GetReportRequest(model="digits"))

    by_version = {v.version: v for v in report.versions}
    assert {v: by_version[v].role for v in "123"} == {"1": "stable", "2": "canary", "3": "shadow"}
    stable_rows, canary_rows = np.array(served["1"]), np.array(served["2"])
    expected = {
        "1": (offline_labels("1", x[stable_rows]), y[stable_rows]),
        "2": (offline_labels("2", x[canary_rows]), y[canary_rows]),
        "3": (offline_labels("3", x[stable_rows]), y[stable_rows]),
    }
    for version, (predicted, truth) in expected.items():
        v = by_version[version]
        assert v.labelled == len(truth)
        assert v.accuracy == float(np.count_nonzero(predicted == truth)) / len(truth)
        assert v.accuracy_low <= v.accuracy <= v.accuracy_high
    # Agreement with the stable version on the same requests.
    v1_on_canary = offline_labels("1", x[canary_rows])
    assert by_version["2"].compared_rows == len(canary_rows)
    assert by_version["2"].agreement == float(np.count_nonzero(expected["2"][0] == v1_on_canary)) / len(canary_rows)
    assert by_version["3"].compared_rows == len(stable_rows)
    assert by_version["3"].agreement == float(np.count_nonzero(expected["3"][0] == expected["1"][0])) / len(stable_rows)
    # The accuracies differ as the models were built to (v2 > v1 > v3 on the whole split).
    assert by_version["3"].accuracy < by_version["1"].accuracy


def test_pinned_requests_bypass_the_split_and_traffic_changes_apply(server: Running | Process) -> None:
    client = tc.InferenceServerClient(server.address)
    inp = tc.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    pinned = client.infer("digits", [inp], model_version="3", request_id="pin").get_response()
    assert pinned.model_version == "3" and pinned.parameters["role"].string_param == "pinned"
    with grpc.insecure_channel(server.control) as channel:
        control = rgrpc.ReleaseServiceStub(channel)
        release = control.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=10_000))
        assert release.canary_weight_bp == 10_000
        versions = {client.infer("digits", [inp], request_id=f"k{i}").get_response().model_version for i in range(20)}
        assert versions == {"2"}
        with pytest.raises(grpc.RpcError) as caught:
            control.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="1", weight_bp=100))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as caught:
            control.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="9", weight_bp=100))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        control.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=3000))
