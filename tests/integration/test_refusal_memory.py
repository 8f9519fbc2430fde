"""A refused or failed request leaves nothing behind once it is answered (issue #21, probe finding 2).

Each of these used to stay in memory until a full garbage collection (on an idle
server: forever), up to the message size (64 MiB) each: the exception that
refused it sat in a local of a frame its own traceback holds (DataPlane.infer's
saved `error`; the batcher's returned run error, whose traceback's frames lead
back to the caller that keeps it; the future that delivers it to the waiting
frame), and the dispatcher kept its last batch. The test turns collection off,
sends requests that fail in every one of those ways to a real server, and
checks that no decoded request (`WireRequest`) of theirs is still alive. And an
idle stream keeps no copy of its last message while it waits for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.types import WireRequest
from tests.integration.test_overload import HEAD_SPIN, batcher_of, wait_until
from tests.onnx_models import write_spin_model
from tests.support import Running, gateway_in_thread, gateway_process

PREFIX = "refused-"
BIG = 1 << 20  # a raw input of the wrong size, big enough to matter if kept


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    # "spin" runs on the executor's thread, "spin_inline" on the event loop: the
    # two ways a run's error comes back to the batcher.
    for name, execution in (("spin", "thread"), ("spin_inline", "inline")):
        write_spin_model(tmp_path / name / "1" / "model.onnx", fault="raise")
        (tmp_path / name / "model.toml").write_text(
            f'max_batch_size = 8\n[batching]\nmax_queue_delay_us = 0\nexecution = "{execution}"\n'
        )
    with gateway_in_thread(tmp_path) as running:
        yield running


def spin_request(
    request_id: str, *, model: str = "spin", value: float = 0.0, spin: int = 0, x_bytes: int = 16, timeout_us: int = 0
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id=PREFIX + request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.inputs.add(name="spin", datatype="INT64", shape=[1, 1])
    x = np.full(x_bytes // 4, value, np.float32).tobytes()
    request.raw_input_contents.extend([x, np.array([[spin]], np.int64).tobytes()])
    if timeout_us:
        request.parameters["timeout_us"].int64_param = timeout_us
    return request


def alive() -> list[str]:
    """Ids of this test's decoded requests still in memory (reachable or in uncollected cycles)."""
    return sorted(o.id for o in gc.get_objects() if isinstance(o, WireRequest) and o.id.startswith(PREFIX))


async def failing_calls(address: str, server: Running) -> dict[str, grpc.StatusCode]:
    codes: dict[str, grpc.StatusCode] = {}
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 8 * BIG)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def unary(name: str, request: service_pb2.ModelInferRequest) -> None:
            try:
                await stub.ModelInfer(request, timeout=30)
                codes[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                codes[name] = exc.code()

        await unary("wrong size", spin_request("wrong-size", x_bytes=BIG))
        await unary("bad timeout_us", spin_request("bad-timeout", timeout_us=-1))
        await unary("run fails (thread)", spin_request("run-thread", value=0.9))
        await unary("run fails (inline)", spin_request("run-inline", model="spin_inline", value=0.9))
        # Expires in the queue behind a long head batch: its error comes through the future.
        head = asyncio.ensure_future(stub.ModelInfer(spin_request("head", spin=HEAD_SPIN)))
        await wait_until(lambda: batcher_of(server).running() == 1)
        await unary("expired in the queue", spin_request("expired", timeout_us=50_000))
        await head
        answers = stub.ModelStreamInfer(iter([spin_request("stream-wrong-size", x_bytes=BIG)]))
        async for answer in answers:
            refused = bool(answer.error_message)
            codes["stream: wrong size"] = grpc.StatusCode.INVALID_ARGUMENT if refused else grpc.StatusCode.OK
    return codes


def test_refused_and_failed_requests_are_freed_without_a_collection(server: Running) -> None:
    gc.collect()
    gc.disable()
    try:
        codes = asyncio.run(failing_calls(server.address, server))
        assert codes == {
            "wrong size": grpc.StatusCode.INVALID_ARGUMENT,
            "bad timeout_us": grpc.StatusCode.INVALID_ARGUMENT,
            "run fails (thread)": grpc.StatusCode.INTERNAL,
            "run fails (inline)": grpc.StatusCode.INTERNAL,
            "expired in the queue": grpc.StatusCode.RESOURCE_EXHAUSTED,
            "stream: wrong size": grpc.StatusCode.INVALID_ARGUMENT,
        }
        # The server finishes its bookkeeping just after the answer goes out.
        with contextlib.suppress(AssertionError):
            asyncio.run(wait_until(lambda: not alive(), timeout=5.0))
        assert alive() == []
    finally:
        gc.enable()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class IdleStream:
    """A ModelStreamInfer stream that sends one message, reads its answer, then stays open and idle."""

    def __init__(self, channel: grpc.Channel, message: bytes) -> None:
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._outbox.put(message)
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        self._answers = call(iter(self._outbox.get, None), timeout=120)
        self.answer = next(self._answers)

    def close(self) -> None:
        self._outbox.put(None)
        assert list(self._answers) == []


def test_an_idle_stream_keeps_no_copy_of_its_last_message() -> None:
    """Each idle ModelStreamInfer stream kept its last message two or three times over (grpc's
    request iterator, the guard's and the handler's locals) until its next message or its idle
    limit: at 256 streams x 64 MiB, gigabytes held by streams doing nothing."""
    size = 32 << 20
    message = digits_wrong_size(size)
    options = [("grpc.max_send_message_length", 2 * size)]
    with (
        gateway_process("--workers", "1", "--load", "digits") as server,
        grpc.insecure_channel(server.address, options=options) as channel,
    ):
        IdleStream(channel, message).close()  # grpc's and the allocator's buffers for one such message
        baseline = rss_mib(server.proc.pid)
        streams = [IdleStream(channel, message) for _ in range(4)]
        assert all("raw content is" in s.answer.error_message for s in streams)
        time.sleep(0.5)
        grown = rss_mib(server.proc.pid) - baseline
        for stream in streams:
            stream.close()
        # Generous: one kept copy per stream alone would be 4 x 32 MiB.
        assert grown < 64, f"4 idle streams hold {grown:.0f} MiB more than none"


def digits_wrong_size(size: int) -> bytes:
    request = service_pb2.ModelInferRequest(model_name="digits", id="idle")
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(b"\1" * size)  # refused: [1, 64] FP32 is 256 bytes
    return bytes(request.SerializeToString())
