"""Loaded model versions and their readiness.

The repository knows what is on disk; the registry knows what is loaded and
able to serve. Loading builds the session, warms it up and wires its executor
before the version becomes visible, so a version is never seen half-loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gateway.config import GatewaySettings, ModelSpec
from gateway.errors import ModelNotFound
from gateway.executor import DirectExecutor, Executor, runs_inline
from gateway.providers import ProviderChooser
from gateway.repository import Repository, version_sort_key
from gateway.runtime import OnnxModel
from gateway.stats import VersionStats

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"


@dataclass(slots=True)
class LoadedVersion:
    name: str
    version: str
    spec: ModelSpec
    model: OnnxModel
    executor: Executor
    stats: VersionStats = field(default_factory=VersionStats)
    ready: bool = True


ExecutorFactory = Callable[[OnnxModel, ModelSpec, VersionStats], Executor]


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

    def add(self, entry: ModelEntry) -> None:
        self._models[entry.name] = entry

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


def direct_executor_factory(pool: ThreadPoolExecutor) -> ExecutorFactory:
    def build(model: OnnxModel, spec: ModelSpec, stats: VersionStats) -> Executor:
        return DirectExecutor(model, spec.batching, stats, pool)

    return build


def load_model(
    repository: Repository,
    name: str,
    settings: GatewaySettings,
    chooser: ProviderChooser,
    make_executor: ExecutorFactory,
) -> ModelEntry:
    """Load every version of one model; raises ModelLoadError naming the file on failure."""
    spec = repository.spec(name)
    versions: dict[str, LoadedVersion] = {}
    for version in repository.versions(name):
        files = repository.version_files(name, version)
        model = OnnxModel(files.path, chooser, settings.intra_op_threads)
        warm = model.warm_up()
        stats = VersionStats()
        versions[version] = LoadedVersion(name, version, spec, model, make_executor(model, spec, stats), stats)
        log.info(
            "loaded %s version %s on %s (warm-up run %.3f ms, %s)",
            name,
            version,
            model.provider,
            warm * 1e3,
            "inline on the event loop" if runs_inline(spec.batching, model) else "on worker threads",
        )
    if not versions:
        raise ModelNotFound(f"model {name!r} has no versions under {repository.root / name}")
    ordered = sorted(versions, key=version_sort_key)
    default = spec.release.stable or ordered[-1]
    if default not in versions:
        raise ModelNotFound(f"model {name!r}: release.stable names version {default!r}, which does not exist")
    return ModelEntry(name, spec, versions, default)
