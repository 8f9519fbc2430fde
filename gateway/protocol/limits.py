"""Caps on one inference request's structure, checked before anything is built from it.

One 4 MiB ModelInfer can carry ~2 M empty input tensors. Building a Python
object per tensor froze the event loop for ~9 s and kept ~460 MB; even protobuf's
own parse of such a message takes ~85 bytes a tensor (~170 MB for 4 MiB, and the
allocator keeps it). So a request's serialized bytes are scanned first, field by
field without building anything, and the scan stops at the first cap exceeded:
at most a few hundred fields are looked at, whatever the message holds. A request
the scan cannot read to its end is refused too (malformed bytes, or groups, which
protobuf parses but no proto3 client writes): a scan that stopped early would bound
nothing, and one group before 33 M empty tensors had protobuf parse them all (3 GB).
Typed contents are counted as well (see `_Contents`): 33 M empty bytes_contents
entries in one tensor parsed into 1.1 GB. Only a request within every cap is then
parsed (`InferRequestParser`). `check_structure`
repeats the count checks on a parsed message (len() of repeated and map fields
is O(1)) for requests that arrive already parsed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from gateway.config.settings import GatewaySettings
from gateway.errors import InvalidInput
from gateway.protocol.pb import inference_pb2 as pb

# Model names are folder names (at most 255 bytes on common filesystems) and
# versions short numbers: a longer one names nothing, and refusing it here keeps
# every later "not found" message, which quotes it, small.
MAX_NAME_BYTES = 256
# Fields of a message other than those capped by name (a name, an id, a datatype,
# contents, fields this gateway does not know): a real client sends a handful.
MAX_OTHER_FIELDS = 64
# Characters of an input's name an error quotes (as gateway.serving.validation clips them).
ECHO_CHARS = 80
# Typed contents values encoded one by one (bytes_contents entries, numbers a
# proto3 encoder would have packed) per request. Each is a field the scan walks
# in Python and protobuf parses into an object of its own (an empty bytes entry:
# 2 bytes on the wire, ~35 bytes parsed, so 64 MiB of them took 1.1 GB and
# seconds); packed numbers are counted without being read and are capped only by
# max_contents_values. No BYTES tensor is served, and numbers come packed.
MAX_SEPARATE_VALUES = 16_384
# Requests up to this size are parsed without the scan (InferRequestParser.parse).
# The bound keeps what a parse can build small: at most ~8 k fields of two bytes,
# ~0.7 MB parsed, so no cap above is reachable by parsing alone, and fewer
# separate values than MAX_SEPARATE_VALUES fit. One-row requests of the bundled
# models (0.3-3 KB) are well under it.
SCAN_ABOVE_BYTES = 16 * 1024

# Field numbers, from protos/inference.proto (ModelInferRequest and its nested messages).
_NAME, _VERSION, _ID, _PARAMETERS, _INPUTS, _OUTPUTS, _RAW = 1, 2, 3, 4, 5, 6, 7
_TENSOR_NAME, _TENSOR_SHAPE, _TENSOR_PARAMETERS, _TENSOR_CONTENTS = 1, 3, 4, 5
_OUTPUT_PARAMETERS = 2
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True, slots=True)
class WireLimits:
    """The caps (settings of the same names; defaults and why in `GatewaySettings`).

    Total shape entries are bounded by max_inputs x max_rank (4,096 by default),
    so they need no cap of their own."""

    max_inputs: int
    max_outputs: int
    max_parameters: int
    max_rank: int
    max_id_bytes: int
    max_contents_values: int
    max_separate_values: int = MAX_SEPARATE_VALUES

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> WireLimits:
        return cls(
            max_inputs=settings.max_inputs,
            max_outputs=settings.max_outputs,
            max_parameters=settings.max_parameters,
            max_rank=settings.max_rank,
            max_id_bytes=settings.max_id_bytes,
            max_contents_values=settings.max_contents_values,
        )


DEFAULT_LIMITS = WireLimits.from_settings(GatewaySettings())


def over_limit(field_name: str, cap: int, unit: str, setting: str = "") -> InvalidInput:
    """The refusal for a field over its cap, naming the field, the cap and the setting that moves it."""
    where = f" (setting {setting}, GATEWAY_{setting.upper()})" if setting else ""
    return InvalidInput(f"{field_name}: more than the limit of {cap} {unit}{where}")


def _id_over(cap: int) -> InvalidInput:
    # Refused, not hashed: the id is echoed in the answer and joined with feedback
    # labels, so a silently rewritten id would break both.
    error = over_limit("id", cap, "bytes", "max_id_bytes")
    return InvalidInput(f"{error}: send a short key such as a UUID, or a hash of the long one")


def _utf8_over(value: str, cap: int) -> bool:
    # A str's length in characters is a lower bound of its UTF-8 length: only a
    # value that may fit is encoded (a 60 MB id is refused without a copy).
    return len(value) > cap or len(value.encode()) > cap


def check_structure(request: pb.ModelInferRequest, limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Refuse a parsed request whose counts exceed `limits`, before anything is built from it."""
    if len(request.inputs) > limits.max_inputs:
        raise over_limit("inputs", limits.max_inputs, "tensors", "max_inputs")
    if len(request.raw_input_contents) > limits.max_inputs:
        raise over_limit("raw_input_contents", limits.max_inputs, "entries", "max_inputs")
    if len(request.outputs) > limits.max_outputs:
        raise over_limit("outputs", limits.max_outputs, "requested outputs", "max_outputs")
    if len(request.parameters) > limits.max_parameters:
        raise over_limit("parameters", limits.max_parameters, "entries", "max_parameters")
    if _utf8_over(request.id, limits.max_id_bytes):
        raise _id_over(limits.max_id_bytes)
    if _utf8_over(request.model_name, MAX_NAME_BYTES):
        raise over_limit("model_name", MAX_NAME_BYTES, "bytes")
    if _utf8_over(request.model_version, MAX_NAME_BYTES):
        raise over_limit("model_version", MAX_NAME_BYTES, "bytes")
    contents: _Contents | None = None  # made for the first tensor that has typed contents
    for index, tensor in enumerate(request.inputs):
        if len(tensor.shape) > limits.max_rank:
            raise over_limit(f"inputs[{index}].shape", limits.max_rank, "dimensions", "max_rank")
        if len(tensor.parameters) > limits.max_parameters:
            raise over_limit(f"inputs[{index}].parameters", limits.max_parameters, "entries", "max_parameters")
        if tensor.HasField("contents"):
            if contents is None:
                contents = _Contents(limits)
            # A parsed message no longer says which numbers came packed: only bytes entries count as separate.
            counts = {name: len(getattr(tensor.contents, name)) for name in _CONTENTS_NAMES}
            for name, count in counts.items():
                contents.take(f"inputs[{index}].contents", count, separate=name == "bytes_contents")
            where = _input_label(index, tensor.name)
            _check_holds(where, list(tensor.shape), {n: c for n, c in counts.items() if c})
    for index, output in enumerate(request.outputs):
        if len(output.parameters) > limits.max_parameters:
            raise over_limit(f"outputs[{index}].parameters", limits.max_parameters, "entries", "max_parameters")


