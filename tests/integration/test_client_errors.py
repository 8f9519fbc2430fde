"""Client mistakes are counted apart and never roll back a healthy candidate (issue #21 item 5).

A canary rollout of a healthy v2 is bombarded, on routing keys that land on
the canary, with malformed and non-positive `timeout_us`, 1 µs `timeout_us`
and 1 ms client deadlines. None of that counts against v2: it is promoted on
the good traffic, and the client errors show in `gateway_requests_total` by
outcome. A genuinely failing v3 (its model run raises) still counts its
failures as errors and is rolled back on `error_rate`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.routing import route_point
from tests.integration.test_overload import metric, request, wait_until
from tests.onnx_models import write_spin_model
from tests.support import Running, gateway_in_thread, poll_until

SPEC = """max_batch_size = 8
[batching]
max_queue_delay_us = 0
execution = "thread"
[compare]
kind = "regression"
[release]
stable = "1"
[policy]
interval_s = 0.3
step_weights = [20, 50]
threshold = 1
min_samples = 60
max_latency_ratio = 0          # off: timing on a shared CI box is noise
max_error_increase = 0.05
max_duration_s = 120
step_min_samples = 30
step_min_duration_s = 0.6
"""
HOSTILE = 120  # requests of each hostile kind
HEAD_SPIN = 200_000  # about 0.5 s of run (see tests/integration/test_overload.py)
# Keys the first step (20 %) routes to the canary.
CANARY_KEYS = [k for k in (f"user-{i}" for i in range(2000)) if route_point(k) * 10_000 < 2000][:50]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    for version, fault in (("1", None), ("2", None), ("3", "raise")):
        write_spin_model(tmp_path / "spin" / version / "model.onnx", fault=fault)
    (tmp_path / "spin" / "model.toml").write_text(SPEC)
    with gateway_in_thread(tmp_path, metrics_port=0) as running:
        yield running


def keyed(r: service_pb2.ModelInferRequest, key: str) -> service_pb2.ModelInferRequest:
    r.parameters["routing_key"].string_param = key
    return r


def hostile(server: Running) -> None:
    """Every kind of client mistake, aimed at the canary."""
    assert server.gateway.registry is not None
    canary: Any = server.gateway.registry.get("spin", "2").executor  # the batcher: running() is its own

    async def send() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            keys = [CANARY_KEYS[i % len(CANARY_KEYS)] for i in range(HOSTILE)]
            for key in keys:
                bad = keyed(request(0, value=0.9), key)
                bad.parameters["timeout_us"].string_param = "soon"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ModelInfer(bad)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ModelInfer(keyed(request(0, value=0.9, timeout_us=-5), key))
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Behind a long request, short queue timeouts and client deadlines expire in the queue.
            head = asyncio.ensure_future(stub.ModelInfer(keyed(request(HEAD_SPIN, value=0.0), keys[0])))
            await wait_until(lambda: canary.running() == 1)
            tiny = [stub.ModelInfer(keyed(request(0, value=0.9, timeout_us=1000), k)) for k in keys]
            late = [stub.ModelInfer(keyed(request(0, value=0.9), k), timeout=0.05) for k in keys]
            instant = [stub.ModelInfer(keyed(request(0, value=0.9), k), timeout=0.001) for k in keys]
            outcomes = await asyncio.gather(*tiny, *late, *instant, return_exceptions=True)
            assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes[: 2 * HOSTILE])
            await head

    asyncio.run(send())


class Traffic:
    def __init__(self, server: Running) -> None:
        self.infer = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
        self.control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))
        self.count = 0

    def burst(self, requests: int = 40) -> None:
        for _ in range(requests):
            try:
                self.infer.ModelInfer(keyed(request(0, value=0.9), f"good-{self.count}"), timeout=10)
            except grpc.RpcError as exc:  # a failing candidate's answer
                assert exc.code() == grpc.StatusCode.INTERNAL, exc
            self.count += 1

    def release(self) -> rpb.Release:
        return self.control.GetRelease(rpb.GetReleaseRequest(model="spin"), timeout=10)

    def until(self, done: Callable[[rpb.Release], bool], timeout: float = 90.0) -> rpb.Release:
        return poll_until(self.release, done, self.burst, timeout, "the rollout")

    def audit(self) -> list[rpb.AuditRecord]:
        return list(self.control.GetAuditLog(rpb.GetAuditLogRequest(model="spin", limit=1000)).records)


def test_client_mistakes_do_not_roll_back_a_healthy_canary_and_real_failures_do(server: Running) -> None:
    traffic = Traffic(server)
    started = traffic.control.StartRollout(rpb.StartRolloutRequest(model="spin", candidate="2", reason="v2"))
    assert (started.phase, started.canary_weight_bp) == ("progressing", 2000)

    hostile(server)
    done = traffic.until(lambda r: r.phase in ("succeeded", "rolled_back"))
    assert (done.phase, done.stable) == ("succeeded", "2"), [(r.action, r.reason) for r in traffic.audit()]

    def count(outcome: str) -> float:
        return metric(server, "gateway_requests_total", model="spin", version="2", outcome=outcome)

    # Counted apart, by outcome: every bad timeout_us, and the tiny timeouts and deadlines.
    assert count("invalid") == 2 * HOSTILE
    expired = count("client_timeout") + count("deadline") + count("cancelled")
    print("DEBUG", count("client_timeout"), count("deadline"), count("cancelled"), count("ok"))
    assert expired >= HOSTILE, (count("client_timeout"), count("deadline"), count("cancelled"), count("ok"))
    assert count("error") == 0

    # A version whose model run fails is still charged with its errors, and rolled back.
    traffic.control.StartRollout(rpb.StartRolloutRequest(model="spin", candidate="3", reason="v3"))
    rolled = traffic.until(lambda r: r.phase in ("succeeded", "rolled_back"))
    assert (rolled.phase, rolled.stable) == ("rolled_back", "2")
    last = traffic.audit()[-1]
    assert (last.action, last.actor) == ("rollback", "controller")
    checks = {c["check"]: c for c in json.loads(last.evidence_json)}
    assert checks["error_rate"]["verdict"] == "fail"
    assert metric(server, "gateway_requests_total", model="spin", version="3", outcome="error") >= 60
