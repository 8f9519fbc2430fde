"""The hold policy on its own: when a batch with nothing running waits for company."""

from __future__ import annotations

import asyncio

from gateway.serving.holding import ALONE_OVERLAP, FIRST_PAUSE, LAST_PAUSE, MIN_OVERLAP, HoldPolicy, timer_tick_s


class Clock:
    """Arrivals a millisecond apart, each after the model ran `run_s` (half the time by default)."""

    def __init__(self, run_s: float = 0.0005) -> None:
        self.now = 0.0
        self.run_s = run_s

    def arrive(self, policy: HoldPolicy, overlapping: bool) -> None:
        policy.ran(self.run_s)
        self.now += 0.001
        policy.arrival(overlapping, self.now)


def busy(policy: HoldPolicy, arrivals: int = 64, clock: Clock | None = None) -> HoldPolicy:
    clock = clock or Clock()
    for _ in range(arrivals):
        clock.arrive(policy, overlapping=True)
    return policy


def test_lone_arrivals_never_hold() -> None:
    policy, clock = HoldPolicy(0.002, 0.001), Clock()
    for _ in range(1000):
        clock.arrive(policy, overlapping=False)
        assert not policy.should_hold()
        assert policy.alone()


def test_overlapping_arrivals_hold_until_a_hold_gains_nothing_then_back_off_doubling() -> None:
    policy = busy(HoldPolicy(0.002, 0.001))
    assert not policy.alone()
    assert all(policy.should_hold() for _ in range(10))  # holds that gain keep holding
    pauses = []
    for _ in range(10):
        policy.outcome(0)  # a fruitless hold
        skipped = 0
        while not policy.should_hold():
            skipped += 1
        pauses.append(skipped)
    assert pauses[:4] == [FIRST_PAUSE, 2 * FIRST_PAUSE, 4 * FIRST_PAUSE, 8 * FIRST_PAUSE]
    assert max(pauses) == LAST_PAUSE
    policy.outcome(3)  # one that gains rows: holding is back on at once
    assert policy.should_hold() and policy.should_hold()


def test_a_little_overlap_still_probes_now_and_then_and_a_fruitful_probe_waits_its_turn() -> None:
    """Too little overlap to bet on, yet not a lone client, on a model that keeps running: a
    saturated shared machine looks like this (CI)."""
    policy, clock = HoldPolicy(0.002, 0.001), Clock()
    for _ in range(200):  # the model ran half the time between arrivals
        clock.arrive(policy, overlapping=False)
    clock.arrive(policy, overlapping=True)
    while policy._overlap > MIN_OVERLAP / 2:
        clock.arrive(policy, overlapping=False)
    assert not policy.alone() and ALONE_OVERLAP < policy._overlap < MIN_OVERLAP
    assert policy.should_hold()  # the first probe
    gaps = []
    for gained in (2, 2, 0, 0, 5):
        policy.outcome(gained)
        skipped = 0
        while not policy.should_hold():
            skipped += 1
        gaps.append(skipped)
    # A fruitful probe: the next in FIRST_PAUSE dispatches; fruitless ones back off doubling as holds do.
    assert gaps == [FIRST_PAUSE, FIRST_PAUSE, FIRST_PAUSE, 2 * FIRST_PAUSE, FIRST_PAUSE]


def test_a_model_that_seldom_runs_is_never_probed() -> None:
    """Requests one by one on a fast model (a load-test gate timing each version): a probe's
    timer tick would be the slowest answer of all, and nobody else is coming."""
    policy, clock = HoldPolicy(0.002, 0.001), Clock(run_s=0.00003)  # ran 3 % of the time
    for _ in range(200):
        clock.arrive(policy, overlapping=False)
    clock.arrive(policy, overlapping=True)
    while policy._overlap > MIN_OVERLAP / 2:
        clock.arrive(policy, overlapping=False)
    assert not policy.alone() and ALONE_OVERLAP < policy._overlap < MIN_OVERLAP
    assert not any(policy.should_hold() for _ in range(5000))


def test_no_delay_means_no_hold_and_a_short_delay_lasts_one_tick() -> None:
    assert not busy(HoldPolicy(0.0, 0.001)).should_hold()
    assert HoldPolicy(0.0005, 0.001).max_hold_s == 0.001  # uvloop cannot time half a millisecond


def test_the_overlap_average_forgets_an_old_burst() -> None:
    clock = Clock()
    policy = busy(HoldPolicy(0.002, 0.001), clock=clock)
    for _ in range(400):
        clock.arrive(policy, overlapping=False)
    assert policy.alone() and not policy.should_hold()


def test_timer_tick_of_asyncios_own_loop_is_sub_millisecond() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert timer_tick_s(loop) < 1e-3
    finally:
        loop.close()


def test_uvloop_timers_tick_in_milliseconds() -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        assert timer_tick_s(loop) == 1e-3
    finally:
        loop.close()
