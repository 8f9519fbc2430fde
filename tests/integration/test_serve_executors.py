"""`gateway serve --executors 1`: real gateways whose workers run every model in one executor process.

Answers must equal in-process onnxruntime on the same rows over 10,000 requests of
mixed shapes and versions from several connections; the batcher's promises (queue
bound, timeout_us, deadlines, a request its client cancels never run) hold through
the real server; a kill -9 of the executor
answers UNAVAILABLE and serving resumes without restarting a front end; a kill -9 of
a front end leaves the gateway serving and the executor unmaps its arena; SIGTERM
drains the workers, then the executor. Nothing of ours is left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.integration.test_serve_executors_shadows import LONG_BUSY_S, long_spin, spin_request
from tests.onnx_models import write_spin_model
from tests.support import MODELS, Process, gateway_process

START_TIMEOUT_S = 180.0
# A copy of mlp with a short queue and one batch at a time: 512 rows take milliseconds,
# so requests queue behind them (queue full, timeout_us and deadlines).
SLOW_SPEC = """
max_batch_size = 512

[batching]
enabled = true
max_queue_delay_us = 0
max_queue_size = 4
instances = 1
execution = "thread"
"""
# One run at a time, and no waiting for company: a queued request stays queued while the
# model runs a long spin (cancellation).
SPIN_SPEC = """
max_batch_size = 8

[batching]
enabled = true
max_queue_delay_us = 0
instances = 1
"""
TARGETS = [("digits", "1"), ("digits", "2"), ("digits", "3"), ("mlp", "1")]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("executors-repo")
    shutil.copytree(MODELS / "digits", root / "digits")
    shutil.copytree(MODELS / "mlp", root / "mlp")
    (root / "slow").mkdir()
    shutil.copytree(MODELS / "mlp" / "1", root / "slow" / "1")
    (root / "slow" / "model.toml").write_text(SLOW_SPEC)
    write_spin_model(root / "spin" / "1" / "model.onnx")
    (root / "spin" / "model.toml").write_text(SPIN_SPEC)
    return root


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[Process]:
    """Two front-end workers and one executor, shared by the tests that leave it serving."""
    before = shm_entries()
    args = ("--models", str(repository), "--workers", "2", "--executors", "1", "--metrics-port", "0")
    with gateway_process(*args, timeout=START_TIMEOUT_S) as server:
        yield server
    assert not shm_entries() - before


def shm_entries() -> set[str]:
    """Our entries in /dev/shm (the host shares it with other programs, whose entries come and go)."""
    return {name for name in os.listdir("/dev/shm") if "gateway" in name}


def pids(server: Process, what: str) -> list[int]:
    """Pids the supervisor logged starting `what` ("executor", "worker 0"), oldest first."""
    pattern = re.compile(rf"{what} started \(pid (\d+)\)")
    return [int(found.group(1)) for line in server.lines if (found := pattern.search(line))]


def arena_mappings(pid: int) -> int:
    """Distinct arenas process `pid` has mapped."""
    with open(f"/proc/{pid}/maps") as maps:
        return len({line.split()[4] for line in maps if "gateway-arena" in line})


def wait_until(condition: object, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def request(model: str, version: str, x: np.ndarray, name: str) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def outputs(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {
        out.name: np.frombuffer(raw, dtypes[out.datatype]).reshape(out.shape)
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def stub(server: Process, tag: str) -> service_pb2_grpc.GRPCInferenceServiceStub:
    """A connection of its own (the kernel spreads connections over the workers)."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.primary_user_agent", tag)]
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address, options=options))


def one_row(server: Process, model: str = "digits", timeout: float = 10) -> service_pb2.ModelInferResponse:
    x = np.ones((1, 64 if model == "digits" else 784), np.float32)
    name = "pixels" if model == "digits" else "input"
    return stub(server, f"probe-{time.monotonic_ns()}").ModelInfer(request(model, "", x, name), timeout=timeout)


def input_names(repository: Path) -> dict[str, str]:
    names = {}
    for model, version in TARGETS:
        session = ort.InferenceSession(str(repository / model / version / "model.onnx"))
        names[model] = session.get_inputs()[0].name
    return names


