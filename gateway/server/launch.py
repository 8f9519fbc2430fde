"""Starting `gateway serve` as a child process and reading the addresses it reports.

Used by `gateway demo` and the load tests: the child prints `listening on
HOST:PORT` once every model is ready, after log lines naming the metrics and
control addresses.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

LISTENING = re.compile(r"listening on (\S+:\d+)")
CONTROL = re.compile(r"control on (\S+:\d+)")
METRICS = re.compile(r"metrics on \S+:(\d+)")


@dataclass
class Launched:
    proc: subprocess.Popen[str]
    address: str
    control: str = ""  # empty: no control API
    metrics_port: int = -1


def serve(args: Sequence[str], prefix: Sequence[str] = ()) -> Launched:
    """Run `[*prefix, python -m gateway serve, *args]`; return once it listens (raises if it exits first)."""
    command = [*prefix, sys.executable, "-m", "gateway", "serve", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    launched = Launched(proc, "")
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if found := CONTROL.search(line):
            launched.control = found.group(1)
        if found := METRICS.search(line):
            launched.metrics_port = int(found.group(1))
        if found := LISTENING.search(line):
            launched.address = found.group(1)
            # Keep reading so the child never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
            return launched
    proc.wait()
    raise RuntimeError("gateway serve exited before listening:\n" + "".join(seen[-20:]))
