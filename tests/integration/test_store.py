"""Weight change + audit are atomic (reliability row 11), and the store's refusals, log and
lease, on both backends (SQLite, and a real PostgreSQL: tests/postgres.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from gateway.errors import ConfigError
from gateway.release.state import ReleaseState
from gateway.release.store import FENCE, AuditEntry, AuditOutcome, Conflict, Fence, LeaseLost, Store, StoredRelease
from tests.support import ROOT

if TYPE_CHECKING:  # imported by pytest as a plugin: importing it first would skip its assert rewriting
    from tests.postgres import Backend

pytest_plugins = ("tests.postgres",)


def initial(store: Store) -> StoredRelease:
    stored = StoredRelease(ReleaseState(model="m", stable="1", canary="2", canary_weight_bp=0))
    store.commit(
        None, stored, AuditEntry(actor="test", action="init", model="m", reason="", after=stored.to_dict(), revision=1)
    )
    return stored


def changed(current: StoredRelease, weight: int) -> StoredRelease:
    return StoredRelease(
        dataclasses.replace(current.state, canary_weight_bp=weight, revision=current.revision + 1), current.rollout
    )


def check_consistent(backend: Backend) -> int:
    """State is entirely old or new, and the audit rows match it one for one; returns the revision."""
    store = backend.open()  # opening SQLite runs the startup integrity check: ConfigError if corrupt
    try:
        stored = store.load_all()["m"]
        applied = [e for e in store.audit_log(model="m", limit=100_000) if e.outcome is AuditOutcome.APPLIED]
        # One audit row per revision: the init row and one for every committed change.
        assert len(applied) == stored.revision
        assert [e.revision for e in applied] == list(range(1, stored.revision + 1))
        assert applied[-1].after == stored.to_dict()
        return stored.revision
    finally:
        store.close()


def test_kill_9_during_500_changes_leaves_old_or_new_state_and_matching_audit(backend: Backend) -> None:
    store = backend.open()
    initial(store)
    store.close()
    rng = random.Random(11)
    changes = 0
    kills = 0
    while changes < 500:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "churn.py"), backend.target, str(500 - changes)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        # Kill at a random point: after a random number of commits, plus a random
        # fraction of the next one (commits take about a millisecond).
        for _ in range(rng.randint(1, 60)):
            if not proc.stdout.readline():
                break
        time.sleep(rng.uniform(0, 0.003))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=30)
        revision = check_consistent(backend)
        assert revision - 1 >= changes  # nothing committed is ever lost
        changes = revision - 1
    assert kills >= 5


def test_a_stale_revision_is_refused(backend: Backend) -> None:
    store = backend.open()
    first = initial(store)
    with pytest.raises(Conflict):
        store.commit(None, first, AuditEntry(actor="t", action="x", model="m", reason=""))
    with pytest.raises(Conflict, match="revision 1, expected 7"):
        store.commit(7, changed(first, 10), AuditEntry(actor="t", action="x", model="m", reason=""))
    audit = store.audit_log(model="m")
    assert [e.action for e in audit] == ["init"]
    store.record_refused(
        AuditEntry(actor="t", action="promote", model="m", reason="refused: no canary", outcome=AuditOutcome.REFUSED)
    )
    assert [(e.action, e.outcome) for e in store.audit_log(model="m")] == [("init", "applied"), ("promote", "refused")]
    assert store.audit_log(model="m", limit=1, offset=1)[0].action == "promote"
    assert store.audit_log(model="other") == []
    assert store.last_applied("m") is not None and store.last_applied("m").action == "init"  # type: ignore[union-attr]
    store.close()


def test_one_controller_lease_at_a_time_with_a_new_epoch_per_holder(backend: Backend) -> None:
    store = backend.open()
    assert store.try_lease("controller", "a", 0.3) == 1
    assert store.try_lease("controller", "b", 0.3) is None
    assert store.try_lease("controller", "a", 0.3) == 1  # renewal keeps the epoch
    time.sleep(0.35)
    assert store.try_lease("controller", "b", 0.3) == 2  # expired: taken over, the next epoch
    store.close()


def test_a_decision_under_a_lost_lease_is_not_committed(backend: Backend) -> None:
    """Fencing: a holder whose lease another took commits nothing, even though its
    revision is current; under the current epoch the same commit goes through."""
    store = backend.open()
    first = initial(store)
    old = store.try_lease("controller", "a", 0.1)
    assert old == 1
    time.sleep(0.15)
    new = store.try_lease("controller", "b", 10.0)
    assert new == 2
    entry = AuditEntry(actor="controller", action="advance", model="m", reason="r", revision=2)
    token = FENCE.set(Fence("controller", "a", old))
    try:
        with pytest.raises(LeaseLost, match="held by b at epoch 2"):
            store.commit(first.revision, changed(first, 500), entry)
    finally:
        FENCE.reset(token)
    assert store.load_all()["m"].revision == 1
    assert [e.action for e in store.audit_log(model="m")] == ["init"]
    token = FENCE.set(Fence("controller", "b", new))
    try:
        store.commit(first.revision, changed(first, 500), entry)
    finally:
        FENCE.reset(token)
    assert store.load_all()["m"].state.canary_weight_bp == 500
    store.close()


def test_evidence_and_labels_are_shared(backend: Backend) -> None:
    store = backend.open()
    store.put_evidence("0", {"m": {"n": 1}})
    store.put_evidence("1", {"m": {"n": 2}})
    assert store.peer_evidence("m", "0") == [{"n": 2}]
    assert store.live_workers() == {"0", "1"}
    first, last = store.add_feedback("m", [("r1", [1.0]), ("r2", [2.0])], "a/0")
    assert last == first + 1
    shared = store.feedback_after(first - 1)
    assert [(s.origin, s.request_id, s.labels) for s in shared] == [("a/0", "r1", [1.0]), ("a/0", "r2", [2.0])]
    assert store.last_feedback_id() == last
    store.record_feedback_outcomes("1", last, [(first, "joined", "")])
    progress, answers = store.feedback_answers(first, last)
    assert progress == {"1": last} and answers == [(first, "1", "joined", "")]
    store.close()


def test_a_damaged_release_row_stops_the_load_naming_the_model_and_the_fix(backend: Backend) -> None:
    store = backend.open()
    initial(store)
    store.close()
    damage = "UPDATE releases SET state = '{\"stable\": ' WHERE model = 'm'"  # written by hand, cut short
    if backend.name == "postgres":
        import psycopg

        with psycopg.connect(backend.target, autocommit=True) as conn:
            conn.execute(damage)
        fix = "restore the database from a backup"
    else:
        import sqlite3

        with contextlib.closing(sqlite3.connect(backend.target)) as db, db:
            db.execute(damage)
        fix = "restore it from a backup"
    store = backend.open()
    with pytest.raises(ConfigError) as caught:
        store.load_all()
    store.close()
    message = str(caught.value)
    assert "holds a release of model 'm' that cannot be read (JSONDecodeError" in message, message
    assert message.startswith("state_") and fix in message, message
