"""The pre-parse scan of a serialized ModelInferRequest agrees with the checks on the parsed message,
looks at a bounded number of fields whatever the message holds, and leaves malformed bytes to the parser."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidInput
from gateway.protocol.limits import (
    InferRequestParser,
    MalformedRequest,
    WireLimits,
    check_structure,
    scan_infer_request,
)
from gateway.protocol.pb import inference_pb2 as pb

LIMITS = WireLimits(
    max_inputs=4,
    max_outputs=3,
    max_parameters=2,
    max_rank=3,
    max_id_bytes=8,
    max_contents_values=12,
    max_separate_values=5,
)
# Typed contents fields and a strategy for their values (bytes_contents are always encoded one by one).
CONTENTS: dict[str, st.SearchStrategy[object]] = {
    "fp32_contents": st.floats(width=32),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "bool_contents": st.booleans(),
    "bytes_contents": st.binary(max_size=3),
}


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(st.text(max_size=4)),
        id=draw(st.text(max_size=6)),
    )
    for i in range(draw(st.integers(0, 6))):
        tensor = request.inputs.add(
            name=f"in{i}",
            datatype="FP32",
            shape=draw(st.lists(st.integers(-1, 2**40) | st.integers(0, 3), max_size=5)),
        )
        for key in draw(st.lists(st.text(max_size=3), max_size=3, unique=True)):
            tensor.parameters[key].int64_param = 1
        for field in draw(st.lists(st.sampled_from(sorted(CONTENTS)), max_size=2, unique=True)):
            getattr(tensor.contents, field).extend(draw(st.lists(CONTENTS[field], max_size=6)))
    for i in range(draw(st.integers(0, 5))):
        output = request.outputs.add(name=f"out{i}")
        for key in draw(st.lists(st.text(max_size=3), max_size=3, unique=True)):
            output.parameters[key].bool_param = True
    for key in draw(st.lists(st.text(max_size=3), max_size=3, unique=True)):
        request.parameters[key].string_param = "v"
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=4), max_size=5)))
    return request


def refusal(check: Callable[[], None]) -> str | None:
    try:
        check()
    except InvalidInput as exc:
        return str(exc).split(":")[0]
    return None


@settings(max_examples=400, deadline=None)
@given(requests())
def test_the_scan_refuses_exactly_what_the_parsed_checks_refuse(request: pb.ModelInferRequest) -> None:
    data = request.SerializeToString()
    scanned = refusal(lambda: scan_infer_request(data, LIMITS))
    parsed = refusal(lambda: check_structure(request, LIMITS))
    # Both refuse or both accept (the field named may differ when several are over:
    # the scan reads in wire order).
    assert (scanned is None) == (parsed is None), (scanned, parsed)
    if scanned is None:
        assert InferRequestParser(LIMITS).parse(data) == request


@pytest.mark.parametrize(
    "data",
    [
        b"\x2a\x00" * 2_000_000,  # 2 M empty input tensors (4 MB)
        b"\x32\x00" * 2_000_000,  # 2 M empty requested outputs
        b"\x3a\x00" * 2_000_000,  # 2 M raw_input_contents entries
        b"\x22\x00" * 2_000_000,  # 2 M parameter entries
        b"\x78\x00" * 2_000_000,  # 2 M unknown varint fields
        pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(shape=[1] * 2_000_000)]).SerializeToString(),
    ],
)
def test_hostile_bytes_are_refused_after_a_bounded_look(data: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(InvalidInput):
        scan_infer_request(data, LIMITS)
    assert time.perf_counter() - start < 0.05


def test_malformed_bytes_are_refused_by_the_scan_naming_what_is_wrong() -> None:
    # A scan that stopped early would bound nothing: whatever it cannot read to the end is refused.
    cases = {
        b"\x2a\x10": "runs past the end",
        b"\x0b": "group wire format",
        b"\xff" * 11: "cut off or longer than 10 bytes",
        b"\x2a\x02\x1a": "runs past the end",
        b"\x2a\x04\x2a\x02\x0e\x00": "wire type 6",
        b"\x2a\x05\x2a\x03\x32\x01\x00": "not a whole number of 4-byte values",
    }
    for data, reason in cases.items():
        with pytest.raises(MalformedRequest, match=reason):
            InferRequestParser(LIMITS).parse(data)


def test_a_long_id_or_model_name_is_refused_from_its_length_prefix() -> None:
    with pytest.raises(InvalidInput, match="id: more than the limit of 8 bytes"):
        scan_infer_request(pb.ModelInferRequest(id="\u20ac" * 3).SerializeToString(), LIMITS)
    with pytest.raises(InvalidInput, match="model_name: more than the limit of 256 bytes"):
        scan_infer_request(pb.ModelInferRequest(model_name="m" * 257).SerializeToString(), LIMITS)
    scan_infer_request(pb.ModelInferRequest(id="x" * 8, model_name="m" * 256).SerializeToString(), LIMITS)
