"""KServe v2 JSON (and Triton's binary tensor data extension) <-> transport-neutral types.

A request is a JSON object, optionally followed by binary tensor data: the header
`Inference-Header-Content-Length` then says how many leading bytes are JSON, and
each binary input says its size in `parameters.binary_data_size`, in input order.
Every refusal is an InvalidInput naming the field, as `inputs[1].shape`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.dtypes import DATATYPE_BY_NUMPY
from gateway.errors import InvalidInput
from gateway.rest.limits import DEFAULT_LIMITS, RestLimits, check_json_structure
from gateway.rest.tensors import DATATYPES, flatten, json_type, to_bytes
from gateway.types import InferResponse, ParamValue, WireInput, WireRequest

HEADER_LENGTH = "inference-header-content-length"
# Parameters that shape the HTTP answer, not the inference: kept out of the data plane's.
BINARY_OUTPUT = "binary_data_output"
BINARY_SIZE = "binary_data_size"
BINARY = "binary_data"
_TRANSPORT_PARAMETERS = frozenset({BINARY_OUTPUT})
# Characters of a client's value an error quotes.
ECHO_CHARS = 80
_INT64 = (-(1 << 63), (1 << 64) - 1)  # int64_param or uint64_param on the gRPC side


@dataclass(frozen=True, slots=True)
class RestRequest:
    """A decoded infer request and how its answer is to be written."""

    wire: WireRequest
    # Output name -> send its data as binary; None: every output, each as `binary_default` says.
    binary_outputs: Mapping[str, bool] | None
    binary_default: bool


def _q(value: str) -> str:
    return repr(value[:ECHO_CHARS]) + ("..." if len(value) > ECHO_CHARS else "")


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: expected an object, got {json_type(value)}")
    return value


def _list(value: object, where: str, cap: int, setting: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{where}: expected an array, got {json_type(value)}")
    if len(value) > cap:
        raise InvalidInput(f"{where}: more than the limit of {cap} entries (setting {setting})")
    return value


def _string(value: object, where: str, cap: int | None = None) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: expected a string, got {json_type(value)}")
    if cap is not None and len(value.encode()) > cap:
        raise InvalidInput(f"{where}: longer than the limit of {cap} bytes")
    return value


def parameters(value: object, where: str, limits: RestLimits) -> dict[str, ParamValue]:
    """A `parameters` object: each value a bool, an integer (int64 or uint64), a number or a string."""
    params = _object(value, where)
    if len(params) > limits.max_parameters:
        raise InvalidInput(f"{where}: more than the limit of {limits.max_parameters} entries (setting max_parameters)")
    for key, item in params.items():
        if isinstance(item, bool | float | str):
            continue
        if isinstance(item, int) and _INT64[0] <= item <= _INT64[1]:
            continue
        what = "an integer out of the int64/uint64 range" if isinstance(item, int) else json_type(item)
        raise InvalidInput(f"{where}.{key[:ECHO_CHARS]}: expected a bool, number or string, got {what}")
    return params


def _shape(value: object, where: str, limits: RestLimits) -> list[int]:
    dims = _list(value, where, limits.max_rank, "max_rank")
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < 1 << 63:
            raise InvalidInput(f"{where}: expected non-negative integers, got {json_type(dim)} {str(dim)[:24]}")
    return dims


class _Binary:
    """The binary section after the JSON, handed out to inputs in order."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: object, where: str) -> bytes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{where}: expected a byte count, got {json_type(size)}")
        end = self.offset + size
        if end > len(self.data):
            raise InvalidInput(
                f"{where}: {size} bytes, but only {len(self.data) - self.offset} of the binary data are left "
                f"(check Inference-Header-Content-Length)"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk


def _input(value: object, index: int, binary: _Binary, limits: RestLimits) -> WireInput:
    where = f"inputs[{index}]"
    tensor = _object(value, where)
    name = _string(tensor.get("name"), f"{where}.name")
    datatype = _string(tensor.get("datatype"), f"{where}.datatype")
    if datatype not in DATATYPES:
        raise InvalidInput(f"{where}.datatype: {_q(datatype)} is not an Open Inference Protocol datatype")
    shape = _shape(tensor.get("shape"), f"{where}.shape", limits)
    params = parameters(tensor.get("parameters", {}), f"{where}.parameters", limits)
    size = params.get(BINARY_SIZE)
    if size is not None:
        if "data" in tensor:
            raise InvalidInput(f"{where}: has both data and parameters.binary_data_size; send one")
        raw = binary.take(size, f"{where}.parameters.binary_data_size")
    elif "data" in tensor:
        raw = to_bytes(datatype, flatten(tensor["data"], shape, f"{where}.data"), f"{where}.data")
    else:
        raise InvalidInput(f"{where}: no data (set data, or parameters.binary_data_size with binary data)")
    for unsupported in ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"):
        if unsupported in params:
            raise InvalidInput(f"{where}.parameters.{unsupported}: shared memory is not supported by this gateway")
    return WireInput(name, datatype, shape, raw=raw)


def _outputs(value: object, limits: RestLimits) -> dict[str, bool | None]:
    """Requested output name -> its own binary_data flag (None: the request's default)."""
    requested: dict[str, bool | None] = {}
    for index, item in enumerate(_list(value, "outputs", limits.max_outputs, "max_outputs")):
        where = f"outputs[{index}]"
        output = _object(item, where)
        name = _string(output.get("name"), f"{where}.name")
        if name in requested:
            raise InvalidInput(f"{where}.name: output {_q(name)} is requested more than once")
        flag = parameters(output.get("parameters", {}), f"{where}.parameters", limits).get(BINARY)
        if flag is not None and not isinstance(flag, bool):
            raise InvalidInput(f"{where}.parameters.binary_data: expected true or false, got {json_type(flag)}")
        requested[name] = flag
    return requested


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a body (all JSON without the header)."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length: {header_length[:24]!r} is not a length within the {len(body)}-byte body"
        )
    length = int(header_length)
    return body[:length], body[length:]


