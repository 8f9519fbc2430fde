"""A real PostgreSQL server for the tests, never a mock: initdb into a temporary folder,
`pg_ctl start` on a free port (its unix socket in that folder too), a fresh database per
test, the server stopped when the session ends.

Test modules that use it name this module a plugin (`pytest_plugins = ("tests.postgres",)`).
Without the server binaries the tests skip, except under CI (`CI` set), where they fail:
.ci/run installs Debian's postgresql package.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from gateway.release.store import SqliteStore, Store
from gateway.release.store.postgres import PostgresStore

USER = "gateway"
# initdb and postgres refuse to run as root: as root, they run as this account (Debian's).
SERVER_ACCOUNT = "postgres"


def find_binary(name: str) -> Path | None:
    """On PATH, else where Debian puts it (/usr/lib/postgresql/<major>/bin), the newest major."""
    found = shutil.which(name)
    if found:
        return Path(found)
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]) if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    port: int
    data: Path
    pg_ctl: Path
    run_as: list[str]
    options: str = ""
    log: Path | None = None
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*self.run_as, str(self.pg_ctl), "stop", "-D", str(self.data), "-m", "immediate"], check=False)

    def start(self) -> None:
        """Start it again after stop(), on the same port (an outage ends)."""
        command = [*self.run_as, str(self.pg_ctl), "start", "-D", str(self.data), "-w", "-t", "60"]
        subprocess.run([*command, "-l", str(self.log), "-o", self.options], check=True, capture_output=True)


def start_server(folder: Path) -> PostgresServer:
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        message = "PostgreSQL's server binaries (initdb, pg_ctl) are not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI installs the postgresql package (.ci/run)")
        pytest.skip(message)
    run_as: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam(SERVER_ACCOUNT)
        os.chown(folder, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", SERVER_ACCOUNT, "--"]
    data, port = folder / "data", free_port()
    # --no-sync and fsync=off: a test server, fast; the store's tests kill clients, never it.
    subprocess.run(
        [*run_as, str(initdb), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    server = PostgresServer(port, data, pg_ctl, run_as, options, folder / "log")
    server.start()
    return server


@contextlib.contextmanager
def throwaway_server() -> Iterator[PostgresServer]:
    """A server in a folder of its own, stopped and removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    server = start_server(folder)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with throwaway_server() as server:
        yield server


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A server of the test's own, to stop and start (an outage) without disturbing the others."""
    with throwaway_server() as server:
        yield server


@pytest.fixture
def state_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh database on the session's server."""
    return postgres_server.new_database()


@dataclass
class Backend:
    """Where a test's store lives: `target` is the SQLite file or the PostgreSQL URL."""

    name: str
    target: str

    def open(self) -> Store:
        if self.name == "postgres":
            return PostgresStore(self.target)
        return SqliteStore(Path(self.target))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each test that takes it runs on both backends (PostgreSQL's server starts only when needed)."""
    if request.param == "postgres":
        return Backend("postgres", request.getfixturevalue("state_url"))
    return Backend("sqlite", str(tmp_path / "state.db"))


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Backend:
    """SQLite alone, for what only SQLite has (stores from before schema versions)."""
    return Backend("sqlite", str(tmp_path / "state.db"))
