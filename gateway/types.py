"""Transport-neutral request and response types (numpy in, numpy out)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.dtypes import DATATYPE_BY_ONNX, NUMPY_BY_DATATYPE

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

ParamValue = bool | int | float | str
Tensors = dict[str, np.ndarray]
# A request's transport metadata (gRPC metadata, HTTP headers) as (lower-case name, value)
# pairs, read only when a routing rule needs it: each edge passes a bound method
# (grpc's invocation_metadata, Starlette's headers.items), so a request of a model
# without header rules pays for no copy of its headers.
HeaderSource = Callable[[], Iterable[tuple[str, Any]]]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model as the ONNX graph declares it: the one signature type.

    The gateway validates requests against it, the CUDA runner sizes its buffers
    from it, and the load tests and the load-test gate generate inputs from it.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a variable dimension
    # The graph's name for each variable dimension ("" where fixed or unnamed; empty
    # when not known). In ONNX, dimensions with the same name have the same size.
    symbols: tuple[str, ...] = ()

    @classmethod
    def from_onnx(cls, arg: Any) -> TensorSpec | None:
        """From an onnxruntime NodeArg (`name`, `type`, `shape`); None when the protocol has no datatype for it."""
        datatype = DATATYPE_BY_ONNX.get(arg.type)
        if datatype is None:
            return None
        dims = list(arg.shape or [])
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
        symbols = tuple(d if isinstance(d, str) else "" for d in dims)
        return cls(arg.name, datatype, shape, symbols)

    @property
    def dtype(self) -> np.dtype[Any]:
        return NUMPY_BY_DATATYPE[self.datatype]

    @property
    def batched(self) -> bool:
        """Whether the first dimension is variable: the one requests are batched along."""
        return bool(self.shape) and self.shape[0] < 0

    @property
    def trailing(self) -> tuple[int, ...] | None:
        """The dimensions after a variable batch dimension when all of them are fixed, else None."""
        if not self.batched or any(d < 0 for d in self.shape[1:]):
            return None
        return self.shape[1:]

    def concrete_shape(self, rows: int) -> tuple[int, ...]:
        """A shape to send: the variable batch dimension is `rows`, any other variable one 1."""
        return tuple(rows if d < 0 and i == 0 else 1 if d < 0 else d for i, d in enumerate(self.shape))


def random_inputs(signature: Sequence[TensorSpec], rows: int, rng: np.random.Generator) -> Tensors:
    """Inputs for `rows` rows that fit `signature`: the one input generator (load tests, the gate, tests).

    Floats are uniform in [0, 1); every other type is zero, which is valid wherever
    an integer input is an index or a flag. The draws depend only on `rng`, so the
    same seed gives the same inputs.
    """
    feeds: Tensors = {}
    for spec in signature:
        shape = spec.concrete_shape(rows)
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.random(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


# Traffic weights are whole basis points (1/100 of a percent) everywhere: model.toml,
# the control API, the stored release. The scale is here so that every layer names it.
BASIS_POINTS = 10_000


@dataclass(slots=True)
class InferResponse:
    model: str
    version: str
    outputs: Tensors
    id: str = ""
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(slots=True)
class WireInput:
    """One input as it arrived, before validation builds a numpy array from it.

    Exactly one of `raw` (row-major bytes) and `contents` (a sequence of typed
    values) is set; the codec guarantees it.
    """

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None
    contents: object | None = None  # the InferTensorContents message


@dataclass(slots=True)
class WireRequest:
    """A ModelInferRequest decoded from the wire but not yet checked against a model."""

    model: str
    version: str
    id: str
    inputs: list[WireInput]
    outputs: tuple[str, ...]
    parameters: dict[str, ParamValue]
    deadline: float | None = None
    headers: HeaderSource | None = None  # None: a caller without transport metadata (tests, replay)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRun:
    """One request as it ran on a version: what went in, what came out, how long it took.

    The release plane records it as evidence, and a shadow copy runs the same
    feeds on another version and is compared with these outputs.
    """

    request_id: str
    feeds: Tensors
    rows: int
    outputs: Sequence[np.ndarray] = ()  # none when the run failed
    seconds: float
    deadline: float | None = None  # time.monotonic(); a copy gets no longer than the request had
    trace: SpanContext | None = None  # the request's span when it was traced: a shadow copy's spans link to it


@dataclass(slots=True)
class RunTiming:
    """When one traced request waited and ran, as its executor saw it (gateway.tracing makes spans of it).

    An executor is given one only for a traced request, and writes into it times it reads
    anyway (once per batch), so tracing adds no clock read to the batcher.
    """

    enqueued: float = 0.0  # time.monotonic() when it joined the queue; 0: it never queued (ran at once)
    dequeued: float = 0.0  # time.monotonic() when its batch was taken from the queue
    started_ns: int = 0  # time.perf_counter_ns() when its batch's model run began; 0: it never ran
    ended_ns: int = 0
    rows: int = 0  # rows in that batch: the batch size
    requests: int = 0  # requests in that batch
