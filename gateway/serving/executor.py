"""Running model versions: where a run happens and how many run at once.

`DirectExecutor` runs each request on its own (batching off). The dynamic
batcher in gateway.serving.batcher has the same interface. Both decide per model
whether a run happens inline on the event loop or on a worker thread: for a
tiny model the thread hop costs as much as the model itself, while a large
model must not stall the loop (onnxruntime releases the GIL, so threads overlap).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import numpy as np

from gateway.config.spec import BatchingSpec, ExecutionMode
from gateway.errors import DeadlineExceeded, Draining, Overloaded, QueueTimeout
from gateway.serving.runtime import OnnxModel
from gateway.serving.statistics import VersionStats
from gateway.types import RunTiming, Tensors

# Models whose warm-up run takes less than this run inline on the event loop
# when the spec says execution = "auto".
INLINE_BELOW_S = 50e-6


def runs_inline(execution: ExecutionMode, model: OnnxModel, rows: int) -> bool:
    """Where a run of `rows` rows happens: inline when it is cheaper than a thread hop."""
    if execution == "auto":
        return not model.on_cuda and model.estimate_seconds(rows) < INLINE_BELOW_S
    return execution == "inline"


class Executor(Protocol):
    async def submit(
        self,
        feeds: Tensors,
        batch: int,
        deadline: float | None,
        timeout_s: float | None,
        timing: RunTiming | None = None,
    ) -> list[np.ndarray]:
        """Run one request; returns every model output in signature order. A traced request
        passes `timing`, and the executor writes when it queued and ran into it."""
        ...

    def queue_depth(self) -> int: ...

    def busy(self) -> bool:
        """Anything queued or running."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Prioritised(Protocol):
    """An executor shared beyond this process (the executor process's): shadow copies go
    through `for_shadows()`, so that it can serve primary requests first."""

    def for_shadows(self) -> Executor: ...


def for_shadows(executor: Executor) -> Executor:
    """What a shadow lane submits its copies to: `executor` itself, unless it ranks them lower."""
    return executor.for_shadows() if isinstance(executor, Prioritised) else executor


async def drain_and_close(executor: Executor, timeout_s: float = 30.0) -> None:
    """Let an executor that no longer gets new requests answer what it has, then close it."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    # A rare admin action: a short poll is simpler than threading an event through every executor.
    while executor.busy() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await executor.close()


def expiry(deadline: float | None, timeout_s: float | None, now: float) -> tuple[float | None, bool]:
    """The earlier of the client's deadline and our queue timeout; True when the timeout is earlier."""
    if timeout_s is None:
        return deadline, False
    limit = now + timeout_s
    if deadline is None or limit < deadline:
        return limit, True
    return deadline, False


def expired_error(by_timeout: bool) -> Exception:
    if by_timeout:
        return QueueTimeout("the request waited longer than its queue timeout (timeout_us)")
    return DeadlineExceeded("the client's deadline passed before the request could run")


class DirectExecutor:
    """One run per request, at most `instances` at once, a bounded wait queue."""

    def __init__(self, model: OnnxModel, spec: BatchingSpec, stats: VersionStats, pool: ThreadPoolExecutor) -> None:
        self.model = model
        self.stats = stats
        self.execution = spec.execution
        self._pool = pool
        self._slots = asyncio.Semaphore(spec.instances)
        self._max_waiting = spec.max_queue_size
        self._waiting = 0
        self._running = 0
        self._closed = False

    def queue_depth(self) -> int:
        return self._waiting

    def busy(self) -> bool:
        return self._waiting > 0 or self._slots.locked() or self._running > 0

    async def submit(
        self,
        feeds: Tensors,
        batch: int,
        deadline: float | None,
        timeout_s: float | None,
        timing: RunTiming | None = None,
    ) -> list[np.ndarray]:
        if self._closed:
            raise Draining("the model is unloading")
        if self._slots.locked():
            if self._waiting >= self._max_waiting:
                raise Overloaded(f"queue full ({self._max_waiting} waiting): try again later")
            queued_at = time.monotonic()
            if timing is not None:
                timing.enqueued = queued_at  # a request that expires waiting still has its wait traced
            until, by_timeout = expiry(deadline, timeout_s, queued_at)
            self._waiting += 1
            try:
                if until is None:
                    await self._slots.acquire()
                else:
                    try:
                        await asyncio.wait_for(self._slots.acquire(), max(0.0, until - queued_at))
                    except TimeoutError:
                        raise expired_error(by_timeout) from None
            finally:
                self._waiting -= 1
            dequeued = time.monotonic()
            self.stats.queue.add(int((dequeued - queued_at) * 1e9))
            if timing is not None:
                timing.dequeued = dequeued  # its enqueue time was written when it began to wait
        else:
            await self._slots.acquire()
        self._running += 1
        try:
            start = time.perf_counter_ns()
            if runs_inline(self.execution, self.model, batch):
                outputs = self.model.run(feeds)
            else:
                loop = asyncio.get_running_loop()
                outputs = await loop.run_in_executor(self._pool, self.model.run, feeds)
            end = time.perf_counter_ns()
            self.stats.record_execution(batch, end - start)
            if timing is not None:
                timing.rows, timing.requests, timing.started_ns, timing.ended_ns = batch, 1, start, end
            return outputs
        finally:
            self._running -= 1
            self._slots.release()

    async def close(self) -> None:
        self._closed = True
