"""ShadowLane in isolation: copies gathered into batches, compared exactly as one by one.

The executor here is a stand-in with the Executor interface (a linear map in
numpy), so a test can count runs, hold the primary busy or fail a run on
purpose. The real runtime behind a shadow is exercised end to end in
tests/integration/test_shadow_faults.py and tests/integration/test_release_evidence.py.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal

import numpy as np
import pytest

from gateway.config.spec import CompareSpec
from gateway.errors import ShadowLate, ShadowShed
from gateway.release.compare import PairWindow, compare_outputs
from gateway.release.evidence import ModelEvidence
from gateway.release.plane import DualRunSink, ShadowSink
from gateway.release.shadow import ShadowCopy, ShadowLane
from gateway.types import RequestRun, RunTiming, Tensors

WEIGHTS = np.random.default_rng(7).normal(size=(4, 3)).astype(np.float32)


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on a fresh event loop (the suite has no async plugin)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


class LinearExecutor:
    """x @ WEIGHTS per row; records the rows of every run; can be made to fail."""

    def __init__(self, fail: bool = False, refuse: Exception | None = None) -> None:
        self.runs: list[int] = []
        self.fail = fail
        self.refuse = refuse  # raised instead of running (what a busy executor process answers)

    async def submit(
        self,
        feeds: Tensors,
        batch: int,
        deadline: float | None,
        timeout_s: float | None,
        timing: RunTiming | None = None,
    ) -> list[np.ndarray]:
        if self.refuse is not None:
            raise self.refuse
        self.runs.append(batch)
        if self.fail:
            raise RuntimeError("broken shadow")
        return [feeds["x"] @ WEIGHTS]

    def queue_depth(self) -> int:
        return 0

    def busy(self) -> bool:
        return False

    async def close(self) -> None:
        return None


class Primary:
    """A primary path whose idleness the test controls."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.event.set()

    def is_idle(self) -> bool:
        return self.event.is_set()

    async def wait_idle(self) -> None:
        await self.event.wait()


def request(seed: int, rows: int = 1) -> Tensors:
    return {"x": np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)}


def primary_answer(feeds: Tensors, noise: float, flip: bool = False) -> list[np.ndarray]:
    """The stable version's answer: the shadow's plus a little noise, so comparisons differ from
    zero; `flip` rotates the classes, so top-1 disagrees."""
    out = feeds["x"] @ WEIGHTS
    noisy = (out + noise * np.abs(out)).astype(np.float32)
    return [np.roll(noisy, 1, axis=1) if flip else noisy]


class Collect:
    """A sink that remembers each batch it was given."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []  # (copies, rows)

    def __call__(self, copies: Sequence[ShadowCopy], outputs: list[np.ndarray], seconds: float) -> bool:
        self.batches.append((len(copies), outputs[0].shape[0]))
        return True


async def settle(lane: ShadowLane, tasks: set[asyncio.Task[None]]) -> None:
    while tasks:
        await asyncio.gather(*list(tasks))


def ran(
    feeds: Tensors, outputs: list[np.ndarray], *, rid: str = "", seconds: float = 0.0, deadline: float | None = None
) -> RequestRun:
    """The primary's run of `feeds`, as the release plane hands it to a lane."""
    rows = next(iter(feeds.values())).shape[0]
    return RequestRun(request_id=rid, feeds=feeds, rows=rows, outputs=outputs, seconds=seconds, deadline=deadline)


def mirror(lane: ShadowLane, feeds: Tensors, sink: object, tasks: set[asyncio.Task[None]], rid: str = "") -> None:
    lane.mirror(ran(feeds, primary_answer(feeds, 0.0), rid=rid, seconds=0.001), sink, tasks)  # type: ignore[arg-type]


