"""Caps on a REST request, checked on its bytes before anything is parsed.

The body is read up to `max_body_bytes` (the gRPC edge's max_message_bytes) and no
further. Its JSON part is then scanned without parsing: strings are cut out (C
speed, a regex), and what is left of the structure, brackets and commas, is
counted. Deep nesting is refused before a parser recurses into it, and a body
holding more values than the tensors may (max_contents_values) before it becomes
millions of Python objects: a 64 MiB body of `0,` would be 32 M ints parsed.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from gateway.config.settings import GatewaySettings
from gateway.errors import InvalidInput
from gateway.rest.status import BodyTooLarge

# The request's own structure is three levels deep ({"inputs": [{"data": ...}]}) above
# the tensor's; one more for slack. A tensor nests at most max_rank levels.
STRUCTURE_DEPTH = 4
# Separators a request needs besides its tensor values: keys, inputs, outputs, parameters.
STRUCTURE_VALUES = 4096
# The depth scan looks at the structure this many bytes at a time, so its memory stays
# bounded whatever the body (a cumulative sum costs 8 bytes a byte).
_SCAN_CHUNK = 1 << 20

# A JSON string, escapes included, as an unrolled loop: runs of plain characters are
# one single-character repeat (sre's fast path), and nothing can backtrack.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_STRUCTURAL = b"[]{},"
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in _STRUCTURAL)
_DELTA = np.zeros(256, dtype=np.int8)
_DELTA[list(b"[{")] = 1
_DELTA[list(b"]}")] = -1


@dataclass(frozen=True, slots=True)
class RestLimits:
    """The caps (the gRPC edge's settings of the same names, and max_message_bytes for the body)."""

    max_body_bytes: int
    max_inputs: int
    max_outputs: int
    max_parameters: int
    max_rank: int
    max_id_bytes: int
    max_contents_values: int

    @classmethod
    def from_settings(cls, s: GatewaySettings) -> RestLimits:
        return cls(
            max_body_bytes=s.max_message_bytes,
            max_inputs=s.max_inputs,
            max_outputs=s.max_outputs,
            max_parameters=s.max_parameters,
            max_rank=s.max_rank,
            max_id_bytes=s.max_id_bytes,
            max_contents_values=s.max_contents_values,
        )

    @property
    def max_depth(self) -> int:
        return self.max_rank + STRUCTURE_DEPTH


DEFAULT_LIMITS = RestLimits.from_settings(GatewaySettings())


def too_large(size: int | str, cap: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"the request body is {size} bytes, over the limit of {cap} "
        "(setting max_message_bytes, GATEWAY_MAX_MESSAGE_BYTES)"
    )


def check_length_header(value: str | None, cap: int) -> None:
    """Refuse a declared Content-Length over the cap before reading a byte of the body."""
    if value is None:
        return
    if not value.isdigit():
        raise InvalidInput(f"Content-Length: {value[:40]!r} is not a byte count")
    if int(value) > cap:
        raise too_large(value, cap)


def decompress(body: bytes, encoding: str, cap: int) -> bytes:
    """A gzip or deflate body (tritonclient's request_compression_algorithm), inflated to at most `cap` bytes."""
    wbits = {"gzip": 31, "deflate": 15}.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidInput(f"Content-Encoding: {encoding[:40]!r} is not supported (send gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, cap + 1)
    except zlib.error as exc:
        raise InvalidInput(f"Content-Encoding {encoding}: the body does not inflate ({exc})") from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise too_large(f"over {cap} inflated", cap)
    return out


def check_json_structure(text: bytes, limits: RestLimits) -> None:
    """Refuse JSON nested deeper, or holding more values, than the caps allow, without parsing it."""
    structure = _STRING.sub(b"", text).translate(None, _NOT_STRUCTURAL)
    separators = structure.count(b",")
    cap = limits.max_contents_values + STRUCTURE_VALUES
    if separators > cap:
        raise InvalidInput(
            f"the JSON body holds more than {cap} values: tensors may hold {limits.max_contents_values} "
            "(setting max_contents_values, GATEWAY_MAX_CONTENTS_VALUES); send large tensors as binary data"
        )
    depth = 0
    for start in range(0, len(structure), _SCAN_CHUNK):
        chunk = np.frombuffer(structure, dtype=np.uint8, count=min(_SCAN_CHUNK, len(structure) - start), offset=start)
        levels = np.cumsum(_DELTA[chunk], dtype=np.int64) + depth
        if levels.size and int(levels.max()) > limits.max_depth:
            raise InvalidInput(
                f"the JSON body nests deeper than {limits.max_depth} levels "
                f"(a tensor's data nests at most max_rank = {limits.max_rank} levels, GATEWAY_MAX_RANK)"
            )
        depth = int(levels[-1]) if levels.size else depth
