"""Release-plane Prometheus collectors, created on an injected registry (no module globals).

They live here rather than beside the serving collectors because they read the
release plane's reports, and the serving plane must not know the release plane.

With `--workers N` every worker writes its own values and the supervisor merges
them (prometheus_client's multiprocess mode), so each gauge says how workers
combine. The rollout's figures have one writer each: the phase and step come from
the process that serves the control API (worker 0, or the only process), the
checks from the controller that holds the lease, and rollout events from the
process that applied them (every change goes through worker 0's control API or
controller). Those gauges are `livemostrecent`: the newest write of a live process
wins, so a restarted worker 0 or a new lease holder takes over, and a dead
process's values go with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.release.confidence import Verdict
from gateway.release.policy import ACTIVE, Phase, RolloutState
from gateway.types import BASIS_POINTS

if TYPE_CHECKING:
    from gateway.release.plane import ModelReport
    from gateway.release.policy import Decision
    from gateway.release.store import StoredRelease

# The audited actions a release change can apply (ReleaseOps), counted as rollout events.
# Every one is created at 0 for each loaded version, so the first rollback of a version is
# an increase Prometheus can see (a series born at 1 has no increase to alert on).
EVENTS = (
    "start_rollout",
    "advance",
    "failed_check",
    "pause",
    "resume",
    "promote",
    "rollback",
    "set_traffic",
    "add_shadow",
    "remove_shadow",
    "await_approval",
    "approve",
    "add_route",
    "remove_route",
)
CONTROLLER = "controller"  # the actor name the controller's changes carry
BY = (CONTROLLER, "operator")
# The figures of a check exported as gauges: CheckResult's field -> metric name suffix.
CHECK_FIGURES = {"value": "value", "low": "low", "high": "high", "bound": "bound", "samples": "samples"}


class ReleaseMetrics:
    """Release-plane figures, synced from the release plane's reports every sample period.

    The plane keeps plain counters (cheap on the request path); this turns
    them into Prometheus counters (by delta) and gauges.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        mv = ("model", "version")
        self.weight = Gauge(
            "gateway_traffic_weight",
            "Share of live traffic (shadows: mirror fraction)",
            (*mv, "role"),
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.shadow = Counter(
            "gateway_shadow_requests", "Mirrored copies by outcome", (*mv, "outcome"), registry=registry
        )
        self.circuit = Gauge(
            "gateway_shadow_circuit_open",
            "1 while a shadow's circuit is open",
            mv,
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.feedback = Counter("gateway_feedback", "Labels received", ("model", "outcome"), registry=registry)
        # Apart from the versions' request counts of the split: a rule's cohort (docs/routing.md).
        self.routed = Counter(
            "gateway_rule_routed_requests",
            "Requests a routing rule sent to a version, by outcome (ok | error)",
            (*mv, "rule", "outcome"),
            registry=registry,
        )
        self.compare: dict[str, Gauge] = {
            field: Gauge(
                f"gateway_compare_{field}",
                f"Candidate vs stable: {field.replace('_', ' ')}",
                mv,
                registry=registry,
                multiprocess_mode="liveall",
            )
            for field in (
                "agreement",
                "compared_rows",
                "within_tolerance",
                "max_abs_diff",
                "mean_abs_diff",
                "relative_l2",
                "latency_diff_ms",
                "accuracy",
                "labelled",
            )
        }
        self._seen: dict[tuple[str, ...], float] = {}
        self._init_rollout(registry)
        self._init_drift(registry)
        self.store_up = Gauge(
            "gateway_release_store_up",
            "1 while the release store answers; 0: serving the last installed release, release changes "
            "refused and rollout decisions paused until it answers again",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.store_up.set(1)

    def _init_drift(self, registry: CollectorRegistry) -> None:
        # Each worker judges its own windows (docs/drift.md); across workers the worst counts.
        mv = ("model", "version")
        self.drift: dict[str, Gauge] = {
            name: Gauge(f"gateway_drift_{name}", text, mv, registry=registry, multiprocess_mode="livemax")
            for name, text in (
                ("score", "The largest feature PSI, live window vs reference"),
                ("features_over_threshold", "Features drifting: Holm-rejected and PSI >= monitor.max_drift"),
                ("prediction_psi", "PSI of the predicted-class histogram vs the reference labels"),
                ("alarm", "1 while the last closed window has a drifting feature or prediction"),
                ("windows_closed", "Drift windows closed so far"),
            )
        }
        self.quality: dict[str, Counter] = {
            name: Counter(f"gateway_drift_{name}", text, (*mv, "input"), registry=registry)
            for name, text in (
                ("nonfinite_values", "NaN or infinite input values seen"),
                ("out_of_range_values", "Input values outside the reference range (with its margin)"),
            )
        }
        self.rejected = Counter(
            "gateway_drift_rejected_requests",
            "Requests refused for NaN/Inf (monitor.reject_invalid)",
            mv,
            registry=registry,
        )

    def _init_rollout(self, registry: CollectorRegistry) -> None:
        self.phase = Gauge(
            "gateway_rollout_phase",
            "1 for the model's current rollout phase, 0 for the others; version: the candidate",
            ("model", "version", "phase"),
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.step = Gauge(
            "gateway_rollout_step",
            "The traffic step a rollout is at, from 1 as `gateway status` shows it; 0 outside the steps",
            ("model", "version"),
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.awaiting = Gauge(
            "gateway_rollout_awaiting_approval",
            "1 while the rollout waits at an approval gate (policy.approve_before) for "
            "`gateway rollout approve`, else 0; version: the candidate",
            ("model", "version"),
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        check = ("model", "version", "check")
        self.check = Gauge(
            "gateway_rollout_check",
            "1 for each check's verdict at the controller's last decision, 0 for the other verdicts "
            "(all 0: the check was not run at the last decision)",
            (*check, "verdict"),
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.check_figures: dict[str, Gauge] = {
            field: Gauge(
                f"gateway_rollout_check_{suffix}",
                f"The {field} of each check at the controller's last decision (NaN: not run then)",
                check,
                registry=registry,
                multiprocess_mode="livemostrecent",
            )
            for field, suffix in CHECK_FIGURES.items()
        }
        self.events = Counter(
            "gateway_rollout_events",
            "Release changes applied (audited actions; by: the controller or an operator); version: "
            "the version acted on",
            ("model", "version", "event", "by"),
            registry=registry,
        )
        self._candidates: dict[str, str] = {}  # model -> the candidate its phase series name
        self._checked: dict[str, set[tuple[str, str]]] = {}  # model -> (version, check) series set
        self._primed: set[tuple[str, str]] = set()

    def _inc(self, counter: Counter, labels: tuple[str, ...], total: float) -> None:
        key = (counter._name, *labels)
        delta = total - self._seen.get(key, 0.0)
        if delta > 0:
            counter.labels(*labels).inc(delta)
            self._seen[key] = total

    def sync(self, report: ModelReport) -> None:
        state = report.release
        model = state.model
        weight = state.canary_weight_bp / BASIS_POINTS if state.canary else 0.0
        self.weight.labels(model, state.stable, "stable").set(1.0 - weight)
        if state.canary:
            self.weight.labels(model, state.canary, "canary").set(weight)
        for version, fraction in state.shadows.items():
            self.weight.labels(model, version, "shadow").set(fraction)
        for version, shadow in report.shadows.items():
            for outcome, count in asdict(shadow.counters).items():
                self._inc(self.shadow, (model, version, outcome), count)
            self.circuit.labels(model, version).set(shadow.circuit_open)
        self._inc(self.feedback, (model, "joined"), report.feedback_joined)
        for r in report.routed:
            rule = r.role.removeprefix("rule ")
            self._inc(self.routed, (model, r.version, rule, "ok"), r.requests - r.errors)
            self._inc(self.routed, (model, r.version, rule, "error"), r.errors)
        self._inc(self.feedback, (model, "unknown"), report.feedback_unknown)
        for v in report.versions:
            for field, gauge in self.compare.items():
                value = getattr(v, field)
                if value == value:  # NaN: nothing measured yet
                    gauge.labels(model, v.version).set(value)
        for d in report.drift:
            labels = (model, d.version)
            self.drift["score"].labels(*labels).set(d.score)
            self.drift["features_over_threshold"].labels(*labels).set(d.over_threshold)
            self.drift["prediction_psi"].labels(*labels).set(d.prediction.psi if d.prediction else math.nan)
            self.drift["alarm"].labels(*labels).set(int(d.alarm))
            self.drift["windows_closed"].labels(*labels).set(d.windows_closed)
            for name, counts in (("nonfinite_values", d.nonfinite), ("out_of_range_values", d.out_of_range)):
                for tensor in {*counts, *d.out_of_range}:
                    self._inc(self.quality[name], (*labels, tensor), counts.get(tensor, 0))
                    self.quality[name].labels(*labels, tensor)  # at 0 from the start, so increases show
            self.rejected.labels(*labels)  # at 0 from the start
            self._inc(self.rejected, labels, d.rejected)

    # -- rollouts -----------------------------------------------------------------------

    def sync_rollout(self, stored: StoredRelease, versions: Iterable[str]) -> None:
        """The model's rollout phase and step, and its event counters at 0 for every loaded
        version. Called by one process only (see the module docstring): any worker's view
        follows the store, but two of them could disagree for a moment after a change."""
        model, rollout = stored.state.model, stored.rollout
        for version in versions:
            if (model, version) not in self._primed:
                self._primed.add((model, version))
                for event in EVENTS:
                    for by in BY:
                        self.events.labels(model, version, event, by)
        candidate = rollout.candidate
        previous = self._candidates.get(model)
        if previous is not None and previous != candidate:
            # The series of the candidate before: no longer the model's rollout.
            for phase in Phase:
                self.phase.labels(model, previous, phase.value).set(0)
            self.step.labels(model, previous).set(0)
            self.awaiting.labels(model, previous).set(0)
        self._candidates[model] = candidate
        for phase in Phase:
            self.phase.labels(model, candidate, phase.value).set(1 if phase is rollout.phase else 0)
        self.step.labels(model, candidate).set(_step(rollout))
        self.awaiting.labels(model, candidate).set(1 if rollout.awaiting and rollout.phase in ACTIVE else 0)

    def decided(self, model: str, rollout: RolloutState, decision: Decision) -> None:
        """The checks of the controller's latest decision on `model`'s rollout.

        A check not run this time (a step check on a decision that stopped early, or a
        check of an earlier candidate) is set to no verdict and NaN figures, because a
        gauge cannot be removed from the files of a multi-worker gateway."""
        version = rollout.candidate
        now: set[tuple[str, str]] = set()
        for result in decision.checks:
            now.add((version, result.name))
            for verdict in Verdict:
                self.check.labels(model, version, result.name, verdict.value).set(1 if result.verdict is verdict else 0)
            for field, gauge in self.check_figures.items():
                gauge.labels(model, version, result.name).set(float(getattr(result, field)))
        for stale_version, name in self._checked.get(model, set()) - now:
            for verdict in Verdict:
                self.check.labels(model, stale_version, name, verdict.value).set(0)
            for gauge in self.check_figures.values():
                gauge.labels(model, stale_version, name).set(math.nan)
        self._checked[model] = self._checked.get(model, set()) | now

    def applied(self, action: str, actor: str, before: StoredRelease, after: StoredRelease) -> None:
        """Count one applied release change (ReleaseOps calls this after it is stored)."""
        if action not in EVENTS:
            return
        by = CONTROLLER if actor == CONTROLLER else "operator"
        self.events.labels(after.state.model, subject(before, after), action, by).inc()


def subject(before: StoredRelease, after: StoredRelease) -> str:
    """The version a change acted on: the rollout's candidate (the one it had, or the one it
    starts), else the canary set or cleared, else a shadow added or removed."""
    for rollout in (before.rollout, after.rollout):
        if rollout.phase in ACTIVE and rollout.candidate:
            return rollout.candidate
    if before.state.canary or after.state.canary:
        return before.state.canary or after.state.canary
    changed = set(before.state.shadows) ^ set(after.state.shadows)
    return min(changed) if changed else after.state.stable


def _step(rollout: RolloutState) -> int:
    """The step as `gateway status` counts it (from 1), while the rollout has one."""
    on_steps = rollout.phase is Phase.PROGRESSING or (
        rollout.phase is Phase.PAUSED and rollout.resume_to is Phase.PROGRESSING
    )
    return rollout.step + 1 if on_steps else 0