@in_loop
async def test_copies_gathered_in_the_window_run_as_one_batch_in_order() -> None:
    executor, sink, tasks = LinearExecutor(), Collect(), set[asyncio.Task[None]]()
    lane = ShadowLane(executor, max_rows=64, gather_s=0.01)
    for i in range(10):
        mirror(lane, request(i, rows=1 + i % 3), sink, tasks)
    assert lane.pending == 10 and executor.runs == []  # nothing runs before the window closes
    await settle(lane, tasks)
    assert executor.runs == [sum(1 + i % 3 for i in range(10))]
    assert sink.batches == [(10, 19)]
    assert lane.pending == 0 and lane.counters.completed == 10


@in_loop
async def test_a_batch_never_exceeds_max_rows_and_never_mixes_shapes() -> None:
    executor, sink, tasks = LinearExecutor(), Collect(), set[asyncio.Task[None]]()
    lane = ShadowLane(executor, max_rows=4, gather_s=0.005)
    for i in range(6):
        mirror(lane, request(i, rows=2), sink, tasks)
    await settle(lane, tasks)
    assert executor.runs == [4, 4, 4]
    assert lane.counters.completed == 6

    # A copy whose non-batch shape differs runs apart from the others.
    class Shapes(LinearExecutor):
        async def submit(
            self,
            feeds: Tensors,
            batch: int,
            deadline: float | None,
            timeout_s: float | None,
            timing: RunTiming | None = None,
        ) -> list[np.ndarray]:
            self.runs.append(feeds["x"].shape[1])
            return [np.zeros((batch, 3), np.float32)]

    shapes = Shapes()
    lane = ShadowLane(shapes, max_rows=64, gather_s=0.005)
    wide = {"x": np.zeros((1, 8), np.float32)}
    for feeds in (request(1), wide, request(2)):
        lane.mirror(ran(feeds, [np.zeros((1, 3), np.float32)]), sink, tasks)
    await settle(lane, tasks)
    assert shapes.runs == [4, 8]


@in_loop
async def test_without_a_batch_dimension_each_copy_runs_alone() -> None:
    executor, sink, tasks = LinearExecutor(), Collect(), set[asyncio.Task[None]]()
    lane = ShadowLane(executor, max_rows=0, gather_s=0.005)
    for i in range(3):
        mirror(lane, request(i), sink, tasks)
    await settle(lane, tasks)
    assert executor.runs == [1, 1, 1]


@in_loop
async def test_copies_wait_for_the_primary_and_expire_there_without_blaming_the_shadow() -> None:
    executor, sink, tasks = LinearExecutor(), Collect(), set[asyncio.Task[None]]()
    primary = Primary()
    primary.event.clear()  # the primary is busy throughout
    lane = ShadowLane(executor, max_rows=64, gather_s=0.001, default_timeout_s=0.05, primary=primary)
    for i in range(3):
        mirror(lane, request(i), sink, tasks)
    await settle(lane, tasks)
    assert executor.runs == []  # never ran ahead of the primary
    assert lane.counters.timed_out == 3 and lane.pending == 0
    assert not lane.breaker.failures  # waiting on the primary says nothing about the shadow

    primary.event.set()
    mirror(lane, request(9), sink, tasks)
    await settle(lane, tasks)
    assert executor.runs == [1] and lane.counters.completed == 1


@in_loop
async def test_the_bound_drops_copies_and_a_failing_batch_counts_every_copy() -> None:
    executor, sink, tasks = LinearExecutor(fail=True), Collect(), set[asyncio.Task[None]]()
    lane = ShadowLane(executor, max_rows=64, max_pending=4, gather_s=0.005)
    for i in range(6):
        mirror(lane, request(i), sink, tasks)
    assert lane.counters.mirrored == 4 and lane.counters.dropped == 2
    await settle(lane, tasks)
    assert executor.runs == [4]
    assert lane.counters.failed == 4 and lane.breaker.failures == 1  # one run, one strike


