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
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.errors import StoreUnavailable
from gateway.release.feedback import join_shared
from gateway.release.operations import ReleaseOps
from gateway.release.plane import ReleasePlane
from gateway.release.store import Store

log = logging.getLogger(__name__)

FOLLOW_EVERY_S = 0.5
SHARE_EVERY_S = 0.5


def member_name(replica_id: str, worker_index: int, shared_store: bool) -> str | None:
    """This process's name among those sharing evidence and labels through the store
    (replica/worker), or None for a process with nobody to share with: a single serving
    process on SQLite. On a shared (PostgreSQL) store even one process shares: other
    replicas are its peers."""
    if worker_index < 0 and not shared_store:
        return None
    return f"{replica_id}/{max(worker_index, 0)}"


async def sync_loops(
    store: Store,
    plane: ReleasePlane,
    ops: ReleaseOps,
    member: str | None,
    reachable: Callable[[bool], None] = lambda up: None,
) -> list[Coroutine[Any, Any, None]]:
    """The loops to run for this process (each runs until cancelled), made ready before it serves.

    A member (see member_name) also reads the other members' evidence into its reports
    from here on (`plane.peers`), and joins the labels the others share.

    Done here, before the process serves, not when the loops' tasks first run: where
    each loop starts from, and a first publish of this member's evidence. The receiver
    of labels waits for the answers of the members that have published
    (`store.live_workers`): one that served predictions before its first publish, half
    a second in, was not waited for, and the labels for them came back "unknown"
    although it joined them.
    """
    loops = [follow_store(store, ops, await asyncio.to_thread(store.changes), reachable)]
    if member is not None:
        worker = member
        # Read off the loop (a store that is slow or down must not stall inference) and kept:
        # reports and decisions use the copy, at most SHARE_EVERY_S old.
        peers = PeerEvidence()
        plane.peers = peers.of
        loops.append(join_shared(plane, store, worker, await asyncio.to_thread(store.last_feedback_id)))
        with contextlib.suppress(StoreUnavailable):  # the store logs it; the loop publishes when it can
            await _exchange(store, plane, worker, peers)
        loops.append(share_evidence(store, plane, worker, peers))
    return loops


async def follow_store(
    store: Store, ops: ReleaseOps, seen: int, reachable: Callable[[bool], None] = lambda up: None
) -> None:
    """Serve changes other processes (workers, the controller, replicas) made after `seen`:
    at once when the store announces one, else within about a second. Each look tells
    `reachable` whether the store answered (a metric: an outage is visible at once)."""
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
            reachable(True)
            if now != seen:
                seen = now
                ops.sync()
        except StoreUnavailable:
            reachable(False)  # the store logs its failures itself, rate-limited
        except Exception:
            log.exception("reading the release store failed")


def _snapshots(plane: ReleasePlane) -> dict[str, Any]:
    return {m: plane.evidence[m].snapshot() for m in plane.table.models()}


class PeerEvidence:
    """The other members' latest evidence, per model, as last read from the store."""

    def __init__(self) -> None:
        self.by_model: dict[str, list[dict[str, Any]]] = {}

    def of(self, model: str) -> list[dict[str, Any]]:
        return self.by_model.get(model, [])


async def _exchange(store: Store, plane: ReleasePlane, worker: str, peers: PeerEvidence) -> None:
    """Publish this member's counts and read everyone else's: the snapshot taken on the loop
    (the counts change there), the store I/O in a thread."""
    snapshots = _snapshots(plane)

    def io() -> dict[str, list[dict[str, Any]]]:
        store.put_evidence(worker, snapshots)
        return {m: store.peer_evidence(m, worker) for m in snapshots}

    peers.by_model = await asyncio.to_thread(io)


async def share_evidence(store: Store, plane: ReleasePlane, worker: str, peers: PeerEvidence) -> None:
    """Several members: publish this one's counts, read the others' (labels are shared by
    gateway.release.feedback). While the store is down the counts keep growing here and
    the next publish after it returns carries them all: cumulative counts need no buffer."""
    while True:
        await asyncio.sleep(SHARE_EVERY_S)
        try:
            await _exchange(store, plane, worker, peers)
        except StoreUnavailable:
            pass  # the store logs its failures itself, rate-limited
        except Exception:
            log.exception("sharing evidence through the store failed")
