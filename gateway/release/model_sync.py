"""Run-time model loads and unloads reach every worker process of one gateway.

`gateway serve --workers N` runs N processes on one port, and only worker 0
serves the control API. A `models load/unload` there is applied by worker 0
first (so a broken model is refused before anyone else touches it), then
written to the state database as an intent. Every other worker polls the
intents, as it polls releases, applies each one with the same all-or-nothing
load, and writes an acknowledgement; worker 0 answers once every running
worker has acknowledged, or when the wait ends, saying what each one did.

Intents belong to one run of the gateway: a worker that restarts applies its
run's intents before it serves, so it serves the same models as the others.
A new `gateway serve` starts again from the repository and `--load`, as the
README says.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import FailedPrecondition
from gateway.release.store import retry_while_locked

SCHEMA = """
CREATE TABLE IF NOT EXISTS model_intents (   -- run-time loads and unloads, in the order applied
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    action TEXT NOT NULL,                    -- load | unload
    model TEXT NOT NULL,
    origin TEXT NOT NULL,                    -- the worker that applied it first (it serves the control API)
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_acks (
    intent INTEGER NOT NULL,
    worker TEXT NOT NULL,
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (intent, worker)
);
CREATE TABLE IF NOT EXISTS model_workers (   -- the workers of a run, so worker 0 knows whom to wait for
    run TEXT NOT NULL,
    worker TEXT NOT NULL,
    pid INTEGER NOT NULL,
    PRIMARY KEY (run, worker)
);
"""

POLL_S = 0.5  # how often a worker looks for new intents (releases are polled as often)
ACK_WAIT_S = 60.0  # the longest a load/unload waits for the other workers (less if the call's deadline is nearer)
ACK_POLL_S = 0.1
LOAD = "load"
UNLOAD = "unload"


def run_id() -> str:
    """What the workers of one `gateway serve` share and a later run does not.

    multiprocessing gives every process a random authkey and spawned children
    inherit their parent's, so the supervisor's key names the run; only a hash
    of it is stored, never the key.
    """
    key = bytes(multiprocessing.current_process().authkey)
    return f"{os.getppid()}-{hashlib.sha256(key).hexdigest()[:16]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True)
class Intent:
    id: int
    action: str
    model: str
    origin: str


@dataclass(frozen=True, slots=True)
class Ack:
    ok: bool
    detail: str


class NotEverywhere(FailedPrecondition):
    """A load or unload that some running worker failed to apply, or had not applied when the wait ended."""


@dataclass(slots=True)
class Rollcall:
    """What every worker did with one intent."""

    applied: list[str]
    failed: dict[str, str] = field(default_factory=dict)  # worker -> its error
    silent: list[str] = field(default_factory=list)  # running, but had not answered when the wait ended
    stopped: list[str] = field(default_factory=list)  # not running now: they apply it when they restart

    @property
    def total(self) -> int:
        return len(self.applied) + len(self.failed) + len(self.silent) + len(self.stopped)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.silent

    def notes(self) -> str:
        """Per worker, everything but a plain success."""
        parts = [f"worker {w} failed: {detail}" for w, detail in sorted(self.failed.items())]
        parts += [f"worker {w} had not answered yet (it applies the change when it can)" for w in sorted(self.silent)]
        parts += [f"worker {w} is not running (it applies the change when it restarts)" for w in sorted(self.stopped)]
        return "; ".join(parts)

    def check(self, verb: str, model: str) -> None:
        """Raise NotEverywhere unless every running worker applied it."""
        if self.complete:
            return
        raise NotEverywhere(
            f"{model}: {verb} on {len(self.applied)} of {self.total} workers; {self.notes()}. "
            f"Workers that failed keep serving what they served before: fix the cause and run "
            f"`gateway models {'load' if verb == 'loaded' else 'unload'} {model}` again"
        )


def net_actions(intents: list[Intent]) -> dict[str, str]:
    """The last action per model: what a worker starting now must make true."""
    return {i.model: i.action for i in intents}


class IntentStore:
    """This run's intents, acknowledgements and workers, in the gateway's state database."""

    def __init__(self, path: Path, run: str) -> None:
        self.run = run
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged intent survives a crash
        retry_while_locked(self._create_schema)
        self._lock = threading.Lock()  # one connection, used from worker threads

    def _create_schema(self) -> None:
        self._db.executescript(SCHEMA)

    def register(self, worker: str, pid: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO model_workers (run, worker, pid) VALUES (?, ?, ?)", (self.run, worker, pid)
            )
            self._prune()

    def _prune(self) -> None:
        """Forget runs none of whose workers is alive (their intents can matter to no one)."""
        rows = self._db.execute("SELECT run, pid FROM model_workers WHERE run != ?", (self.run,)).fetchall()
        runs: dict[str, bool] = {}
        for run, pid in rows:
            runs[run] = runs.get(run, False) or pid_alive(int(pid))
        for run in [r for r, alive in runs.items() if not alive]:
            self._db.execute(
                "DELETE FROM model_acks WHERE intent IN (SELECT id FROM model_intents WHERE run = ?)", (run,)
            )
            self._db.execute("DELETE FROM model_intents WHERE run = ?", (run,))
            self._db.execute("DELETE FROM model_workers WHERE run = ?", (run,))

    def publish(self, action: str, model: str, origin: str) -> int:
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO model_intents (run, action, model, origin, at) VALUES (?, ?, ?, ?, ?)",
                (self.run, action, model, origin, time.time()),
            )
        return int(cursor.lastrowid or 0)

    def intents_after(self, last_id: int) -> list[Intent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, action, model, origin FROM model_intents WHERE run = ? AND id > ? ORDER BY id",
                (self.run, last_id),
            ).fetchall()
        return [Intent(int(r[0]), r[1], r[2], r[3]) for r in rows]

    def ack(self, intent: int, worker: str, ok: bool, detail: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO model_acks (intent, worker, ok, detail, at) VALUES (?, ?, ?, ?, ?)",
                (intent, worker, int(ok), detail, time.time()),
            )

    def acks(self, intent: int) -> dict[str, Ack]:
        with self._lock:
            rows = self._db.execute("SELECT worker, ok, detail FROM model_acks WHERE intent = ?", (intent,)).fetchall()
        return {r[0]: Ack(bool(r[1]), r[2]) for r in rows}

    def workers(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT worker, pid FROM model_workers WHERE run = ?", (self.run,)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def rollcall(self, intent: int, origin: str) -> tuple[Rollcall, bool]:
        """What every worker did so far, and whether some running worker has yet to answer."""
        acks = self.acks(intent)
        call = Rollcall(applied=[origin])
        for worker, pid in sorted(self.workers().items()):
            if worker == origin:
                continue
            ack = acks.get(worker)
            if ack is not None and ack.ok:
                call.applied.append(worker)
            elif ack is not None:
                call.failed[worker] = ack.detail
            elif pid_alive(pid):
                call.silent.append(worker)
            else:
                call.stopped.append(worker)
        return call, bool(call.silent)

    def close(self) -> None:
        with self._lock:
            self._db.close()
