"""The REST edge's pure parts: caps before parsing, JSON tensors, the binary extension, the status table."""

from __future__ import annotations

import gzip
import json
import re
from typing import Any

import numpy as np
import orjson
import pytest

from gateway.config.settings import load_settings
from gateway.errors import Code, ConfigError, InvalidInput, ModelExecutionError, Overloaded
from gateway.rest import limits as rest_limits
from gateway.rest.codec import decode_infer, encode_infer
from gateway.rest.limits import DEFAULT_LIMITS, RestLimits, check_json_structure, decompress
from gateway.rest.status import HTTP_BY_CODE, BodyTooLarge, error_answer
from gateway.rest.tensors import flatten, to_bytes
from gateway.types import InferResponse

SMALL = RestLimits(
    max_body_bytes=1024, max_inputs=2, max_outputs=2, max_parameters=3, max_rank=3, max_id_bytes=8,
    max_contents_values=50,
)  # fmt: skip


def body(**fields: Any) -> bytes:
    inputs = fields.pop("inputs", [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}])
    return json.dumps({"inputs": inputs, **fields}).encode()


def test_brackets_and_commas_inside_strings_are_not_structure() -> None:
    text = json.dumps({"id": '[[[[[[[[[[,,,,\\"]]', "inputs": [{"name": "[" * 100 + "," * 100}]}).encode()
    check_json_structure(text, SMALL)  # would be 100+ deep and 100+ values if strings counted


def test_nesting_deeper_than_the_rank_allows_is_refused_before_parsing() -> None:
    inner = SMALL.max_depth - 1  # the object is a level too
    check_json_structure(b'{"a": ' + b"[" * inner + b"]" * inner + b"}", SMALL)
    with pytest.raises(InvalidInput, match=r"nests deeper than 7 levels .*max_rank = 3"):
        check_json_structure(b"[" * 8 + b"]" * 8, SMALL)
    with pytest.raises(InvalidInput, match="nests deeper"):
        check_json_structure(b"[" * 100_000, DEFAULT_LIMITS)  # never closed: still refused, not parsed


