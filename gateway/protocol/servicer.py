"""GRPCInferenceService: decode, one data-plane call, encode. Nothing else."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from gateway import SERVER_NAME, __version__
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, InvalidInput, ModelNotFound, Overloaded, PermissionDenied
from gateway.protocol import codec
from gateway.protocol.capture import CaptureWriter
from gateway.protocol.encoder import ResponseEncoder
from gateway.protocol.limits import DEFAULT_LIMITS, WireLimits
from gateway.protocol.pb import inference_pb2 as pb
from gateway.protocol.pb import inference_pb2_grpc as pb_grpc
from gateway.protocol.status import Unparseable, status_for
from gateway.serving.registry import PLATFORM, LoadedVersion, Registry
from gateway.serving.remote.link import refresh_statistics
from gateway.tracing import RequestTrace, Tracing
from gateway.types import TensorSpec

# grpc ships no type hints; this is a grpc.aio.ServicerContext.
Context: TypeAlias = Any
# Methods whose handlers return their responses already serialized (bytes).
SERIALIZED_RESPONSES = frozenset(
    f"/{pb.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/{name}"
    for name in ("ModelInfer", "ModelStreamInfer")
)
EXTENSIONS = ["model_repository", "statistics", "streaming", "release"]
_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# A traced call's span: named and described as OpenTelemetry's RPC conventions say.
INFER_SPAN = f"{_SERVICE}/ModelInfer"
STREAM_SPAN = f"{_SERVICE}/ModelStreamInfer"
_INFER_ATTRIBUTES = {"rpc.system": "grpc", "rpc.service": _SERVICE, "rpc.method": "ModelInfer"}
_STREAM_ATTRIBUTES = {"rpc.system": "grpc", "rpc.service": _SERVICE, "rpc.method": "ModelStreamInfer"}


def deadline_of(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def trace_headers(context: Context) -> tuple[str | None, str | None]:
    """The call's W3C `traceparent` and `tracestate` metadata (gRPC metadata keys are lower case)."""
    traceparent = tracestate = None
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            traceparent = value
        elif key == "tracestate":
            tracestate = value
    return traceparent, tracestate


