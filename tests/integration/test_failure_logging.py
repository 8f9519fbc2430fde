"""Model-run failures are in the gateway log, rate-limited (issue #21 item 12).

A caller whose request failed in the model run gets INTERNAL "details are in
the gateway log"; the log has them: model, version, request id and the
runtime's message, one line per version per few seconds with a count of the
lines held back. A failing shadow logs the same way (a warning: the caller
never sees a shadow's failure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2_grpc

from gateway.logthrottle import ThrottledLog, one_line
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.integration.test_overload import request
from tests.onnx_models import write_spin_model
from tests.support import Running, gateway_in_thread

RUNTIME_MESSAGE = "indices element out of data bounds"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttled_log_writes_a_line_per_key_per_interval_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    throttled = ThrottledLog(logging.getLogger("test.throttle"), interval_s=5.0, clock=clock)
    caplog.set_level(logging.INFO, "test.throttle")
    assert throttled.log(logging.ERROR, "a", "first %d", 1)
    for _ in range(7):
        clock.now += 0.5
        assert not throttled.log(logging.ERROR, "a", "again")
    assert throttled.log(logging.ERROR, "b", "another key")  # keys are independent
    clock.now += 5.0
    assert throttled.log(logging.ERROR, "a", "later %s", "x")
    assert [r.getMessage() for r in caplog.records] == [
        "first 1",
        "another key",
        "later x (7 more like it suppressed since the last line)",
    ]
    assert all(r.levelno == logging.ERROR for r in caplog.records)


@given(st.text(max_size=3000))
def test_one_line_keeps_client_text_on_one_bounded_line(text: str) -> None:
    line = one_line(text, limit=100)
    assert len(line.splitlines()) <= 1
    assert line.isprintable()  # no terminal escapes either
    assert len(line) <= 100 + len("... ( chars)") + len(str(len(text) * 10))
    if len(text) <= 100 and text.isprintable():  # nothing to escape or cut
        assert line == text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("repo")
    write_spin_model(root / "spin" / "1" / "model.onnx")
    write_spin_model(root / "spin" / "2" / "model.onnx", fault="raise")  # fails once any x > 0.5
    (root / "spin" / "model.toml").write_text(
        'max_batch_size = 8\n[batching]\nmax_queue_delay_us = 0\nexecution = "thread"\n[release]\nstable = "1"\n'
    )
    with gateway_in_thread(root) as running:
        yield running


def records(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def test_a_failed_model_run_is_logged_with_model_version_id_and_cause(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
    for i in range(20):
        r = request(0, value=0.9)
        r.model_version = "2"
        r.id = f"bad-{i}"
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(r, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "gateway log" in (caught.value.details() or "")
    lines = records(caplog, "gateway.dataplane")
    # One line for the twenty (rate-limited), with everything needed to find the cause.
    assert len(lines) == 1, lines
    assert "model spin version 2" in lines[0]
    assert "request id 'bad-0'" in lines[0]
    assert RUNTIME_MESSAGE in lines[0]


def test_a_failing_shadow_is_logged_as_a_warning(server: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
    control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))
    control.AddShadow(rpb.AddShadowRequest(model="spin", version="2", fraction=1.0))
    try:
        r = request(0, value=0.9)
        r.id = "mirrored-1"
        assert stub.ModelInfer(r, timeout=10).model_version == "1"
        deadline = time.monotonic() + 15
        while not control.GetReport(rpb.GetReportRequest(model="spin")).shadows["2"].failed:
            assert time.monotonic() < deadline, "the shadow never failed"
            time.sleep(0.02)
    finally:
        control.RemoveShadow(rpb.RemoveShadowRequest(model="spin", version="2"))
    warnings = records(caplog, "gateway.release.shadow")
    assert len(warnings) == 1, warnings
    assert "model spin version 2" in warnings[0]
    assert "'mirrored-1'" in warnings[0]
    assert RUNTIME_MESSAGE in warnings[0]
