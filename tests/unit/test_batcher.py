"""DynamicBatcher in isolation: every future settled on every path, shapes never mixed, sizes respected.

The model here is a stand-in with the runtime's interface, so each test can
block a batch, fail it or return a wrong shape on purpose. The real runtime
and server are exercised in tests/integration/test_overload.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from gateway.config.spec import BatchingSpec
from gateway.errors import DeadlineExceeded, Draining, ModelExecutionError, Overloaded, QueueTimeout
from gateway.serving.batcher import DynamicBatcher
from gateway.serving.statistics import VersionStats
from gateway.types import RunTiming


class StandIn:
    """Doubles its input; can be held (blocked) or made to fail."""

    on_cuda = False
    output_names = ["y"]

    def __init__(self, fail: bool = False, wrong_rows: bool = False) -> None:
        self.batches: list[int] = []
        self.shapes: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail = fail
        self.wrong_rows = wrong_rows

    def estimate_seconds(self, rows: int) -> float:
        return 1.0  # always "expensive": batches go to threads, so a held batch never blocks the loop

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = feeds["x"]
        self.batches.append(x.shape[0])
        self.shapes.append(x.shape)
        self.started.set()
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        if self.wrong_rows:
            return [x[:-1] * 2]
        return [x * 2]


def make(model: StandIn, **spec: Any) -> DynamicBatcher:
    spec.setdefault("max_queue_delay_us", 0)
    spec.setdefault("instances", 1)
    return DynamicBatcher(model, BatchingSpec(**spec), 64, VersionStats(), ThreadPoolExecutor(4))  # type: ignore[arg-type]


def rows(n: int, width: int = 3, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"x": np.full((n, width), value, np.float32)}


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def hold_head(model: StandIn, batcher: DynamicBatcher) -> asyncio.Task[list[np.ndarray]]:
    """Occupy the only instance with a held batch."""
    model.gate.clear()
    head = asyncio.create_task(batcher.submit(rows(1), 1, None, None))
    await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 5)
    return head


def test_results_are_split_back_per_request() -> None:
    async def scenario() -> None:
        model = StandIn()
        batcher = make(model)
        head = await hold_head(model, batcher)
        calls = [asyncio.create_task(batcher.submit(rows(n, value=n), n, None, None)) for n in (1, 2, 3)]
        await wait_for(lambda: batcher.queue_depth() == 3)
        model.gate.set()
        results = await asyncio.gather(head, *calls)
        for n, result in zip((1, 2, 3), results[1:], strict=True):
            np.testing.assert_array_equal(result[0], np.full((n, 3), 2.0 * n, np.float32))
        assert model.batches == [1, 6]
        await batcher.close()

    asyncio.run(scenario())


def test_shapes_are_never_mixed() -> None:
    async def scenario() -> None:
        model = StandIn()
        batcher = make(model)
        head = await hold_head(model, batcher)
        calls = [asyncio.create_task(batcher.submit(rows(1, width=w), 1, None, None)) for w in (3, 5, 3, 5, 3)]
        await wait_for(lambda: batcher.queue_depth() == 5)
        model.gate.set()
        await asyncio.gather(head, *calls)
        assert sorted(model.shapes[1:]) == [(2, 5), (3, 3)]
        await batcher.close()

    asyncio.run(scenario())


def test_preferred_sizes_and_max_batch_are_respected() -> None:
    async def scenario() -> None:
        model = StandIn()
        batcher = make(model, preferred_batch_sizes=(4, 8))
        head = await hold_head(model, batcher)
        calls = [asyncio.create_task(batcher.submit(rows(1), 1, None, None)) for _ in range(11)]
        await wait_for(lambda: batcher.queue_depth() == 11)
        model.gate.set()
        await asyncio.gather(head, *calls)
        # 11 queued: the largest preferred size reached (8), then what is left (3).
        assert model.batches == [1, 8, 3]
        await batcher.close()

    asyncio.run(scenario())


def test_queue_full_is_refused_at_once() -> None:
    async def scenario() -> None:
        model = StandIn()
        batcher = make(model, max_queue_size=4)
        head = await hold_head(model, batcher)
        calls = [asyncio.create_task(batcher.submit(rows(1), 1, None, None)) for _ in range(4)]
        await wait_for(lambda: batcher.queue_depth() == 4)
        with pytest.raises(Overloaded, match="queue full"):
            await batcher.submit(rows(1), 1, None, None)
        model.gate.set()
        assert len(await asyncio.gather(head, *calls)) == 5
        await batcher.close()

    asyncio.run(scenario())


def test_errors_reach_every_request_of_the_batch() -> None:
    async def scenario() -> None:
        for model, match in ((StandIn(fail=True), "boom"), (StandIn(wrong_rows=True), "for a batch of 3 rows")):
            batcher = make(model)
            head = await hold_head(model, batcher)
            calls = [asyncio.create_task(batcher.submit(rows(1), 1, None, None)) for _ in range(3)]
            await wait_for(lambda b=batcher: b.queue_depth() == 3)
            model.gate.set()
            outcomes = await asyncio.gather(head, *calls, return_exceptions=True)
            assert len(outcomes) == 4
            for outcome in outcomes[1:]:
                assert isinstance(outcome, ModelExecutionError)
                assert match in str(outcome)
            await batcher.close()

    asyncio.run(scenario())


def test_cancelled_and_expired_requests_are_never_run() -> None:
    async def scenario() -> None:
        model = StandIn()
        batcher = make(model)
        head = await hold_head(model, batcher)
        cancelled = [asyncio.create_task(batcher.submit(rows(1), 1, None, None)) for _ in range(5)]
        timed = asyncio.create_task(batcher.submit(rows(1), 1, None, 0.02))
        past_deadline = asyncio.create_task(batcher.submit(rows(1), 1, time.monotonic() + 0.02, None))
        kept = asyncio.create_task(batcher.submit(rows(1), 1, None, None))
        await wait_for(lambda: batcher.queue_depth() == 8)
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)
        assert batcher.queue_depth() == 3  # cancelled requests left the queue at once
        with pytest.raises(QueueTimeout):
            await timed
        with pytest.raises(DeadlineExceeded):
            await past_deadline
        assert batcher.queue_depth() == 1
        model.gate.set()
        await head
        await kept
        assert model.batches == [1, 1]  # only the head and `kept` ever ran
        await batcher.close()

    asyncio.run(scenario())


def test_close_settles_everything_queued() -> None:
    async def scenario() -> None:
        model = StandIn()
        batcher = make(model)
        head = await hold_head(model, batcher)
        calls = [asyncio.create_task(batcher.submit(rows(1), 1, None, None)) for _ in range(3)]
        await wait_for(lambda: batcher.queue_depth() == 3)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.01)
        model.gate.set()
        await closing
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, Draining) for o in outcomes)
        assert (await head)[0].shape == (1, 3)  # the running batch still finished
        with pytest.raises(Draining):
            await batcher.submit(rows(1), 1, None, None)

    asyncio.run(scenario())


def test_a_lone_request_on_an_idle_model_runs_at_once_without_queueing() -> None:
    """Nothing queued or running and no load: the run happens inside submit, which never suspends."""

    async def scenario() -> None:
        model = StandIn()
        batcher = make(model, execution="inline", max_queue_delay_us=2000)
        call = batcher.submit(rows(2, value=3.0), 2, None, None)
        with pytest.raises(StopIteration) as finished:
            call.send(None)  # one step of the coroutine: it returns without awaiting anything
        np.testing.assert_array_equal(finished.value.value[0], np.full((2, 3), 6.0, np.float32))
        assert model.batches == [2]
        assert batcher.stats.execution_count == 1 and batcher.stats.queue.count == 1
        await batcher.close()

    asyncio.run(scenario())


def test_requests_arriving_together_are_batched_even_when_inline() -> None:
    """The first of a bunch may run at once; those arriving in the same pass of the loop queue and batch."""

    async def scenario() -> None:
        model = StandIn()
        batcher = make(model, execution="inline", max_queue_delay_us=2000)
        calls = [asyncio.create_task(batcher.submit(rows(1, value=n), 1, None, None)) for n in range(32)]
        results = await asyncio.gather(*calls)
        for n, result in enumerate(results):
            np.testing.assert_array_equal(result[0], np.full((1, 3), 2.0 * n, np.float32))
        assert model.batches == [1, 31]
        await batcher.close()

    asyncio.run(scenario())


def test_one_caller_sending_requests_one_after_another_never_waits_for_company() -> None:
    """The load-test gate times versions one request at a time from one task: each answer
    comes inline, and the next request, sent in the same pass of the loop, is not company
    (counted as such, a hold's timer tick became the candidate's p99 and the gate refused it)."""

    async def scenario() -> None:
        model = StandIn()
        batcher = make(model, execution="inline", max_queue_delay_us=2000)
        for n in range(200):
            call = batcher.submit(rows(1, value=n), 1, None, None)
            with pytest.raises(StopIteration) as finished:
                call.send(None)  # runs at once: never queued, never held
            np.testing.assert_array_equal(finished.value.value[0], np.full((1, 3), 2.0 * n, np.float32))
        assert model.batches == [1] * 200
        await batcher.close()

    asyncio.run(scenario())


def test_a_lone_request_that_fails_gets_its_error() -> None:
    async def scenario() -> None:
        for model, message in ((StandIn(fail=True), "model run failed: boom"), (StandIn(wrong_rows=True), "'y'")):
            batcher = make(model, execution="inline")
            with pytest.raises(ModelExecutionError, match=message):
                await batcher.submit(rows(2), 2, None, None)
            assert model.batches == [2]
            await batcher.close()

    asyncio.run(scenario())


def test_while_another_batch_runs_a_lone_request_is_not_held_for_the_whole_delay() -> None:
    """With instances > 1 the next batch gathers only while rows keep coming: one request waits a tick, not 0.5 s."""

    async def scenario() -> None:
        model = StandIn()
        batcher = make(model, instances=2, max_queue_delay_us=500_000)
        head = await hold_head(model, batcher)  # runs, held, on the first instance
        model.started.clear()
        start = time.monotonic()
        call = asyncio.create_task(batcher.submit(rows(1, value=4.0), 1, None, None))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 5)
        assert time.monotonic() - start < 0.25  # its batch started on the second instance, head still running
        assert model.batches == [1, 1]
        model.gate.set()
        np.testing.assert_array_equal((await call)[0], np.full((1, 3), 8.0, np.float32))
        await head
        await batcher.close()

    asyncio.run(scenario())


def test_a_traced_request_that_expires_in_the_queue_keeps_when_it_began_waiting() -> None:
    # Tracing makes the request's queue span from these times: without the enqueue time
    # a request that timed out waiting (the case a trace is read for) had no queue span.
    async def scenario() -> None:
        model = StandIn()
        batcher = make(model)
        head = await hold_head(model, batcher)
        timing = RunTiming()
        before = time.monotonic()
        with pytest.raises(QueueTimeout):
            await batcher.submit(rows(1), 1, None, 0.02, timing)
        assert before <= timing.enqueued <= time.monotonic()
        assert timing.dequeued == 0.0 and timing.started_ns == 0  # it never left the queue, never ran
        model.gate.set()
        await head
        await batcher.close()

    asyncio.run(scenario())
