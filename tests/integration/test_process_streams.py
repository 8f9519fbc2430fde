"""Streams are bounded apart from unary calls, idle ones end, and a drain ends them all
(issue #21 items 7 and 24).

Real server (in a thread) and real grpc clients: idle ModelStreamInfer streams
no longer take the slots unary calls need; a stream over `max_streams` is
refused naming the cap; a stream with no message for `stream_idle_s` is ended
with a clear status; and calls arriving during a drain, with streams and a
health watcher open, are answered UNAVAILABLE, never CANCELLED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.integration.test_overload import request, spin_repo
from tests.support import Running, gateway_in_thread

HEAD_SPIN = 800_000  # holds the spin model ~2 s (more on a busy machine)


def digits_request() -> service_pb2.ModelInferRequest:
    r = service_pb2.ModelInferRequest(model_name="digits")
    r.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    r.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
    return r


class OpenStream:
    """A ModelStreamInfer stream the test feeds by hand (it idles when fed nothing)."""

    def __init__(self, stub: Any) -> None:
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.call = stub.ModelStreamInfer(self._requests())

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            item = await self._outbox.get()
            if item is None:
                return
            yield item

    async def infer(self, r: Any) -> Any:
        await self._outbox.put(r)
        return await asyncio.wait_for(self.call.read(), 30)

    async def ended(self, timeout: float) -> grpc.aio.AioRpcError:
        """Wait for the server to end the stream; its error."""
        try:
            while True:
                message = await asyncio.wait_for(self.call.read(), timeout)
                assert message is not grpc.aio.EOF, "the stream ended without a status"
        except grpc.aio.AioRpcError as exc:
            return exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._outbox.put_nowait(None)


async def open_streams(stub: Any, n: int, r: Any) -> list[OpenStream]:
    streams = [OpenStream(stub) for _ in range(n)]
    for s in streams:
        answer = await s.infer(r)  # the stream is open and served
        assert not answer.error_message, answer.error_message
    return streams


def test_idle_streams_leave_unary_calls_their_slots(tmp_path: Path) -> None:
    with gateway_in_thread(load=("digits",), max_inflight=8) as running:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                streams = await open_streams(stub, 12, digits_request())  # more than max_inflight, then idle
                for _ in range(20):
                    reply = await stub.ModelInfer(digits_request(), timeout=10)
                    assert reply.model_name == "digits"
                assert (await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10)).ready
                # And the streams still work.
                assert not (await streams[0].infer(digits_request())).error_message
                for s in streams:
                    s.close()

        asyncio.run(scenario())


def test_a_stream_over_the_cap_is_refused_naming_it_and_unary_calls_go_on() -> None:
    with gateway_in_thread(load=("digits",), max_inflight=8, max_streams=4) as running:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                streams = await open_streams(stub, 4, digits_request())
                extra = OpenStream(stub)
                # No message: the server refuses when the stream opens, and a message the
                # client were still sending then would fail on its side (INTERNAL from core).
                refused = await extra.ended(10)
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_streams" in (refused.details() or "") and "--max-streams" in (refused.details() or "")
                assert (await stub.ModelInfer(digits_request(), timeout=10)).model_name == "digits"
                # A stream that ends frees its place.
                streams[0].close()
                assert await asyncio.wait_for(streams[0].call.read(), 10) is grpc.aio.EOF
                await wait_for(lambda: open_streams_of(running) == 3)
                again = await open_streams(stub, 1, digits_request())
                for s in [*streams[1:], *again]:
                    s.close()

        asyncio.run(scenario())


def open_streams_of(running: Running) -> int:
    guard = running.gateway._streams
    assert guard is not None
    return guard.open_streams


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_an_idle_stream_is_ended_with_a_clear_status_and_a_busy_one_is_not() -> None:
    idle_s = 1.0
    with gateway_in_thread(load=("digits",), stream_idle_s=idle_s) as running:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                idle, busy = await open_streams(stub, 2, digits_request())
                started = time.monotonic()
                # The busy stream sends every idle_s / 4 for 3 idle periods; it is never ended.
                while time.monotonic() - started < 3 * idle_s:
                    assert not (await busy.infer(digits_request())).error_message
                    await asyncio.sleep(idle_s / 4)
                ended = await idle.ended(timeout=30)
                assert ended.code() == grpc.StatusCode.UNAVAILABLE
                assert f"no message for {idle_s:g} s (stream_idle_s)" in (ended.details() or "")
                await wait_for(lambda: open_streams_of(running) == 1)
                busy.close()
                assert await asyncio.wait_for(busy.call.read(), 10) is grpc.aio.EOF

        asyncio.run(scenario())


def test_a_drain_ends_open_streams_and_watchers_promptly_and_new_calls_get_unavailable(tmp_path: Path) -> None:
    grace = 120.0  # the call in flight must be answered, however busy the machine
    prompt = 10.0  # what ends at once does so well within this
    with gateway_in_thread(spin_repo(tmp_path, 100), grace_s=grace) as running:

        async def hammer(stop: asyncio.Event, codes: list[grpc.StatusCode], i: int) -> None:
            # Its own connection: new calls from several clients while the drain waits.
            options = [("grpc.use_local_subchannel_pool", 1), ("grpc.primary_user_agent", f"h{i}")]
            async with grpc.aio.insecure_channel(running.address, options=options) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                while not stop.is_set():
                    try:
                        await stub.ModelInfer(request(0), timeout=10)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                    await asyncio.sleep(0.01)

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                (stream,) = await open_streams(stub, 1, request(0))
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                in_flight = asyncio.ensure_future(stub.ModelInfer(request(HEAD_SPIN, value=7.0), timeout=60))
                await wait_for(lambda: running.gateway.dataplane is not None and running.gateway.dataplane.inflight > 0)
                drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(running.gateway.drain(), running.loop))
                stop = asyncio.Event()
                codes: list[grpc.StatusCode] = []
                hammers = [asyncio.ensure_future(hammer(stop, codes, i)) for i in range(4)]
                # Open streams end at once with the drain's status, not after the grace period.
                ended = await stream.ended(timeout=prompt)
                assert ended.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in (ended.details() or ""), ended.details()
                statuses = []
                try:
                    while (update := await asyncio.wait_for(watch.read(), prompt)) is not grpc.aio.EOF:
                        statuses.append(update.status)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    assert "shutting down" in (exc.details() or ""), exc.details()
                assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
                # Calls that arrived while the drain waits for the call in flight are refused UNAVAILABLE.
                await wait_for(lambda: len(codes) >= 8)
                assert not in_flight.done(), "the call in flight ended before the test could check the drain"
                stop.set()
                await asyncio.gather(*hammers)
                assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, sorted(set(codes), key=str)
                reply = await in_flight  # answered, not cut
                assert float(np.frombuffer(reply.raw_output_contents[0], np.float32)[0]) == 7.0
                # Nothing holds the server open for the grace period once the call in flight is answered.
                await asyncio.wait_for(drained, prompt)

        asyncio.run(scenario())


def test_a_connection_is_asked_to_reconnect_after_its_max_age() -> None:
    with gateway_in_thread(load=("digits",), max_connection_age_s=1.0) as running:
        states: list[grpc.ChannelConnectivity] = []
        with grpc.insecure_channel(running.address) as channel:
            channel.subscribe(states.append, try_to_connect=False)
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(digits_request(), timeout=10).model_name == "digits"
            end = time.monotonic() + 30
            # The server's GOAWAY at the age limit takes the channel out of READY.
            while not (grpc.ChannelConnectivity.READY in states and states[-1] != grpc.ChannelConnectivity.READY):
                assert time.monotonic() < end, states
                time.sleep(0.05)
            # Calls go on over a fresh connection.
            assert stub.ModelInfer(digits_request(), timeout=10).model_name == "digits"


def test_a_saturated_process_still_answers_health_checks_and_refuses_the_call_over_max_inflight(
    tmp_path: Path,
) -> None:
    """Kubernetes' liveness and readiness probes call Health.Check on the inference port: a
    process whose calls fill max_inflight, and whose streams and watchers fill theirs, must
    still answer them (it is busy, not dead), and the call over the cap is refused at once,
    naming the setting."""
    caps = {"max_inflight": 4, "max_streams": 2, "max_watchers": 1}
    with gateway_in_thread(spin_repo(tmp_path, 16), **caps) as running:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                streams = await open_streams(stub, 2, request(0))
                watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                busy = [stub.ModelInfer(request(HEAD_SPIN), timeout=60) for _ in range(4)]
                await asyncio.sleep(0.5)  # all four in flight: one runs, three queue
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ModelInfer(request(0), timeout=10)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-inflight" in (refused.value.details() or ""), refused.value.details()
                for _ in range(3):
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
                for call in busy:
                    assert (await call).model_name == "spin"
                # Freed, the places serve calls again.
                assert (await stub.ModelInfer(request(0), timeout=10)).model_name == "spin"
                watch.cancel()
                for s in streams:
                    s.close()

        asyncio.run(scenario())
