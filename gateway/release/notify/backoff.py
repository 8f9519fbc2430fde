"""When a failed delivery is tried again: exponential backoff with jitter, capped.

Attempt k (k >= 1 retries so far) waits between half and all of base * 2**(k-1),
capped at `cap_s` ("equal jitter"): the delay still grows, so a receiver that is down
is not hammered, and many gateways that failed together do not retry in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BASE_S = 0.5
CAP_S = 30.0


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = BASE_S
    cap_s: float = CAP_S

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        if retry < 1:
            raise ValueError(f"retry counts from 1, got {retry}")
        # min() before the power would overflow: 2**1100 is a float error, not a long wait.
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(retry - 1, 64))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)

    def schedule(self, retries: int, rng: random.Random) -> list[float]:
        """The waits before each of `retries` retries, in order."""
        return [self.delay(k, rng) for k in range(1, retries + 1)]