class MalformedRequest(ValueError):
    """The bytes are not a protobuf message the scan can bound: malformed, or in the group wire
    format, which protobuf still parses (no proto3 encoder writes it) but the scan cannot look
    past. Refused rather than parsed: an unbounded parse is exactly what the scan is for.
    Not an InvalidInput: it is answered (and logged, throttled) like protobuf's own
    DecodeError, as a message that does not parse, with this reason."""


# Wire types 3 and 4 open and close a group.
_GROUP_TYPES = frozenset({3, 4})
# What is deleted to count the varints of a packed chunk: one ends at each byte below 0x80.
_CONTINUATION_BYTES = bytes(range(0x80, 0x100))


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    if pos < len(data) and data[pos] < 0x80:  # the common case: one byte
        return data[pos], pos + 1
    result = shift = 0
    for index in range(pos, min(pos + _MAX_VARINT_BYTES, len(data))):
        byte = data[index]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, index + 1
        shift += 7
    raise MalformedRequest(f"the varint at byte {pos} is cut off or longer than {_MAX_VARINT_BYTES} bytes")


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in data[start:end]."""
    pos = start
    while pos < end:
        tag_at = pos
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _LENGTH:
            length, value_start = _varint(data, pos)
            pos = value_start + length
        elif wire_type == _VARINT:
            value_start = pos
            _, pos = _varint(data, pos)
        elif wire_type == _FIXED64:
            value_start, pos = pos, pos + 8
        elif wire_type == _FIXED32:
            value_start, pos = pos, pos + 4
        elif wire_type in _GROUP_TYPES:
            raise MalformedRequest(
                f"field {number} at byte {tag_at} uses the group wire format (wire type {wire_type}), "
                "which proto3 messages never carry"
            )
        else:
            raise MalformedRequest(f"field {number} at byte {tag_at} has wire type {wire_type}, which does not exist")
        if pos > end:
            raise MalformedRequest(f"field {number} at byte {tag_at} runs past the end of its message")
        yield number, wire_type, value_start, pos


class _Counter:
    """Counts one message's fields by kind and refuses at the first count over its cap."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.counts: dict[str, int] = {}

    def add(self, kind: str, cap: int, unit: str, setting: str = "", by: int = 1) -> int:
        count = self.counts.get(kind, 0) + by
        self.counts[kind] = count
        if count > cap:
            raise over_limit(f"{self.where}{kind}", cap, unit, setting)
        return count

    def other(self) -> None:
        self.add("(other fields)", MAX_OTHER_FIELDS, "fields")


