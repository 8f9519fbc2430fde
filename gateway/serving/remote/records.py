"""The records a front end and its executor exchange, and the tensor table in a slot.

Records are fixed-size structs, one per SEQPACKET message (the socket keeps message
boundaries, so no framing). What varies in size (how many tensors, their ranks) lives
in the slot itself, as a table ahead of the data: the record stays small whatever the
model, and the executor reads shapes from memory it has mapped anyway.

A slot's layout, for a request's inputs and then, overwritten, for its outputs:

    entry 0 .. entry n-1    TABLE_ENTRY (dtype code, rank, data offset, data bytes)
                            followed by `rank` int64 dimensions each
    data, each tensor at an offset aligned to ALIGN bytes (row-major, little-endian)

An error reply instead carries its message, UTF-8, at the start of the slot.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import numpy as np

from gateway.dtypes import NUMPY_BY_DATATYPE
from gateway.errors import (
    DeadlineExceeded,
    Draining,
    GatewayError,
    InvalidInput,
    ModelExecutionError,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    QueueTimeout,
    ShadowLate,
    ShadowShed,
)

# Record kinds (the first byte of every record).
REQUEST: Final = 1
CANCEL: Final = 2
REPLY: Final = 3
HELLO: Final = 4  # executor -> front end, once: the versions served, as JSON after the kind byte
ARENA: Final = 5  # front end -> executor, once: the arena's geometry, with its memfd attached
# Front end -> executor, a request record with no tensors: the version's statistics (the
# executor's batcher counts every front end's runs), answered as an OK reply whose two
# int64 tensors, STATS_COUNTERS and one (batch size, count, ns) row per size, are in the slot.
STATS: Final = 6
# Run-time loads (gateway.serving.remote.catalog). LOAD: a request record whose one uint8
# tensor is the model's name, answered by an OK reply whose one uint8 tensor is the JSON list
# of its versions (as in HELLO). HOLD and RELEASE (no reply): a front end's executor of a
# version was made or closed; a version no one holds is retired.
LOAD: Final = 7
HOLD: Final = 8
RELEASE: Final = 9

# Request flags.
TRACED: Final = 1  # the reply carries the batch's times (types.RunTiming)
# A shadow copy: the executor runs it only while no primary request is in it (server.ShadowGate).
SHADOW: Final = 2

# Every record on the channel is RECORD_BYTES long, so one message may carry several
# (gateway.serving.remote.channel sends those of one loop pass together).
RECORD_BYTES: Final = 64
# kind, flags, tensor count, slot, sequence number, version id, rows, deadline, timeout.
# deadline is time.monotonic() (CLOCK_MONOTONIC, one clock for every process on the host);
# NO_TIME where there is none, as for the timeout.
REQUEST_RECORD: Final = struct.Struct("<BBHIQIIdd24x")
# kind, code, output count, slot, sequence number, message bytes, batch rows, batch requests,
# then the batch's times for a traced request: enqueued, dequeued (monotonic), started, ended (ns).
REPLY_RECORD: Final = struct.Struct("<BBHIQIIIxxxxddqq")
ARENA_RECORD: Final = struct.Struct("<BxxxIQ")  # kind, slot count, slot bytes (sent alone, with the memfd)
if not REQUEST_RECORD.size == REPLY_RECORD.size == RECORD_BYTES:
    raise ImportError("the request and reply records must be RECORD_BYTES long")
NO_TIME: Final = -1.0

# Dtype code, rank, data offset from the slot's start, data bytes; then `rank` int64 dimensions.
TABLE_ENTRY: Final = struct.Struct("<BBxxxxxxQQ")  # the fixed part of an entry
DIM: Final = struct.Struct("<q")
ALIGN: Final = 64  # a cache line: numpy and onnxruntime read aligned rows faster
MAX_RANK: Final = 32

DTYPES: Final[tuple[np.dtype[Any], ...]] = tuple(NUMPY_BY_DATATYPE.values())
_DTYPE_CODE: Final[dict[np.dtype[Any], int]] = {d: i for i, d in enumerate(DTYPES)}

# Reply codes: OK, then one per error class that crosses the boundary (the front end
# raises the same class, so callers cannot tell a remote run from a local one).
OK: Final = 0
CANCELLED: Final = 1  # the final reply to a cancel: the request was never answered
INTERNAL: Final = 2  # any other exception in the executor (its log has the details)
# A subclass comes before its base: the first match names the code.
_ERRORS: Final[tuple[type[GatewayError], ...]] = (
    InvalidInput,
    ModelNotFound,
    ShadowShed,
    Overloaded,
    QueueTimeout,
    ShadowLate,
    DeadlineExceeded,
    Draining,
    ModelExecutionError,
    ModelLoadError,
)
_FIRST_ERROR: Final = 3


class Request(NamedTuple):
    kind: int
    flags: int
    tensors: int
    slot: int
    seq: int
    version: int
    rows: int
    deadline: float
    timeout: float


class Reply(NamedTuple):
    kind: int
    code: int
    tensors: int
    slot: int
    seq: int
    message_bytes: int
    rows: int
    requests: int
    enqueued: float
    dequeued: float
    started_ns: int
    ended_ns: int


class SlotTooSmall(Exception):
    """What must go into a slot does not fit in it."""

    def __init__(self, needed: int, size: int) -> None:
        super().__init__(f"{needed} bytes do not fit in a shared-memory slot of {size} bytes")
        self.needed, self.size = needed, size


def encode_request(
    slot: int,
    seq: int,
    version: int,
    count: int,
    rows: int,
    deadline: float | None,
    timeout_s: float | None,
    traced: bool = False,
    shadow: bool = False,
) -> bytes:
    return REQUEST_RECORD.pack(
        REQUEST,
        (TRACED if traced else 0) | (SHADOW if shadow else 0),
        count,
        slot,
        seq,
        version,
        rows,
        NO_TIME if deadline is None else deadline,
        NO_TIME if timeout_s is None else timeout_s,
    )


# The first statistics tensor: execution count, then count and ns of compute and of queue.
STATS_COUNTERS: Final = ("execution_count", "compute_count", "compute_ns", "queue_count", "queue_ns")


def encode_stats(slot: int, seq: int, version: int) -> bytes:
    return REQUEST_RECORD.pack(STATS, 0, 0, slot, seq, version, 0, NO_TIME, NO_TIME)


def encode_load(slot: int, seq: int) -> bytes:
    return REQUEST_RECORD.pack(LOAD, 0, 1, slot, seq, 0, 0, NO_TIME, NO_TIME)


def encode_hold(version: int, held: bool) -> bytes:
    """HOLD (`held`) or RELEASE of a version id."""
    return REQUEST_RECORD.pack(HOLD if held else RELEASE, 0, 0, 0, 0, version, 0, NO_TIME, NO_TIME)


def encode_cancel(slot: int, seq: int) -> bytes:
    return REQUEST_RECORD.pack(CANCEL, 0, 0, slot, seq, 0, 0, NO_TIME, NO_TIME)


def decode_request(data: bytes | memoryview) -> Request:
    return Request._make(REQUEST_RECORD.unpack_from(data))


def optional_time(value: float) -> float | None:
    return None if value < 0 else value


def encode_reply(
    slot: int,
    seq: int,
    code: int,
    count: int = 0,
    message_bytes: int = 0,
    timing: tuple[int, int, float, float, int, int] = (0, 0, 0.0, 0.0, 0, 0),
) -> bytes:
    """`timing`: rows, requests, enqueued, dequeued, started_ns, ended_ns of the request's batch."""
    return REPLY_RECORD.pack(REPLY, code, count, slot, seq, message_bytes, *timing)


