"""Starting a server as a child process and reading the addresses it reports: the one launcher.

`gateway serve` prints `listening on HOST:PORT` once every model is ready,
after log lines naming the REST (http), metrics and control addresses; the load tests' bare
server prints the same line. `gateway demo`, the load tests (which add CPU
pinning and CPU accounting on top) and the tests start servers through here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"listening on (\S+:\d+)")
CONTROL = re.compile(r"control on (\S+:\d+)")
HTTP = re.compile(r"http on (\S+:\d+)")
DASHBOARD = re.compile(r"dashboard on (https?://\S+/)")
METRICS = re.compile(r"metrics on \S+:(\d+)")
STOP_TIMEOUT_S = 20.0
# Lines of output a failed start shows.
SHOWN_LINES = 20


class LaunchError(RuntimeError):
    """The child exited, or did not say `listening on` in time; the message ends with its last output."""


class Output:
    """The child's output lines, read by a thread of their own so that its pipe never fills.

    `keep` bounds how many are kept (None: all of them). Reads take a copy under a
    lock: the reader thread appends while callers look.
    """

    def __init__(self, keep: int | None = None) -> None:
        self._lines: deque[str] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def tail(self, count: int = SHOWN_LINES) -> str:
        shown = "".join(self.lines()[-count:])
        return shown or "(no output)\n"


@dataclass
class Launched:
    proc: subprocess.Popen[str]
    address: str = ""  # HOST:PORT from `listening on`
    control: str = ""  # empty: no control API
    http: str = ""  # HOST:PORT of the REST binding; empty: off
    dashboard: str = ""  # the dashboard's URL; empty: off
    metrics_port: int = -1
    output: Output = field(default_factory=Output)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a drain: worker processes exit with their supervisor), then a kill; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode


def start(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float | None = None,
    keep_lines: int | None = None,
    preexec_fn: Callable[[], None] | None = None,
    new_session: bool = False,
) -> Launched:
    """Run `command`, a server that prints `listening on HOST:PORT`; return once it has.

    Raises LaunchError when it exits first or (with `timeout_s`) takes longer, after
    killing it. `new_session` puts it in a session of its own, so a Ctrl-C meant for
    the caller reaches only the caller, which then stops it.
    """
    # Unbuffered, so each line arrives as it is written and log lines keep their order.
    merged = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=merged,
        cwd=cwd,
        preexec_fn=preexec_fn,
        start_new_session=new_session,
    )
    launched = Launched(proc, output=Output(keep_lines))
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            launched.output.append(line)
            if ready.is_set():
                continue
            if found := CONTROL.search(line):
                launched.control = found.group(1)
            if found := HTTP.search(line):
                launched.http = found.group(1)
            if found := DASHBOARD.search(line):
                launched.dashboard = found.group(1)
            if found := METRICS.search(line):
                launched.metrics_port = int(found.group(1))
            if found := LISTENING.search(line):
                launched.address = found.group(1)
                ready.set()
        ready.set()  # end of output: it exited (or closed its output) without listening

    threading.Thread(target=read, name="launched-output", daemon=True).start()
    ended = ready.wait(timeout_s)  # set without an address: its output ended (it exited)
    if not launched.address:
        exited = ended or proc.poll() is not None
        proc.kill()
        proc.wait(10)
        what = "exited before listening" if exited else f"did not listen within {timeout_s:g} s"
        raise LaunchError(f"{' '.join(command)} {what}:\n{launched.output.tail()}")
    return launched


def serve_command(args: Sequence[str], prefix: Sequence[str] = ()) -> list[str]:
    """`[*prefix, python -m gateway serve, *args]`: this interpreter's gateway, whatever PATH says."""
    return [*prefix, sys.executable, "-m", "gateway", "serve", *args]


def serve(args: Sequence[str], prefix: Sequence[str] = ()) -> Launched:
    """Start `gateway serve` with `args`; return once it listens (raises LaunchError if it exits first)."""
    return start(serve_command(args, prefix))