def test_10000_mixed_requests_from_several_connections_equal_in_process_onnxruntime(
    served: Process, repository: Path
) -> None:
    sessions = {
        t: ort.InferenceSession(str(repository / t[0] / t[1] / "model.onnx"), providers=["CPUExecutionProvider"])
        for t in TARGETS
    }
    names = input_names(repository)
    width = {"digits": 64, "mlp": 784}
    clients, per_client = 8, 1250  # 10,000 requests

    async def client(index: int) -> int:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.primary_user_agent", f"mixed-{index}")]
        async with grpc.aio.insecure_channel(served.address, options=options) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            rng = random.Random(index)
            checked = 0

            async def one(i: int) -> None:
                nonlocal checked
                # mlp is ~100x the work of digits: one request in eight keeps the test short.
                model, version = TARGETS[rng.randrange(3)] if i % 8 else TARGETS[3]
                rows = rng.choice([1, 1, 2, 3, 5, 8, 13])
                x = np.random.default_rng(index * 100_000 + i).random((rows, width[model]), dtype=np.float32)
                response = await infer.ModelInfer(request(model, version, x, names[model]), timeout=60)
                assert response.model_version == version
                got = outputs(response)
                want = sessions[(model, version)].run(list(got), {names[model]: x})
                for (name, g), w in zip(got.items(), want, strict=True):
                    assert g.shape == w.shape, name
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{model} {version} {name}")
                checked += 1

            # Eight requests in flight per connection: the executor batches across connections and workers.
            for start in range(0, per_client, 8):
                await asyncio.gather(*(one(i) for i in range(start, min(start + 8, per_client))))
            return checked

    async def everyone() -> int:
        return sum(await asyncio.gather(*(client(i) for i in range(clients))))

    assert asyncio.run(everyone()) == 10_000

    # Executions are counted by the executor, whose batches hold every worker's requests:
    # the workers' own batchers never run, so without it these would be 0.
    statistics = stub(served, "stats").ModelStatistics(
        service_pb2.ModelStatisticsRequest(name="digits", version="1"), timeout=10
    )
    (stats,) = statistics.model_stats
    assert stats.execution_count > 0 and stats.inference_stats.compute_infer.count == stats.execution_count
    assert stats.inference_stats.queue.count > 0
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    # The executor's batch sizes are in the supervisor's merged metrics (the workers run no batcher).
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{served.launched.metrics_port}/metrics", timeout=10)
    text = metrics.read().decode()
    found = re.search(r'gateway_batch_size_count\{model="digits",version="1"\} (\S+)', text)
    assert found and float(found.group(1)) == stats.execution_count, found
    # Every worker's requests were served by the one executor.
    (executor,) = pids(served, "executor")
    assert arena_mappings(executor) == 2


