"""Primaries first in the executor process: when a shadow copy may run.

Every front end's shadow lane already waits until its own primaries are idle,
but the executor runs the requests of every front end: one front end's copies
would otherwise run while another's primaries queue behind them (the same
version's batcher, or the same cores). The gate sees all of them.

A shadow request waits here, not in its version's batcher, until no primary
request is in the executor (from its record read to its reply), and shadows
run one at a time, so a primary that arrives meanwhile waits for one shadow
run at most. Past `max_waiting` shadows waiting, a new one is shed at once
(`ShadowShed`: the lane counts it dropped); one whose deadline passes while
primaries keep the executor busy ends `ShadowLate` (the lane counts it timed
out). Neither is a mark against the shadow version.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from gateway.errors import ShadowLate, ShadowShed

# Shadow requests waiting for their turn. Each front end's lane sends one batch of
# copies at a time per shadow version, so this is reached only with many of either.
MAX_WAITING = 64
# A waiting shadow gives up this long before its deadline, so that its lane hears ShadowLate
# before the lane's own timer for the copy fires (a timeout there counts against the shadow).
LATE_MARGIN_S = 0.02


@dataclass(slots=True)
class ShadowCounts:
    """What became of the shadow requests that reached the gate (the executor logs them when it drains)."""

    run: int = 0
    shed: int = 0
    late: int = 0


@dataclass(slots=True, eq=False)
class ShadowGate:
    max_waiting: int = MAX_WAITING
    primaries: int = 0  # primary requests in the executor now
    waiting: int = 0
    counts: ShadowCounts = field(default_factory=ShadowCounts)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # one shadow run at a time

    def __post_init__(self) -> None:
        self._idle.set()

    def primary_started(self) -> None:
        self.primaries += 1
        self._idle.clear()

    def primary_ended(self) -> None:
        self.primaries -= 1
        if not self.primaries:
            self._idle.set()

    async def admit(self, deadline: float | None) -> None:
        """Wait for a shadow's turn: no primary in the executor and no other shadow running.

        `deadline` is monotonic (None: none). On return the caller holds the turn and must
        call `done()` after its run; raises ShadowShed or ShadowLate instead."""
        if self.waiting >= self.max_waiting:
            self.counts.shed += 1
            raise ShadowShed(f"the executor is busy with primary requests ({self.waiting} shadow requests waiting)")
        self.waiting += 1
        try:
            if deadline is None:
                await self._wait_turn()
            else:
                # loop.time() is time.monotonic() on the default loop; converted anyway.
                loop = asyncio.get_running_loop()
                give_up = deadline - LATE_MARGIN_S - time.monotonic()
                async with asyncio.timeout_at(loop.time() + give_up):
                    await self._wait_turn()
        except TimeoutError:
            self.counts.late += 1
            raise ShadowLate("the shadow copy's deadline passed while the executor served primary requests") from None
        finally:
            self.waiting -= 1
        self.counts.run += 1

    async def _wait_turn(self) -> None:
        await self._turn.acquire()
        try:
            # Primaries may come between the turn and the idle check: wait again until none is left.
            while self.primaries:
                await self._idle.wait()
        except BaseException:
            self._turn.release()
            raise

    def done(self) -> None:
        self._turn.release()
