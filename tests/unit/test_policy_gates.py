"""Approval gates (policy.approve_before): how they are read and checked, and what `decide`
does at one. A gate holds a move whose checks passed until someone approves it; it never
lets a move skip its checks, and a failing check at a gate still rolls back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.config.spec import PolicySpec, load_model_spec
from gateway.errors import ConfigError
from gateway.release.compare import PairWindow, VersionWindow
from gateway.release.metrics import ReleaseMetrics
from gateway.release.policy import Event, IllegalTransition, Phase, RolloutEvidence, RolloutState, Windows, decide
from gateway.release.state import ReleaseState
from gateway.release.store import StoredRelease
from tests.unit.test_policy_steps import evidence, window

pytestmark = pytest.mark.unit


def spec(*gates: str | float, **overrides: object) -> PolicySpec:
    settings: dict[str, object] = {
        "interval_s": 1.0,
        "step_weights": (10.0, 50.0),
        "threshold": 1,
        "min_samples": 100,
        "max_latency_ratio": 0.0,
        "max_error_increase": 0.02,
        "step_min_samples": 500,
        "step_min_duration_s": 30.0,
        "max_duration_s": 600.0,
        "approve_before": gates,
        **overrides,
    }
    return PolicySpec(**settings)  # type: ignore[arg-type]


def at(step: int, **rollout: object) -> RolloutState:
    return RolloutState(Phase.PROGRESSING, step=step, candidate="2", started_at=0.0, **rollout)  # type: ignore[arg-type]


# Enough clean traffic for every check to pass and the step to have had its exposure.
PASSING = evidence(window(20_000), window(5_000), Windows(window(4_000), window(600)), step_s=31.0)
FAILING = evidence(window(20_000), window(5_000, errors=500), Windows(window(4_000), window(600, errors=60)), 31.0)
UNDECIDED = evidence(window(150), window(20), None, 31.0)


def read(tmp_path: Path, line: str) -> PolicySpec:
    (tmp_path / "model.toml").write_text(f"[policy]\n{line}\n")
    return load_model_spec(tmp_path / "model.toml").policy


def test_approve_before_is_read_from_model_toml_as_strings_and_step_weights(tmp_path: Path) -> None:
    policy = read(tmp_path, 'approve_before = ["start", 25, "promote"]')
    assert policy.approve_before == ("start", 25.0, "promote")
    assert policy.approval_gates == {"start", "25", "promote"}
    # The first step's weight is the start gate by another name.
    assert read(tmp_path, "approve_before = [1]").approval_gates == {"start"}
    assert read(tmp_path, "approve_before = [2.5]\nstep_weights = [2.5, 50]").approval_gates == {"start"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('approve_before = ["begin"]', "policy.approve_before: unknown step 'begin'; name 'start'"),
        ("approve_before = [30]", "policy.approve_before: 30 is not one of policy.step_weights (1, 5, 10, 25, 50)"),
        ("approve_before = [true]", "approve_before: expected a string (in quotes) or a number, got [True]"),
        ('approve_before = "promote"', "approve_before: expected an array"),
    ],
)
def test_a_bad_gate_is_refused_naming_the_field_and_the_fix(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.toml: ") as caught:
        read(tmp_path, line)
    assert message in str(caught.value)


def test_passing_checks_wait_at_a_gated_step_until_it_is_approved() -> None:
    gated = spec(50)
    waiting = decide(at(0), PASSING, gated, now=50.0)
    assert (waiting.event, waiting.gate) == (Event.AWAIT, "50")
    assert "checks passed at step 1/2" in waiting.reason and "awaiting approval before 50%" in waiting.reason
    # Waiting does not change the answer, nor does time: the person decides.
    assert decide(at(0, awaiting="50"), PASSING, gated, now=5_000.0).event is Event.AWAIT
    moved = decide(at(0, approved="50"), PASSING, gated, now=50.0)
    assert (moved.event, moved.weight_bp) == (Event.ADVANCE, 5000)
    # An ungated step moves on its own.
    assert decide(at(0), PASSING, spec("promote"), now=50.0).event is Event.ADVANCE


def test_an_approval_never_skips_the_checks_and_a_failure_at_a_gate_rolls_back() -> None:
    gated = spec(50)
    assert decide(at(0, approved="50"), UNDECIDED, gated, now=50.0).event is Event.HOLD
    failed = decide(at(0, awaiting="50"), FAILING, gated, now=50.0)
    assert failed.event is Event.ROLLBACK and "error_rate" in failed.reason


def test_the_last_step_waits_to_promote_and_shadowing_waits_to_start() -> None:
    gated = spec("promote", "start", shadow_intervals=1)
    last = decide(at(1), PASSING, gated, now=50.0)
    assert (last.event, last.gate) == (Event.AWAIT, "promote")
    assert decide(at(1, approved="promote"), PASSING, gated, now=50.0).event is Event.FINISH
    # Shadowing: the copies agree with the stable version, and the first traffic step waits.
    shadow = RolloutState(Phase.SHADOWING, candidate="2", started_at=0.0)
    copies = RolloutEvidence(window(20_000), VersionWindow(), PairWindow(rows=5_000, agree=4_990))
    agreeing = spec("start", min_agreement=0.9, shadow_intervals=1)
    waiting = decide(shadow, copies, agreeing, now=5.0)
    assert (waiting.event, waiting.gate) == (Event.AWAIT, "start"), waiting.reason
    started = decide(dataclasses.replace(shadow, approved="start"), copies, agreeing, now=5.0)
    assert (started.event, started.weight_bp) == (Event.ADVANCE, 1000)


def test_a_start_gate_without_shadowing_waits_before_any_check() -> None:
    waiting = decide(at(0, awaiting="start"), UNDECIDED, spec("start"), now=5_000.0)
    assert (waiting.event, waiting.gate, waiting.checks) == (Event.AWAIT, "start", ())
    assert "before the first traffic step (10%)" in waiting.reason


def test_on_timeout_promote_still_stops_at_a_promote_gate() -> None:
    gated = spec("promote", on_timeout="promote", max_duration_s=60.0)
    timed_out = decide(at(1), UNDECIDED, gated, now=61.0)
    assert (timed_out.event, timed_out.gate) == (Event.AWAIT, "promote")
    assert "on_timeout = promote" in timed_out.reason


def test_moving_or_ending_clears_the_gate_and_await_keeps_the_phase() -> None:
    waiting = at(0).on(Event.AWAIT, awaiting="50")
    assert (waiting.phase, waiting.awaiting) == (Phase.PROGRESSING, "50")
    approved = waiting.on(Event.APPROVE, awaiting="", approved="50")
    assert approved.on(Event.ADVANCE, step=1).approved == ""
    assert waiting.on(Event.ROLLBACK).awaiting == ""
    paused = waiting.on(Event.PAUSE)
    assert paused.awaiting == "50" and paused.on(Event.RESUME).awaiting == "50"
    with pytest.raises(IllegalTransition, match="cannot approve while the rollout is paused"):
        paused.on(Event.APPROVE)
    with pytest.raises(IllegalTransition):
        RolloutState().on(Event.APPROVE)


def test_the_awaiting_gauge_is_one_while_a_rollout_waits() -> None:
    registry = CollectorRegistry()
    metrics = ReleaseMetrics(registry)
    state = ReleaseState("digits", "1", canary="2", canary_weight_bp=1000)

    def awaiting() -> float | None:
        return registry.get_sample_value("gateway_rollout_awaiting_approval", {"model": "digits", "version": "2"})

    metrics.sync_rollout(StoredRelease(state, at(0, awaiting="50")), ["1", "2"])
    assert awaiting() == 1.0
    metrics.sync_rollout(StoredRelease(state, at(0, approved="50")), ["1", "2"])
    assert awaiting() == 0.0