def test_queue_full_timeout_and_deadline_through_the_real_server(served: Process, repository: Path) -> None:
    name = input_names(repository)["mlp"]
    big = request("slow", "1", np.ones((512, 784), np.float32), name)
    small = request("slow", "1", np.ones((1, 784), np.float32), name)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(served.address) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            # A burst far past the queue's 4: the executor's batcher refuses the rest at once.
            burst = await asyncio.gather(
                *(infer.ModelInfer(big, timeout=60) for _ in range(24)), return_exceptions=True
            )
            refused = [r for r in burst if isinstance(r, grpc.aio.AioRpcError)]
            assert refused and len(refused) < 24
            assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused[0]
            assert "queue full" in (refused[0].details() or "")

            # Behind running batches, a 500 µs timeout_us and a 20 ms deadline expire in the queue.
            running = [asyncio.ensure_future(infer.ModelInfer(big, timeout=60)) for _ in range(2)]
            await asyncio.sleep(0.005)
            timed = service_pb2.ModelInferRequest()
            timed.CopyFrom(small)
            timed.parameters["timeout_us"].int64_param = 500
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await infer.ModelInfer(timed, timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "timeout_us" in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await infer.ModelInfer(small, timeout=0.02)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.gather(*running)
            # And the model answers as before.
            assert len((await infer.ModelInfer(small, timeout=60)).outputs) == 1

    asyncio.run(scenario())


def test_the_queue_capacity_metric_is_the_one_queue_in_the_executor(served: Process) -> None:
    """Both front ends report the slow model; its queue (max_queue_size 4) is the executor's
    one: the supervisor's merged gauge says 4, not 4 a worker summed to 8, so an alert on
    depth over capacity fires when that queue fills."""
    url = f"http://127.0.0.1:{served.launched.metrics_port}/metrics"
    pattern = re.compile(r'^gateway_queue_capacity\{model="slow",version="1"\} (\S+)$', re.M)

    def capacity() -> float | None:
        found = pattern.search(urllib.request.urlopen(url, timeout=10).read().decode())
        return float(found.group(1)) if found else None

    # Sampled by each worker every QUEUE_SAMPLE_S: both have reported once the sum is stable.
    assert wait_until(lambda: capacity() is not None, 10)
    time.sleep(1.5)
    assert capacity() == 4.0


def executed_rows(server: Process, model: str) -> int:
    """Rows the executor has run for `model` version 1: its batches, by size."""
    statistics = stub(server, "stats").ModelStatistics(
        service_pb2.ModelStatisticsRequest(name=model, version="1"), timeout=10
    )
    (stats,) = statistics.model_stats
    return sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats)


def test_a_request_cancelled_by_its_client_is_not_run_in_the_executor(served: Process, tmp_path: Path) -> None:
    # A run of at least half a second on this machine now (measured: a fixed count ran 4 us
    # an iteration quiet and 25 us loaded) keeps the model busy while B waits in the executor.
    long = max(1, round(long_spin(tmp_path) * 0.5 / LONG_BUSY_S))
    before = executed_rows(served, "spin")

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(served.address) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            busy = infer.ModelInfer(spin_request("spin", long), timeout=60)
            await asyncio.sleep(0.05)
            cancelled = infer.ModelInfer(spin_request("spin", 0), timeout=60)
            await asyncio.sleep(0.1)  # B is queued in the executor (30 ms sufficed on a loaded host)
            assert cancelled.cancel()  # the client gives up: the call ends with CANCELLED
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await asyncio.sleep(0.02)
            kept = infer.ModelInfer(spin_request("spin", 0), timeout=60)
            assert len((await busy).outputs) == 1 and len((await kept).outputs) == 1

    asyncio.run(scenario())
    # The front end told the executor, which dropped B before any batch took it: had it run
    # (alone, or in one batch with C), three rows would have been.
    assert executed_rows(served, "spin") - before == 2


def test_kill_9_of_a_front_end_keeps_the_gateway_serving_and_frees_its_arena(served: Process) -> None:
    (executor,) = pids(served, "executor")
    assert wait_until(lambda: arena_mappings(executor) == 2, 10)
    victim = pids(served, "worker 1")[-1]
    os.kill(victim, signal.SIGKILL)
    # The other worker serves meanwhile. A new connection the kernel had queued on the dead
    # worker's listener is reset (as with --executors off): a client connects again.
    for _ in range(20):
        for attempt in range(10):
            try:
                assert len(one_row(served).outputs) == 2
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < 9, exc
                time.sleep(0.1)
    # The supervisor restarts the worker; the executor unmapped the dead one's arena and
    # mapped the new one's: two arenas, never three.
    assert wait_until(lambda: len(pids(served, "worker 1")) == 2, 30)
    assert wait_until(lambda: any("worker 1" in line and "restarting" in line for line in served.lines), 5)
    assert wait_until(lambda: arena_mappings(executor) == 2 and "arena is unmapped" in "".join(served.lines), 60)
    assert pids(served, "executor") == [executor]


