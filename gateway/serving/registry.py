"""Loaded model versions and their readiness.

The repository knows what is on disk; the registry knows what is loaded and
able to serve. Loading builds the session, warms it up and wires its executor
before the version becomes visible, so a version is never seen half-loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gateway.config.settings import GatewaySettings
from gateway.config.spec import BatchingSpec, ModelSpec
from gateway.errors import GatewayError, ModelLoadError, ModelNotFound
from gateway.release.state import initial_state
from gateway.serving.batcher import DynamicBatcher
from gateway.serving.executor import DirectExecutor, Executor, runs_inline
from gateway.serving.metrics import GatewayMetrics, VersionMetrics
from gateway.serving.providers import ProviderChooser
from gateway.serving.repository import SPEC_FILE, Repository, version_sort_key
from gateway.serving.runtime import OnnxModel
from gateway.serving.statistics import VersionStats

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
    metrics: VersionMetrics | None = None
    ready: bool = True


ExecutorFactory = Callable[[OnnxModel, ModelSpec, VersionStats, "VersionMetrics | None"], Executor]


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


def executor_factory(pool: ThreadPoolExecutor, batching: bool = True) -> ExecutorFactory:
    """Dynamic batching where the spec enables it and the model has a batch dimension."""

    def build(model: OnnxModel, spec: ModelSpec, stats: VersionStats, metrics: VersionMetrics | None) -> Executor:
        if batching and spec.batching.enabled and spec.max_batch_size > 1:
            return DynamicBatcher(model, gpu_defaults(spec, model), spec.max_batch_size, stats, pool, metrics)
        return DirectExecutor(model, spec.batching, stats, pool)

    return build


def gpu_defaults(spec: ModelSpec, model: OnnxModel) -> BatchingSpec:
    """On the GPU one run of many rows costs about what one row does: unless the spec
    says otherwise, batch toward power-of-two sizes (which are also the CUDA-graph
    buckets), and keep several batches in flight."""
    batching = spec.batching
    if not model.on_cuda:
        return batching
    # Several runs overlap on a GPU (four threads on one CUDA session gave 2.7x
    # one thread's rate, performance.md), unlike on a CPU core.
    instances = max(batching.instances, 4)
    sizes = batching.preferred_batch_sizes or tuple(2**k for k in range(3, 11) if 2**k <= spec.max_batch_size)
    return dataclasses.replace(batching, preferred_batch_sizes=sizes, instances=instances)


def describe(spec: ModelSpec, model: OnnxModel, executor: Executor) -> str:
    execution = spec.batching.execution
    where = {"inline": "inline on the event loop", "thread": "on threads"}.get(execution, "")
    if execution == "auto":
        limit = max(1, spec.max_batch_size)
        inline_rows = [r for r in (1, 8, 64, 512) if r <= limit and runs_inline(execution, model, r)]
        where = f"inline up to {inline_rows[-1]} rows, else threads" if inline_rows else "on threads"
    kind = f"batching up to {spec.max_batch_size} rows" if isinstance(executor, DynamicBatcher) else "no batching"
    return f"{kind}, {where}"


@dataclass(slots=True)
class LoadedSessions:
    """A model's sessions, built and warm, before executors are attached (which needs the loop)."""

    name: str
    spec: ModelSpec
    models: dict[str, OnnxModel]


def load_sessions(
    repository: Repository, name: str, settings: GatewaySettings, chooser: ProviderChooser
) -> LoadedSessions:
    """Build and warm every version's session; blocking, so safe to run on a worker thread.

    Raises ModelLoadError naming the file on failure; nothing is served until this returns.
    """
    spec = repository.spec(name)
    versions = repository.check_layout(name)
    _check_release(repository, name, spec, versions)
    models: dict[str, OnnxModel] = {}
    for version in versions:
        files = repository.version_files(name, version)
        model = OnnxModel(files.path, chooser, settings.intra_op_threads)
        if model.on_cuda:
            model.use_buckets(gpu_defaults(spec, model).preferred_batch_sizes)
        # A spec naming an output this version lacks is refused here, before anything is served.
        spec.compare.output_index(model.output_names, f"{repository.model_dir(name) / SPEC_FILE}, version {version}")
        model.warm_up(spec.max_batch_size)
        models[version] = model
    return LoadedSessions(name, spec, models)


def _check_release(repository: Repository, name: str, spec: ModelSpec, versions: list[str]) -> None:
    """Refuse a [release] naming versions that do not exist (or overlapping roles) before
    any session is built: the release plane would refuse it only after the swap."""
    default = spec.release.stable or sorted(versions, key=version_sort_key)[-1]
    try:
        initial_state(name, spec, versions, default)
    except GatewayError as exc:
        raise ModelLoadError(f"{repository.model_dir(name) / SPEC_FILE}: [release]: {exc}") from None


def assemble(
    sessions: LoadedSessions, make_executor: ExecutorFactory, metrics: GatewayMetrics | None = None
) -> ModelEntry:
    """Attach executors (on the event loop) and make the entry the registry serves."""
    name, spec = sessions.name, sessions.spec
    versions: dict[str, LoadedVersion] = {}
    for version, model in sessions.models.items():
        stats = VersionStats()
        bound = metrics.for_version(name, version) if metrics is not None else None
        executor = make_executor(model, spec, stats, bound)
        versions[version] = LoadedVersion(name, version, spec, model, executor, stats, bound)
        log.info(
            "loaded %s version %s on %s (warm-up run %.3f ms; %s)",
            name,
            version,
            model.provider,
            model.warmup_seconds * 1e3,
            describe(spec, model, executor),
        )
    default = spec.release.stable or sorted(versions, key=version_sort_key)[-1]
    return ModelEntry(name, spec, versions, default)


def load_model(
    repository: Repository,
    name: str,
    settings: GatewaySettings,
    chooser: ProviderChooser,
    make_executor: ExecutorFactory,
    metrics: GatewayMetrics | None = None,
) -> ModelEntry:
    """Load every version of one model (startup: on the loop, before anything is served)."""
    return assemble(load_sessions(repository, name, settings, chooser), make_executor, metrics)
