"""A tensor's JSON `data` -> its row-major bytes, checked against its datatype and shape.

The bytes are what a gRPC client would put in raw_input_contents, so the data
plane sees one form whichever edge a request came by. Counts and nesting are
checked against the shape before any array is built; a value of the wrong JSON
type or out of its datatype's range is refused naming the tensor.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Sequence
from typing import Final

import numpy as np

from gateway.dtypes import NUMPY_BY_DATATYPE
from gateway.errors import InvalidInput

BYTES = "BYTES"
# The OIP's datatypes. BF16 travels only as binary data (JSON has no bfloat16 notation).
DATATYPES: Final = frozenset({*NUMPY_BY_DATATYPE, BYTES, "BF16"})
_JSON_TYPES: Final[dict[str, frozenset[type]]] = {
    "b": frozenset({bool}),
    "i": frozenset({int}),
    "u": frozenset({int}),
    "f": frozenset({int, float}),
}
_JSON_NAMES: Final = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
_LENGTH = struct.Struct("<I")


def json_type(value: object) -> str:
    """How the JSON value reads to a client: the name in errors."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if value is None:
        return "null"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def flatten(data: object, shape: Sequence[int], where: str) -> list[object]:
    """`data` flat in row-major order: already flat, or nested exactly as `shape` says."""
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: expected an array, got {json_type(data)}")
    elements = math.prod(shape)
    level: list[object] = data
    depth = 0
    # One level at a time: the lists at each depth, concatenated in order, are the next
    # level in row-major order.
    while level and isinstance(level[0], list):
        if depth + 1 >= len(shape):
            raise InvalidInput(f"{where}: nested deeper than its shape {list(shape)} allows")
        if depth == 0 and len(level) != shape[0]:
            raise InvalidInput(f"{where}: has {len(level)} rows, expected {shape[0]} for shape {list(shape)}")
        nested: list[object] = []
        for item in level:
            if not isinstance(item, list):
                raise InvalidInput(f"{where}: mixes arrays and values at depth {depth + 1}")
            nested.extend(item)
        # Each list just opened holds shape[depth + 1] entries, or, where it is the
        # innermost, every element of the remaining dimensions.
        inner = nested[0] if nested else None
        want = shape[depth + 1] if isinstance(inner, list) else math.prod(shape[depth + 1 :])
        if any(len(item) != want for item in level):  # type: ignore[arg-type]
            raise InvalidInput(f"{where}: a nested array at depth {depth + 1} does not have {want} entries")
        level = nested
        depth += 1
    if len(level) != elements:
        raise InvalidInput(f"{where}: has {len(level)} values, expected {elements} for shape {list(shape)}")
    return level


def to_bytes(datatype: str, values: list[object], where: str) -> bytes:
    """Flat JSON values as the row-major bytes of `datatype` (BYTES: each a 4-byte length, then UTF-8)."""
    if datatype == BYTES:
        return _strings(values, where)
    dtype = NUMPY_BY_DATATYPE.get(datatype)
    if dtype is None:
        raise InvalidInput(f"{where}: {datatype} data travels only as binary data (parameters.binary_data_size)")
    allowed = _JSON_TYPES[dtype.kind]
    found = set(map(type, values))
    if not found <= allowed:
        wrong = next(v for v in values if type(v) not in allowed)
        raise InvalidInput(f"{where}: {datatype} values must be {_expected(dtype.kind)}, got {json_type(wrong)}")
    try:
        with warnings.catch_warnings():
            # A float beyond FP16's or FP32's range becomes inf, as a client's own cast would make it.
            warnings.simplefilter("ignore", RuntimeWarning)
            array = np.array(values, dtype=dtype)
    except OverflowError:
        info = np.iinfo(dtype)  # type: ignore[type-var]
        raise InvalidInput(f"{where}: a value is out of range for {datatype} ({info.min}..{info.max})") from None
    return array.tobytes()


def _expected(kind: str) -> str:
    return {"b": "true or false", "f": "numbers"}.get(kind, "integers")


def _strings(values: list[object], where: str) -> bytes:
    if not all(type(v) is str for v in values):
        wrong = next(v for v in values if type(v) is not str)
        raise InvalidInput(f"{where}: BYTES values must be strings, got {json_type(wrong)}")
    parts = []
    for value in values:
        encoded = value.encode()  # type: ignore[attr-defined]
        parts.append(_LENGTH.pack(len(encoded)))
        parts.append(encoded)
    return b"".join(parts)
