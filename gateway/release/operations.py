"""Every change to a release, manual or automatic, goes through here.

An operation checks the rollout transition table, builds the new release
state, writes it and its audit record in one store transaction, and only
then serves it. A refused operation is audited too, with its reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gateway.config.spec import START_GATE, PolicySpec, describe_gate
from gateway.errors import FailedPrecondition, GatewayError, InvalidInput
from gateway.logthrottle import one_line
from gateway.release.gate import CapturedRequests, captured_inputs, generated_inputs, run_gate
from gateway.release.plane import ReleasePlane
from gateway.release.policy import ACTIVE, AT_REST, DECIDING, CheckResult, Event, Phase, RolloutState
from gateway.release.rules import rule_from_dict, with_rule, without_rule
from gateway.release.state import ReleaseState
from gateway.release.store import AuditEntry, AuditOutcome, Conflict, Store, StoredRelease
from gateway.types import BASIS_POINTS, Tensors

log = logging.getLogger(__name__)

# The audit actions of approval gates (other modules read them: notifications, `rollout wait`).
AWAIT_APPROVAL = "await_approval"
APPROVE = "approve"
CONTROLLER = "controller"  # the actor the controller's own changes carry

# A reason is a sentence for the audit log, not a document: every one is stored and
# read back by `gateway audit`, so an unbounded one grows the store without limit.
MAX_REASON_CHARS = 1024


def check_reason(reason: str) -> None:
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidInput(
            f"reason is {len(reason)} characters; the limit is {MAX_REASON_CHARS}: shorten it "
            "(link to a ticket for the long story)"
        )
    if "\x00" in reason:
        # PostgreSQL's text cannot hold NUL: stored as it is, the write failed and the caller
        # was told the database was unreachable (UNAVAILABLE), which it was not.
        raise InvalidInput("reason holds a NUL character (\\x00): send plain text")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One audited change of a release: what `ReleaseOps.change` takes, for `change_steps`."""

    action: str
    reason: str
    event: Event | None  # None: no rollout transition (a shadow added or removed)
    state_changes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rollout_changes: Mapping[str, Any] | None = None
    checks: Sequence[CheckResult] = ()
    actor: str = ""  # who the audit names for this step; empty: the caller of change_steps


# Told of each applied step once it is stored and served: (action, actor, before, after).
# How the metrics count rollbacks and promotions, whoever made them, without ReleaseOps
# knowing Prometheus.
AppliedHook = Callable[[str, str, StoredRelease, StoredRelease], None]
# Told of every audit row once it is stored, applied or refused (with its revision): how
# notifications learn of rollout events (gateway.release.notify) without ReleaseOps knowing them.
AuditHook = Callable[[AuditEntry], None]


