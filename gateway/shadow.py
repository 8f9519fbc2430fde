"""Shadow mirroring: copies of live requests run on other versions, compared, never returned.

Fire-and-forget and bounded: a copy starts only after the primary has its
answer, so shadow work never goes ahead of primary work; at most
`max_pending` copies per shadow are outstanding, and past that copies are
dropped and counted, never waited for. A shadow gets at most the primary's
remaining deadline. A shadow that keeps failing is cut off by a circuit
breaker and probed again after a backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
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


OnResult = Callable[[list[np.ndarray], float], bool]


@dataclass
class ShadowLane:
    """One shadow version of one model."""

    executor: Executor
    max_pending: int = 64
    default_timeout_s: float = 5.0
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    counters: ShadowCounters = field(default_factory=ShadowCounters)
    pending: int = 0
    # The primary path: a copy waits until no primary request is in flight, so
    # shadow work runs in the primary's idle time, never ahead of it.
    primary: PrimaryActivity | None = None

    def mirror(
        self,
        feeds: Tensors,
        rows: int,
        deadline: float | None,
        on_result: OnResult,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Start a copy, or drop it at once; never blocks the caller."""
        if self.pending >= self.max_pending or not self.breaker.allow():
            self.counters.dropped += 1
            return
        now = time.monotonic()
        until = now + self.default_timeout_s if deadline is None else min(deadline, now + self.default_timeout_s)
        if until <= now:
            self.counters.dropped += 1
            return
        self.pending += 1
        self.counters.mirrored += 1
        task = asyncio.get_running_loop().create_task(self._run(feeds, rows, until, on_result))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, feeds: Tensors, rows: int, until: float, on_result: OnResult) -> None:
        try:
            if self.primary is not None and not self.primary.is_idle():
                await asyncio.wait_for(self.primary.wait_idle(), max(0.0, until - time.monotonic()))
            start = time.monotonic()
            outputs = await asyncio.wait_for(self.executor.submit(feeds, rows, until, None), max(0.0, until - start))
        except (TimeoutError, DeadlineExceeded, QueueTimeout):
            self.counters.timed_out += 1
            self.breaker.failure()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a shadow's failure is data, never the caller's problem
            log.debug("shadow run failed: %s", exc)
            self.counters.failed += 1
            self.breaker.failure()
        else:
            if on_result(outputs, time.monotonic() - start):
                self.counters.completed += 1
                self.breaker.success()
            else:
                self.counters.failed += 1
                self.breaker.failure()
        finally:
            self.pending -= 1
