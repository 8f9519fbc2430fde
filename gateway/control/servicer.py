"""ReleaseService: release state, traffic, shadows, feedback and reports."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict
from typing import Any, TypeAlias

from gateway.control.auth import ACTOR
from gateway.errors import InvalidInput, StoreUnavailable
from gateway.logthrottle import one_line
from gateway.protocol.pb import release_pb2 as pb
from gateway.protocol.pb import release_pb2_grpc as pb_grpc
from gateway.release import feedback
from gateway.release.assessment import ROLLOUT_METADATA_KEY, rollout_view
from gateway.release.controller import LEASE
from gateway.release.drift.monitor import FeatureScore, VersionDriftReport
from gateway.release.evidence import VersionReport
from gateway.release.feedback import FEEDBACK_WAIT_S
from gateway.release.loader import ModelLoader
from gateway.release.model_sync import ACK_WAIT_S
from gateway.release.operations import MAX_REASON_CHARS, ReleaseOps
from gateway.release.plane import ModelReport, ReleasePlane
from gateway.release.policy import ACTIVE, RolloutState
from gateway.release.rules import Rule
from gateway.release.shadow import ShadowReport
from gateway.release.state import ReleaseState
from gateway.release.store import StoredRelease

log = logging.getLogger(__name__)
Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpc ships no type hints


def route_message(rule: Rule) -> pb.Route:
    data = rule.to_dict()
    return pb.Route(
        name=data["name"], match=[pb.RouteMatch(**m) for m in data["match"]], to=data["to"], version=data["version"]
    )


def route_dict(route: pb.Route) -> dict[str, Any]:
    """A Route message as `Rule.to_dict` writes a rule (ReleaseOps.add_route validates it)."""
    return {
        "name": route.name,
        "match": [{"source": m.source, "key": m.key, "op": m.op, "values": list(m.values)} for m in route.match],
        "to": route.to,
        "version": route.version,
    }


def release_message(state: ReleaseState, rollout: RolloutState | None = None) -> pb.Release:
    return pb.Release(
        routes=[route_message(rule) for rule in state.rules],
        phase=rollout.phase if rollout else "",
        step=rollout.step if rollout else 0,
        model=state.model,
        stable=state.stable,
        canary=state.canary,
        canary_weight_bp=state.canary_weight_bp,
        shadows=dict(state.shadows),
        canary_compare_fraction=state.canary_compare_fraction,
        revision=state.revision,
        awaiting_approval=rollout.awaiting if rollout and rollout.phase in ACTIVE else "",
        rollout_started_at=rollout.started_at if rollout else 0.0,
        candidate=rollout.candidate if rollout else "",
    )


def _version_message(v: VersionReport) -> pb.VersionReport:
    return pb.VersionReport(**{name: getattr(v, name) for name in VersionReport.__slots__})


def report_message(report: ModelReport) -> pb.Report:
    return pb.Report(
        release=release_message(report.release),
        versions=[_version_message(v) for v in report.versions],
        window_s=report.window_s,
        feedback_joined=report.feedback_joined,
        feedback_unknown=report.feedback_unknown,
        predictions_logged=report.predictions_logged,
        shadows={v: _shadow_message(s) for v, s in report.shadows.items()},
        routed=[_version_message(v) for v in report.routed],
    )


def _shadow_message(s: ShadowReport) -> pb.ShadowCounters:
    return pb.ShadowCounters(
        **asdict(s.counters), pending=s.pending, circuit_open=s.circuit_open, circuit_opened=s.circuit_opened
    )


ACTOR_METADATA = "x-gateway-actor"
ANSWER_MARGIN_S = 2.0  # a wait for other workers ends this long before the caller's deadline


def _feature_message(f: FeatureScore) -> pb.FeatureDrift:
    return pb.FeatureDrift(
        name=f.name,
        psi=f.psi,
        p_value=f.p_value,
        rejected=f.rejected,
        drifting=f.drifting,
        reference=f.reference,
        live=f.live,
        edges=f.edges,
    )


def drift_message(r: VersionDriftReport) -> pb.VersionDrift:
    message = pb.VersionDrift(
        version=r.version,
        reference=r.source,
        judged=r.judged,
        rows=r.rows,
        open_rows=r.open_rows,
        windows_closed=r.windows_closed,
        score=r.score,
        over_threshold=r.over_threshold,
        alarm=r.alarm,
        requests_checked=r.requests_checked,
        nonfinite=r.nonfinite,
        rejected=r.rejected,
        out_of_range=r.out_of_range,
        max_drift=r.max_drift,
        alpha=r.alpha,
        features=[_feature_message(f) for f in r.features],
    )
    if r.prediction is not None:
        message.prediction.CopyFrom(_feature_message(r.prediction))
    return message


def actor_of(context: Context) -> str:
    """Who asks: the authenticated token's name; without tokens, what the client says, else anonymous."""
    authenticated = ACTOR.get()
    if authenticated:
        return authenticated
    for key, value in context.invocation_metadata() or ():
        if key == ACTOR_METADATA and value:
            return str(value)[:64]
    return "anonymous"


