"""Health watchers have a cap of their own and never take ModelStreamInfer's places (issue #21, probe finding 4).

A health Watch call stays open for as long as its client's connection (that is
how load balancers and grpc's client-side health checking use it), and it
counted against max_streams: a client holding max_streams of them locked every
ModelStreamInfer out, for good. Real server, real grpc clients.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from tests.integration.test_process_streams import OpenStream, digits_request, open_streams, wait_for
from tests.support import Running, gateway_in_thread

SERVING = health_pb2.HealthCheckResponse.SERVING


async def open_watchers(channel: grpc.aio.Channel, n: int) -> list[Any]:
    health = health_pb2_grpc.HealthStub(channel)
    watchers = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(n)]
    for watcher in watchers:
        assert (await asyncio.wait_for(watcher.read(), 30)).status == SERVING
    return watchers


def watchers_of(running: Running) -> int:
    guard = running.gateway._streams
    assert guard is not None
    return guard.open_watchers


def test_watchers_never_take_the_places_of_inference_streams() -> None:
    with gateway_in_thread(load=("digits",), max_streams=2, max_watchers=3) as running:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                watchers = await open_watchers(channel, 3)  # more than max_streams, all open and idle
                # Every place of max_streams is still there for ModelStreamInfer, and unary calls go on.
                streams = await open_streams(stub, 2, digits_request())
                assert (await stub.ModelInfer(digits_request(), timeout=10)).model_name == "digits"
                # Over its own cap, a watcher is refused, naming the cap and its setting.
                extra = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                try:
                    await asyncio.wait_for(extra.read(), 10)
                    raise AssertionError("a watcher over max_watchers was served")
                except grpc.aio.AioRpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "max_watchers" in (refused.details() or ""), refused.details()
                # ... and a stream over max_streams is refused as before, naming max_streams.
                over = OpenStream(stub)
                # No message: the server refuses when the stream opens, and a message the
                # client were still sending then would fail on its side (INTERNAL from core).
                assert "max_streams" in ((await over.ended(10)).details() or "")
                # A watcher that ends frees its place.
                watchers[0].cancel()
                await wait_for(lambda: watchers_of(running) == 2)
                (again,) = await open_watchers(channel, 1)
                for call in [*watchers[1:], again]:
                    call.cancel()
                for stream in streams:
                    stream.close()

        asyncio.run(scenario())
