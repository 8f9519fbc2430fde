"""ModelInferResponse written straight to bytes: what the hot path sends instead of a protobuf message.

Building a `ModelInferResponse` costs a dozen protobuf calls a request (the
message, each output tensor and its shape, the raw contents, the parameters
map), and grpc then serializes it again. Nearly all of a response repeats from
one request to the next (the model's name and version, each output's name,
datatype and shape, the role parameter), so those parts are encoded once and
kept; a response is then a join of cached pieces, the id and the outputs' bytes.

The bytes are the protobuf encoding of the same message (fields in number
order, as protobuf writes them): any client parses them as a ModelInferResponse.
tests/unit/test_encoder.py holds them equal to protobuf's own serialization.
"""

from __future__ import annotations

import struct
from typing import TypeVar

import numpy as np

from gateway.dtypes import DATATYPE_BY_NUMPY
from gateway.types import InferResponse, ParamValue

# Field numbers, from protos/inference.proto.
_MODEL_NAME, _MODEL_VERSION, _ID, _PARAMETERS, _OUTPUTS, _RAW = 1, 2, 3, 4, 5, 6
_TENSOR_NAME, _TENSOR_DATATYPE, _TENSOR_SHAPE = 1, 2, 3
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_BOOL, _INT64, _STRING, _DOUBLE = 1, 2, 3, 4
_STREAM_ERROR, _STREAM_RESPONSE = 1, 2
_VARINT, _FIXED64, _LENGTH = 0, 1, 2

# Each cache holds at most this many entries, then starts again: the keys are a
# model's versions, outputs and batch sizes, a few dozen in practice, but a client
# choosing batch sizes must not grow them without bound.
_CACHE_ENTRIES = 1024

K = TypeVar("K")
V = TypeVar("V")


# Varints of 0..127 are one byte: the common lengths, kept ready.
_SMALL_VARINTS = tuple(bytes((n,)) for n in range(128))


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint; a negative int64 as its 64-bit two's complement (10 bytes)."""
    if 0 <= value < 128:
        return _SMALL_VARINTS[value]
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


_RAW_TAG = _tag(_RAW, _LENGTH)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, _LENGTH) + varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    """A string field; proto3 leaves an empty one out."""
    return _length_delimited(number, text.encode()) if text else b""


def _parameter_value(value: ParamValue) -> bytes:
    """An InferParameter message holding `value` in the field its type selects."""
    if isinstance(value, bool):
        return _tag(_BOOL, _VARINT) + varint(int(value))
    if isinstance(value, int):
        return _tag(_INT64, _VARINT) + varint(value)
    if isinstance(value, float):
        return _tag(_DOUBLE, _FIXED64) + struct.pack("<d", value)
    return _length_delimited(_STRING, value.encode())


def parameter_entry(key: str, value: ParamValue) -> bytes:
    """One entry of the response's parameters map (field 4)."""
    entry = _string(_ENTRY_KEY, key) + _length_delimited(_ENTRY_VALUE, _parameter_value(value))
    return _length_delimited(_PARAMETERS, entry)


def _output_header(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """One InferOutputTensor (field 5): its name, datatype and packed shape."""
    tensor = _string(_TENSOR_NAME, name) + _string(_TENSOR_DATATYPE, datatype)
    if shape:
        tensor += _length_delimited(_TENSOR_SHAPE, b"".join(varint(d) for d in shape))
    return _length_delimited(_OUTPUTS, tensor)


class ResponseEncoder:
    """Encodes InferResponses to bytes, keeping the parts that repeat."""

    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, str], bytes] = {}
        self._headers: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
        self._parameters: dict[tuple[str, ParamValue, type], bytes] = {}

    def encode(self, response: InferResponse) -> bytes:
        parts = [self._prefix(response.model, response.version)]
        if response.id:
            parts.append(_string(_ID, response.id))
        for key, value in response.parameters.items():
            parts.append(self._parameter(key, value))
        raws = []
        for name, array in response.outputs.items():
            parts.append(self._header(name, DATATYPE_BY_NUMPY[array.dtype], array.shape))
            raw = np.ascontiguousarray(array).tobytes()
            raws.append(_RAW_TAG + varint(len(raw)))
            raws.append(raw)
        parts += raws
        return b"".join(parts)

    def encode_stream(self, response: InferResponse) -> bytes:
        """A ModelStreamInferResponse carrying `response`."""
        return _length_delimited(_STREAM_RESPONSE, self.encode(response))

    @staticmethod
    def stream_error(message: str) -> bytes:
        """A ModelStreamInferResponse carrying one request's error."""
        return _length_delimited(_STREAM_ERROR, message.encode())

    def _prefix(self, model: str, version: str) -> bytes:
        key = (model, version)
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = _string(_MODEL_NAME, model) + _string(_MODEL_VERSION, version)
            _remember(self._prefixes, key, prefix)
        return prefix

    def _header(self, name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
        key = (name, datatype, shape)
        header = self._headers.get(key)
        if header is None:
            header = _output_header(name, datatype, shape)
            _remember(self._headers, key, header)
        return header

    def _parameter(self, key: str, value: ParamValue) -> bytes:
        # The type is part of the key: True == 1 == 1.0, but each encodes differently.
        cache_key = (key, value, type(value))
        entry = self._parameters.get(cache_key)
        if entry is None:
            entry = parameter_entry(key, value)
            _remember(self._parameters, cache_key, entry)
        return entry


def _remember(cache: dict[K, V], key: K, value: V) -> None:
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()
    cache[key] = value
