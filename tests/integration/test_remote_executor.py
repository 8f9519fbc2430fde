"""A real executor process (python -m gateway.serving.remote.executor) and RemoteExecutors in this process.

Answers must equal in-process onnxruntime on the same rows; the batcher's promises
(queue bound, deadlines, timeouts, cancellation) must hold across the boundary; and a
kill -9 of either side must leave no shared memory behind: nothing in /dev/shm, no
arena descriptor or mapping in the survivor.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.errors import (
    Code,
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    QueueTimeout,
    ShadowLate,
    ShadowShed,
    code_for,
)
from gateway.serving.remote.client import ExecutorLost, RemoteConnection
from gateway.types import RunTiming
from tests.support import MODELS, ROOT

READY_TIMEOUT_S = 120.0
# A copy of mlp with a short queue and one batch at a time: slow enough (512 rows take
# milliseconds) to queue behind, for the queue, deadline and cancellation tests.
SLOW_SPEC = """
max_batch_size = 512

[batching]
enabled = true
max_queue_delay_us = 0
max_queue_size = 4
instances = 1
execution = "thread"
"""


@dataclass
class Executor:
    process: subprocess.Popen[str]
    address: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("executor-repo")
    shutil.copytree(MODELS / "digits", root / "digits")
    shutil.copytree(MODELS / "mlp", root / "mlp")
    (root / "slow").mkdir()
    shutil.copytree(MODELS / "mlp" / "1", root / "slow" / "1")
    (root / "slow" / "model.toml").write_text(SLOW_SPEC)
    return root


def start_executor(repository: Path, log_dir: Path, *models: str) -> Executor:
    address = f"@gateway-test-executor-{uuid.uuid4().hex}"
    log = log_dir / f"executor-{address[1:]}.log"
    loads = [arg for name in models for arg in ("--load", name)]
    command = [sys.executable, "-m", "gateway.serving.remote.executor", "--listen", address]
    command += ["--models", str(repository), "--provider", "cpu", *loads]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
    line = process.stdout.readline() if ready else ""
    if line.strip() != f"ready {address}":
        process.kill()
        process.wait()
        raise AssertionError(f"the executor did not start ({line!r}): {log.read_text()[-2000:]}")
    return Executor(process, address, log)


@pytest.fixture(scope="module")
def executor(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Executor]:
    running = start_executor(repository, tmp_path_factory.mktemp("logs"), "digits", "mlp", "slow")
    yield running
    running.stop()


def shm_entries() -> set[str]:
    """Our entries in /dev/shm (the host shares it with other programs, whose entries come and go)."""
    return {name for name in os.listdir("/dev/shm") if "gateway" in name}


def arena_fds(pid: int) -> list[str]:
    """The arenas (memfds) process `pid` holds open."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "gateway-arena" in link:
            found.append(link)
    return found


def arena_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum("gateway-arena" in line for line in maps)


