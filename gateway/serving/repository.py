"""The model repository on disk: `<root>/<name>/<version>/model.onnx` + `<root>/<name>/model.toml`.

Names that reach us from the network never choose a path on their own: every
name must match NAME_PATTERN, and every resolved path must stay under the
repository root (a symlink that escapes it is refused).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gateway.config.spec import ModelSpec, load_model_spec
from gateway.errors import ConfigError, InvalidInput, ModelLoadError, ModelNotFound

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODEL_FILE = "model.onnx"
SPEC_FILE = "model.toml"
LAYOUT = f"<name>/<version>/{MODEL_FILE} (and an optional <name>/{SPEC_FILE})"


def check_name(kind: str, name: str) -> str:
    """Refuse names that could reach outside the repository (`..`, `/`, NUL, too long)."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(f"{kind} name {name[:80]!r} is not allowed: names match {NAME_PATTERN.pattern}")
    return name


def version_sort_key(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically, others after them by name."""
    return (0, int(version)) if version.isdigit() else (1, version)


@dataclass(frozen=True, slots=True)
class VersionFiles:
    name: str
    version: str
    path: Path


class Repository:
    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise ConfigError(f"models: {root} is not a directory")
        self.root = root.resolve()

    def _inside(self, path: Path, what: str) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ModelLoadError(f"{what} {path} resolves outside the model repository {self.root}: refused")
        return resolved

    def model_names(self) -> list[str]:
        """Every model folder under the root; a folder that looks like a model but is
        laid out wrong is an error (startup stops naming it) rather than skipped, so a
        model never goes missing without a word."""
        names = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue  # .git, editor and notebook folders: never models
            if entry.is_file() and entry.suffix == ".onnx":
                raise ModelLoadError(f"{entry}: a model file directly under the repository; expected {LAYOUT}")
            if not entry.is_dir() or not _looks_like_model(entry):
                continue
            if not NAME_PATTERN.fullmatch(entry.name):
                raise ModelLoadError(
                    f"{entry}: model folder name not allowed (names match {NAME_PATTERN.pattern}); rename it"
                )
            self.check_layout(entry.name)
            names.append(entry.name)
        return names

    def check_layout(self, name: str) -> list[str]:
        """The model's versions; raises ModelLoadError naming the path for a folder laid out wrong."""
        path = self.model_dir(name)
        stray = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix == ".onnx")
        if stray:
            raise ModelLoadError(f"{path / stray[0]}: a model file outside a version folder; expected {LAYOUT}")
        versions = self.versions(name)
        if not versions:
            raise ModelLoadError(f"{path}: no version folder; expected {LAYOUT}")
        return versions

    def model_dir(self, name: str) -> Path:
        check_name("model", name)
        path = self.root / name
        if not path.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the repository")
        return self._inside(path, f"model {name!r}")

    def versions(self, name: str) -> list[str]:
        """Version directories of a model (those that hold anything count)."""
        path = self.model_dir(name)
        found = [d.name for d in path.iterdir() if d.is_dir() and NAME_PATTERN.fullmatch(d.name)]
        return sorted(found, key=version_sort_key)

    def version_files(self, name: str, version: str) -> VersionFiles:
        check_name("version", version)
        directory = self.model_dir(name) / version
        if not directory.is_dir():
            raise ModelNotFound(f"model {name!r} has no version {version!r}")
        model_file = directory / MODEL_FILE
        if not model_file.is_file():
            raise ModelLoadError(f"{model_file}: missing (every version directory needs {MODEL_FILE})")
        return VersionFiles(name, version, self._inside(model_file, "model file"))

    def spec(self, name: str) -> ModelSpec:
        """The model's spec (defaults when it has no model.toml)."""
        spec_file = self.model_dir(name) / SPEC_FILE
        if spec_file.exists():
            self._inside(spec_file, "spec file")
        return load_model_spec(spec_file)


def _looks_like_model(folder: Path) -> bool:
    """A folder holding a spec or an ONNX file, itself or one level down (a version
    folder whose file is misnamed still counts: loading it then names the file)."""
    for entry in folder.iterdir():
        if entry.is_file() and (entry.name == SPEC_FILE or entry.suffix == ".onnx"):
            return True
        if entry.is_dir() and not entry.name.startswith(".") and any(entry.glob("*.onnx")):
            return True
    return False
