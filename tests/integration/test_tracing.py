"""OpenTelemetry tracing, end to end: a real gateway, real gRPC and HTTP clients, the SDK's own exporters.

One gateway serves digits with a 50 % canary (v2) and a shadow (v3), its spans going
to the SDK's InMemorySpanExporter through the same batch processor OTLP would use.
Each request carries a W3C `traceparent`, and its spans are looked up by that trace.
With tracing off, no span object is made at all (counted on the SDK's own classes).
Last, `gateway serve --workers 2 --otlp-endpoint` exports to an OTLP/gRPC collector
run by the test, through the real exporter, and flushes its spans on the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.protocol.servicer import INFER_SPAN, STREAM_SPAN
from gateway.release.routing import route_point
from gateway.server import gateway as server_module
from tests.integration.rest_support import infer_body, tensor
from tests.support import MODELS, Running, gateway_in_thread, gateway_process

RELEASE = """
[release]
stable = "1"
canary = "2"
canary_weight_bp = 5000
shadows = { "3" = 1.0 }
"""
KEYS = [f"user-{i}" for i in range(40)]
STABLE_KEY = next(k for k in KEYS if route_point(k) * 10_000 >= 5000)
CANARY_KEY = next(k for k in KEYS if route_point(k) * 10_000 < 5000)
OTEL_VARIABLES = [v for v in os.environ if v.startswith("OTEL_")]


def rows(n: int = 1) -> np.ndarray:
    return np.load(MODELS / "digits" / "heldout.npz")["X"][:n]


def new_ids() -> tuple[int, int]:
    return int.from_bytes(secrets.token_bytes(16), "big"), int.from_bytes(secrets.token_bytes(8), "big")


def traceparent(trace_id: int, parent_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{parent_id:016x}-{'01' if sampled else '00'}"


def digits_repo(root: Path) -> None:
    """digits with RELEASE, its versions run on a thread, not inline on the loop: requests
    arriving while a batch runs queue and batch together, as under any real load. (Inline,
    a burst the loop keeps up with is answered a request at a time, so whether any request
    batched was a matter of timing.)"""
    shutil.copytree(MODELS / "digits", root / "digits")
    spec = root / "digits" / "model.toml"
    head = spec.read_text().split("[release]")[0]
    assert "default_timeout_us = 0\n" in head
    head = head.replace("default_timeout_us = 0\n", 'default_timeout_us = 0\nexecution = "thread"\n', 1)
    spec.write_text(head + RELEASE)


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, exporter: InMemorySpanExporter) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("tracing")
    digits_repo(root)
    patch = pytest.MonkeyPatch()
    for variable in OTEL_VARIABLES:
        patch.delenv(variable)
    # tests.support builds Gateway(settings): the real Gateway, told where its spans go (only
    # while this one starts: the tracing-off test starts another).
    patch.setattr("tests.support.Gateway", lambda settings: server_module.Gateway(settings, exporter))
    with contextlib.ExitStack() as stack:
        try:
            running = stack.enter_context(gateway_in_thread(root, controller=False))
        finally:
            patch.undo()
        assert running.gateway.tracing is not None
        yield running


def spans_of(server: Running, exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    assert server.gateway.tracing is not None
    assert server.gateway.tracing.force_flush()
    return [s for s in exporter.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    assert parent.context is not None
    found = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}
    for child in found.values():  # inside its parent, in time
        assert parent.start_time is not None and parent.end_time is not None
        assert child.start_time is not None and child.end_time is not None
        assert parent.start_time <= child.start_time <= child.end_time <= parent.end_time, child.name
    return found


def grpc_infer(server: Running, header: str | None, key: str = STABLE_KEY, n: int = 1, **kw: Any) -> Any:
    client = tc.InferenceServerClient(server.address)
    pixels = tc.InferInput("pixels", [n, 64], "FP32")
    pixels.set_data_from_numpy(rows(n))
    headers = {"traceparent": header} if header else None
    return client.infer("digits", [pixels], parameters={"routing_key": key}, headers=headers, **kw)


def idle(server: Running) -> None:
    """Wait for the shadow copies in flight to be run and compared."""
    assert server.gateway.releases is not None
    server.call(server.gateway.releases.idle())


def check_request_span(span: ReadableSpan, trace_id: int, parent_id: int) -> None:
    assert span.kind is SpanKind.SERVER
    assert span.context is not None and span.context.trace_id == trace_id
    assert span.parent is not None and span.parent.span_id == parent_id and span.parent.is_remote


def test_a_grpc_request_with_a_traceparent_gets_its_spans_under_that_trace(
    server: Running, exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = new_ids()
    result = grpc_infer(server, traceparent(trace_id, parent_id), n=3)
    assert result.get_response().model_version == "1"
    spans = spans_of(server, exporter, trace_id)
    request = one(spans, INFER_SPAN)
    check_request_span(request, trace_id, parent_id)
    attributes = attrs(request)
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.method"] == "ModelInfer"
    assert attributes["gateway.model"] == "digits"
    assert attributes["gateway.version"] == "1"
    assert attributes["gateway.role"] == "stable"
    assert attributes["gateway.routing"] == "weighted_split"
    assert attributes["gateway.routing.key"] == "routing_key"
    assert attributes["gateway.canary.weight_bp"] == 5000
    assert attributes["gateway.status"] == "OK"
    assert request.status.status_code is StatusCode.UNSET
    steps = children(spans, request)
    assert {"gateway.validate", "gateway.run"} <= set(steps), steps
    assert steps["gateway.validate"].attributes == {"gateway.rows": 3}
    run = attrs(steps["gateway.run"])
    assert run["gateway.batch.size"] >= 3 and run["gateway.batch.requests"] >= 1
    validate_end, run_start = steps["gateway.validate"].end_time, steps["gateway.run"].start_time
    assert validate_end is not None and run_start is not None and validate_end <= run_start


def test_the_canary_side_of_the_split_says_so(server: Running, exporter: InMemorySpanExporter) -> None:
    trace_id, parent_id = new_ids()
    assert grpc_infer(server, traceparent(trace_id, parent_id), key=CANARY_KEY).get_response().model_version == "2"
    attributes = attrs(one(spans_of(server, exporter, trace_id), INFER_SPAN))
    assert (attributes["gateway.version"], attributes["gateway.role"]) == ("2", "canary")


def test_requests_that_waited_in_the_queue_get_a_queue_span_and_their_batch_size(
    server: Running, exporter: InMemorySpanExporter
) -> None:
    ids = [new_ids() for _ in range(96)]

    async def burst() -> None:
        # All 96 in flight at once on one channel: they reach the batcher together. (32 threads
        # each opening a channel a request spread them out: batches of one, half the runs.)
        client = tc_aio.InferenceServerClient(server.address)
        pixels = tc.InferInput("pixels", [1, 64], "FP32")
        pixels.set_data_from_numpy(rows())

        async def one(pair: tuple[int, int]) -> None:
            headers = {"traceparent": traceparent(*pair)}
            await client.infer("digits", [pixels], parameters={"routing_key": STABLE_KEY}, headers=headers)

        try:
            await asyncio.gather(*(one(pair) for pair in ids))
        finally:
            await client.close()

    asyncio.run(burst())
    queued = batched = 0
    for trace_id, parent_id in ids:
        spans = spans_of(server, exporter, trace_id)
        request = one(spans, INFER_SPAN)
        check_request_span(request, trace_id, parent_id)
        steps = children(spans, request)
        run = attrs(steps["gateway.run"])
        assert run["gateway.batch.queued"] == ("gateway.queue" in steps)
        if "gateway.queue" in steps:
            queued += 1
            waited_until, ran_from = steps["gateway.queue"].end_time, steps["gateway.run"].start_time
            assert waited_until is not None and ran_from is not None and waited_until <= ran_from
        batched += run["gateway.batch.size"] > 1
        assert run["gateway.batch.size"] >= run["gateway.batch.requests"] >= 1
    # 96 at once: the batcher queued requests and ran several in one batch.
    assert queued > 0 and batched > 0, (queued, batched)


def test_a_rest_request_with_a_traceparent_header_pinned_to_a_version(
    server: Running, exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = new_ids()
    reply = httpx.post(
        f"http://{server.http}/v2/models/digits/versions/2/infer",
        json=infer_body(tensor("pixels", rows(2))),
        headers={"traceparent": traceparent(trace_id, parent_id), "tracestate": "vendor=abc"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    spans = spans_of(server, exporter, trace_id)
    request = one(spans, "POST /v2/models/{name}/versions/{version}/infer")
    check_request_span(request, trace_id, parent_id)
    assert request.context is not None and request.context.trace_state.get("vendor") == "abc"
    attributes = attrs(request)
    assert attributes["http.route"] == "/v2/models/{name}/versions/{version}/infer"
    assert attributes["http.response.status_code"] == 200
    assert (attributes["gateway.version"], attributes["gateway.role"]) == ("2", "pinned")
    assert attributes["gateway.routing"] == "pinned"
    steps = children(spans, request)
    assert steps["gateway.validate"].attributes == {"gateway.rows": 2}
    assert attrs(steps["gateway.run"])["gateway.batch.size"] >= 2


def test_a_refused_rest_request_says_its_http_status_on_its_span(
    server: Running, exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = new_ids()
    reply = httpx.post(
        f"http://{server.http}/v2/models/digits/infer",
        json=infer_body(tensor("pixels", rows(2)[:, :10])),  # 10 features where the model takes 64
        headers={"traceparent": traceparent(trace_id, parent_id)},
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    request = one(spans_of(server, exporter, trace_id), "POST /v2/models/{name}/infer")
    assert attrs(request)["http.response.status_code"] == 400
    assert request.status.status_code is StatusCode.ERROR


def test_a_shadowed_request_gets_shadow_spans_linked_to_it(server: Running, exporter: InMemorySpanExporter) -> None:
    trace_id, parent_id = new_ids()
    grpc_infer(server, traceparent(trace_id, parent_id), key=STABLE_KEY, n=2)
    request = one(spans_of(server, exporter, trace_id), INFER_SPAN)
    idle(server)
    assert request.context is not None and server.gateway.tracing is not None
    server.gateway.tracing.force_flush()
    linked = [
        s
        for s in exporter.get_finished_spans()
        if s.name == "gateway.shadow" and any(link.context == request.context for link in s.links)
    ]
    assert len(linked) == 1, [s.name for s in exporter.get_finished_spans()]
    shadow = linked[0]
    # A trace of its own (it ends after the answer), linked rather than a child.
    assert shadow.parent is None and shadow.context is not None and shadow.context.trace_id != trace_id
    attributes = attrs(shadow)
    assert (attributes["gateway.model"], attributes["gateway.version"]) == ("digits", "3")
    assert attributes["gateway.shadow.outcome"] == "completed" and attributes["gateway.rows"] >= 2
    steps = children(exporter.get_finished_spans(), shadow)
    assert set(steps) == {"gateway.shadow.run", "gateway.shadow.compare"}
    assert attrs(steps["gateway.shadow.run"])["gateway.batch.size"] >= 2
    run_end, compare_start = steps["gateway.shadow.run"].end_time, steps["gateway.shadow.compare"].start_time
    assert run_end is not None and compare_start is not None and run_end <= compare_start


def test_a_refused_request_ends_its_span_with_the_error(server: Running, exporter: InMemorySpanExporter) -> None:
    trace_id, parent_id = new_ids()
    client = tc.InferenceServerClient(server.address)
    wrong = tc.InferInput("not_pixels", [1, 64], "FP32")
    wrong.set_data_from_numpy(rows())
    with pytest.raises(tc.InferenceServerException):
        client.infer("digits", [wrong], headers={"traceparent": traceparent(trace_id, parent_id)})
    spans = spans_of(server, exporter, trace_id)
    request = one(spans, INFER_SPAN)
    assert request.status.status_code is StatusCode.ERROR
    assert attrs(request)["gateway.status"] == "INVALID_ARGUMENT"
    steps = children(spans, request)
    assert steps["gateway.validate"].status.status_code is StatusCode.ERROR
    assert "gateway.run" not in steps


def test_each_message_of_a_stream_is_a_request_under_the_streams_traceparent(
    server: Running, exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = new_ids()
    answers: queue.Queue[Any] = queue.Queue()
    client = tc.InferenceServerClient(server.address)
    client.start_stream(
        lambda result, error: answers.put(error or result), headers={"traceparent": traceparent(trace_id, parent_id)}
    )
    try:
        for n in (1, 2):
            pixels = tc.InferInput("pixels", [n, 64], "FP32")
            pixels.set_data_from_numpy(rows(n))
            client.async_stream_infer("digits", [pixels])
        for _ in range(2):
            assert not isinstance(answers.get(timeout=30), Exception)
    finally:
        client.stop_stream()
    requests = [s for s in spans_of(server, exporter, trace_id) if s.name == STREAM_SPAN]
    assert len(requests) == 2
    for request in requests:
        check_request_span(request, trace_id, parent_id)
        attributes = attrs(request)
        assert attributes["gateway.model"] == "digits" and attributes["gateway.role"] in ("stable", "canary")
        assert attributes["rpc.method"] == "ModelStreamInfer"


def test_a_traceparent_that_says_not_sampled_is_followed(server: Running, exporter: InMemorySpanExporter) -> None:
    trace_id, parent_id = new_ids()
    grpc_infer(server, traceparent(trace_id, parent_id, sampled=False))
    idle(server)
    assert spans_of(server, exporter, trace_id) == []


# ---------------------------------------------------------------- tracing off


class SpanCount:
    """Every span object the OpenTelemetry API or SDK makes, anywhere in this process, and
    every W3C context extraction: counted on their classes, so nothing of ours is patched."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.spans = 0
        self.extractions = 0
        for cls in _subclasses(Span):
            if "__init__" in vars(cls):
                patch.setattr(cls, "__init__", self._counting(vars(cls)["__init__"]))
        extract = TraceContextTextMapPropagator.extract

        def counting_extract(propagator: Any, *args: Any, **kwargs: Any) -> Any:
            self.extractions += 1
            return extract(propagator, *args, **kwargs)

        patch.setattr(TraceContextTextMapPropagator, "extract", counting_extract)

    def _counting(self, init: Any) -> Any:
        def counting_init(span: Any, *args: Any, **kwargs: Any) -> None:
            self.spans += 1
            init(span, *args, **kwargs)

        return counting_init