def wait_until(condition: object, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


async def eventually(condition: object, timeout_s: float = 10.0) -> bool:
    """wait_until without blocking the loop (which has replies to read meanwhile)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return False


def reference(repository: Path, model: str, version: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(repository / model / version / "model.onnx"), providers=["CPUExecutionProvider"])


def test_answers_equal_in_process_onnxruntime_over_1200_mixed_requests(executor: Executor, repository: Path) -> None:
    targets = [("digits", "1"), ("digits", "2"), ("mlp", "1")]
    sessions = {t: reference(repository, *t) for t in targets}
    before = shm_entries()

    async def scenario() -> int:
        connection = await RemoteConnection.connect(executor.address)
        executors = {t: connection.executor(*t) for t in targets}
        checked = 0

        async def client(seed: int) -> int:
            rng = random.Random(seed)
            done = 0
            for _ in range(150):
                target = rng.choice(targets)
                remote = executors[target]
                spec = remote.version.inputs[0]
                rows = rng.choice([1, 1, 2, 3, 7, 16, 33])
                x = np.random.default_rng(seed * 1000 + done).random((rows, spec.shape[1]), dtype=np.float32)
                outputs = await remote.submit({spec.name: x}, rows, None, None)
                names = [o.name for o in remote.version.outputs]
                expected = sessions[target].run(names, {spec.name: x})
                for name, got, want in zip(names, outputs, expected, strict=True):
                    assert got.dtype == want.dtype and got.shape == want.shape, name
                    if got.dtype.kind == "f":
                        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
                    else:
                        np.testing.assert_array_equal(got, want, err_msg=name)
                done += 1
            return done

        counts = await asyncio.gather(*(client(seed) for seed in range(8)))
        checked = sum(counts)
        assert connection.in_flight() == 0 and connection.slots.in_use() == 0
        await connection.close()
        return checked

    assert asyncio.run(scenario()) == 1200
    assert not shm_entries() - before
    assert not arena_fds(os.getpid())


def test_queue_full_deadline_and_timeout_cross_as_the_batchers_own_errors(executor: Executor) -> None:
    async def scenario() -> None:
        connection = await RemoteConnection.connect(executor.address)
        slow = connection.executor("slow", "1")
        name = slow.version.inputs[0].name
        big = {name: np.ones((512, 784), np.float32)}
        # A burst far past the queue's 4: the executor's batcher refuses the rest at once.
        burst = await asyncio.gather(*(slow.submit(big, 512, None, None) for _ in range(24)), return_exceptions=True)
        refused = [r for r in burst if isinstance(r, Overloaded)]
        answered = [r for r in burst if isinstance(r, list)]
        assert refused and answered and len(refused) + len(answered) == 24
        assert code_for(refused[0])[0] == Code.RESOURCE_EXHAUSTED
        assert "queue full" in str(refused[0])

        # Behind a running batch, a short timeout and a near deadline expire in the queue.
        running = asyncio.ensure_future(slow.submit(big, 512, None, None))
        await asyncio.sleep(0.002)
        small = {name: np.ones((1, 784), np.float32)}
        with pytest.raises(QueueTimeout):
            await slow.submit(small, 1, None, 0.0005)
        with pytest.raises(DeadlineExceeded):
            await slow.submit(small, 1, time.monotonic() + 0.0005, None)
        with pytest.raises(DeadlineExceeded):
            await slow.submit(small, 1, time.monotonic() - 1.0, None)  # already past: refused at once
        await running
        assert connection.slots.in_use() == 0
        await connection.close()

    asyncio.run(scenario())


def test_shadow_requests_wait_for_every_front_ends_primaries_and_are_shed_past_the_bound(
    executor: Executor,
) -> None:
    async def scenario() -> None:
        primary_end = await RemoteConnection.connect(executor.address)  # one front end's primaries
        shadow_end = await RemoteConnection.connect(executor.address)  # another's shadow copies
        slow = primary_end.executor("slow", "1")
        name = slow.version.inputs[0].name
        big = {name: np.ones((512, 784), np.float32)}
        copies = shadow_end.executor("slow", "1").for_shadows()
        stop = time.monotonic() + 1.5
        answered = 0

        async def primaries() -> None:
            nonlocal answered
            while time.monotonic() < stop:
                # Never refused: the shadows wait outside the version's queue (4 long).
                await slow.submit(big, 512, None, None)
                answered += 1

        # Three primaries in flight (one running, two queued): the executor is hardly ever without one.
        loops = [asyncio.ensure_future(primaries()) for _ in range(3)]
        await asyncio.sleep(0.05)
        deadline = time.monotonic() + 1.0
        results = await asyncio.gather(
            *(copies.submit(big, 512, deadline, None) for _ in range(80)), return_exceptions=True
        )
        await asyncio.gather(*loops)
        shed = [r for r in results if isinstance(r, ShadowShed)]
        late = [r for r in results if isinstance(r, ShadowLate)]
        ran = [r for r in results if isinstance(r, list)]
        # 64 wait, then give up at their deadline (the primaries never stopping); the rest are shed at
        # once. A copy may slip into an instant without primaries (one's reply out, the next on its way).
        outcomes = [type(r).__name__ for r in results]
        assert len(shed) + len(late) + len(ran) == 80 and len(ran) <= 2, outcomes
        assert len(shed) >= 14 and len(late) >= 62, outcomes
        assert code_for(shed[0])[0] == Code.RESOURCE_EXHAUSTED and answered > 0

        # The executor idle: a shadow runs at once, equal to a primary run.
        small = {name: np.ones((2, 784), np.float32)}
        (got,) = await copies.submit(small, 2, time.monotonic() + 10, None)
        (want,) = await slow.submit(small, 2, None, None)
        np.testing.assert_array_equal(got, want)
        assert primary_end.slots.in_use() == 0 and shadow_end.slots.in_use() == 0
        await primary_end.close()
        await shadow_end.close()

    asyncio.run(scenario())


def test_a_cancelled_request_is_not_run_and_its_slot_comes_back(executor: Executor) -> None:
    async def scenario() -> None:
        connection = await RemoteConnection.connect(executor.address)
        slow = connection.executor("slow", "1")
        name = slow.version.inputs[0].name
        big = {name: np.ones((512, 784), np.float32)}
        one = {name: np.ones((1, 784), np.float32)}
        # Two full batches keep the model busy while B and C queue behind them.
        ahead = [asyncio.ensure_future(slow.submit(big, 512, None, None)) for _ in range(2)]
        await asyncio.sleep(0)
        cancelled = asyncio.ensure_future(slow.submit(one, 1, None, None))
        traced = RunTiming()
        kept = asyncio.ensure_future(slow.submit(one, 1, None, None, traced))
        await asyncio.sleep(0)  # both records sent
        assert connection.slots.in_use() == 4
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert connection.slots.in_use() == 4  # the executor may still read it until it says it dropped it
        await asyncio.gather(*ahead)
        await kept
        # Had B run, it would have shared C's batch (same shapes, queued together).
        assert (traced.rows, traced.requests) == (1, 1)
        assert traced.started_ns > 0 and traced.dequeued >= traced.enqueued > 0
        assert await eventually(lambda: connection.slots.in_use() == 0, 2.0)
        await connection.close()

    asyncio.run(scenario())


def test_a_request_larger_than_a_slot_and_a_full_arena_are_refused_in_the_front_end(executor: Executor) -> None:
    async def scenario() -> None:
        connection = await RemoteConnection.connect(executor.address, slots=2, slot_bytes=64 * 1024)
        slow = connection.executor("slow", "1")
        name = slow.version.inputs[0].name
        with pytest.raises(InvalidInput, match="more than an executor slot"):
            await slow.submit({name: np.ones((512, 784), np.float32)}, 512, None, None)
        assert connection.slots.in_use() == 0
        rows = {name: np.ones((16, 784), np.float32)}  # 50 KB: fits
        results = await asyncio.gather(*(slow.submit(rows, 16, None, None) for _ in range(4)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, Overloaded)]
        assert len(refused) == 2 and "shared-memory slots" in str(refused[0])
        assert sum(isinstance(r, list) for r in results) == 2
        assert connection.slots.in_use() == 0
        await connection.close()

    asyncio.run(scenario())


def test_sigterm_stops_the_executor_cleanly_and_its_front_ends_see_it_gone(repository: Path, tmp_path: Path) -> None:
    stopping = start_executor(repository, tmp_path, "slow")

    async def scenario() -> None:
        connection = await RemoteConnection.connect(stopping.address)
        slow = connection.executor("slow", "1")
        name = slow.version.inputs[0].name
        x = {name: np.ones((1, 784), np.float32)}
        assert len(await slow.submit(x, 1, None, None)) == 1
        stopping.process.send_signal(signal.SIGTERM)
        assert await eventually(lambda: connection.lost, 10.0)
        with pytest.raises(ExecutorLost):
            await slow.submit(x, 1, None, None)
        await connection.close()

    try:
        asyncio.run(scenario())
        assert stopping.process.wait(10) == 0
    finally:
        stopping.stop()
    assert not arena_fds(os.getpid())


def test_kill_9_of_the_executor_fails_requests_in_flight_at_once_and_leaves_nothing(
    repository: Path, tmp_path: Path
) -> None:
    before = shm_entries()
    victim = start_executor(repository, tmp_path, "slow")

    async def scenario() -> None:
        connection = await RemoteConnection.connect(victim.address)
        slow = connection.executor("slow", "1")
        name = slow.version.inputs[0].name
        big = {name: np.ones((512, 784), np.float32)}
        pending = [asyncio.ensure_future(slow.submit(big, 512, None, None)) for _ in range(4)]
        await asyncio.sleep(0.005)
        assert arena_fds(victim.pid)  # the executor holds our arena
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert time.monotonic() - killed < 2.0
        lost = [r for r in results if isinstance(r, ExecutorLost)]
        assert lost, results  # at least the queued ones cannot have been answered
        assert all(isinstance(r, ExecutorLost | list) for r in results), results
        assert code_for(lost[0])[0] == Code.UNAVAILABLE
        assert connection.slots.in_use() == 0 and connection.in_flight() == 0
        with pytest.raises(ExecutorLost):
            await slow.submit(big, 512, None, None)
        await connection.close()

    try:
        asyncio.run(scenario())
    finally:
        victim.process.wait(10)
    assert not shm_entries() - before
    assert not arena_fds(os.getpid())
    assert arena_mappings(os.getpid()) == 0


FRONT_END = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from gateway.serving.remote.client import RemoteConnection

    async def main():
        connection = await RemoteConnection.connect(sys.argv[1])
        slow = connection.executor("slow", "1")
        name = slow.version.inputs[0].name
        x = {name: np.ones((512, 784), np.float32)}
        async def loop():
            while True:
                try:
                    await slow.submit(x, 512, None, None)
                except Exception:
                    await asyncio.sleep(0)
        tasks = [asyncio.ensure_future(loop()) for _ in range(8)]
        await asyncio.sleep(0.05)
        print("busy", flush=True)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    """
)


