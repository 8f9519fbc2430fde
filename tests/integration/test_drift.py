"""Drift monitoring on a real gateway, through real gRPC clients (the inference API and the
control API's GetDrift), on digits' held-out rows (models/digits/reference.npz: the same rows).

- held-out rows: 20 closed windows (500 rows each), no alarm;
- brightness x0.6, or the 3 x 3 block at rows/columns 2..4 zeroed: an alarm once the
  first window closes (500 rows: 50 requests of 10), naming inked pixels / the block's;
- a version predicting class 0 three times as often: a prediction drift alarm;
- NaN/Inf counted, and refused with [monitor] reject_invalid naming the input;
- a rollout whose candidate shifts its predictions on the same rows is rolled back on
  policy.max_drift; `gateway drift --json` and `--plot` through the CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.support import MODELS, ROOT, Running, gateway_command, gateway_in_thread, poll_until

DATA = np.load(MODELS / "digits" / "heldout.npz")
X, Y = DATA["X"], DATA["y"]
ROWS = 10  # rows a request
BLOCK = {r * 8 + c for r in range(2, 5) for c in range(2, 5)}


def skewed_version(root: Path, version: str) -> None:
    """v1 with class 0's bias raised: it says 0 for about a third of the held-out rows."""
    model = onnx.load(MODELS / "digits" / "1" / "model.onnx")
    for i, t in enumerate(model.graph.initializer):
        if t.name == "b1":
            bias = numpy_helper.to_array(t).copy()
            bias[0] += 6.0
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(bias, "b1"))
    (root / version).mkdir()
    onnx.save(model, root / version / "model.onnx")


def repo(tmp_path: Path, extra: str = "", release: str = "") -> Path:
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    skewed_version(root / "digits", "4")
    spec = root / "digits" / "model.toml"
    text = spec.read_text().replace('[release]\nstable = "1"\n', '[release]\nstable = "1"\n' + release)
    # Every request binned (the default is a quarter), so the windows these tests count fill at once.
    monitor = "[monitor]\nsample = 1.0\n"
    extra = extra.replace("[monitor]\n", monitor) if "[monitor]\n" in extra else extra + "\n" + monitor
    spec.write_text(text + extra)
    return root


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Running]:
    with gateway_in_thread(repo(tmp_path), controller=False) as g:
        yield g