def test_the_depth_is_carried_across_scan_chunks() -> None:
    filler = b"[]" * (rest_limits._SCAN_CHUNK // 2 - 4)
    with pytest.raises(InvalidInput, match="nests deeper"):
        check_json_structure(filler + b"[" * (SMALL.max_depth + 1), SMALL)


def test_more_values_than_the_tensors_may_hold_is_refused_before_parsing() -> None:
    cap = SMALL.max_contents_values + rest_limits.STRUCTURE_VALUES
    check_json_structure(b"[" + b"0," * cap + b"0]", SMALL)
    with pytest.raises(InvalidInput, match=r"more than 4146 values.*max_contents_values.*binary data"):
        check_json_structure(b"[" + b"0," * (cap + 1) + b"0]", SMALL)


def test_a_compressed_body_is_inflated_no_further_than_the_cap() -> None:
    assert decompress(gzip.compress(b"x" * 1024), "gzip", 1024) == b"x" * 1024
    with pytest.raises(BodyTooLarge, match="max_message_bytes"):
        decompress(gzip.compress(b"\0" * (10 << 20)), "gzip", 1024)  # 10 MiB from ~10 KiB
    with pytest.raises(InvalidInput, match="does not inflate"):
        decompress(b"not gzip", "gzip", 1024)
    with pytest.raises(InvalidInput, match="Content-Encoding: 'br' is not supported"):
        decompress(b"", "br", 1024)


def test_flatten_takes_flat_or_exactly_nested_data() -> None:
    assert flatten([1, 2, 3, 4, 5, 6], [2, 3], "d") == [1, 2, 3, 4, 5, 6]
    assert flatten([[1, 2, 3], [4, 5, 6]], [2, 3], "d") == [1, 2, 3, 4, 5, 6]
    assert flatten([[[1], [2]], [[3], [4]]], [2, 2, 1], "d") == [1, 2, 3, 4]
    assert flatten([[1, 2], [3, 4]], [2, 1, 2], "d") == [1, 2, 3, 4]  # innermost lists hold the rest
    assert flatten([[], []], [2, 0], "d") == []
    for data, shape, message in [
        ([[1, 2], [3]], [2, 2], "does not have 2 entries"),
        ([[1, 2], 3], [2, 2], "mixes arrays and values"),
        ([[[1]]], [1, 1], "nested deeper than its shape"),
        ([[1, 2]], [2, 1], "has 1 rows, expected 2"),
        ([1, 2, 3], [2, 2], "has 3 values, expected 4"),
        (5, [1], "expected an array, got an integer"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            flatten(data, shape, "d")


def test_values_are_checked_by_json_type_and_range() -> None:
    assert to_bytes("INT16", [-1, 2], "d") == np.array([-1, 2], np.int16).tobytes()
    assert to_bytes("FP16", [0.5, 1], "d") == np.array([0.5, 1], np.float16).tobytes()
    assert to_bytes("BOOL", [True, False], "d") == b"\x01\x00"
    assert to_bytes("FP32", [1e300], "d") == np.array([np.inf], np.float32).tobytes()  # as a client's cast
    cases: list[tuple[str, list[object], str]] = [
        ("INT32", [True], "integers, got true/false"),
        ("BOOL", [0], "true or false, got an integer"),
        ("FP64", [None], "numbers, got null"),
        ("UINT64", [-1], r"out of range for UINT64 \(0\.\.18446744073709551615\)"),
        ("BF16", [1.0], "only as binary data"),
    ]
    for datatype, values, message in cases:
        with pytest.raises(InvalidInput, match=message):
            to_bytes(datatype, values, "d")


def test_decode_names_each_field_over_its_cap() -> None:
    for raw, message in [
        (body(id="123456789"), "id: longer than the limit of 8 bytes"),
        (body(inputs=[{}] * 3), "inputs: more than the limit of 2 entries (setting max_inputs)"),
        (body(outputs=[{"name": "a"}] * 3), "outputs: more than the limit of 2"),
        (body(parameters={"a": 1, "b": 2, "c": 3, "d": 4}), "parameters: more than the limit of 3"),
        (body(parameters={"a": [1]}), "parameters.a: expected a bool, number or string, got an array"),
        (body(inputs=[{"name": "x", "datatype": "FP32", "shape": [1] * 4, "data": [1]}]), "inputs[0].shape: more"),
        (body(inputs=[{"name": "x", "datatype": "FP32", "shape": [-1], "data": []}]), "inputs[0].shape: expected"),
        (body(outputs=[{"name": "a"}, {"name": "a"}]), "outputs[1].name: output 'a' is requested more than once"),
        (body(outputs=[{"name": "a", "parameters": {"binary_data": 1}}]), "outputs[0].parameters.binary_data"),
        (b"[1]", "the request body: expected an object, got an array"),
    ]:
        with pytest.raises(InvalidInput, match=re.escape(message)):
            decode_infer(raw, None, "m", "", SMALL)


def test_binary_inputs_take_their_bytes_in_order_and_transport_parameters_stay_out() -> None:
    header = body(
        inputs=[
            {"name": "a", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}},
            {"name": "b", "datatype": "FP32", "shape": [1], "data": [0.5]},
            {"name": "c", "datatype": "UINT8", "shape": [3], "parameters": {"binary_data_size": 3}},
        ],
        parameters={"binary_data_output": True, "routing_key": "k"},
    )
    decoded = decode_infer(header + b"AAAABBBBxyz", str(len(header)), "m", "2")
    assert [w.raw for w in decoded.wire.inputs] == [b"AAAABBBB", np.float32(0.5).tobytes(), b"xyz"]
    assert decoded.wire.parameters == {"routing_key": "k"}
    assert (decoded.wire.model, decoded.wire.version, decoded.binary_default) == ("m", "2", True)


def test_answers_are_json_or_json_then_binary() -> None:
    outputs: dict[str, np.ndarray] = {"p": np.array([[0.5, 1.5]], np.float32), "l": np.array([3], np.int64)}
    answer = InferResponse("m", "1", outputs, "r", {"role": "stable"})
    request = decode_infer(
        body(outputs=[{"name": "p", "parameters": {"binary_data": True}}, {"name": "l"}]), None, "m", ""
    )
    content, length = encode_infer(answer, request)
    assert length is not None
    document = orjson.loads(content[:length])
    assert document["parameters"] == {"role": "stable"} and document["id"] == "r"
    assert document["outputs"][0] == {
        "name": "p",
        "datatype": "FP32",
        "shape": [1, 2],
        "parameters": {"binary_data_size": 8},
    }
    assert document["outputs"][1] == {"name": "l", "datatype": "INT64", "shape": [1], "data": [3]}
    assert content[length:] == outputs["p"].tobytes()
    plain, none = encode_infer(answer, decode_infer(body(), None, "m", ""))
    assert none is None and orjson.loads(plain)["outputs"][0]["data"] == [0.5, 1.5]


def test_every_code_has_an_http_status_and_bugs_stay_generic() -> None:
    assert set(HTTP_BY_CODE) == set(Code)
    assert error_answer(Overloaded("queue full"), "/p") == (429, b'{"error":"queue full"}', {"retry-after": "1"})
    assert error_answer(BodyTooLarge("big"), "/p")[0] == 413
    generic = b'{"error":"internal error (details are in the gateway log)"}'
    assert error_answer(ModelExecutionError("secret"), "/p")[:2] == (500, generic)
    assert error_answer(KeyError("/internal/path"), "/p")[:2] == (500, generic)


def test_the_http_port_setting() -> None:
    assert load_settings(env={}).http_port == 8000
    assert load_settings(env={"GATEWAY_HTTP_PORT": "-1"}).http_port == -1
    assert load_settings(env={"GATEWAY_HTTP_PORT": "0"}, overrides={"http_port": 8080}).http_port == 8080
    with pytest.raises(ConfigError, match="GATEWAY_HTTP_PORT: http_port: -2 is not a valid port"):
        load_settings(env={"GATEWAY_HTTP_PORT": "-2"})
