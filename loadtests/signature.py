"""What every load test needs of a model: its signature, a request built from it, and a check of the answer.

The signature is gateway.types.TensorSpec, read from the ONNX graph as the
gateway reads it; inputs come from gateway.types.random_inputs. The bench, its
bare server, the GPU bench, the overload soak and the Locust user all use these
helpers, so "a request for this model" and "a right answer" mean one thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.dtypes import NUMPY_BY_DATATYPE
from gateway.protocol.pb import inference_pb2 as pb
from gateway.types import Tensors, TensorSpec, random_inputs


@dataclass(frozen=True, slots=True)
class ModelSignature:
    name: str
    version: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def resolve_version(models: Path, model: str, version: str | None) -> str:
    """The version a request without a version gets: release.stable, else the highest."""
    from gateway.serving.repository import Repository

    repository = Repository(models)
    versions = repository.versions(model)
    if version:
        if version not in versions:
            raise ValueError(f"model {model!r} has no version {version!r} (has {', '.join(versions)})")
        return version
    if not versions:
        raise ValueError(f"model {model!r} has no versions under {models}")
    stable = repository.spec(model).release.stable
    return stable or versions[-1]


def _spec(arg: Any) -> TensorSpec:
    spec = TensorSpec.from_onnx(arg)
    if spec is None:
        raise ValueError(f"tensor {arg.name!r} has type {arg.type}, which the load tests cannot generate")
    return spec


def load_signature(models: Path, model: str, version: str | None = None) -> ModelSignature:
    """Inputs and outputs straight from the ONNX graph, so any model in the repository works."""
    import onnxruntime as ort

    from gateway.serving.repository import Repository

    resolved = resolve_version(models, model, version)
    path = Repository(models).version_files(model, resolved).path
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return ModelSignature(
        name=model,
        version=resolved,
        path=path,
        inputs=tuple(_spec(a) for a in session.get_inputs()),
        outputs=tuple(_spec(a) for a in session.get_outputs()),
    )


def feeds(signature: ModelSignature, rows: int, seed: int = 0) -> Tensors:
    """Deterministic inputs for `rows` rows: the same seed gives the same request."""
    return random_inputs(signature.inputs, rows, np.random.default_rng(seed))


def infer_request(model: str, version: str, inputs: Sequence[TensorSpec], values: Tensors) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying `values` for `inputs` as raw_input_contents (every output returned)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for spec in inputs:
        array = values[spec.name]
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def build_request(signature: ModelSignature, rows: int, pin_version: bool, seed: int = 0) -> bytes:
    """One serialized ModelInferRequest for `rows` rows (pinned to the signature's version, or routed)."""
    version = signature.version if pin_version else ""
    request = infer_request(signature.name, version, signature.inputs, feeds(signature, rows, seed))
    data: bytes = request.SerializeToString()
    return data


def check_response(response: pb.ModelInferResponse, outputs: Sequence[TensorSpec], rows: int) -> str | None:
    """What is wrong with an answer to a request of `rows` rows: the one response check of the load tests.

    None when it has every output in `outputs`, each batched one with `rows`
    rows, and data of the size its shape and datatype say.
    """
    got = {o.name: (i, o) for i, o in enumerate(response.outputs)}
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        return f"{len(raw)} raw_output_contents for {len(response.outputs)} outputs"
    for expected in outputs:
        if expected.name not in got:
            return f"output {expected.name!r} missing (got {sorted(got)})"
        index, tensor = got[expected.name]
        shape = list(tensor.shape)
        if expected.batched and (not shape or shape[0] != rows):
            return f"output {expected.name!r} has shape {shape}, expected {rows} rows"
        dtype = NUMPY_BY_DATATYPE.get(tensor.datatype)
        if raw and dtype is not None and len(raw[index]) != math.prod(shape) * dtype.itemsize:
            return f"output {expected.name!r}: {len(raw[index])} bytes for {tensor.datatype} {shape}"
        if not raw and not tensor.HasField("contents"):
            return f"output {expected.name!r} has no data"
    return None
