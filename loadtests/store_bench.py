"""How fast release changes reach the other processes, and what a decision's write costs, per store.

    python -m loadtests.store_bench --changes 200                         # starts a throwaway PostgreSQL
    python -m loadtests.store_bench --changes 200 --state-url postgresql://me@db/gw   # an existing one

Three measurements, p50 and p99 over `--changes` each:

- write: one decision as the controller commits it (the release, its audit row with a
  decision's evidence, the revision check, fenced by the controller's lease) on SQLite
  (a file in a temporary folder) and on PostgreSQL.
- store propagation: a change committed through one store object until a second one (as
  another process's follower: gateway.release.sync) sees it: on SQLite by its half-second
  poll (the workers of one host), on PostgreSQL woken by NOTIFY (the poll stays as fallback).
- replica propagation (PostgreSQL): two real `gateway serve` replicas; a weight change through
  A's control API until B's control API answers it: what an operator sees end to end.

A throwaway PostgreSQL needs the server binaries (initdb, pg_ctl), as the tests do.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from gateway.percentiles import quantile
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.controller import LEASE, LEASE_TTL_S
from gateway.release.state import ReleaseState
from gateway.release.store import FENCE, AuditEntry, Fence, SqliteStore, Store, StoredRelease
from gateway.release.store.postgres import PostgresStore
from gateway.release.sync import FOLLOW_EVERY_S
from gateway.server import launch

ROOT = Path(__file__).resolve().parent.parent
# A decision's evidence as the controller audits it: a dozen checks with their figures.
EVIDENCE = [
    {
        "check": f"check_{i}",
        "verdict": "pass",
        "value": 0.0123 * i,
        "low": -0.01,
        "high": 0.02,
        "bound": 0.05,
        "samples": 4000 + i,
        "needed": None,
    }
    for i in range(12)
]


def _initial(store: Store) -> StoredRelease:
    stored = StoredRelease(ReleaseState(model="bench", stable="1", canary="2", canary_weight_bp=0))
    entry = AuditEntry(actor="bench", action="init", model="bench", reason="", after=stored.to_dict(), revision=1)
    store.commit(None, stored, entry)
    return stored


def _decide(store: Store, current: StoredRelease, weight: int) -> StoredRelease:
    after = StoredRelease(
        dataclasses.replace(current.state, canary_weight_bp=weight, revision=current.revision + 1), current.rollout
    )
    entry = AuditEntry(
        actor="controller",
        action="advance",
        model="bench",
        reason="checks passed at step 2/5",
        before=current.to_dict(),
        after=after.to_dict(),
        evidence=EVIDENCE,
        revision=after.revision,
    )
    store.commit(current.revision, after, entry)
    return after


def _ms(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return quantile(ordered, 0.5) * 1e3, quantile(ordered, 0.99) * 1e3


def write_latency(open_store: Callable[[], Store], changes: int) -> tuple[float, float]:
    store = open_store()
    try:
        current = _initial(store)
        epoch = store.try_lease(LEASE, "bench", LEASE_TTL_S)
        assert epoch is not None
        token = FENCE.set(Fence(LEASE, "bench", epoch))
        took = []
        try:
            for i in range(changes):
                start = time.perf_counter()
                current = _decide(store, current, (i % 100) * 100)
                took.append(time.perf_counter() - start)
        finally:
            FENCE.reset(token)
        return _ms(took)
    finally:
        store.close()


def store_propagation(open_store: Callable[[], Store], changes: int) -> tuple[float, float]:
    """A commit through one store until another store object's follower sees it (as sync.follow_store)."""
    writer, follower = open_store(), open_store()
    woken = threading.Event()
    seen_changes: list[int] = []
    seen = threading.Condition()
    stop = threading.Event()
    follower.on_change(woken.set)

    def follow() -> None:
        last = follower.changes()
        while not stop.is_set():
            woken.wait(FOLLOW_EVERY_S)
            woken.clear()
            now = follower.changes()
            if now != last:
                last = now
                with seen:
                    seen_changes.append(now)
                    seen.notify_all()

    try:
        current = _initial(writer)
        time.sleep(2 * FOLLOW_EVERY_S)
        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        took = []
        for i in range(changes):
            # Changes arrive at random phases of the follower's poll, as they do in use.
            time.sleep(0.05 + (i * 0.037) % FOLLOW_EVERY_S)
            start = time.perf_counter()
            current = _decide(writer, current, (i % 100) * 100)
            with seen:
                seen.wait_for(lambda: seen_changes and seen_changes[-1] >= writer.changes(), timeout=10)
            took.append(time.perf_counter() - start)
        stop.set()
        woken.set()
        thread.join(5)
        return _ms(took)
    finally:
        writer.close()
        follower.close()


