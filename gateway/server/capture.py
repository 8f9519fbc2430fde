"""REST requests into the capture files, which hold gRPC's bytes.

Captured traffic is replayed over gRPC (`gateway replay`, the load-test gate), so a
request that came over REST is written as the ModelInferRequest a gRPC client
would have sent (inputs as raw_input_contents, the form REST decodes to) and its
answer as the ModelInferResponse bytes the gRPC edge sends. Here, in the
composition root, because the REST edge may not import the gRPC one.
"""

from __future__ import annotations

from gateway.protocol.capture import CaptureWriter
from gateway.protocol.encoder import ResponseEncoder
from gateway.protocol.pb import inference_pb2 as pb
from gateway.types import InferResponse, ParamValue, WireRequest


def _set(target: pb.InferParameter, value: ParamValue) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        # uint64 values (above int64's range) travel in uint64_param, as tritonclient sends them.
        if value >= 1 << 63:
            target.uint64_param = value
        else:
            target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value


def request_bytes(request: WireRequest) -> bytes:
    message = pb.ModelInferRequest(model_name=request.model, model_version=request.version, id=request.id)
    for wire in request.inputs:
        message.inputs.add(name=wire.name, datatype=wire.datatype, shape=wire.shape)
        message.raw_input_contents.append(wire.raw or b"")
    for name in request.outputs:
        message.outputs.add(name=name)
    for key, value in request.parameters.items():
        _set(message.parameters[key], value)
    return bytes(message.SerializeToString())


class WireCapture:
    """The REST edge's Recorder, writing into the gRPC edge's CaptureWriter."""

    def __init__(self, writer: CaptureWriter) -> None:
        self._writer = writer
        self._encoder = ResponseEncoder()

    def wanted(self) -> bool:
        return self._writer.wanted()

    def record(self, request: WireRequest, response: InferResponse, seconds: float) -> None:
        self._writer.record(request_bytes(request), self._encoder.encode(response), seconds)
