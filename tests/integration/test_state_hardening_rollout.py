"""A rollout's last step cannot be left half done, and one found half done is finished (#21 item 10)."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import grpc
import pytest

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.policy import Phase, RolloutState
from gateway.release.store import AuditEntry, SqliteStore, StoredRelease
from tests.support import MODELS, gateway_in_thread


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    return root


def leave_promoting(state_dir: Path, candidate: str) -> int:
    """What the old controller's first commit of the final step left when the process
    died before the second: canary at 100 %, rollout `promoting`. Written through the
    store's own API, exactly as that commit wrote it. Returns the stored revision."""
    store = SqliteStore(state_dir / "state.db")
    try:
        stored = store.load_all()["digits"]
        after = StoredRelease(
            dataclasses.replace(stored.state, canary=candidate, canary_weight_bp=10_000, revision=stored.revision + 1),
            RolloutState(phase=Phase.PROMOTING, step=1, candidate=candidate, started_at=time.time() - 60),
        )
        entry = AuditEntry(
            actor="controller",
            action="advance",
            model="digits",
            reason="all steps passed",
            before=stored.to_dict(),
            after=after.to_dict(),
            revision=after.revision,
            at=time.time(),
        )
        store.commit(stored.revision, after, entry)
        return after.revision
    finally:
        store.close()


def test_a_rollout_left_promoting_by_a_crash_is_finished_at_start(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with gateway_in_thread(repo, state_dir=state, controller=False):
        pass  # the store now holds digits' release, as after any earlier run
    revision = leave_promoting(state, "2")
    with gateway_in_thread(repo, state_dir=state) as running:
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(running.control))
        deadline = time.monotonic() + 30
        release = control.GetRelease(rpb.GetReleaseRequest(model="digits"))
        while release.phase != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.1)
            release = control.GetRelease(rpb.GetReleaseRequest(model="digits"))
        assert (release.phase, release.stable, release.canary, release.canary_weight_bp) == ("succeeded", "2", "", 0)
        assert release.revision == revision + 1
        last = control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records[-1]
        assert (last.action, last.actor, last.outcome) == ("promote", "controller", "applied")


def test_a_promotion_that_cannot_complete_is_rolled_back(repo: Path, tmp_path: Path) -> None:
    """A promotion left half done whose candidate cannot become stable (its version is
    no longer loaded): the controller undoes it rather than leave it at 100 %."""
    state = tmp_path / "state"
    with gateway_in_thread(repo, state_dir=state, controller=False):
        pass
    store = SqliteStore(state / "state.db")
    stored = store.load_all()["digits"]
    after = StoredRelease(
        dataclasses.replace(stored.state, canary="2", canary_weight_bp=10_000, revision=stored.revision + 1),
        RolloutState(phase=Phase.PROMOTING, step=1, candidate="9", started_at=time.time() - 60),
    )
    entry = AuditEntry(actor="controller", action="advance", model="digits", reason="x", revision=after.revision)
    store.commit(stored.revision, after, entry)
    store.close()
    with gateway_in_thread(repo, state_dir=state) as running:
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(running.control))
        deadline = time.monotonic() + 30
        release = control.GetRelease(rpb.GetReleaseRequest(model="digits"))
        while release.phase != "rolled_back" and time.monotonic() < deadline:
            time.sleep(0.1)
            release = control.GetRelease(rpb.GetReleaseRequest(model="digits"))
        assert (release.phase, release.stable, release.canary, release.canary_weight_bp) == ("rolled_back", "1", "", 0)


def test_the_final_step_is_one_transaction(repo: Path, tmp_path: Path) -> None:
    """`finish` stores full traffic and the promotion together: two audit records, one
    revision step each, and no moment where the store holds the first without the second."""
    state = tmp_path / "state"
    with gateway_in_thread(repo, state_dir=state, controller=False) as running:
        ops = running.gateway.ops
        assert ops is not None
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(running.control))
        control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="go"))
        before = control.GetRelease(rpb.GetReleaseRequest(model="digits")).revision
        seen: list[int] = []
        store = ops.store
        commit = store.commit

        def counting(*args: object) -> None:
            seen.append(1)
            commit(*args)  # type: ignore[arg-type]

        store.commit = counting  # type: ignore[method-assign,assignment]
        try:
            running.call(ops.finish("digits", "all steps passed"))
        finally:
            store.commit = commit  # type: ignore[method-assign]
        assert len(seen) == 1
        release = control.GetRelease(rpb.GetReleaseRequest(model="digits"))
        assert (release.phase, release.stable, release.revision) == ("succeeded", "2", before + 2)
        records = control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records[-2:]
        assert [(r.action, r.revision) for r in records] == [("advance", before + 1), ("promote", before + 2)]
