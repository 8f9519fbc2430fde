"""Several gateway replicas (separate processes, separate ports) on one PostgreSQL database,
a real one (tests/postgres.py): a release change made through one replica is served by the
others within a second, and one controller leads them all, replaced within two analysis
intervals when it is killed."""

from __future__ import annotations

import shutil
import signal
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import psycopg
import pytest

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.controller import LEASE
from tests.support import MODELS, Process, gateway_process

pytest_plugins = ("tests.postgres",)

INTERVAL_S = 2.0


@pytest.fixture
def replica_repo(tmp_path: Path) -> Path:
    """The digits model with a short analysis interval (the failover bound is two of them)."""
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    spec = root / "digits" / "model.toml"
    spec.write_text(spec.read_text() + f"\n[policy]\ninterval_s = {INTERVAL_S}\n")
    return root


def start_replicas(stack: ExitStack, repo: Path, state_url: str, count: int) -> list[Process]:
    """Replicas r0, r1, ...: one serving process each (its controller's lease holder is `rN/0 pid P`)."""
    args = ("--models", str(repo), "--state-url", state_url, "--workers", "1")
    return [stack.enter_context(gateway_process(*args, "--replica-id", f"r{i}")) for i in range(count)]


def control(replica: Process) -> rgrpc.ReleaseServiceStub:
    return rgrpc.ReleaseServiceStub(grpc.insecure_channel(replica.control))


@pytest.fixture
def replicas(replica_repo: Path, state_url: str) -> Iterator[list[Process]]:
    with ExitStack() as stack:
        yield start_replicas(stack, replica_repo, state_url, 2)


def lease_holder(state_url: str) -> tuple[str, int] | None:
    with psycopg.connect(state_url) as conn:
        row = conn.execute(f"SELECT holder, epoch FROM leases WHERE name = '{LEASE}'").fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def test_a_weight_change_through_one_replica_is_served_by_the_other_within_a_second(
    replicas: list[Process],
) -> None:
    a, b = (control(r) for r in replicas)
    waits = []
    for weight in (100, 2500, 5000, 10, 0, 7500, 1, 9999):
        a.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=weight, reason="test"), timeout=10)
        changed = time.monotonic()
        while True:
            waited = time.monotonic() - changed
            release = b.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10)
            if release.canary == "2" and release.canary_weight_bp == weight:
                break
            assert waited < 1.0, f"replica B still serves {release.canary_weight_bp} bp after {waited:.2f} s"
            time.sleep(0.01)
        waits.append(waited)
    # NOTIFY wakes B at once; the half-second poll alone would average ~0.25 s.
    assert statistics.median(waits) < 0.2, waits


def test_one_controller_leads_and_another_takes_over_within_two_intervals_of_a_kill_9(
    replicas: list[Process], state_url: str
) -> None:
    pids = {f"r{i}/0 pid {r.proc.pid}": r for i, r in enumerate(replicas)}
    deadline = time.monotonic() + 10
    while (held := lease_holder(state_url)) is None or held[0] not in pids:
        assert time.monotonic() < deadline, f"no replica took the controller lease: {held}"
        time.sleep(0.1)
    holder, epoch = held
    leader = pids[holder]
    (survivor_holder,) = set(pids) - {holder}
    time.sleep(2.0)
    assert lease_holder(state_url) == (holder, epoch), "the lease moved while its holder ran"
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(10)
    killed = time.monotonic()
    while (now := lease_holder(state_url)) != (survivor_holder, epoch + 1):
        assert time.monotonic() - killed < 2 * INTERVAL_S, f"no takeover {2 * INTERVAL_S:g} s after the kill: {now}"
        time.sleep(0.05)
    # The survivor, now leading, still serves and changes releases.
    survivor = control(pids[survivor_holder])
    survivor.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=300, reason="t"), timeout=10)
    assert survivor.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10).canary_weight_bp == 300
