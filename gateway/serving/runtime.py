"""One onnxruntime session for one model version.

`run` is safe to call from several threads at once: onnxruntime sessions are
thread-safe and release the GIL while they compute. On CUDA every run goes
through gateway.serving.cuda.runner (IO binding, per-bucket buffers, CUDA graphs when
the session was created with them).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gateway.dtypes import DATATYPE_BY_ONNX
from gateway.errors import InvalidInput, ModelExecutionError, ModelLoadError
from gateway.serving.cuda.runner import CudaRunner
from gateway.serving.providers import CUDA, ProviderChooser
from gateway.types import Tensors, TensorSpec

log = logging.getLogger(__name__)


# Symbol names come from the model file; a hostile one must not swell a message.
_SYMBOL_CHARS = 40


def check_shared_dims(shapes: Mapping[str, Sequence[int]], signature: Sequence[TensorSpec]) -> None:
    """Refuse a request whose dimensions that the graph names alike differ in size.

    onnxruntime does not check this itself: the run fails inside the graph (an
    INTERNAL error charged to the model) when it is the request that is wrong.
    `shapes` must already have each spec's rank (validation checks that first).
    """
    first: dict[str, tuple[str, int, int]] = {}  # symbol -> (input, axis, size) where it was first seen
    for spec in signature:
        shape = shapes.get(spec.name)
        if shape is None:
            continue
        for axis, (symbol, size) in enumerate(zip(spec.symbols, shape, strict=False)):
            if not symbol:
                continue
            seen = first.setdefault(symbol, (spec.name, axis, size))
            if seen[2] != size:
                raise InvalidInput(
                    f"input {spec.name!r}: dimension {axis} is {size}, but input {seen[0]!r} dimension {seen[1]} "
                    f"is {seen[2]}; the model names both {symbol[:_SYMBOL_CHARS]!r}, so they must be equal "
                    "(send these inputs with the same length)"
                )


def check_batchable(inputs: Sequence[TensorSpec], max_batch_size: int, model: str, path: Path) -> None:
    """Refuse `max_batch_size > 0` on a model whose inputs have no variable first dimension.

    With it, requests are validated and merged along the first dimension, so a
    fixed one would be accepted at load and fail once two requests are batched.
    """
    if max_batch_size <= 0:
        return
    for spec in inputs:
        if spec.shape and spec.shape[0] < 0:
            continue
        first = f"a fixed first dimension ({spec.shape[0]})" if spec.shape else "no dimensions"
        raise ModelLoadError(
            f"model {model!r} ({path}): input {spec.name!r} has {first}, but max_batch_size = {max_batch_size} "
            "batches requests along the first dimension; set max_batch_size = 0 in its model.toml (no batching), "
            "or export the model with a dynamic first dimension"
        )


def _tensor_spec(arg: Any, path: Path) -> TensorSpec:
    spec = TensorSpec.from_onnx(arg)
    if spec is None:
        raise ModelLoadError(f"{path}: tensor {arg.name!r} has type {arg.type}, which the gateway does not serve")
    return spec


def _servable_outputs(args: list[Any], path: Path) -> tuple[list[TensorSpec], list[str]]:
    """The outputs the protocol can carry (tensors), and the names of those it cannot.

    Our choice for the others (scikit-learn's ZipMap `seq(map(...))`, say): serve the
    model without them and say so once, rather than refuse a model whose other
    outputs are fine. A model with no tensor output at all cannot serve: refused.
    """
    outputs = [_tensor_spec(a, path) for a in args if a.type in DATATYPE_BY_ONNX]
    skipped = [f"{a.name!r} ({a.type})" for a in args if a.type not in DATATYPE_BY_ONNX]
    if not skipped:
        return outputs, []
    fix = (
        "a scikit-learn classifier converted with skl2onnx gives probabilities as a tensor with "
        "options={id(model): {'zipmap': False}}"
    )
    if not outputs:
        raise ModelLoadError(f"{path}: no output the gateway can serve (only {', '.join(skipped)}); {fix}")
    log.warning(
        "%s: serving without output(s) %s: the protocol cannot carry their type; %s", path, ", ".join(skipped), fix
    )
    return outputs, [a.name for a in args if a.type not in DATATYPE_BY_ONNX]


class OnnxModel:
    """An onnxruntime session plus the metadata the gateway needs from it."""

    def __init__(self, path: Path, chooser: ProviderChooser, intra_op_threads: int = 0) -> None:
        self.path = path
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        requested = chooser.candidates()
        try:
            with _quiet_onnxruntime(requested):
                self.session = ort.InferenceSession(
                    str(path), sess_options=options, providers=chooser.with_options(requested)
                )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelLoadError(f"{path}: cannot load ONNX model: {exc}") from None
        self.providers: list[str] = self.session.get_providers()
        chooser.accept(requested, self.providers)
        self.on_cuda = self.providers[0] == CUDA
        self.inputs = [_tensor_spec(a, path) for a in self.session.get_inputs()]
        self.outputs, self.skipped_outputs = _servable_outputs(self.session.get_outputs(), path)
        self.output_names = [o.name for o in self.outputs]
        self.warmup_seconds = 0.0
        self._cost: list[tuple[int, float]] = []
        self._buckets: tuple[int, ...] = ()
        self._cuda: CudaRunner | None = None

    def use_buckets(self, buckets: list[int] | tuple[int, ...]) -> None:
        """Batch sizes the CUDA path keeps buffers (and, with graphs on, CUDA graphs) for."""
        self._buckets = tuple(buckets)
        self._cuda = None

    def _cuda_runner(self) -> CudaRunner:
        if self._cuda is None:
            runner = CudaRunner(self.session, buckets=self._buckets)
            runner.warm_up()  # with graphs: capture every bucket now, not on a request
            self._cuda = runner
        return self._cuda

    @property
    def provider(self) -> str:
        return self.providers[0]

    def run(self, feeds: Tensors) -> list[np.ndarray]:
        """Run the model; returns every output in `self.outputs` order."""
        try:
            if self.on_cuda and not self.skipped_outputs:  # the CUDA runner binds every graph output
                return self._cuda_runner().run(feeds)
            result: list[np.ndarray] = self.session.run(self.output_names, feeds)
            return result
        except Exception as exc:
            raise ModelExecutionError(f"model {self.path.parent.parent.name} failed to run: {exc}") from exc

    def warm_up(self, max_batch: int) -> float:
        """Run on zeros at batch 1 and at a larger batch; returns the timed batch-1 run.

        The first run allocates (and on CUDA tunes kernels); the timed runs after
        it give a per-row cost estimate that decides where batches run. A model
        that cannot batch as `max_batch` says is refused first (ModelLoadError).
        """
        check_batchable(self.inputs, max_batch, self.path.parent.parent.name, self.path)
        self._cost = [(1, self._timed_run(1))]
        if max_batch > 1:
            large = min(max_batch, 32)
            self._cost.append((large, self._timed_run(large)))
        self.warmup_seconds = self._cost[0][1]
        return self.warmup_seconds

    def _timed_run(self, batch: int) -> float:
        feeds = {
            spec.name: np.zeros([batch if d < 0 else d for d in spec.shape], dtype=spec.dtype) for spec in self.inputs
        }
        self.run(feeds)
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            self.run(feeds)
            best = min(best, time.perf_counter() - start)
        return best

    def estimate_seconds(self, rows: int) -> float:
        """Linear cost model from the warm-up runs (fixed overhead + per-row cost)."""
        if len(self._cost) < 2:
            return self._cost[0][1] * rows if self._cost else 0.0
        (b1, t1), (b2, t2) = self._cost
        per_row = max(0.0, (t2 - t1) / (b2 - b1))
        return t1 + per_row * (rows - b1)


@contextlib.contextmanager
def _quiet_onnxruntime(requested: list[str]) -> Any:
    """Silence the provider fallback error that onnxruntime logs when CUDA is absent."""
    if CUDA not in requested:
        yield
        return
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)
