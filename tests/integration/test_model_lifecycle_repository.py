"""Broken model folders are errors naming the path and the expected layout (issue #21
item 19), as the README promises: a bad model stops startup."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from gateway.errors import ModelLoadError
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.serving.repository import Repository
from tests.onnx_models import write_identity_model
from tests.support import MODELS, ROOT, Running, gateway_command, gateway_in_thread

LAYOUT = "<name>/<version>/model.onnx"


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    """`gateway serve` that is expected to refuse to start (so it exits by itself)."""
    command = gateway_command(
        "serve", "--port", "0", "--metrics-port", "-1", "--http-port", "-1", "--control-port", "-1",
        "--provider", "cpu", *args,
    )  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def control(running: Running) -> rgrpc.ReleaseServiceStub:
    return rgrpc.ReleaseServiceStub(grpc.insecure_channel(running.control))


def digits_answer(running: Running) -> np.ndarray:
    client = tc.InferenceServerClient(running.address)
    inp = tc.InferInput("pixels", [2, 64], "FP32")
    inp.set_data_from_numpy(np.full((2, 64), 3.0, np.float32))
    result = client.infer("digits", [inp]).as_numpy("probabilities")
    assert result is not None
    return result


def _spec_only(root: Path) -> Path:
    (root / "broken").mkdir()
    (root / "broken" / "model.toml").write_text("max_batch_size = 4\n")
    return root / "broken"


def _model_beside_spec(root: Path) -> Path:
    write_identity_model(root / "broken" / "model.onnx", "FP32")
    (root / "broken" / "model.toml").write_text("max_batch_size = 4\n")
    return root / "broken" / "model.onnx"


def _model_only(root: Path) -> Path:
    write_identity_model(root / "broken" / "model.onnx", "FP32")
    return root / "broken" / "model.onnx"


def _stray_model_beside_versions(root: Path) -> Path:
    write_identity_model(root / "broken" / "1" / "model.onnx", "FP32")
    write_identity_model(root / "broken" / "model.onnx", "FP32")
    return root / "broken" / "model.onnx"


def _model_at_the_root(root: Path) -> Path:
    write_identity_model(root / "model.onnx", "FP32")
    return root / "model.onnx"


def _bad_folder_name(root: Path) -> Path:
    write_identity_model(root / "my model" / "1" / "model.onnx", "FP32")
    return root / "my model"


BROKEN = {
    "model.toml and no version folder": _spec_only,
    "model.onnx beside model.toml": _model_beside_spec,
    "model.onnx and nothing else": _model_only,
    "model.onnx beside the version folders": _stray_model_beside_versions,
    "model.onnx directly under the root": _model_at_the_root,
    "a folder name that is not allowed": _bad_folder_name,
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_model_folder_is_an_error_naming_the_path(tmp_path: Path, case: str) -> None:
    root = tmp_path / "repo"
    write_identity_model(root / "good" / "1" / "model.onnx", "FP32")
    culprit = BROKEN[case](root)
    with pytest.raises(ModelLoadError) as failure:
        Repository(root).model_names()
    message = str(failure.value)
    assert str(culprit.resolve()) in message or str(culprit) in message, message
    assert LAYOUT in message or "names match" in message, message


def test_a_broken_model_folder_stops_startup(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    _spec_only(root)
    result = serve("--models", str(root), "--workers", "1")
    assert result.returncode == 2, result.stderr
    assert "broken: no version folder" in result.stderr and LAYOUT in result.stderr


def test_folders_that_are_not_models_are_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    write_identity_model(root / "good" / "1" / "model.onnx", "FP32")
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".ipynb_checkpoints").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("retrain\n")
    (root / "README.md").write_text("models\n")
    (root / "build.py").write_text("")
    assert Repository(root).model_names() == ["good"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Running, Path]]:
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    with gateway_in_thread(root, controller=False) as running:
        yield running, root


def test_loading_a_broken_folder_at_run_time_names_the_layout(served: tuple[Running, Path]) -> None:
    running, root = served
    _spec_only(root)
    with pytest.raises(grpc.RpcError) as failure:
        control(running).LoadModel(rpb.ModelRequest(model="broken"))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no version folder" in (failure.value.details() or "")
    assert LAYOUT in (failure.value.details() or "")
    digits_answer(running)


def test_a_misnamed_model_file_is_still_found_and_named(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    write_identity_model(root / "misnamed" / "1" / "misnamed.onnx", "FP32")
    repository = Repository(root)
    assert repository.model_names() == ["misnamed"]
    with pytest.raises(ModelLoadError, match=r"misnamed/1/model\.onnx: missing"):
        repository.version_files("misnamed", "1")
