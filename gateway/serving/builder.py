"""Building a model's versions from the repository: sessions, warm-up, executors, checks.

One builder serves every load, at startup and at run time (gateway.release.loader
decides when, and what the release plane does with the result). Building is in
two halves: `sessions` is blocking (onnxruntime builds and warms each version,
which is safe on a worker thread) and `assemble` attaches executors, which must
happen on the event loop. Nothing built here is served until the registry gets
the finished entry, so a version is never seen half-built.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gateway.config.settings import GatewaySettings, usable_cores
from gateway.config.spec import BatchingSpec, ModelSpec
from gateway.errors import ConfigError, GatewayError, ModelLoadError
from gateway.serving.batcher import DynamicBatcher
from gateway.serving.executor import DirectExecutor, Executor, runs_inline
from gateway.serving.metrics import GatewayMetrics, VersionMetrics
from gateway.serving.providers import ProviderChooser, cuda_options
from gateway.serving.registry import LoadedVersion, ModelEntry, default_version
from gateway.serving.repository import SPEC_FILE, Repository
from gateway.serving.runtime import OnnxModel
from gateway.serving.statistics import VersionStats

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[OnnxModel, ModelSpec, VersionStats, "VersionMetrics | None"], Executor]
# Executor mode: the executor process's runner of a (model, version); KeyError when it has none.
RemoteFactory = Callable[[str, str], Executor]
# Executor mode: have the executor process serve a model as its files are now (before assemble).
RemoteLoad = Callable[[str], Awaitable[None]]
# A rule of a layer above on a model's spec, checked before any session is built:
# (name, spec, versions, default version); raises GatewayError saying what is wrong.
SpecCheck = Callable[[str, ModelSpec, list[str], str], None]


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
    # Several runs overlap on a GPU (several threads on one CUDA session run faster
    # than one thread, see docs/performance.md), unlike on a CPU core.
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


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelBuilder:
    repository: Repository
    settings: GatewaySettings
    chooser: ProviderChooser
    make_executor: ExecutorFactory
    metrics: GatewayMetrics | None = None
    checks: Sequence[SpecCheck] = ()
    # Set in a front end of `--executors 1`: every version runs in the executor process.
    remote: RemoteFactory | None = None
    remote_load: RemoteLoad | None = None

    @classmethod
    def from_settings(
        cls,
        settings: GatewaySettings,
        pool: ThreadPoolExecutor,
        metrics: GatewayMetrics | None,
        checks: Sequence[SpecCheck] = (),
        remote: RemoteFactory | None = None,
        remote_load: RemoteLoad | None = None,
    ) -> ModelBuilder:
        chooser = ProviderChooser(
            settings.provider,
            cuda_options(
                settings.cuda_device, settings.cuda_mem_limit_mb, settings.cudnn_conv_algo_search, settings.cuda_graphs
            ),
        )
        if not settings.intra_op_threads:
            # onnxruntime sizes its pool by the machine, not by this process's CPU
            # mask (taskset, cpusets): give it the cores we may actually use.
            settings = dataclasses.replace(settings, intra_op_threads=usable_cores())
        return cls(
            repository=Repository(settings.models),
            settings=settings,
            chooser=chooser,
            make_executor=executor_factory(pool, batching=settings.batching == "spec"),
            metrics=metrics,
            checks=checks,
            remote=remote,
            remote_load=remote_load,
        )

    def model_names(self) -> list[str]:
        """The models to load at startup: those named by `load`, else every model in the repository."""
        names = list(self.settings.load) or self.repository.model_names()
        if not names:
            root = self.repository.root
            raise ConfigError(f"models: no models under {root} (expected <name>/<version>/model.onnx)")
        return names

    def sessions(self, name: str) -> LoadedSessions:
        """Build and warm every version's session; blocking, so safe to run on a worker thread.

        Raises ModelLoadError naming the file on failure; nothing is served until this returns.
        """
        repository = self.repository
        spec = repository.spec(name)
        versions = repository.check_layout(name)
        spec_file = repository.model_dir(name) / SPEC_FILE
        for check in self.checks:
            try:
                check(name, spec, versions, default_version(spec, versions))
            except GatewayError as exc:
                raise ModelLoadError(f"{spec_file}: {exc}") from None
        models: dict[str, OnnxModel] = {}
        for version in versions:
            files = repository.version_files(name, version)
            model = OnnxModel(files.path, self.chooser, self.settings.intra_op_threads)
            if model.on_cuda:
                model.use_buckets(gpu_defaults(spec, model).preferred_batch_sizes)
            # A spec naming an output this version lacks is refused here, before anything is served.
            spec.compare.output_index(model.output_names, f"{spec_file}, version {version}")
            model.warm_up(spec.max_batch_size)
            models[version] = model
        return LoadedSessions(name, spec, models)

    async def prepare_remote(self, name: str) -> None:
        """Executor mode, after `sessions` and before `assemble`: the executor process loads the
        model too (or reloads it if its files changed), so `assemble` finds its versions there."""
        if self.remote_load is not None:
            await self.remote_load(name)

    def assemble(self, sessions: LoadedSessions) -> ModelEntry:
        """Attach executors (on the event loop) and make the entry the registry serves."""
        name, spec = sessions.name, sessions.spec
        versions: dict[str, LoadedVersion] = {}
        for version, model in sessions.models.items():
            stats = VersionStats()
            bound = self.metrics.for_version(name, version) if self.metrics is not None else None
            if self.remote is not None:
                executor = self._remote(name, version)
                where, how = "the executor process", "batched there across the workers"
            else:
                executor = self.make_executor(model, spec, stats, bound)
                where, how = model.provider, describe(spec, model, executor)
            versions[version] = LoadedVersion(name, version, spec, model, executor, stats, bound)
            log.info(
                "loaded %s version %s on %s (warm-up run %.3f ms; %s)",
                name,
                version,
                where,
                model.warmup_seconds * 1e3,
                how,
            )
        return ModelEntry(name, spec, versions, default_version(spec, versions))

    def _remote(self, name: str, version: str) -> Executor:
        assert self.remote is not None
        try:
            return self.remote(name, version)
        except KeyError:
            raise ModelLoadError(
                f"{name} version {version}: the executor process does not serve it: "
                f"load it again (`gateway models load {name}`)"
            ) from None

    def note_provider(self) -> None:
        """After the startup loads: say once why `auto` runs on the CPU."""
        if self.chooser.cuda_reason and self.settings.provider == "auto":
            log.info("running on the CPU: %s", self.chooser.cuda_reason)