@pytest.mark.parametrize(
    ("refusal", "outcome"),
    [(ShadowShed("busy"), "dropped"), (ShadowLate("late"), "timed_out")],
    ids=["shed", "late"],
)
def test_an_executor_busy_with_primaries_counts_copies_dropped_or_late_never_against_the_shadow(
    refusal: Exception, outcome: str
) -> None:
    async def scenario() -> None:
        executor, sink, tasks = LinearExecutor(refuse=refusal), Collect(), set[asyncio.Task[None]]()
        lane = ShadowLane(executor, max_rows=64, gather_s=0.002)
        for round_ in range(8):  # more rounds than the breaker's threshold (5)
            for i in range(3):
                mirror(lane, request(round_ * 10 + i), sink, tasks)
            await settle(lane, tasks)
        counts = lane.counters
        assert getattr(counts, outcome) == 24 and counts.failed == 0 and counts.completed == 0
        assert lane.breaker.failures == 0 and not lane.breaker.is_open

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_stacked_comparison_equals_comparing_each_request(kind: Literal["classification", "regression"]) -> None:
    spec = CompareSpec(kind=kind, atol=1e-3, rtol=1e-2)
    rng = np.random.default_rng(3)
    one_by_one, stacked = PairWindow(), PairWindow()
    bases, cands, diffs = [], [], []
    for i in range(20):
        base = rng.normal(size=(1 + i % 4, 5))
        cand = base + rng.normal(scale=0.02, size=base.shape) * (i % 2)
        compare_outputs(one_by_one, base, cand, spec, 0.001 * i)
        bases.append(base)
        cands.append(cand)
        diffs.append(0.001 * i)
    compare_outputs(stacked, np.concatenate(bases), np.concatenate(cands), spec, sum(diffs), requests=20)
    assert (stacked.requests, stacked.rows, stacked.agree, stacked.within_tolerance, stacked.elements) == (
        one_by_one.requests,
        one_by_one.rows,
        one_by_one.agree,
        one_by_one.within_tolerance,
        one_by_one.elements,
    )
    assert stacked.within_tolerance not in (0, stacked.rows)  # the data exercises both outcomes
    assert stacked.max_abs == one_by_one.max_abs
    for name in ("sum_abs", "sq_diff", "sq_base", "latency_diff_s"):
        assert getattr(stacked, name) == pytest.approx(getattr(one_by_one, name), rel=1e-12)


@in_loop
async def test_shadow_sink_logs_each_request_and_compares_like_one_by_one() -> None:
    batched, single = ModelEvidence("m", CompareSpec(), 0), ModelEvidence("m", CompareSpec(), 0)
    tasks = set[asyncio.Task[None]]()
    lane = ShadowLane(LinearExecutor(), max_rows=64, gather_s=0.005)
    requests = [request(i, rows=1 + i % 2) for i in range(8)]
    for i, feeds in enumerate(requests):
        reference = primary_answer(feeds, 0.05 * (i % 3), flip=i % 4 == 1)
        lane.mirror(ran(feeds, reference, rid=f"r{i}", seconds=0.002), ShadowSink(batched, "3"), tasks)
        # The same request compared on its own, as the lane did before it batched.
        shadow = feeds["x"] @ WEIGHTS
        assert single.record_pair("3", reference[0], shadow, 0.0)
        single.record_prediction(f"r{i}", "3", "shadow", [shadow])
    await settle(lane, tasks)
    got, want = batched.pairs["3"], single.pairs["3"]
    assert (got.requests, got.rows, got.agree, got.within_tolerance) == (
        want.requests,
        want.rows,
        want.agree,
        want.within_tolerance,
    )
    assert got.agree < got.rows  # the noise flips some top-1s: agreement is really measured
    assert batched.window("3").requests == 8 and batched.window("3").rows == 12
    for i, feeds in enumerate(requests):
        label = float(np.argmax(feeds["x"] @ WEIGHTS, axis=1)[0])
        labels = [label] * feeds["x"].shape[0]
        assert batched.feedback(f"r{i}", labels) == single.feedback(f"r{i}", labels) is True
    assert batched.window("3").labelled == single.window("3").labelled == 12
    assert batched.window("3").correct == single.window("3").correct


