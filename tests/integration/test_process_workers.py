"""The supervisor restarts a dead worker with a backoff, says why, gives up after a bound,
and a restarted worker 0 keeps the control port (issue #21 items 9 and 23).

Real `gateway serve --workers 2` processes; workers die by kill -9, and a worker
that cannot start is made by taking its model away after the first start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.support import MODELS, Process, gateway_process

# The supervisor's documented restart policy (gateway.server.workers): 0.5 s, doubling; 5 failures in a row stop it.
RESTART_BACKOFF_S = 0.5
RESTART_LIMIT = 5


def workers_of(server: Process) -> list[int]:
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    return inodes


def holds(pid: int, inodes: set[str]) -> bool:
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    return bool(sockets & inodes)


def worker_0(server: Process) -> int:
    """Worker 0: the one that serves the control API."""
    control = listening_inodes(int(server.control.rsplit(":", 1)[1]))
    (pid,) = [p for p in workers_of(server) if holds(p, control)]
    return pid


def test_a_worker_that_cannot_restart_backs_off_says_why_and_the_gateway_gives_up(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", repo / "digits")
    with gateway_process("--models", str(repo), "--workers", "2") as server:
        first = worker_0(server)
        # From now on a worker cannot start: its model is gone.
        shutil.move(repo / "digits", tmp_path / "gone")
        started = time.monotonic()
        (other,) = [p for p in workers_of(server) if p != worker_0(server)]
        os.kill(other, signal.SIGKILL)
        code = server.proc.wait(120)
        elapsed = time.monotonic() - started
        time.sleep(0.2)  # the reader thread takes the last lines
        log = "".join(server.lines)
    assert code != 0, log
    assert "worker 1 was killed by SIGKILL; restarting it in 0.5 s" in log, log
    # Each failed start is logged with its reason, and waits twice as long as the last.
    failed_starts = re.findall(r"worker 1 could not start: (.+?); (restarting it in ([\d.]+) s|it failed)", log)
    assert len(failed_starts) == RESTART_LIMIT - 1, log
    assert all("digits" in reason or "models" in reason for reason, _, _ in failed_starts), failed_starts
    delays = [float(d) for _, _, d in failed_starts if d]
    assert delays == [RESTART_BACKOFF_S * 2**i for i in range(1, RESTART_LIMIT - 1)], delays
    assert f"it failed {RESTART_LIMIT} times in a row: giving up" in log
    assert elapsed >= sum(RESTART_BACKOFF_S * 2**i for i in range(RESTART_LIMIT - 1))
    # The healthy worker was drained with it, not left behind.
    assert not Path(f"/proc/{first}").exists() or b"spawn_main" not in Path(f"/proc/{first}/cmdline").read_bytes()


def test_a_restarted_worker_0_serves_the_control_api_on_the_announced_port() -> None:
    with gateway_process("--load", "digits", "--workers", "2", "--control-port", "0") as server:
        address = server.control
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(address))
        assert control.ListReleases(rpb.ListReleasesRequest(), timeout=10).releases
        os.kill(worker_0(server), signal.SIGKILL)
        end = time.monotonic() + 60
        while True:
            try:
                releases = control.ListReleases(rpb.ListReleasesRequest(), timeout=5).releases
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < end, f"the control API never came back on {address}:\n" + "".join(
                    server.lines
                )
                time.sleep(0.2)
        assert [r.model for r in releases] == ["digits"]
        assert server.stop() == 0
