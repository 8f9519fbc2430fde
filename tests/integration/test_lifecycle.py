"""Drain on SIGTERM (reliability row 5) and several workers on one port."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.integration.test_overload import request, spin_repo
from tests.support import gateway_process

IN_FLIGHT = 200


def test_sigterm_answers_everything_in_flight_and_refuses_new_work(tmp_path: Path) -> None:
    repo = spin_repo(tmp_path, 1000)
    grace = 20.0

    async def scenario(server_address: str, stop: object) -> None:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            await stub.ModelInfer(request(0))
            # 200 requests, 8 per batch at ~50 ms a batch: about 1.25 s of work.
            calls = [asyncio.ensure_future(stub.ModelInfer(request(20_000, value=i))) for i in range(IN_FLIGHT)]
            while sum(c.done() for c in calls) < 8:
                await asyncio.sleep(0.005)
            stop()  # type: ignore[operator]
            await asyncio.sleep(0.1)
            assert sum(c.done() for c in calls) < IN_FLIGHT, "the work finished before the drain began"
            status = await health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                await stub.ModelInfer(request(0))
                raise AssertionError("a new call was accepted while draining")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
            replies = await asyncio.gather(*calls)
            values = sorted(float(np.frombuffer(r.raw_output_contents[0], np.float32)[0]) for r in replies)
            assert values == [float(i) for i in range(IN_FLIGHT)]

    with gateway_process("--models", str(repo), "--workers", "1", "--grace", str(grace)) as server:
        signalled: list[float] = []

        def stop() -> None:
            signalled.append(time.monotonic())
            server.proc.send_signal(signal.SIGTERM)

        asyncio.run(scenario(server.address, stop))
        assert server.proc.wait(grace) == 0
        assert time.monotonic() - signalled[0] < grace


def test_workers_share_one_port_and_one_metrics_endpoint() -> None:
    with gateway_process("--workers", "2", "--load", "digits", "--metrics-port", "0") as server:
        pid = server.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2
        sent = 0
        for i in range(8):
            # Separate connections, so the kernel can spread them over the workers.
            options = [("grpc.use_local_subchannel_pool", 1), ("grpc.primary_user_agent", f"t{i}")]
            with grpc.insecure_channel(server.address, options=options) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(25):
                    r = service_pb2.ModelInferRequest(model_name="digits")
                    r.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
                    r.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
                    stub.ModelInfer(r)
                    sent += 1
        metrics_line = next(line for line in server.lines if "metrics on" in line)
        port = int(re.search(r"metrics on \S+:(\d+)", metrics_line).group(1))  # type: ignore[union-attr]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_requests_total{") and 'outcome="ok"' in line
        )
        assert total == sent
        assert server.stop() == 0