def test_kill_9_of_the_executor_answers_unavailable_then_serving_resumes(repository: Path) -> None:
    before = shm_entries()
    args = ("--models", str(repository), "--load", "slow", "--load", "digits", "--workers", "1", "--executors", "1")
    with gateway_process(*args, timeout=START_TIMEOUT_S) as server:
        (executor,) = pids(server, "executor")
        (worker,) = pids(server, "worker 0")
        name = input_names(repository)["mlp"]
        big = request("slow", "1", np.ones((512, 784), np.float32), name)

        async def in_flight_when_killed() -> list[object]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                calls = [asyncio.ensure_future(infer.ModelInfer(big, timeout=60)) for _ in range(4)]
                await asyncio.sleep(0.05)  # sent, queued or running in the executor
                os.kill(executor, signal.SIGKILL)
                return await asyncio.gather(*calls, return_exceptions=True)

        killed_at = time.monotonic()
        results = asyncio.run(in_flight_when_killed())
        failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert failed, "every request finished before the kill: nothing was in flight"
        assert {r.code() for r in failed} == {grpc.StatusCode.UNAVAILABLE}, failed[0]
        assert "executor process" in (failed[0].details() or "")

        # Serving resumes without restarting the front end.
        def answers() -> bool:
            try:
                return len(one_row(server, timeout=2).outputs) == 2
            except grpc.RpcError:
                return False

        assert wait_until(answers, 30), "\n".join(server.lines[-20:])
        resumed_s = time.monotonic() - killed_at
        assert resumed_s < 30, resumed_s
        assert pids(server, "worker 0") == [worker]
        restarted = pids(server, "executor")
        assert len(restarted) == 2 and restarted[1] != executor
        # The worker unmapped its first arena; the new executor maps the new one only.
        assert wait_until(lambda: arena_mappings(worker) == 1 and arena_mappings(restarted[1]) == 1, 10)
        assert not shm_entries() - before

        # The supervisor killed: the executor (PR_SET_PDEATHSIG) and the worker go with it.
        server.proc.kill()
        server.proc.wait(10)
        assert wait_until(lambda: not os.path.exists(f"/proc/{restarted[1]}"), 15), "the executor outlived the gateway"
        assert wait_until(lambda: not os.path.exists(f"/proc/{worker}"), 15), "the worker outlived the gateway"
    assert not shm_entries() - before


def test_sigterm_drains_the_workers_then_the_executor(repository: Path) -> None:
    before = shm_entries()
    args = ("--models", str(repository), "--load", "slow", "--workers", "1", "--executors", "1", "--grace", "20")
    with gateway_process(*args, timeout=START_TIMEOUT_S) as server:
        (executor,) = pids(server, "executor")
        name = input_names(repository)["mlp"]
        big = request("slow", "1", np.ones((512, 784), np.float32), name)

        # At run time the executor loads what it did not load at its start (here with one worker).
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))
        assert list(control.LoadModel(rpb.ModelRequest(model="slow"), timeout=60).versions) == ["1"]
        assert list(control.LoadModel(rpb.ModelRequest(model="digits"), timeout=60).versions) == ["1", "2", "3"]
        assert len(one_row(server).outputs) == 2

        async def drained() -> list[object]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                calls = [asyncio.ensure_future(infer.ModelInfer(big, timeout=60)) for _ in range(3)]
                await asyncio.sleep(0.05)
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(drained())
        # Accepted before the signal, so answered: the executor outlives the workers' drain.
        assert all(isinstance(r, service_pb2.ModelInferResponse) for r in results), results
        assert server.proc.wait(30) == 0
        lines = server.lines
        stopped = next(i for i, line in enumerate(lines) if "the workers have stopped: draining the executor" in line)
        draining = next(i for i, line in enumerate(lines) if "executor draining" in line)
        assert stopped < draining, "".join(lines[-20:])
        assert not os.path.exists(f"/proc/{executor}")
    assert not shm_entries() - before


def test_executors_setting_is_refused_with_the_fix(repository: Path) -> None:
    import subprocess
    import sys

    command = [sys.executable, "-m", "gateway", "serve", "--models", str(repository), "--executors", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "executors: 2: one executor process is supported so far" in done.stderr
    done = subprocess.run([*command[:-1], "many"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "executors: 'many' is not auto, off or a number" in done.stderr