def _packed_count(data: bytes, start: int, end: int, cap: int) -> int:
    """How many varints data[start:end] packs, or cap + 1 when that is more than cap.

    A varint is at most 10 bytes, so a chunk longer than 10 x (cap + 1) holds more
    than cap whatever it holds; a shorter one is counted in C (the bytes below 0x80)."""
    if end - start > _MAX_VARINT_BYTES * (cap + 1):
        return cap + 1
    if start < end and data[end - 1] >= 0x80:
        raise MalformedRequest(f"the packed varints ending at byte {end} end in the middle of one")
    return len(data[start:end].translate(None, _CONTINUATION_BYTES))


def _packed_varints(data: bytes, start: int, end: int) -> list[int]:
    """The int64 values packed in data[start:end] (called once their count is known to be small)."""
    values = []
    pos = start
    while pos < end:
        value, pos = _varint(data, pos)
        values.append(value - (1 << 64) if value >= 1 << 63 else value)
    return values


def _fmt_shape(dims: list[int]) -> str:
    shown = ", ".join(str(d) for d in dims[:8])
    return "[" + shown + (f", ... ({len(dims)} dimensions)" if len(dims) > 8 else "") + "]"


class _Contents:
    """The typed contents of one request's tensors: the values all of them carry together are
    capped (max_contents_values; packed values are counted without being read), values encoded one
    by one (unpacked numbers, bytes_contents entries) more tightly, as the scan walks each of them,
    and each tensor's values per field by the number of elements its shape holds."""

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        self.values = 0
        self.separate = 0

    def take(self, where: str, count: int, separate: bool) -> None:
        self.values += count
        if self.values > self.limits.max_contents_values:
            error = over_limit(
                where, self.limits.max_contents_values, "typed values per request", "max_contents_values"
            )
            raise InvalidInput(f"{error}: send large tensors in raw_input_contents")
        if separate:
            self.separate += count
            if self.separate > self.limits.max_separate_values:
                raise InvalidInput(
                    f"{where}: more than the limit of {self.limits.max_separate_values} values encoded one by one "
                    "(unpacked numbers, bytes_contents entries) per request: send numbers packed, as proto3 "
                    "encoders do, or the tensor in raw_input_contents"
                )

    def room(self) -> int:
        return self.limits.max_contents_values - self.values

    def scan(self, data: bytes, start: int, end: int, index: int, counts: dict[str, int]) -> None:
        """Count the values of one `contents` field of inputs[index] into `counts` (per contents field)."""
        where = f"inputs[{index}].contents"
        counter = _Counter(f"{where}.")
        for number, wire_type, value_start, value_end in _fields(data, start, end):
            kind = _CONTENTS_FIELDS.get(number)
            if kind is None:
                counter.other()
                continue
            name, value_type = kind
            if wire_type == _LENGTH and value_type != _LENGTH:  # packed numbers
                count = _packed_values(data, value_start, value_end, value_type, self.room())
                self.take(where, count, separate=False)
            elif wire_type == value_type:  # one number, or one bytes_contents entry
                count = 1
                self.take(where, count, separate=True)
            else:  # a known number in the wrong wire type: protobuf keeps it as an unknown field
                counter.other()
                continue
            counts[name] = counts.get(name, 0) + count


