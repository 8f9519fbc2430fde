"""What the executor process serves, and who still uses it: loads, reloads and unloads at run time.

Versions have ids that are never reused. Each model has a current generation:
the versions built from its files as they were at the last load, with a
fingerprint of those files (path, size, mtime of each). A LOAD from a front end
builds a new generation only when the files changed since; otherwise it answers
the current one, so the W workers of one `gateway models load` build it once.

A front end holds a version while one of its versions' executors (a
RemoteExecutor) points at it: HOLD when it makes one, RELEASE when that one
closes (an unload, or the old side of a reload once it drained). A version no
one holds is retired (drained, then its session closed) when:
- it is not current (a reload replaced it) and its last holder let go or left;
- it is current and its last holder released it (every worker unloaded the
  model): the model is no longer served here, and a later load builds it afresh.
A front end that leaves (or dies) drops its holds without retiring a current
version: its restart will want it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ModelLoadError
from gateway.serving.executor import drain_and_close
from gateway.serving.remote.server import Served

log = logging.getLogger(__name__)

# A model's files as last loaded: (path under the model's directory, size, mtime_ns) each.
Fingerprint = tuple[tuple[str, int, int], ...]
# Builds every version of a model (sessions on a thread, executors on the loop); the catalog numbers them.
Build = Callable[[str], Awaitable[list[Served]]]


def fingerprint(model_dir: Path) -> Fingerprint:
    """The model's files, as a reload must notice: any file added, removed, resized or rewritten."""
    found = []
    for root, _, files in os.walk(model_dir):
        for name in files:
            path = Path(root) / name
            st = path.stat()
            found.append((str(path.relative_to(model_dir)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


@dataclass(frozen=True, slots=True)
class Generation:
    fingerprint: Fingerprint
    ids: tuple[int, ...]


class Catalog:
    def __init__(
        self,
        versions: Sequence[Served],
        fingerprints: dict[str, Fingerprint],
        build: Build | None,
        locate: Callable[[str], Path] | None = None,
    ) -> None:
        self._build = build
        self._locate = locate  # the model's directory (checks the name), for its fingerprint
        self.by_id: dict[int, Served] = {v.id: v for v in versions}
        self.current: dict[str, Generation] = {}
        for v in versions:
            gen = self.current.get(v.model)
            ids = (*gen.ids, v.id) if gen is not None else (v.id,)
            self.current[v.model] = Generation(fingerprints.get(v.model, ()), ids)
        self._next_id = max(self.by_id, default=-1) + 1
        self._holds: dict[int, dict[object, int]] = {}  # version id -> holder -> count
        self._lock = asyncio.Lock()  # one load at a time: a second LOAD of a model finds the first's result
        self._retiring: set[asyncio.Task[None]] = set()

    def get(self, version_id: int) -> Served | None:
        return self.by_id.get(version_id)

    def current_versions(self) -> list[Served]:
        return [self.by_id[i] for gen in self.current.values() for i in gen.ids]

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # -- loads ----------------------------------------------------------------------------

    async def load(self, name: str) -> list[Served]:
        """The model's versions as its files are now: the current generation if they did not
        change since it was built, else a new one (the old one retires once no one holds it)."""
        if self._build is None or self._locate is None:
            raise ModelLoadError(f"{name}: this executor process does not load models at run time")
        async with self._lock:
            locate = self._locate
            found = await asyncio.to_thread(lambda: fingerprint(locate(name)))
            gen = self.current.get(name)
            if gen is not None and gen.fingerprint == found:
                return [self.by_id[i] for i in gen.ids]
            built = [dataclasses.replace(s, id=self.next_id()) for s in await self._build(name)]
            for served in built:
                self.by_id[served.id] = served
            self.current[name] = Generation(found, tuple(s.id for s in built))
            log.info(
                "%s %s in the executor (versions %s)",
                "reloaded" if gen is not None else "loaded",
                name,
                ", ".join(s.version for s in built),
            )
            if gen is not None:
                for old in gen.ids:
                    if not self._holds.get(old):
                        self._retire(old)
            return built

    # -- holds ----------------------------------------------------------------------------

    def hold(self, holder: object, version_id: int) -> None:
        if version_id not in self.by_id:
            log.warning("a front end holds version id %d, which is not served: ignored", version_id)
            return
        holders = self._holds.setdefault(version_id, {})
        holders[holder] = holders.get(holder, 0) + 1

    def release(self, holder: object, version_id: int) -> None:
        """A front end's executor of the version closed: retire it if it was the last one."""
        holders = self._holds.get(version_id)
        if not holders or holder not in holders:
            return
        holders[holder] -= 1
        if not holders[holder]:
            del holders[holder]
        if not holders:
            self._retire(version_id)

    def drop(self, holder: object) -> None:
        """A front end left: its holds go; versions no longer current and held by no one retire."""
        for version_id, holders in list(self._holds.items()):
            if holders.pop(holder, None) and not holders and not self._is_current(version_id):
                self._retire(version_id)

    def _is_current(self, version_id: int) -> bool:
        served = self.by_id.get(version_id)
        gen = None if served is None else self.current.get(served.model)
        return gen is not None and version_id in gen.ids

    def _retire(self, version_id: int) -> None:
        served = self.by_id.pop(version_id, None)
        self._holds.pop(version_id, None)
        if served is None:
            return
        gen = self.current.get(served.model)
        if gen is not None and version_id in gen.ids:
            # Its last holder unloaded it: the model leaves the executor (every version of it).
            del self.current[served.model]
            for other in gen.ids:
                if other != version_id and not self._holds.get(other):
                    self._retire(other)
        log.info("retiring %s version %s (id %d) in the executor", served.model, served.version, version_id)
        task = asyncio.get_running_loop().create_task(drain_and_close(served.executor))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Drain and close every version (the executor's end)."""
        await asyncio.gather(*(drain_and_close(v.executor) for v in self.by_id.values()), *self._retiring)
        self.by_id.clear()
