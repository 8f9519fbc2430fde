"""OpenTelemetry tracing of inference requests: off unless an OTLP endpoint is configured.

Off, there is no `Tracing` at all: the composition root passes None, and each edge
tests that once per request, so no span, no context extraction and no attribute is
made (docs/tracing.md has the measured cost). On, each serving process has its own
TracerProvider, built here and injected; the global provider of
`opentelemetry.trace` is never set, so nothing else in the process is traced by it.

A request's span is started at the edge, with the W3C `traceparent` of its gRPC
metadata or HTTP headers as parent. Its children (validation, queue wait, model
run) are made when it ends, from times recorded on the way: the data plane's, and
the executor's in a `RunTiming`, which the batcher fills from clock reads it makes
anyway. The batcher itself never makes a span (the import contract keeps `serving`
from importing this module). A shadow copy runs after the answer, batched with
other requests' copies, so its spans start a trace of their own and are linked to
each traced request whose copy the batch carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from gateway import SERVER_NAME, __version__
from gateway.config.settings import check_otlp_endpoint
from gateway.errors import ConfigError, code_for
from gateway.types import RunTiming

if TYPE_CHECKING:
    from opentelemetry.trace import TraceState
    from opentelemetry.util.types import Attributes

log = logging.getLogger(__name__)

# Requests that arrive without a sampled `traceparent` are traced one in a hundred by
# default: a traced request costs the loop tens of microseconds (docs/tracing.md), so
# tracing every request of a saturated process would cost a good part of its
# throughput, while 1 % of a few thousand requests a second is still dozens of traces
# a second. A caller's own decision in its `traceparent` is always followed.
DEFAULT_SAMPLER = "parentbased_traceidratio"
DEFAULT_RATIO = 0.01
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
# The OTLP exporter the gateway ships: gRPC, on the grpcio it serves with already.
PROTOCOL = "grpc"
# Spans still unexported when the drain gets here wait at most this long for the collector.
SHUTDOWN_TIMEOUT_S = 5.0

Attrs = Mapping[str, AttributeValue]


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Where spans go and which are kept: from the gateway's setting and the standard OTEL_* variables."""

    endpoint: str  # the OTLP/gRPC collector, http(s)://HOST:PORT; "" when an exporter is injected
    sampler: str = DEFAULT_SAMPLER
    ratio: float = DEFAULT_RATIO  # for the *traceidratio samplers
    service_name: str = ""  # OTEL_SERVICE_NAME; "" leaves it to OTEL_RESOURCE_ATTRIBUTES, else SERVER_NAME


def tracing_config(endpoint: str, env: Mapping[str, str], injected: bool = False) -> TracingConfig | None:
    """The tracing configuration, or None when tracing is off.

    On when `endpoint` (the otlp_endpoint setting) is set, else when
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is, or when an
    exporter is `injected` (tests); OTEL_SDK_DISABLED=true turns it off whatever else
    says. Every value is checked here, naming its variable.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    origin = "otlp_endpoint"
    if not endpoint:
        for variable in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            if env.get(variable, "").strip():
                origin, endpoint = variable, env[variable].strip()
                break
    if endpoint:
        check_otlp_endpoint(origin, endpoint)
    elif not injected:
        return None
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(variable, "").strip().lower()
        if protocol and protocol != PROTOCOL:
            raise ConfigError(f"{variable}: {protocol!r} is not supported; the gateway exports OTLP over {PROTOCOL}")
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or DEFAULT_SAMPLER
    if sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    ratio = DEFAULT_RATIO
    text = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if text and sampler.endswith("traceidratio"):  # the other samplers take no argument (the spec: ignore it)
        try:
            ratio = float(text)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:  # also refuses nan
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: expected a ratio in [0, 1], got {text!r}")
    return TracingConfig(endpoint, sampler, ratio, env.get("OTEL_SERVICE_NAME", "").strip())


class _FollowLinks(Sampler):
    """Keeps a root span linked to a sampled span; asks the configured sampler about every other.

    A shadow batch's spans start a trace of their own (they end after the answer),
    so a parent-based sampler cannot see the decision made for the requests they
    link to: without this, ratio sampling would drop the shadow spans of the very
    requests it kept."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        root = not get_current_span(parent_context).get_span_context().is_valid
        if links and root and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"FollowLinks{{{self._sampler.get_description()}}}"


