"""ReleaseService: release state, traffic, shadows, feedback and reports."""

from __future__ import annotations

import logging
from typing import Any, TypeAlias

from gateway.errors import FailedPrecondition
from gateway.evidence import VersionReport
from gateway.protocol.pb import release_pb2 as pb
from gateway.protocol.pb import release_pb2_grpc as pb_grpc
from gateway.release import ReleaseState
from gateway.release_plane import ModelReport, ReleasePlane

log = logging.getLogger(__name__)
Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpc ships no type hints


def release_message(state: ReleaseState) -> pb.Release:
    return pb.Release(
        model=state.model,
        stable=state.stable,
        canary=state.canary,
        canary_weight_bp=state.canary_weight_bp,
        shadows=dict(state.shadows),
        canary_compare_fraction=state.canary_compare_fraction,
        revision=state.revision,
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
        shadows={v: pb.ShadowCounters(**c) for v, c in report.shadows.items()},  # type: ignore[arg-type]
    )


class ReleaseServicer(pb_grpc.ReleaseServiceServicer):
    def __init__(self, plane: ReleasePlane) -> None:
        self.plane = plane

    def _changed(self, state: ReleaseState, action: str, reason: str) -> pb.Release:
        log.info("%s %s -> revision %d (%s)", action, state.model, state.revision, reason or "no reason given")
        return release_message(state)

    async def ListReleases(self, request: pb.ListReleasesRequest, context: Context) -> pb.ListReleasesResponse:
        table = self.plane.table
        return pb.ListReleasesResponse(releases=[release_message(table.get(m)) for m in table.models()])

    async def GetRelease(self, request: pb.GetReleaseRequest, context: Context) -> pb.Release:
        return release_message(self.plane.table.get(request.model))

    async def SetTraffic(self, request: pb.SetTrafficRequest, context: Context) -> pb.Release:
        state = self.plane.table.apply(request.model, canary=request.canary, canary_weight_bp=request.weight_bp)
        return self._changed(state, "set traffic", request.reason)

    async def AddShadow(self, request: pb.AddShadowRequest, context: Context) -> pb.Release:
        shadows = dict(self.plane.table.get(request.model).shadows)
        shadows[request.version] = request.fraction
        state = self.plane.table.apply(request.model, shadows=shadows)
        return self._changed(state, f"add shadow {request.version}", request.reason)

    async def RemoveShadow(self, request: pb.RemoveShadowRequest, context: Context) -> pb.Release:
        shadows = dict(self.plane.table.get(request.model).shadows)
        if request.version not in shadows:
            raise FailedPrecondition(f"{request.model} has no shadow {request.version!r}: nothing to remove")
        del shadows[request.version]
        state = self.plane.table.apply(request.model, shadows=shadows)
        return self._changed(state, f"remove shadow {request.version}", request.reason)

    async def SubmitFeedback(self, request: pb.SubmitFeedbackRequest, context: Context) -> pb.SubmitFeedbackResponse:
        joined = unknown = 0
        for item in request.items:
            if self.plane.feedback(request.model, item.request_id, list(item.labels)):
                joined += 1
            else:
                unknown += 1
        return pb.SubmitFeedbackResponse(joined=joined, unknown=unknown)

    async def GetReport(self, request: pb.GetReportRequest, context: Context) -> pb.Report:
        return report_message(self.plane.report(request.model))