def _subclasses(cls: type) -> set[type]:
    found: set[type] = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def traffic(server: Running) -> None:
    """Traced-looking calls on every path: gRPC unary and stream, REST, and a shadowed one."""
    trace_id, parent_id = new_ids()
    header = traceparent(trace_id, parent_id)
    for key in (STABLE_KEY, CANARY_KEY):
        grpc_infer(server, header, key=key)
    reply = httpx.post(
        f"http://{server.http}/v2/models/digits/infer",
        json=infer_body(tensor("pixels", rows())),
        headers={"traceparent": header},
        timeout=30,
    )
    assert reply.status_code == 200
    answers: queue.Queue[Any] = queue.Queue()
    client = tc.InferenceServerClient(server.address)
    client.start_stream(lambda result, error: answers.put(error or result), headers={"traceparent": header})
    try:
        pixels = tc.InferInput("pixels", [1, 64], "FP32")
        pixels.set_data_from_numpy(rows())
        client.async_stream_infer("digits", [pixels])
        assert not isinstance(answers.get(timeout=30), Exception)
    finally:
        client.stop_stream()
    idle(server)  # the shadow copies ran too


def test_with_tracing_off_no_span_is_made_and_no_context_extracted(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, server: Running
) -> None:
    for variable in OTEL_VARIABLES:
        monkeypatch.delenv(variable)
    root = tmp_path_factory.mktemp("tracing-off")
    digits_repo(root)
    with gateway_in_thread(root, controller=False) as off:
        assert off.gateway.tracing is None
        count = SpanCount(monkeypatch)
        traffic(off)
        assert (count.spans, count.extractions) == (0, 0)
        # The same traffic to the traced gateway: the count does see spans when they are made.
        traffic(server)
        assert count.spans > 0 and count.extractions > 0


