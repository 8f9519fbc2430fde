"""The hand-written ModelInferResponse bytes are protobuf's own encoding of the same message."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.protocol import codec
from gateway.protocol.encoder import ResponseEncoder, varint
from gateway.protocol.pb import inference_pb2 as pb
from gateway.types import InferResponse, ParamValue

OUTPUTS = {
    "probabilities": np.arange(20, dtype=np.float32).reshape(2, 10) / 7,
    "label": np.array([3, -4], dtype=np.int64),
}


@pytest.mark.parametrize(
    "parameters",
    [
        {},
        {"role": "stable"},
        {"role": "canary"},
        {"flag": True},
        {"off": False},
        {"count": 0},
        {"count": 12345678901},
        {"negative": -3},
        {"ratio": 0.25},
        {"empty": ""},
        {"role": "stable", "count": 7},
    ],
)
@pytest.mark.parametrize("request_id", ["", "req-1", "ünïcode id"])
def test_bytes_equal_protobufs_serialization(parameters: dict[str, ParamValue], request_id: str) -> None:
    response = InferResponse("digits", "2", OUTPUTS, request_id, parameters)
    encoder = ResponseEncoder()
    ours = encoder.encode(response)
    theirs = codec.encode_infer(response)
    if len(parameters) <= 1:
        assert ours == theirs.SerializeToString()
    # Protobuf writes map entries in an order of its own: with several, compare the messages.
    assert pb.ModelInferResponse.FromString(ours) == theirs
    assert encoder.encode(response) == ours  # from the caches, the same bytes
    parsed = pb.ModelInferResponse.FromString(ours)
    assert parsed.model_name == "digits" and parsed.model_version == "2" and parsed.id == request_id
    assert [o.name for o in parsed.outputs] == list(OUTPUTS)
    assert [list(o.shape) for o in parsed.outputs] == [[2, 10], [2]]
    assert np.frombuffer(parsed.raw_output_contents[1], np.int64).tolist() == [3, -4]


def test_a_cached_parameter_keeps_its_type() -> None:
    """True, 1 and 1.0 are equal (and hash alike) in Python, but encode as three different parameters."""
    encoder = ResponseEncoder()
    for value in (True, 1, 1.0):
        data = encoder.encode(InferResponse("m", "1", {}, "", {"p": value}))
        parsed = pb.ModelInferResponse.FromString(data).parameters["p"]
        assert (
            parsed.WhichOneof("parameter_choice")
            == {bool: "bool_param", int: "int64_param", float: "double_param"}[type(value)]
        )


def test_the_stream_forms_parse() -> None:
    encoder = ResponseEncoder()
    response = InferResponse("digits", "1", OUTPUTS, "s-1", {"role": "stable"})
    stream = pb.ModelStreamInferResponse.FromString(encoder.encode_stream(response))
    assert stream.infer_response.SerializeToString() == encoder.encode(response)
    error = pb.ModelStreamInferResponse.FromString(ResponseEncoder.stream_error("input 'x': bad"))
    assert error.error_message == "input 'x': bad" and not error.HasField("infer_response")


def test_caches_stay_bounded_whatever_the_batch_sizes() -> None:
    encoder = ResponseEncoder()
    for rows in range(1, 3000):
        data = encoder.encode(InferResponse("m", "1", {"y": np.zeros((rows, 1), np.float32)}))
        assert list(pb.ModelInferResponse.FromString(data).outputs[0].shape) == [rows, 1]
    assert len(encoder._headers) <= 1024


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**35, 2**63 - 1, -1, -(2**63)])
def test_varint_matches_protobuf(value: int) -> None:
    message = pb.InferParameter(int64_param=value)
    assert message.SerializeToString() == b"\x10" + varint(value)