def test_kill_9_of_a_front_end_frees_its_arena_in_the_executor_which_keeps_serving(
    repository: Path, tmp_path: Path
) -> None:
    before = shm_entries()
    survivor = start_executor(repository, tmp_path, "slow")
    try:

        async def scenario() -> None:
            mine = await RemoteConnection.connect(survivor.address)
            assert await eventually(lambda: len(arena_fds(survivor.pid)) == 1)
            front = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FRONT_END, survivor.address, stdout=asyncio.subprocess.PIPE, cwd=ROOT
            )
            assert front.stdout is not None
            try:
                assert (await front.stdout.readline()).strip() == b"busy"
                assert len(arena_fds(survivor.pid)) == 2
                front.kill()  # SIGKILL
                await front.wait()
            finally:
                if front.returncode is None:
                    front.kill()
                    await front.wait()
            # Its requests cancelled, its runs finished: the executor unmaps its arena.
            assert await eventually(lambda: len(arena_fds(survivor.pid)) == 1 and arena_mappings(survivor.pid) == 1)
            slow = mine.executor("slow", "1")
            name = slow.version.inputs[0].name
            x = np.random.default_rng(1).random((3, 784), dtype=np.float32)
            got = await slow.submit({name: x}, 3, None, None)
            want = reference(repository, "slow", "1").run(None, {name: x})
            np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
            await mine.close()
            assert await eventually(lambda: not arena_fds(survivor.pid) and arena_mappings(survivor.pid) == 0)

        asyncio.run(scenario())
    finally:
        survivor.stop()
    assert not shm_entries() - before