class ReleaseOps:
    def __init__(
        self,
        plane: ReleasePlane,
        store: Store,
        captured: CapturedRequests | None = None,
        on_applied: AppliedHook | None = None,
        on_audit: AuditHook | None = None,
    ) -> None:
        self.plane = plane
        self.store = store
        self.captured = captured
        self.on_applied = on_applied
        self.on_audit = on_audit
        self.rollouts: dict[str, RolloutState] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- startup and sync ---------------------------------------------------------------

    def restore(self) -> None:
        """Serve what the store holds; store the spec's release for models it does not know yet."""
        stored = self.store.load_all()
        for model in self.plane.table.models():
            current = stored.get(model)
            if current is not None:
                spec = self.plane.table.get(model)
                try:
                    self._install(current)
                    log.info("%s: restored release revision %d (%s)", model, current.revision, current.rollout.phase)
                    if _differs(spec, current.state):
                        log.warning(
                            "%s: model.toml's [release] (%s) differs from the stored release (%s, revision %d); "
                            "serving the stored one: change it with `gateway traffic`/`gateway shadow`, "
                            "or start with a fresh --state-dir to take model.toml's",
                            model,
                            _describe(spec),
                            _describe(current.state),
                            current.revision,
                        )
                    continue
                except GatewayError as exc:
                    log.warning("%s: stored release no longer fits the loaded versions (%s): reset", model, exc)
                    after = StoredRelease(
                        dataclasses.replace(self.plane.table.get(model), revision=current.revision + 1)
                    )
                    self.store.commit(
                        current.revision, after, self._audit("gateway", "reset", str(exc), before=current, after=after)
                    )
                    self._install(after)
                    continue
            initial = StoredRelease(self.plane.table.get(model))
            try:
                self.store.commit(
                    None, initial, self._audit("gateway", "init", "release from model.toml", before=None, after=initial)
                )
            except Conflict:
                # Another worker of this gateway stored it first: serve theirs.
                self._install(self.store.load_all()[model])
                continue
            self.rollouts[model] = initial.rollout

    def adopt(self, model: str) -> None:
        """A model (re)loaded at run time: serve its stored release, or store the one it has now."""
        stored = self.store.load_all().get(model)
        current = StoredRelease(self.plane.table.get(model), self.rollouts.get(model, RolloutState()))
        if stored is not None:
            try:
                if stored.revision >= current.revision:
                    self._install(stored)
                    return
            except GatewayError:
                pass
            after = StoredRelease(dataclasses.replace(current.state, revision=stored.revision + 1), current.rollout)
            self.store.commit(
                stored.revision, after, self._audit("gateway", "reset", "model reloaded", before=stored, after=after)
            )
            self._install(after)
            return
        self.store.commit(None, current, self._audit("gateway", "init", "model loaded", before=None, after=current))
        self.rollouts[model] = current.rollout

    def forget(self, model: str) -> None:
        self.rollouts.pop(model, None)

    def sync(self) -> int:
        """Install releases other processes changed; returns how many."""
        changed = 0
        for model, stored in self.store.load_all().items():
            if model in self.plane.evidence and stored.revision > self.plane.table.revision_of(model):
                self._install(stored)
                changed += 1
        return changed

    def _install(self, stored: StoredRelease) -> None:
        model = stored.state.model
        previous = self.rollouts.get(model)
        self.plane.table.install(stored.state)
        self.rollouts[model] = stored.rollout
        evidence = self.plane.evidence[model]
        active = stored.rollout.phase in DECIDING
        if active and (
            previous is None or previous.started_at != stored.rollout.started_at or evidence.rollout is None
        ):
            # A new rollout, or one resumed after a restart: evidence starts afresh.
            key = f"{stored.state.stable}>{stored.rollout.candidate}@{stored.rollout.started_at}"
            evidence.begin_rollout(stored.state.stable, stored.rollout.candidate, key)
        elif active and (_new_step(previous, stored.rollout) or _start_opened(previous, stored.rollout)):
            # Judged on its own traffic from here: what the rollout gathered so far is the base.
            evidence.begin_step(*self.plane.combined(model).rollout_windows())
        elif not active and stored.rollout.phase is not Phase.PAUSED:
            evidence.end_rollout()

    # -- the one way to change a release ------------------------------------------------

    def current(self, model: str) -> StoredRelease:
        return StoredRelease(self.plane.table.get(model), self.rollouts.get(model, RolloutState()))

    def _audit(
        self,
        actor: str,
        action: str,
        reason: str,
        *,
        before: StoredRelease | None,
        after: StoredRelease | None,
        evidence: Any = None,
        outcome: AuditOutcome = AuditOutcome.APPLIED,
    ) -> AuditEntry:
        return AuditEntry(
            actor=actor,
            action=action,
            model=(after or before).state.model,  # type: ignore[union-attr]
            reason=reason,
            outcome=outcome,
            before=None if before is None else before.to_dict(),
            after=None if after is None else after.to_dict(),
            evidence=evidence,
            revision=None if after is None else after.revision,
            at=time.time(),
        )

    async def _record_refusal(
        self, actor: str, action: str, error: object, *, before: StoredRelease, evidence: Any = None
    ) -> None:
        """Audit a change that was refused, with why, before the caller raises."""
        entry = self._audit(
            actor,
            action,
            f"refused: {error}",
            before=before,
            after=None,
            evidence=evidence,
            outcome=AuditOutcome.REFUSED,
        )
        await asyncio.to_thread(self.store.record_refused, entry)
        self._audited([entry])

    def _audited(self, entries: Sequence[AuditEntry]) -> None:
        if self.on_audit is None:
            return
        for entry in entries:
            try:
                self.on_audit(entry)
            except Exception:  # stored is stored: telling others of it must never undo or fail it
                log.exception("%s: the audit hook failed", entry.model)

    async def change(
        self,
        model: str,
        actor: str,
        action: str,
        reason: str,
        *,
        event: Event | None,
        state_changes: Mapping[str, Any] | None = None,
        rollout_changes: Mapping[str, Any] | None = None,
        checks: Sequence[CheckResult] = (),
    ) -> StoredRelease:
        """One step of `change_steps`; `event` is its rollout transition (None: none)."""
        step = Step(
            action=action,
            reason=reason,
            event=event,
            state_changes=state_changes or {},
            rollout_changes=rollout_changes,
            checks=checks,
        )
        return await self.change_steps(model, actor, [step])

    async def change_steps(self, model: str, actor: str, steps: Sequence[Step]) -> StoredRelease:
        """Apply steps one after the other and store them in ONE transaction (one audit
        record each): a crash leaves the release before the first step or after the last,
        never in between. The steps after the first are planned from the state the one
        before would leave, so each is checked against the transition table in turn."""
        for step in steps:
            check_reason(step.reason)
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            before = self.current(model)
            previous = before
            entries: list[AuditEntry] = []
            transitions: list[tuple[StoredRelease, StoredRelease]] = []
            for step in steps:
                evidence = [c.to_dict() for c in step.checks] or None
                try:
                    after = self._plan(previous, step)
                except GatewayError as exc:
                    await self._record_refusal(actor, step.action, exc, before=previous, evidence=evidence)
                    raise
                entries.append(
                    self._audit(
                        step.actor or actor, step.action, step.reason, before=previous, after=after, evidence=evidence
                    )
                )
                transitions.append((previous, after))
                previous = after
            await asyncio.to_thread(self.store.commit, before.revision, previous, entries)
            self._install(previous)
            self._audited(entries)
            for step, entry in zip(steps, entries, strict=True):
                log.info(
                    "%s %s by %s -> revision %d, %s: %s",
                    step.action,
                    model,
                    one_line(actor),
                    entry.revision,
                    (entry.after or {}).get("rollout", {}).get("phase", ""),
                    one_line(step.reason, MAX_REASON_CHARS),
                )
            if self.on_applied is not None:
                for step, (step_before, step_after) in zip(steps, transitions, strict=True):
                    try:
                        self.on_applied(step.action, step.actor or actor, step_before, step_after)
                    except Exception:  # the change is stored and served: a hook's failure must not undo that
                        log.exception("%s: the applied-change hook failed", model)
            return previous

    def _plan(self, before: StoredRelease, step: Step) -> StoredRelease:
        rollout = before.rollout
        if step.event is not None:
            rollout = rollout.on(step.event, **(step.rollout_changes or {}))
        elif step.rollout_changes:
            rollout = dataclasses.replace(rollout, **step.rollout_changes)
        state = self.plane.table.propose_from(before.state, **step.state_changes)
        return StoredRelease(state, rollout)

    # -- manual operations --------------------------------------------------------------

    async def set_traffic(self, model: str, canary: str, weight_bp: int, actor: str, reason: str) -> StoredRelease:
        if not canary and weight_bp:
            # Stored, it would route that share of traffic to no version at all.
            raise InvalidInput(
                f"canary is empty but weight_bp is {weight_bp}: name the canary version, or set weight_bp 0 "
                "to send everything to stable"
            )
        changes = {"canary": canary, "canary_weight_bp": weight_bp}
        return await self.change(model, actor, "set_traffic", reason, event=Event.SET_WEIGHT, state_changes=changes)

    async def add_shadow(self, model: str, version: str, fraction: float, actor: str, reason: str) -> StoredRelease:
        shadows = dict(self.plane.table.get(model).shadows)
        shadows[version] = fraction
        return await self.change(model, actor, "add_shadow", reason, event=None, state_changes={"shadows": shadows})

    async def remove_shadow(self, model: str, version: str, actor: str, reason: str) -> StoredRelease:
        shadows = dict(self.plane.table.get(model).shadows)
        if version not in shadows:
            raise FailedPrecondition(f"{model} has no shadow {version!r}: nothing to remove")
        del shadows[version]
        return await self.change(model, actor, "remove_shadow", reason, event=None, state_changes={"shadows": shadows})

    async def add_route(
        self, model: str, route: Mapping[str, Any], position: int, actor: str, reason: str
    ) -> StoredRelease:
        """Add a routing rule given as `Rule.to_dict` writes one, at `position` (1-based; 0:
        last). Refused and audited when it is no valid rule (a bad regex, no match, an unknown
        role) or does not fit (a taken name, too many rules); a version that is not loaded is
        refused (and audited) by the state check of `change`."""
        check_reason(reason)
        current = self.current(model)
        try:
            rules = with_rule(current.state.rules, rule_from_dict(route), position)
        except GatewayError as exc:
            await self._record_refusal(actor, "add_route", exc, before=current)
            raise
        return await self.change(model, actor, "add_route", reason, event=None, state_changes={"rules": rules})

    async def remove_route(self, model: str, name: str, actor: str, reason: str) -> StoredRelease:
        rules = without_rule(self.plane.table.get(model).rules, name)
        if rules is None:
            known = ", ".join(r.name for r in self.plane.table.get(model).rules) or "none"
            raise FailedPrecondition(f"{model} has no routing rule named {name[:80]!r} (rules: {known})")
        return await self.change(model, actor, "remove_route", reason, event=None, state_changes={"rules": rules})

    async def start_rollout(self, model: str, candidate: str, actor: str, reason: str) -> StoredRelease:
        check_reason(reason)
        spec = self.plane.registry.entry(model).spec.policy
        current = self.plane.table.get(model)
        if not candidate:
            raise InvalidInput(f"candidate is empty: name the version of {model} to roll out")
        if candidate == current.stable:
            raise FailedPrecondition(f"{model}: version {candidate} is already the stable version")
        shadows = {v: f for v, f in current.shadows.items() if v != candidate}
        rollout = {
            "step": 0,
            "failed_checks": 0,
            "candidate": candidate,
            "started_at": time.time(),
            "awaiting": "",
            "approved": "",
        }
        self.current(model).rollout.on(Event.START)  # refuse (and audit) before any gate work
        gate_checks: Sequence[CheckResult] = ()
        if spec.gate:
            gate_checks = await self._gate(model, current.stable, candidate, actor, reason)
        if spec.shadow_intervals > 0:
            shadows[candidate] = 1.0
            changes: dict[str, Any] = {"canary": "", "canary_weight_bp": 0, "shadows": shadows}
            return await self.change(
                model,
                actor,
                "start_rollout",
                reason,
                event=Event.START_SHADOW,
                state_changes=changes,
                rollout_changes=rollout,
                checks=gate_checks,
            )
        # With a start gate and no shadow phase there is nothing to judge before the first
        # step: the canary is named at 0 % and waits there for a person (ReleaseOps.approve).
        held = START_GATE in spec.approval_gates
        changes = {
            "canary": candidate,
            "canary_weight_bp": 0 if held else spec.step_weights_bp[0],
            "shadows": shadows,
            # Every canary request also runs on stable (in idle time): agreement, paired latency
            # and paired accuracy.
            "canary_compare_fraction": max(current.canary_compare_fraction, 1.0 if _pairs_wanted(spec) else 0.0),
        }
        steps = [
            Step(
                action="start_rollout",
                reason=reason,
                event=Event.START,
                state_changes=changes,
                rollout_changes=rollout,
                checks=gate_checks,
            )
        ]
        if held:
            # In the same transaction: a rollout at 0 % that is not waiting would never move.
            steps.append(
                Step(
                    action=AWAIT_APPROVAL,
                    reason=f"awaiting approval {describe_gate(START_GATE)} ({spec.step_weights[0]:g}%)",
                    event=Event.AWAIT,
                    rollout_changes={"awaiting": START_GATE},
                    actor=CONTROLLER,
                )
            )
        return await self.change_steps(model, actor, steps)

    async def approve(self, model: str, actor: str, reason: str) -> StoredRelease:
        """Let a rollout waiting at an approval gate (policy.approve_before) move on.

        The approval only permits the move: the controller makes it at its next decision
        whose checks all pass, so approving never skips the evidence. At a start gate with
        no shadow phase there is no evidence yet, and the approval begins the first step.
        max_duration_s counts afresh, as after a resume: the wait was the person's."""
        check_reason(reason)
        if not reason.strip():
            raise InvalidInput("reason is empty: say why you approve (the audit log keeps it with your name)")
        current = self.current(model)
        rollout = current.rollout
        gate = rollout.awaiting if rollout.phase in ACTIVE else ""
        if not gate:
            refused = FailedPrecondition(
                f"{model} is not awaiting approval (rollout {rollout.phase}): nothing to approve; "
                "`gateway status` shows where a rollout waits"
            )
            await self._record_refusal(actor, APPROVE, refused, before=current)
            raise refused
        now = time.time()
        rollout_changes: dict[str, Any] = {"awaiting": "", "approved": gate, "timed_from": now}
        state_changes: dict[str, Any] = {}
        if gate == START_GATE and rollout.phase is Phase.PROGRESSING:
            # The first step begins now (its own evidence too: see _install).
            spec = self.plane.registry.entry(model).spec.policy
            state_changes = {"canary_weight_bp": spec.step_weights_bp[0]}
            rollout_changes["approved"] = ""
        return await self.change(
            model,
            actor,
            APPROVE,
            reason,
            event=Event.APPROVE,
            state_changes=state_changes,
            rollout_changes=rollout_changes,
        )

    async def _gate(self, model: str, stable: str, candidate: str, actor: str, reason: str) -> list[CheckResult]:
        """Run the load-test gate; a failure refuses the rollout (audited with the evidence)."""
        registry = self.plane.registry
        spec = registry.entry(model).spec.policy
        stable_v, candidate_v = registry.get(model, stable), registry.get(model, candidate)
        inputs: list[tuple[Tensors, int]] = []
        if self.captured is not None:
            requests = self.captured.newest(model)  # on the loop: see CapturedRequests.newest
            inputs = await asyncio.to_thread(captured_inputs, requests, stable_v, spec.gate_requests)
        source = "captured"
        if not inputs:
            inputs, source = generated_inputs(stable_v, spec.gate_requests), "generated"
        index = self.plane.evidence[model].output_index
        result = await run_gate(stable_v, candidate_v, inputs, policy=spec, source=source, output_index=index)
        log.info("%s: %s", model, result.summary())
        if not result.passed:
            evidence = [c.to_dict() for c in result.checks]
            message = f"{model}: {result.summary()}"
            await self._record_refusal(actor, "start_rollout", message, before=self.current(model), evidence=evidence)
            raise FailedPrecondition(message)
        return result.checks

    async def _candidate(
        self, model: str, actor: str, action: str, reason: str, nothing: str
    ) -> tuple[StoredRelease, str]:
        """The version a promote or rollback acts on: the active rollout's candidate, else
        the canary. With neither, the refusal (`{model} {nothing}`) is audited and raised."""
        check_reason(reason)
        current = self.current(model)
        active = current.rollout.phase in ACTIVE
        candidate = (current.rollout.candidate if active else "") or current.state.canary
        if not candidate:
            refused = FailedPrecondition(f"{model} {nothing}")
            await self._record_refusal(actor, action, refused, before=current)
            raise refused
        return current, candidate

    async def pause(self, model: str, actor: str, reason: str, checks: Sequence[CheckResult] = ()) -> StoredRelease:
        return await self.change(model, actor, "pause", reason, event=Event.PAUSE, checks=checks)

    async def resume(self, model: str, actor: str, reason: str) -> StoredRelease:
        # max_duration_s counts afresh: a rollout paused on timeout gets a whole period again.
        changes = {"timed_from": time.time()}
        return await self.change(model, actor, "resume", reason, event=Event.RESUME, rollout_changes=changes)

    async def promote(self, model: str, actor: str, reason: str, checks: Sequence[CheckResult] = ()) -> StoredRelease:
        current, candidate = await self._candidate(model, actor, "promote", reason, "has no canary: nothing to promote")
        # A canary set by hand, outside a rollout: promoting it is a traffic change.
        event = Event.SET_WEIGHT if current.rollout.phase in AT_REST else Event.PROMOTE
        changes = _promotion(current.state, candidate)
        return await self.change(model, actor, "promote", reason, event=event, state_changes=changes, checks=checks)

    async def finish(self, model: str, reason: str, checks: Sequence[CheckResult] = ()) -> StoredRelease:
        """The controller's last step: all traffic to the candidate, then promote it, in one
        transaction. Two commits left a crash in between stuck in `promoting` at 100 %."""
        current = self.current(model)
        candidate = current.rollout.candidate
        steps = [
            Step(
                action="advance",
                reason=reason,
                event=Event.FINISH,
                state_changes={"canary_weight_bp": BASIS_POINTS},
                checks=checks,
            ),
            Step(
                action="promote",
                reason="all steps passed",
                event=Event.PROMOTE,
                state_changes=_promotion(current.state, candidate),
                checks=checks,
            ),
        ]
        return await self.change_steps(model, "controller", steps)

    async def rollback(self, model: str, actor: str, reason: str, checks: Sequence[CheckResult] = ()) -> StoredRelease:
        # With nothing routed away from stable, a "rollback" would only bump the revision.
        nothing = "has no canary and no rollout: nothing to roll back"
        current, candidate = await self._candidate(model, actor, "rollback", reason, nothing)
        shadows = {v: f for v, f in current.state.shadows.items() if v != candidate}
        changes = {"canary": "", "canary_weight_bp": 0, "shadows": shadows}
        # Outside a rollout, a rollback of a hand-set canary is a traffic change.
        event = Event.ROLLBACK if current.rollout.phase in ACTIVE else Event.SET_WEIGHT
        return await self.change(model, actor, "rollback", reason, event=event, state_changes=changes, checks=checks)


