"""The release engineer's CLI, as a subprocess, against a real gateway (reliability rows 12-13)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.support import MODELS, ROOT, Process, gateway_command, gateway_process

WRITE = "w" * 24
READ = "r" * 24


def cli(
    server: Process,
    *args: str,
    token: str | None = WRITE,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "GATEWAY_CONTROL": server.control, "COLUMNS": "200", **(env or {})}
    environment.pop("GATEWAY_TOKEN", None)
    if token is not None:
        environment["GATEWAY_TOKEN"] = token
    return subprocess.run(
        gateway_command(*args), capture_output=True, text=True, timeout=60, cwd=ROOT, env=environment, input=input_text
    )


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Process]:
    tokens = f"alice:write:{WRITE},bob:read:{READ}"
    with gateway_process(
        "--models", str(repo), "--workers", "1", "--no-controller", env={"GATEWAY_CONTROL_TOKENS": tokens}
    ) as running:
        yield running


def test_status_traffic_and_report(server: Process) -> None:
    result = cli(server, "status")
    assert result.returncode == 0, result.stderr
    assert "digits" in result.stdout and "stable 1" in result.stdout
    result = cli(server, "traffic", "set", "digits", "--canary", "2", "--weight", "10", "--reason", "try v2")
    assert result.returncode == 0, result.stderr
    assert "canary 2 at 10%" in result.stdout
    client = tc.InferenceServerClient(server.address)
    inp = tc.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    for i in range(50):
        client.infer("digits", [inp], request_id=f"req-{i}")
    report = cli(server, "report", "digits", "--json", token=READ)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["release"]["canary"] == "2" and data["release"]["canary_weight_percent"] == 10
    assert sum(v["requests"] for v in data["versions"]) >= 50
    table = cli(server, "report", "digits")
    assert table.returncode == 0 and "95% CI" in table.stdout and "labelled rows" in table.stdout


def test_feedback_send_from_jsonl_and_csv(server: Process, tmp_path: Path) -> None:
    client = tc.InferenceServerClient(server.address)
    inp = tc.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    for i in range(4):
        client.infer("digits", [inp], request_id=f"fb-{i}")
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text(
        '{"request_id": "fb-0", "label": 3}\n{"request_id": "fb-1", "labels": [4]}\n'
        '{"request_id": "nobody", "label": 1}\n'
    )
    result = cli(server, "feedback", "send", "digits", str(jsonl))
    assert result.returncode == 0, result.stderr
    assert "2 joined, 1 unknown" in result.stdout
    table = tmp_path / "labels.csv"
    table.write_text("request_id,label\nfb-2,5\nfb-3,6\n")
    assert "2 joined, 0 unknown" in cli(server, "feedback", "send", "digits", str(table)).stdout
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"request_id": "x"}\n')
    result = cli(server, "feedback", "send", "digits", str(broken))
    assert result.returncode == 2 and "broken.jsonl:1" in result.stderr


def test_shadow_rollout_promote_rollback_and_audit(server: Process) -> None:
    assert cli(server, "shadow", "add", "digits", "3", "--fraction", "0.5").returncode == 0
    refused = cli(server, "shadow", "add", "digits", "1")
    assert refused.returncode == 1 and "already serves traffic" in refused.stderr
    assert cli(server, "shadow", "remove", "digits", "3").returncode == 0
    missing = cli(server, "shadow", "remove", "digits", "3")
    assert missing.returncode == 1 and "has no shadow '3'" in missing.stderr
    started = cli(server, "rollout", "start", "digits", "2", "--reason", "cli test")
    assert started.returncode == 0 and "progressing" in started.stdout, started.stderr
    assert "paused" in cli(server, "rollout", "pause", "digits").stdout
    twice = cli(server, "rollout", "pause", "digits")
    assert twice.returncode == 1 and "cannot pause while the rollout is paused" in twice.stderr
    assert "progressing" in cli(server, "rollout", "resume", "digits").stdout
    assert cli(server, "rollback", "digits", "--reason", "changed my mind").returncode == 0
    nothing = cli(server, "promote", "digits")
    assert nothing.returncode == 1
    assert "gateway: digits has no canary: nothing to promote" in nothing.stderr
    assert cli(server, "traffic", "set", "digits", "--canary", "2", "--weight", "5").returncode == 0
    promoted = cli(server, "promote", "digits", "--reason", "looks good")
    assert promoted.returncode == 0 and "stable 2" in promoted.stdout
    audit = cli(server, "audit", "digits", "--json", token=READ)
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    actions = [(r["action"], r["actor"], r["outcome"]) for r in records]
    assert "rollout_start" not in {a for a, _, _ in actions}
    assert ("start_rollout", "alice", "applied") in actions
    assert ("pause", "alice", "refused") in actions
    assert ("promote", "alice", "refused") in actions
    assert actions[-1] == ("promote", "alice", "applied")
    text = cli(server, "audit", "digits", token=READ)
    assert "REFUSED by alice" in text.stdout


def test_tokens_and_roles(server: Process) -> None:
    none = cli(server, "status", token=None)
    assert none.returncode == 3 and "missing bearer token" in none.stderr and "GATEWAY_TOKEN" in none.stderr
    wrong = cli(server, "status", token="x" * 24)
    assert wrong.returncode == 3 and "unknown token" in wrong.stderr
    assert cli(server, "status", token=READ).returncode == 0
    denied = cli(server, "traffic", "set", "digits", "--weight", "0", token=READ)
    assert denied.returncode == 3 and "has role read" in denied.stderr


def test_unreachable_control_api_says_what_to_do(server: Process) -> None:
    result = cli(server, "status", env={"GATEWAY_CONTROL": "127.0.0.1:1"})
    assert result.returncode == 4 and "is `gateway serve` running?" in result.stderr


@pytest.mark.parametrize("name", ["..", "../digits", "a/b", "/etc/passwd", "%2e%2e", "-rf", "x" * 65])
def test_models_load_refuses_unsafe_names(server: Process, name: str) -> None:
    result = cli(server, "models", "load", "--", name)
    assert result.returncode == 1
    assert "not allowed" in result.stderr or "not in the repository" in result.stderr


def test_models_load_refuses_symlink_escapes_and_reloads_while_serving(
    server: Process, repo: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(MODELS / "digits", outside)
    (repo / "sneaky").symlink_to(outside)
    escaped = cli(server, "models", "load", "sneaky")
    assert escaped.returncode == 1 and "outside the model repository" in escaped.stderr
    client = tc.InferenceServerClient(server.address)
    inp = tc.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    reload = subprocess.Popen(
        gateway_command("models", "load", "digits"),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "GATEWAY_CONTROL": server.control, "GATEWAY_TOKEN": WRITE},
    )
    answered = 0
    while reload.poll() is None:  # the old versions answer while the new ones load
        client.infer("digits", [inp])
        answered += 1
    out, err = reload.communicate()
    assert reload.returncode == 0, err
    assert "serving versions 1, 2, 3" in out
    assert answered > 0
    assert client.infer("digits", [inp]).as_numpy("label") is not None


def test_control_api_refuses_a_public_bind_without_tokens(tmp_path: Path) -> None:
    result = subprocess.run(
        gateway_command(
            "serve",
            "--models",
            str(MODELS),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--http-port",
            "-1",
            "--load",
            "digits",
            "--workers",
            "1",
            "--control-host",
            "0.0.0.0",
            "--control-port",
            "0",
            "--state-dir",
            str(tmp_path),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "GATEWAY_CONTROL_TOKENS"},
    )
    assert result.returncode == 2
    assert "refusing to serve the control API on 0.0.0.0 without tokens" in result.stderr


def test_report_plot_writes_a_png_of_the_rollout(server: Process, tmp_path: Path) -> None:
    assert cli(server, "traffic", "set", "digits", "--canary", "3", "--weight", "20").returncode == 0
    assert cli(server, "traffic", "set", "digits", "--weight", "0").returncode == 0
    out = tmp_path / "rollout.png"
    result = cli(server, "report", "digits", "--plot", str(out), token=READ)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
