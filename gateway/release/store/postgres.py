"""The release store on PostgreSQL: several gateway replicas, on several hosts, share it.

The same promises as SQLite's store, across hosts: a release change and its
audit rows commit in one transaction, guarded by the revision read (an UPDATE
... WHERE revision = expected, which PostgreSQL re-checks after waiting for a
concurrent writer's row lock); a decision made under the controller's lease
commits only if the lease's epoch is still the one it was made under.

Every release commit sends a NOTIFY in its transaction (delivered at commit), so
the replicas' followers install it within milliseconds; they poll as before too,
in case a notification is lost with a connection. Lease expiries and evidence
ages are measured on the database's clock, not on each host's.

psycopg 3 (with psycopg_pool), not asyncpg: the store is called from threads
(asyncio.to_thread) like SQLite's, and psycopg has a sync API for that (and an
async one), LISTEN/NOTIFY on a plain connection, and binary wheels.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

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

# The NOTIFY channel release commits announce themselves on (the payload: the model).
CHANNEL = "gateway_release"
# pg_advisory_lock keys (any 64-bit numbers, fixed for this application): the schema's
# migrations, and add_feedback (which hands out consecutive ids, as SQLite's does).
MIGRATION_LOCK = 0x6761_7465_7761_0001
FEEDBACK_LOCK = 0x6761_7465_7761_0002
# How long a call waits for a pooled connection (the database down, or every one busy)
# before it answers UNAVAILABLE; the loops calling the store retry on their next tick.
POOL_WAIT_S = 5.0
# ... unless the database was found unreachable: then each call connects on its own, with
# this timeout (libpq's least), so a release change fails fast while it is down (a refused
# connection answers at once), and a loop's next call finds it back (see _connection).
DOWN_CONNECT_TIMEOUT_S = 2
CONNECT_TIMEOUT_S = 5
# Four connections: the follow, share and controller loops, and a control call, at once.
POOL_SIZE = 4
# The listener's wait between looks at whether the store is closing, and between reconnects.
LISTEN_WAIT_S = 1.0
NOW = "EXTRACT(EPOCH FROM clock_timestamp())"


# Query parameters libpq reads a secret from: shown as *** like the URL's own password.
SECRET_PARAMETERS = frozenset({"password", "passfile", "sslpassword"})


def redacted(url: str) -> str:
    """`url` without its password (in the user part or as a query parameter), for messages and logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        pairs = [p.partition("=") for p in parts.query.split("&")]
        query = "&".join(f"{k}={'***' if k.lower() in SECRET_PARAMETERS else v}" if eq else k for k, eq, v in pairs)
        parts = parts._replace(query=query)
    return urlunsplit(parts)