# InferTensorContents: field number -> (name, wire type of one value).
_CONTENTS_FIELDS = {
    1: ("bool_contents", _VARINT),
    2: ("int_contents", _VARINT),
    3: ("int64_contents", _VARINT),
    4: ("uint_contents", _VARINT),
    5: ("uint64_contents", _VARINT),
    6: ("fp32_contents", _FIXED32),
    7: ("fp64_contents", _FIXED64),
    8: ("bytes_contents", _LENGTH),
}
_CONTENTS_NAMES = tuple(name for name, _ in _CONTENTS_FIELDS.values())
_FIXED_SIZE = {_FIXED32: 4, _FIXED64: 8}


def _packed_values(data: bytes, start: int, end: int, value_type: int, room: int) -> int:
    size = _FIXED_SIZE.get(value_type)
    if size is None:
        return _packed_count(data, start, end, room)
    if (end - start) % size:
        raise MalformedRequest(f"the packed values at byte {start} are not a whole number of {size}-byte values")
    return (end - start) // size


def _input_label(index: int, name: str) -> str:
    """How an error names an input: its name, clipped as validation clips it, and its index."""
    shown = repr(name[:ECHO_CHARS]) + ("..." if len(name) > ECHO_CHARS else "")
    return f"input {shown} (inputs[{index}])"


def _check_holds(where: str, dims: list[int], counts: dict[str, int]) -> None:
    """Refuse contents with more values in a field than the tensor's shape holds (they can never
    match it); fewer are left to the check against the model, which names what it expects."""
    if not counts or any(d < 0 for d in dims):  # a negative dimension is refused, named, at validation
        return
    holds = math.prod(dims)
    for name, count in counts.items():
        if count > holds:
            raise InvalidInput(
                f"{where}: contents.{name} has {count} values, more than the {holds} its shape {_fmt_shape(dims)} holds"
            )


def _scan_tensor(data: bytes, start: int, end: int, index: int, limits: WireLimits, contents: _Contents) -> None:
    counter = _Counter(f"inputs[{index}].")
    dims: list[int] = []
    counts: dict[str, int] = {}
    name = b""
    for number, wire_type, value_start, value_end in _fields(data, start, end):
        if number == _TENSOR_NAME and wire_type == _LENGTH:
            counter.other()
            name = data[value_start : min(value_end, value_start + 4 * ECHO_CHARS + 4)]
        elif number == _TENSOR_SHAPE:
            if wire_type not in (_VARINT, _LENGTH):  # protobuf keeps it as an unknown field
                counter.other()
                continue
            rank = 1 if wire_type == _VARINT else _packed_count(data, value_start, value_end, limits.max_rank)
            counter.add("shape", limits.max_rank, "dimensions", "max_rank", by=rank)
            dims.extend(_packed_varints(data, value_start, value_end))
        elif number == _TENSOR_PARAMETERS:
            counter.add("parameters", limits.max_parameters, "entries", "max_parameters")
        elif number == _TENSOR_CONTENTS and wire_type == _LENGTH:
            contents.scan(data, value_start, value_end, index, counts)
        else:
            counter.other()
    # After the whole tensor: its shape may come after its contents.
    _check_holds(_input_label(index, name.decode(errors="replace")), dims, counts)