def wait_within_deadline(context: Context, longest_s: float) -> float:
    """How long a call may wait for the other workers: `longest_s`, or less, so that
    the answer (what each worker did) still reaches a caller whose deadline is nearer."""
    remaining = context.time_remaining()
    if remaining is None:
        return longest_s
    return max(0.0, min(longest_s, float(remaining) - ANSWER_MARGIN_S))


# Replicas count as merging their evidence if they published within this (they do twice a second).
MERGED_WITHIN_S = 10.0


class ReleaseServicer(pb_grpc.ReleaseServiceServicer):
    def __init__(self, plane: ReleasePlane, ops: ReleaseOps, loader: ModelLoader, member: str | None = None) -> None:
        """`member`: this process's name among those sharing evidence and labels through the
        store (gateway.release.sync.member_name); None: nobody to share with."""
        self.plane = plane
        self.ops = ops
        self.loader = loader
        self.member = member

    async def _deployment(self) -> pb.Deployment:
        """The store, the leading controller, and the replicas whose evidence is merged."""
        store = self.ops.store

        def read() -> tuple[str | None, set[str]]:
            return store.lease_holder(LEASE), store.live_workers(MERGED_WITHIN_S)

        try:
            leader, live = await asyncio.to_thread(read)
        except StoreUnavailable:
            return pb.Deployment(store=store.backend, store_reachable=False)
        if self.member is not None:
            live.add(self.member)
        processes = len(live) or 1  # a single process on SQLite publishes nothing: itself
        replicas = len({name.rpartition("/")[0] for name in live}) or 1
        return pb.Deployment(
            store=store.backend, leader=leader or "", replicas=replicas, processes=processes, store_reachable=True
        )

    async def LoadModel(self, request: pb.ModelRequest, context: Context) -> pb.ModelStatus:
        entry, call = await self.loader.load_everywhere(request.model, wait_within_deadline(context, ACK_WAIT_S))
        log.info("load %s by %s (%s)", request.model, actor_of(context), _logged_reason(request.reason))
        return pb.ModelStatus(
            model=entry.name,
            versions=entry.sorted_versions(),
            workers_applied=len(call.applied),
            workers=call.total,
            notes=call.notes(),
        )

    async def UnloadModel(self, request: pb.ModelRequest, context: Context) -> pb.ModelStatus:
        call = await self.loader.unload_everywhere(request.model, wait_within_deadline(context, ACK_WAIT_S))
        log.info("unload %s by %s (%s)", request.model, actor_of(context), _logged_reason(request.reason))
        return pb.ModelStatus(
            model=request.model, workers_applied=len(call.applied), workers=call.total, notes=call.notes()
        )

    def _release(self, stored: StoredRelease) -> pb.Release:
        return release_message(stored.state, stored.rollout)

    async def ListReleases(self, request: pb.ListReleasesRequest, context: Context) -> pb.ListReleasesResponse:
        return pb.ListReleasesResponse(
            releases=[self._release(self.ops.current(m)) for m in self.plane.table.models()],
            deployment=await self._deployment(),
        )

    async def GetRelease(self, request: pb.GetReleaseRequest, context: Context) -> pb.Release:
        current = self.ops.current(request.model)
        self._send_rollout_view(request.model, current.rollout, context)
        return self._release(current)

    def _send_rollout_view(self, model: str, rollout: RolloutState, context: Context) -> None:
        """During a rollout, what the policy makes of it now, as trailing metadata (see
        gateway.release.assessment.rollout_view): the Release message has no field for it."""
        if rollout.phase not in ACTIVE:
            return
        view = rollout_view(self.plane, self.ops.store, model, rollout, time.time())
        context.set_trailing_metadata(((ROLLOUT_METADATA_KEY, json.dumps(view).encode()),))

    async def SetTraffic(self, request: pb.SetTrafficRequest, context: Context) -> pb.Release:
        return self._release(
            await self.ops.set_traffic(
                request.model, request.canary, request.weight_bp, actor_of(context), request.reason
            )
        )

    async def AddShadow(self, request: pb.AddShadowRequest, context: Context) -> pb.Release:
        return self._release(
            await self.ops.add_shadow(
                request.model, request.version, request.fraction, actor_of(context), request.reason
            )
        )

    async def RemoveShadow(self, request: pb.RemoveShadowRequest, context: Context) -> pb.Release:
        return self._release(
            await self.ops.remove_shadow(request.model, request.version, actor_of(context), request.reason)
        )

    async def AddRoute(self, request: pb.AddRouteRequest, context: Context) -> pb.Release:
        return self._release(
            await self.ops.add_route(
                request.model, route_dict(request.route), request.position, actor_of(context), request.reason
            )
        )

    async def ListRoutes(self, request: pb.ListRoutesRequest, context: Context) -> pb.ListRoutesResponse:
        state = self.plane.table.get(request.model)
        return pb.ListRoutesResponse(
            model=state.model, routes=[route_message(rule) for rule in state.rules], revision=state.revision
        )

    async def RemoveRoute(self, request: pb.RemoveRouteRequest, context: Context) -> pb.Release:
        return self._release(
            await self.ops.remove_route(request.model, request.name, actor_of(context), request.reason)
        )

    async def StartRollout(self, request: pb.StartRolloutRequest, context: Context) -> pb.Release:
        return self._release(
            await self.ops.start_rollout(request.model, request.candidate, actor_of(context), request.reason)
        )

    async def Pause(self, request: pb.ModelActionRequest, context: Context) -> pb.Release:
        return self._release(await self.ops.pause(request.model, actor_of(context), request.reason))

    async def Resume(self, request: pb.ModelActionRequest, context: Context) -> pb.Release:
        return self._release(await self.ops.resume(request.model, actor_of(context), request.reason))

    async def Promote(self, request: pb.ModelActionRequest, context: Context) -> pb.Release:
        return self._release(await self.ops.promote(request.model, actor_of(context), request.reason))

    async def Rollback(self, request: pb.ModelActionRequest, context: Context) -> pb.Release:
        return self._release(await self.ops.rollback(request.model, actor_of(context), request.reason))

    async def Approve(self, request: pb.ModelActionRequest, context: Context) -> pb.Release:
        return self._release(await self.ops.approve(request.model, actor_of(context), request.reason))

    async def SubmitFeedback(self, request: pb.SubmitFeedbackRequest, context: Context) -> pb.SubmitFeedbackResponse:
        feedback.check_count(len(request.items))  # before copying any item out of the message
        items = [(item.request_id, list(item.labels)) for item in request.items]
        # Other workers may hold these predictions: they join them and say so through the store.
        sharing = None if self.member is None else feedback.Sharing(self.ops.store, self.member)
        wait_s = wait_within_deadline(context, FEEDBACK_WAIT_S)
        tally = await feedback.submit(self.plane, sharing, request.model, items, wait_s)
        return pb.SubmitFeedbackResponse(
            joined=tally.joined,
            unknown=tally.unknown,
            already_labelled=tally.already_labelled,
            rejected=tally.rejected,
            pending=tally.pending,
            errors=tally.errors,
        )

    async def GetReport(self, request: pb.GetReportRequest, context: Context) -> pb.Report:
        report = report_message(self.plane.report(request.model))
        current = self.ops.current(request.model)
        rollout = current.rollout
        report.release.CopyFrom(self._release(current))
        report.deployment.CopyFrom(await self._deployment())
        self._send_rollout_view(request.model, rollout, context)
        return report

    async def GetDrift(self, request: pb.GetDriftRequest, context: Context) -> pb.DriftReport:
        reports = self.plane.drift(request.model)
        if request.version:
            self.plane.registry.get(request.model, request.version)  # NOT_FOUND for an unknown version
            reports = [r for r in reports if r.version == request.version]
        return pb.DriftReport(model=request.model, versions=[drift_message(r) for r in reports])

    async def GetAuditLog(self, request: pb.GetAuditLogRequest, context: Context) -> pb.AuditLog:
        limit = request.limit or 100
        if not 0 < limit <= 1000:
            raise InvalidInput(f"limit must be 1..1000, got {request.limit}")
        if request.model:
            self.plane.table.get(request.model)  # NOT_FOUND for an unknown model
        entries = await asyncio.to_thread(
            self.ops.store.audit_log, request.model, request.since, request.until, limit + 1, request.offset
        )
        more = len(entries) > limit
        records = [
            pb.AuditRecord(
                id=e.id,
                at=e.at,
                actor=e.actor,
                action=e.action,
                model=e.model,
                outcome=e.outcome,
                before_json=_json(e.before),
                after_json=_json(e.after),
                reason=e.reason,
                evidence_json=_json(e.evidence),
                revision=e.revision or 0,
            )
            for e in entries[:limit]
        ]
        return pb.AuditLog(records=records, next_offset=request.offset + limit if more else 0)


def _logged_reason(reason: str) -> str:
    """A load/unload's reason as logged (it is not stored): capped, control characters escaped."""
    return one_line(reason, MAX_REASON_CHARS) or "no reason given"


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True)
