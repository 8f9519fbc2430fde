"""Messages that are not protobuf: INVALID_ARGUMENT, one log line, and a stream that goes on."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from tests.support import Running

SERVICE = "/inference.GRPCInferenceService"
# Not a protobuf message: field 15, wire type 7 (no such wire type).
GARBAGE = b"\x7f\xff\xff\xff\xff"


def _identity(data: bytes) -> bytes:
    return data


def _parses(data: bytes) -> bool:
    try:
        service_pb2.ModelInferRequest.FromString(data)
    except Exception:  # protobuf's DecodeError (its stubs are not installed)
        return False
    return True


def _good(request_id: str = "") -> bytes:
    request = service_pb2.ModelInferRequest(model_name="digits", model_version="1", id=request_id)
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    return bytes(request.SerializeToString())


@pytest.fixture
def channel(bundled: Running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(bundled.address) as channel:
        yield channel


def _raw_infer(channel: grpc.Channel, data: bytes) -> grpc.RpcError:
    call = channel.unary_unary(f"{SERVICE}/ModelInfer", request_serializer=_identity, response_deserializer=_identity)
    with pytest.raises(grpc.RpcError) as refused:
        call(data, timeout=30)
    return refused.value


def test_garbage_infer_is_invalid_argument_with_one_log_line(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    assert not _parses(GARBAGE)
    with caplog.at_level(logging.WARNING):
        errors = [_raw_infer(channel, GARBAGE) for _ in range(3)]
    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "ModelInferRequest" in (error.details() or "")
        assert "parse" in (error.details() or "")
    # One short line per bad message at most (no traceback), and the server still answers.
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    lines = [r for r in caplog.records if "parse" in r.getMessage()]
    assert 1 <= len(lines) <= len(errors)
    assert all("\n" not in r.getMessage() for r in lines)
    reply = channel.unary_unary(f"{SERVICE}/ModelInfer", request_serializer=_identity, response_deserializer=_identity)(
        _good(), timeout=30
    )
    assert service_pb2.ModelInferResponse.FromString(reply).model_name == "digits"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=300))
def test_any_unparseable_bytes_are_invalid_argument(channel: grpc.Channel, data: bytes) -> None:
    assume(not _parses(data))
    error = _raw_infer(channel, data)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error


def test_garbage_mid_stream_answers_that_message_and_keeps_the_stream(channel: grpc.Channel) -> None:
    stream = channel.stream_stream(
        f"{SERVICE}/ModelStreamInfer",
        request_serializer=_identity,
        response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
    )
    sent = [_good("a"), GARBAGE, _good("b"), b"\x0a\xff", _good("c")]
    replies = list(stream(iter(sent), timeout=60))
    assert [bool(r.error_message) for r in replies] == [False, True, False, True, False]
    assert [r.infer_response.id for r in replies if not r.error_message] == ["a", "b", "c"]
    for reply in (replies[1], replies[3]):
        assert "ModelInferRequest" in reply.error_message
        assert "parse" in reply.error_message


def test_garbage_in_another_stream_ends_it_with_invalid_argument(channel: grpc.Channel) -> None:
    """Streams that cannot answer one message alone (reflection) end with INVALID_ARGUMENT, not INTERNAL."""
    stream = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=_identity,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    replies = stream(iter([good, GARBAGE]), timeout=30)
    assert next(replies).list_services_response.service
    with pytest.raises(grpc.RpcError) as ended:
        next(replies)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ended.value


def test_garbage_health_watch_is_invalid_argument(channel: grpc.Channel) -> None:
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch", request_serializer=_identity, response_deserializer=_identity
    )
    with pytest.raises(grpc.RpcError) as refused:
        next(watch(GARBAGE, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value


def test_unparseable_log_lines_are_rate_limited(channel: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    # Any client can send garbage by the thousand: the log gets a line per method per
    # interval (gateway.logthrottle), not one per message.
    with caplog.at_level(logging.WARNING, logger="gateway.protocol.status"):
        for _ in range(30):
            assert _raw_infer(channel, GARBAGE).code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [r.getMessage() for r in caplog.records if "unparseable" in r.getMessage()]
    assert len(lines) <= 2, lines
