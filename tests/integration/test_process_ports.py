"""A gateway's ports and state directory are its own (issue #21 items 3 and 26).

SO_REUSEPORT groups the workers of one supervisor; a second gateway on a port
another one serves, or on its control port, or on its state directory, is
refused with one line naming the setting and the fix, and exits non-zero.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as tc

from tests.support import ROOT, gateway_command, gateway_process


def second_gateway(*args: str, timeout: float = 60) -> tuple[int | None, str]:
    """Start `gateway serve ...`; its exit code and output, or (None, output) when it served instead."""
    command = gateway_command("serve", "--metrics-port", "-1", "--provider", "cpu", "--load", "digits")
    if "--http-port" not in args:
        command += ["--http-port", "0"]
    command += args
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any("listening on" in line for line in lines):
            proc.terminate()
            proc.wait(30)
            reader.join(5)
            return None, "".join(lines)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    code = proc.wait(10)
    reader.join(5)
    return code, "".join(lines)


def fresh_state() -> str:
    return tempfile.mkdtemp(prefix="gateway-state-")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_gateway_on_a_served_port_is_refused(workers: str) -> None:
    with gateway_process("--load", "digits", "--workers", workers) as first:
        code, output = second_gateway(
            "--port", str(first.port), "--control-port", "0", "--workers", workers, "--state-dir", fresh_state()
        )
        assert code is not None, f"the second gateway joined port {first.port}:\n{output}"
        assert code != 0
        assert f"port {first.port} is in use (another gateway?)" in output, output
        assert "--port" in output
        # The first one still serves every call, alone.
        client = tc.InferenceServerClient(first.address)
        assert all(client.is_model_ready("digits") for _ in range(10))
        assert first.stop() == 0


def test_a_control_port_collision_names_the_flag_and_the_fix() -> None:
    with gateway_process("--load", "digits", "--workers", "1") as first:
        control_port = first.control.rsplit(":", 1)[1]
        for workers in ("1", "2"):
            code, output = second_gateway(
                "--port", "0", "--control-port", control_port, "--workers", workers, "--state-dir", fresh_state()
            )
            assert code is not None and code != 0, output
            assert f"control port {control_port} is in use (another gateway?)" in output, output
            assert "choose another with --control-port" in output
            assert "Traceback" not in output and "GRPC_VERBOSITY" not in output
        assert first.stop() == 0


@pytest.mark.parametrize(("first_workers", "second_workers"), [("1", "2"), ("2", "1")])
def test_a_second_gateway_on_one_state_dir_is_refused(tmp_path: Path, first_workers: str, second_workers: str) -> None:
    state = tmp_path / "state"
    with gateway_process("--load", "digits", "--workers", first_workers, "--state-dir", str(state)) as first:
        code, output = second_gateway(
            "--port", "0", "--control-port", "0", "--workers", second_workers, "--state-dir", str(state)
        )
        assert code is not None, f"a second gateway started on {state}:\n{output}"
        assert code != 0
        assert f"state_dir: {state} is in use by another gateway (pid {first.proc.pid})" in output, output
        assert "--state-dir" in output
        assert first.stop() == 0
    # Once the first one is gone the directory is free again.
    with gateway_process("--load", "digits", "--workers", second_workers, "--state-dir", str(state)) as again:
        assert again.stop() == 0