def decode_reply(data: bytes | memoryview) -> Reply:
    return Reply._make(REPLY_RECORD.unpack_from(data))


def encode_arena(slots: int, slot_bytes: int) -> bytes:
    return ARENA_RECORD.pack(ARENA, slots, slot_bytes)


def decode_arena(data: bytes | memoryview) -> tuple[int, int]:
    kind, slots, slot_bytes = ARENA_RECORD.unpack_from(data)
    if kind != ARENA:
        raise ValueError(f"expected an arena record, got kind {kind}")
    return slots, slot_bytes


# -- errors --------------------------------------------------------------------------


def error_code(exc: BaseException) -> int:
    for i, cls in enumerate(_ERRORS):
        if isinstance(exc, cls):
            return _FIRST_ERROR + i
    return INTERNAL


def error_for(code: int, message: str) -> GatewayError:
    """The exception a reply's error code stands for, with the executor's message."""
    index = code - _FIRST_ERROR
    if 0 <= index < len(_ERRORS):
        return _ERRORS[index](message)
    return ModelExecutionError(message or "the executor failed to run the request")


# -- the tensor table ----------------------------------------------------------------


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout(tensors: Sequence[tuple[int, int]]) -> tuple[list[int], int]:
    """Each tensor's data offset within a slot, and the bytes the table and data take.

    `tensors`: each one's rank and data bytes."""
    end = sum(TABLE_ENTRY.size + DIM.size * rank for rank, _ in tensors)
    offsets = []
    for _, nbytes in tensors:
        start = _aligned(end)
        offsets.append(start)
        end = start + nbytes
    return offsets, end