def decode_infer(
    body: bytes, header_length: str | None, model: str, version: str, limits: RestLimits = DEFAULT_LIMITS
) -> RestRequest:
    """Parse and check an infer request's body; the caps on its structure come first (rest/limits.py)."""
    text, rest = split_body(body, header_length)
    check_json_structure(text, limits)
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    request = _object(document, "the request body")
    request_id = _string(request.get("id", ""), "id", limits.max_id_bytes)
    params = parameters(request.get("parameters", {}), "parameters", limits)
    binary_default = params.get(BINARY_OUTPUT, False)
    if not isinstance(binary_default, bool):
        raise InvalidInput(f"parameters.binary_data_output: expected true or false, got {json_type(binary_default)}")
    binary = _Binary(rest)
    inputs = [
        _input(item, index, binary, limits)
        for index, item in enumerate(_list(request.get("inputs"), "inputs", limits.max_inputs, "max_inputs"))
    ]
    if not inputs:
        raise InvalidInput("inputs: the request has no inputs")
    if binary.offset != len(rest):
        raise InvalidInput(
            f"the body has {len(rest) - binary.offset} bytes of binary data that no input's "
            "parameters.binary_data_size accounts for"
        )
    requested = _outputs(request["outputs"], limits) if "outputs" in request else None
    wire = WireRequest(
        model=model,
        version=version,
        id=request_id,
        inputs=inputs,
        outputs=tuple(requested or ()),
        parameters={k: v for k, v in params.items() if k not in _TRANSPORT_PARAMETERS},
    )
    if requested is None:
        return RestRequest(wire, None, binary_default)
    return RestRequest(wire, {n: binary_default if f is None else f for n, f in requested.items()}, binary_default)


def encode_infer(response: InferResponse, request: RestRequest) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when binary output data follows it."""
    outputs = []
    binary = []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPE_BY_NUMPY[array.dtype], "shape": list(array.shape)}
        wanted = request.binary_default if request.binary_outputs is None else request.binary_outputs.get(name, False)
        if wanted:
            raw = array.tobytes()  # row-major, whatever the array's layout
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            binary.append(raw)
        else:
            entry["data"] = array.ravel()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model, "model_version": response.version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = outputs
    text = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return text, None
    return b"".join([text, *binary]), len(text)
