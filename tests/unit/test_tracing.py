"""Tracing's configuration (the setting, the standard OTEL_* variables) and its sampling, without sockets."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, StatusCode, TraceFlags

from gateway.config.settings import load_settings
from gateway.errors import ConfigError, InvalidInput
from gateway.tracing import DEFAULT_RATIO, DEFAULT_SAMPLER, Tracing, TracingConfig, tracing_config

COLLECTOR = "http://collector:4317"
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_off_unless_an_endpoint_is_configured() -> None:
    assert tracing_config("", {}) is None
    assert tracing_config("", {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}) is None
    assert tracing_config("", {}, injected=True) == TracingConfig("")


def test_the_setting_then_the_traces_endpoint_then_the_general_one() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://general:4317", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t:4317"}
    assert tracing_config(COLLECTOR, env) == TracingConfig(COLLECTOR)
    config = tracing_config("", env)
    assert config is not None and config.endpoint == "https://t:4317"
    config = tracing_config("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://general:4317"})
    assert config is not None and config.endpoint == "http://general:4317"


def test_the_default_sampler_is_parent_based_with_a_ratio() -> None:
    config = tracing_config(COLLECTOR, {})
    assert config is not None
    assert (config.sampler, config.ratio) == (DEFAULT_SAMPLER, DEFAULT_RATIO) == ("parentbased_traceidratio", 0.01)


def test_the_standard_sampler_variables() -> None:
    env = {"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.25", "OTEL_SERVICE_NAME": "edge-7"}
    assert tracing_config(COLLECTOR, env) == TracingConfig(COLLECTOR, "traceidratio", 0.25, "edge-7")
    # A sampler without a ratio ignores the argument, as the specification says.
    config = tracing_config(COLLECTOR, {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_SAMPLER_ARG": "lots"})
    assert config is not None and config.sampler == "always_on"


def test_otel_sdk_disabled_wins() -> None:
    assert tracing_config(COLLECTOR, {"OTEL_SDK_DISABLED": "TRUE"}, injected=True) is None
    assert tracing_config(COLLECTOR, {"OTEL_SDK_DISABLED": "false"}) is not None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT: expected http://HOST:PORT"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://c"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: expected"),
        # No port (gRPC would dial 443), or one that is not a port: refused at start, not dropped later.
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, "OTEL_EXPORTER_OTLP_ENDPOINT: expected http://HOST:PORT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:abc"}, "OTEL_EXPORTER_OTLP_ENDPOINT: expected http://HOST:PORT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:99999"}, "OTEL_EXPORTER_OTLP_ENDPOINT: expected http://HOST:PORT"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "OTEL_EXPORTER_OTLP_PROTOCOL: 'http/protobuf' is not"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER: 'sometimes' is not one of always_on"),
        ({"OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG: expected a ratio in [0, 1], got '1.5'"),
        ({"OTEL_TRACES_SAMPLER_ARG": "nan"}, "OTEL_TRACES_SAMPLER_ARG: expected a ratio in [0, 1], got 'nan'"),
        ({"OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG: expected a ratio in [0, 1], got 'half'"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    endpoint = "" if any("ENDPOINT" in v for v in env) else COLLECTOR
    with pytest.raises(ConfigError) as caught:
        tracing_config(endpoint, env)
    assert str(caught.value).startswith(message), caught.value


def test_the_setting_comes_from_the_environment_the_file_or_a_flag_and_is_checked() -> None:
    assert load_settings(env={}).otlp_endpoint == ""
    assert load_settings(env={"GATEWAY_OTLP_ENDPOINT": COLLECTOR}).otlp_endpoint == COLLECTOR
    flag = load_settings(env={"GATEWAY_OTLP_ENDPOINT": COLLECTOR}, overrides={"otlp_endpoint": "https://b:4317"})
    assert flag.otlp_endpoint == "https://b:4317"
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"GATEWAY_OTLP_ENDPOINT": "localhost:4317"})
    assert str(caught.value).startswith("GATEWAY_OTLP_ENDPOINT: otlp_endpoint: expected http://HOST:PORT")


def traced(sampler: str, ratio: float = DEFAULT_RATIO) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    config = TracingConfig("", sampler, ratio)
    return Tracing.build(config, processor=SimpleSpanProcessor(exporter)), exporter


def test_parent_based_follows_the_callers_decision_and_samples_roots_by_ratio() -> None:
    tracing, _ = traced("parentbased_traceidratio", 0.0)
    assert tracing.start(tracing.extract(None), "r", {}) is None  # a root, at ratio 0
    assert tracing.start(tracing.extract(PARENT), "r", {}) is not None  # the caller sampled it
    assert tracing.start(tracing.extract(PARENT[:-2] + "00"), "r", {}) is None  # the caller did not
    assert tracing.start(tracing.extract("garbage"), "r", {}) is None  # unparseable: a root
    tracing, _ = traced("parentbased_traceidratio", 1.0)
    assert tracing.start(tracing.extract(None), "r", {}) is not None


def test_a_shadow_batch_linked_to_a_sampled_request_is_sampled_whatever_the_ratio() -> None:
    tracing, exporter = traced("parentbased_traceidratio", 0.0)
    request = tracing.start(tracing.extract(PARENT), "r", {})
    assert request is not None
    unsampled = SpanContext(1, 2, is_remote=False, trace_flags=TraceFlags(0))
    tracing.shadow([unsampled], {}).end("completed")
    shadow = tracing.shadow([unsampled, request.context], {"gateway.version": "3"})
    shadow.step("gateway.shadow.run")
    shadow.end("failed")
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["gateway.shadow.run", "gateway.shadow"]
    assert spans[1].status.status_code is StatusCode.ERROR
    assert [link.context for link in spans[1].links] == [unsampled, request.context]


def test_child_spans_come_from_the_recorded_times_on_the_wall_clock() -> None:
    tracing, exporter = traced("always_on")
    request = tracing.start(tracing.extract(PARENT), "r", {})
    assert request is not None
    now_perf, now_mono = time.perf_counter_ns(), time.monotonic()
    request.validating_ns, request.validated_ns, request.rows = now_perf + 1_000, now_perf + 2_000, 4
    timing = request.timing
    timing.enqueued, timing.dequeued = now_mono + 3e-6, now_mono + 5e-6
    timing.started_ns, timing.ended_ns, timing.rows, timing.requests = now_perf + 5_000, now_perf + 9_000, 16, 3
    request.end(InvalidInput("bad row"))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["r"]
    assert root.status.status_code is StatusCode.ERROR and root.status.description == "bad row"
    assert dict(root.attributes or {})["gateway.status"] == "INVALID_ARGUMENT"
    validate, queue, run = spans["gateway.validate"], spans["gateway.queue"], spans["gateway.run"]
    assert validate.end_time is not None and validate.start_time is not None
    assert validate.end_time - validate.start_time == 1_000
    assert run.end_time is not None and run.start_time is not None and run.end_time - run.start_time == 4_000
    assert queue.end_time is not None and queue.start_time is not None
    assert abs(queue.end_time - queue.start_time - 2_000) < 100  # a float's seconds
    # Monotonic and perf_counter times meet on the wall clock, up to the offsets' reads (taken one after the other).
    assert abs(queue.end_time - run.start_time) < 50_000
    assert dict(run.attributes or {}) == {
        "gateway.batch.size": 16,
        "gateway.batch.requests": 3,
        "gateway.batch.queued": True,
    }
    assert root.start_time is not None and root.start_time <= validate.start_time
