"""Bucket padding for CUDA graphs: padded rows never leak into answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.buckets import bucket_for, pad_batch, unpad_outputs
from gateway.errors import ModelExecutionError


def test_bucket_choice() -> None:
    assert bucket_for(1, [8, 16, 32]) == 8
    assert bucket_for(8, [8, 16, 32]) == 8
    assert bucket_for(9, [32, 8, 16]) == 16
    assert bucket_for(33, [8, 16, 32]) == 33
    assert bucket_for(5, []) == 5


@given(
    rows=st.integers(1, 64),
    buckets=st.lists(st.integers(1, 128), max_size=5),
    width=st.integers(1, 6),
)
def test_padding_then_unpadding_equals_the_unpadded_computation(rows: int, buckets: list[int], width: int) -> None:
    rng = np.random.default_rng(rows * 31 + width)
    x = rng.standard_normal((rows, width)).astype(np.float32)
    size = bucket_for(rows, buckets)
    padded = pad_batch({"x": x}, size)
    assert padded["x"].shape == (size, width)
    assert not padded["x"][rows:].any()  # the padding is zeros
    # A "model" whose padded rows would be recognisable if they leaked.
    outputs = [padded["x"] * 2 + 1, padded["x"].sum(axis=1)]
    trimmed = unpad_outputs(outputs, rows)
    np.testing.assert_array_equal(trimmed[0], x * 2 + 1)
    np.testing.assert_array_equal(trimmed[1], x.sum(axis=1))
    assert all(t.shape[0] == rows for t in trimmed)


def test_no_copy_when_the_batch_already_fits_and_errors_otherwise() -> None:
    x = np.ones((8, 3), np.float32)
    assert pad_batch({"x": x}, 8)["x"] is x
    with pytest.raises(ValueError, match="more than the bucket"):
        pad_batch({"x": x}, 4)
    with pytest.raises(ModelExecutionError, match="fewer rows"):
        unpad_outputs([np.ones((2, 3))], 3)