def _scan_output(data: bytes, start: int, end: int, index: int, limits: WireLimits) -> None:
    counter = _Counter(f"outputs[{index}].")
    for number, _, _, _ in _fields(data, start, end):
        if number == _OUTPUT_PARAMETERS:
            counter.add("parameters", limits.max_parameters, "entries", "max_parameters")
        else:
            counter.other()


def _scan_request(data: bytes, limits: WireLimits) -> None:
    counter = _Counter("")
    contents = _Contents(limits)
    for number, wire_type, start, end in _fields(data, 0, len(data)):
        if number == _INPUTS and wire_type == _LENGTH:
            index = counter.add("inputs", limits.max_inputs, "tensors", "max_inputs") - 1
            _scan_tensor(data, start, end, index, limits, contents)
        elif number == _OUTPUTS and wire_type == _LENGTH:
            index = counter.add("outputs", limits.max_outputs, "requested outputs", "max_outputs") - 1
            _scan_output(data, start, end, index, limits)
        elif number == _RAW:
            counter.add("raw_input_contents", limits.max_inputs, "entries", "max_inputs")
        elif number == _PARAMETERS:
            counter.add("parameters", limits.max_parameters, "entries", "max_parameters")
        else:
            counter.other()
            # A string's length prefix is its UTF-8 length: checked without decoding it.
            if number == _ID and end - start > limits.max_id_bytes:
                raise _id_over(limits.max_id_bytes)
            if number in (_NAME, _VERSION) and end - start > MAX_NAME_BYTES:
                raise over_limit("model_name" if number == _NAME else "model_version", MAX_NAME_BYTES, "bytes")


def scan_infer_request(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Refuse a serialized ModelInferRequest over `limits` (InvalidInput) without parsing it.

    Bytes the scan cannot read to the end (malformed, or groups) are refused too
    (MalformedRequest): a scan that stopped early bounds nothing, and protobuf
    would parse whatever follows."""
    _scan_request(data, limits)


@dataclass(frozen=True, slots=True)
class InferRequestParser:
    """grpc's request deserializer for ModelInfer and ModelStreamInfer: scan, then parse."""

    limits: WireLimits = DEFAULT_LIMITS
    # What the message is, for errors that name it (as on a generated `FromString`).
    DESCRIPTOR: ClassVar[object] = pb.ModelInferRequest.DESCRIPTOR

    def parse(self, data: bytes) -> pb.ModelInferRequest:
        # A small message needs no scan: whatever it holds, protobuf parses it in
        # bounded time and memory, and decode_infer's check_structure then applies
        # every cap to the parsed message. The scan costs ~7 us a request in Python,
        # a fifth of the gateway's own work on a one-row request.
        if len(data) > SCAN_ABOVE_BYTES:
            scan_infer_request(data, self.limits)
            request: pb.ModelInferRequest = pb.ModelInferRequest.FromString(data)
            return request
        try:
            parsed: pb.ModelInferRequest = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            scan_infer_request(data, self.limits)  # raises, naming what is wrong, where it can
            raise
        return parsed


_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INFER_METHODS = (f"/{_SERVICE}/ModelInfer", f"/{_SERVICE}/ModelStreamInfer")


def infer_parsers(limits: WireLimits) -> dict[str, Callable[[bytes], pb.ModelInferRequest]]:
    """The deserializers of the methods that carry a ModelInferRequest, by gRPC method path."""
    parser = InferRequestParser(limits).parse
    return dict.fromkeys(INFER_METHODS, parser)
