"""The pre-parse scan reads every request to its end or refuses it (issue #21, probe finding 1).

A scan that stopped early (at a group, at malformed bytes inside a tensor) used
to leave the request to protobuf, which then parsed all of it: one group field
before 33 M empty tensors took 3 GB and froze the server for 8 s. Now whatever
the scan cannot read is refused.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidInput
from gateway.protocol.limits import DEFAULT_LIMITS, InferRequestParser, MalformedRequest, WireLimits, scan_infer_request
from gateway.protocol.pb import inference_pb2 as pb

N = 2_000_000  # entries in each hostile message (4 MB or more)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


GROUP = b"\x7b\x7c"  # field 15, start group (wire type 3) then end group (4): empty

HOSTILE: dict[str, tuple[bytes, type[Exception], str]] = {
    "a group before 2 M empty tensors": (GROUP + b"\x2a\x00" * N, MalformedRequest, "group wire format"),
    "a group inside a tensor": (field(5, GROUP + b"\x0a\x01x" * N), MalformedRequest, "group wire format"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_groups_are_refused_after_a_bounded_look(name: str) -> None:
    data, error, words = HOSTILE[name]
    start = time.perf_counter()
    with pytest.raises(error, match=words):
        InferRequestParser(DEFAULT_LIMITS).parse(data)
    # Generous (2 shared cores): the parse these requests reached took seconds.
    assert time.perf_counter() - start < 0.5


def _protobuf_parses(data: bytes) -> bool:
    try:
        pb.ModelInferRequest.FromString(data)
    except Exception:  # protobuf's DecodeError (its stubs are not installed)
        return False
    return True


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A valid request's bytes with a few bytes changed, inserted or removed: mostly malformed."""
    sent = pb.ModelInferRequest(model_name="digits", id=draw(st.text(max_size=4)))
    for i in range(draw(st.integers(0, 2))):
        t = sent.inputs.add(name=f"in{i}", datatype="FP32", shape=draw(st.lists(st.integers(-2, 4), max_size=3)))
        t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=4)))
        t.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
        t.parameters["p"].int64_param = 1
    sent.outputs.add(name="out")
    data = bytearray(sent.SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif data and at < len(data):
            if action == "set":
                data[at] = draw(st.integers(0, 255))
            else:
                del data[at]
    return bytes(data)


LOOSE = WireLimits(max_inputs=64, max_outputs=64, max_parameters=64, max_rank=16, max_id_bytes=64)


@settings(max_examples=600, deadline=None)
@given(st.one_of(near_valid(), st.binary(max_size=64)))
def test_the_scan_calls_malformed_only_what_protobuf_cannot_parse_or_groups(data: bytes) -> None:
    """Refusing bytes as malformed must never refuse a message a proto3 client could send."""
    try:
        scan_infer_request(data, LOOSE)
    except MalformedRequest as malformed:
        assert not _protobuf_parses(data) or "group wire format" in str(malformed), (data, malformed)
    except InvalidInput:
        pass
