"""Loading and unloading models while serving (the control API's LoadModel/UnloadModel).

Load-before-unload: a reload builds and warms every new session on a worker
thread while the old versions keep answering; the registry then switches in
one step, and the old executors drain what they already accepted before they
close. A load is all-or-nothing: the files, the spec and its [release] are
checked before anything is swapped in, and should the swap itself fail the
previous model (or its absence) is put back exactly and the new executors
closed. Names reach here from the network, so they go through the
repository's checks (no `..`, no `/`, nothing outside the root).
"""

from __future__ import annotations

import asyncio
import logging

from gateway.config import GatewaySettings
from gateway.executor import drain_and_close
from gateway.metrics import GatewayMetrics
from gateway.operations import ReleaseOps
from gateway.providers import ProviderChooser
from gateway.registry import ExecutorFactory, ModelEntry, Registry, assemble, load_sessions
from gateway.release_plane import ReleasePlane
from gateway.repository import Repository, check_name

log = logging.getLogger(__name__)


async def close_entry(entry: ModelEntry) -> None:
    await asyncio.gather(*(drain_and_close(v.executor) for v in entry.versions.values()))


class ModelLoader:
    def __init__(
        self,
        repository: Repository,
        settings: GatewaySettings,
        chooser: ProviderChooser,
        make_executor: ExecutorFactory,
        metrics: GatewayMetrics,
        registry: Registry,
        plane: ReleasePlane,
        ops: ReleaseOps,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.chooser = chooser
        self.make_executor = make_executor
        self.metrics = metrics
        self.registry = registry
        self.plane = plane
        self.ops = ops
        self._lock = asyncio.Lock()

    async def load(self, name: str) -> ModelEntry:
        check_name("model", name)
        async with self._lock:
            sessions = await asyncio.to_thread(load_sessions, self.repository, name, self.settings, self.chooser)
            entry = assemble(sessions, self.make_executor, self.metrics)
            try:
                previous = self._swap_in(entry)
            except BaseException:
                await close_entry(entry)
                raise
            log.info(
                "%s %s (versions %s)", "reloaded" if previous else "loaded", name, ", ".join(entry.sorted_versions())
            )
        if previous is not None:
            await close_entry(previous)
        return entry

    def _swap_in(self, entry: ModelEntry) -> ModelEntry | None:
        """Serve `entry`; on any failure put back what was served before. No await in
        here, so no request ever sees the model between the two states."""
        name = entry.name
        before = self.plane.table.get(name) if name in self.plane.table.models() else None
        rollout = self.ops.rollouts.get(name)
        previous = self.registry.add(entry)
        try:
            self.plane.add_model(name)
            self.ops.adopt(name)
        except BaseException:
            if previous is None:
                self.registry.remove(name)
                self.plane.remove_model(name)
                self.ops.forget(name)
            else:
                self.registry.add(previous)
                self.plane.restore_model(name, before)
                if rollout is not None:
                    self.ops.rollouts[name] = rollout
            raise
        return previous

    async def unload(self, name: str) -> None:
        check_name("model", name)
        async with self._lock:
            entry = self.registry.remove(name)
            self.plane.remove_model(name)
            self.ops.forget(name)
        await close_entry(entry)
        log.info("unloaded %s", name)
