"""`gateway serve` as a subprocess: the address line, settings sources, startup errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import tritonclient.grpc as tc

from tests.onnx_models import write_identity_model
from tests.support import MODELS, ROOT, gateway_command, gateway_process


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        gateway_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_help_explains_every_flag() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for flag in ("--models", "--host", "--port", "--metrics-port", "--provider", "--config", "--grace"):
        assert flag in result.stdout
    assert "listening on HOST:PORT" in result.stdout
    assert "GATEWAY_" in result.stdout


def test_serve_prints_address_then_drains_on_sigterm() -> None:
    with gateway_process("--load", "digits") as server:
        client = tc.InferenceServerClient(server.address)
        assert client.is_server_ready()
        assert server.stop() == 0


def test_settings_from_environment_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[serve]\nload = ["mlp"]\nlog_level = "WARNING"\n')
    with gateway_process("--config", str(config), env={"GATEWAY_LOAD": "digits"}) as server:
        index = tc.InferenceServerClient(server.address).get_model_repository_index(as_json=True)["models"]
        # The environment wins over the file.
        assert {m["name"] for m in index} == {"digits"}
        server.stop()


def repo_with(tmp_path: Path, *names: str) -> Path:
    root = tmp_path / "repo"
    for name in names:
        shutil.copytree(MODELS / name, root / name)
    return root


def test_missing_model_file_stops_startup_naming_the_file(tmp_path: Path) -> None:
    root = repo_with(tmp_path, "digits")
    (root / "digits" / "2" / "model.onnx").unlink()
    result = run_cli("serve", "--models", str(root), "--port", "0", "--metrics-port", "-1", "--http-port", "-1")
    assert result.returncode == 2
    assert "digits/2/model.onnx: missing" in result.stderr


def test_corrupt_model_stops_startup_naming_the_file_and_problem(tmp_path: Path) -> None:
    root = repo_with(tmp_path, "digits")
    (root / "digits" / "3" / "model.onnx").write_bytes(b"this is not an onnx file")
    result = run_cli("serve", "--models", str(root), "--port", "0", "--metrics-port", "-1", "--http-port", "-1")
    assert result.returncode == 2
    assert "digits/3/model.onnx: cannot load ONNX model" in result.stderr


def test_bad_spec_stops_startup_naming_the_setting(tmp_path: Path) -> None:
    root = repo_with(tmp_path, "digits")
    (root / "digits" / "model.toml").write_text("max_batch_size = 8\n[batching]\nmax_queue_sise = 3\n")
    result = run_cli("serve", "--models", str(root), "--port", "0", "--metrics-port", "-1", "--http-port", "-1")
    assert result.returncode == 2
    assert "model.toml: unknown setting batching.max_queue_sise" in result.stderr


def test_bad_flag_value_is_a_usage_error() -> None:
    result = run_cli("serve", "--port", "70000", "--http-port", "-1")
    assert result.returncode == 2
    assert "port: 70000 is not a valid port" in result.stderr


def test_provider_cuda_refuses_to_start_without_cuda(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    write_identity_model(root / "ident" / "1" / "model.onnx", "FP32")
    args = ["--models", str(root), "--port", "0", "--metrics-port", "-1", "--http-port", "-1", "--provider", "cuda"]
    result = run_cli("serve", *args)
    assert result.returncode == 2
    assert "provider cuda: CUDA is not usable:" in result.stderr