@in_loop
async def test_dual_run_sink_compares_the_canary_against_the_stable_rerun() -> None:
    evidence = ModelEvidence("m", CompareSpec(), 0)
    tasks = set[asyncio.Task[None]]()
    lane = ShadowLane(LinearExecutor(), max_rows=64, gather_s=0.005)  # the stable version's lane
    for i in range(5):
        feeds = request(i)
        canary = primary_answer(feeds, 0.5)  # the canary's answer, already returned to the client
        lane.mirror(ran(feeds, canary, seconds=0.003), DualRunSink(evidence, "2"), tasks)
    await settle(lane, tasks)
    pair = evidence.pairs["2"]
    assert pair.requests == 5 and pair.rows == 5 and pair.max_abs > 0
    assert not evidence.windows  # a re-run is evidence about the pair only
    assert len(evidence.log) == 0


@in_loop
async def test_a_full_batch_ends_the_gather_early() -> None:
    executor, sink, tasks = LinearExecutor(), Collect(), set[asyncio.Task[None]]()
    lane = ShadowLane(executor, max_rows=64, batch_rows=4, gather_s=30.0)
    for i in range(3):
        mirror(lane, request(i), sink, tasks)
    await asyncio.sleep(0.05)
    assert executor.runs == []  # three rows: still gathering
    mirror(lane, request(3), sink, tasks)
    await asyncio.wait_for(settle(lane, tasks), 5.0)  # would take 30 s without the early end
    assert executor.runs == [4]


@in_loop
async def test_the_byte_bound_drops_copies_before_the_count_bound() -> None:
    executor, sink, tasks = LinearExecutor(), Collect(), set[asyncio.Task[None]]()
    feeds = request(0)
    per_copy = feeds["x"].nbytes + primary_answer(feeds, 0.0)[0].nbytes
    lane = ShadowLane(executor, max_rows=64, max_pending_bytes=3 * per_copy, gather_s=0.005)
    for _ in range(5):
        mirror(lane, feeds, sink, tasks)
    assert (lane.counters.mirrored, lane.counters.dropped) == (3, 2)
    await settle(lane, tasks)
    mirror(lane, feeds, sink, tasks)  # the bytes are given back once copies finish
    assert lane.counters.mirrored == 4
    await settle(lane, tasks)


@in_loop
async def test_outputs_the_sink_cannot_use_count_as_failures_and_the_lane_goes_on() -> None:
    executor, tasks = LinearExecutor(), set[asyncio.Task[None]]()

    def broken(copies: Sequence[ShadowCopy], outputs: list[np.ndarray], seconds: float) -> bool:
        raise IndexError("no such output")

    lane = ShadowLane(executor, max_rows=64, gather_s=0.001)
    mirror(lane, request(0), broken, tasks)
    await settle(lane, tasks)
    assert lane.counters.failed == 1 and lane.pending == 0
    mirror(lane, request(1), Collect(), tasks)
    await settle(lane, tasks)
    assert lane.counters.completed == 1


@in_loop
async def test_copies_with_short_deadlines_still_run_when_the_primary_is_idle() -> None:
    executor, sink, tasks = LinearExecutor(), Collect(), set[asyncio.Task[None]]()
    lane = ShadowLane(executor, max_rows=64, gather_s=0.5, deadline_margin_s=0.03)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(20):
        feeds = request(i)
        deadline = time.monotonic() + 0.1  # far less than the 500 ms gather
        lane.mirror(ran(feeds, primary_answer(feeds, 0.0), deadline=deadline), sink, tasks)
        await asyncio.sleep(0.002)
    await settle(lane, tasks)
    assert lane.counters.completed == 20 and lane.counters.timed_out == 0
    assert loop.time() - started < 0.45  # the gathers ended before the copies' deadlines, not after 500 ms


@in_loop
async def test_with_the_primary_never_idle_nothing_runs_and_everything_times_out() -> None:
    executor, sink, tasks = LinearExecutor(), Collect(), set[asyncio.Task[None]]()
    primary = Primary()
    primary.event.clear()
    lane = ShadowLane(executor, max_rows=64, gather_s=0.001, default_timeout_s=0.2, primary=primary)
    for i in range(10):
        mirror(lane, request(i), sink, tasks)
        await asyncio.sleep(0.01)  # copies with staggered deadlines
    await settle(lane, tasks)
    assert executor.runs == [] and sink.batches == []
    assert lane.counters.timed_out == 10 and lane.pending == 0