def _pairs_wanted(spec: PolicySpec) -> bool:
    return spec.min_agreement > 0 or spec.max_latency_ratio > 0 or spec.max_accuracy_drop >= 0


def _new_step(previous: RolloutState | None, current: RolloutState) -> bool:
    """Whether `current` is a traffic step `previous` was not at (a resume is not one)."""
    if previous is None or current.phase is not Phase.PROGRESSING or previous.phase is Phase.PAUSED:
        return False
    return previous.phase is not Phase.PROGRESSING or previous.step != current.step


def _start_opened(previous: RolloutState | None, current: RolloutState) -> bool:
    """Whether `current` is the first traffic step just approved at a start gate: the
    rollout sat at 0 % until now, and the step's exposure counts from here."""
    if previous is None or current.phase is not Phase.PROGRESSING or previous.phase is not Phase.PROGRESSING:
        return False
    return previous.awaiting == START_GATE and not current.awaiting


def _promotion(state: ReleaseState, candidate: str) -> dict[str, Any]:
    """The state changes that make `candidate` the stable version (and stop mirroring to it)."""
    shadows = {v: f for v, f in state.shadows.items() if v != candidate}
    return {"stable": candidate, "canary": "", "canary_weight_bp": 0, "shadows": shadows}


def _differs(a: ReleaseState, b: ReleaseState) -> bool:
    """Whether two releases route and mirror differently (revisions aside)."""
    return (a.stable, a.canary, a.canary_weight_bp, dict(a.shadows)) != (
        b.stable,
        b.canary,
        b.canary_weight_bp,
        dict(b.shadows),
    )


def _describe(state: ReleaseState) -> str:
    parts = [f"stable {state.stable}"]
    if state.canary:
        parts.append(f"canary {state.canary} at {state.canary_weight_bp / 100:g}%")
    parts += [f"shadow {v} at {f * 100:g}%" for v, f in sorted(state.shadows.items())]
    return ", ".join(parts)
