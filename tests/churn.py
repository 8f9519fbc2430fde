"""Apply weight changes to a release store as fast as it allows (for the crash-safety test).

    python tests/churn.py STATE_DB_OR_POSTGRESQL_URL COUNT

Runs the same store code the gateway runs. Prints `committed N` after each
commit, so the test knows roughly where its kill -9 landed.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from gateway.release.store import AuditEntry, SqliteStore, Store, StoredRelease
from gateway.release.store.postgres import PostgresStore


def main() -> None:
    target = sys.argv[1]
    store: Store = PostgresStore(target) if target.startswith("postgresql://") else SqliteStore(Path(target))
    for _ in range(int(sys.argv[2])):
        current = store.load_all()["m"]
        weight = (current.state.canary_weight_bp + 37) % 10_001
        state = dataclasses.replace(current.state, canary_weight_bp=weight, revision=current.revision + 1)
        after = StoredRelease(state, current.rollout)
        entry = AuditEntry(
            actor="churn",
            action="set_traffic",
            model="m",
            reason="crash test",
            before=current.to_dict(),
            after=after.to_dict(),
            revision=after.revision,
            at=time.time(),
        )
        store.commit(current.revision, after, entry)
        print(f"committed {after.revision}", flush=True)


if __name__ == "__main__":
    main()
