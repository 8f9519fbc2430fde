"""Names from the network never choose a path (reliability row 13)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.errors import InvalidInput, ModelLoadError, ModelNotFound
from gateway.serving.repository import Repository, check_name
from tests.onnx_models import write_identity_model


@pytest.mark.parametrize(
    "name", ["..", ".", "../x", "a/b", "/etc", "a\\b", "", "-x", ".hidden", "a" * 65, "x\0y", "é", "a b"]
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="not allowed"):
        check_name("model", name)


@pytest.mark.parametrize("name", ["digits", "a", "A9._-z", "a" * 64, "1"])
def test_safe_names_pass(name: str) -> None:
    assert check_name("model", name) == name


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    write_identity_model(root / "good" / "1" / "model.onnx", "FP32")
    outside = tmp_path / "outside"
    write_identity_model(outside / "1" / "model.onnx", "FP32")
    os.symlink(outside, root / "escape")  # a model directory that leaves the root
    (root / "sneaky" / "1").mkdir(parents=True)
    os.symlink(outside / "1" / "model.onnx", root / "sneaky" / "1" / "model.onnx")
    return root


def test_symlinks_out_of_the_root_are_refused(repo: Path) -> None:
    repository = Repository(repo)
    assert repository.version_files("good", "1").path.name == "model.onnx"
    with pytest.raises(ModelLoadError, match="outside the model repository"):
        repository.version_files("escape", "1")
    with pytest.raises(ModelLoadError, match="outside the model repository"):
        repository.version_files("sneaky", "1")


def test_traversal_through_names_is_refused(repo: Path) -> None:
    repository = Repository(repo)
    with pytest.raises(InvalidInput):
        repository.version_files("..", "1")
    with pytest.raises(InvalidInput):
        repository.version_files("good", "../../outside/1")
    with pytest.raises(ModelNotFound):
        repository.version_files("absent", "1")