def _tensor_metadata(specs: list[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


def _duration(d: Any) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(loaded: LoadedVersion) -> pb.ModelStatistics:
    s = loaded.stats
    return pb.ModelStatistics(
        name=loaded.name,
        version=loaded.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_infer=_duration(s.compute_infer),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
            for size, d in sorted(s.by_batch_size.items())
        ],
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        registry: Registry,
        capture: CaptureWriter | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        tracing: Tracing | None = None,
        max_inflight: int = 1 << 30,
    ) -> None:
        self.dataplane = dataplane
        self.registry = registry
        self.capture = capture
        self.limits = limits
        self.encoder = ResponseEncoder()
        self.tracing = tracing  # None: tracing off, and no call pays more than this one test
        # ModelInfer calls in flight, and their cap (--max-inflight). Counted here, not left
        # to gRPC's maximum_concurrent_rpcs: that one counts every call on the port, so at
        # the cap it refused the health checks that liveness probes send (a busy process
        # looked dead), and it also gave unary calls the places kept for streams.
        self.max_inflight = max_inflight
        self._inflight = 0

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.registry.ready() and not self.dataplane.draining)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            loaded = self.registry.get(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=loaded.ready and not self.dataplane.draining)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        entry = self.registry.entry(request.name)
        loaded = self.registry.get(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=entry.name,
            versions=entry.sorted_versions(),
            platform=PLATFORM,
            inputs=_tensor_metadata(loaded.model.inputs),
            outputs=_tensor_metadata(loaded.model.outputs),
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> bytes:
        # Answered as bytes (see gateway.protocol.encoder); registered with no response serializer.
        if self._inflight >= self.max_inflight:
            raise Overloaded(
                f"{self._inflight} inference calls in flight in this process, its limit (--max-inflight): "
                "try again later, or on another replica"
            )
        self._inflight += 1
        try:
            if self.tracing is not None:
                return await self._traced_infer(self.tracing, request, context)
            wire = codec.decode_infer(request, deadline_of(context), self.limits)
            wire.headers = context.invocation_metadata  # read only if a routing rule asks (gateway.release.rules)
            if self.capture is None:
                return self.encoder.encode(await self.dataplane.infer(wire))
            start = time.perf_counter()
            answer = await self.dataplane.infer(wire)
            response = self.encoder.encode(answer)
            # The stable version's answers are the reference a replay compares with.
            if answer.parameters.get("role") == "stable" and self.capture.wanted():
                self.capture.record(request.SerializeToString(), response, time.perf_counter() - start)
            return response
        finally:
            self._inflight -= 1

    async def _traced_infer(self, tracing: Tracing, request: pb.ModelInferRequest, context: Context) -> bytes:
        """ModelInfer with its span (the sampler may drop it: then as untraced)."""
        trace = tracing.start(tracing.extract(*trace_headers(context)), INFER_SPAN, _INFER_ATTRIBUTES)
        start = time.perf_counter()
        try:
            wire = codec.decode_infer(request, deadline_of(context), self.limits)
            wire.headers = context.invocation_metadata
            answer = await self.dataplane.infer(wire, trace)
            response = self.encoder.encode(answer)
        except BaseException as exc:
            if trace is not None:
                trace.end(exc)
            raise
        if trace is not None:
            trace.end()
        if self.capture is not None and answer.parameters.get("role") == "stable" and self.capture.wanted():
            self.capture.record(request.SerializeToString(), response, time.perf_counter() - start)
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest | Unparseable], context: Context
    ) -> AsyncIterator[bytes]:
        # Errors of one request go into its response; the stream goes on. Each message
        # is answered by a call of its own, so this generator keeps no request (up to
        # the message size, twice: parsed and decoded) while it waits, up to
        # stream_idle_s, for the next one.
        tracing = self.tracing
        # Traced: each message is a request of its own, under the stream's `traceparent`.
        parent = None if tracing is None else tracing.extract(*trace_headers(context))
        async for request in request_iterator:
            trace = None
            if tracing is not None and parent is not None:
                trace = tracing.start(parent, STREAM_SPAN, _STREAM_ATTRIBUTES)
            answer = self._stream_answer(request, context, trace)
            del request
            yield await answer

    async def _stream_answer(
        self, request: pb.ModelInferRequest | Unparseable, context: Context, trace: RequestTrace | None = None
    ) -> bytes:
        try:
            if isinstance(request, Unparseable):
                raise request.error()  # a message that did not parse (see protocol.status)
            wire = codec.decode_infer(request, deadline_of(context), self.limits)
            wire.headers = context.invocation_metadata  # the stream's metadata, for every message
            response = self.encoder.encode_stream(await self.dataplane.infer(wire, trace))
        except GatewayError as exc:
            if trace is not None:
                trace.end(exc)
            return self.encoder.stream_error(status_for(exc)[1])
        except BaseException as exc:
            if trace is not None:
                trace.end(exc)
            raise
        if trace is not None:
            trace.end()
        return response

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        if request.name:
            if request.version:
                selected = [self.registry.get(request.name, request.version)]
            else:
                entry = self.registry.entry(request.name)
                selected = [entry.versions[v] for v in entry.sorted_versions()]
        elif request.version:
            raise InvalidInput("statistics: a version needs a model name")
        else:
            selected = list(self.registry)
        await refresh_statistics(selected)  # executor mode: the executor's run counts (else nothing)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(v) for v in selected])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        models = [
            pb.RepositoryIndexResponse.ModelIndex(
                name=v.name, version=v.version, state="READY" if v.ready else "UNAVAILABLE"
            )
            for v in self.registry
            if v.ready or not request.ready
        ]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        raise _admin_refused()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        raise _admin_refused()


def _admin_refused() -> GatewayError:
    return PermissionDenied(
        "loading and unloading models are admin actions, served only by the control API on its own port"
    )