@in_loop
async def test_a_probe_that_expires_lets_the_next_copy_probe() -> None:
    executor, sink, tasks = LinearExecutor(fail=True), Collect(), set[asyncio.Task[None]]()
    primary = Primary()
    lane = ShadowLane(executor, max_rows=64, gather_s=0.001, default_timeout_s=0.05, primary=primary)
    lane.breaker.threshold = 1
    lane.breaker.base_backoff_s = 0.0
    mirror(lane, request(0), sink, tasks)
    await settle(lane, tasks)
    assert lane.breaker.is_open
    primary.event.clear()  # the probe waits behind a busy primary until its deadline
    mirror(lane, request(1), sink, tasks)
    await settle(lane, tasks)
    assert lane.counters.timed_out == 1 and not lane.breaker.probing
    primary.event.set()
    executor.fail = False
    mirror(lane, request(2), sink, tasks)  # a new probe is let through, succeeds, closes the circuit
    await settle(lane, tasks)
    assert lane.counters.completed == 1 and not lane.breaker.is_open


@in_loop
async def test_inputs_are_batched_by_name_and_shape() -> None:
    class TwoInputs(LinearExecutor):
        async def submit(
            self,
            feeds: Tensors,
            batch: int,
            deadline: float | None,
            timeout_s: float | None,
            timing: RunTiming | None = None,
        ) -> list[np.ndarray]:
            self.runs.append(batch)
            return [np.zeros((batch, 3), np.float32)]

    executor, sink, tasks = TwoInputs(), Collect(), set[asyncio.Task[None]]()
    lane = ShadowLane(executor, max_rows=64, gather_s=0.005)
    narrow, wide = np.zeros((1, 3), np.float32), np.zeros((1, 5), np.float32)
    reference = [np.zeros((1, 3), np.float32)]
    lane.mirror(ran({"a": narrow, "b": wide}, reference), sink, tasks)
    lane.mirror(ran({"b": narrow, "a": wide}, reference), sink, tasks)  # same shapes, swapped
    await settle(lane, tasks)
    assert executor.runs == [1, 1] and lane.counters.completed == 2


@in_loop
async def test_a_cancelled_round_keeps_its_copies_queued() -> None:
    executor, sink, tasks = LinearExecutor(), Collect(), set[asyncio.Task[None]]()
    primary = Primary()
    primary.event.clear()
    lane = ShadowLane(executor, max_rows=64, gather_s=0.001, primary=primary)
    for i in range(3):
        mirror(lane, request(i), sink, tasks)
    await asyncio.sleep(0.02)  # the round has begun and waits for the primary
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert lane.pending == 3
    primary.event.set()
    mirror(lane, request(3), sink, tasks)
    await settle(lane, tasks)
    assert lane.counters.completed == 4 and lane.pending == 0 and lane._pending_bytes == 0


class Named:
    """A model run (called directly, on a worker thread) that logs its name, taking `delay_s`."""

    def __init__(self, name: str, log: list[str], delay_s: float = 0.0, fail: bool = False) -> None:
        self.name, self.log, self.delay_s, self.fail = name, log, delay_s, fail

    def __call__(self, feeds: Tensors) -> list[np.ndarray]:
        self.log.append(self.name)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("broken partner")
        return [feeds["x"] @ WEIGHTS]


class Timed(Collect):
    """A sink that asks for each batch to be timed on `partner` too, and keeps the two times."""

    def __init__(self, partner: Named | None) -> None:
        super().__init__()
        self.other = partner
        self.times: list[tuple[float, float]] = []

    def partner(self) -> Named | None:
        return self.other

    def timed(self, copies: Sequence[ShadowCopy], seconds: float, partner_seconds: float) -> None:
        self.times.append((seconds, partner_seconds))


