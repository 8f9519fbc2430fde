"""Loaded model versions and their readiness: state only.

The repository knows what is on disk; the registry knows what is loaded and
able to serve. Building a version (gateway.serving.builder) ends before the
registry sees it, so a version is never seen half-loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from gateway.config.spec import ModelSpec
from gateway.errors import ModelNotFound
from gateway.serving.executor import Executor
from gateway.serving.metrics import VersionMetrics
from gateway.serving.repository import version_sort_key
from gateway.serving.runtime import OnnxModel
from gateway.serving.statistics import VersionStats

PLATFORM = "onnxruntime_onnx"


@dataclass(slots=True)
class LoadedVersion:
    name: str
    version: str
    spec: ModelSpec
    model: OnnxModel
    executor: Executor
    stats: VersionStats = field(default_factory=VersionStats)
    metrics: VersionMetrics | None = None
    ready: bool = True


def default_version(spec: ModelSpec, versions: Iterable[str]) -> str:
    """The version served when a request names none: the spec's stable, else the highest."""
    return spec.release.stable or sorted(versions, key=version_sort_key)[-1]


@dataclass(slots=True)
class ModelEntry:
    name: str
    spec: ModelSpec
    versions: dict[str, LoadedVersion]
    default_version: str

    def sorted_versions(self) -> list[str]:
        return sorted(self.versions, key=version_sort_key)


class Registry:
    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}

    def add(self, entry: ModelEntry) -> ModelEntry | None:
        """Serve `entry`; returns the entry it replaces, if any (the caller drains it)."""
        previous = self._models.get(entry.name)
        self._models[entry.name] = entry
        return previous

    def remove(self, name: str) -> ModelEntry:
        entry = self.entry(name)
        del self._models[name]
        return entry

    def names(self) -> list[str]:
        return sorted(self._models)

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name[:80]!r} is not loaded (loaded: {', '.join(self.names()) or 'none'})")
        return entry

    def get(self, name: str, version: str = "") -> LoadedVersion:
        entry = self.entry(name)
        loaded = entry.versions.get(version or entry.default_version)
        if loaded is None:
            raise ModelNotFound(
                f"model {name!r} has no loaded version {version[:40]!r} (loaded: {', '.join(entry.sorted_versions())})"
            )
        return loaded

    def __iter__(self) -> Iterator[LoadedVersion]:
        for name in self.names():
            entry = self._models[name]
            for version in entry.sorted_versions():
                yield entry.versions[version]

    def ready(self) -> bool:
        return bool(self._models) and all(v.ready for v in self)

    async def close(self) -> None:
        for loaded in self:
            loaded.ready = False
            await loaded.executor.close()
