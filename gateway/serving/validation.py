"""Check a request against a model's signature, then build its numpy inputs.

Every check runs on metadata alone (names, datatypes, shapes, lengths) before
any buffer is built, so a hostile request cannot make us allocate: shapes,
element counts and byte totals are capped first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway.config.spec import ModelSpec
from gateway.dtypes import CONTENTS_FIELD, NUMPY_BY_DATATYPE
from gateway.errors import InvalidInput
from gateway.serving.runtime import check_shared_dims
from gateway.types import Tensors, TensorSpec, WireInput

# Error messages quote what the client sent, and they travel in the call's trailing
# metadata, which gRPC caps (8 KiB by default): an echoed value must stay short, or
# the client gets RESOURCE_EXHAUSTED "metadata exceeds hard limit" instead of the
# message. Names and datatypes are clipped to this many characters, shapes to this
# many dimensions (and each dimension's digits, which are at most 20 for an int64).
ECHO_CHARS = 80
ECHO_DIMS = 8


def _q(value: str, limit: int = ECHO_CHARS) -> str:
    """`value` quoted as repr() does, clipped to `limit` characters (with a marker) when longer."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"


def _fmt(shape: Sequence[int]) -> str:
    shown = ", ".join(str(d)[:21] for d in shape[:ECHO_DIMS])
    if len(shape) > ECHO_DIMS:
        shown += f", ... ({len(shape)} dimensions)"
    return "[" + shown + "]"


def _check_shape(w: WireInput, spec: TensorSpec, max_batch_size: int) -> None:
    if any(d < 0 for d in w.shape):
        raise InvalidInput(f"input {_q(w.name)}: shape {_fmt(w.shape)} has a negative dimension")
    if len(w.shape) != len(spec.shape):
        raise InvalidInput(
            f"input {_q(w.name)}: expected shape {_fmt(spec.shape)} ({len(spec.shape)} dimensions), got {_fmt(w.shape)}"
        )
    for axis, (got, want) in enumerate(zip(w.shape, spec.shape, strict=False)):
        if want >= 0 and got != want:
            raise InvalidInput(
                f"input {_q(w.name)}: dimension {axis} must be {want}, got {got} "
                f"(expected shape {_fmt(spec.shape)}, got {_fmt(w.shape)})"
            )
    if max_batch_size > 0:
        batch = w.shape[0]
        if batch < 1:
            raise InvalidInput(f"input {_q(w.name)}: batch dimension must be >= 1, got {batch}")
        if batch > max_batch_size:
            raise InvalidInput(f"input {_q(w.name)}: batch size {batch} exceeds max_batch_size {max_batch_size}")


def _check_data(w: WireInput, elements: int, nbytes: int) -> None:
    if w.raw is not None:
        if len(w.raw) != nbytes:
            raise InvalidInput(
                f"input {_q(w.name)}: raw content is {len(w.raw)} bytes, expected {nbytes} "
                f"({elements} x {w.datatype} for shape {_fmt(w.shape)})"
            )
        return
    if w.contents is None:
        raise InvalidInput(f"input {_q(w.name)}: no data (set contents or raw_input_contents)")
    field = CONTENTS_FIELD.get(w.datatype)
    if field is None:
        raise InvalidInput(f"input {_q(w.name)}: {w.datatype} data travels only in raw_input_contents")
    got = len(getattr(w.contents, field))
    if got != elements:
        raise InvalidInput(
            f"input {_q(w.name)}: contents.{field} has {got} values, expected {elements} for shape {_fmt(w.shape)}"
        )


def build_inputs(
    wire: Sequence[WireInput], signature: Sequence[TensorSpec], spec: ModelSpec, model: str
) -> tuple[Tensors, int]:
    """Validate `wire` against `signature`; return the arrays and the batch size."""
    expected = {s.name: s for s in signature}
    seen: set[str] = set()
    total_bytes = 0
    batch = 0
    for w in wire:
        if w.name in seen:
            raise InvalidInput(f"input {_q(w.name)} appears more than once")
        seen.add(w.name)
        s = expected.get(w.name)
        if s is None:
            raise InvalidInput(
                f"unknown input {_q(w.name)}: model {model!r} takes {', '.join(repr(n) for n in expected)}"
            )
        if w.datatype != s.datatype:
            raise InvalidInput(f"input {_q(w.name)}: datatype must be {s.datatype}, got {_q(w.datatype, 20)}")
        _check_shape(w, s, spec.max_batch_size)
        if spec.max_batch_size > 0:
            if batch and w.shape[0] != batch:
                raise InvalidInput(
                    f"input {_q(w.name)}: batch size {w.shape[0]} differs from the other inputs' {batch}"
                )
            batch = w.shape[0]
        elements = math.prod(w.shape)
        if elements > spec.limits.max_elements:
            raise InvalidInput(
                f"input {_q(w.name)}: {elements} elements exceed the limit of {spec.limits.max_elements}"
            )
        nbytes = elements * s.dtype.itemsize
        total_bytes += nbytes
        if total_bytes > spec.limits.max_request_bytes:
            raise InvalidInput(
                f"input {_q(w.name)}: the request's inputs exceed the limit of {spec.limits.max_request_bytes} bytes"
            )
        _check_data(w, elements, nbytes)
    missing = [n for n in expected if n not in seen]
    if missing:
        raise InvalidInput(f"missing input {missing[0]!r}: model {model!r} needs {', '.join(map(repr, expected))}")
    check_shared_dims({w.name: w.shape for w in wire}, signature)
    # In the signature's order, whatever the wire's: the batcher and the shadow
    # lanes key batches on the feeds' shapes in order, so the order must not vary.
    arrays = {w.name: _to_array(w) for w in wire}
    return {s.name: arrays[s.name] for s in signature}, batch or 1


# Narrow integer types travel widened (int_contents is int32, uint_contents
# uint32): numpy would wrap out-of-range values silently, so check first.
_WIRE_DTYPE = {"INT8": np.int32, "INT16": np.int32, "UINT8": np.uint32, "UINT16": np.uint32}


def _to_array(w: WireInput) -> np.ndarray:
    dtype = NUMPY_BY_DATATYPE[w.datatype]
    if w.raw is not None:
        return np.frombuffer(w.raw, dtype=dtype).reshape(w.shape)
    values: Any = getattr(w.contents, CONTENTS_FIELD[w.datatype])
    wide = _WIRE_DTYPE.get(w.datatype)
    if wide is None:
        return np.array(values, dtype=dtype).reshape(w.shape)
    array = np.array(values, dtype=wide)
    info = np.iinfo(dtype)  # type: ignore[type-var]
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise InvalidInput(f"input {_q(w.name)}: a value is out of range for {w.datatype} ({info.min}..{info.max})")
    return array.astype(dtype).reshape(w.shape)


def check_outputs(requested: Sequence[str], signature: Sequence[TensorSpec], model: str) -> None:
    names = {s.name for s in signature}
    for name in requested:
        if name not in names:
            raise InvalidInput(
                f"unknown requested output {_q(name)}: model {model!r} has {', '.join(sorted(map(repr, names)))}"
            )
    if len(set(requested)) != len(requested):
        raise InvalidInput("an output is requested more than once")
