"""The rollout metrics the dashboard and alerts read (gateway/release/metrics.py): phase and
step, each check's verdict and figures, and rollout events by whoever made them."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from gateway.release.confidence import Verdict
from gateway.release.metrics import EVENTS, ReleaseMetrics, subject
from gateway.release.policy import CheckResult, Decision, Event, Phase, RolloutState
from gateway.release.state import ReleaseState
from gateway.release.store import StoredRelease

pytestmark = pytest.mark.unit


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> ReleaseMetrics:
    return ReleaseMetrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def stored(
    phase: Phase = Phase.IDLE, candidate: str = "", canary: str = "", step: int = 0, **rollout: object
) -> StoredRelease:
    state = ReleaseState("digits", "1", canary=canary, canary_weight_bp=2000 if canary else 0)
    return StoredRelease(state, RolloutState(phase=phase, step=step, candidate=candidate, **rollout))  # type: ignore[arg-type]


def check(name: str, verdict: Verdict, value: float = 0.5) -> CheckResult:
    return CheckResult(name, verdict, value, value - 0.1, value + 0.1, 0.02, 120)


def phases(registry: CollectorRegistry, version: str) -> dict[str, float | None]:
    return {p.value: value(registry, "gateway_rollout_phase", model="digits", version=version, phase=p) for p in Phase}


def test_phase_is_a_state_set_with_one_phase_on_and_the_step_counted_from_one(
    registry: CollectorRegistry, metrics: ReleaseMetrics
) -> None:
    metrics.sync_rollout(stored(Phase.PROGRESSING, "2", "2", step=1), ["1", "2"])
    assert phases(registry, "2") == {p.value: (1.0 if p is Phase.PROGRESSING else 0.0) for p in Phase}
    assert value(registry, "gateway_rollout_step", model="digits", version="2") == 2.0

    # Paused on a traffic step: still at that step; shadowing has none.
    metrics.sync_rollout(stored(Phase.PAUSED, "2", "2", step=1, resume_to=Phase.PROGRESSING), ["1", "2"])
    assert value(registry, "gateway_rollout_step", model="digits", version="2") == 2.0
    assert phases(registry, "2")["paused"] == 1.0 and phases(registry, "2")["progressing"] == 0.0
    metrics.sync_rollout(stored(Phase.SHADOWING, "2"), ["1", "2"])
    assert value(registry, "gateway_rollout_step", model="digits", version="2") == 0.0


def test_a_new_candidate_turns_the_previous_candidates_series_off(
    registry: CollectorRegistry, metrics: ReleaseMetrics
) -> None:
    metrics.sync_rollout(stored(Phase.ROLLED_BACK, "3"), ["1", "2", "3"])
    metrics.sync_rollout(stored(Phase.PROGRESSING, "2", "2"), ["1", "2", "3"])
    assert set(phases(registry, "3").values()) == {0.0}
    assert value(registry, "gateway_rollout_step", model="digits", version="3") == 0.0
    assert phases(registry, "2")["progressing"] == 1.0


def test_event_counters_exist_at_zero_for_every_loaded_version_before_anything_happens(
    registry: CollectorRegistry, metrics: ReleaseMetrics
) -> None:
    metrics.sync_rollout(stored(), ["1", "2"])
    for version in ("1", "2"):
        for event in EVENTS:
            for by in ("controller", "operator"):
                labels = {"model": "digits", "version": version, "event": event, "by": by}
                assert value(registry, "gateway_rollout_events_total", **labels) == 0.0


def test_a_rollback_by_an_operator_counts_as_a_rollback_of_the_candidate(
    registry: CollectorRegistry, metrics: ReleaseMetrics
) -> None:
    before = stored(Phase.PROGRESSING, "2", "2")
    after = stored(Phase.ROLLED_BACK, "2")
    metrics.applied("rollback", "alice", before, after)
    metrics.applied("rollback", "controller", before, after)
    metrics.applied("rollback", "controller", before, after)
    labels = {"model": "digits", "version": "2", "event": "rollback"}
    assert value(registry, "gateway_rollout_events_total", **labels, by="operator") == 1.0
    assert value(registry, "gateway_rollout_events_total", **labels, by="controller") == 2.0
    # Actions that change nothing a person would call a rollout event are not counted.
    metrics.applied("reset", "gateway", before, after)
    assert value(registry, "gateway_rollout_events_total", **{**labels, "event": "reset"}, by="operator") is None


def test_the_version_an_event_names_is_the_one_it_acted_on() -> None:
    idle_after_v2 = stored(Phase.SUCCEEDED, "2")
    assert subject(idle_after_v2, stored(Phase.PROGRESSING, "3", "3")) == "3"  # start_rollout of 3
    assert subject(stored(), stored(canary="4")) == "4"  # a canary set by hand
    assert subject(stored(canary="4"), stored()) == "4"  # and rolled back by hand
    with_shadow = StoredRelease(ReleaseState("digits", "1", shadows={"3": 1.0}))
    assert subject(stored(), with_shadow) == "3"  # add_shadow


def test_checks_show_the_last_decision_and_checks_no_longer_run_have_no_verdict(
    registry: CollectorRegistry, metrics: ReleaseMetrics
) -> None:
    rollout = RolloutState(phase=Phase.PROGRESSING, candidate="2")
    first = Decision(Event.HOLD, "", [check("accuracy", Verdict.FAIL, -0.05), check("step_accuracy", Verdict.PASS)])
    metrics.decided("digits", rollout, first)
    labels = {"model": "digits", "version": "2", "check": "accuracy"}
    assert value(registry, "gateway_rollout_check", **labels, verdict="fail") == 1.0
    assert value(registry, "gateway_rollout_check", **labels, verdict="pass") == 0.0
    assert value(registry, "gateway_rollout_check_value", **labels) == pytest.approx(-0.05)
    assert value(registry, "gateway_rollout_check_bound", **labels) == 0.02
    assert value(registry, "gateway_rollout_check_samples", **labels) == 120.0

    metrics.decided("digits", rollout, Decision(Event.HOLD, "", [check("accuracy", Verdict.INCONCLUSIVE)]))
    assert value(registry, "gateway_rollout_check", **labels, verdict="inconclusive") == 1.0
    assert value(registry, "gateway_rollout_check", **labels, verdict="fail") == 0.0
    step = {"model": "digits", "version": "2", "check": "step_accuracy"}
    assert {value(registry, "gateway_rollout_check", **step, verdict=v.value) for v in Verdict} == {0.0}
    assert math.isnan(value(registry, "gateway_rollout_check_value", **step) or 0.0)

    # A rollout of another candidate: the checks of the one before have no verdict any more.
    metrics.decided("digits", RolloutState(phase=Phase.SHADOWING, candidate="3"), Decision(Event.HOLD, "", []))
    assert value(registry, "gateway_rollout_check", **labels, verdict="inconclusive") == 0.0
