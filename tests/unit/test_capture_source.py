"""The capture as the load-test gate's source of inputs: decoded requests of one model, newest file first."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.protocol.capture import CaptureWriter
from gateway.protocol.pb import inference_pb2 as pb


def request_bytes(model: str, request_id: str) -> bytes:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(b"\0" * 8)
    return request.SerializeToString()


def test_newest_yields_one_models_requests_newest_file_first_without_a_close(tmp_path: Path) -> None:
    earlier = CaptureWriter(tmp_path, 1.0)  # an earlier run of the gateway, same directory
    earlier.record(request_bytes("a", "old-1"), b"", 0.001)
    earlier.record(request_bytes("b", "other"), b"", 0.001)
    earlier.record(request_bytes("a", "old-2"), b"", 0.001)
    earlier.close()
    (old,) = tmp_path.glob("*.gwcap")
    os.utime(old, (1, 1))  # files are ordered by mtime: make this one clearly the older
    writer = CaptureWriter(tmp_path, 1.0)
    writer.record(request_bytes("a", "new"), b"", 0.001)
    # Still buffered: newest() must flush before reading, or the gate sees nothing.
    ids = [wire.id for wire in writer.newest("a")]
    assert ids == ["new", "old-1", "old-2"]
    assert all(wire.model == "a" and wire.inputs[0].name == "x" for wire in writer.newest("a"))
    assert list(writer.newest("missing")) == []
    writer.close()
