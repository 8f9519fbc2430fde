"""Protobuf <-> transport-neutral types. No validation against models here.

Decoding first checks the request's structure (gateway.protocol.limits): a
request is refused by counting before anything is built per tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gateway.dtypes import DATATYPE_BY_NUMPY
from gateway.errors import InvalidInput
from gateway.protocol.limits import DEFAULT_LIMITS, WireLimits, check_structure
from gateway.protocol.pb import inference_pb2 as pb
from gateway.types import InferResponse, ParamValue, WireInput, WireRequest


def decode_parameters(params: Any) -> dict[str, ParamValue]:
    out: dict[str, ParamValue] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        if which is None:
            raise InvalidInput(f"parameter {key[:80]!r} has no value")
        out[key] = getattr(value, which)
    return out


def decode_infer(
    request: pb.ModelInferRequest, deadline: float | None, limits: WireLimits = DEFAULT_LIMITS
) -> WireRequest:
    check_structure(request, limits)
    raw = request.raw_input_contents
    tensors = request.inputs
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs (one per input, in order)"
        )
    inputs = []
    for index, t in enumerate(tensors):
        has_contents = t.HasField("contents")
        if raw:
            if has_contents:
                raise InvalidInput(f"input {t.name[:80]!r}: sets contents while the request uses raw_input_contents")
            inputs.append(WireInput(t.name, t.datatype, list(t.shape), raw=raw[index]))
        else:
            inputs.append(WireInput(t.name, t.datatype, list(t.shape), contents=t.contents if has_contents else None))
    if not inputs:
        raise InvalidInput("the request has no inputs")
    return WireRequest(
        model=request.model_name,
        version=request.model_version,
        id=request.id,
        inputs=inputs,
        outputs=tuple(o.name for o in request.outputs),
        parameters=decode_parameters(request.parameters) if request.parameters else {},
        deadline=deadline,
    )


def _set_parameter(target: Any, key: str, value: ParamValue) -> None:
    slot = target[key]
    if isinstance(value, bool):
        slot.bool_param = value
    elif isinstance(value, int):
        slot.int64_param = value
    elif isinstance(value, float):
        slot.double_param = value
    else:
        slot.string_param = value


def encode_infer(response: InferResponse) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    raw = out.raw_output_contents
    for name, array in response.outputs.items():
        datatype = DATATYPE_BY_NUMPY[array.dtype]
        out.outputs.add(name=name, datatype=datatype, shape=array.shape)
        raw.append(np.ascontiguousarray(array).tobytes())
    for key, value in response.parameters.items():
        _set_parameter(out.parameters, key, value)
    return out
