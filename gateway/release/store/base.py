"""What every release store holds and promises: the records, the interface, the fence.

One transaction writes a model's new release state and the audit record of the
change, so after a crash at any instant the state is entirely old or entirely
new, and its audit row exists exactly when the new state does. Two backends
implement the interface: SQLite (one host: the gateway's workers) and
PostgreSQL (several replicas on several hosts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Protocol

from gateway.errors import ConfigError, FailedPrecondition, InvalidInput
from gateway.release.policy import RolloutState
from gateway.release.rules import rule_from_dict
from gateway.release.state import ReleaseState


@dataclass(frozen=True, slots=True)
class StoredRelease:
    state: ReleaseState
    rollout: RolloutState = field(default_factory=RolloutState)

    @property
    def revision(self) -> int:
        return self.state.revision

    def to_dict(self) -> dict[str, Any]:
        return {**self.state.to_dict(), "rollout": asdict(self.rollout)}


class AuditOutcome(StrEnum):
    """What became of a change an audit record names. Stored in the audit log and sent by
    the control API as strings: never change a value."""

    APPLIED = "applied"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    actor: str
    action: str
    model: str
    reason: str
    outcome: AuditOutcome = AuditOutcome.APPLIED
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    evidence: Any = None
    revision: int | None = None
    at: float = 0.0
    id: int = 0


class Conflict(FailedPrecondition):
    """The release changed since it was read: read it again and retry."""


class LeaseLost(FailedPrecondition):
    """A decision made under a lease another process has taken since: it is not committed."""


@dataclass(frozen=True, slots=True)
class Fence:
    """A lease as held when a decision was made: the lease's epoch grows each time another
    holder takes it, so a commit checking (name, holder, epoch) in its own transaction
    refuses the decisions of a process that lost the lease while it was deciding."""

    name: str
    holder: str
    epoch: int


# The lease the commits made in this context are made under (None: not fenced, as for
# changes people make through the control API). A context variable, not an argument:
# the controller sets it in its own task, and asyncio.to_thread carries it into the
# thread that commits, through ReleaseOps, which need not know of leases.
FENCE: ContextVar[Fence | None] = ContextVar("release_store_fence", default=None)


class Store(Protocol):
    # What status shows: the backend and where (a URL without its password).
    backend: str

    def load_all(self) -> dict[str, StoredRelease]: ...

    def changes(self) -> int:
        """A number that grows whenever any release changes (cheap to poll)."""
        ...

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from another thread) soon after any process commits a release
        change; a store without notifications never calls it (its followers poll)."""
        ...

    def commit(
        self, expected_revision: int | None, after: StoredRelease, audit: AuditEntry | Sequence[AuditEntry]
    ) -> None:
        """Store `after` and its audit record(s) in one transaction, if the stored revision
        is still `expected_revision` (else Conflict) and, under a FENCE, the lease is still
        held with its epoch (else LeaseLost)."""
        ...

    def record_refused(self, audit: AuditEntry) -> None: ...

    def audit_log(
        self, model: str = "", since: float = 0.0, until: float = 0.0, limit: int = 100, offset: int = 0
    ) -> list[AuditEntry]: ...

    def last_applied(self, model: str) -> AuditEntry | None: ...

    def try_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Take or renew a lease; its epoch when held (it grows with each new holder), else None."""
        ...

    def put_evidence(self, worker: str, snapshots: dict[str, Any]) -> None: ...

    def peer_evidence(self, model: str, worker: str, max_age_s: float = 10.0) -> list[dict[str, Any]]: ...

    def live_workers(self, max_age_s: float = 5.0) -> set[str]: ...

    def add_feedback(self, model: str, items: list[tuple[str, list[float]]], origin: str) -> tuple[int, int]:
        """Share label sets that `origin` (a replica/worker) could not join: their first and last ids."""
        ...

    def feedback_after(self, last_id: int) -> list[SharedLabels]:
        """Label sets shared after id `last_id`, oldest first (at most 10,000)."""
        ...

    def lease_holder(self, name: str) -> str | None:
        """Who holds the lease now (None: nobody, or it ran out)."""
        ...

    def last_feedback_id(self) -> int: ...

    def record_feedback_outcomes(self, worker: str, last_id: int, outcomes: list[tuple[int, str, str]]) -> None: ...

    def feedback_answers(
        self, first_id: int, last_id: int
    ) -> tuple[dict[str, int], list[tuple[int, str, str, str]]]: ...

    def close(self) -> None: ...


class SharedLabels(NamedTuple):
    """A label set one process shared for the others to join (the feedback table's row)."""

    id: int
    model: str
    origin: str  # the replica/worker that received it and could not join it
    request_id: str
    labels: list[float]


AUDIT_COLUMNS = "id, at, actor, action, model, outcome, before, after, reason, evidence, revision"


def audit_entry(r: Sequence[Any]) -> AuditEntry:
    return AuditEntry(
        id=r[0],
        at=r[1],
        actor=r[2],
        action=r[3],
        model=r[4],
        outcome=AuditOutcome(r[5]),
        before=None if r[6] is None else json.loads(r[6]),
        after=None if r[7] is None else json.loads(r[7]),
        reason=r[8],
        evidence=None if r[9] is None else json.loads(r[9]),
        revision=r[10],
    )


def audit_values(a: AuditEntry, now: float) -> tuple[Any, ...]:
    """An audit entry as the audit table's columns after id, in AUDIT_COLUMNS' order."""
    return (
        a.at or now,
        a.actor,
        a.action,
        a.model,
        a.outcome.value,
        None if a.before is None else json.dumps(a.before),
        None if a.after is None else json.dumps(a.after),
        a.reason,
        None if a.evidence is None else json.dumps(a.evidence),
        a.revision,
    )


def state_from(data: dict[str, Any], rollout: dict[str, Any]) -> StoredRelease:
    data = dict(data)
    data["shadows"] = MappingProxyType(dict(data.get("shadows", {})))
    data["rules"] = tuple(rule_from_dict(rule) for rule in data.get("rules", ()))
    return StoredRelease(ReleaseState(**data), RolloutState(**rollout))


def conflict(model: str, current: int | None, expected: int | None) -> Conflict:
    return Conflict(
        f"{model}: the release changed meanwhile (revision {current}, expected {expected}); read it again and retry"
    )


def lease_lost(fence: Fence, holder: str | None, epoch: int | None) -> LeaseLost:
    return LeaseLost(
        f"the {fence.name} lease was lost (held by {holder or 'nobody'} at epoch {epoch}, this decision was made "
        f"by {fence.holder} at epoch {fence.epoch}): the decision is not committed; the new holder decides"
    )


# While the store keeps failing (a full disk fails every write: the controller's lease
# and each worker's evidence, twice a second), one log line per this many seconds.
STORE_FAILURE_LOG_INTERVAL_S = 30.0


class SqlReads:
    """The reads both SQL stores run alike: only the driver's placeholder differs (`P`).

    A store gives `_reading()`: a connection (or cursor) whose `execute(sql, args)`
    returns rows, for reads that need no transaction of their own; `where`, the store as
    messages name it; and `RESTORE_FIX`, what an operator does about a damaged row."""

    P: ClassVar[str]
    NOW: ClassVar[str]  # the store's clock in epoch seconds, as SQL (what lease expiries are written in)
    RESTORE_FIX: ClassVar[str]
    where: str

    def _reading(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def load_all(self) -> dict[str, StoredRelease]:
        with self._reading() as db:
            rows = db.execute("SELECT model, state, rollout FROM releases").fetchall()
        loaded = {}
        for model, state, rollout in rows:
            try:
                stored = state_from(json.loads(state), json.loads(rollout))
            except (ValueError, TypeError, AttributeError, InvalidInput) as exc:
                # Written by hand or damaged: name what is wrong instead of a traceback.
                raise ConfigError(
                    f"{self.where} holds a release of model {model!r} that cannot be read "
                    f"({type(exc).__name__}: {str(exc)[:200]}): {self.RESTORE_FIX}"
                ) from None
            loaded[stored.state.model] = stored
        return loaded

    def changes(self) -> int:
        """A number that grows with every committed release change (the sum of revisions)."""
        with self._reading() as db:
            row = db.execute("SELECT COALESCE(SUM(revision), 0) FROM releases").fetchone()
        return int(row[0]) if row else 0

    def audit_log(
        self, model: str = "", since: float = 0.0, until: float = 0.0, limit: int = 100, offset: int = 0
    ) -> list[AuditEntry]:
        p = self.P
        where: list[str] = []
        args: list[Any] = []
        for column, op, value in (("model", "=", model), ("at", ">=", since), ("at", "<=", until)):
            if value:  # an empty model or a zero time: no filter on it
                where.append(f"{column} {op} {p}")
                args.append(value)
        query = f"SELECT {AUDIT_COLUMNS} FROM audit"
        if where:
            query += " WHERE " + " AND ".join(where)
        query += f" ORDER BY id LIMIT {p} OFFSET {p}"
        with self._reading() as db:
            rows = db.execute(query, [*args, limit, offset]).fetchall()
        return [audit_entry(r) for r in rows]

    def last_applied(self, model: str) -> AuditEntry | None:
        """The newest applied change of a model's release: why it is in its phase now."""
        p = self.P
        query = f"SELECT {AUDIT_COLUMNS} FROM audit WHERE model = {p} AND outcome = {p} ORDER BY id DESC LIMIT 1"
        with self._reading() as db:
            row = db.execute(query, (model, AuditOutcome.APPLIED.value)).fetchone()
        return None if row is None else audit_entry(row)

    def feedback_after(self, last_id: int) -> list[SharedLabels]:
        query = (
            f"SELECT id, model, origin, request_id, labels FROM feedback WHERE id > {self.P} ORDER BY id LIMIT 10000"
        )
        with self._reading() as db:
            rows = db.execute(query, (last_id,)).fetchall()
        return [SharedLabels(int(r[0]), r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def lease_holder(self, name: str) -> str | None:
        query = f"SELECT holder FROM leases WHERE name = {self.P} AND expires > {self.NOW}"
        with self._reading() as db:
            row = db.execute(query, (name,)).fetchone()
        return None if row is None else str(row[0])