def _entry(rank: int) -> struct.Struct:
    """A table entry with its `rank` dimensions, as one struct (cached: one pack or unpack an entry)."""
    entry = _ENTRIES.get(rank)
    if entry is None:
        entry = _ENTRIES[rank] = struct.Struct(TABLE_ENTRY.format + f"{rank}q")
    return entry


_ENTRIES: dict[int, struct.Struct] = {}


def write_tensors(buffer: memoryview, base: int, size: int, arrays: Sequence[np.ndarray]) -> None:
    """Lay `arrays` out in the slot at `base` (`size` bytes): the table, then each array's data.

    The data is copied once, straight into shared memory. Raises SlotTooSmall
    before writing anything when they do not fit, and TypeError for a dtype that
    has no code (object or string arrays cannot live in shared memory)."""
    # One pass to place everything (the per-request hot path: no helper calls).
    end = TABLE_ENTRY.size * len(arrays)
    for a in arrays:
        end += DIM.size * a.ndim
    offsets = []
    for a in arrays:
        start = (end + ALIGN - 1) // ALIGN * ALIGN
        offsets.append(start)
        end = start + a.nbytes
    if end > size:
        raise SlotTooSmall(end, size)
    at = base
    for a, offset in zip(arrays, offsets, strict=True):
        code = _DTYPE_CODE.get(a.dtype)
        if code is None:
            raise TypeError(f"dtype {a.dtype} cannot be carried in shared memory")
        entry = _ENTRIES.get(a.ndim) or _entry(a.ndim)
        entry.pack_into(buffer, at, code, a.ndim, offset, a.nbytes, *a.shape)
        at += entry.size
        if a.nbytes:
            start = base + offset
            data = a.data if a.flags.c_contiguous else np.ascontiguousarray(a).data
            buffer[start : start + a.nbytes] = data.cast("B")


def read_tensors(buffer: memoryview, base: int, size: int, count: int) -> list[np.ndarray]:
    """Views (no copy) of the `count` tensors in the slot at `base`; ValueError if the table is bad.

    Every offset and size is checked against the slot: a buggy peer must not make
    this process read another slot, or past the arena."""
    arrays: list[np.ndarray] = []
    at = base
    end = base + size
    for _ in range(count):
        if at + TABLE_ENTRY.size > end:
            raise ValueError("the tensor table runs past the slot")
        rank = buffer[at + 1]
        if rank > MAX_RANK:
            raise ValueError(f"tensor {len(arrays)}: rank {rank} is past the limit of {MAX_RANK}")
        entry = _ENTRIES.get(rank) or _entry(rank)
        if at + entry.size > end:
            raise ValueError("the tensor table runs past the slot")
        code, _, offset, nbytes, *shape = entry.unpack_from(buffer, at)
        at += entry.size
        if code >= len(DTYPES):
            raise ValueError(f"tensor {len(arrays)}: unknown dtype code {code}")
        dtype = DTYPES[code]
        if min(shape, default=0) < 0 or math.prod(shape) * dtype.itemsize != nbytes or offset + nbytes > size:
            raise ValueError(f"tensor {len(arrays)}: shape {shape} does not match its {nbytes} bytes in the slot")
        # np.frombuffer, not np.ndarray(buffer=...): only it holds the buffer, so the arena's
        # mapping cannot be closed under a live view (that would be a segfault, not an error).
        arrays.append(np.frombuffer(buffer, dtype, nbytes // dtype.itemsize, base + offset).reshape(shape))
    return arrays


def write_message(buffer: memoryview, base: int, size: int, message: str) -> int:
    """An error's message at the slot's start (cut to fit); returns its length in bytes."""
    data = message.encode("utf-8", "replace")[: min(size, 4096)]
    buffer[base : base + len(data)] = data
    return len(data)


def read_message(buffer: memoryview, base: int, length: int) -> str:
    return bytes(buffer[base : base + length]).decode("utf-8", "replace")
