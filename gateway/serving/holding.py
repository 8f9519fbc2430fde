"""When a batch with nothing running waits for more rows: the hold policy.

Under a saturating load, requests reach the batcher one loop iteration at a
time (grpc.aio hands each call to Python through its poller thread), so a
batcher that dispatches whatever is queued the moment nothing runs sends
batches of one row: every request pays for a model run of its own (on one
core, each `session.run` also hands the GIL, and so the CPU, to grpc's
threads). Holding the batch open for about a millisecond while rows keep
arriving makes batches grow (measured on digits at c=64: mean batch 1.0 -> 8,
+30 % throughput), and costs nothing in throughput while the CPU is busy
with the arrivals anyway.

Holding is a bet that more requests are coming. With one client (c=1) none
comes until the answer goes out, so a hold would only add latency. Two signals
keep the bet safe:

- Overlap: a hold is considered only while requests recently arrived with
  others still queued or running (an average over the last few dozen
  arrivals). A lone client's requests never overlap, so it never waits.
- Outcome: a hold that gained no row switches holding off for a number of
  dispatches that doubles with each fruitless try (16, 32, ... up to 1,024);
  one hold that gains rows switches it back on.

Overlap can hide a saturated machine, though. When the clients share the
gateway's cores (two cores, 64 clients in one process: CI), running each row
on its own takes the CPU the clients need to send the next one, so requests
trickle in one at a time and seldom overlap: batches of 1.0 and a third of the
throughput, a state that sustains itself (measured: half the runs of the c=64
test started in it and stayed). So between the lone client and clear overlap,
a dispatch still holds now and then as a probe, paced like the fruitless holds
above; a probe that gains rows makes those rows overlapping arrivals, which
lifts the average to where holding is the rule. A lone client never probes (one
caller's requests sent one after another are never company: DynamicBatcher.submit
counts only other tasks' arrivals), and neither does a model that has been running
only a small share of the time (MIN_BUSY): there is no saturation for a probe to find.

A hold lasts while rows keep coming: one timer tick at a time, ended by the
first tick in which nothing arrived, by the batch reaching its target size,
or by `max_queue_delay_us` since the hold began, whichever is first.
"""

from __future__ import annotations

import asyncio

# Dispatches without a hold after a fruitless one: doubling from the first to the last.
FIRST_PAUSE = 16
LAST_PAUSE = 1024
# The overlap average's weight per arrival (about the last 32 count), and the share of
# overlapping arrivals above which holding is considered.
OVERLAP_WEIGHT = 1 / 32
MIN_OVERLAP = 1 / 16
# Below this share a request may skip the queue and run at once (DynamicBatcher.submit):
# well under MIN_OVERLAP, so a load that holds pay for never drifts onto that path.
ALONE_OVERLAP = 1 / 256
# Probes (holds below MIN_OVERLAP) only while the model ran at least this share of the
# wall time between arrivals (an average over about the last 32): in the saturated state
# they exist for, a 0.5 ms model at ~450 requests a second ran ~22 % of the time (and more
# once batches grow). Added when the load-test gate's one-by-one replay (10-16 % busy) got
# probes whose 1 ms ticks became its p99; the cause there was deeper (the gate's next
# request counted as company, fixed in DynamicBatcher.submit), and this stays as the
# guard that a model seldom running is never held for a probe.
MIN_BUSY = 0.2
BUSY_WEIGHT = 1 / 32


def timer_tick_s(loop: asyncio.AbstractEventLoop) -> float:
    """The shortest wait this loop's timers can express.

    uvloop (libuv) counts timers in whole milliseconds and rounds: a 0.5 ms
    `call_later` fires on the next iteration, so a shorter hold would be no
    hold at all. asyncio's own loop waits on the monotonic clock (microseconds).
    """
    return 1e-3 if type(loop).__module__.startswith("uvloop") else 1e-4


class HoldPolicy:
    """Whether the next dispatch with nothing running holds its batch open, learned from outcomes."""

    __slots__ = ("_busy", "_fruitless", "_last", "_overlap", "_pause", "_probing", "_ran_s", "max_hold_s", "tick_s")

    def __init__(self, max_hold_s: float, tick_s: float) -> None:
        # A hold shorter than one tick cannot be timed: round it up, so a configured
        # delay still holds (the documented cost: up to one tick more on uvloop).
        self.max_hold_s = max(max_hold_s, tick_s) if max_hold_s > 0 else 0.0
        self.tick_s = tick_s
        self._pause = 0  # dispatches left without holding
        self._fruitless = 0  # fruitless holds in a row
        self._overlap = 0.0  # recent share of arrivals that found others queued or running
        self._probing = False  # the hold under way was a probe (too little overlap to bet on)
        self._busy = 0.0  # recent share of the time between arrivals the model spent running
        self._ran_s = 0.0  # run time since the last arrival
        self._last: float | None = None  # the last arrival's time

    def arrival(self, overlapping: bool, now: float) -> None:
        """A request arrived at `now` (monotonic seconds); `overlapping`: others were queued or running."""
        self._overlap += ((1.0 if overlapping else 0.0) - self._overlap) * OVERLAP_WEIGHT
        if self._last is not None and now > self._last:
            share = min(1.0, self._ran_s / (now - self._last))
            self._busy += (share - self._busy) * BUSY_WEIGHT
        self._last = now
        self._ran_s = 0.0

    def ran(self, seconds: float) -> None:
        """The model ran for `seconds` (a batch, or a request run at once)."""
        self._ran_s += seconds

    def alone(self) -> bool:
        """Whether requests have recently come one at a time (nothing for a hold to gather)."""
        return self._overlap < ALONE_OVERLAP

    def should_hold(self) -> bool:
        if self.max_hold_s <= 0 or self.alone():
            return False
        probing = self._overlap < MIN_OVERLAP
        if probing and self._busy < MIN_BUSY:
            return False  # not a saturated machine: nothing for a probe to find
        if self._pause > 0:
            self._pause -= 1
            return False
        self._probing = probing
        return True

    def outcome(self, gained_rows: int) -> None:
        """Learn from a hold: rows that joined the batch while it was held."""
        if gained_rows > 0:
            self._fruitless = 0
            if self._probing:
                # Not yet the rule: the next probe waits its turn, so a moderate load that
                # a probe happened to catch pays for one hold in FIRST_PAUSE dispatches.
                self._pause = FIRST_PAUSE
            return
        self._pause = min(LAST_PAUSE, FIRST_PAUSE << self._fruitless)
        self._fruitless = min(self._fruitless + 1, LAST_PAUSE.bit_length())
