"""The store's schema, as numbered steps, for both backends.

A store records the last step applied in `schema_version`; each gateway applies
the steps after it at startup, under a lock (SQLite's write lock, PostgreSQL's
advisory lock), so replicas starting together migrate once. A store a newer
gateway has migrated is refused: this gateway would not know its columns.

Append a step to change the schema; never edit one that has shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Step:
    version: int
    what: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


STEPS: tuple[Step, ...] = (
    Step(
        1,
        "release state, audit log, shared evidence and labels, leases",
        # CREATE ... IF NOT EXISTS: stores made before schema_version existed hold these
        # tables already, and count as version 0.
        sqlite=(
            """CREATE TABLE IF NOT EXISTS releases (
                model TEXT PRIMARY KEY, revision INTEGER NOT NULL, state TEXT NOT NULL,
                rollout TEXT NOT NULL, updated REAL NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS audit (
                id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
                action TEXT NOT NULL, model TEXT NOT NULL, outcome TEXT NOT NULL, before TEXT,
                after TEXT, reason TEXT NOT NULL, evidence TEXT, revision INTEGER)""",
            "CREATE INDEX IF NOT EXISTS audit_model_at ON audit (model, at)",
            # Each worker's cumulative counts, replaced each flush.
            """CREATE TABLE IF NOT EXISTS evidence (
                model TEXT NOT NULL, worker TEXT NOT NULL, data TEXT NOT NULL, updated REAL NOT NULL,
                PRIMARY KEY (model, worker))""",
            """CREATE TABLE IF NOT EXISTS feedback (
                id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, request_id TEXT NOT NULL,
                labels TEXT NOT NULL, at REAL NOT NULL)""",
            # What a worker made of a shared label set (joined | already_labelled | rejected).
            """CREATE TABLE IF NOT EXISTS feedback_outcome (
                feedback_id INTEGER NOT NULL, worker TEXT NOT NULL, outcome TEXT NOT NULL,
                detail TEXT NOT NULL, PRIMARY KEY (feedback_id, worker))""",
            "CREATE TABLE IF NOT EXISTS feedback_progress (worker TEXT PRIMARY KEY, last_id INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL)",
        ),
        postgres=(
            """CREATE TABLE IF NOT EXISTS releases (
                model TEXT PRIMARY KEY, revision BIGINT NOT NULL, state TEXT NOT NULL,
                rollout TEXT NOT NULL, updated DOUBLE PRECISION NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS audit (
                id BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL,
                action TEXT NOT NULL, model TEXT NOT NULL, outcome TEXT NOT NULL, before TEXT,
                after TEXT, reason TEXT NOT NULL, evidence TEXT, revision BIGINT)""",
            "CREATE INDEX IF NOT EXISTS audit_model_at ON audit (model, at)",
            """CREATE TABLE IF NOT EXISTS evidence (
                model TEXT NOT NULL, worker TEXT NOT NULL, data TEXT NOT NULL,
                updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (model, worker))""",
            """CREATE TABLE IF NOT EXISTS feedback (
                id BIGSERIAL PRIMARY KEY, model TEXT NOT NULL, request_id TEXT NOT NULL,
                labels TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS feedback_outcome (
                feedback_id BIGINT NOT NULL, worker TEXT NOT NULL, outcome TEXT NOT NULL,
                detail TEXT NOT NULL, PRIMARY KEY (feedback_id, worker))""",
            "CREATE TABLE IF NOT EXISTS feedback_progress (worker TEXT PRIMARY KEY, last_id BIGINT NOT NULL)",
            """CREATE TABLE IF NOT EXISTS leases (
                name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL)""",
        ),
    ),
    Step(
        2,
        "a fencing epoch on leases (grows with each new holder; decisions commit only under the current one)",
        sqlite=("ALTER TABLE leases ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",),
        postgres=("ALTER TABLE leases ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0",),
    ),
    Step(
        3,
        "who shared each label set (replica/worker), so every other process, on any replica, joins it",
        sqlite=("ALTER TABLE feedback ADD COLUMN origin TEXT NOT NULL DEFAULT ''",),
        postgres=("ALTER TABLE feedback ADD COLUMN origin TEXT NOT NULL DEFAULT ''",),
    ),
)

LATEST = STEPS[-1].version

# The table each backend keeps its version in: one row.
VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
)


def steps_after(current: int, where: str, target: int = LATEST) -> list[Step]:
    """The steps that bring a store at `current` to `target`; a store newer than this
    gateway knows stops startup with both versions and the fix."""
    if current > LATEST:
        raise ConfigError(
            f"{where}: the store's schema is at version {current}, newer than this gateway knows (version "
            f"{LATEST}): a newer gateway has migrated it; upgrade this gateway to a release that knows "
            f"schema version {current} (never downgrade a store)"
        )
    return [step for step in STEPS if current < step.version <= target]
