"""A state store that cannot be trusted stops startup with one line; one that fails while
serving answers UNAVAILABLE and logs once in a while, not a traceback per tick (#21 item 20)."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import grpc
import pytest

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.store import SqliteStore
from tests.support import MODELS, ROOT, gateway_command, gateway_in_thread


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    return root


def serve(repo: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """`gateway serve` on `state`, expected to refuse before it listens (a timeout fails the test)."""
    args = ["serve", "--models", str(repo), "--state-dir", str(state), "--workers", "1", "--port", "0"]
    args += ["--metrics-port", "-1", "--http-port", "-1", "--control-port", "-1", "--provider", "cpu"]
    return subprocess.run(gateway_command(*args), capture_output=True, text=True, timeout=60, cwd=ROOT)


def a_used_store(state: Path, records: int = 0) -> Path:
    """A store as a gateway leaves it (its schema, a release), plus `records` audit rows."""
    store = SqliteStore(state / "state.db")
    store.close()
    if records:
        with closing(sqlite3.connect(state / "state.db")) as db, db:
            db.executemany(
                "INSERT INTO audit (at, actor, action, model, outcome, reason) "
                "VALUES (?, 'a', 'x', 'digits', 'applied', ?)",
                [(time.time(), "r" * 200) for _ in range(records)],
            )
    # Closed, the last connection has moved every page from the WAL into the file.
    return state / "state.db"


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result
    assert "listening on" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("gateway: ")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_a_zero_byte_store_is_refused_not_taken_as_new(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.db").write_bytes(b"")
    result = serve(repo, state)
    assert_refused(result, str(state / "state.db"), "empty", "backup")
    assert (state / "state.db").stat().st_size == 0  # left as found, for whoever investigates


def test_a_new_store_is_still_created(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "fresh" / "state"
    with gateway_in_thread(repo, state_dir=state, controller=False):
        pass
    assert (state / "state.db").stat().st_size > 0
    assert sorted(p.name for p in state.iterdir() if p.name.startswith(".")) == []  # no temporary left behind


def test_a_corrupt_page_is_found_at_startup(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = a_used_store(state, records=2000)
    with closing(sqlite3.connect(path)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    assert pages > 20 and path.stat().st_size == page_size * pages
    # Scribble over a page in the middle of the audit log: nothing reads it at startup,
    # so without a check the damage would surface on some later audit query.
    with path.open("r+b") as handle:
        handle.seek(page_size * (pages // 2))
        handle.write(os.urandom(page_size))
    result = serve(repo, state)
    assert_refused(result, str(path), "corrupt", "backup")


def test_a_file_that_is_no_database_is_refused(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.db").write_bytes(b"not a database at all " * 400)
    result = serve(repo, state)
    assert_refused(result, str(state / "state.db"), "backup")


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make `path` unwritable: chmod for a normal user; root writes through chmod, so the
    immutable attribute for root (skipped where the filesystem cannot set it)."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a file read-only for root here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_store_is_refused_at_startup(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = a_used_store(state)
    with read_only(path):
        result = serve(repo, state)
    assert_refused(result, str(path), "writable")


def test_a_release_row_with_bad_json_is_refused_naming_the_model(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with gateway_in_thread(repo, state_dir=state, controller=False):
        pass
    with closing(sqlite3.connect(state / "state.db")) as db, db:
        db.execute("UPDATE releases SET state = '{\"model\": \"digits\", ' WHERE model = 'digits'")
    result = serve(repo, state)
    assert_refused(result, str(state / "state.db"), "'digits'")


def test_writes_failing_while_serving_answer_unavailable_and_log_once(
    repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every write refused (as with a store made read-only, or a disk that filled, after
    startup): a change answers UNAVAILABLE naming the fix; the controller's lease writes
    every 0.5 s fail too, and the log gets one line, without a traceback."""
    with gateway_in_thread(repo, state_dir=tmp_path / "state") as running:
        store = running.gateway.store
        assert isinstance(store, SqliteStore)
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(running.control))
        with caplog.at_level(logging.INFO):
            # The store's own connection, as the operating system would turn it: read-only.
            running.call(_query_only(store, True))
            try:
                with pytest.raises(grpc.RpcError) as caught:
                    control.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=100), timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "writable" in (caught.value.details() or "")
                assert "state.db" in (caught.value.details() or "")
                time.sleep(3.0)  # six controller ticks
            finally:
                running.call(_query_only(store, False))
        failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [r for r in failures if r.exc_info], [r.getMessage() for r in failures]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        assert "state.db" in failures[0].getMessage()
        # Once the store can be written again, so can the release.
        release = control.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=100), timeout=10)
        assert release.canary_weight_bp == 100


def test_a_full_disk_answers_unavailable_naming_the_fix(repo: Path, tmp_path: Path) -> None:
    with gateway_in_thread(repo, state_dir=tmp_path / "state", controller=False) as running:
        store = running.gateway.store
        assert isinstance(store, SqliteStore)
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(running.control))
        # SQLite's own "disk is full" (SQLITE_FULL): the file may not grow by one page.
        running.call(_cap_pages(store))
        codes = []
        for i in range(200):
            try:
                control.SetTraffic(
                    rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=i + 1, reason="x" * 1000), timeout=10
                )
            except grpc.RpcError as exc:
                codes.append((exc.code(), exc.details()))
                break
        assert codes, "the store never filled up"
        code, details = codes[0]
        assert code == grpc.StatusCode.UNAVAILABLE, codes
        assert "disk" in (details or "") and "state.db" in (details or "")


async def _query_only(store: SqliteStore, on: bool) -> None:
    with store._lock:
        store._db.execute(f"PRAGMA query_only = {int(on)}")


async def _cap_pages(store: SqliteStore) -> None:
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