@in_loop
async def test_a_paired_timing_runs_each_batch_on_both_versions_in_random_order() -> None:
    log: list[str] = []
    # The partner sleeps 25 times as long as this lane's version: a thread woken late on a busy
    # machine (CI's two cores) stays far from swapping the two times.
    executor, sink, tasks = LinearExecutor(), Timed(Named("partner", log, delay_s=0.05)), set[asyncio.Task[None]]()
    lane = ShadowLane(executor, max_rows=64, gather_s=0.0, run_direct=Named("own", log, delay_s=0.002))
    for i in range(40):
        mirror(lane, request(i), sink, tasks)
        await settle(lane, tasks)
    assert len(sink.times) == len(sink.batches) == 40
    # Timed batches run the models directly, never through the executor (a batcher's wait
    # for more rows would be timed too).
    assert executor.runs == []
    pairs = [log[i : i + 2] for i in range(0, len(log), 2)]
    assert all(sorted(p) == ["own", "partner"] for p in pairs)
    firsts = [p[0] for p in pairs]
    assert 5 < firsts.count("own") < 35, firsts  # both orders, so neither always runs warm
    # Each time is its own version's run: the partner's is the slower one every time.
    assert all(0.002 <= s < p for s, p in sink.times), sink.times
    assert lane.counters.completed == 40 and lane.counters.failed == 0


class BusyLoop(Named):
    """A model run that, as it starts, gives the event loop `hold_s` of blocking work: the loop
    is busy serving (as a gateway's is) when the run's answer comes back to it."""

    def __init__(self, name: str, log: list[str], loop: asyncio.AbstractEventLoop, hold_s: float) -> None:
        super().__init__(name, log, delay_s=0.01)
        self.loop, self.hold_s = loop, hold_s

    def __call__(self, feeds: Tensors) -> list[np.ndarray]:
        # Queued before the run's own answer, so the loop takes that answer only after this.
        self.loop.call_soon_threadsafe(time.sleep, self.hold_s)
        return super().__call__(feeds)


@in_loop
async def test_a_paired_timing_times_the_runs_not_the_event_loops_hand_off() -> None:
    log: list[str] = []
    loop = asyncio.get_running_loop()
    sink, tasks = Timed(BusyLoop("partner", log, loop, hold_s=0.5)), set[asyncio.Task[None]]()
    lane = ShadowLane(LinearExecutor(), max_rows=64, gather_s=0.0, run_direct=BusyLoop("own", log, loop, hold_s=0.5))
    began = time.monotonic()
    mirror(lane, request(0), sink, tasks)
    await settle(lane, tasks)
    assert time.monotonic() - began >= 1.0  # the loop was held twice, after each run
    # Each run sleeps 10 ms: its time is that, not the half second the loop took to see it done.
    ((own_s, partner_s),) = sink.times
    assert 0.01 <= own_s < 0.25 and 0.01 <= partner_s < 0.25, sink.times


@in_loop
async def test_a_failing_partner_leaves_the_pair_out_but_never_fails_the_shadow() -> None:
    log: list[str] = []
    sink, tasks = Timed(Named("partner", log, fail=True)), set[asyncio.Task[None]]()
    lane = ShadowLane(LinearExecutor(), max_rows=64, gather_s=0.0, run_direct=Named("own", log))
    for i in range(5):
        mirror(lane, request(i), sink, tasks)
        await settle(lane, tasks)
    assert sink.times == [] and len(sink.batches) == 5
    assert lane.counters.completed == 5 and lane.counters.failed == 0 and not lane.breaker.is_open


@in_loop
async def test_without_a_partner_a_batch_runs_once_through_the_executor() -> None:
    log: list[str] = []
    executor, sink, tasks = LinearExecutor(), Timed(None), set[asyncio.Task[None]]()
    lane = ShadowLane(executor, max_rows=64, gather_s=0.0, run_direct=Named("own", log))
    mirror(lane, request(0), sink, tasks)
    await settle(lane, tasks)
    assert log == [] and executor.runs == [1] and sink.times == []
