"""Keeping one serving process in step with the others through the store.

Releases change in whichever process a change was made (a worker's control
API, the controller, another replica); every process polls the store and serves
the change within about a second, and sooner where the store announces changes
(PostgreSQL's NOTIFY wakes the follower at once; the poll stays as the fallback).
With several workers each one also publishes its evidence, so the controller
decides on everyone's traffic, and the workers other than the receiver join the
labels it shares (gateway.release.feedback).
Run-time model loads travel their own way (gateway.release.model_sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from gateway.errors import StoreUnavailable
from gateway.release.feedback import RECEIVER, join_shared
from gateway.release.operations import ReleaseOps
from gateway.release.plane import ReleasePlane
from gateway.release.store import Store

log = logging.getLogger(__name__)

FOLLOW_EVERY_S = 0.5
SHARE_EVERY_S = 0.5


async def sync_loops(
    store: Store, plane: ReleasePlane, ops: ReleaseOps, worker_index: int
) -> list[Coroutine[Any, Any, None]]:
    """The loops to run for this process (each runs until cancelled), made ready before it serves.

    A worker (`worker_index` >= 0) also reads the other workers' evidence into its
    reports from here on (`plane.peers`).

    Done here, before the process serves, not when the loops' tasks first run: where
    each loop starts from, and a first publish of this worker's evidence. Worker 0
    waits for the answers of the workers that have published (`store.live_workers`):
    a worker that served predictions before its first publish, half a second in, was
    not waited for, and the labels for them came back "unknown" although it joined them.
    """
    loops = [follow_store(store, ops, await asyncio.to_thread(store.changes))]
    if worker_index >= 0:
        worker = str(worker_index)
        plane.peers = lambda model: store.peer_evidence(model, worker)
        if worker != RECEIVER:  # worker 0 joins labels as they arrive; the others, as it shares them
            loops.append(join_shared(plane, store, worker, await asyncio.to_thread(store.last_feedback_id)))
        with contextlib.suppress(StoreUnavailable):  # the store logs it; the loop publishes when it can
            await asyncio.to_thread(store.put_evidence, worker, _snapshots(plane))
        loops.append(share_evidence(store, plane, worker))
    return loops


async def follow_store(store: Store, ops: ReleaseOps, seen: int) -> None:
    """Serve changes other processes (workers, the controller, replicas) made after `seen`:
    at once when the store announces one, else within about a second."""
    loop = asyncio.get_running_loop()
    announced = asyncio.Event()

    def wake() -> None:
        """Called from the store's listener thread: the event is set on this loop's thread."""
        with contextlib.suppress(RuntimeError):  # the loop closed (the process is stopping)
            loop.call_soon_threadsafe(announced.set)

    store.on_change(wake)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(announced.wait(), FOLLOW_EVERY_S)
        announced.clear()
        try:
            now = await asyncio.to_thread(store.changes)
            if now != seen:
                seen = now
                ops.sync()
        except StoreUnavailable:
            pass  # the store logs its failures itself, rate-limited
        except Exception:
            log.exception("reading the release store failed")


def _snapshots(plane: ReleasePlane) -> dict[str, Any]:
    return {m: plane.evidence[m].snapshot() for m in plane.table.models()}


async def share_evidence(store: Store, plane: ReleasePlane, worker: str) -> None:
    """Several workers: publish this one's counts (labels are shared by gateway.release.feedback)."""
    while True:
        await asyncio.sleep(SHARE_EVERY_S)
        try:
            await asyncio.to_thread(store.put_evidence, worker, _snapshots(plane))
        except StoreUnavailable:
            pass  # the store logs its failures itself, rate-limited
        except Exception:
            log.exception("sharing evidence through the store failed")
