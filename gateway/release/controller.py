"""The promotion controller: every analysis interval, ask the policy and apply its decision.

Exactly one controller acts at a time, across every process and replica sharing
the store: it holds a lease there, renewed each tick; another takes over only once
the lease has expired (LEASE_TTL_S: within two ticks of a policy's interval), and
takes the next epoch. Each decision commits fenced by the epoch it was made under
(store.FENCE), so a controller that lost its lease mid-decision (a long pause, a
partition) cannot commit it after the new holder has started deciding.
After a restart it resumes from the stored phase and step, on evidence
gathered since the restart (ReleaseOps begins it afresh); a promotion found
half done is completed (or rolled back when it cannot be).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

from gateway.errors import GatewayError, StoreUnavailable
from gateway.release.assessment import rollout_evidence
from gateway.release.confidence import Verdict
from gateway.release.operations import AWAIT_APPROVAL, MAX_REASON_CHARS, ReleaseOps
from gateway.release.policy import DECIDING, Decision, Event, Phase, RolloutState, decide
from gateway.release.store import FENCE, Fence

log = logging.getLogger(__name__)

TICK_S = 0.5
LEASE = "controller"
# A leader renews every tick; a dead one's lease runs out after this, and another takes it
# on its next tick: a failover in about 3.5 s, inside two analysis intervals of 2 s or more.
LEASE_TTL_S = 4 * TICK_S + 1.0

# Told of every decision (the model, its rollout as decided on, the decision) before it is
# applied, whether or not it changes anything: how the metrics show each check's state
# between changes, without the controller knowing Prometheus.
DecisionHook = Callable[[str, RolloutState, Decision], None]


class Controller:
    def __init__(
        self,
        ops: ReleaseOps,
        clock: Callable[[], float] = time.time,
        on_decision: DecisionHook | None = None,
        holder: str = "",
    ) -> None:
        self.ops = ops
        self.clock = clock
        self.on_decision = on_decision
        # Unique per process: a new process is a new holder (and so a new fencing epoch).
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self._last: dict[str, float] = {}
        self.leading = False

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except StoreUnavailable:
                pass  # the store logged it (once in a while, not each tick); retried next tick
            except Exception:  # the loop must outlive any one bad decision
                log.exception("controller tick failed")
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        epoch = await asyncio.to_thread(self.ops.store.try_lease, LEASE, self.holder, LEASE_TTL_S)
        self.leading = epoch is not None
        if epoch is None:
            FENCE.set(None)
            return
        # Set in this task's context: the commits of its decisions (asyncio.to_thread copies
        # the context into their threads) are checked against this epoch in their transaction.
        FENCE.set(Fence(LEASE, self.holder, epoch))
        now = self.clock()
        for model in self.ops.plane.table.models():
            rollout = self.ops.rollouts.get(model)
            if rollout is not None and rollout.phase is Phase.PROMOTING:
                await self.complete_promotion(model)
                continue
            if rollout is None or rollout.phase not in DECIDING:
                self._last.pop(model, None)
                self.ops.plane.external.forget(model)
                continue
            spec = self.ops.plane.registry.entry(model).spec.policy
            last = self._last.setdefault(model, now)
            if now - last < spec.interval_s:
                continue
            self._last[model] = now
            await self.decide(model)

    async def decide(self, model: str) -> None:
        """One analysis of one model's rollout, applied through ReleaseOps (and so audited)."""
        ops = self.ops
        rollout = ops.rollouts[model]
        spec = ops.plane.registry.entry(model).spec.policy
        now = self.clock()
        if spec.checks and rollout.phase is Phase.PROGRESSING:
            # Read in the background: this decision uses the readings already in, the
            # next one this poll's (gateway/release/external_poll.py).
            ops.plane.external.poll(model, spec.checks)
        decision = decide(rollout, rollout_evidence(ops.plane, model, rollout, now), spec, now)
        if self.on_decision is not None:
            try:
                self.on_decision(model, rollout, decision)
            except Exception:  # showing a decision must never stop it being applied
                log.exception("%s: the decision hook failed", model)
        # The audit keeps every figure in the checks; the reason is their summary, cut to fit.
        reason = decision.reason
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        try:
            if decision.event is Event.ROLLBACK:
                await ops.rollback(model, "controller", reason, decision.checks)
            elif decision.event is Event.PAUSE:
                # max_duration_s ran out with nothing failed (on_timeout = pause): a person decides.
                await ops.pause(model, "controller", reason, decision.checks)
            elif decision.event is Event.PROMOTE:
                await ops.promote(model, "controller", reason, decision.checks)
            elif decision.event is Event.FINISH:
                await ops.finish(model, reason, decision.checks)
            elif decision.event is Event.AWAIT:
                if rollout.awaiting == decision.gate:
                    log.info("%s: awaiting approval (%s)", model, reason)
                else:
                    # Audited once per gate: when the rollout begins to wait there.
                    await ops.change(
                        model,
                        "controller",
                        AWAIT_APPROVAL,
                        reason,
                        event=Event.AWAIT,
                        rollout_changes={"awaiting": decision.gate},
                        checks=decision.checks,
                    )
            elif decision.event is Event.ADVANCE:
                changes: dict[str, object] = {"canary_weight_bp": decision.weight_bp or 0}
                step = rollout.step + 1
                if rollout.phase is Phase.SHADOWING:
                    current = ops.plane.table.get(model)
                    shadows = {v: f for v, f in current.shadows.items() if v != rollout.candidate}
                    changes = {
                        "canary": rollout.candidate,
                        "canary_weight_bp": decision.weight_bp or 0,
                        "shadows": shadows,
                        "canary_compare_fraction": current.canary_compare_fraction,
                    }
                    step = 0
                await ops.change(
                    model,
                    "controller",
                    "advance",
                    reason,
                    event=Event.ADVANCE,
                    state_changes=changes,
                    rollout_changes={"step": step, "failed_checks": 0},
                    checks=decision.checks,
                )
            else:
                failed = any(c.verdict is Verdict.FAIL for c in decision.checks)
                if failed:
                    await ops.change(
                        model,
                        "controller",
                        "failed_check",
                        reason,
                        event=Event.HOLD,
                        rollout_changes={"failed_checks": rollout.failed_checks + 1},
                        checks=decision.checks,
                    )
                else:
                    log.info("%s: hold (%s)", model, reason)
        except StoreUnavailable:
            raise
        except GatewayError as exc:
            log.warning("%s: controller decision %s not applied: %s", model, decision.event, exc)

    async def complete_promotion(self, model: str) -> None:
        """Finish a promotion found half done (a store written by an older gateway, which
        committed the last step in two transactions, and crashed in between): promote the
        candidate; if it cannot be promoted (say its version is gone), roll back instead.

        Every other phase is one the controller can be in at rest: shadowing and
        progressing go on deciding, paused waits for the operator, and idle, succeeded
        and rolled_back have nothing to do."""
        ops = self.ops
        try:
            await ops.promote(model, "controller", "completing a promotion interrupted by a restart")
            return
        except StoreUnavailable:
            raise  # not the promotion's fault: try again next tick
        except GatewayError as exc:
            log.warning("%s: cannot complete the interrupted promotion (%s): rolling back", model, exc)
        try:
            await ops.rollback(model, "controller", "an interrupted promotion could not be completed")
        except StoreUnavailable:
            raise
        except GatewayError as exc:
            log.warning("%s: cannot roll back the interrupted promotion either: %s", model, exc)
