"""The release plane beside the request path: route, record, mirror, join labels, report.

The data plane asks it which version serves a request and tells it what
happened; everything that compares versions lives here, so the request path
stays a short sequence of calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.errors import GatewayError, InvalidInput
from gateway.release.drift.build import build_monitor
from gateway.release.drift.monitor import ModelMonitor, VersionDriftReport
from gateway.release.evidence import COPY, ModelEvidence, VersionReport, model_report, routed_report, routed_role
from gateway.release.external_poll import ExternalChecks
from gateway.release.routing import Role
from gateway.release.rules import Rule, first_match, resolve
from gateway.release.shadow import CopySink, ModelRun, PrimaryActivity, ShadowCopy, ShadowLane, ShadowReport
from gateway.release.state import ReleaseState, ReleaseTable, initial_state
from gateway.serving.executor import for_shadows
from gateway.serving.registry import LoadedVersion, Registry
from gateway.tracing import Tracing
from gateway.types import ParamValue, RequestRun, WireRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelReport:
    release: ReleaseState
    versions: list[VersionReport]
    window_s: float
    feedback_joined: int
    feedback_unknown: int
    predictions_logged: int
    shadows: dict[str, ShadowReport]  # by version
    drift: list[VersionDriftReport] = dataclasses.field(default_factory=list)  # profiled versions
    # Traffic routing rules sent, one row per (rule, version), role "rule NAME": counted
    # apart from the versions' rows above, which are the split's (docs/routing.md).
    routed: list[VersionReport] = dataclasses.field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """What the data plane tells the release plane about one request it served."""

    loaded: LoadedVersion
    role: Role
    state: ReleaseState | None  # the release that routed it; None when pinned to a version
    ok: bool
    run: RequestRun
    rule: Rule | None = None  # the routing rule that chose the version (role "rule")


def routing_key(parameters: dict[str, ParamValue], request_id: str) -> str | None:
    key = parameters.get("routing_key")
    if key is None:
        return request_id or None
    if not isinstance(key, str):
        raise InvalidInput("parameter 'routing_key' must be a string (string_param)")
    return key


def _stacked(copies: Sequence[ShadowCopy], evidence: ModelEvidence) -> np.ndarray:
    """The compared output of every copy's primary answer, rows stacked in copy order."""
    if len(copies) == 1:
        return evidence.compared(copies[0].primary.outputs)
    return np.concatenate([evidence.compared(c.primary.outputs) for c in copies])


# The other version's model run, for a paired timing of a sink's batches, or None (no timing now).
PartnerFinder = Callable[[], ModelRun | None]


def _no_partner() -> ModelRun | None:
    return None


@dataclass(frozen=True, slots=True)
class ShadowSink:
    """A shadow's answers: compared with the stable's, logged for labels, counted in its window."""

    evidence: ModelEvidence
    version: str
    find_partner: PartnerFinder = _no_partner  # the stable's run while the shadow is a rollout's candidate

    def partner(self) -> ModelRun | None:
        return self.find_partner()

    def timed(self, copies: Sequence[ShadowCopy], seconds: float, partner_seconds: float) -> None:
        self.evidence.record_timing(self.version, seconds, partner_seconds)

    def __call__(self, copies: Sequence[ShadowCopy], outputs: list[np.ndarray], seconds: float) -> bool:
        evidence = self.evidence
        n = len(copies)
        rows = sum(c.primary.rows for c in copies)
        shadow = evidence.compared(outputs)
        latency_diff = n * seconds - sum(c.primary.seconds for c in copies)
        if not evidence.record_pair(self.version, _stacked(copies, evidence), shadow, latency_diff, n):
            evidence.record_request(self.version, False, seconds, rows, n, served=False)
            return False  # wrong shape: a failure, not evidence
        evidence.record_request(self.version, True, seconds, rows, n, served=False)
        evidence.record_predictions(
            self.version, "shadow", [(c.primary.request_id, c.primary.rows) for c in copies], shadow
        )
        return True


