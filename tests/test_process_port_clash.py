"""One port number for two of a gateway's listeners (issue #21, probe findings).

Given twice on the command line, it is refused before any model loads. Taken by
someone else while a supervisor's workers start, the metrics port stops the
whole gateway (workers included) with one line, instead of a traceback and a
supervisor that never announces itself and never exits.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from tests.support import ROOT, gateway_command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gateway_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("gateway:")]


# ---------------------------------------------------------------- finding 1: taken while the workers start


def test_a_metrics_port_taken_while_workers_start_stops_the_gateway_with_one_line() -> None:
    metrics_port = free_port()
    command = gateway_command(
        "serve", "--port", "0", "--control-port", "0", "--metrics-port", str(metrics_port), "--provider", "cpu",
        "--load", "digits", "--workers", "2", "--state-dir", tempfile.mkdtemp(prefix="gateway-state-"),
    )  # fmt: skip
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # so a hung supervisor and its workers can be killed together
    )
    assert proc.stdout is not None
    lines: list[str] = []
    spawned = threading.Event()

    def read() -> None:
        for line in proc.stdout or ():
            lines.append(line)
            if "worker 1 started" in line:
                spawned.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    squatter = socket.socket()
    try:
        # The supervisor checked the port before it started its workers; they take
        # seconds to load their models, and someone takes the port meanwhile.
        assert spawned.wait(60), "".join(lines)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", metrics_port))
        squatter.listen()
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            pytest.fail("the supervisor neither served nor exited:\n" + "".join(lines[-20:]))
    finally:
        squatter.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    reader.join(10)
    output = "".join(lines)
    assert code == 2, output
    assert "Traceback" not in output and "listening on" not in output, output
    refusal = (
        f"gateway: metrics port {metrics_port} is in use (another gateway?): stop it, "
        "or choose another with --metrics-port (0 picks a free one, -1 turns metrics off)"
    )
    assert gateway_lines(output) == [refusal], output
    # Its workers went with it.
    pids = [int(pid) for pid in re.findall(r"worker \d started \(pid (\d+)\)", output)]
    assert len(pids) == 2, output
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), output


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