def _sampler(config: TracingConfig) -> Sampler:
    name = config.sampler.removeprefix("parentbased_")
    root: Sampler = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}.get(name) or TraceIdRatioBased(config.ratio)
    return _FollowLinks(ParentBased(root) if name != config.sampler else root)


def _exporter(config: TracingConfig) -> SpanExporter:
    # Imported here: the exporter loads the OTLP protobuf modules, which an off gateway never needs.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # Headers, certificates, compression and timeout come from the standard
    # OTEL_EXPORTER_OTLP_* variables, which the exporter reads itself.
    return OTLPSpanExporter(endpoint=config.endpoint)


def _resource(config: TracingConfig, worker_index: int) -> Resource:
    attributes: dict[str, AttributeValue] = {
        "service.version": __version__,
        # Each worker process exports on its own: the instance tells them apart.
        "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
    }
    if worker_index >= 0:
        attributes["gateway.worker"] = worker_index
    if config.service_name:
        attributes["service.name"] = config.service_name
    # Resource.create adds OTEL_RESOURCE_ATTRIBUTES (which may name the service too).
    resource = Resource.create(attributes)
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVER_NAME}))
    return resource


class Tracing:
    """One serving process's tracer: starts request spans, makes shadow spans, exports in batches."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("gateway", __version__)
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def build(
        cls,
        config: TracingConfig,
        worker_index: int = -1,
        exporter: SpanExporter | None = None,
        processor: SpanProcessor | None = None,
    ) -> Tracing:
        """A provider of our own (never the global one) exporting through a batch processor:
        to `exporter` when given (tests), else OTLP/gRPC to the configured endpoint.
        `processor` replaces the batch processor (tests that read spans synchronously)."""
        provider = TracerProvider(
            sampler=_sampler(config),
            resource=_resource(config, worker_index),
            # The drain shuts it down (`shutdown`): no atexit hook per gateway built.
            shutdown_on_exit=False,
            # The SDK's own metrics would go to the global meter provider: none here.
            meter_provider=NoOpMeterProvider(),
        )
        if processor is None:
            processor = BatchSpanProcessor(exporter or _exporter(config), meter_provider=NoOpMeterProvider())
        provider.add_span_processor(processor)
        return cls(provider)

    def extract(self, traceparent: str | None, tracestate: str | None = None) -> Context:
        """The remote parent a request's `traceparent` (and `tracestate`) names; an empty context
        (a new trace) when it has none or it does not parse."""
        if not traceparent:
            return Context()
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        return self._propagator.extract(carrier, Context())

    def start(self, parent: Context, name: str, attributes: Attrs) -> RequestTrace | None:
        """A request's span, begun now as `parent`'s child; None when the sampler drops it
        (the request then goes on exactly as with tracing off)."""
        now = time.time_ns()
        span = self._tracer.start_span(name, parent, SpanKind.SERVER, attributes, start_time=now)
        if not span.is_recording():
            return None
        return RequestTrace(self._tracer, span, now)

    def shadow(self, links: Sequence[SpanContext], attributes: Attrs) -> ShadowTrace:
        """The spans of one shadow batch, begun now, linked to the requests whose copies it carries."""
        span = self._tracer.start_span(
            "gateway.shadow", Context(), SpanKind.INTERNAL, attributes, links=[Link(c) for c in links]
        )
        return ShadowTrace(self._tracer, span)

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export every ended span now (tests read the exporter after this)."""
        return self._provider.force_flush(int(timeout_s * 1000))

    async def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Export what is left and stop; the drain waits at most `timeout_s` for a collector.

        The SDK's shutdown blocks until its exporter gives up (seconds, with retries,
        when the collector is down), so it runs on a daemon thread: a drain never waits
        longer than `timeout_s`, and an exit never waits for it at all."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def stop() -> None:
            try:
                self._provider.shutdown()
            except Exception:
                log.exception("tracing: shutting down the span exporter failed")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop already closed: nobody waits
                    loop.call_soon_threadsafe(_resolve, done)

        threading.Thread(target=stop, name="tracing-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            log.warning("tracing: spans not exported within %.1f s of the drain are dropped", timeout_s)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RequestTrace:
    """One traced request: its span, and the times from which its child spans are made when it ends.

    The data plane writes the validation times; the executor writes `timing`. Times
    are read on the monotonic clocks the gateway already uses and turned into the
    wall-clock nanoseconds spans want with offsets taken when the request began."""

    __slots__ = ("_mono_offset", "_perf_offset", "_tracer", "rows", "span", "timing", "validated_ns", "validating_ns")

    def __init__(self, tracer: Tracer, span: Span, start_ns: int) -> None:
        self._tracer = tracer
        self.span = span
        self._perf_offset = start_ns - time.perf_counter_ns()
        self._mono_offset = start_ns - time.monotonic_ns()
        self.validating_ns = 0  # time.perf_counter_ns(): validation began
        self.validated_ns = 0  # and ended (0: it did not end: the request was refused there)
        self.rows = 0
        self.timing = RunTiming()

    @property
    def context(self) -> SpanContext:
        return self.span.get_span_context()

    def set(self, attributes: Attrs) -> None:
        self.span.set_attributes(attributes)

    def end(self, error: BaseException | None = None) -> None:
        """Make the child spans from the recorded times and end the request's span (now)."""
        end_ns = time.time_ns()
        span, tracer = self.span, self._tracer
        parent = set_span_in_context(span, Context())
        if self.validating_ns:
            validate = tracer.start_span("gateway.validate", parent, start_time=self.validating_ns + self._perf_offset)
            if self.validated_ns:
                validate.set_attribute("gateway.rows", self.rows)
                validate.end(self.validated_ns + self._perf_offset)
            else:
                validate.set_status(Status(StatusCode.ERROR, "refused"))
                validate.end(end_ns)
        timing = self.timing
        if timing.enqueued:
            queue = tracer.start_span(
                "gateway.queue", parent, start_time=int(timing.enqueued * 1e9) + self._mono_offset
            )
            # A request that expired or was cancelled in the queue has no dequeue time.
            queue.end(int(timing.dequeued * 1e9) + self._mono_offset if timing.dequeued else end_ns)
        if timing.started_ns:
            run = tracer.start_span(
                "gateway.run",
                parent,
                attributes={
                    "gateway.batch.size": timing.rows,
                    "gateway.batch.requests": timing.requests,
                    "gateway.batch.queued": bool(timing.enqueued),
                },
                start_time=timing.started_ns + self._perf_offset,
            )
            run.end(timing.ended_ns + self._perf_offset if timing.ended_ns else end_ns)
        if error is None:
            span.set_attribute("gateway.status", "OK")
        else:
            if isinstance(error, asyncio.CancelledError):
                status, message = "CANCELLED", "the call was cancelled"
            else:
                code, message = code_for(error)  # INTERNAL: the generic message, as the caller got
                status = code.value
            span.set_attributes({"gateway.status": status, "error.type": type(error).__name__})
            span.set_status(Status(StatusCode.ERROR, message))
        span.end(end_ns)


class ShadowTrace:
    """The spans of one shadow batch as it goes: `gateway.shadow`, with a child for each step
    (unlike a request's, made as they happen: shadow work runs in the primary's idle time)."""

    __slots__ = ("_step", "_tracer", "span")

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span
        self._step: Span | None = None

    def step(self, name: str, attributes: Attrs | None = None) -> None:
        """End the step in progress, if any, and begin `name`."""
        self._end_step()
        self._step = self._tracer.start_span(name, set_span_in_context(self.span, Context()), attributes=attributes)

    def done(self) -> None:
        """The step in progress ended."""
        self._end_step()

    def _end_step(self) -> None:
        if self._step is not None:
            self._step.end()
            self._step = None

    def end(self, outcome: str) -> None:
        """End the batch's spans; `outcome` is what became of its copies (completed, failed, timed_out, ...)."""
        self._end_step()
        self.span.set_attribute("gateway.shadow.outcome", outcome)
        if outcome != "completed":
            self.span.set_status(Status(StatusCode.ERROR, outcome))
        self.span.end()
