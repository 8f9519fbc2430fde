"""The release store in one SQLite file: one gateway host, its worker processes.

SQLite runs in WAL mode with synchronous=FULL: a committed change survives
power loss, and readers (other worker processes) never block the writer.
Every write takes the database's one write lock (BEGIN IMMEDIATE), so a
revision or lease read inside a transaction cannot change before its commit.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, StoreUnavailable
from gateway.logthrottle import ThrottledLog
from gateway.release.store.base import (
    FENCE,
    STORE_FAILURE_LOG_INTERVAL_S,
    AuditEntry,
    SqlReads,
    StoredRelease,
    audit_values,
    conflict,
    lease_lost,
)
from gateway.release.store.migrations import LATEST, VERSION_TABLE, steps_after

log = logging.getLogger(__name__)

_STARTUP_FIX = "restore it from a backup, or move it aside to start with a fresh store (its audit history is then gone)"


def _fix_for(exc: sqlite3.Error) -> str:
    """What an operator does about a store error, by SQLite's error name."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith("SQLITE_FULL"):
        return "free disk space on its filesystem"
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_CANTOPEN")):
        return "make the file and its folder writable for the gateway's user"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return _STARTUP_FIX
    return "check the disk and the file"


def _create_if_missing(path: Path) -> None:
    """Create a new store whole, so that a file at `path` always has a header: an empty
    (zero-byte) one is then a truncated store, never a new one being made. Workers start
    at once: each builds its own temporary file and links it into place; the first wins."""
    if path.exists():
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        db = sqlite3.connect(str(temporary), isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            migrate(db, str(temporary))
        finally:
            db.close()
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another worker made it first: use theirs
        except OSError:
            # A filesystem without hard links: a rename, unless another worker's store is there now.
            if not path.exists():
                os.replace(temporary, path)
    finally:
        for suffix in ("", "-wal", "-shm"):
            temporary.with_name(temporary.name + suffix).unlink(missing_ok=True)


def migrate(db: sqlite3.Connection, where: str, target: int = LATEST) -> None:
    """Bring the schema up to `target` in one transaction: under the write lock, so workers
    starting together migrate once, and a failed step leaves the store as it was."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(VERSION_TABLE)
        row = db.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        current = 0 if row is None else int(row[0])
        for step in steps_after(current, where, target):
            for statement in step.sqlite:
                db.execute(statement)
            log.info("%s: schema migrated to version %d (%s)", where, step.version, step.what)
            current = step.version
        db.execute("INSERT OR REPLACE INTO schema_version (id, version) VALUES (1, ?)", (current,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def retry_while_locked(action: Callable[[], None], within_s: float = 15.0) -> None:
    """Run `action`, again while SQLite says the database is locked: workers start
    together and race for the schema's (and the journal mode's) exclusive lock."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SqliteStore(SqlReads):
    P = "?"  # the driver's placeholder, for the reads in SqlReads
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"  # time.time(), which the lease's expiry is written in
    RESTORE_FIX = _STARTUP_FIX

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"state_dir: the state database {path}"
        self.backend = f"sqlite {path}"
        self._lock = threading.Lock()  # one connection, used from the loop and from worker threads
        self._failures = ThrottledLog(log, interval_s=STORE_FAILURE_LOG_INTERVAL_S)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size == 0:
                raise ConfigError(
                    f"state_dir: the state database {path} is empty (0 bytes): it holds no release state "
                    f"and no audit history, so it was truncated; {_STARTUP_FIX}"
                )
            _create_if_missing(path)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA busy_timeout=10000")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state_dir: cannot open the state database {path}: {exc}") from None
        try:
            self._setup()
            self._check_integrity()
            self._check_writable()
        except sqlite3.Error as exc:
            self._db.close()
            raise ConfigError(f"state_dir: the state database {path} cannot be used ({exc}): {_fix_for(exc)}") from None
        except ConfigError:
            self._db.close()
            raise

    def _setup(self) -> None:
        """WAL mode and the schema's migrations (switching the journal mode takes an exclusive lock)."""

        def setup() -> None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            migrate(self._db, f"state_dir: the state database {self.path}")

        retry_while_locked(setup)

    def _check_integrity(self) -> None:
        """A corrupt page is found now, not on the day a change or an audit query reads it.
        quick_check skips integrity_check's index cross-checks: linear in the file's size,
        fast enough for years of audit records."""
        problems = [str(row[0]) for row in self._db.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise ConfigError(
                f"state_dir: the state database {self.path} is corrupt ({'; '.join(problems)}): {_STARTUP_FIX}"
            )

    def _check_writable(self) -> None:
        """SQLite opens a file it cannot write read-only, silently: write once now, so a
        store the gateway cannot write stops startup instead of failing every change later."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO leases (name, holder, expires) VALUES ('startup-write-check', ?, 0)",
                (str(os.getpid()),),
            )
            self._db.execute("COMMIT")
        except sqlite3.Error:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _unavailable_on_error(self, what: str) -> Iterator[None]:
        """A store failure while serving: StoreUnavailable (UNAVAILABLE, with the fix) for
        the caller, and one log line per interval, without a traceback, for the operator."""
        try:
            yield
        except sqlite3.Error as exc:
            fix = _fix_for(exc)
            message = "the state database %s cannot %s: %s; %s"
            self._failures.log(logging.ERROR, "store", message, self.path, what, exc, fix)
            raise StoreUnavailable(
                f"the state database {self.path} cannot {what} ({exc}); release changes are refused until it can: {fix}"
            ) from None

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._unavailable_on_error("be read"):
            yield self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._unavailable_on_error("be written"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) can leave the transaction open: end it.
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    def commit(
        self, expected_revision: int | None, after: StoredRelease, audit: AuditEntry | Sequence[AuditEntry]
    ) -> None:
        audits = [audit] if isinstance(audit, AuditEntry) else list(audit)
        data = after.to_dict()
        rollout = data.pop("rollout")
        fence = FENCE.get()
        with self._transaction() as db:
            if fence is not None:
                held = db.execute("SELECT holder, epoch FROM leases WHERE name = ?", (fence.name,)).fetchone()
                if held is None or (held[0], held[1]) != (fence.holder, fence.epoch):
                    raise lease_lost(fence, None if held is None else held[0], None if held is None else held[1])
            row = db.execute("SELECT revision FROM releases WHERE model = ?", (after.state.model,)).fetchone()
            current = None if row is None else int(row[0])
            if current != expected_revision:
                raise conflict(after.state.model, current, expected_revision)
            db.execute(
                "INSERT OR REPLACE INTO releases (model, revision, state, rollout, updated) VALUES (?, ?, ?, ?, ?)",
                (after.state.model, after.revision, json.dumps(data), json.dumps(rollout), time.time()),
            )
            for entry in audits:
                self._insert_audit(db, entry)

    def record_refused(self, audit: AuditEntry) -> None:
        with self._transaction() as db:
            self._insert_audit(db, audit)

    @staticmethod
    def _insert_audit(db: sqlite3.Connection, a: AuditEntry) -> None:
        db.execute(
            "INSERT INTO audit (at, actor, action, model, outcome, before, after, reason, evidence, revision) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            audit_values(a, time.time()),
        )

    def try_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT holder, expires, epoch FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > now:
                return None
            # A new holder takes the next epoch: the old one's decisions are fenced off.
            epoch = 1 if row is None else int(row[2]) + (row[0] != holder)
            db.execute(
                "INSERT OR REPLACE INTO leases (name, holder, expires, epoch) VALUES (?, ?, ?, ?)",
                (name, holder, now + ttl_s, epoch),
            )
            return epoch

    def on_change(self, callback: Callable[[], None]) -> None:
        """SQLite has no notifications: the workers of one host poll `changes` (cheap)."""

    # -- evidence and labels shared between the worker processes of one gateway ----------

    def put_evidence(self, worker: str, snapshots: dict[str, Any]) -> None:
        now = time.time()
        with self._transaction() as db:
            for model, data in snapshots.items():
                db.execute(
                    "INSERT OR REPLACE INTO evidence (model, worker, data, updated) VALUES (?, ?, ?, ?)",
                    (model, worker, json.dumps(data), now),
                )

    def peer_evidence(self, model: str, worker: str, max_age_s: float = 10.0) -> list[dict[str, Any]]:
        """Other workers' latest snapshots (stale rows of workers gone are left out)."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT data FROM evidence WHERE model = ? AND worker != ? AND updated >= ?",
                (model, worker, time.time() - max_age_s),
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def add_feedback(self, model: str, items: list[tuple[str, list[float]]], origin: str) -> tuple[int, int]:
        """Share label sets with every worker; returns the first and last row id given them."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO feedback (model, origin, request_id, labels, at) VALUES (?, ?, ?, ?, ?)",
                [(model, origin, rid, json.dumps(labels), now) for rid, labels in items],
            )
            # Ids are consecutive: this transaction holds the only write lock.
            last = int(db.execute("SELECT COALESCE(MAX(id), 0) FROM feedback").fetchone()[0])
            db.execute("DELETE FROM feedback WHERE at < ?", (now - 3600.0,))
            db.execute("DELETE FROM feedback_outcome WHERE feedback_id < (SELECT COALESCE(MIN(id), 0) FROM feedback)")
        return last - len(items) + 1, last

    def record_feedback_outcomes(self, worker: str, last_id: int, outcomes: list[tuple[int, str, str]]) -> None:
        """A worker has read shared label sets up to `last_id`; what it made of them
        (feedback id, outcome, detail), for those it did not find unknown."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO feedback_outcome (feedback_id, worker, outcome, detail) VALUES (?, ?, ?, ?)",
                [(fid, worker, outcome, detail) for fid, outcome, detail in outcomes],
            )
            db.execute("INSERT OR REPLACE INTO feedback_progress (worker, last_id) VALUES (?, ?)", (worker, last_id))

    def feedback_answers(self, first_id: int, last_id: int) -> tuple[dict[str, int], list[tuple[int, str, str, str]]]:
        """How far each worker has read shared labels, and what they made of ids first..last."""
        with self._reading() as db:
            progress = {str(w): int(n) for w, n in db.execute("SELECT worker, last_id FROM feedback_progress")}
            rows = db.execute(
                "SELECT feedback_id, worker, outcome, detail FROM feedback_outcome WHERE feedback_id BETWEEN ? AND ?",
                (first_id, last_id),
            ).fetchall()
        return progress, [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]

    def live_workers(self, max_age_s: float = 5.0) -> set[str]:
        """Workers that published evidence within `max_age_s` (each does so twice a second)."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT DISTINCT worker FROM evidence WHERE updated >= ?", (time.time() - max_age_s,)
            ).fetchall()
        return {str(r[0]) for r in rows}

    def last_feedback_id(self) -> int:
        with self._reading() as db:
            return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM feedback").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
