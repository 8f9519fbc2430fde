"""REST errors: the same table as gRPC's, as HTTP statuses with JSON `{"error": ...}`.

400 names the field, 404 the model, 429 (queue full) carries Retry-After, 503
answers new calls while a drain finishes those in flight, and 500 keeps the
details in the log. The `spin` model holds its one instance as long as a test
needs (tests/onnx_models.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.integration.rest_support import infer_body, tensor
from tests.onnx_models import write_spin_model
from tests.support import Running, gateway_in_thread

QUEUE = 1
# A few tenths of a second of run on this machine (see tests/integration/test_overload.py).
HEAD_SPIN = 30_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    write_spin_model(tmp_path / "spin" / "1" / "model.onnx")
    write_spin_model(tmp_path / "spin" / "2" / "model.onnx", fault="raise")
    (tmp_path / "spin" / "model.toml").write_text(
        "max_batch_size = 8\n"
        f'[batching]\nmax_queue_delay_us = 0\nmax_queue_size = {QUEUE}\ninstances = 1\nexecution = "thread"\n'
        '[release]\nstable = "1"\n'
    )
    with gateway_in_thread(tmp_path) as running:
        yield running


def spin_body(spin: int, value: float = 0.25, **fields: Any) -> dict[str, Any]:
    return infer_body(
        tensor("x", np.full((1, 4), value, np.float32)),
        tensor("spin", np.array([[spin]], np.int64), "INT64"),
        **fields,
    )


def running(server: Running) -> int:
    """Batches the stable version is running now."""
    assert server.gateway.registry is not None
    batcher: Any = server.gateway.registry.get("spin", "1").executor
    return int(batcher.running())


def post(server: Running, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"http://{server.http}{path}", timeout=30, **kwargs)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (infer_body(tensor("nope", np.zeros((1, 4), np.float32))), "unknown input 'nope'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}, "inputs[0]: no data"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, "4"], "data": []}]}, "inputs[0].shape"),
        ({"inputs": [{"name": "x", "datatype": "FP33", "shape": [1], "data": [1]}]}, "inputs[0].datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2]}]}, "inputs[0].data"),
        ({"inputs": {}}, "inputs: expected an array"),
        ({"inputs": [], "parameters": {"timeout_us": [1]}}, "parameters.timeout_us"),
        (spin_body(0, parameters={"timeout_us": "soon"}), "parameter 'timeout_us'"),
        (spin_body(0, outputs=[{"name": "z"}]), "unknown requested output 'z'"),
    ],
)
def test_a_bad_request_is_400_naming_the_field(server: Running, body: Any, field: str) -> None:
    reply = post(server, "/v2/models/spin/infer", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert field in reply.json()["error"]


def test_a_body_that_is_not_json_is_400(server: Running) -> None:
    reply = post(server, "/v2/models/spin/infer", content=b'{"inputs": [')
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("the request body is not valid JSON")


def test_an_unknown_model_or_version_is_404(server: Running) -> None:
    reply = post(server, "/v2/models/nope/infer", json=spin_body(0))
    assert reply.status_code == 404 and "'nope'" in reply.json()["error"]
    reply = post(server, "/v2/models/spin/versions/7/infer", json=spin_body(0))
    assert reply.status_code == 404 and "7" in reply.json()["error"]
    assert httpx.get(f"http://{server.http}/v2/models/nope", timeout=30).status_code == 404


def test_tritonclient_raises_with_the_status_and_message(server: Running) -> None:
    client = th.InferenceServerClient(server.http)
    bad = th.InferInput("x", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    spin = th.InferInput("spin", [1, 1], "INT64")
    spin.set_data_from_numpy(np.zeros((1, 1), np.int64))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("spin", [bad, spin])
    assert raised.value.status() == "400"
    assert "dimension 1 must be 4" in raised.value.message()


def test_a_failing_model_run_is_500_with_details_only_in_the_log(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    reply = post(server, "/v2/models/spin/versions/2/infer", json=spin_body(0, value=0.9, id="boom"))
    assert reply.status_code == 500
    assert reply.json() == {"error": "internal error (details are in the gateway log)"}


def test_a_full_queue_is_429_with_retry_after(server: Running) -> None:
    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://{server.http}", timeout=60) as client:
            head = asyncio.ensure_future(client.post("/v2/models/spin/infer", json=spin_body(HEAD_SPIN)))
            while not running(server):  # the head holds the one instance
                await asyncio.sleep(0.005)
            rest = [client.post("/v2/models/spin/infer", json=spin_body(0)) for _ in range(QUEUE + 12)]
            return [await head, *await asyncio.gather(*rest)]

    replies = asyncio.run(scenario())
    assert replies[0].status_code == 200
    refused = [r for r in replies if r.status_code == 429]
    assert refused, [r.status_code for r in replies]
    assert all(r.headers["retry-after"] == "1" and "queue" in r.json()["error"] for r in refused)
    assert {r.status_code for r in replies} <= {200, 429}


def test_a_drain_answers_new_calls_503_and_finishes_those_in_flight(server: Running) -> None:
    head: list[httpx.Response] = []
    body = spin_body(HEAD_SPIN)
    sender = threading.Thread(target=lambda: head.append(post(server, "/v2/models/spin/infer", json=body)))
    sender.start()
    assert server.gateway.dataplane is not None
    while not running(server):
        threading.Event().wait(0.005)
    drained = asyncio.run_coroutine_threadsafe(server.gateway.drain(30), server.loop)
    while not server.gateway.dataplane.draining:
        threading.Event().wait(0.01)
    refused = post(server, "/v2/models/spin/infer", json=spin_body(0))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "shutting down" in refused.json()["error"]
    not_ready = httpx.get(f"http://{server.http}/v2/health/ready", timeout=30)
    assert not_ready.status_code == 400
    sender.join(60)
    assert head[0].status_code == 200  # the call in flight was answered
    drained.result(60)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{server.http}/v2/health/live", timeout=5)


def test_a_client_that_leaves_mid_body_is_no_error(server: Running, caplog: pytest.LogCaptureFixture) -> None:
    host, port = server.http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b'POST /v2/models/spin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"inputs": [')
    ready = httpx.get(f"http://{server.http}/v2/health/ready", timeout=30)
    assert ready.status_code == 200
    assert post(server, "/v2/models/spin/infer", json=spin_body(0)).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
