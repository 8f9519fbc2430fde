"""Weight change + audit are atomic (reliability row 11), and the store's refusals and log."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.release.state import ReleaseState
from gateway.release.store import AuditEntry, AuditOutcome, Conflict, SqliteStore, StoredRelease
from tests.support import ROOT


def initial(store: SqliteStore) -> StoredRelease:
    stored = StoredRelease(ReleaseState(model="m", stable="1", canary="2", canary_weight_bp=0))
    store.commit(
        None, stored, AuditEntry(actor="test", action="init", model="m", reason="", after=stored.to_dict(), revision=1)
    )
    return stored


def check_consistent(db: Path) -> int:
    """State is entirely old or new, and the audit rows match it one for one; returns the revision."""
    store = SqliteStore(db)  # opening runs the startup integrity check: ConfigError if corrupt
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


def test_kill_9_during_500_changes_leaves_old_or_new_state_and_matching_audit(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = SqliteStore(db)
    initial(store)
    store.close()
    rng = random.Random(11)
    changes = 0
    kills = 0
    while changes < 500:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "churn.py"), str(db), str(500 - changes)],
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
        revision = check_consistent(db)
        assert revision - 1 >= changes  # nothing committed is ever lost
        changes = revision - 1
    assert kills >= 5


def test_a_stale_revision_is_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    first = initial(store)
    with pytest.raises(Conflict):
        store.commit(None, first, AuditEntry(actor="t", action="x", model="m", reason=""))
    audit = store.audit_log(model="m")
    assert [e.action for e in audit] == ["init"]
    store.record_refused(
        AuditEntry(actor="t", action="promote", model="m", reason="refused: no canary", outcome=AuditOutcome.REFUSED)
    )
    assert [(e.action, e.outcome) for e in store.audit_log(model="m")] == [("init", "applied"), ("promote", "refused")]
    assert store.audit_log(model="m", limit=1, offset=1)[0].action == "promote"
    assert store.audit_log(model="other") == []


def test_one_controller_lease_at_a_time(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    assert store.try_lease("controller", "a", 0.3)
    assert not store.try_lease("controller", "b", 0.3)
    assert store.try_lease("controller", "a", 0.3)  # renewal
    time.sleep(0.35)
    assert store.try_lease("controller", "b", 0.3)  # expired: taken over
