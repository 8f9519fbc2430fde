"""`gateway models load/unload` reach every worker process (issue #21 item 4).

Runs `gateway serve --workers 2` as a subprocess and calls it on many fresh
connections, which the kernel spreads over both workers (SO_REUSEPORT).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.onnx_models import write_identity_model
from tests.support import MODELS, ROOT, Process, gateway_command, gateway_process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")

CALLS = 24  # fresh connections per check: all on one worker by chance is 2 * 2**-24


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(MODELS / "digits", root / "digits")
    write_identity_model(root / "fixed" / "1" / "model.onnx", "FP32")
    (root / "fixed" / "model.toml").write_text("max_batch_size = 4\n")
    with gateway_process(
        "--models", str(root), "--workers", "2", "--load", "digits", "--no-controller", timeout=180
    ) as running:
        yield running


def cli(server: Process, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_CONTROL": server.control, "COLUMNS": "200"}
    env.pop("GATEWAY_TOKEN", None)
    return subprocess.run(gateway_command(*args), capture_output=True, text=True, timeout=90, cwd=ROOT, env=env)


def fresh_calls(server: Process, model: str, n: int = CALLS) -> list[grpc.StatusCode]:
    """One call per new connection (no shared subchannel), so calls land on both workers."""
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    codes = []
    for i in range(n):
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.primary_user_agent", f"fresh-{i}")]
        with grpc.insecure_channel(server.address, options=options) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                reply = stub.ModelInfer(request, timeout=30)
                assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [1.0, 2.0, 3.0]
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
    return codes


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on (its socket inodes matched against /proc/net/tcp*)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        lines = []
        for table in ("tcp", "tcp6"):
            lines += Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
    except OSError:
        return set()
    ports = set()
    for line in lines:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def workers(server: Process) -> dict[str, int]:
    """The worker pids by index: worker 0 listens on the control port as well."""
    control_port = int(server.control.rsplit(":", 1)[1])
    found: dict[str, int] = {}
    for pid in children(server.proc.pid):
        ports = listening_ports(pid)
        if control_port in ports:
            found["0"] = pid
        elif server.port in ports:
            found["1"] = pid
    return found


def wait_for_worker_1(server: Process, not_pid: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker = workers(server).get("1")
        if worker is not None and worker != not_pid:
            return worker
        time.sleep(0.2)
    raise AssertionError("worker 1 did not come back")


def test_load_and_unload_reach_every_worker(server: Process) -> None:
    assert set(fresh_calls(server, "fixed", 4)) == {grpc.StatusCode.NOT_FOUND}
    loaded = cli(server, "models", "load", "fixed")
    assert loaded.returncode == 0, loaded.stderr
    assert "fixed: serving versions 1 on 2 of 2 workers" in loaded.stdout, loaded.stdout
    assert fresh_calls(server, "fixed") == [grpc.StatusCode.OK] * CALLS

    unloaded = cli(server, "models", "unload", "fixed")
    assert unloaded.returncode == 0, unloaded.stderr
    assert "fixed: unloaded on 2 of 2 workers" in unloaded.stdout, unloaded.stdout
    assert fresh_calls(server, "fixed") == [grpc.StatusCode.NOT_FOUND] * CALLS


def test_a_restarted_worker_serves_what_the_others_serve(server: Process) -> None:
    loaded = cli(server, "models", "load", "fixed")
    assert loaded.returncode == 0 and "on 2 of 2 workers" in loaded.stdout, loaded.stdout + loaded.stderr
    victim = workers(server)["1"]
    os.kill(victim, signal.SIGKILL)
    wait_for_worker_1(server, victim)  # listening again: it has caught up already
    # The restarted worker loaded only `digits` from --load, then this run's `models load fixed`.
    assert fresh_calls(server, "fixed") == [grpc.StatusCode.OK] * CALLS
    unloaded = cli(server, "models", "unload", "fixed")
    assert unloaded.returncode == 0 and "on 2 of 2 workers" in unloaded.stdout, unloaded.stdout + unloaded.stderr
    assert fresh_calls(server, "fixed") == [grpc.StatusCode.NOT_FOUND] * CALLS


def test_a_worker_that_does_not_answer_is_reported_by_name(server: Process) -> None:
    stalled = workers(server)["1"]
    os.kill(stalled, signal.SIGSTOP)  # alive, but applies nothing until continued
    try:
        with grpc.insecure_channel(server.control) as channel:
            stub = rgrpc.ReleaseServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as failure:
                stub.LoadModel(rpb.ModelRequest(model="fixed"), timeout=8)
            waited = time.monotonic() - started
    finally:
        os.kill(stalled, signal.SIGCONT)
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION, failure.value
    details = failure.value.details() or ""
    assert "fixed: loaded on 1 of 2 workers" in details and "worker 1 had not answered yet" in details, details
    assert waited < 8  # answered before the caller's deadline, with the report
    # Resumed, worker 1 applies the load it missed.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and set(fresh_calls(server, "fixed", 8)) != {grpc.StatusCode.OK}:
        time.sleep(0.5)
    assert fresh_calls(server, "fixed") == [grpc.StatusCode.OK] * CALLS
    assert cli(server, "models", "unload", "fixed").returncode == 0
