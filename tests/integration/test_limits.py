"""Caps on a request's structure, on request ids and on the prediction log; short error messages.

Issue #21 items 1, 2 and 15. The fuzz side (hostile requests against a real
server, with memory and latency bounds) is in tests/integration/test_malformed.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeAlias

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.config.settings import GatewaySettings, load_settings
from gateway.config.spec import ModelSpec
from gateway.errors import ConfigError, InvalidInput
from gateway.release.evidence import PredictionLog
from gateway.serving.validation import build_inputs, check_outputs
from gateway.types import TensorSpec, WireInput
from tests.support import gateway_in_thread

INVALID = grpc.StatusCode.INVALID_ARGUMENT
Stub: TypeAlias = Any  # a tritonclient GRPCInferenceServiceStub (no type hints)


def valid(request_id: str = "ok") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="digits", model_version="1", id=request_id)
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    return request


def refused(stub: Stub, request: service_pb2.ModelInferRequest) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == INVALID, caught.value.details()
    return caught.value.details() or ""


@pytest.fixture(scope="module")
def small_caps() -> Iterator[Stub]:
    with (
        gateway_in_thread(
            load=("digits",), max_inputs=1, max_outputs=1, max_parameters=1, max_rank=2, max_id_bytes=4
        ) as running,
        grpc.insecure_channel(running.address) as channel,
    ):
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_every_structure_cap_is_a_setting_the_server_applies(small_caps: Stub) -> None:
    # At each cap the request is served...
    at_caps = valid("abcd")
    at_caps.outputs.add(name="label")
    at_caps.parameters["priority"].int64_param = 1
    assert small_caps.ModelInfer(at_caps, timeout=10).id == "abcd"
    # ...and one more of anything is refused, naming the field, the cap and the setting.
    over = valid()
    over.inputs.add(name="extra", datatype="FP32", shape=[1])
    assert all(
        w in refused(small_caps, over) for w in ("inputs: more than the limit of 1 tensors", "GATEWAY_MAX_INPUTS")
    )
    over = valid()
    over.outputs.add(name="label")
    over.outputs.add(name="probabilities")
    assert all(w in refused(small_caps, over) for w in ("outputs: more than the limit of 1 requested", "max_outputs"))
    over = valid()
    over.parameters["a"].bool_param = True
    over.parameters["b"].bool_param = True
    assert all(
        w in refused(small_caps, over) for w in ("parameters: more than the limit of 1 entries", "max_parameters")
    )
    over = valid()
    over.inputs[0].shape.append(1)
    assert all(w in refused(small_caps, over) for w in ("inputs[0].shape: more than the limit of 2 dim", "max_rank"))
    # Counted in UTF-8 bytes: two characters of three bytes each are over four bytes.
    for request_id in ("abcde", "\u20ac\u20ac"):
        assert all(
            w in refused(small_caps, valid(request_id)) for w in ("id: more than the limit of 4 bytes", "max_id_bytes")
        )


def test_structure_caps_come_from_the_environment_and_must_be_positive() -> None:
    assert GatewaySettings().max_id_bytes == 256
    loaded = load_settings(env={"GATEWAY_MAX_RANK": "8", "GATEWAY_MAX_ID_BYTES": "64", "GATEWAY_MAX_INPUTS": "3"})
    assert (loaded.max_rank, loaded.max_id_bytes, loaded.max_inputs) == (8, 64, 3)
    for cap in ("max_inputs", "max_outputs", "max_parameters", "max_rank", "max_id_bytes"):
        with pytest.raises(ConfigError, match=cap):
            load_settings(env={f"GATEWAY_{cap.upper()}": "0"})


# --- item 2: the prediction log is bounded in bytes, oldest first ---------------------------------


def prediction(rows: int) -> tuple[str, str, np.ndarray]:
    return ("1", "stable", np.zeros(rows, np.int64))


def test_prediction_log_is_bounded_in_bytes_and_evicts_the_oldest_first() -> None:
    log = PredictionLog(max_entries=1_000_000, max_bytes=1 << 20)
    for i in range(2000):
        log.record(f"request-{i:05d}-" + "x" * 200, prediction(64))  # ~1 KiB an entry with its overhead
    assert log.nbytes <= 1 << 20
    assert 500 < len(log) < 2000
    assert log.evicted == 2000 - len(log)
    # The newest are kept, the oldest gone.
    assert log.take("request-01999-" + "x" * 200) is not None
    assert log.take("request-00000-" + "x" * 200) is None
    # Taking and evicting give the bytes back: an emptied log counts none.
    for i in range(2000):
        log.take(f"request-{i:05d}-" + "x" * 200)
    assert len(log) == 0 and log.nbytes == 0


def test_more_predictions_for_one_id_count_against_the_byte_bound() -> None:
    log = PredictionLog(max_bytes=64 * 1024)
    log.record("old", prediction(8))
    for _ in range(10):
        log.record("shadowed", prediction(1024))  # 8 KiB of values each time
    assert log.nbytes <= 64 * 1024
    assert log.take("old") is None  # evicted to make room, though it was small


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=300), st.integers(1, 512)), max_size=200), st.integers(4096, 1 << 20))
def test_prediction_log_bytes_track_its_entries(records: list[tuple[str, int]], max_bytes: int) -> None:
    log = PredictionLog(max_bytes=max_bytes)
    for request_id, rows in records:
        log.record(request_id, prediction(rows))
        assert log.nbytes <= max_bytes
    for request_id, _ in records:
        log.take(request_id)
    assert len(log) == 0 and log.nbytes == 0


def test_the_default_byte_bound_holds_the_default_entries_of_short_ids() -> None:
    log = PredictionLog()
    assert log.max_bytes == 64 << 20
    for i in range(log.max_entries):
        log.record(f"{i:036d}", prediction(2))  # a UUID-sized id, two rows
    assert len(log) == log.max_entries and log.evicted == 0


# --- item 15: error messages quote a bounded part of what the client sent ------------------------

SIGNATURE = [TensorSpec("pixels", "FP32", (-1, 64))]
SPEC = ModelSpec(max_batch_size=8)


def message_of(wire: list[WireInput]) -> str:
    with pytest.raises(InvalidInput) as caught:
        build_inputs(wire, SIGNATURE, SPEC, "digits")
    return str(caught.value)


@settings(max_examples=40, deadline=None)
@given(
    rank=st.integers(3, 200_000),
    dim=st.integers(-(2**63), 2**63 - 1),
    length=st.integers(100, 1_000_000),
)
def test_echoed_shapes_names_and_datatypes_are_clipped(rank: int, dim: int, length: int) -> None:
    raw = b"\0" * 256
    messages = [
        message_of([WireInput("pixels", "FP32", [1, 64] + [dim] * (rank - 2), raw=raw)]),  # wrong rank
        message_of([WireInput("pixels", "FP32", [dim] * 2, raw=raw)]),  # wrong dimensions or a negative one
        message_of([WireInput("pixels", "X" * length, [1, 64], raw=raw)]),  # wrong datatype
        message_of([WireInput("p" * length, "FP32", [1, 64], raw=raw)] * 2),  # unknown name
    ]
    long_name = [TensorSpec("p" * length, "FP32", (-1, 64))]
    with pytest.raises(InvalidInput) as caught:
        build_inputs([WireInput("p" * length, "FP32", [1, 64], raw=raw)] * 2, long_name, SPEC, "digits")
    messages.append(str(caught.value))  # the same input twice
    with pytest.raises(InvalidInput) as caught:
        check_outputs(["o" * length], SIGNATURE, "digits")
    messages.append(str(caught.value))
    for message in messages:
        assert len(message) < 600, message[:200]


def test_a_stream_message_over_a_cap_fails_alone(small_caps: Stub) -> None:
    over = valid()
    over.inputs.add(name="extra", datatype="FP32", shape=[1])
    answers = list(small_caps.ModelStreamInfer(iter([valid("a"), over, valid("b")]), timeout=10))
    assert [a.infer_response.id for a in answers] == ["a", "", "b"]
    assert "inputs: more than the limit of 1 tensors" in answers[1].error_message