@dataclass(frozen=True, slots=True)
class DualRunSink:
    """A canary's requests run again on the stable version, so the canary gets agreement figures."""

    evidence: ModelEvidence
    canary: str
    find_partner: PartnerFinder = _no_partner  # the canary's run while it is a rollout's candidate

    def partner(self) -> ModelRun | None:
        return self.find_partner()

    def timed(self, copies: Sequence[ShadowCopy], seconds: float, partner_seconds: float) -> None:
        # This lane runs the stable version; the partner is the canary.
        self.evidence.record_timing(self.canary, partner_seconds, seconds)

    def __call__(self, copies: Sequence[ShadowCopy], outputs: list[np.ndarray], seconds: float) -> bool:
        evidence = self.evidence
        latency_diff = sum(c.primary.seconds for c in copies) - len(copies) * seconds
        stable = evidence.compared(outputs)
        if not evidence.record_pair(self.canary, stable, _stacked(copies, evidence), latency_diff, len(copies)):
            return False
        stable_version, candidate = evidence.rollout_versions
        if candidate == self.canary:
            # Logged beside the canary's answer, so labels arriving later compare the two
            # versions on the very same rows (the rollout's paired accuracy check).
            requests = [(c.primary.request_id, c.primary.rows) for c in copies]
            evidence.record_predictions(stable_version, COPY, requests, stable)
        return True


