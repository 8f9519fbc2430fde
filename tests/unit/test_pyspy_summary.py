"""loadtests.pyspy_summary: py-spy raw profiles summed by area."""

from __future__ import annotations

import pytest

from loadtests.pyspy_summary import area_of, read_raw, summarize

PROFILE = """\
<module> (gateway:8);Runner.run (asyncio/runners.py:118) 50
Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982) 20
DynamicBatcher.submit (gateway/serving/batcher.py:152) 10
decode_infer (gateway/protocol/codec.py:46) 15
Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:395) 5
"""


def test_samples_are_charged_to_the_area_of_their_innermost_frame() -> None:
    text = summarize(read_raw(PROFILE.splitlines()), top=5)
    assert text.splitlines()[0] == "100 samples"
    assert "50.0%  event loop + grpc, native" in text
    assert "20.0%  other threads, native (grpc poller)" in text
    assert "15.0%  protocol: parse checks, decode, encode, error mapping" in text
    assert "10.0%  serving: batcher" in text
    assert " 5.0%  onnxruntime (model runs)" in text
    assert "15.0%  decode_infer (gateway/protocol/codec.py:46)" in text  # busiest gateway lines


def test_unknown_frames_are_other_and_bad_input_is_refused() -> None:
    assert area_of("somewhere_else (lib.py:1)") == "other"
    with pytest.raises(ValueError, match="not py-spy raw output"):
        read_raw(["a flamegraph svg, say"])
    assert summarize([], top=3) == "no samples"
