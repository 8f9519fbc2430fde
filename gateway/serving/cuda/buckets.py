"""Fixed batch sizes ("buckets") for CUDA graphs.

A captured CUDA graph replays fixed shapes at fixed addresses, so a batch is
padded with zero rows up to the smallest bucket that holds it, run, and its
outputs trimmed back. Padded rows are never returned: `unpad_outputs` slices
every output to the real rows and refuses outputs shorter than the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gateway.errors import ModelExecutionError
from gateway.types import Tensors


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= rows; rows itself when no bucket is that large."""
    fitting = [b for b in buckets if b >= rows]
    return min(fitting) if fitting else rows


def pad_batch(feeds: Tensors, size: int) -> Tensors:
    """Zero rows appended to every input up to `size` (no copy when already that size)."""
    padded = {}
    for name, array in feeds.items():
        if array.ndim == 0:
            raise ValueError(f"input {name!r} is a scalar: it has no batch dimension to pad")
        rows = array.shape[0]
        if rows == size:
            padded[name] = array
            continue
        if rows > size:
            raise ValueError(f"input {name!r} has {rows} rows, more than the bucket of {size}")
        out = np.zeros((size, *array.shape[1:]), dtype=array.dtype)
        out[:rows] = array
        padded[name] = out
    return padded


def unpad_outputs(outputs: Sequence[np.ndarray], rows: int) -> list[np.ndarray]:
    """Every output trimmed to the real rows (views, no copies)."""
    trimmed = []
    for index, output in enumerate(outputs):
        if output.ndim == 0 or output.shape[0] < rows:
            raise ModelExecutionError(f"output {index} has shape {output.shape}, fewer rows than the batch's {rows}")
        trimmed.append(output[:rows])
    return trimmed
