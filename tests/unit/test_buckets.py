"""Bucket padding for CUDA graphs: padded rows never leak into answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ModelExecutionError
from gateway.serving.cuda.buckets import bucket_for, pad_batch, unpad_outputs

rows_st = st.integers(1, 64)
buckets_st = st.lists(st.integers(1, 128), max_size=6)
trailing_st = st.lists(st.integers(1, 4), max_size=2).map(tuple)
dtype_st = st.sampled_from([np.float32, np.float16, np.int64, np.uint8, np.bool_])


def test_bucket_choice() -> None:
    assert bucket_for(1, [8, 16, 32]) == 8
    assert bucket_for(8, [8, 16, 32]) == 8
    assert bucket_for(9, [32, 8, 16]) == 16
    assert bucket_for(33, [8, 16, 32]) == 33
    assert bucket_for(5, []) == 5


@given(rows=rows_st, buckets=buckets_st)
def test_the_bucket_is_the_smallest_that_holds_the_batch(rows: int, buckets: list[int]) -> None:
    size = bucket_for(rows, buckets)
    assert size >= rows
    if size in buckets:
        assert not [b for b in buckets if rows <= b < size]  # no smaller bucket would do
    else:
        assert size == rows and all(b < rows for b in buckets)  # larger than every bucket: as it is
    assert bucket_for(size, buckets) == size  # a full bucket stays in it


@given(
    rows=rows_st,
    buckets=buckets_st,
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


@given(
    rows=rows_st,
    buckets=buckets_st,
    inputs=st.lists(st.tuples(trailing_st, dtype_st), min_size=1, max_size=3),
)
def test_every_input_is_padded_to_the_bucket_and_keeps_its_rows(
    rows: int, buckets: list[int], inputs: list[tuple[tuple[int, ...], type]]
) -> None:
    rng = np.random.default_rng(rows)
    # Values 1..99: never zero, so a padding row (zeros) cannot pass for a real one.
    feeds: dict[str, np.ndarray] = {
        f"in{i}": rng.integers(1, 100, (rows, *trailing)).astype(dtype) for i, (trailing, dtype) in enumerate(inputs)
    }
    size = bucket_for(rows, buckets)
    padded = pad_batch(feeds, size)
    assert set(padded) == set(feeds)
    for name, array in feeds.items():
        out = padded[name]
        assert out.shape == (size, *array.shape[1:]) and out.dtype == array.dtype
        np.testing.assert_array_equal(out[:rows], array)
        assert not out[rows:].any()
        if size == rows:
            assert out is array  # already the bucket's size: no copy


@given(rows=rows_st, buckets=buckets_st, outputs=st.integers(1, 3))
def test_padded_rows_never_appear_in_what_is_returned(rows: int, buckets: list[int], outputs: int) -> None:
    size = bucket_for(rows, buckets)
    padded = pad_batch({"x": np.ones((rows, 2), np.float32)}, size)
    # A model that tags every row: its index, and whether it was padding (a zero row).
    index = np.arange(size)
    is_padding = ~padded["x"].any(axis=1)
    results = [np.stack([index, is_padding.astype(np.int64)], axis=1) for _ in range(outputs)]
    trimmed = unpad_outputs(results, rows)
    assert len(trimmed) == outputs
    for got, full in zip(trimmed, results, strict=True):
        assert got.shape == (rows, 2)
        assert got[:, 0].tolist() == list(range(rows))  # the real rows, in order
        assert not got[:, 1].any()  # none of them padding
        assert np.shares_memory(got, full)  # a view: trimming copies nothing


@given(rows=st.integers(2, 64), short=st.integers(0, 63))
def test_an_output_shorter_than_the_batch_is_refused(rows: int, short: int) -> None:
    short = min(short, rows - 1)
    with pytest.raises(ModelExecutionError, match="fewer rows"):
        unpad_outputs([np.zeros((rows, 3)), np.zeros((short, 3))], rows)


def test_no_copy_when_the_batch_already_fits_and_errors_otherwise() -> None:
    x = np.ones((8, 3), np.float32)
    assert pad_batch({"x": x}, 8)["x"] is x
    with pytest.raises(ValueError, match="more than the bucket"):
        pad_batch({"x": x}, 4)
    with pytest.raises(ValueError, match="no batch dimension"):
        pad_batch({"x": np.float32(1.0) * np.ones(())}, 4)
    with pytest.raises(ModelExecutionError, match="fewer rows"):
        unpad_outputs([np.ones((2, 3))], 3)
    with pytest.raises(ModelExecutionError, match="fewer rows"):
        unpad_outputs([np.ones(())], 1)
