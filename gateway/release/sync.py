"""Keeping one serving process in step with the others through the store.

Releases change in whichever process a change was made (a worker's control
API, the controller); every process polls the store and serves the change
within about a second. With several workers each one also publishes its
evidence, so the controller decides on everyone's traffic, and the workers
other than the receiver join the labels it shares (gateway.release.feedback).
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
from gateway.release.store import SqliteStore

log = logging.getLogger(__name__)

FOLLOW_EVERY_S = 0.5
SHARE_EVERY_S = 0.5


async def sync_loops(
    store: SqliteStore, plane: ReleasePlane, ops: ReleaseOps, worker_index: int
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


async def follow_store(store: SqliteStore, ops: ReleaseOps, seen: int) -> None:
    """Serve changes other processes (workers, the controller) made after `seen`, within about a second."""
    while True:
        await asyncio.sleep(FOLLOW_EVERY_S)
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


async def share_evidence(store: SqliteStore, plane: ReleasePlane, worker: str) -> None:
    """Several workers: publish this one's counts (labels are shared by gateway.release.feedback)."""
    while True:
        await asyncio.sleep(SHARE_EVERY_S)
        try:
            await asyncio.to_thread(store.put_evidence, worker, _snapshots(plane))
        except StoreUnavailable:
            pass  # the store logs its failures itself, rate-limited
        except Exception:
            log.exception("sharing evidence through the store failed")
