"""build_inputs in isolation: the feeds it returns follow the model's signature, not the wire."""

from __future__ import annotations

import numpy as np

from gateway.config.spec import ModelSpec
from gateway.serving.validation import build_inputs
from gateway.types import TensorSpec, WireInput

SIGNATURE = [TensorSpec("a", "FP32", (-1, -1)), TensorSpec("b", "FP32", (-1, -1))]


def wire(name: str, columns: int) -> WireInput:
    return WireInput(name, "FP32", [2, columns], raw=np.arange(2 * columns, dtype=np.float32).tobytes())


def test_feeds_come_in_signature_order_whatever_the_wire_order() -> None:
    spec = ModelSpec(max_batch_size=8)
    in_order, batch = build_inputs([wire("a", 3), wire("b", 5)], SIGNATURE, spec, "m")
    swapped, _ = build_inputs([wire("b", 5), wire("a", 3)], SIGNATURE, spec, "m")
    assert batch == 2
    assert list(in_order) == list(swapped) == ["a", "b"]
    # So a batcher keying on the shapes in order never puts a (2,3)/(2,5) request
    # with a (2,5)/(2,3) one.
    assert [a.shape for a in swapped.values()] == [(2, 3), (2, 5)]
    for name in ("a", "b"):
        np.testing.assert_array_equal(in_order[name], swapped[name])
