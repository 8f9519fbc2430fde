"""Per-version inference statistics, in the shape of ModelStatistics.

Plain integer counters, updated on the event loop thread only, so no locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class VersionStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0  # batch items answered successfully
    execution_count: int = 0  # model runs
    last_inference_ms: int = 0
    by_batch_size: dict[int, Duration] = field(default_factory=dict)

    def record_execution(self, batch_size: int, compute_ns: int) -> None:
        self.execution_count += 1
        self.compute_infer.add(compute_ns)
        per = self.by_batch_size.get(batch_size)
        if per is None:
            per = self.by_batch_size[batch_size] = Duration()
        per.add(compute_ns)

    def record_request(self, ok: bool, total_ns: int, items: int) -> None:
        if ok:
            self.success.add(total_ns)
            self.inference_count += items
            self.last_inference_ms = time.time_ns() // 1_000_000
        else:
            self.fail.add(total_ns)
