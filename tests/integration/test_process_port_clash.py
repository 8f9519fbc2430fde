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
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.settings import GatewaySettings
from gateway.errors import ConfigError
from gateway.server.ports import check_distinct
from tests.integration.test_process_ports import fresh_state, second_gateway
from tests.support import ROOT, gateway_command

FLAGS = {
    "port": "--port",
    "http_port": "--http-port",
    "control_port": "--control-port",
    "metrics_port": "--metrics-port",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gateway_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("gateway:")]


# ---------------------------------------------------------------- finding 2: one number, two flags


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("first", "second"), [("port", "control_port"), ("control_port", "metrics_port"), ("port", "http_port")]
)
def test_one_port_for_two_listeners_is_refused_before_any_model_loads(workers: str, first: str, second: str) -> None:
    port = free_port()
    ports = {
        "port": "0", "http_port": "0", "control_port": "0", "metrics_port": "-1", first: str(port), second: str(port)
    }  # fmt: skip
    args = [arg for setting, value in ports.items() for arg in (FLAGS[setting], value)]
    code, output = second_gateway(*args, "--workers", workers, "--state-dir", fresh_state())
    assert code == 2, output
    lines = gateway_lines(output)
    assert len(lines) == 1, output
    assert lines[0].startswith(f"gateway: port {port} is given to both {FLAGS[first]} and {FLAGS[second]}: "), output
    assert "loaded " not in output and "Traceback" not in output and "add_port" not in output, output


# -1 turns REST, the control API or metrics off; the gRPC inference port is always on.
ports = st.sampled_from([-1, 0, 8000, 8001, 8002])


@given(port=st.sampled_from([0, 8000, 8001, 8002]), http_port=ports, control_port=ports, metrics_port=ports)
@settings(max_examples=100, deadline=None)
def test_only_a_positive_number_given_twice_is_refused(
    port: int, http_port: int, control_port: int, metrics_port: int
) -> None:
    s = GatewaySettings(
        models=Path("models"),
        host="127.0.0.1",
        port=port,
        http_port=http_port,
        control_port=control_port,
        metrics_port=metrics_port,
    )
    chosen = [p for p in (port, http_port, control_port, metrics_port) if p > 0]
    if len(set(chosen)) == len(chosen):
        check_distinct(s)
        return
    with pytest.raises(ConfigError, match=r"port \d+ is given to both --[a-z-]+ and --[a-z-]+"):
        check_distinct(s)


def test_the_same_number_on_two_addresses_that_cannot_clash_is_allowed() -> None:
    check_distinct(
        GatewaySettings(models=Path("models"), host="127.0.0.1", control_host="127.0.0.2", port=8001, control_port=8001)
    )
    with pytest.raises(ConfigError, match="port 8001 is given to both --port and --control-port"):
        check_distinct(
            GatewaySettings(
                models=Path("models"), host="0.0.0.0", control_host="127.0.0.2", port=8001, control_port=8001
            )
        )


# ---------------------------------------------------------------- finding 1: taken while the workers start


def test_a_metrics_port_taken_while_workers_start_stops_the_gateway_with_one_line() -> None:
    metrics_port = free_port()
    command = gateway_command(
        "serve", "--port", "0", "--http-port", "0", "--control-port", "0", "--metrics-port", str(metrics_port),
        "--provider", "cpu",
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
