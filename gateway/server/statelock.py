"""One gateway per state directory.

Two gateways on one `--state-dir` would both run a controller over one store
and undo each other's steps. The serving process (or, with `--workers`, the
supervisor, for all of its workers) holds an exclusive lock on
`<state_dir>/gateway.lock` while it runs; the kernel drops it when the process
ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from gateway.errors import ConfigError

LOCK_NAME = "gateway.lock"


class StateLock:
    """An exclusive hold on a state directory; `release` (or process exit) lets it go."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def lock_state_dir(state_dir: Path) -> StateLock:
    """Take the directory's lock, or refuse naming the process that holds it and the fix."""
    path = state_dir / LOCK_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot use {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(
            f"state_dir: {state_dir} is in use by another gateway{holder}: "
            "give each gateway its own --state-dir, or stop the other one"
        ) from None
    # The holder's pid, for the message above (informational only: the lock decides).
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(fd, path)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (pid {pid})"
    return ""
