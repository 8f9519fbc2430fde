"""`gateway models load/unload` in executor mode: the executor process loads, reloads and retires too.

A real `gateway serve --workers 2 --executors 1 --load digits`; `extra` is in the
repository but not loaded at the start. Through the CLI: `models load extra` makes
the executor build it (once for both workers) and every worker serve it; changing
its file on disk and loading it again serves the new model from the executor; an
unload retires it there; and a run-time-loaded model survives a kill -9 of the
executor (the restarted executor loads it again for the workers that serve it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.integration.test_serve_executors import pids, shm_entries, wait_until
from tests.support import MODELS, ROOT, Process, gateway_command, gateway_process

START_TIMEOUT_S = 180.0
CALLS = 16  # fresh connections per check: all on one worker by chance is 2 * 2**-16
ROWS = np.random.default_rng(7).random((3, 64), dtype=np.float32)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("executor-loads")
    shutil.copytree(MODELS / "digits", root / "digits")
    (root / "extra" / "1").mkdir(parents=True)
    shutil.copyfile(MODELS / "digits" / "1" / "model.onnx", root / "extra" / "1" / "model.onnx")
    (root / "extra" / "model.toml").write_text("max_batch_size = 64\n")
    return root


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[Process]:
    before = shm_entries()
    args = ("--models", str(repository), "--load", "digits", "--workers", "2", "--executors", "1")
    with gateway_process(*args, "--no-controller", timeout=START_TIMEOUT_S) as server:
        yield server
    assert not shm_entries() - before


def cli(server: Process, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_CONTROL": server.control, "COLUMNS": "200"}
    env.pop("GATEWAY_TOKEN", None)
    return subprocess.run(gateway_command(*args), capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


def expected(path: Path) -> np.ndarray:
    """What in-process onnxruntime answers on ROWS: the first output (probabilities or logits)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: ROWS})[0])


def answers(server: Process, model: str, n: int = CALLS) -> list[np.ndarray | grpc.StatusCode]:
    """The first output of one call per new connection (calls land on both workers), or its error code."""
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="pixels", datatype="FP32", shape=list(ROWS.shape))
    request.raw_input_contents.append(ROWS.tobytes())
    found: list[np.ndarray | grpc.StatusCode] = []
    for i in range(n):
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.primary_user_agent", f"loads-{i}-{time.time_ns()}")]
        with grpc.insecure_channel(server.address, options=options) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                reply = stub.ModelInfer(request, timeout=30)
            except grpc.RpcError as exc:
                found.append(exc.code())
                continue
            out = reply.outputs[0]
            dtype = {"FP32": np.float32, "INT64": np.int64}[out.datatype]
            found.append(np.frombuffer(reply.raw_output_contents[0], dtype).reshape(out.shape))
    return found


def all_equal(got: list[np.ndarray | grpc.StatusCode], want: np.ndarray) -> bool:
    return all(isinstance(g, np.ndarray) and g.shape == want.shape and np.allclose(g, want, 1e-5, 1e-6) for g in got)


def count(server: Process, text: str) -> int:
    return sum(text in line for line in server.lines)


def test_load_reload_and_unload_at_run_time_reach_the_executor(served: Process, repository: Path) -> None:
    extra = repository / "extra" / "1" / "model.onnx"
    assert set(answers(served, "extra", 4)) == {grpc.StatusCode.NOT_FOUND}

    loaded = cli(served, "models", "load", "extra")
    assert loaded.returncode == 0, loaded.stderr
    assert "extra: serving versions 1 on 2 of 2 workers" in loaded.stdout, loaded.stdout
    first = expected(extra)
    assert all_equal(answers(served, "extra"), first)
    # Built once in the executor: the second worker's load found the same files there.
    assert count(served, "loaded extra in the executor") == 1, "".join(served.lines[-30:])

    # A new model under the same name: the executor builds it afresh, every worker serves it.
    shutil.copyfile(MODELS / "digits" / "2" / "model.onnx", extra)
    second = expected(extra)
    assert not np.allclose(first, second)
    reloaded = cli(served, "models", "load", "extra")
    assert reloaded.returncode == 0, reloaded.stderr
    assert all_equal(answers(served, "extra"), second)
    assert count(served, "reloaded extra in the executor") == 1
    # The first generation retires in the executor once both workers let go of it.
    assert wait_until(lambda: count(served, "retiring extra version 1") == 1, 15), "".join(served.lines[-30:])

    unloaded = cli(served, "models", "unload", "extra")
    assert unloaded.returncode == 0, unloaded.stderr
    assert set(answers(served, "extra")) == {grpc.StatusCode.NOT_FOUND}
    assert wait_until(lambda: count(served, "retiring extra version 1") == 2, 15), "".join(served.lines[-30:])
    # digits, loaded at the start, was never touched.
    assert all(isinstance(a, np.ndarray) for a in answers(served, "digits", 4))


def test_a_model_loaded_at_run_time_survives_a_restart_of_the_executor(served: Process, repository: Path) -> None:
    loaded = cli(served, "models", "load", "extra")
    assert loaded.returncode == 0, loaded.stderr
    want = expected(repository / "extra" / "1" / "model.onnx")
    assert all_equal(answers(served, "extra"), want)

    (executor,) = pids(served, "executor")[-1:]
    os.kill(executor, signal.SIGKILL)
    # The restarted executor loads digits from --load; the workers have it load extra again.
    end = time.monotonic() + 60
    while time.monotonic() < end and not all_equal(answers(served, "extra", 4), want):
        time.sleep(0.5)
    assert all_equal(answers(served, "extra"), want), "".join(served.lines[-30:])
    assert pids(served, "executor")[-1] != executor
    assert cli(served, "models", "unload", "extra").returncode == 0
