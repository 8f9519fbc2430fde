"""One bad request fails only itself, never the requests batched with it (issue #21 item 6).

The spin model's faulty version fails its whole run (an out-of-range Gather
index) once any x in the batch is > 0.5. Good requests (x <= 0.5) queued
behind a long-running head batch together with a bad one; the batch's run
fails, the batcher runs each member again on its own, and only the bad one
gets the error.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2_grpc

from gateway.config.spec import BatchingSpec
from gateway.errors import ModelExecutionError
from gateway.serving.batcher import DynamicBatcher
from gateway.serving.statistics import VersionStats
from tests.integration.test_overload import batcher_of, metric, request, wait_until
from tests.onnx_models import write_spin_model
from tests.support import Running, gateway_in_thread

# About 0.5 s of head batch (see tests/integration/test_overload.py): the others queue meanwhile.
HEAD_SPIN = 200_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    write_spin_model(tmp_path / "spin" / "1" / "model.onnx", fault="raise")
    (tmp_path / "spin" / "model.toml").write_text(
        'max_batch_size = 8\n[batching]\nmax_queue_delay_us = 0\ninstances = 1\nexecution = "thread"\n'
    )
    with gateway_in_thread(tmp_path, metrics_port=0) as running:
        yield running


def test_a_bad_request_fails_alone_and_its_batch_neighbours_get_their_answers(server: Running) -> None:
    good = [0.1, 0.2, 0.3, 0.4, 0.45]
    bad = 0.9

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            head = asyncio.ensure_future(stub.ModelInfer(request(HEAD_SPIN, value=0.0)))
            await wait_until(lambda: batcher_of(server).running() == 1)
            values = [*good[:2], bad, *good[2:]]
            calls = [asyncio.ensure_future(stub.ModelInfer(request(0, value=v), timeout=30)) for v in values]
            # All of them wait behind the head, so they go into one batch.
            await wait_until(lambda: batcher_of(server).queue_depth() == len(values))
            await head
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for value, outcome in zip(values, outcomes, strict=True):
            if value == bad:
                assert isinstance(outcome, grpc.aio.AioRpcError)
                assert outcome.code() == grpc.StatusCode.INTERNAL
            else:
                assert not isinstance(outcome, BaseException), (value, outcome)
                y = np.frombuffer(outcome.raw_output_contents[0], np.float32)
                np.testing.assert_allclose(y, np.full(4, value, np.float32))

    asyncio.run(scenario())
    # The failed batch of six was run again a member at a time, and counted.
    assert batcher_of(server).reruns == 6
    assert metric(server, "gateway_batch_reruns_total", model="spin", version="1") == 6
    assert metric(server, "gateway_requests_total", model="spin", outcome="error") == 1


class FailsOnValue:
    """Doubles its input; a run with any row equal to `bad` fails whole, as a runtime would."""

    on_cuda = False
    output_names = ["y"]

    def __init__(self, bad: float) -> None:
        self.bad = bad
        self.runs: list[int] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def estimate_seconds(self, rows: int) -> float:
        return 1.0  # batches on threads

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = feeds["x"]
        self.runs.append(x.shape[0])
        self.started.set()
        self.gate.wait(10)
        if np.any(x == self.bad):
            raise ModelExecutionError(f"bad value {self.bad} in the batch")
        return [x * 2]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=8),
    bad_at=st.sets(st.integers(0, 7), max_size=3),
)
def test_only_the_members_with_a_bad_value_fail(sizes: list[int], bad_at: set[int]) -> None:
    """Any mix of request sizes and bad members: each member's answer is its own run's."""
    bad = -1.0

    async def scenario(pool: ThreadPoolExecutor) -> None:
        model = FailsOnValue(bad)
        spec = BatchingSpec(max_queue_delay_us=0, instances=1)
        batcher = DynamicBatcher(model, spec, 64, VersionStats(), pool)  # type: ignore[arg-type]
        head = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, None, None))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 5)
        feeds = [{"x": np.full((n, 2), bad if i in bad_at else float(i + 1), np.float32)} for i, n in enumerate(sizes)]
        calls = [asyncio.ensure_future(batcher.submit(f, f["x"].shape[0], None, None)) for f in feeds]
        while batcher.queue_depth() < len(calls):
            await asyncio.sleep(0.001)
        model.gate.set()
        await head
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.close()
        for i, (f, outcome) in enumerate(zip(feeds, outcomes, strict=True)):
            if i in bad_at:
                assert isinstance(outcome, ModelExecutionError)
            else:
                assert not isinstance(outcome, BaseException), outcome
                np.testing.assert_array_equal(outcome[0], f["x"] * 2)
        any_bad = any(i in bad_at for i in range(len(sizes)))
        assert batcher.reruns == (len(sizes) if any_bad and len(sizes) > 1 else 0)

    with ThreadPoolExecutor(2) as pool:
        asyncio.run(scenario(pool))
