"""Versioned schema migrations on both backends: an empty database, the previous schema
(N-1 -> N, data kept), a store from before versions existed, and a newer schema refused
with both versions and the fix, also through `gateway serve --state-url`."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from gateway.errors import ConfigError
from gateway.release.state import ReleaseState
from gateway.release.store import AuditEntry, StoredRelease
from gateway.release.store import postgres as pg
from gateway.release.store import sqlite as lite
from gateway.release.store.migrations import LATEST, STEPS
from tests.support import MODELS, ROOT, gateway_command

if TYPE_CHECKING:  # a plugin (below): imported first, pytest could not rewrite its asserts
    from tests.postgres import Backend

pytest_plugins = ("tests.postgres",)


def version_of(backend: Backend) -> int:
    if backend.name == "postgres":
        with psycopg.connect(backend.target) as conn:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
    else:
        with closing(sqlite3.connect(backend.target)) as db:
            row = db.execute("SELECT version FROM schema_version").fetchone()
    assert row is not None
    return int(row[0])


def migrate_to(backend: Backend, target: int) -> None:
    """The schema as a gateway that knew only `target` left it."""
    if backend.name == "postgres":
        with psycopg.connect(backend.target, autocommit=True) as conn:
            pg.migrate(conn, "test", target)
    else:
        with closing(sqlite3.connect(backend.target, isolation_level=None)) as db:
            lite.migrate(db, "test", target)


def execute(backend: Backend, statement: str, params: tuple[object, ...] = ()) -> None:
    """One statement, written with ? placeholders, on either backend."""
    if backend.name == "postgres":
        with psycopg.connect(backend.target, autocommit=True) as conn:
            conn.execute(statement.replace("?", "%s"), params)
    else:
        with closing(sqlite3.connect(backend.target, isolation_level=None)) as db:
            db.execute(statement, params)


def write_release(backend: Backend, stored: StoredRelease) -> None:
    """A release and its audit row as an older gateway wrote them (the same columns since version 1)."""
    data = stored.to_dict()
    rollout = data.pop("rollout")
    execute(
        backend,
        "INSERT INTO releases (model, revision, state, rollout, updated) VALUES (?, ?, ?, ?, 0)",
        (stored.state.model, stored.revision, json.dumps(data), json.dumps(rollout)),
    )
    execute(
        backend,
        "INSERT INTO audit (at, actor, action, model, outcome, reason, revision) VALUES (1, 'old', 'init', ?, "
        "'applied', 'r', ?)",
        (stored.state.model, stored.revision),
    )


def a_release(version: str = "1") -> tuple[StoredRelease, AuditEntry]:
    stored = StoredRelease(ReleaseState(model="m", stable=version))
    return stored, AuditEntry(actor="t", action="init", model="m", reason="", after=stored.to_dict(), revision=1)


def test_an_empty_database_gets_the_latest_schema(backend: Backend) -> None:
    store = backend.open()
    try:
        assert store.load_all() == {}
        assert store.try_lease("controller", "a", 5.0) == 1
        store.commit(None, *a_release())
        assert store.load_all()["m"].state.stable == "1"
    finally:
        store.close()
    assert version_of(backend) == LATEST
    store = backend.open()  # a second start migrates nothing and keeps the data
    store.close()
    assert version_of(backend) == LATEST


def test_the_previous_schema_is_migrated_and_keeps_its_data(backend: Backend) -> None:
    migrate_to(backend, LATEST - 1)
    assert version_of(backend) == LATEST - 1
    stored, _ = a_release("7")
    write_release(backend, stored)
    execute(backend, "INSERT INTO leases (name, holder, expires) VALUES ('controller', 'old', 0)")
    store = backend.open()
    try:
        assert version_of(backend) == LATEST
        assert store.load_all()["m"].state.stable == "7"
        assert [e.actor for e in store.audit_log(model="m")] == ["old"]
        assert store.try_lease("controller", "new", 5.0) == 1  # the old holder's lease ran out: the next epoch
    finally:
        store.close()


def test_a_sqlite_store_from_before_schema_versions_is_migrated(sqlite_backend: Backend) -> None:
    """Stores written before schema_version existed hold version 1's tables and no version."""
    backend = sqlite_backend
    with closing(sqlite3.connect(backend.target, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        for statement in STEPS[0].sqlite:
            db.execute(statement)
    write_release(backend, a_release("3")[0])
    store = backend.open()
    try:
        assert store.load_all()["m"].state.stable == "3"
    finally:
        store.close()
    assert version_of(backend) == LATEST


def test_a_newer_schema_is_refused_naming_both_versions(backend: Backend) -> None:
    store = backend.open()
    store.close()
    execute(backend, f"UPDATE schema_version SET version = {LATEST + 1}")
    with pytest.raises(ConfigError) as refused:
        backend.open()
    message = str(refused.value)
    assert f"version {LATEST + 1}" in message and f"version {LATEST})" in message, message
    assert "upgrade this gateway" in message, message
    assert version_of(backend) == LATEST + 1  # left as found


def test_serve_refuses_a_newer_schema_with_one_line(state_url: str, tmp_path: Path) -> None:
    with psycopg.connect(state_url, autocommit=True) as conn:
        pg.migrate(conn, "test")
        conn.execute(f"UPDATE schema_version SET version = {LATEST + 1}")
    args = ["serve", "--models", str(MODELS), "--state-dir", str(tmp_path / "s"), "--state-url", state_url]
    args += ["--workers", "1", "--port", "0", "--metrics-port", "-1", "--http-port", "-1", "--control-port", "-1"]
    args += ["--dashboard-port", "-1", "--provider", "cpu"]
    result = subprocess.run(gateway_command(*args), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("gateway: ")]
    assert len(lines) == 1, result.stderr
    assert f"version {LATEST + 1}" in lines[0] and "upgrade this gateway" in lines[0], lines[0]


def test_serve_refuses_an_unreachable_database_with_one_line_and_no_password(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"postgresql://gateway:pw-secret@127.0.0.1:{s.getsockname()[1]}/releases"
    args = ["serve", "--models", str(MODELS), "--state-dir", str(tmp_path / "s"), "--state-url", url]
    args += ["--workers", "1", "--port", "0", "--metrics-port", "-1", "--http-port", "-1", "--control-port", "-1"]
    args += ["--dashboard-port", "-1", "--provider", "cpu"]
    result = subprocess.run(gateway_command(*args), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "pw-secret" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("gateway: ")]
    assert len(lines) == 1, result.stderr
    assert "state_url" in lines[0] and "gateway:***@127.0.0.1" in lines[0], lines[0]


def test_steps_are_numbered_one_by_one() -> None:
    assert [s.version for s in STEPS] == list(range(1, LATEST + 1))
