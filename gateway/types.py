"""Transport-neutral request and response types (numpy in, numpy out)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ParamValue = bool | int | float | str
Tensors = dict[str, np.ndarray]


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
