"""Shadow mirroring: copies of live requests run on other versions, compared, never returned.

Fire-and-forget and bounded: a copy is queued only after the primary has its
answer, and a lane runs its copies only while no primary request is in
flight, so shadow work never goes ahead of primary work. At most
`max_pending` copies per lane are queued or running; past that copies are
dropped and counted, never waited for. A copy gets at most the primary's
remaining deadline. A shadow that keeps failing is cut off by a circuit
breaker and probed again after a backoff.

Copies are gathered for a few milliseconds and run as one batch, then
compared in one vectorised pass. Per copy, the loop then spends little more
than a list append and a prediction-log entry: a copy run and compared on its
own cost about 70 us of the loop's time, which at half load raised the
primary's p99 by a fifth (the benchmark in the README measures it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gateway.errors import DeadlineExceeded, QueueTimeout
from gateway.executor import Executor
from gateway.types import Tensors

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CircuitBreaker:
    """Opens after `threshold` consecutive failures; lets one probe through after a backoff."""

    threshold: int = 5
    base_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    open_until: float = 0.0
    backoff_s: float = 0.0
    probing: bool = False
    opened: int = 0  # times the circuit opened

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def allow(self) -> bool:
        if not self.is_open:
            return True
        if self.probing or self.clock() < self.open_until:
            return False
        self.probing = True  # half-open: one probe at a time
        return True

    def success(self) -> None:
        self.failures = 0
        self.backoff_s = 0.0
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold:
            if self.failures == self.threshold:
                self.opened += 1
            self.backoff_s = min(self.max_backoff_s, self.backoff_s * 2 or self.base_backoff_s)
            self.open_until = self.clock() + self.backoff_s


class PrimaryActivity(Protocol):
    def is_idle(self) -> bool: ...

    def wait_idle(self) -> Awaitable[None]: ...


@dataclass(slots=True)
class ShadowCounters:
    mirrored: int = 0
    dropped: int = 0  # queue bound reached, or circuit open
    failed: int = 0  # raised, or answered with the wrong shape
    timed_out: int = 0
    completed: int = 0


class CopySink(Protocol):
    def __call__(self, copies: Sequence[ShadowCopy], outputs: list[np.ndarray], seconds: float) -> bool:
        """Take a batch of copies' outputs (rows in copy order); False when they are unusable."""
        ...


@dataclass(slots=True, eq=False)
class ShadowCopy:
    """One mirrored request, and the primary's answer it is compared with."""

    feeds: Tensors
    rows: int
    until: float  # monotonic; the primary's deadline, or the lane's default timeout
    request_id: str
    reference: Sequence[np.ndarray]
    reference_s: float
    sink: CopySink


def _shape_key(feeds: Tensors) -> tuple[tuple[int, ...], ...]:
    return tuple(a.shape[1:] for a in feeds.values())


def concat_feeds(copies: Sequence[ShadowCopy]) -> Tensors:
    if len(copies) == 1:
        return copies[0].feeds
    return {name: np.concatenate([c.feeds[name] for c in copies]) for name in copies[0].feeds}


@dataclass
class ShadowLane:
    """One version's mirrored copies: gathered, then run in batches in the primary's idle time."""

    executor: Executor
    max_rows: int = 1  # rows one run may carry (the version's max_batch_size; <= 1: a copy a run)
    max_pending: int = 256
    gather_s: float = 0.005
    default_timeout_s: float = 5.0
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    counters: ShadowCounters = field(default_factory=ShadowCounters)
    primary: PrimaryActivity | None = None
    _queued: list[ShadowCopy] = field(default_factory=list)
    _running: int = 0
    _flusher: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Copies queued or running."""
        return len(self._queued) + self._running

    def mirror(
        self,
        feeds: Tensors,
        rows: int,
        deadline: float | None,
        request_id: str,
        reference: Sequence[np.ndarray],
        reference_s: float,
        sink: CopySink,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Queue a copy, or drop it at once; never blocks the caller."""
        if self.pending >= self.max_pending or not self.breaker.allow():
            self.counters.dropped += 1
            return
        now = time.monotonic()
        until = now + self.default_timeout_s if deadline is None else min(deadline, now + self.default_timeout_s)
        if until <= now:
            self.counters.dropped += 1
            return
        self._queued.append(ShadowCopy(feeds, rows, until, request_id, reference, reference_s, sink))
        self.counters.mirrored += 1
        if self._flusher is None:
            task = self._flusher = asyncio.get_running_loop().create_task(self._flush())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _flush(self) -> None:
        """Run what is queued, a batch at a time, until nothing is; gather first."""
        try:
            await asyncio.sleep(self.gather_s)
            while self._queued:
                if self.primary is not None and not self.primary.is_idle():
                    earliest = min(c.until for c in self._queued)
                    try:
                        async with asyncio.timeout(max(0.0, earliest - time.monotonic())):
                            await self.primary.wait_idle()
                    except TimeoutError:
                        pass  # the expired copies are counted below
                self._expire(time.monotonic())
                batch = self._take()
                if batch:
                    await self._run(batch)
        finally:
            self._flusher = None

    def _expire(self, now: float) -> None:
        """Copies whose time ran out while waiting: timed out, but no mark against the shadow."""
        kept = [c for c in self._queued if c.until > now]
        self.counters.timed_out += len(self._queued) - len(kept)
        self._queued = kept

    def _take(self) -> list[ShadowCopy]:
        """The head copy and every later one that fits in one run with it, in order."""
        queued = self._queued
        if not queued:
            return []
        head = queued[0]
        key = _shape_key(head.feeds)
        limit = max(1, self.max_rows)
        batch = [head]
        rows = head.rows
        kept: list[ShadowCopy] = []
        for c in queued[1:]:
            if rows + c.rows <= limit and c.sink is head.sink and _shape_key(c.feeds) == key:
                batch.append(c)
                rows += c.rows
            else:
                kept.append(c)
        self._queued = kept
        return batch

    async def _run(self, batch: list[ShadowCopy]) -> None:
        n = len(batch)
        rows = sum(c.rows for c in batch)
        until = min(c.until for c in batch)
        self._running += n
        start = time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, until - start)):
                outputs = await self.executor.submit(concat_feeds(batch), rows, until, None)
        except (TimeoutError, DeadlineExceeded, QueueTimeout):
            self.counters.timed_out += n
            self.breaker.failure()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a shadow's failure is data, never the caller's problem
            log.debug("shadow run failed: %s", exc)
            self.counters.failed += n
            self.breaker.failure()
        else:
            if batch[0].sink(batch, outputs, time.monotonic() - start):
                self.counters.completed += n
                self.breaker.success()
            else:
                self.counters.failed += n
                self.breaker.failure()
        finally:
            self._running -= n
