"""`gateway bench` over REST: the REST targets beside gRPC, the REST load generator and its checks.

Behaviour only, never timings (the machine is shared). Servers are real: the
gateway (as `gateway bench` starts it, or in a thread), and for the timeout
a listening socket that never answers, the one thing no gateway will do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.protocol.pb import inference_pb2 as pb
from gateway.rest.codec import decode_infer
from loadtests.httpclient import HttpAnswer
from loadtests.loadgen import ClientPool, LoadSpec
from loadtests.restcall import RestMode, build_rest_call, check_rest_answer
from loadtests.signature import ModelSignature, build_request, load_signature
from tests.integration.test_bench import gateway_bench
from tests.support import MODELS, Running, gateway_in_thread

REST = ("gateway-rest-json", "gateway-rest-binary")


@pytest.fixture(scope="module")
def digits() -> ModelSignature:
    return load_signature(MODELS, "digits")


@pytest.fixture(scope="module")
def gateway() -> Iterator[Running]:
    with gateway_in_thread() as running:
        yield running


@pytest.fixture(scope="module")
def pool() -> Iterator[ClientPool]:
    with ClientPool(1, None) as clients:
        yield clients


def rest_spec(
    running: Running, signature: ModelSignature, body: RestMode, rows: int = 1, **changes: object
) -> LoadSpec:
    spec = LoadSpec(
        address=running.http,
        payload=b"",
        rows=rows,
        outputs=signature.outputs,
        mode="closed",
        offered=4.0,
        duration_s=0.5,
        warmup_s=0.1,
        channels=2,
        request_timeout_s=2.0,
        rest=build_rest_call(signature, rows, body, pin_version=False),
    )
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def test_rest_targets_run_side_by_side_with_grpc(tmp_path: Path) -> None:
    result = gateway_bench(
        "--smoke", "--baselines", "gateway,gateway-rest-json,gateway-rest-binary", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [json_path] = tmp_path.glob("bench-digits-*.json")
    data = json.loads(json_path.read_text())

    points = data["points"]
    assert [p["target"] for p in points] == ["gateway"] * 2 + ["gateway-rest-json"] * 2 + ["gateway-rest-binary"] * 2
    for point in points:
        assert point["offered"] in (1.0, 8.0)
        assert point["completed"] > 0 and point["throughput_rps"] > 0, point
        assert point["errors"] == {} and point["warmup_errors"] == {}, point
        # The server side is measured for REST too: its CPU and, through gRPC statistics, its batches.
        assert point["server_cpu_ms_per_1k"] > 0 and point["mean_batch"] >= 1, point
    for key in ("rest_json_over_gateway_rps", "rest_binary_over_gateway_rps"):
        assert set(data["ratios"][key]) == {"1", "8"}, key
        assert all(math.isfinite(v) and v > 0 for v in data["ratios"][key].values()), key
        assert data["ratios"]["peak"][key] > 0
    for target in REST:
        assert f"{target}: median of 1 repeat(s)" in result.stdout
    assert "REST binary / gRPC (gateway), req/s" in result.stdout
    assert "REST JSON / gRPC (gateway), req/s" in result.stdout


@pytest.mark.parametrize("mode", ["json", "binary"])
def test_rest_requests_carry_the_grpc_requests_tensors(digits: ModelSignature, mode: RestMode) -> None:
    call = build_rest_call(digits, 3, mode, pin_version=False)
    headers = dict(call.headers)
    decoded = decode_infer(call.body, headers.get("Inference-Header-Content-Length"), "digits", "")
    grpc = pb.ModelInferRequest.FromString(build_request(digits, 3, pin_version=False))
    assert [i.name for i in decoded.wire.inputs] == [i.name for i in grpc.inputs]
    assert [list(i.shape) for i in decoded.wire.inputs] == [list(i.shape) for i in grpc.inputs] == [[3, 64]]
    # Byte for byte the same tensors (JSON's shortest float32 digits parse back to the same float32).
    assert [i.raw for i in decoded.wire.inputs] == list(grpc.raw_input_contents)
    assert decoded.binary_default is (mode == "binary")
    assert call.path == "/v2/models/digits/infer"
    assert build_rest_call(digits, 3, mode, pin_version=True).path == "/v2/models/digits/versions/1/infer"


def test_rest_answer_check_finds_wrong_rows_missing_outputs_and_short_data() -> None:
    signature = load_signature(MODELS, "digits")
    probabilities = np.full((2, 10), 0.1, dtype=np.float32)
    label = np.zeros(2, dtype=np.int64)
    outputs: list[dict[str, object]] = [
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 10], "data": probabilities.ravel().tolist()},
        {"name": "label", "datatype": "INT64", "shape": [2], "data": label.tolist()},
    ]

    def answer(entries: list[dict[str, object]]) -> HttpAnswer:
        document = {"model_name": "digits", "model_version": "1", "outputs": entries}
        return HttpAnswer(json.dumps(document).encode(), None)

    assert check_rest_answer(answer(outputs), signature.outputs, 2) is None
    assert "expected 3 rows" in (check_rest_answer(answer(outputs), signature.outputs, 3) or "")
    assert "missing" in (check_rest_answer(answer(outputs[:1]), signature.outputs, 2) or "")
    short = [{**outputs[0], "data": probabilities.ravel()[:-1].tolist()}, outputs[1]]
    assert "bytes for FP32" in (check_rest_answer(answer(short), signature.outputs, 2) or "")
    # Binary: sizes in the JSON header, the data after it.
    header = json.dumps(
        {
            "model_name": "digits",
            "model_version": "1",
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [2, 10], "parameters": {"binary_data_size": 80}},
                {"name": "label", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}},
            ],
        }
    ).encode()
    body = header + probabilities.tobytes() + label.tobytes()
    assert check_rest_answer(HttpAnswer(body, len(header)), signature.outputs, 2) is None
    assert "left" in (check_rest_answer(HttpAnswer(body[:-1], len(header)), signature.outputs, 2) or "")
    assert "does not parse" in (check_rest_answer(HttpAnswer(b"<html>", None), signature.outputs, 2) or "")


@pytest.mark.parametrize("mode", ["json", "binary"])
def test_closed_and_open_loop_over_rest(
    gateway: Running, pool: ClientPool, digits: ModelSignature, mode: RestMode
) -> None:
    closed = pool.run(rest_spec(gateway, digits, mode, rows=2))
    assert closed.errors == {} and closed.warmup_errors == {}
    assert closed.completed > 0 and "response_problem" not in closed.extra
    assert closed.rows_per_s == pytest.approx(closed.throughput_rps * 2)
    opened = pool.run(rest_spec(gateway, digits, mode, mode="open", offered=200.0))
    assert opened.errors == {} and "response_problem" not in opened.extra
    # 100 arrivals expected; Poisson noise is about +-10, so this only fails if the schedule is wrong.
    assert 50 < opened.scheduled < 150
    assert opened.completed == opened.scheduled and opened.success_ratio == 1.0


def test_a_wrong_answer_is_reported(gateway: Running, pool: ClientPool, digits: ModelSignature) -> None:
    # Answers for one row, checked as answers for two: the check must notice.
    spec = rest_spec(gateway, digits, "binary", rows=2)
    point = pool.run(dataclasses.replace(spec, rest=build_rest_call(digits, 1, "binary", pin_version=False)))
    assert "expected 2 rows" in point.extra["response_problem"]


def test_refusals_are_counted_by_status(gateway: Running, pool: ClientPool, digits: ModelSignature) -> None:
    spec = rest_spec(gateway, digits, "json")
    assert spec.rest is not None
    unknown = dataclasses.replace(spec.rest, path="/v2/models/no-such-model/infer")
    point = pool.run(dataclasses.replace(spec, rest=unknown))
    assert point.completed == 0
    assert set(point.errors) == {"HTTP 404"} and point.errors["HTTP 404"] > 0


def test_a_silent_server_times_requests_out(pool: ClientPool, digits: ModelSignature) -> None:
    # Connections complete in the kernel's backlog; nothing ever reads or answers them.
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        spec = LoadSpec(
            address=address,
            payload=b"",
            rows=1,
            outputs=digits.outputs,
            mode="closed",
            offered=2.0,
            duration_s=1.0,
            warmup_s=0.1,
            channels=1,
            request_timeout_s=0.2,
            rest=build_rest_call(digits, 1, "json", pin_version=False),
        )
        point = pool.run(spec)
    assert point.completed == 0
    assert set(point.errors) == {"DEADLINE_EXCEEDED"} and point.errors["DEADLINE_EXCEEDED"] >= 2


def test_no_server_fails_the_point_at_once(pool: ClientPool, digits: ModelSignature) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
    spec = LoadSpec(
        address=address,  # closed above: nothing listens there now
        payload=b"",
        rows=1,
        outputs=digits.outputs,
        mode="closed",
        offered=1.0,
        duration_s=0.5,
        warmup_s=0.1,
        channels=1,
        request_timeout_s=2.0,
        rest=build_rest_call(digits, 1, "json", pin_version=False),
    )
    with pytest.raises(RuntimeError, match="CONNECT_FAILED"):
        pool.run(spec)
