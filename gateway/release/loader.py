"""The one model loader: at startup, and while serving (the control API's LoadModel/UnloadModel).

Building a model's versions is the serving plane's (gateway.serving.builder);
this module decides when, and what the release plane does with them. At
startup every model is built before anything is served, then the stored
releases are restored.

While serving it is load-before-unload: a reload builds and warms every new
session on a worker thread while the old versions keep answering; the registry
then switches in one step, and the old executors drain what they already
accepted before they close. A load is all-or-nothing: the files, the spec and
its [release] are checked before anything is swapped in, and should the swap
itself fail the previous model (or its absence) is put back exactly and the
new executors closed. Names reach here from the network, so they go through
the repository's checks (no `..`, no `/`, nothing outside the root).

With several worker processes, worker 0 (the control API) applies a change,
then every other worker applies it through the state database
(gateway.release.model_sync); the answer says what each one did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

from gateway.config.spec import ModelSpec
from gateway.errors import GatewayError, ModelLoadError, ModelNotFound
from gateway.release.model_sync import (
    ACK_POLL_S,
    ACK_WAIT_S,
    LOAD,
    POLL_S,
    UNLOAD,
    Intent,
    IntentStore,
    Rollcall,
    net_actions,
)
from gateway.release.operations import ReleaseOps
from gateway.release.plane import ReleasePlane
from gateway.release.state import initial_state
from gateway.serving.builder import ModelBuilder
from gateway.serving.executor import drain_and_close
from gateway.serving.registry import ModelEntry, Registry
from gateway.serving.repository import check_name

log = logging.getLogger(__name__)


async def close_entry(entry: ModelEntry) -> None:
    await asyncio.gather(*(drain_and_close(v.executor) for v in entry.versions.values()))


def check_release(name: str, spec: ModelSpec, versions: list[str], default: str) -> None:
    """Refuse a [release] naming versions that do not exist (or overlapping roles) before
    any session is built: the release plane would refuse it only after the swap."""
    try:
        initial_state(name, spec, versions, default)
    except GatewayError as exc:
        raise ModelLoadError(f"[release]: {exc}") from None


class ModelLoader:
    def __init__(self, builder: ModelBuilder, registry: Registry, plane: ReleasePlane, ops: ReleaseOps) -> None:
        self.builder = dataclasses.replace(builder, checks=(*builder.checks, check_release))
        self.registry = registry
        self.plane = plane
        self.ops = ops
        self._lock = asyncio.Lock()  # one local load/unload at a time
        # Held from a local change until its intent is written, so the other workers
        # see changes in the order this worker made them.
        self._order = asyncio.Lock()
        self._intents: IntentStore | None = None
        self._worker = ""
        self._last_intent = 0

    # -- this process -------------------------------------------------------------------

    async def load_at_startup(self) -> None:
        """Every model the settings name, before anything is served; then the stored releases.

        A model that cannot be built stops the startup (the caller unwinds what was built)."""
        async with self._lock:
            for name in self.builder.model_names():
                entry = await self._build(name)
                self.registry.add(entry)
                self.plane.add_model(name)
        self.builder.note_provider()
        self.ops.restore()

    async def _build(self, name: str) -> ModelEntry:
        # Sessions are built and warmed on a worker thread (the loop keeps serving
        # the versions loaded now); executors must be made on the loop.
        sessions = await asyncio.to_thread(self.builder.sessions, name)
        await self.builder.prepare_remote(name)  # executor mode: the executor process loads it too
        return self.builder.assemble(sessions)

    async def load(self, name: str) -> ModelEntry:
        check_name("model", name)
        async with self._lock:
            entry = await self._build(name)
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

    # -- every worker -------------------------------------------------------------------

    async def load_everywhere(self, name: str, wait_s: float = ACK_WAIT_S) -> tuple[ModelEntry, Rollcall]:
        """Load here, then on every other worker; raises NotEverywhere unless all running ones did."""
        async with self._order:
            entry = await self.load(name)
            intent = await self._publish(LOAD, name)
        call = await self._rollcall(intent, wait_s)
        call.check("loaded", name)
        return entry, call

    async def unload_everywhere(self, name: str, wait_s: float = ACK_WAIT_S) -> Rollcall:
        async with self._order:
            await self.unload(name)
            intent = await self._publish(UNLOAD, name)
        call = await self._rollcall(intent, wait_s)
        call.check("unloaded", name)
        return call

    async def _publish(self, action: str, name: str) -> int:
        if self._intents is None:
            return 0
        return await asyncio.to_thread(self._intents.publish, action, name, self._worker)

    async def _rollcall(self, intent: int, wait_s: float) -> Rollcall:
        if self._intents is None or not intent:
            return Rollcall(applied=[self._worker or "0"])
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            call, waiting = await asyncio.to_thread(self._intents.rollcall, intent, self._worker)
            if not waiting or asyncio.get_running_loop().time() >= deadline:
                return call
            await asyncio.sleep(ACK_POLL_S)

    async def join(self, intents: IntentStore, worker: str) -> None:
        """Before serving: apply this run's earlier loads and unloads (a restarted worker
        serves what the others serve), then register so worker 0 waits for this one."""
        found = await asyncio.to_thread(intents.intents_after, 0)
        for model, action in net_actions(found).items():
            loaded = model in self.registry.names()
            if (action == LOAD) != loaded:  # a model loaded at startup is already fresh from disk
                await self._apply(Intent(0, action, model, ""), worker)
        self._intents, self._worker = intents, worker
        self._last_intent = found[-1].id if found else 0
        await asyncio.to_thread(intents.register, worker, os.getpid())

    async def follow(self) -> None:
        """Apply the loads and unloads worker 0 publishes, and acknowledge each (runs until cancelled)."""
        intents, worker = self._intents, self._worker
        if intents is None:
            return
        try:
            while True:
                await asyncio.sleep(POLL_S)
                try:
                    for intent in await asyncio.to_thread(intents.intents_after, self._last_intent):
                        self._last_intent = intent.id
                        if intent.origin == worker:
                            continue  # this process made it, and applied it first
                        ok, detail = await self._apply(intent, worker)
                        await asyncio.to_thread(intents.ack, intent.id, worker, ok, detail)
                except Exception:
                    log.exception("following model loads and unloads through the store failed")
        finally:
            intents.close()

    async def _apply(self, intent: Intent, worker: str) -> tuple[bool, str]:
        try:
            if intent.action == LOAD:
                entry = await self.load(intent.model)
                return True, f"versions {', '.join(entry.sorted_versions())}"
            await self.unload(intent.model)
            return True, ""
        except ModelNotFound as exc:
            if intent.action == UNLOAD:
                return True, "was not loaded"
            log.error("worker %s: cannot load %s: %s", worker, intent.model, exc)
            return False, str(exc)
        except GatewayError as exc:
            log.error("worker %s: cannot %s %s: %s", worker, intent.action, intent.model, exc)
            return False, str(exc)
        except Exception as exc:
            log.exception("worker %s: cannot %s %s", worker, intent.action, intent.model)
            return False, f"internal error ({type(exc).__name__}; details are in the gateway log)"