class ReleasePlane:
    def __init__(self, registry: Registry, rng: random.Random | None = None) -> None:
        self.registry = registry
        self.rng = rng or random.Random()
        self.table = ReleaseTable(lambda model: set(registry.entry(model).versions))
        self.evidence: dict[str, ModelEvidence] = {}
        self.monitors: dict[str, ModelMonitor] = {}  # models with a drift reference (docs/drift.md)
        self._lanes: dict[tuple[str, str], ShadowLane] = {}
        self._sinks: dict[tuple[str, str, bool], CopySink] = {}
        self._previous: dict[str, ReleaseState] = {}
        # Other workers' evidence snapshots, when several processes serve (set by the server).
        self.peers: Callable[[str], list[dict[str, Any]]] = lambda model: []
        # The primary request path (set by the server: the DataPlane), so shadows wait for its idle time.
        self.primary: PrimaryActivity | None = None
        # Set by the server when tracing is on: shadow batches of traced requests get linked spans.
        self.tracing: Tracing | None = None
        # External checks' latest readings ([[policy.checks]]): the controller polls, status reads.
        self.external = ExternalChecks()
        # Set by the server when notifications are on: told (model, version, times opened,
        # failures in a row) when a shadow lane's circuit opens.
        self.on_circuit_open: Callable[[str, str, int, int], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.table.subscribe(self._on_change)
        for name in registry.names():
            self.add_model(name)

    def add_model(self, name: str) -> None:
        """Give a (re)loaded model a release: the current one if it still fits, else the spec's."""
        entry = self.registry.entry(name)
        initial = initial_state(name, entry.spec, entry.versions, entry.default_version)
        try:
            current = self.table.get(name)
            self.table.install(current)
        except GatewayError:
            self.table.install(dataclasses.replace(initial, revision=self.table.revision_of(name) + 1))
        compare = entry.spec.compare
        stable = entry.versions[self.table.get(name).stable].model
        index = stable.output_names.index(compare.output) if compare.output else 0
        if name not in self.evidence:
            self.evidence[name] = ModelEvidence(name, compare, index)
        self._monitor(name)
        self._forget(name)  # lanes point at the old executors, sinks at the old evidence

    def restore_model(self, name: str, state: ReleaseState | None) -> None:
        """Undo an `add_model` whose load failed: the release served before it, as it was
        (the registry already serves the previous entry again)."""
        if state is None:
            self.table.remove(name)
        else:
            self.table.install(state)
            self._monitor(name)
        self._forget(name)  # lanes made meanwhile point at the new, discarded executors

    def _monitor(self, name: str) -> None:
        monitor = build_monitor(self.registry.entry(name), self.evidence[name].drift, self.rng)
        if monitor is None:
            self.monitors.pop(name, None)
        else:
            self.monitors[name] = monitor

    def remove_model(self, name: str) -> None:
        self.table.remove(name)
        self.evidence.pop(name, None)
        self.monitors.pop(name, None)
        self._forget(name)

    def _forget(self, name: str) -> None:
        for key in [k for k in self._lanes if k[0] == name]:
            del self._lanes[key]
        for sink_key in [k for k in self._sinks if k[0] == name]:
            del self._sinks[sink_key]

    def _on_change(self, state: ReleaseState) -> None:
        # A version (re)added as a shadow is an operator's fresh start: close its circuit.
        previous = self._previous.get(state.model)
        for version in state.shadows:
            if previous is not None and version not in previous.shadows:
                lane = self._lanes.get((state.model, version))
                if lane is not None:
                    lane.breaker.success()
        self._previous[state.model] = state

    # -- the request path ---------------------------------------------------------------

    def route(self, req: WireRequest, key: str | None) -> tuple[LoadedVersion, Role, ReleaseState | None, Rule | None]:
        """The version serving `req`, its role, the release that chose it (None: pinned by
        the client) and the routing rule that did (None: the split, or pinned)."""
        model = req.model
        if req.version:
            return self.registry.get(model, req.version), "pinned", None, None
        state = self.table.get(model)
        if state.rules:  # the one test a model without rules pays
            rule = first_match(state.rules, req.parameters, req.headers)
            if rule is not None:
                version = resolve(rule, state.stable, state.canary)
                if version:
                    return self.registry.get(model, version), "rule", state, rule
        chosen, role = state.split.choose(key, self.rng)
        return self.registry.get(model, chosen), role, state, None

    def screen(self, loaded: LoadedVersion, feeds: dict[str, np.ndarray]) -> None:
        """Before the model runs: InvalidInput for NaN/Inf where monitor.reject_invalid is set."""
        monitor = self.monitors.get(loaded.name)
        if monitor is not None:
            monitor.check(loaded.version, feeds)

    def record(self, served: Served) -> None:
        loaded, run, state = served.loaded, served.run, served.state
        model = loaded.name
        evidence = self.evidence[model]
        if served.rule is not None:
            # A cohort chosen by a rule is not a random sample of traffic: counted apart, and
            # kept out of the versions' windows, the rollout's arms, mirroring and drift, so
            # it cannot bias the canary-vs-stable comparison (docs/routing.md).
            name = served.rule.name
            evidence.record_routed(name, loaded.version, served.ok, run.seconds, run.rows)
            if served.ok and run.outputs:
                evidence.record_prediction(run.request_id, loaded.version, routed_role(name), run.outputs)
            return
        evidence.record_request(loaded.version, served.ok, run.seconds, run.rows)
        if not served.ok or not run.outputs:
            return
        monitor = self.monitors.get(model)
        if monitor is not None:
            try:
                monitor.record(loaded.version, run.feeds, run.rows, evidence.compared(run.outputs))
            except Exception:
                # The request is answered already: a monitoring bug must not fail it, nor every
                # request after it. Monitoring stops for this model until it is loaded again.
                log.exception("%s: drift monitoring failed and is off for this model until it reloads", model)
                self.monitors.pop(model, None)
        evidence.record_prediction(run.request_id, loaded.version, served.role, run.outputs)
        if state is None:
            return  # pinned requests take no part in the release
        if served.role == "stable":
            for version, fraction in state.shadows.items():
                if fraction >= 1.0 or self.rng.random() < fraction:
                    self.lane(model, version).mirror(run, self._sink(model, version, dual_run=False), self._tasks)
        elif served.role == "canary" and self.rng.random() < state.canary_compare_fraction:
            # The canary's request runs again on the stable version: the reference is the canary's answer.
            sink = self._sink(model, loaded.version, dual_run=True)
            self.lane(model, state.stable).mirror(run, sink, self._tasks)

    def lane(self, model: str, version: str) -> ShadowLane:
        lane = self._lanes.get((model, version))
        if lane is None:
            loaded = self.registry.get(model, version)
            lane = self._lanes[(model, version)] = ShadowLane(
                for_shadows(loaded.executor),
                max_rows=loaded.spec.max_batch_size,
                primary=self.primary,
                model=model,
                version=version,
                run_direct=loaded.model.run,
                tracing=self.tracing,
            )
            if self.on_circuit_open is not None:
                lane.breaker.on_open = functools.partial(self.on_circuit_open, model, version)
        return lane

    def _sink(self, model: str, version: str, dual_run: bool) -> CopySink:
        key = (model, version, dual_run)
        sink = self._sinks.get(key)
        if sink is None:
            evidence = self.evidence[model]
            if dual_run:
                sink = DualRunSink(evidence, version, functools.partial(self._partner, model, version, version))
            else:
                sink = ShadowSink(evidence, version, functools.partial(self._partner, model, version, ""))
            self._sinks[key] = sink
        return sink

    def _partner(self, model: str, candidate: str, runs_on: str) -> ModelRun | None:
        """The model run of `runs_on` (empty: the current stable version) while `candidate` is
        the candidate of a rollout that judges latency; None otherwise. Asked once per batch of
        copies, so the second run is paid only while a rollout needs the paired timing."""
        evidence = self.evidence.get(model)
        if evidence is None or evidence.rollout is None or evidence.rollout_versions[1] != candidate:
            return None
        try:
            if self.registry.entry(model).spec.policy.max_latency_ratio <= 0:
                return None
            return self.registry.get(model, runs_on or self.table.get(model).stable).model.run
        except GatewayError:
            return None  # unloaded meanwhile: no timing for this batch

    # -- labels and reports -------------------------------------------------------------

    def feedback(self, model: str, request_id: str, labels: Sequence[float], received: bool = True) -> bool:
        if not request_id:
            raise InvalidInput("feedback needs the request id the prediction was made for")
        if not labels:
            raise InvalidInput(f"feedback for {request_id!r} has no labels")
        self.table.get(model)  # NOT_FOUND for an unknown model
        return self.evidence[model].feedback(request_id, labels, received)

    def combined(self, model: str) -> ModelEvidence:
        """This process's evidence plus the other workers' (when several share the port)."""
        monitor = self.monitors.get(model)
        if monitor is not None:
            monitor.flush()  # requests queued for binning count in what is shared and reported
        evidence = self.evidence[model]
        peers = self.peers(model)
        return evidence.merged_with(peers) if peers else evidence

    def report(self, model: str, local: bool = False) -> ModelReport:
        """The model's report; `local` leaves other workers out (Prometheus adds workers up itself)."""
        state = self.table.get(model)
        evidence = self.evidence[model] if local else self.combined(model)
        roles = {v: state.role_of(v) for v in [state.stable, state.canary, *state.shadows] if v}
        shadows = {version: lane.report() for (name, version), lane in self._lanes.items() if name == model}
        return ModelReport(
            release=state,
            versions=model_report(evidence, roles),
            window_s=time.time() - evidence.started,
            feedback_joined=evidence.feedback_joined,
            feedback_unknown=max(0, evidence.labels_received - evidence.feedback_joined),
            predictions_logged=len(evidence.log),
            shadows=shadows,
            drift=self.drift(model, local=True) if local else [],
            routed=routed_report(evidence),
        )

    def drift(self, model: str, local: bool = False) -> list[VersionDriftReport]:
        """Each profiled version's drift report (empty: no reference, or monitoring off)."""
        self.table.get(model)  # NOT_FOUND for an unknown model
        monitor = self.monitors.get(model)
        if monitor is None:
            return []
        monitor.flush()
        return monitor.report(self.evidence[model].drift if local else self.combined(model).drift)

    async def idle(self) -> None:
        """Wait for outstanding shadow copies (tests, and a clean drain)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