class Client:
    def __init__(self, g: Running) -> None:
        self.infer = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(g.address))
        self.control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(g.control))
        self.rng = np.random.default_rng(19)

    def send(self, rows: np.ndarray, version: str = "") -> service_pb2.ModelInferResponse:
        request = service_pb2.ModelInferRequest(model_name="digits", model_version=version)
        request.inputs.add(name="pixels", datatype="FP32", shape=list(rows.shape))
        request.raw_input_contents.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        response: service_pb2.ModelInferResponse = self.infer.ModelInfer(request, timeout=10)
        return response

    def windows(self, n: int, change: Callable[[np.ndarray], np.ndarray] = lambda r: r, version: str = "1") -> None:
        for _ in range(n * 500 // ROWS):
            self.send(change(X[self.rng.integers(len(X), size=ROWS)]), version)

    def drift(self, version: str = "1") -> rpb.VersionDrift:
        report = self.control.GetDrift(rpb.GetDriftRequest(model="digits", version=version), timeout=10)
        (only,) = report.versions
        return only


def pixel(name: str) -> int:
    return int(name[len("pixels[") : -1])


def test_held_out_rows_raise_no_alarm_over_20_windows(gateway: Running) -> None:
    client = Client(gateway)
    for window in range(20):
        client.windows(1)
        v = client.drift()
        assert v.windows_closed == window + 1 and v.judged == "closed"
        assert not v.alarm, [(f.name, f.psi, f.p_value) for f in v.features]
    assert v.over_threshold == 0 and v.score < 0.2 and v.prediction.psi < 0.2
    assert dict(v.nonfinite) == {} and dict(v.out_of_range) == {"pixels": 0}


def test_dimmed_rows_alarm_within_one_window_naming_inked_pixels(gateway: Running) -> None:
    client = Client(gateway)
    client.windows(1, lambda r: r * 0.6)
    v = client.drift()
    assert v.alarm and v.over_threshold >= 20
    inked = set(np.nonzero(X.mean(axis=0) > 4)[0])
    assert {pixel(f.name) for f in v.features} <= inked


def test_a_zeroed_block_alarms_within_one_window_naming_its_pixels(gateway: Running) -> None:
    client = Client(gateway)

    def zero_block(rows: np.ndarray) -> np.ndarray:
        out = rows.reshape(-1, 8, 8).copy()
        out[:, 2:5, 2:5] = 0
        return out.reshape(-1, 64)

    client.windows(1, zero_block)
    v = client.drift()
    assert v.alarm
    named = {pixel(f.name) for f in v.features if f.drifting}
    assert len(named) >= 5 and named <= BLOCK, named


def test_a_version_predicting_one_class_far_more_often_raises_a_prediction_alarm(gateway: Running) -> None:
    client = Client(gateway)
    client.windows(1, version="4")
    v = client.drift("4")
    assert v.alarm and v.prediction.drifting and v.over_threshold == 0
    assert v.prediction.live[0] > 2.5 * v.prediction.reference[0] * v.rows / sum(v.prediction.reference)
    client.windows(1, version="1")
    assert not client.drift("1").alarm


def test_nan_and_inf_are_counted(gateway: Running) -> None:
    client = Client(gateway)
    rows = X[:4].copy()
    rows[0, 3], rows[2, 9] = np.nan, np.inf
    client.send(rows, "1")
    v = client.drift()
    assert dict(v.nonfinite) == {"pixels": 2} and v.rejected == 0 and v.open_rows == 4


def test_reject_invalid_refuses_nan_naming_the_input(tmp_path: Path) -> None:
    with gateway_in_thread(repo(tmp_path, "\n[monitor]\nreject_invalid = true\n"), controller=False) as g:
        client = Client(g)
        rows = X[:2].copy()
        rows[1, 5] = np.inf
        with pytest.raises(grpc.RpcError) as refused:
            client.send(rows, "1")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'pixels' holds 1 NaN or infinite value(s)" in str(refused.value.details())
        client.send(X[:2], "1")  # finite rows are served
        v = client.drift()
        assert v.rejected == 1 and dict(v.nonfinite) == {"pixels": 1}


POLICY = """
[policy]
interval_s = 0.5
step_weights = [50]
threshold = 1
min_samples = 100
max_latency_ratio = 0          # off: timing on a shared box is noise
max_error_increase = -1        # off: only prediction drift decides here
max_drift = 0.05
max_duration_s = 120
step_min_samples = 50
step_min_duration_s = 1
"""


def test_a_candidate_whose_predictions_drift_is_rolled_back_on_max_drift(tmp_path: Path) -> None:
    root = repo(tmp_path, POLICY, release="canary_compare_fraction = 1.0\n")
    with gateway_in_thread(root) as g:
        client = Client(g)
        client.control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="4", reason="skewed"))

        def release() -> rpb.Release:
            return client.control.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10)

        def burst() -> None:
            for _ in range(40):
                request = service_pb2.ModelInferRequest(model_name="digits", id=f"r{client.rng.integers(1 << 30)}")
                request.inputs.add(name="pixels", datatype="FP32", shape=[ROWS, 64])
                request.raw_input_contents.append(X[client.rng.integers(len(X), size=ROWS)].tobytes())
                client.infer.ModelInfer(request, timeout=10)

        done = poll_until(release, lambda r: r.phase == "rolled_back", burst, 90, "the rollback")
        assert done.stable == "1" and done.canary == ""
        records = client.control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records
        rollback = [r for r in records if r.action == "rollback"][-1]
        assert rollback.actor == "controller" and "prediction_drift" in rollback.reason
        check = next(c for c in json.loads(rollback.evidence_json) if c["check"] == "prediction_drift")
        assert check["verdict"] == "fail" and check["low"] > 0.05 and check["bound"] == 0.05


def test_the_cli_prints_json_and_draws_the_plot(gateway: Running, tmp_path: Path) -> None:
    client = Client(gateway)
    client.windows(1, lambda r: r * 0.6)
    cli = gateway_command("drift", "digits", "--control", gateway.control)
    shown = subprocess.run([*cli, "--version", "1", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    (v,) = data["versions"]
    assert v["alarm"] and v["judged"] == "closed" and v["features"][0]["drifting"]
    table = subprocess.run(cli, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert table.returncode == 0 and "ALARM" in table.stdout and "version 4" in table.stdout
    png = tmp_path / "drift.png"
    drawn = subprocess.run([*cli, "--plot", str(png)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert drawn.returncode == 0, drawn.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = ROOT / "test-artifacts"
    if artifacts.is_dir():  # kept for a look, like the dashboard's screenshots
        shutil.copy(png, artifacts / "drift.png")


def test_a_failing_monitor_never_fails_a_request_and_turns_itself_off(gateway: Running) -> None:
    # Monitoring runs after the model answered: a bug in it (here, injected) must not turn a
    # good answer into an error, nor keep failing every request after it.
    releases = gateway.gateway.releases
    assert releases is not None and "digits" in releases.monitors

    def broken(*_: object) -> None:
        raise ValueError("injected monitoring bug")

    releases.monitors["digits"].record = broken  # type: ignore[method-assign,assignment]
    client = Client(gateway)
    for _ in range(3):
        assert client.send(X[:2]).outputs  # answered every time
    assert "digits" not in releases.monitors