# ---------------------------------------------------------------- OTLP, from worker processes


class Collector(otlp_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector: keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: queue.Queue[otlp.ExportTraceServiceRequest] = queue.Queue()

    def Export(self, request: otlp.ExportTraceServiceRequest, context: Any) -> otlp.ExportTraceServiceResponse:
        self.requests.put(request)
        return otlp.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Every span received so far, with its resource's attributes."""
        found = []
        while not self.requests.empty():
            for resource_spans in self.requests.get().resource_spans:
                resource = {a.key: a.value for a in resource_spans.resource.attributes}
                found += [(resource, s) for scope in resource_spans.scope_spans for s in scope.spans]
        return found


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    collector = Collector()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
    otlp_grpc.add_TraceServiceServicer_to_server(collector, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield collector, port
    grpc_server.stop(0)


def test_worker_processes_export_over_otlp_and_flush_on_the_drain(collector: tuple[Collector, int]) -> None:
    received, port = collector
    env = {v: "" for v in OTEL_VARIABLES} | {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    sent: dict[int, int] = {}
    with gateway_process(
        "--models",
        str(MODELS),
        "--load",
        "digits",
        "--workers",
        "2",
        "--otlp-endpoint",
        f"http://127.0.0.1:{port}",
        env=env,
    ) as gateway:
        for _ in range(16):  # a channel each: the kernel spreads the connections over both workers
            trace_id, parent_id = new_ids()
            client = tc.InferenceServerClient(gateway.address)
            pixels = tc.InferInput("pixels", [1, 64], "FP32")
            pixels.set_data_from_numpy(rows())
            client.infer("digits", [pixels], headers={"traceparent": traceparent(trace_id, parent_id)})
            client.close()
            sent[trace_id] = parent_id
        assert gateway.stop(signal.SIGTERM) == 0
    # The batch processor exports every 5 s; what it still held went out on the drain.
    spans = received.spans()
    requests = {int.from_bytes(s.trace_id, "big"): (r, s) for r, s in spans if s.name == INFER_SPAN}
    assert set(requests) == set(sent), f"{len(requests)} of {len(sent)} requests' spans arrived"
    for trace_id, (resource, span) in requests.items():
        assert int.from_bytes(span.parent_span_id, "big") == sent[trace_id]
        assert resource["service.name"].string_value == "release-gateway"
        assert resource["gateway.worker"].int_value in (0, 1)
    # Each worker has a provider of its own (both served: 16 connections all on one is 2 in 65,536).
    instances = {r["service.instance.id"].string_value: r["gateway.worker"].int_value for r, _ in requests.values()}
    assert sorted(instances.values()) == [0, 1], instances
    names = {s.name for _, s in spans}
    assert {"gateway.validate", "gateway.run"} <= names, names


def test_a_collector_that_never_answers_holds_the_drain_no_longer_than_the_grace_period() -> None:
    # A socket that accepts connections and never says a word: the exporter's last flush
    # waits on it. The drain gives that flush what is left of --grace (at least 0.5 s),
    # not a fixed 5 s: the supervisor kills workers at grace + 5 s, Kubernetes at its own grace.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {v: "" for v in OTEL_VARIABLES} | {"OTEL_TRACES_SAMPLER": "always_on"}
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with gateway_process(
            "--models", str(MODELS), "--load", "digits", "--grace", "1", "--otlp-endpoint", endpoint, env=env
        ) as gateway:
            client = tc.InferenceServerClient(gateway.address)
            pixels = tc.InferInput("pixels", [1, 64], "FP32")
            pixels.set_data_from_numpy(rows())
            client.infer("digits", [pixels], headers={"traceparent": traceparent(*new_ids())})
            client.close()
            began = time.monotonic()
            assert gateway.stop(signal.SIGTERM) == 0
            took = time.monotonic() - began
    # An idle gateway drains at once; then at most max(0.5, what is left of the 1 s) for the flush.
    assert took < 3.5, f"the drain took {took:.1f} s with --grace 1"
