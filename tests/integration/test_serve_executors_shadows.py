"""`gateway serve --executors 1`: shadow copies run in the executor at a lower priority than primaries.

Each worker's shadow lane waits for its own primaries, but the executor runs every
worker's requests: without the executor's own gate, a worker with nothing to do would
send its copies while another worker's primaries keep the executor busy. Here a long
primary (model `busy`, ~6 s of compute) holds the executor while short primaries of
`spin` are mirrored at 100% to a slow shadow version; every short primary is answered
in time, and not one copy runs until the long primary is done: the lanes count them
timed out or dropped (the executor answered them late or shed them), never failed.
Once the executor is idle, copies complete again.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.onnx_models import write_spin_model
from tests.support import Process, gateway_process

START_TIMEOUT_S = 180.0
SPEC = 'max_batch_size = 8\n[batching]\nmax_queue_delay_us = 0\nexecution = "thread"\n'
# How long the long primary keeps the executor busy: the checks below take 3-5 s on a loaded
# 2-core host (short primaries, the copies' deadlines, their outcomes published).
LONG_BUSY_S = 8.0
SHORT_SPIN = 10
OUTCOMES = ("mirrored", "dropped", "failed", "timed_out", "completed")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    root = tmp_path_factory.mktemp("shadow-priority")
    write_spin_model(root / "spin" / "1" / "model.onnx")
    write_spin_model(root / "spin" / "2" / "model.onnx", trip_scale=20)  # the slow shadow
    (root / "spin" / "model.toml").write_text(SPEC + '[release]\nstable = "1"\n')
    write_spin_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "model.toml").write_text(SPEC)
    args = ("--models", str(root), "--workers", "2", "--executors", "1", "--metrics-port", "0")
    with gateway_process(*args, timeout=START_TIMEOUT_S) as server:
        yield server


def long_spin(tmp: Path) -> int:
    """Iterations that keep the executor busy for LONG_BUSY_S on this machine, now: one
    iteration took 4 us on a quiet host and 25 us on a loaded one, so a fixed count either
    ended before the checks (quiet: the test proved nothing) or ran far longer than needed."""
    write_spin_model(tmp / "probe.onnx")
    session = ort.InferenceSession(str(tmp / "probe.onnx"), providers=["CPUExecutionProvider"])
    x, probe = np.zeros((1, 4), np.float32), 20_000
    runs = []
    for _ in range(5):
        begin = time.perf_counter()
        session.run(None, {"x": x, "spin": np.array([[probe]], np.int64)})
        runs.append(time.perf_counter() - begin)
    return int(LONG_BUSY_S * probe / max(min(runs), 1e-6))


def spin_request(model: str, spin: int) -> service_pb2.ModelInferRequest:
    r = service_pb2.ModelInferRequest(model_name=model)
    r.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    r.inputs.add(name="spin", datatype="INT64", shape=[1, 1])
    r.raw_input_contents.append(np.full((1, 4), 0.25, np.float32).tobytes())
    r.raw_input_contents.append(np.array([[spin]], np.int64).tobytes())
    return r


def shadow_counts(server: Process) -> dict[str, float]:
    """The shadow lanes' counters for spin version 2, every worker's added up (the supervisor's /metrics)."""
    url = f"http://127.0.0.1:{server.launched.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    counts = dict.fromkeys(OUTCOMES, 0.0)
    pattern = re.compile(r"gateway_shadow_requests_total\{([^}]*)\} (\S+)")
    for labels, value in pattern.findall(text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("model") == "spin" and found.get("version") == "2":
            counts[found["outcome"]] += float(value)
    return counts


def settled(server: Process, timeout_s: float = 30.0) -> dict[str, float]:
    """The counters once every mirrored copy has an outcome (the workers publish them every second or so)."""
    end = time.monotonic() + timeout_s
    while True:
        counts = shadow_counts(server)
        done = sum(counts[o] for o in OUTCOMES if o != "mirrored")
        if (counts["mirrored"] and done >= counts["mirrored"]) or time.monotonic() > end:
            return counts
        time.sleep(0.2)


async def short_primaries(server: Process, connections: int, each: int) -> list[float]:
    """`each` short requests on each of `connections` connections (the kernel spreads them over
    both workers); every one must be answered within its 1 s deadline. Their latencies, s."""

    async def one_connection(index: int) -> list[float]:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.primary_user_agent", f"short-{index}")]
        async with grpc.aio.insecure_channel(server.address, options=options) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            latencies = []
            for _ in range(each):
                start = time.monotonic()
                response = await infer.ModelInfer(spin_request("spin", SHORT_SPIN), timeout=1.0)
                latencies.append(time.monotonic() - start)
                assert response.model_version == "1"
            return latencies

    per_connection = await asyncio.gather(*(one_connection(i) for i in range(connections)))
    return [s for latencies in per_connection for s in latencies]


def test_shadow_copies_wait_for_every_workers_primaries_in_the_executor(served: Process, tmp_path: Path) -> None:
    spins = long_spin(tmp_path)
    control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(served.control))
    control.AddShadow(rpb.AddShadowRequest(model="spin", version="2", fraction=1.0), timeout=30)

    async def while_busy() -> tuple[list[float], bool, dict[str, float]]:
        async with grpc.aio.insecure_channel(served.address) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            long_call = asyncio.ensure_future(infer.ModelInfer(spin_request("busy", spins), timeout=120))
            await asyncio.sleep(0.5)  # the long primary is in the executor now
            latencies = await short_primaries(served, connections=8, each=3)
            # Past every copy's deadline (its primary's: 1 s), with the long primary still running.
            await asyncio.sleep(1.5)
            counts = await asyncio.to_thread(settled, served)
            still_running = not long_call.done()
            await long_call
            return latencies, still_running, counts

    latencies, still_running, counts = asyncio.run(while_busy())
    assert still_running, "the long primary ended too soon for the test to mean anything"
    assert len(latencies) == 24 and max(latencies) < 1.0, latencies
    # Not one copy ran while a primary was in the executor; none counts as the shadow's failure.
    assert counts["mirrored"] > 0, counts
    assert counts["completed"] == 0 and counts["failed"] == 0, counts
    assert counts["timed_out"] + counts["dropped"] == counts["mirrored"], counts

    # The executor idle again: copies run and complete.
    before = counts["completed"]
    end = time.monotonic() + 30
    while shadow_counts(served)["completed"] <= before and time.monotonic() < end:
        asyncio.run(short_primaries(served, connections=4, each=3))
        time.sleep(1.0)
    assert shadow_counts(served)["completed"] > before, shadow_counts(served)
