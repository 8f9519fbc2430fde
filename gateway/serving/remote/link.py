"""A front end's link to its executor: connected at startup, and again after the executor restarts.

`gateway serve --executors 1` starts the executor before the front ends, and
restarts it when it dies. Each front end holds one `ExecutorLink`; the versions it
serves hold `RemoteExecutor`s made by the link. When the executor goes, the
connection fails its calls in flight at once (UNAVAILABLE: `ExecutorLost`), and the
link tries the executor's address again until the restarted one answers; it then
points every RemoteExecutor at the new connection (by model and version: the new
executor numbers its versions afresh) and unmaps the old arena. Nothing on the
request path changes: a RemoteExecutor reads its connection as before.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable

from gateway.errors import GatewayError, ModelLoadError
from gateway.serving.registry import LoadedVersion
from gateway.serving.remote.client import ExecutorLost, RemoteConnection, RemoteExecutor

log = logging.getLogger(__name__)

# A statistics call waits this long for the executor; past it the last figures stand.
STATISTICS_WAIT_S = 2.0
# Between tries while the executor is away: a restart takes a second or more (a new
# process loads and warms its models), and a refused connect costs microseconds.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 0.5
# A run-time load waits this long for the executor to build and warm the model's sessions.
LOAD_WAIT_S = 120.0


class ExecutorLink:
    def __init__(self, address: str, connection: RemoteConnection) -> None:
        self.address = address
        self.connection = connection
        self.reconnects = 0
        # The versions' executors; an unloaded version's goes with it.
        self._executors: weakref.WeakSet[RemoteExecutor] = weakref.WeakSet()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        connection.on_lost = self._lost

    @classmethod
    async def connect(cls, address: str, timeout_s: float = 30.0) -> ExecutorLink:
        """Connect to the executor at `address`, trying again until `timeout_s` (it may be starting)."""
        return cls(address, await _connect(address, timeout_s))

    def executor(self, model: str, version: str) -> RemoteExecutor:
        """The version's executor on this link; KeyError when the executor does not serve it."""
        executor = self.connection.executor(model, version)
        self._executors.add(executor)
        return executor

    async def load(self, model: str) -> None:
        """Before a run-time load (or reload) builds this front end's versions of `model`: have the
        executor serve it as its files are now, within LOAD_WAIT_S. ModelLoadError otherwise."""
        try:
            async with asyncio.timeout(LOAD_WAIT_S):
                await self.connection.load(model)
        except TimeoutError:
            raise ModelLoadError(
                f"{model}: the executor process did not finish loading it within {LOAD_WAIT_S:.0f} s "
                "(its log says why); nothing changed here: try again"
            ) from None
        except ExecutorLost:
            raise ModelLoadError(
                f"{model}: the executor process went away while loading it (it is being restarted): try again"
            ) from None

    def _lost(self) -> None:
        if self._closed or (self._task is not None and not self._task.done()):
            return
        log.warning("the executor process (pid %d) is gone: connecting again", self.connection.executor_pid)
        self._task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        connection = await _connect(self.address, None)
        if self._closed:
            await connection.close()
            return
        old, self.connection = self.connection, connection
        # Closed ones (unloaded, or the old side of a reload) may linger until collected: not wanted.
        executors = [e for e in self._executors if not e.closed]
        # Models loaded at run time are not in a restarted executor's startup set: load them again.
        wanted = {(e.version.model, e.version.version) for e in executors}
        for model in sorted({m for m, v in wanted if (m, v) not in connection.versions}):
            try:
                async with asyncio.timeout(LOAD_WAIT_S):
                    await connection.load(model)
            except (GatewayError, TimeoutError) as exc:
                log.error("the restarted executor cannot load %s: %s", model, exc)
        missing: list[str] = []
        for executor in executors:
            info = connection.versions.get((executor.version.model, executor.version.version))
            if info is None:
                # Left on the lost connection: its requests answer UNAVAILABLE.
                missing.append(f"{executor.version.model} {executor.version.version}")
                continue
            executor.attach(connection, info)
        connection.on_lost = self._lost
        self.reconnects += 1
        await old.close()
        log.info("connected to the executor again (pid %d)", connection.executor_pid)
        if missing:
            log.error("the restarted executor does not serve %s", ", ".join(missing))
        if connection.lost:
            self._lost()  # it went again while this swapped

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        await self.connection.close()


async def _connect(address: str, timeout_s: float | None) -> RemoteConnection:
    loop = asyncio.get_running_loop()
    give_up = None if timeout_s is None else loop.time() + timeout_s
    delay = RETRY_FIRST_S
    while True:
        try:
            return await RemoteConnection.connect(address)
        except (OSError, ConnectionError):
            if give_up is not None and loop.time() >= give_up:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_S)


async def refresh_statistics(versions: Iterable[LoadedVersion]) -> None:
    """Before statistics are read: the executor's counts of runs, batches and queue times
    go into each remote version's stats (a no-op for versions run in this process).

    The executor's batcher runs every front end's requests in shared batches, so only it
    can count executions truthfully; requests answered and their end-to-end times stay
    this front end's own. An executor that is away leaves the last figures in place."""
    remote = [v for v in versions if isinstance(v.executor, RemoteExecutor)]
    if not remote:
        return
    pulls = [v.executor.pull_statistics(v.stats) for v in remote if isinstance(v.executor, RemoteExecutor)]
    try:
        async with asyncio.timeout(STATISTICS_WAIT_S):
            results = await asyncio.gather(*pulls, return_exceptions=True)
    except TimeoutError:
        log.warning("the executor did not send statistics within %.0f s", STATISTICS_WAIT_S)
        return
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, GatewayError):
            log.warning("reading the executor's statistics failed: %r", result)