def replica_propagation(state_url: str, changes: int) -> tuple[float, float]:
    """Two real replicas on `state_url`: SetTraffic through A until B's GetRelease answers it."""
    models = Path(tempfile.mkdtemp(prefix="store-bench-models-"))
    shutil.copytree(ROOT / "models" / "digits", models / "digits")
    args = ["--models", str(models), "--state-url", state_url, "--workers", "1", "--port", "0", "--http-port", "-1"]
    args += ["--control-port", "0", "--metrics-port", "-1", "--dashboard-port", "-1", "--provider", "cpu"]
    # A state folder each: it holds the replica's lock (one gateway per folder), the release is in PostgreSQL.
    replicas = [
        launch.serve([*args, "--replica-id", f"bench-{i}", "--state-dir", str(models / f"state-{i}")]) for i in range(2)
    ]
    try:
        a, b = (rgrpc.ReleaseServiceStub(grpc.insecure_channel(r.control)) for r in replicas)
        took = []
        for i in range(changes):
            weight = 100 + (i % 50) * 100
            time.sleep(0.05 + (i * 0.037) % FOLLOW_EVERY_S)
            start = time.perf_counter()
            a.SetTraffic(
                rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=weight, reason="bench"), timeout=10
            )
            while b.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10).canary_weight_bp != weight:
                time.sleep(0.001)
            took.append(time.perf_counter() - start)
        return _ms(took)
    finally:
        for replica in replicas:
            replica.stop()
        shutil.rmtree(models, ignore_errors=True)


@contextlib.contextmanager
def postgres(url: str) -> Iterator[Callable[[], str]]:
    """Fresh databases on `url`'s server, or on a throwaway server when `url` is empty."""
    if url:
        yield lambda: url
        return
    from tests.postgres import start_server  # the tests' throwaway server: initdb, pg_ctl

    folder = Path(tempfile.mkdtemp(prefix="store-bench-pg-"))
    server = start_server(folder)
    try:
        yield server.new_database
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=200, help="changes per measurement (default 200)")
    parser.add_argument("--state-url", default="", help="a PostgreSQL database to use (default: a throwaway server)")
    options = parser.parse_args()
    n = options.changes
    folder = Path(tempfile.mkdtemp(prefix="store-bench-sqlite-"))
    names = (folder / f"write-{i}.db" for i in range(1_000_000))
    try:
        with postgres(options.state_url) as new_database:
            shared_url = new_database()
            rows = [
                ("sqlite: write one decision", write_latency(lambda: SqliteStore(next(names)), n)),
                ("sqlite: store propagation", store_propagation(lambda: SqliteStore(folder / "shared.db"), n)),
                ("postgresql: write one decision", write_latency(lambda: PostgresStore(new_database()), n)),
                ("postgresql: store propagation", store_propagation(lambda: PostgresStore(shared_url), n)),
                ("postgresql: replica A -> B (gRPC)", replica_propagation(new_database(), n)),
            ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{'measurement':36} {'p50 ms':>8} {'p99 ms':>8}   ({n} changes each)")
    for name, (p50, p99) in rows:
        print(f"{name:36} {p50:8.2f} {p99:8.2f}")


if __name__ == "__main__":
    main()