def migrate(conn: psycopg.Connection[Any], where: str, target: int = LATEST) -> None:
    """Bring the schema up to `target` in one transaction, under an advisory lock: replicas
    starting together migrate once, and a failed step leaves the database as it was."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        with conn.transaction():
            conn.execute(VERSION_TABLE)
            row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
            current = 0 if row is None else int(row[0])
            for step in steps_after(current, where, target):
                for statement in step.postgres:
                    conn.execute(statement)
                log.info("%s: schema migrated to version %d (%s)", where, step.version, step.what)
                current = step.version
            conn.execute(
                "INSERT INTO schema_version (id, version) VALUES (1, %s) "
                "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
                (current,),
            )
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


class PostgresStore(SqlReads):
    P = "%s"  # the driver's placeholder, for the reads in SqlReads
    NOW = NOW
    RESTORE_FIX = "restore the database from a backup"

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = f"state_url: the state database {redacted(url)}"
        self.backend = f"postgresql {redacted(url)}"
        self._failures = ThrottledLog(log, interval_s=STORE_FAILURE_LOG_INTERVAL_S)
        self._down = threading.Event()  # set while the last call could not reach the database
        self._callbacks: list[Callable[[], None]] = []
        self._closing = threading.Event()
        self._listener: threading.Thread | None = None
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                migrate(conn, self.where)
        except psycopg.Error as exc:
            raise ConfigError(
                f"{self.where} cannot be used ({' '.join(str(exc).split())}): check the URL, that the server runs "
                "and that the user may create tables in the database"
            ) from None
        self._recovering = threading.Lock()
        try:
            self._pool = self._open_pool()
        except PoolTimeout:
            raise ConfigError(f"{self.where}: no connection within {POOL_WAIT_S:g} s") from None

    def _open_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.url,
            min_size=1,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            timeout=POOL_WAIT_S,
            # A connection the server closed (a restart) is found before use, not by a failed call.
            check=ConnectionPool.check_connection,
            open=False,
            name="gateway-store",
        )
        try:
            pool.open(wait=True, timeout=POOL_WAIT_S)
        except PoolTimeout:
            pool.close()
            raise
        return pool

    @contextmanager
    def _unavailable_on_error(self, what: str) -> Iterator[None]:
        """As SqliteStore's: UNAVAILABLE with the cause for the caller, a line now and then for the operator."""
        try:
            yield
        except (psycopg.Error, PoolTimeout) as exc:
            if isinstance(exc, (psycopg.OperationalError, PoolTimeout)):
                self._down.set()
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._failures.log(logging.ERROR, "store", "%s cannot %s: %s", self.where, what, cause)
            raise StoreUnavailable(
                f"{self.where} cannot {what} ({cause}); release changes are refused until it can: "
                "check that the database server runs and is reachable"
            ) from None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._down.is_set():
            with self._pool.connection() as conn:
                yield conn
            return
        # Down: around the pool, which retries its connections with a doubling backoff (a 10 s
        # outage ended ~5 s before it noticed); the first call that gets through starts a
        # fresh pool, so the database is used again within a loop's tick of its return.
        with psycopg.connect(self.url, autocommit=True, connect_timeout=DOWN_CONNECT_TIMEOUT_S) as conn:
            yield conn
        self._recovered()

    def _recovered(self) -> None:
        """After a call got through while down (its work is done: never fail it from here)."""
        with self._recovering:
            if not self._down.is_set():
                return  # another call did it
            try:
                fresh = self._open_pool()
            except PoolTimeout:
                return  # it went again: still down, the next call tries again
            old, self._pool = self._pool, fresh
            self._down.clear()
        log.warning("%s answers again", self.where)
        # Its waiters (none should be left: calls went around it) get PoolClosed: UNAVAILABLE.
        old.close(timeout=0)

    @property
    def reachable(self) -> bool:
        """False while the last call could not reach the database."""
        return not self._down.is_set()

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Connection[Any]]:
        with self._unavailable_on_error("be read"), self._connection() as conn:
            yield conn

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        with self._unavailable_on_error("be written"), self._connection() as conn, conn.transaction():
            yield conn.cursor()

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
        if self._listener is None:
            self._listener = threading.Thread(target=self._listen, name="store-listen", daemon=True)
            self._listener.start()

    def _listen(self) -> None:
        """LISTEN on a connection of its own (a pooled one would be handed to others)."""
        while not self._closing.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._notify()  # changes missed while not listening
                    while not self._closing.is_set():
                        for _ in conn.notifies(timeout=LISTEN_WAIT_S):
                            self._notify()
            except psycopg.Error as exc:
                # The followers poll meanwhile; this reconnects when the server is back. Its
                # connection is the first to see a server stop: calls fail fast from now on.
                if isinstance(exc, psycopg.OperationalError):
                    self._down.set()
                self._failures.log(logging.WARNING, "listen", "%s: not listening for changes: %s", self.where, exc)
                self._closing.wait(LISTEN_WAIT_S)

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("a release change callback failed")

    def commit(
        self, expected_revision: int | None, after: StoredRelease, audit: AuditEntry | Sequence[AuditEntry]
    ) -> None:
        audits = [audit] if isinstance(audit, AuditEntry) else list(audit)
        data = after.to_dict()
        rollout = data.pop("rollout")
        model = after.state.model
        fence = FENCE.get()
        now = time.time()
        with self._transaction() as cur:
            if fence is not None:
                # FOR SHARE: a takeover (an UPDATE of this row) waits for this commit, or this for it.
                held = cur.execute(
                    "SELECT holder, epoch FROM leases WHERE name = %s FOR SHARE", (fence.name,)
                ).fetchone()
                if held is None or (held[0], held[1]) != (fence.holder, fence.epoch):
                    raise lease_lost(fence, None if held is None else held[0], None if held is None else held[1])
            values = (after.revision, json.dumps(data), json.dumps(rollout), now, model)
            if expected_revision is None:
                cur.execute(
                    "INSERT INTO releases (revision, state, rollout, updated, model) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (model) DO NOTHING",
                    values,
                )
            else:
                cur.execute(
                    "UPDATE releases SET revision = %s, state = %s, rollout = %s, updated = %s "
                    "WHERE model = %s AND revision = %s",
                    (*values, expected_revision),
                )
            if cur.rowcount != 1:
                row = cur.execute("SELECT revision FROM releases WHERE model = %s", (model,)).fetchone()
                raise conflict(model, None if row is None else int(row[0]), expected_revision)
            for entry in audits:
                self._insert_audit(cur, entry, now)
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, model))

    def record_refused(self, audit: AuditEntry) -> None:
        with self._transaction() as cur:
            self._insert_audit(cur, audit, time.time())

    @staticmethod
    def _insert_audit(cur: psycopg.Cursor[Any], a: AuditEntry, now: float) -> None:
        cur.execute(
            "INSERT INTO audit (at, actor, action, model, outcome, before, after, reason, evidence, revision) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            audit_values(a, now),
        )

    def try_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        # One statement: take a free or expired lease (a new holder: the next epoch), or renew
        # one's own; no row back means another holder's lease is still running.
        with self._transaction() as cur:
            row = cur.execute(
                f"INSERT INTO leases AS l (name, holder, expires, epoch) VALUES (%s, %s, {NOW} + %s, 1) "
                "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires = EXCLUDED.expires, "
                "epoch = l.epoch + CASE WHEN l.holder = EXCLUDED.holder THEN 0 ELSE 1 END "
                f"WHERE l.holder = EXCLUDED.holder OR l.expires <= {NOW} RETURNING epoch",
                (name, holder, ttl_s),
            ).fetchone()
        return None if row is None else int(row[0])

    # -- evidence and labels shared between worker processes -------------------------------

    def put_evidence(self, worker: str, snapshots: dict[str, Any]) -> None:
        with self._transaction() as cur:
            cur.executemany(
                f"INSERT INTO evidence (model, worker, data, updated) VALUES (%s, %s, %s, {NOW}) "
                "ON CONFLICT (model, worker) DO UPDATE SET data = EXCLUDED.data, updated = EXCLUDED.updated",
                [(model, worker, json.dumps(data)) for model, data in snapshots.items()],
            )

    def peer_evidence(self, model: str, worker: str, max_age_s: float = 10.0) -> list[dict[str, Any]]:
        with self._reading() as db:
            rows = db.execute(
                f"SELECT data FROM evidence WHERE model = %s AND worker != %s AND updated >= {NOW} - %s",
                (model, worker, max_age_s),
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def live_workers(self, max_age_s: float = 5.0) -> set[str]:
        with self._reading() as db:
            rows = db.execute(f"SELECT DISTINCT worker FROM evidence WHERE updated >= {NOW} - %s", (max_age_s,))
            return {str(r[0]) for r in rows.fetchall()}

    def add_feedback(self, model: str, items: list[tuple[str, list[float]]], origin: str) -> tuple[int, int]:
        """As SqliteStore's: the ids given are consecutive (the lock keeps other inserts out)."""
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (FEEDBACK_LOCK,))
            cur.executemany(
                "INSERT INTO feedback (model, origin, request_id, labels, at) "
                f"VALUES (%s, %s, %s, %s, {NOW}) RETURNING id",
                [(model, origin, rid, json.dumps(labels)) for rid, labels in items],
                returning=True,
            )
            ids: list[int] = []
            while True:
                ids += [int(r[0]) for r in cur.fetchall()]
                if not cur.nextset():
                    break
            cur.execute(f"DELETE FROM feedback WHERE at < {NOW} - 3600.0")
            cur.execute("DELETE FROM feedback_outcome WHERE feedback_id < (SELECT COALESCE(MIN(id), 0) FROM feedback)")
        return min(ids), max(ids)

    def record_feedback_outcomes(self, worker: str, last_id: int, outcomes: list[tuple[int, str, str]]) -> None:
        with self._transaction() as cur:
            cur.executemany(
                "INSERT INTO feedback_outcome (feedback_id, worker, outcome, detail) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (feedback_id, worker) DO UPDATE SET outcome = EXCLUDED.outcome, detail = EXCLUDED.detail",
                [(fid, worker, outcome, detail) for fid, outcome, detail in outcomes],
            )
            cur.execute(
                "INSERT INTO feedback_progress (worker, last_id) VALUES (%s, %s) "
                "ON CONFLICT (worker) DO UPDATE SET last_id = EXCLUDED.last_id",
                (worker, last_id),
            )

    def feedback_answers(self, first_id: int, last_id: int) -> tuple[dict[str, int], list[tuple[int, str, str, str]]]:
        with self._reading() as db:
            progress = {str(w): int(n) for w, n in db.execute("SELECT worker, last_id FROM feedback_progress")}
            rows = db.execute(
                "SELECT feedback_id, worker, outcome, detail FROM feedback_outcome WHERE feedback_id BETWEEN %s AND %s",
                (first_id, last_id),
            ).fetchall()
        return progress, [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]

    def last_feedback_id(self) -> int:
        with self._reading() as db:
            row = db.execute("SELECT COALESCE(MAX(id), 0) FROM feedback").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            self._listener.join(timeout=2 * LISTEN_WAIT_S)
        self._pool.close()
